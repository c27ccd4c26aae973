"""Model fusion: ``gconvgen.fuse(model)`` folds each grouped conv's BatchNorm into its weight and bias (eval
mode) and absorbs the activation after it into the kernel's epilogue, in place, and says what it fused and
what it skipped and why.

A chain is found where the parent module's forward runs it and nothing else reads its intermediate values:

    nn.Sequential (forward not overridden)   adjacent children, in order: conv [, bn] [, act]
    any other parent                         its forward traced by torch.fx with every child a leaf; the
                                             conv's only user is the bn (or act), the bn's only user the act,
                                             each called once there, none of them read as attributes

A parent whose forward cannot be traced keeps its children as they are (reported). A functional activation
in a forward (``F.relu(self.bn(self.conv(x)))``) is not a module and stays; the torch.compile backend fuses
those.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx
from torch import nn

from ..activations import of_module as activation_of
from .conv2d import GroupedConv2d
from .conv1d import GroupedConv1d
from ..ir import check
from ..runtime.device import DTYPE_NAMES

log = logging.getLogger(__name__)

# the torch conv -> the gconvgen module that replaces it, and the BatchNorm that may follow it
GROUPED = {nn.Conv2d: GroupedConv2d, nn.Conv1d: GroupedConv1d}
BATCH_NORMS = {nn.Conv2d: nn.BatchNorm2d, nn.Conv1d: nn.BatchNorm1d}


@dataclass
class FusionReport:
    """What ``fuse`` did: ``fused`` as (conv name, what was folded and absorbed), ``skipped`` as (name, reason),
    and ``new_parameters``, the fused convs whose weight and bias are new Parameters (a BatchNorm was folded
    into them): an optimizer made before ``fuse`` does not hold them."""

    fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    new_parameters: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"gconvgen.fuse: fused {len(self.fused)} conv(s), skipped {len(self.skipped)}"]
        lines += [f"  fused    {name}: {what}" for name, what in self.fused]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        if self.new_parameters:
            lines.append(f"  new Parameters: the weight and bias of {', '.join(map(repr, self.new_parameters))} "
                         f"(BatchNorm folded in); an optimizer made before fuse holds the old ones: make it again")
        return "\n".join(lines)


@dataclass
class _Chain:
    """A conv and the BatchNorm and activation that follow it in one parent (child names)."""

    conv: str
    bn: Optional[str] = None
    act: Optional[str] = None
    # (child name, reason) when a BatchNorm / activation follows but cannot be fused
    why_not_bn: Optional[tuple[str, str]] = None
    why_not_act: Optional[tuple[str, str]] = None
    why_not_conv: Optional[str] = None  # a BatchNorm or activation follows, but the conv cannot be fused at all


def fuse(model: nn.Module) -> nn.Module:
    """Fuse the grouped convs of ``model`` with the BatchNorm and activation modules after them, in place
    (as ``convert`` works: pass ``copy.deepcopy(model)`` to keep the original), and return ``model``.

    Selected are ``nn.Conv2d`` / ``nn.Conv1d`` with ``groups > 1`` and every GroupedConv2d / GroupedConv1d.
    A BatchNorm in eval mode with running statistics, in a model in eval mode, is folded into new weight and
    bias Parameters (computed in float64, weight * gamma / sqrt(var + eps)); one in training mode stays, as it
    needs batch statistics, and so does the activation after it. So does an eval-mode BatchNorm inside a model
    (or parent module) in training mode, a frozen BatchNorm being fine-tuned around: folding it would train
    its statistics into the conv's weight. An activation module (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU,
    nn.Hardswish; inplace or not) right after the conv (or the folded BatchNorm) becomes the kernel's
    epilogue. The conv becomes a GroupedConv2d/1d (sharing its Parameters where no BatchNorm was folded)
    and the absorbed modules become nn.Identity, so state-dict keys of absorbed BatchNorms disappear. A model
    fused in eval mode is for inference: its folded BatchNorms are gone if it is put back in training mode.

    Optimizers: the new Parameters of a folded conv replace its old ones, which an optimizer made before
    ``fuse`` still holds (it would update tensors the model no longer reads); make the optimizer after
    ``fuse``. The report's ``new_parameters`` names those convs, and its text says so.

    Skipped, with the reason: modules with hooks, modules reachable under several names, a padding_mode other
    than 'zeros', a BatchNorm whose channels differ from the conv's outputs or without running statistics in
    eval mode, chains a parent's forward does not run as a chain (an output also read by another op, a conv
    or module called more than once). The report is logged (logger ``gconvgen.fusion``) and kept as
    ``model.gconvgen_fuse_report``, a FusionReport. Raises TypeError for a model that is not an nn.Module.
    """
    check(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}", TypeError)
    report = FusionReport()
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        chains, why_untraced = _chains_of(parent)
        if why_untraced:
            report.skipped.append((parent_name or type(parent).__name__, why_untraced))
            continue
        for chain in chains:
            _fuse_chain(parent, chain, prefix, uses, report, model.training or parent.training)
    model.gconvgen_fuse_report = report
    log.info("%s", report)
    return model


# ---------------------------------------------------------------------------------------------- finding chains


def _base_conv(module: nn.Module) -> Optional[type]:
    """nn.Conv2d or nn.Conv1d for a conv fuse selects, else None."""
    if type(module) in (GroupedConv2d, GroupedConv1d):
        return nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
    if type(module) in GROUPED and module.groups > 1:
        return type(module)
    return None


def _is_batch_norm_of(module: nn.Module, conv: nn.Module) -> bool:
    """Whether ``module`` is the BatchNorm of ``conv``'s dimension (BatchNorm2d after a 2-D conv)."""
    return type(module) is BATCH_NORMS[_base_conv(conv)]


