"""The torch custom op ``gconvgen::conv2d``: the one door from torch into a compiled kernel.

CUDA tensors run the Triton kernel. CPU tensors run the same kernel through Triton's interpreter when
TRITON_INTERPRET=1; otherwise the exact aten form of the same plan, said once (or refused when
GCONVGEN_FALLBACK=error). Meta tensors get the output's shape and nothing else.

The op works under torch.func: ``autograd.register_autograd`` gives it (and the gradient ops) an autograd
kernel that torch.func.grad, vjp and jacrev accept, and the batching rule below runs it under torch.vmap.
A warm call (same signature, nothing observing) rebinds its tensors to the launch the first call ran.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import knobs
from ..autotune.choice import choice_for
from ..compiler.lowering import ATEN
from ..compiler.plan import planned
from ..runtime import launch
from ..runtime.fallback import aten_conv2d
from .autograd import batch_first, channels_side_by_side, folds_into_groups, vmap_by_loop
from .dispatch import (allocate_output, call, fallback, op_arguments, output_memory_format, spec_for_call, warm_key,
                       warm_or_cold)


def run_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """Grouped conv2d on NCHW-indexed x [N, C_in, H, W] (any strides) and weight [C_out, ci, kh, kw];
    padding is four sides (top, bottom, left, right). Inputs are validated by gconvgen.conv2d. This is the
    implementation of the custom op gconvgen::conv2d (``conv2d_op``); call ``conv2d``, which picks."""
    key = warm_key((x, weight, bias), "conv2d", *op_arguments(stride, padding, dilation, groups, channel_policy))
    return warm_or_cold(key, {"x": x, "weight": weight, "bias": bias},
                        lambda: _cold(x, weight, bias, stride, padding, dilation, groups, channel_policy))


def _cold(x, weight, bias, stride, padding, dilation, groups, channel_policy) -> torch.Tensor:
    """run_conv2d's whole path: spec, plan, choice, lowering and launch (or aten)."""
    spec = spec_for_call(x, weight, bias, stride, padding, dilation, groups, channel_policy)
    if x.device.type == "cpu" and not knobs.interpret():
        conv_plan = planned(spec, knobs.padding_budget())
        fallback("CPU tensors and TRITON_INTERPRET is not set")
        return aten_conv2d(conv_plan.spec, x, weight, bias).contiguous(memory_format=output_memory_format(x))
    out = allocate_output(x, weight, stride, padding, dilation)
    if out.numel() == 0 or out.is_meta:  # an empty batch, or meta tensors (shapes only): nothing to compute
        return out
    choice = choice_for(spec, "forward", x.device, x.shape[0], x.shape[2], x.shape[3])
    if choice.kind == ATEN:  # tuning found aten faster for this layer
        result = aten_conv2d(spec, x, weight, bias)
        return result if result.stride() == out.stride() else out.copy_(result)
    return launch.forward(spec, x, weight, bias, out, choice)


conv2d_op = torch.library.custom_op("gconvgen::conv2d", run_conv2d, mutates_args=())


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """gconvgen::conv2d (see ``call``): what gconvgen.conv2d runs once its arguments are checked."""
    return call(conv2d_op, run_conv2d, x, weight, bias, stride, padding, dilation, groups, channel_policy)


@conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, channel_policy):
    return allocate_output(x, weight, stride, padding, dilation)



@conv2d_op.register_vmap
def _conv2d_vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups, channel_policy):
    """torch.vmap of gconvgen::conv2d. A mapped x alone is more batch; a mapped weight or bias makes the
    B convs one conv with B * groups groups (see folds_into_groups), else one conv per index."""
    x_dim, weight_dim, bias_dim = in_dims[:3]
    conv = (stride, padding, dilation, groups, channel_policy)
    batch_size = info.batch_size
    x, weight, bias = batch_first(x, x_dim), batch_first(weight, weight_dim), batch_first(bias, bias_dim)
    if weight_dim is None and bias_dim is None:
        out = conv2d(x.flatten(0, 1), weight, bias, *conv)
        return out.unflatten(0, (batch_size, x.shape[1])), 0
    in_channels = x.shape[-3]
    out_channels = weight.shape[-4]
    if not folds_into_groups(in_channels, out_channels, groups, channel_policy):
        dims = tuple(None if dim is None else 0 for dim in in_dims[:3])
        return vmap_by_loop(lambda *tensors: conv2d(*tensors, *conv), info, dims, x, weight, bias)
    out = conv2d(channels_side_by_side(x, x_dim is not None, batch_size),
                 channels_side_by_side(weight, weight_dim is not None, batch_size, channel_dim=0),
                 channels_side_by_side(bias, bias_dim is not None, batch_size, channel_dim=0),
                 stride, padding, dilation, groups * batch_size, channel_policy)
    return out.unflatten(1, (batch_size, out_channels)), 1
