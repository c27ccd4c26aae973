"""The exact aten form of a planned conv: for CPU tensors without Triton's interpreter, and as the
baseline that tuning compares against. It materialises channel padding, which the kernels never do."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir import ConvSpec


def aten_conv2d(spec: ConvSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``spec`` computed with F.conv2d on NCHW-indexed x [N, C_in, H, W] and weight [C_out, ci, kh, kw]."""
    top, bottom, left, right = spec.padding
    padded_in = spec.in_channels_per_group * spec.groups
    padded_out = spec.out_channels_per_group * spec.groups
    if padded_in != spec.in_channels:
        x = F.pad(x, (0, 0, 0, 0, 0, padded_in - spec.in_channels))
    if padded_out != spec.out_channels:
        weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, padded_out - spec.out_channels))
        bias = None if bias is None else F.pad(bias, (0, padded_out - spec.out_channels))
    if top == bottom and left == right:
        out = F.conv2d(x, weight, bias, spec.stride, (top, left), spec.dilation, spec.groups)
    else:
        out = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, spec.stride, 0, spec.dilation, spec.groups)
    return out[:, : spec.out_channels]


def aten_conv2d_backward(spec: ConvSpec, grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         needs: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad of x, grad of weight) of ``aten_conv2d`` by aten.convolution_backward, each None unless asked
    for in ``needs``. Channel and four-sided padding are materialised and cut off again; the operand whose
    gradient is asked for alone may hold any values of the right shape."""
    top, bottom, left, right = spec.padding
    symmetric = top == bottom and left == right  # aten pads it itself; else x is padded here and cropped after
    padded_in = spec.in_channels_per_group * spec.groups - spec.in_channels
    padded_out = spec.out_channels_per_group * spec.groups - spec.out_channels
    x_pads = (0, 0, 0, 0, 0, padded_in) if symmetric else (left, right, top, bottom, 0, padded_in)
    x_padded = F.pad(x, x_pads) if any(x_pads) else x
    weight_padded = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, padded_out)) if padded_out else weight
    grad_padded = F.pad(grad_output, (0, 0, 0, 0, 0, padded_out)) if padded_out else grad_output
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_padded, x_padded, weight_padded, None, list(spec.stride), [top, left] if symmetric else [0, 0],
        list(spec.dilation), False, [0, 0], spec.groups, [needs[0], needs[1], False])
    if grad_x is not None and not symmetric:
        grad_x = grad_x[:, :, top: top + x.shape[2], left: left + x.shape[3]]
    if grad_x is not None:
        grad_x = grad_x[:, : spec.in_channels]
    if grad_weight is not None:
        grad_weight = grad_weight[: spec.out_channels]
    return grad_x, grad_weight