def _chains_of(parent: nn.Module) -> tuple[list[_Chain], Optional[str]]:
    """The chains among ``parent``'s direct children, and why none could be looked for (or None)."""
    children = dict(parent.named_children())
    if not any(_base_conv(child) for child in children.values()):
        return [], None
    if type(parent).forward is nn.Sequential.forward:
        return _sequential_chains(list(children.items())), None
    try:
        graph = _LeafTracer().trace(parent)
    except Exception as error:  # any failure of symbolic tracing: the order is unknown, so nothing is fused
        return [], (f"{type(parent).__name__}.forward could not be traced to check the order of its children "
                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); put conv, bn "
                    f"and activation in an nn.Sequential to fuse them")
    return _traced_chains(graph, parent), None


def _sequential_chains(children: list[tuple[str, nn.Module]]) -> list[_Chain]:
    chains = []
    for index, (name, child) in enumerate(children):
        if not _base_conv(child):
            continue
        chain = _Chain(name)
        following = iter(children[index + 1:])
        after = next(following, None)
        if after and _is_batch_norm_of(after[1], child):
            chain.bn, after = after[0], next(following, None)
        if after and activation_of(after[1]):
            chain.act = after[0]
        chains.append(chain)
    return chains


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call stays one call_module node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _traced_chains(graph: torch.fx.Graph, parent: nn.Module) -> list[_Chain]:
    """The chains of ``parent``'s traced forward. A call target may be a nested name (``self.block[0](y)``
    calls "block.0"): such a module can be fused only if no module above it is run as a whole."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    read_as_attribute = {node.target.split(".")[0] for node in graph.nodes if node.op == "get_attr"}
    module = parent.get_submodule

    def follower(node: torch.fx.Node, wanted) -> tuple[Optional[torch.fx.Node], Optional[str]]:
        """The call_module user of ``node`` whose module ``wanted`` accepts, and why it cannot join the chain
        (None when it can: it is ``node``'s only user and takes its value as its one argument); (None, None)
        when no user is wanted."""
        user = next((user for user in node.users if user.op == "call_module" and wanted(module(user.target))), None)
        if user is None:
            return None, None
        others = [other.name for other in node.users if other is not user]
        if others:
            return user, (f"the output of {node.target!r} is also read by {', '.join(map(repr, others))} in the "
                          f"parent's forward, which needs it unfused")
        if user.args != (node,) or user.kwargs:
            return user, f"it is called with more arguments than the output of {node.target!r}"
        return user, None

    def why_not_alone(target: str) -> Optional[str]:
        if calls[target] != 1:
            return f"it is called {calls[target]} times in the parent's forward"
        if target.split(".")[0] in read_as_attribute:
            return "the parent's forward reads its attributes"
        parts = target.split(".")
        enclosing = next((".".join(parts[:end]) for end in range(1, len(parts)) if ".".join(parts[:end]) in calls), None)
        if enclosing is not None:
            return f"the parent's forward also runs it through {enclosing!r}"
        return None

    chains, reported = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or not _base_conv(module(node.target)):
            continue
        conv = module(node.target)
        after, why_not_next = follower(node, lambda each: _is_batch_norm_of(each, conv) or activation_of(each))
        reason = why_not_alone(node.target)
        if reason:  # a conv run twice (or read) stays; convert covers it. Said once, where something follows
            if after is not None and node.target not in reported:
                reported.add(node.target)
                chains.append(_Chain(node.target, why_not_conv=f"not fused with {after.target!r} after it: {reason}"))
            continue
        chain = _Chain(node.target)
        if after is not None and _is_batch_norm_of(module(after.target), conv):
            reason = why_not_next or why_not_alone(after.target)
            if len(node.args) != 1 or node.kwargs:
                chain.why_not_bn = (after.target, "the conv is called with a residual, which the BatchNorm would scale")
                after = None
            elif reason:
                chain.why_not_bn, after = (after.target, reason), None
            else:
                chain.bn = after.target
                after, why_not_next = follower(after, activation_of)
        if after is not None and activation_of(module(after.target)):
            reason = why_not_next or why_not_alone(after.target)
            if reason:
                chain.why_not_act = (after.target, reason)
            else:
                chain.act = after.target
        chains.append(chain)
    return chains


# ---------------------------------------------------------------------------------------------- fusing one chain


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _why_not_module(module: nn.Module, uses: Counter) -> Optional[str]:
    """Why a module of a chain cannot be fused away, or None."""
    if _hooked(module):
        return "it has hooks registered on it, which fusing would lose"
    if uses[id(module)] > 1:
        return "the same module is reachable under several names (it is used elsewhere too)"
    return None


def _why_not_fold(conv: nn.Module, bn: nn.Module, training: bool) -> Optional[str]:
    """Why ``bn`` cannot be folded into ``conv`` (in a model or parent in training mode with ``training``),
    or None."""
    if bn.training:
        return "it is in training mode (batch statistics); call model.eval() first to fold it"
    if training:
        return ("it is in eval mode inside a model in training mode (a frozen BatchNorm): folding it would replace "
                "the conv's Parameters by new ones and drop the BatchNorm's, changing what training updates; call "
                "model.eval() first to fold it for inference")
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False), so it normalizes by batch statistics"
    if bn.num_features != conv.out_channels:
        return f"it has {bn.num_features} channels but the conv outputs {conv.out_channels}"
    if getattr(conv, "data_format", "NCHW") == "NHWC":
        return "the conv's data_format is 'NHWC', on which the BatchNorm normalizes another dimension"
    return None


def _fuse_chain(parent: nn.Module, chain: _Chain, prefix: str, uses: Counter, report: FusionReport,
                training: bool) -> None:
    """Replace ``chain`` in ``parent`` by one fused conv, or say in ``report`` why (part of) it stays.
    ``training``: the model or ``parent`` is in training mode, so no BatchNorm is folded."""
    conv = parent.get_submodule(chain.conv)
    name = prefix + chain.conv
    if chain.why_not_conv:
        report.skipped.append((name, chain.why_not_conv))
        return
    if chain.why_not_bn:
        report.skipped.append((prefix + chain.why_not_bn[0], f"BatchNorm not folded: {chain.why_not_bn[1]}"))
    if chain.why_not_act:
        report.skipped.append((prefix + chain.why_not_act[0], f"activation not absorbed: {chain.why_not_act[1]}"))
    if chain.bn is None and chain.act is None:
        return
    reason = _why_not_module(conv, uses)
    if reason is None and conv.padding_mode != "zeros":
        reason = f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')"
    if reason is None and conv.weight.dtype not in DTYPE_NAMES:
        reason = f"dtype {conv.weight.dtype} is not supported"
    if reason is None and getattr(conv, "activation", None):
        reason = f"it already applies activation={conv.activation!r}"
    if reason:
        report.skipped.append((name, reason))
        return
    bn, act = chain.bn and parent.get_submodule(chain.bn), chain.act and parent.get_submodule(chain.act)
    if bn is not None:
        reason = _why_not_module(bn, uses) or _why_not_fold(conv, bn, training)
        if reason:
            report.skipped.append((prefix + chain.bn, f"BatchNorm not folded: {reason}"
                                                       + ("; the activation after it stays too" if act else "")))
            return
    if act is not None:
        reason = _why_not_module(act, uses)
        if reason:
            report.skipped.append((prefix + chain.act, f"activation not absorbed: {reason}"))
            act = None
            if bn is None:
                return
    activation = activation_of(act) if act is not None else None
    try:
        fused = _fused_conv(conv, bn, activation)
    except (TypeError, ValueError) as error:  # the planner refuses the conv
        report.skipped.append((name, str(error)))
        return
    _replace(parent, chain.conv, fused)
    what = [_describe(conv)]
    if bn is not None:
        _replace(parent, chain.bn, nn.Identity())
        what.append(f"BatchNorm {prefix + chain.bn!r} folded")
        report.new_parameters.append(name)
    if act is not None:
        _replace(parent, chain.act, nn.Identity())
        what.append(f"{activation} {prefix + chain.act!r} absorbed")
    report.fused.append((name, " + ".join(what)))


def _replace(parent: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` where ``parent``'s submodule ``target`` (a nested name like "block.0" too) is."""
    owner, _, name = target.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, name, module)


