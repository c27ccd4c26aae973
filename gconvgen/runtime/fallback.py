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
