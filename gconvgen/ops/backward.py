"""Training: the backward custom ops and the autograd formula of ``gconvgen::conv2d``.

Each gradient is its own torch op with a fake kernel, so torch.compile traces a backward graph of
gconvgen ops:

    gconvgen::conv2d_grad_input   grad_output, weight -> grad of x     (the transposed grouped conv)
    gconvgen::conv2d_grad_weight  grad_output, x      -> grad of weight (split-K, deterministic)
    gconvgen::conv2d_grad_bias    grad_output         -> grad of bias   (split-K, deterministic)

and each of those has an autograd formula made of the others, so gradients of gradients work too.
Each has a batching rule as well, so torch.vmap over a gradient (per-sample gradients, jacrev) works.

``gconvgen::conv2d``'s backward calls only those whose inputs need a gradient. Like the forward, CUDA
tensors run the Triton kernels, CPU tensors run them through Triton's interpreter when TRITON_INTERPRET=1
and the exact aten form otherwise (said once, refused under GCONVGEN_FALLBACK=error).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import knobs
from ..ir import ConvSpec, check
from ..compiler.lowering import ATEN, Choice
from ..runtime import launch
from ..autotune.choice import choice_for
from ..runtime.device import DTYPE_NAMES
from ..runtime.fallback import aten_conv2d_backward
from .autograd import (batch_first, bilinear_tangent, channels_side_by_side, folds_into_groups, register_autograd,
                       vmap_by_loop)
from .conv2d import conv2d, conv2d_op
from .dispatch import (activation_layout, call, fallback, op_arguments, output_memory_format, spec_of, warm_key,
                       warm_or_cold)


def _spec(activation: torch.Tensor, in_channels: int, weight_size: Sequence[int], stride: Sequence[int],
          padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> ConvSpec:
    """The forward conv's spec as a backward kernel sees it: no bias (its gradient has its own kernel) and
    the layout of ``activation``, the activation the kernel reads."""
    return spec_of(in_channels, weight_size[0], groups, (weight_size[2], weight_size[3]), tuple(stride),
                   tuple(padding), tuple(dilation), False, DTYPE_NAMES[activation.dtype],
                   activation_layout(activation), channel_policy)


def _runs_on_aten(device: torch.device) -> bool:
    """CPU tensors without Triton's interpreter take the aten path (said once, or refused)."""
    if device.type == "cpu" and not knobs.interpret():
        fallback("CPU tensors and TRITON_INTERPRET is not set")
        return True
    return False


def _choice(kind: str, spec: ConvSpec, device: torch.device, input_size: Sequence[int]) -> Choice:
    """The tuning database's choice for backward kernel ``kind`` at this input size (an empty batch has none)."""
    batch, _, height, width = input_size
    return choice_for(spec, kind, device, batch, height, width)


