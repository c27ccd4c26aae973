"""Weights in the layout a kernel reads.

The direct depthwise kernels and the igemm forward read, per tap, a tile of (input channel, output channel)
weights. In a contiguous OIHW weight neither axis is contiguous (they lie ci x kh x kw and kh x kw elements
apart), so every element costs a scalar load. Two memory orders make the tile vector loads at literal
strides, and the lowering names the one a kernel reads (``KernelDesc.weight_layout``):

- ``hwio``, [kh, kw, ci, C_out] memory (a TF/Keras weight): output channels contiguous;
- ``ohwi``, [C_out, kh, kw, ci] memory (``weight.contiguous(memory_format=torch.channels_last)``, what
  ``model.to(memory_format=torch.channels_last)`` gives): input channels contiguous. The igemm forward reads
  it as it is.

The banded depthwise kernel (family depthwise_gemm) reads the weight as it is: it builds its Toeplitz band
blocks from a segment of each weight row in registers.

A weight in neither order is copied to hwio once per launch (C_out x ci x kh x kw elements), as torch copies
a weight to channels_last per call for its channels_last convs.

Why not once per weight version: a copy cached against the version counter goes stale when a weight is
written through ``weight.data`` (gradcheck's finite differences, optimizers and EMA updates written as
``p.data.mul_``), which does not advance the counter; a stale weight would be a silently wrong conv.
"""
from __future__ import annotations

import torch

LAYOUTS = ("hwio", "ohwi", "strided")  # strided: any other strides, passed to the kernel as they are


def layout_of(weight: torch.Tensor) -> str:
    """The memory order of ``weight`` [C_out, ci, kh, kw]: 'hwio', 'ohwi' or 'strided'."""
    out_channels, per_group, kernel_h, kernel_w = weight.shape
    if _has_strides(weight, (1, out_channels, kernel_w * per_group * out_channels, per_group * out_channels)):
        return "hwio"
    if _has_strides(weight, (kernel_h * kernel_w * per_group, 1, kernel_w * per_group, per_group)):
        return "ohwi"
    return "strided"


def needs_copy(weight: torch.Tensor, desc) -> bool:
    """Whether ``in_layout`` copies ``weight`` for the kernel of ``desc`` (a lowering.KernelDesc): where the
    weight is not in the layout the kernel reads at literal strides. Depends only on the weight's shape and
    strides."""
    layout = desc.weight_layout
    return layout != "strided" and layout_of(weight) != layout


def in_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``weight`` [C_out, ci, kh, kw] as a kernel reading ``layout`` takes it: itself when it is in that
    layout already (or the kernel reads any strides), else an OIHW-indexed view of an hwio copy."""
    if layout == "strided" or layout_of(weight) == layout:
        return weight
    if layout == "hwio":
        return hwio_copy(weight)
    raise ValueError(f"a kernel reading a {layout!r} weight must be lowered for a weight in that layout")


def hwio_copy(weight: torch.Tensor) -> torch.Tensor:
    """An OIHW-indexed view of an hwio copy of ``weight`` [C_out, ci, kh, kw]. Launches run below autograd
    (inside the custom ops, or where nothing observes them: ops.unobserved), so the copy records no graph."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def transposed(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight of the conv transposed to ``weight``'s [C_out, ci, kh, kw] at stride 1 (plan.transposed_conv):
    [C_in, co, kh, kw], each group's input and output channels swapped and its window flipped, as an
    OIHW-indexed view of hwio memory (one copy, in the layout the direct and igemm kernels read)."""
    out_channels, per_group, kernel_h, kernel_w = weight.shape
    by_group = weight.detach().reshape(groups, out_channels // groups, per_group, kernel_h, kernel_w)
    hwio = by_group.permute(3, 4, 1, 0, 2).flip((0, 1))  # [kh, kw, co, groups, ci], a fresh contiguous copy
    return hwio.reshape(kernel_h, kernel_w, out_channels // groups, groups * per_group).permute(3, 2, 0, 1)


def _has_strides(weight: torch.Tensor, wanted: tuple[int, ...]) -> bool:
    """Whether ``weight`` has the strides ``wanted`` (dimensions of size 1 may have any stride): what a kernel
    reading that layout writes as literals."""
    return all(size == 1 or stride == want for size, stride, want in zip(weight.shape, weight.stride(), wanted))