def _fused_conv(conv: nn.Module, bn: Optional[nn.Module], activation: Optional[str]) -> nn.Module:
    """A GroupedConv2d/1d computing ``activation(bn(conv(x)))``: new weight and bias Parameters when ``bn``
    is folded, else ``conv``'s own (shared). Raises ValueError / TypeError when gconvgen cannot run it."""
    grouped = GroupedConv1d if isinstance(conv, nn.Conv1d) else GroupedConv2d
    base = nn.Conv1d if isinstance(conv, nn.Conv1d) else nn.Conv2d
    check(type(conv).forward in (base.forward, grouped.forward),
          f"{type(conv).__name__} overrides nn.{base.__name__}.forward, which gconvgen cannot reproduce")
    module = grouped.from_conv(conv, channel_policy=getattr(conv, "channel_policy", "strict"), activation=activation)
    if isinstance(conv, GroupedConv2d):
        module.data_format = conv.data_format
    for buffer_name, buffer in conv._buffers.items():
        module.register_buffer(buffer_name, buffer, persistent=buffer_name not in conv._non_persistent_buffers_set)
    if bn is not None:
        weight, bias = folded_batch_norm(conv.weight, conv.bias, bn)
        module.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        module.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    return module


def fold_batch_norm(weight: torch.Tensor, bias: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                    gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a conv followed by an eval-mode batch norm, as one conv: weight * scale and
    (bias - mean) * scale + beta, scale = gamma / sqrt(var + eps). Differentiable torch ops, run in the
    graph on every call, so gradients reach the conv's and the batch norm's parameters."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias * scale
    if beta is not None:
        shift = shift + beta
    folded = weight * scale.to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))
    return folded, shift.to(weight.dtype)


@torch.no_grad()
def folded_batch_norm(weight: torch.Tensor, bias: Optional[torch.Tensor],
                      bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_batch_norm of conv-then-``bn`` (eval mode; gamma 1, beta 0 without affine), computed in float64
    and returned in ``weight``'s dtype."""
    def double(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.double()

    folded, shift = fold_batch_norm(weight.double(), double(bias), bn.running_mean.double(),
                                    bn.running_var.double(), double(bn.weight), double(bn.bias), bn.eps)
    return folded.to(weight.dtype), shift.to(weight.dtype)


def _describe(conv: nn.Module) -> str:
    return (f"{type(conv).__name__} {conv.in_channels}->{conv.out_channels} k{'x'.join(map(str, conv.kernel_size))}"
            f" groups={conv.groups}")
