"""The epilogue of a grouped conv in a captured FX graph, for the torch.compile backend to fuse:

    conv -> [batch_norm, eval] -> [add residual] -> [activation]

Each step is taken only when the value before it has that one user, so no intermediate value the rest of
the graph reads disappears. What Dynamo (torch 2.13) gives for modules: parameters and buffers as graph
inputs (placeholders), nn.BatchNorm2d in eval as ``F.batch_norm(x, mean, var, weight, bias, False, momentum,
eps)``, nn.ReLU6 as ``F.hardtanh(x, 0.0, 6.0)``, nn.GELU as ``torch._C._nn.gelu(x, approximate=...)``. A
symbolically traced graph keeps modules as call_module nodes; their tensors become get_attr nodes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..activations import of_function
from ..activations import of_module as activation_of

aten = torch.ops.aten
_HARDTANH = (F.hardtanh, F.hardtanh_, aten.hardtanh.default, aten.hardtanh_.default)  # relu6 at bounds (0, 6)
# out-of-place adds only: an add that writes into an operand (``skip += y``, ``skip.add_(y)``) must leave that
# tensor changed, which a residual fused into the conv's store would not do
_ADD = (operator.add, torch.add, aten.add.Tensor)
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


@dataclass
class Epilogue:
    """What follows a conv node: ``nodes`` the conv and the nodes fused into it, in graph order (``last`` is
    the one whose value the fused call gives); ``batch_norm`` (mean, var, weight, bias, eps) to fold."""

    nodes: list[fx.Node] = field(default_factory=list)
    batch_norm: Optional[tuple] = None
    residual: Optional[fx.Node] = None
    activation: Optional[str] = None

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def match_epilogue(graph_module: fx.GraphModule, conv: fx.Node, *, batched: bool = True) -> Epilogue:
    """The longest conv -> [batch_norm] -> [add] -> [activation] chain starting at ``conv`` whose
    intermediate values have no other users (just ``conv`` when nothing follows it that way). An unbatched
    conv's batch_norm is not folded: it would normalize another dimension than the conv's channels."""
    epilogue = Epilogue([conv])
    user = _only_user(conv)
    batch_norm = _batch_norm_of(graph_module, user, conv) if user is not None and batched else None
    if batch_norm is not None:
        epilogue.batch_norm = batch_norm
        epilogue.nodes.append(user)
        user = _only_user(user)
    residual = _residual_of(user, epilogue.last) if user is not None else None
    if residual is not None:
        epilogue.residual = residual
        epilogue.nodes.append(user)
        user = _only_user(user)
    activation = _activation_of(graph_module, user, epilogue.last) if user is not None else None
    if activation is not None:
        epilogue.activation = activation
        epilogue.nodes.append(user)
    return epilogue


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _example(node: object) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _batch_norm_of(graph_module: fx.GraphModule, node: fx.Node, value: fx.Node) -> Optional[tuple]:
    """(mean, var, weight, bias, eps) of an eval-mode batch norm of ``value`` with running statistics, else None."""
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if (type(module) not in (nn.BatchNorm1d, nn.BatchNorm2d) or module.training or module.running_mean is None
                or node.args != (value,) or node.kwargs):
            return None
        tensors = [None if getattr(module, name) is None else graph_module.graph.get_attr(f"{node.target}.{name}")
                   for name in ("running_mean", "running_var", "weight", "bias")]
        for tensor in tensors:  # get_attr nodes are appended; they must come before the conv that reads them
            if tensor is not None:
                value.prepend(tensor)
        return (*tensors, module.eps)
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    call = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
            **dict(zip(_BATCH_NORM_ARGS, node.args)), **node.kwargs}
    if call["input"] is not value or call["training"] is not False:
        return None
    if not all(isinstance(call[name], fx.Node) for name in ("running_mean", "running_var")):
        return None
    return (call["running_mean"], call["running_var"], call["weight"], call["bias"], call["eps"])


def _residual_of(node: fx.Node, value: fx.Node) -> Optional[fx.Node]:
    """The other operand of ``node`` = ``value`` + other (either order), when other has value's shape, dtype
    and device (no broadcasting), else None."""
    is_add = (node.op == "call_function" and node.target in _ADD) or (
        node.op == "call_method" and node.target == "add")
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    other = second if first is value else first if second is value else None
    if other is None or other is value:
        return None
    mine, theirs = _example(value), _example(other)
    if mine is None or theirs is None:
        return None
    if theirs.shape != mine.shape or theirs.dtype != mine.dtype or theirs.device != mine.device:
        return None
    return other


def _activation_of(graph_module: fx.GraphModule, node: fx.Node, value: fx.Node) -> Optional[str]:
    """The epilogue activation ``node`` applies to ``value``, or None."""
    if not node.args or node.args[0] is not value:
        return None
    extra, kwargs = node.args[1:], {name: arg for name, arg in node.kwargs.items() if name != "inplace"}
    if node.op == "call_module":
        return activation_of(graph_module.get_submodule(node.target)) if not extra and not kwargs else None
    if node.op == "call_method":
        return "relu" if node.target in ("relu", "relu_") and not extra and not kwargs else None
    if node.op != "call_function":
        return None
    target = node.target
    activation = of_function(target)
    if activation == "gelu":
        approximate = kwargs.get("approximate", extra[0] if extra else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate) if len(extra) <= 1 else None
    if activation is not None:
        plain = not kwargs and extra in ((), (False,), (True,))  # the positional inplace flag
        return activation if plain else None
    if target in _HARDTANH:
        bounds = {"min_val": -1.0, "max_val": 1.0, **dict(zip(("min_val", "max_val"), extra)), **kwargs}
        return "relu6" if (bounds["min_val"], bounds["max_val"]) == (0.0, 6.0) and len(extra) <= 3 else None
    return None