def _check_grad_output(grad_output: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    check(grad_output.dim() == 4, f"grad_output has shape {tuple(grad_output.shape)}; expected [N, C_out, OH, OW]")
    check(grad_output.dtype == reference.dtype and grad_output.device == reference.device,
          f"grad_output ({grad_output.dtype}, {grad_output.device}) must match {name} "
          f"({reference.dtype}, {reference.device})", TypeError)


# ---------------------------------------------------------------------------------------------- grad-input


def _allocate_grad_input(grad_output: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """The input gradient [N, C_in, H, W], channels_last when the output gradient is."""
    return torch.empty(tuple(input_size), dtype=grad_output.dtype, device=grad_output.device,
                       memory_format=output_memory_format(grad_output))


def run_grad_input(grad_output: torch.Tensor, weight: torch.Tensor, input_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """Gradient of gconvgen::conv2d with respect to x [N, C_in, H, W] = ``input_size``, from grad_output
    [N, C_out, OH, OW] and weight [C_out, ci, kh, kw] (any strides); the other arguments are the forward's."""
    _check_grad_output(grad_output, weight, "weight")
    check(len(input_size) == 4, f"input_size={list(input_size)} must be [N, C_in, H, W]")
    key = warm_key((grad_output, weight), "grad_input",
                   *op_arguments(input_size, stride, padding, dilation, groups, channel_policy))
    return warm_or_cold(key, {"grad_output": grad_output, "weight": weight},
                        lambda: _cold_grad_input(grad_output, weight, input_size, stride, padding, dilation, groups,
                                                 channel_policy))


def _cold_grad_input(grad_output, weight, input_size, stride, padding, dilation, groups, channel_policy):
    spec = _spec(grad_output, input_size[1], weight.shape, stride, padding, dilation, groups, channel_policy)
    if grad_output.is_meta:  # shapes only
        return _allocate_grad_input(grad_output, input_size)
    if _runs_on_aten(grad_output.device):
        x_shaped = grad_output.new_zeros(tuple(input_size))
        grad_x, _ = aten_conv2d_backward(spec, grad_output, x_shaped, weight, (True, False))
        return grad_x.contiguous(memory_format=output_memory_format(grad_output))
    choice = _choice("grad_input", spec, grad_output.device, input_size)
    if choice.kind == ATEN:  # tuning found aten faster for this key
        grad_x, _ = aten_conv2d_backward(spec, grad_output, grad_output.new_empty(tuple(input_size)), weight, (True, False))
        return grad_x.contiguous(memory_format=output_memory_format(grad_output))
    grad_x = _allocate_grad_input(grad_output, input_size)
    return launch.grad_input(spec, grad_output, weight, grad_x, choice)


conv2d_grad_input_op = torch.library.custom_op("gconvgen::conv2d_grad_input", run_grad_input, mutates_args=())


@conv2d_grad_input_op.register_fake
def _(grad_output, weight, input_size, stride, padding, dilation, groups, channel_policy):
    return _allocate_grad_input(grad_output, input_size)


# ---------------------------------------------------------------------------------------------- grad-weight


def run_grad_weight(grad_output: torch.Tensor, x: torch.Tensor, weight_size: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """Gradient of gconvgen::conv2d with respect to the weight [C_out, ci, kh, kw] = ``weight_size``, from
    grad_output [N, C_out, OH, OW] and x [N, C_in, H, W] (any strides); contiguous. Deterministic."""
    _check_grad_output(grad_output, x, "x")
    check(len(weight_size) == 4, f"weight_size={list(weight_size)} must be [C_out, C_in/groups, kh, kw]")
    key = warm_key((grad_output, x), "grad_weight",
                   *op_arguments(weight_size, stride, padding, dilation, groups, channel_policy))
    return warm_or_cold(key, {"grad_output": grad_output, "x": x},
                        lambda: _cold_grad_weight(grad_output, x, weight_size, stride, padding, dilation, groups,
                                                  channel_policy))


def _cold_grad_weight(grad_output, x, weight_size, stride, padding, dilation, groups, channel_policy):
    spec = _spec(x, x.shape[1], weight_size, stride, padding, dilation, groups, channel_policy)
    if x.is_meta:  # shapes only
        return x.new_empty(tuple(weight_size))
    if _runs_on_aten(x.device):
        weight_shaped = x.new_zeros(tuple(weight_size))
        _, grad_weight = aten_conv2d_backward(spec, grad_output, x, weight_shaped, (False, True))
        return grad_weight.contiguous()
    choice = _choice("grad_weight", spec, x.device, x.shape)
    if choice.kind == ATEN:  # tuning found aten faster for this key
        _, grad_weight = aten_conv2d_backward(spec, grad_output, x, x.new_empty(tuple(weight_size)), (False, True))
        return grad_weight.contiguous()
    grad_weight = x.new_empty(tuple(weight_size))
    return launch.grad_weight(spec, x, grad_output, grad_weight, choice)


conv2d_grad_weight_op = torch.library.custom_op("gconvgen::conv2d_grad_weight", run_grad_weight, mutates_args=())


@conv2d_grad_weight_op.register_fake
def _(grad_output, x, weight_size, stride, padding, dilation, groups, channel_policy):
    return x.new_empty(tuple(weight_size))


# ---------------------------------------------------------------------------------------------- grad-bias


def run_grad_bias(grad_output: torch.Tensor) -> torch.Tensor:
    """Gradient of a conv's bias: grad_output [N, C_out, OH, OW] summed over batch and space. Deterministic."""
    check(grad_output.dim() == 4, f"grad_output has shape {tuple(grad_output.shape)}; expected [N, C_out, OH, OW]")
    check(grad_output.dtype in DTYPE_NAMES, f"grad_output.dtype={grad_output.dtype} is not supported", TypeError)
    return warm_or_cold(warm_key((grad_output,), "grad_bias"), {"grad_output": grad_output},
                        lambda: _cold_grad_bias(grad_output))


def _cold_grad_bias(grad_output: torch.Tensor) -> torch.Tensor:
    if grad_output.is_meta:  # shapes only
        return grad_output.new_empty(grad_output.shape[1])
    if _runs_on_aten(grad_output.device):
        return grad_output.sum(dim=(0, 2, 3))
    return launch.grad_bias(grad_output, grad_output.new_empty(grad_output.shape[1]))


conv2d_grad_bias_op = torch.library.custom_op("gconvgen::conv2d_grad_bias", run_grad_bias, mutates_args=())


@conv2d_grad_bias_op.register_fake
def _(grad_output):
    return grad_output.new_empty(grad_output.shape[1])


# ---------------------------------------------------------------------------------------------- autograd


def _grad_input(grad_output: torch.Tensor, weight: torch.Tensor, input_size: Sequence[int], conv: tuple):
    """gconvgen::conv2d_grad_input, through ops.call (the implementation directly where nothing can tell)."""
    return call(conv2d_grad_input_op, run_grad_input, grad_output, weight, input_size, *conv)


def _grad_weight(grad_output: torch.Tensor, x: torch.Tensor, weight_size: Sequence[int], conv: tuple):
    """gconvgen::conv2d_grad_weight, through ops.call."""
    return call(conv2d_grad_weight_op, run_grad_weight, grad_output, x, weight_size, *conv)


def input_and_weight_gradients(grad_output: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                               input_size: Sequence[int], weight_size: Sequence[int], conv: tuple,
                               needs_x: bool, needs_weight: bool):
    """(grad x, grad weight) of a conv from grad_output, each None where not needed. The two kernels share a
    channels_last copy of grad_output where both stage it (launch.sharing_copies)."""
    with launch.sharing_copies():
        grad_x = _grad_input(grad_output, weight, input_size, conv) if needs_x else None
        grad_weight = _grad_weight(grad_output, x, weight_size, conv) if needs_weight else None
    return grad_x, grad_weight


def _setup_context(ctx, inputs, output) -> None:
    """Save only what the needed gradients read: x for the weight's, the weight for x's."""
    x, weight, bias, stride, padding, dilation, groups, channel_policy = inputs
    needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x if needs_weight else None, weight if needs_x else None)
    ctx.input_size = tuple(x.shape)
    ctx.weight_size = tuple(weight.shape)
    ctx.grad_memory_format = output_memory_format(x)
    ctx.conv = (stride, padding, dilation, groups, channel_policy)


def _backward(ctx, grad_output: torch.Tensor):
    """(grad x, grad weight, grad bias, None for each non-tensor argument); a gradient nobody needs is None."""
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    # autograd may hand over any strides (an expanded scalar, a transposed view): give the kernels x's layout
    grad_output = grad_output.contiguous(memory_format=ctx.grad_memory_format)
    grad_x, grad_weight = input_and_weight_gradients(grad_output, x, weight, ctx.input_size, ctx.weight_size,
                                                     ctx.conv, needs_x, needs_weight)
    grad_bias = call(conv2d_grad_bias_op, run_grad_bias, grad_output) if needs_bias else None
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _jvp(inputs, tangents, output):
    """The conv is linear in x, in the weight and in the bias: the tangent is the sum of each one's."""
    x, weight, bias, *conv = inputs
    x_tangent, weight_tangent, bias_tangent = tangents[:3]
    return bilinear_tangent(lambda x, weight: conv2d(x, weight, None, *conv), x, weight, x_tangent, weight_tangent,
                            None if bias_tangent is None else bias_tangent[None, :, None, None].expand_as(output))


register_autograd(conv2d_op, _backward, _setup_context, _jvp)


# ---------------------------------------------------------------------------------------------- double backward
# Each gradient op is linear in each of its tensor inputs, so its own gradients are the other two convs:
#   grad_input(g, W):  d/dg = conv(v, W),           d/dW = grad_weight(g, v)
#   grad_weight(g, x): d/dg = conv(x, V),           d/dx = grad_input(g, V)
#   grad_bias(g):      d/dg = v broadcast over batch and space
# (v, V: the upstream gradient of the op's output). Gradient penalties and Hessian-vector products work.


def _setup_grad_input(ctx, inputs, output) -> None:
    grad_output, weight, input_size, *conv = inputs
    ctx.save_for_backward(grad_output if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None)
    ctx.weight_size, ctx.conv = tuple(weight.shape), tuple(conv)


def _grad_input_backward(ctx, upstream: torch.Tensor):
    grad_output, weight = ctx.saved_tensors
    needs_grad_output, needs_weight = ctx.needs_input_grad[:2]
    d_grad_output = conv2d(upstream, weight, None, *ctx.conv) if needs_grad_output else None
    d_weight = _grad_weight(grad_output, upstream, ctx.weight_size, ctx.conv) if needs_weight else None
    return d_grad_output, d_weight, None, None, None, None, None, None


def _setup_grad_weight(ctx, inputs, output) -> None:
    grad_output, x, weight_size, *conv = inputs
    ctx.save_for_backward(grad_output if ctx.needs_input_grad[1] else None, x if ctx.needs_input_grad[0] else None)
    ctx.input_size, ctx.conv = tuple(x.shape), tuple(conv)


def _grad_weight_backward(ctx, upstream: torch.Tensor):
    grad_output, x = ctx.saved_tensors
    needs_grad_output, needs_x = ctx.needs_input_grad[:2]
    d_grad_output = conv2d(x, upstream, None, *ctx.conv) if needs_grad_output else None
    d_x = _grad_input(grad_output, upstream, ctx.input_size, ctx.conv) if needs_x else None
    return d_grad_output, d_x, None, None, None, None, None, None


def _setup_grad_bias(ctx, inputs, output) -> None:
    ctx.grad_output_size = tuple(inputs[0].shape)


def _grad_bias_backward(ctx, upstream: torch.Tensor):
    return upstream[None, :, None, None].expand(ctx.grad_output_size)


# and, linear in each input, the tangent of each is the sum of the op applied to one input's tangent


def _grad_input_jvp(inputs, tangents, output):
    grad_output, weight, input_size, *conv = inputs
    return bilinear_tangent(lambda grad, weight: _grad_input(grad, weight, input_size, conv), grad_output, weight,
                            *tangents[:2])


def _grad_weight_jvp(inputs, tangents, output):
    grad_output, x, weight_size, *conv = inputs
    return bilinear_tangent(lambda grad, x: _grad_weight(grad, x, weight_size, conv), grad_output, x, *tangents[:2])


def _grad_bias_jvp(inputs, tangents, output):
    return None if tangents[0] is None else call(conv2d_grad_bias_op, run_grad_bias, tangents[0])


register_autograd(conv2d_grad_input_op, _grad_input_backward, _setup_grad_input, _grad_input_jvp)
register_autograd(conv2d_grad_weight_op, _grad_weight_backward, _setup_grad_weight, _grad_weight_jvp)
register_autograd(conv2d_grad_bias_op, _grad_bias_backward, _setup_grad_bias, _grad_bias_jvp)


# ---------------------------------------------------------------------------------------------- torch.vmap
# As for the forward (ops._conv2d_vmap): a mapped dimension that only multiplies the batch joins it, one
# that multiplies the weight joins the groups, and channel_policy='pad' over uneven channels loops.


@conv2d_grad_input_op.register_vmap
def _grad_input_vmap(info, in_dims, grad_output, weight, input_size, stride, padding, dilation, groups,
                     channel_policy):
    grad_output_dim, weight_dim = in_dims[:2]
    conv = (stride, padding, dilation, groups, channel_policy)
    batch_size = info.batch_size
    grad_output, weight = batch_first(grad_output, grad_output_dim), batch_first(weight, weight_dim)
    if weight_dim is None:
        batched_size = (batch_size * input_size[0], *input_size[1:])
        grad_x = _grad_input(grad_output.flatten(0, 1), weight, batched_size, conv)
        return grad_x.unflatten(0, (batch_size, input_size[0])), 0
    if not folds_into_groups(input_size[1], weight.shape[1], groups, channel_policy):
        dims = (None if grad_output_dim is None else 0, 0)
        return vmap_by_loop(lambda g, w: _grad_input(g, w, input_size, conv), info, dims, grad_output, weight)
    batched_size = (input_size[0], batch_size * input_size[1], *input_size[2:])
    grad_x = _grad_input(channels_side_by_side(grad_output, grad_output_dim is not None, batch_size),
                         channels_side_by_side(weight, True, batch_size, channel_dim=0), batched_size,
                         (stride, padding, dilation, groups * batch_size, channel_policy))
    return grad_x.unflatten(1, (batch_size, input_size[1])), 1


@conv2d_grad_weight_op.register_vmap
def _grad_weight_vmap(info, in_dims, grad_output, x, weight_size, stride, padding, dilation, groups,
                      channel_policy):
    grad_output_dim, x_dim = in_dims[:2]
    conv = (stride, padding, dilation, groups, channel_policy)
    batch_size = info.batch_size
    grad_output, x = batch_first(grad_output, grad_output_dim), batch_first(x, x_dim)
    if not folds_into_groups(x.shape[-3], weight_size[0], groups, channel_policy):
        dims = tuple(None if dim is None else 0 for dim in in_dims[:2])
        return vmap_by_loop(lambda g, v: _grad_weight(g, v, weight_size, conv), info, dims, grad_output, x)
    batched_size = (batch_size * weight_size[0], *weight_size[1:])
    grad_weight = _grad_weight(channels_side_by_side(grad_output, grad_output_dim is not None, batch_size),
                               channels_side_by_side(x, x_dim is not None, batch_size), batched_size,
                               (stride, padding, dilation, groups * batch_size, channel_policy))
    return grad_weight.unflatten(0, (batch_size, weight_size[0])), 0


@conv2d_grad_bias_op.register_vmap
def _grad_bias_vmap(info, in_dims, grad_output):
    grad_output = batch_first(grad_output, in_dims[0])  # mapped: the rule runs only for a mapped argument
    grad_bias = call(conv2d_grad_bias_op, run_grad_bias, channels_side_by_side(grad_output, True, info.batch_size))
    return grad_bias.unflatten(0, (info.batch_size, grad_output.shape[2])), 0
