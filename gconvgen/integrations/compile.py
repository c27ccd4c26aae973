"""The torch.compile backend ``gconvgen``: grouped convs (2-D and 1-D) in the captured graph become gconvgen
ops, and the rest of the graph goes to Inductor.

    torch.compile(model, backend="gconvgen", fullgraph=True)

The rewrite happens on Dynamo's torch-level graph, before AOTAutograd, so training traces the backward
through gconvgen's autograd formula into its grad ops. Registered under the ``torch_dynamo_backends``
entry point (pyproject.toml) and, for a checkout that is not installed, when this module is imported.
``make_backend(inner)`` hands the rest to another backend (e.g. "aot_eager") instead of Inductor.
A grouped conv's epilogue in the graph (eval batch_norm, residual add, activation; graph_epilogue.py) is
fused into its gconvgen call.

What it did: each compiled graph prints one line to stderr, e.g. "gconvgen: rewrote 12 grouped convs (3 fused:
3 BN+relu)" (logger ``gconvgen.summary``); ``TORCH_LOGS="gconvgen"`` (or Python logging at INFO for the
``gconvgen`` logger) shows each rewrite and first-call tuning, ``TORCH_LOGS="+gconvgen"`` also why a grouped conv
stays with torch.
"""
from __future__ import annotations

import logging
import operator
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Optional

import torch
import torch._dynamo
from torch import fx, nn

from ..nn.conv2d import conv2d
from ..nn.conv1d import conv1d
from ..nn.fuse import fold_batch_norm
from .graph_epilogue import match_epilogue
from ..ir import check
from ..runtime.device import DTYPE_NAMES

# every rewrite at info level, why a conv stays with torch at debug: TORCH_LOGS="gconvgen" (or "+gconvgen")
log = logging.getLogger(__name__)
SUMMARY_LOGGER = "gconvgen.summary"  # one line per compiled graph, shown by default (see _summary_log)

BACKEND_NAME = "gconvgen"
# (input, weight, bias, stride, padding, dilation, groups): the functional form and its defaults
_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")


# per conv dimension: the module class, the functional targets, and what gconvgen runs instead (its input ranks)
_CONVS = {
    2: (nn.Conv2d, (torch.conv2d, torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding), conv2d, (3, 4)),
    1: (nn.Conv1d, (torch.conv1d, torch.ops.aten.conv1d.default, torch.ops.aten.conv1d.padding), conv1d, (2, 3)),
}


def _conv_call(graph_module: fx.GraphModule, node: fx.Node, dims: int) -> Optional[dict]:
    """The arguments of a ``dims``-D conv call (F.conv2d / F.conv1d, their aten ops, aten.convolution or an
    nn.Conv2d / nn.Conv1d module), keyed by _CONV2D_ARGS (gconvgen.conv1d takes the same names), or None
    when ``node`` is not one. A module's weight and bias are given as their attribute paths (str);
    ``rewrite_grouped_convs`` turns them into get_attr nodes."""
    module_class, targets = _CONVS[dims][:2]
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if type(module) is not module_class or module.padding_mode != "zeros" or len(node.args) != 1:
            return None
        return {"input": node.args[0], "weight": f"{node.target}.weight",
                "bias": None if module.bias is None else f"{node.target}.bias", "stride": module.stride,
                "padding": module.padding, "dilation": module.dilation, "groups": module.groups}
    if node.op != "call_function":
        return None
    if node.target in targets:
        return {**_CONV2D_DEFAULTS, **dict(zip(_CONV2D_ARGS, node.args)), **node.kwargs}
    if node.target is torch.ops.aten.convolution.default:
        call = dict(zip(_CONVOLUTION_ARGS, node.args))
        if call["transposed"] or any(call["output_padding"]) or len(call["stride"]) != dims:
            return None
        return {name: call[name] for name in _CONV2D_ARGS}
    return None


def _example_input(call: dict) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo (or FakeTensorProp) recorded for the conv's input, or None."""
    example = call["input"].meta.get("example_value", call["input"].meta.get("val"))
    return example if isinstance(example, torch.Tensor) else None


def _why_not(call: dict, ranks: tuple[int, int] = (3, 4)) -> Optional[str]:
    """Why a conv call stays as it is, or None when gconvgen runs it; ``ranks`` are the input ranks it takes
    (unbatched and batched: (2, 3) for a 1-D conv)."""
    groups = call["groups"]
    if not isinstance(groups, int) or groups <= 1:
        return f"groups={groups!r}"
    example = _example_input(call)
    if example is None:
        return "no example input in the graph"
    if example.dtype not in DTYPE_NAMES or example.dim() not in ranks:
        return f"input {example.dtype} with {example.dim()} dims"
    return None


