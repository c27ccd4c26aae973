"""The op's autograd kernel that torch.func accepts, forward-mode AD, and the helpers of the batching rules."""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable, Optional

import torch
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad
from torch.autograd.function import _SingleLevelFunction


def register_autograd(op, backward: Callable, setup_context: Callable,
                      jvp: Callable[[tuple, tuple, torch.Tensor], torch.Tensor]) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, with an autograd kernel that
    torch.func's transforms accept, and forward-mode AD: ``jvp(inputs, tangents, output)`` gives the output's
    tangent from the op's arguments and their tangents (None where an argument has none), for
    torch.autograd.forward_ad and torch.func.jvp / jacfwd / hessian.

    torch's own kernel (torch/_library/autograd.py, up to at least 2.13; pytorch#170834) wraps the formula
    in an autograd.Function whose forward takes ctx, and ``Function.apply`` refuses such a Function under
    torch.func.grad, vjp or jacrev ("must override the setup_context staticmethod"). This kernel records
    the node as an aten op's autograd kernel does, and as functorch records its own per-level nodes: a
    ``_SingleLevelFunction`` at the current level, whose forward redispatches below autograd, where
    functorch hands the call on to the next level. Eager autograd and torch.compile see the same formula.
    """
    op.register_autograd(backward, setup_context=setup_context)
    overload = op._opoverload

    def redispatch(keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def forward(*args):  # the op's arguments, then the dispatch keyset
        # apply() turned gradients off for the forward; the levels below this one (an outer torch.func
        # transform) must still record it, as they do for an aten op: turn them back on
        with torch.enable_grad(), torch.autograd.forward_ad._set_fwd_grad_enabled(True):
            return redispatch(args[-1], *args[:-1])

    forward_mode = threading.local()  # whether the node being applied has tangents to carry forward

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs[:-1], output)
        if getattr(forward_mode, "active", False):  # for jvp_of_node: a backward-only node holds nothing more
            ctx.jvp_inputs, ctx.jvp_output = inputs[:-1], output

    def jvp_of_node(ctx, *tangents):
        inputs, output = ctx.jvp_inputs, ctx.jvp_output
        del ctx.jvp_inputs, ctx.jvp_output
        tangent = jvp(inputs, tangents[:-1], output)
        return torch.zeros_like(output) if tangent is None else tangent

    def backward_of_node(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[:-1]  # the formula sees the op's arguments only
        try:
            grad_inputs = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs_input_grad
        return (*grad_inputs, None) if isinstance(grad_inputs, tuple) else (grad_inputs, None)

    # its grad_fn reads e.g. "GconvgenConv2dBackward"
    name = "Gconvgen" + "".join(word.capitalize() for word in op._name.split("_"))
    node = type(name, (_SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward_of_node), "jvp": staticmethod(jvp_of_node)})

    def apply(*args):
        forward_mode.active = _has_tangent(args)
        try:
            return node.apply(*args)
        finally:
            forward_mode.active = False

    def autograd_kernel(keyset, *args):
        if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) and not _has_tangent(args):
            return redispatch(keyset, *args)
        if torch._C._are_functorch_transforms_active():
            with enable_single_level_autograd_function():
                return apply(*args, keyset)
        return apply(*args, keyset)

    with warnings.catch_warnings():  # replacing torch's kernel is the point; the dispatcher says so once
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        op._lib.impl(op._name, autograd_kernel, "Autograd", with_keyset=True)


def _has_tangent(args: tuple) -> bool:
    """Whether a tensor in ``args`` carries a forward-mode tangent at the current level."""
    return any(isinstance(arg, torch.Tensor) and forward_ad.unpack_dual(arg).tangent is not None for arg in args)


def bilinear_tangent(apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], first: torch.Tensor,
                     second: torch.Tensor, first_tangent: Optional[torch.Tensor], second_tangent: Optional[torch.Tensor],
                     *more: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tangent of ``apply(first, second)``, an op linear in each argument: apply(first's tangent, second)
    + apply(first, second's tangent), plus the tangents ``more`` of terms added to it; None where no
    argument has a tangent."""
    present = [term for term in (None if first_tangent is None else apply(first_tangent, second),
                                 None if second_tangent is None else apply(first, second_tangent), *more)
               if term is not None]
    return functools.reduce(torch.add, present) if present else None


def vmap_by_loop(run: Callable[..., torch.Tensor], info, in_dims: tuple, *args) -> tuple[torch.Tensor, int]:
    """A batching rule that runs ``run`` once per index of the mapped dimension and stacks the results:
    for the cases a rule cannot fold into one call."""
    outputs = [run(*(arg if dim is None else arg.select(dim, index) for arg, dim in zip(args, in_dims)))
               for index in range(info.batch_size)]
    return torch.stack(outputs), 0


def folds_into_groups(in_channels: int, out_channels: int, groups: int, channel_policy: str) -> bool:
    """Whether B convs with different weights are one conv with B * groups groups over the B inputs laid
    side by side in channels. Not with channel_policy='pad' over channels the groups do not divide: the
    padding of one conv's last group would be read as the next conv's first channels."""
    return channel_policy == "strict" or (in_channels % groups == 0 and out_channels % groups == 0)


def batch_first(tensor: Optional[torch.Tensor], dim: Optional[int]) -> Optional[torch.Tensor]:
    """``tensor`` with its mapped dimension ``dim`` moved to the front (as it is when ``dim`` is None)."""
    return tensor if tensor is None or dim is None else tensor.movedim(dim, 0)


def channels_side_by_side(tensor: Optional[torch.Tensor], mapped: bool, batch_size: int,
                          channel_dim: int = 1) -> Optional[torch.Tensor]:
    """The leading mapped dimension of ``tensor`` folded into its channels (``channel_dim`` of one batch
    member), member b's channels at [b*C, (b+1)*C); an unmapped tensor is repeated ``batch_size`` times."""
    if tensor is None:
        return None
    if not mapped:
        return tensor.repeat(*(batch_size if index == channel_dim else 1 for index in range(tensor.dim())))
    return tensor.movedim(0, channel_dim).flatten(channel_dim, channel_dim + 1)
