"""The fused op ``gconvgen::conv2d_act``: ``activation(conv2d(x, w) + bias + residual)`` in one kernel.

The forward kernel applies the epilogue to its fp32 accumulator before its one store, so the output is
written once and read never (a separate activation kernel would read and write it again). Its autograd
formula turns the output gradient into the gradient of the pre-activation sum, then reuses the conv's
gradient ops (which have double-backward formulas of their own):

    relu, relu6      the gradient is read off the saved output: nothing else is kept
    silu, gelu, ...  the pre-activation is recomputed by one unfused forward (no extra tensor is kept
                     between forward and backward; the recompute costs one conv)

Each activation's gradient is torch's own backward op (gconvgen/activations.py), so kinks, NaN and the
half-precision rounding are eager's.
    residual         its gradient is the pre-activation gradient itself
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import activations, knobs
from ..compiler.lowering import ATEN
from ..runtime import launch
from ..autotune.choice import choice_for
from ..runtime.fallback import aten_conv2d
from .autograd import bilinear_tangent, register_autograd
from .backward import conv2d_grad_bias_op, input_and_weight_gradients, run_grad_bias
from .conv2d import conv2d
from .dispatch import (allocate_output, call, fallback, op_arguments, output_memory_format, spec_for_call, warm_key,
                       warm_or_cold)


def run_conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int, channel_policy: str, activation: str) -> torch.Tensor:
    """``activation(conv2d(x, weight) + bias + residual)`` on NCHW-indexed views; residual [N, C_out, OH, OW]
    (any strides) or None. Inputs are validated by gconvgen.conv2d."""
    key = warm_key((x, weight, bias, residual), "conv2d_act",
                   *op_arguments(stride, padding, dilation, groups, channel_policy, activation))
    return warm_or_cold(key, {"x": x, "weight": weight, "bias": bias, "residual": residual},
                        lambda: _cold(x, weight, bias, residual, stride, padding, dilation, groups, channel_policy,
                                      activation))


def _cold(x, weight, bias, residual, stride, padding, dilation, groups, channel_policy, activation) -> torch.Tensor:
    spec = spec_for_call(x, weight, bias, stride, padding, dilation, groups, channel_policy)
    out = allocate_output(x, weight, stride, padding, dilation)
    if out.is_meta:
        return out
    if x.device.type == "cpu" and not knobs.interpret():
        fallback("CPU tensors and TRITON_INTERPRET is not set")
        return aten_conv2d_act(spec, x, weight, bias, residual, activation).contiguous(memory_format=output_memory_format(x))
    if out.numel() == 0:
        return out
    choice = choice_for(spec, "forward", x.device, x.shape[0], x.shape[2], x.shape[3])
    if choice.kind == ATEN:
        return out.copy_(aten_conv2d_act(spec, x, weight, bias, residual, activation))
    return launch.forward(spec, x, weight, bias, out, choice, activation=activation, residual=residual)


def aten_conv2d_act(spec, x, weight, bias, residual, activation) -> torch.Tensor:
    """``activation(conv2d(x, weight) + bias + residual)`` with aten's conv: what a layer tuned to aten runs."""
    pre = aten_conv2d(spec, x, weight, bias)
    return activations.apply(pre if residual is None else pre + residual, activation)


conv2d_act_op = torch.library.custom_op("gconvgen::conv2d_act", run_conv2d_act, mutates_args=())


@conv2d_act_op.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, channel_policy, activation):
    return allocate_output(x, weight, stride, padding, dilation)


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
               channel_policy: str, activation: str) -> torch.Tensor:
    """gconvgen::conv2d_act (through ops.call: the implementation directly where nothing could tell)."""
    return call(conv2d_act_op, run_conv2d_act, x, weight, bias, residual, stride, padding, dilation, groups,
                channel_policy, activation)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, stride, padding, dilation, groups, channel_policy, activation = inputs
    recompute = activations.needs_pre_activation(activation)
    ctx.save_for_backward(x, weight, bias if recompute else None, residual if recompute else None,
                          output if activation != "none" and not recompute else None)
    ctx.conv = (stride, padding, dilation, groups, channel_policy)
    ctx.activation = activation
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _backward(ctx, grad: torch.Tensor):
    """(grad x, grad weight, grad bias, grad residual, None for each non-tensor argument)."""
    x, weight, bias, residual, out = ctx.saved_tensors
    pre = None
    if activations.needs_pre_activation(ctx.activation):  # recompute the pre-activation: one unfused conv
        pre = conv2d(x, weight, bias, *ctx.conv)
        pre = pre if residual is None else pre + residual
    grad_pre = activations.gradient(grad, ctx.activation, pre=pre, out=out)
    grad_pre = grad_pre.contiguous(memory_format=output_memory_format(x))
    needs_x, needs_weight, needs_bias, needs_residual = ctx.needs_input_grad[:4]
    grad_x, grad_weight = input_and_weight_gradients(grad_pre, x, weight, tuple(x.shape), tuple(weight.shape),
                                                     ctx.conv, needs_x, needs_weight)
    grad_bias = call(conv2d_grad_bias_op, run_grad_bias, grad_pre) if needs_bias and ctx.has_bias else None
    grad_residual = grad_pre if needs_residual and ctx.has_residual else None
    return grad_x, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None


def _jvp(inputs, tangents, output):
    """The pre-activation is linear in x, the weight, the bias and the residual; the activation's tangent is
    its derivative at the pre-activation (read off the output for relu and relu6) times the pre's tangent."""
    x, weight, bias, residual, stride, padding, dilation, groups, channel_policy, activation = inputs
    conv = (stride, padding, dilation, groups, channel_policy)
    x_tangent, weight_tangent, bias_tangent, residual_tangent = tangents[:4]
    pre_tangent = bilinear_tangent(lambda x, weight: conv2d(x, weight, None, *conv), x, weight, x_tangent,
                                   weight_tangent,
                                   None if bias_tangent is None else bias_tangent[None, :, None, None].expand_as(output),
                                   residual_tangent)
    if pre_tangent is None:
        return None
    pre = None
    if activations.needs_pre_activation(activation):
        pre = conv2d(x, weight, bias, *conv)
        pre = pre if residual is None else pre + residual
    return activations.gradient(pre_tangent, activation, pre=pre, out=output)


register_autograd(conv2d_act_op, _backward, _setup_context, _jvp)