@dataclass
class Rewrites:
    """What one rewrite did: how many convs now run by gconvgen, the epilogue fused into each conv that has
    one (e.g. 'BN+relu'), and why each grouped conv that stays with torch stays."""

    replaced: int = 0
    fused: list[str] = field(default_factory=list)
    stayed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line, e.g. 'gconvgen: rewrote 12 grouped convs (3 fused: 2 BN+relu, 1 BN+add+silu)'."""
        line = f"gconvgen: rewrote {self.replaced} grouped conv{'s' * (self.replaced != 1)}"
        if self.fused:
            kinds = Counter(self.fused)
            line += f" ({len(self.fused)} fused: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) + ")"
        if self.stayed:
            line += f"; {len(self.stayed)} stay with torch (TORCH_LOGS=+gconvgen says why)"
        return line


def rewrite_grouped_convs(graph_module: fx.GraphModule) -> int:
    """Replace every grouped 2-D conv call of ``graph_module`` by ``gconvgen.conv2d`` and every grouped 1-D
    one by ``gconvgen.conv1d``, in place, together with the epilogue after it (see ``match_epilogue``): an
    eval-mode batch_norm folded into the weight and bias, a residual add and an activation. Returns how many
    convs were replaced; each rewrite is logged at info level (logger ``gconvgen.compile``), and why the
    others were not at debug level."""
    return rewrite(graph_module).replaced


def rewrite(graph_module: fx.GraphModule) -> Rewrites:
    """``rewrite_grouped_convs``, returning what it did (Rewrites)."""
    rewrites = Rewrites()
    graph = graph_module.graph
    for node in list(graph.nodes):
        dims, call = next(((dims, call) for dims in _CONVS
                           for call in [_conv_call(graph_module, node, dims)] if call is not None), (None, None))
        if call is None:
            continue
        function, ranks = _CONVS[dims][2:]
        reason = _why_not(call, ranks)
        if reason:
            log.debug("gconvgen backend: %s stays with torch: %s", _where(node), reason)
            if not (isinstance(call["groups"], int) and call["groups"] <= 1):
                rewrites.stayed.append(reason)
            continue
        batched = _example_input(call).dim() == ranks[1]
        epilogue = match_epilogue(graph_module, node, batched=batched)
        with graph.inserting_before(epilogue.last):
            for name in ("weight", "bias"):
                if isinstance(call[name], str):  # a module's parameter
                    call[name] = graph.get_attr(call[name])
            if epilogue.batch_norm is not None:
                folded = graph.call_function(fold_batch_norm, (call["weight"], call["bias"], *epilogue.batch_norm))
                call["weight"] = graph.call_function(operator.getitem, (folded, 0))
                call["bias"] = graph.call_function(operator.getitem, (folded, 1))
            kwargs = {}
            if epilogue.activation:
                kwargs["activation"] = epilogue.activation
            if epilogue.residual is not None:
                kwargs["residual"] = epilogue.residual
            gconvgen_call = graph.call_function(function, tuple(call[name] for name in _CONV2D_ARGS), kwargs)
        gconvgen_call.meta = dict(epilogue.last.meta)
        epilogue.last.replace_all_uses_with(gconvgen_call)
        for fused_node in reversed(epilogue.nodes):
            graph.erase_node(fused_node)
        rewrites.replaced += 1
        fused = "+".join(part for part, present in (("BN", epilogue.batch_norm is not None),
                                                    ("add", epilogue.residual is not None),
                                                    (epilogue.activation, bool(epilogue.activation))) if present)
        if fused:
            rewrites.fused.append(fused)
        log.info("gconvgen backend: %s -> gconvgen.%s%s", _where(node), function.__name__,
                 f" with {fused} fused" if fused else "")
    graph_module.recompile()
    log.info("gconvgen backend: %d grouped conv(s) now run by gconvgen, %d with a fused epilogue",
             rewrites.replaced, len(rewrites.fused))
    return rewrites


def _where(node: fx.Node) -> str:
    """The node's name and, where Dynamo recorded it, the module it came from: 'conv2d (0.dw)'."""
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()), None) if stack else None
    path = module[0] if isinstance(module, tuple) and module and isinstance(module[0], str) else ""
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)  # Dynamo's name of the compiled callable: not the user's
    return f"{node.name} ({path})" if path else node.name


def make_backend(inner: str | Callable = "inductor") -> Callable:
    """A torch.compile backend that rewrites grouped convs, then compiles the graph with ``inner`` (a backend
    name such as "inductor" or "aot_eager", or a backend function)."""
    check(isinstance(inner, str) or callable(inner),
          f"inner={inner!r} must be a torch.compile backend name or function", TypeError)

    def gconvgen_backend(graph_module: fx.GraphModule, example_inputs: list) -> Callable:
        rewrites = rewrite(graph_module)
        if rewrites.replaced or rewrites.stayed:
            _summary_log().info("%s", rewrites.summary())
        return torch._dynamo.lookup_backend(inner)(graph_module, example_inputs)

    return gconvgen_backend


backend = make_backend("inductor")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.stderr is when a line is written (as logging's last resort
    does), so redirecting stderr later redirects the summary too."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _summary_log() -> logging.Logger:
    """The logger of the one-line summary each compiled graph gets (``gconvgen.summary``). Unless the user
    configured it (a level or a handler of their own), it prints its info lines to stderr, once each, and
    does not pass them on; ``logging.getLogger("gconvgen.summary").setLevel(logging.WARNING)`` silences it."""
    summary = logging.getLogger(SUMMARY_LOGGER)
    if summary.level == logging.NOTSET and not summary.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        summary.addHandler(handler)
        summary.setLevel(logging.INFO)
        summary.propagate = False
    return summary


def _register() -> None:
    """Register ``backend`` as "gconvgen" unless torch will load it through the installed entry point
    (registering it twice is an error in torch)."""
    if any(entry.name == BACKEND_NAME for entry in metadata.entry_points(group="torch_dynamo_backends")):
        return
    if BACKEND_NAME not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(backend, name=BACKEND_NAME)


_register()
