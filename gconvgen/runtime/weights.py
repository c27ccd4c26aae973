"""Weights in the layout a kernel reads.

The direct depthwise kernels and the igemm forward read rows of output channels per tap (and input channel
of the group): in a contiguous OIHW weight those channels lie ci x kh x kw elements apart, so every row
costs a scalar load per channel. A tap-major weight ([kh, kw, ci, C_out] memory, HWIO, seen through an
OIHW view whose output-channel stride is 1) makes each row one vector load. A weight that is already tap-major (a TF/Keras HWIO weight) is read
as it is; any other is copied, once per launch (C_out x kh x kw elements).

Why not once per weight version: a copy cached against the version counter goes stale when a weight is
written through ``weight.data`` (gradcheck's finite differences, optimizers written as ``p.data.add_``),
which does not advance the counter; a stale weight would be a silently wrong conv.
"""
from __future__ import annotations

import torch


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [C_out, ci, kh, kw] (any strides) as an OIHW-indexed view of [kh, kw, ci, C_out] (HWIO)
    memory: itself when it already is one, else a tap-major copy."""
    if is_tap_major(weight):
        return weight
    return weight.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def is_tap_major(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [C_out, ci, kh, kw] has the strides of [kh, kw, ci, C_out] memory (dimensions of
    size 1 may have any stride): what the kernels reading a tap-major weight write as literals."""
    out_channels, per_group, _, kernel_w = weight.shape
    wanted = (1, out_channels, kernel_w * per_group * out_channels, per_group * out_channels)
    return all(size == 1 or stride == want for size, stride, want in zip(weight.shape, weight.stride(), wanted))
