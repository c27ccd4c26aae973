"""The one loader and the launches (check -> allocate -> launch) of every kernel kind.

A kernel is found by its lowered description: ``kernel_of(desc, target)`` renders, caches and imports it
once per process (uri -> render -> disk cache -> import -> memo). A launch builds the argument list from
the kind's argument table, so no launch site lists arguments by hand. The reductions (grad-weight,
grad-bias) sum pixel ranges into slices of a partials buffer that are added in a fixed order afterwards:
nothing is accumulated with atomics, so every run gives the same bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..memo import registered
from ..compiler import codegen
from .. import knobs
from ..compiler.arguments import ArgumentTable
from ..ir import ConvSpec, check
from ..compiler.plan import grad_input_as_forward
from ..compiler.lowering import (
    DEFAULT, NO_EPILOGUE, Choice, Epilogue, KernelDesc, PixelSpace, lowered_for, needs_wide_index, row_alignment)
from . import cache, weights
from .device import allows_tf32, device_target, on_device, target_programs

# a reduction is split only while every split keeps at least this many blocks of pixels to sum
MIN_BLOCKS_PER_SPLIT = 4
_KERNELS: dict[tuple[str, str], object] = {}  # (uri, target) -> the loaded @triton.jit function


def kernel_of(desc: KernelDesc, target: str):
    """The loaded Triton function of ``desc`` for ``target``: rendered, cached and imported on first use;
    a dict lookup afterwards (no rendering, hashing or file I/O on a warm call)."""
    key = (desc.uri, target)
    kernel = _KERNELS.get(key)
    if kernel is None:
        module = cache.load_module(target, desc.uri, lambda: codegen.render(desc))
        kernel = _KERNELS[key] = getattr(module, desc.kernel_name)
    return kernel


@registered
def clear_memo() -> None:
    """Forget every loaded kernel and every recorded launch that holds one (tests; a new cache directory)."""
    from . import replay  # replay records launches prepared here

    _KERNELS.clear()
    replay.clear()


def describe(spec: Optional[ConvSpec], kind: str, tensors: tuple[Optional[torch.Tensor], ...], choice: Choice,
             pixels: PixelSpace, dtype: Optional[str] = None, target: Optional[str] = None,
             epilogue: Epilogue = NO_EPILOGUE, weight_memory: str = "strided", alignment: int = 1) -> KernelDesc:
    """The lowered description of kernel ``kind`` for a launch on ``tensors`` that tiles ``pixels`` (a
    default config fills the device with them): the target (``target``, else their device's) and its TF32
    setting, 64-bit offsets when some offset or the flattened pixel index needs them, the layout of the
    weight it is given (``weight_memory``, see weights.layout_of) and what its activations' row and channel
    strides are multiples of (``alignment``, see lowering.row_alignment)."""
    device = tensors[0].device
    # an element's offset from its tensor's start is below its storage's size: a cheap, safe bound
    largest = max(tensor.untyped_storage().nbytes() // tensor.element_size() - 1 for tensor in tensors
                  if tensor is not None)
    target = target or device_target(device)
    return lowered_for(spec, kind, dtype or spec.dtype, choice, target == "interpreter",
                       allows_tf32(device) if device.type == "cuda" else False,
                       needs_wide_index(largest, pixels.pixels), pixels, epilogue, weight_memory, alignment)


@dataclass(frozen=True)
class Launch:
    """One prepared launch: the kernel's description, its grid and its argument values in table order
    (tensors and ints), and the partials a split reduction sums afterwards into ``result``."""

    desc: KernelDesc
    grid: tuple[int, ...]
    values: tuple
    result: torch.Tensor
    partials: Optional[torch.Tensor] = None

    def arguments(self) -> dict[str, object]:
        """The argument values by kernel argument name (what ``gconvgen inspect`` compiles with)."""
        return dict(zip(self.desc.arguments.names, self.values))


def _prepared(desc: KernelDesc, grid: tuple[int, ...], tensors: dict, result: torch.Tensor,
              scalars: tuple[int, ...] = (), partials: Optional[torch.Tensor] = None) -> Launch:
    return Launch(desc, grid, tuple(_arguments(desc.arguments, tensors, scalars)), result, partials)


def run(prepared: Optional[Launch]):
    """Launch a prepared kernel on its tensors' device (None: nothing to compute). Returns what Triton's
    launch returns: the CompiledKernel on a GPU (the tuner reads its ``n_spills``), None in the interpreter."""
    if prepared is None:
        return None
    device = prepared.result.device
    kernel = kernel_of(prepared.desc, device_target(device))
    with on_device(device):
        compiled = kernel[prepared.grid](*prepared.values, **prepared.desc.meta)
    if prepared.partials is not None:
        _add_splits(prepared.partials, prepared.result)
    return compiled


def _arguments(table: ArgumentTable, tensors: dict, scalars: tuple[int, ...] = ()) -> list:
    """The kernel's argument list in its table's order; a missing optional operand passes a placeholder."""
    placeholder = next(tensor for tensor in tensors.values() if tensor is not None)
    values: list = [placeholder if tensors[op.name] is None else tensors[op.name] for op in table.operands]
    for op in table.operands:
        tensor = tensors[op.name]
        if tensor is None:
            values += [0] * (len(op.sizes) + len(op.dims))
        else:
            shape = tensor.shape
            values += [shape[dim] for _, dim in op.sizes]
            values += tensor.stride()
    return values + list(scalars)


def _aligned_row_values(activation: torch.Tensor, layout: str) -> tuple[int, ...]:
    """Every value of an NCHW-indexed activation that a row-aligned kernel writes rounded down to its row
    alignment (templates/depthwise1d.py.jinja, depthwise_gemm.py.jinja): the batch and height strides, and
    where the channels are not the contiguous dimension (``layout`` is not 'nhwc', see
    lowering.choose_layout_constants) the channel stride and the width. A stride counts whatever its value
    (a unit channel stride or an odd width makes the alignment 1: rounding must never change a value the
    kernel indexes with); only a dimension of size 1 is left out, whose index is always 0 (or, along the
    height, outside [0, 1) and masked)."""
    batch, channels, height, width = activation.shape
    stride_n, stride_c, stride_h, _ = activation.stride()
    values = [stride for size, stride in ((batch, stride_n), (height, stride_h)) if size > 1]
    if layout != "nhwc":
        values += [stride_c] if channels > 1 else []
        values.append(width)
    return tuple(values)


def staged(activation: torch.Tensor, desc: KernelDesc) -> torch.Tensor:
    """The activation a kernel reads, as it wants it: a channels_last copy when ``desc.stage_channels_last``
    (see lowering.choose_layout_constants), else itself."""
    return activation.contiguous(memory_format=torch.channels_last) if desc.stage_channels_last else activation


# ---------------------------------------------------------------------------------------------- the four kinds
# prepare_<kind> checks and lowers a launch (``target`` overrides the tensors' device, e.g. for meta tensors
# compiled ahead of time); <kind> prepares and runs it.


def prepare_forward(spec: ConvSpec, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    out: torch.Tensor, choice: Choice = DEFAULT, target: Optional[str] = None,
                    activation: str = "none", residual: Optional[torch.Tensor] = None) -> Optional[Launch]:
    """The forward launch on x [N, C_in, H, W] and weight [C_out, ci, kh, kw] into out [N, C_out, OH, OW]
    (NCHW-indexed views, any strides), with the epilogue activation(conv + bias + residual) (residual
    [N, C_out, OH, OW], any strides); None for an empty output."""
    batch, _, height, width = x.shape
    out_height, out_width = out.shape[2], out.shape[3]
    if batch * out_height * out_width == 0:
        return None
    epilogue = NO_EPILOGUE if activation == "none" and residual is None else Epilogue(activation, residual is not None)
    pixels = PixelSpace.of("forward", batch, height, width, out_height, out_width)
    desc = describe(spec, "forward", (x, weight, out, residual), choice, pixels, target=target, epilogue=epilogue,
                    weight_memory=weights.layout_of(weight),
                    alignment=row_alignment(spec.dtype, _aligned_row_values(x, spec.layout)
                                            + _aligned_row_values(out, spec.layout)))
    weight = weights.for_kernel(weight, desc)
    x = staged(x, desc)
    return _prepared(desc, desc.grid(pixels),
                     {"x": x, "weight": weight, "bias": bias, "residual": residual, "out": out}, out)


def prepare_grad_input(spec: ConvSpec, grad_output: torch.Tensor, weight: torch.Tensor, grad_x: torch.Tensor,
                       choice: Choice = DEFAULT, target: Optional[str] = None) -> Optional[Launch]:
    """The grad-input launch from grad_output [N, C_out, OH, OW] and weight into grad_x [N, C_in, H, W]:
    untuned, the forward launch of the transposed conv where the planner says it serves better
    (plan.grad_input_as_forward), else the grad-input kernel."""
    batch, _, height, width = grad_x.shape
    if batch * height * width == 0:
        return None
    transposed = grad_input_as_forward(spec, knobs.padding_budget()) if choice == DEFAULT else None
    if transposed is not None:
        return prepare_forward(transposed, grad_output, weight.detach().flip((2, 3)), None, grad_x, DEFAULT, target)
    pixels = PixelSpace.of("grad_input", batch, height, width, grad_output.shape[2], grad_output.shape[3])
    desc = describe(spec, "grad_input", (grad_output, weight, grad_x), choice, pixels, target=target,
                    weight_memory=weights.layout_of(weight))
    weight = weights.for_kernel(weight, desc)
    grad_output = staged(grad_output, desc)
    return _prepared(desc, desc.grid(pixels),
                     {"grad_output": grad_output, "weight": weight, "grad_input": grad_x}, grad_x)


def prepare_grad_weight(spec: ConvSpec, x: torch.Tensor, grad_output: torch.Tensor, grad_w: torch.Tensor,
                        choice: Choice = DEFAULT, splits: Optional[int] = None,
                        target: Optional[str] = None) -> Optional[Launch]:
    """The grad-weight launch from x and grad_output into grad_w [C_out, ci, kh, kw], split over pixels."""
    batch, _, height, width = x.shape
    out_height, out_width = grad_output.shape[2], grad_output.shape[3]
    space = PixelSpace.of("grad_weight", batch, height, width, out_height, out_width)
    pixels = space.pixels
    if pixels == 0:
        return None
    desc = describe(spec, "grad_weight", (x, grad_output, grad_w), choice, space, target=target)
    x, grad_output = staged(x, desc), staged(grad_output, desc)
    tiles = desc.grid(space)[:-1]
    splits, pixels_per_split = split_pixels(pixels, desc.reduction_block, math.prod(tiles),
                                            target_programs(x.device), splits)
    partials = _partials_for(grad_w, splits)
    return _prepared(desc, (*tiles, splits), {"x": x, "grad_output": grad_output, "partials": partials}, grad_w,
                     (pixels, pixels_per_split), partials if splits > 1 else None)


def prepare_grad_bias(grad_output: torch.Tensor, grad_b: torch.Tensor, choice: Choice = DEFAULT,
                      splits: Optional[int] = None, target: Optional[str] = None) -> Optional[Launch]:
    """The grad-bias launch: grad_output [N, C_out, OH, OW] summed over batch and space into grad_b [C_out]."""
    batch, channels, out_height, out_width = grad_output.shape
    space = PixelSpace.of("grad_bias", batch, 0, 0, out_height, out_width)
    pixels = space.pixels
    if pixels == 0:
        return None
    desc = describe(None, "grad_bias", (grad_output, grad_b), choice, space, dtype=_dtype_name(grad_output),
                    target=target)
    channel_tiles = desc.grid(space, channels=channels)[0]
    splits, pixels_per_split = split_pixels(pixels, desc.reduction_block, channel_tiles,
                                            target_programs(grad_output.device), splits)
    partials = _partials_for(grad_b, splits)
    return _prepared(desc, (channel_tiles, splits), {"grad_output": grad_output, "partials": partials}, grad_b,
                     (pixels, pixels_per_split), partials if splits > 1 else None)


def forward(spec: ConvSpec, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
            choice: Choice = DEFAULT, activation: str = "none", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The conv of NCHW-indexed views (any strides): x [N, C_in, H, W], weight [C_out, ci, kh, kw] into the
    preallocated out [N, C_out, OH, OW], with ``choice``'s family and config and the fused epilogue
    ``activation(conv + bias + residual)``. Returns ``out``."""
    run(prepare_forward(spec, x, weight, bias, out, choice, activation=activation, residual=residual))
    return out


def grad_input(spec: ConvSpec, grad_output: torch.Tensor, weight: torch.Tensor, grad_x: torch.Tensor,
               choice: Choice = DEFAULT) -> torch.Tensor:
    """grad_output [N, C_out, OH, OW] and weight [C_out, ci, kh, kw] (any strides) into the preallocated
    grad_x [N, C_in, H, W]; every element of it is written. Returns ``grad_x``."""
    run(prepare_grad_input(spec, grad_output, weight, grad_x, choice))
    return grad_x


def grad_weight(spec: ConvSpec, x: torch.Tensor, grad_output: torch.Tensor, grad_w: torch.Tensor,
                choice: Choice = DEFAULT, splits: Optional[int] = None) -> torch.Tensor:
    """x [N, C_in, H, W] and grad_output [N, C_out, OH, OW] (any strides) into the preallocated grad_w
    [C_out, ci, kh, kw]; every element written. ``splits`` overrides how many pixel ranges the reduction is
    split into (default: enough to fill the device). Returns ``grad_w``."""
    prepared = prepare_grad_weight(spec, x, grad_output, grad_w, choice, splits)
    if prepared is None:
        return grad_w.zero_()
    run(prepared)
    return grad_w


def grad_bias(grad_output: torch.Tensor, grad_b: torch.Tensor, choice: Choice = DEFAULT,
              splits: Optional[int] = None) -> torch.Tensor:
    """grad_output [N, C_out, OH, OW] (any strides) summed over batch and space into the preallocated grad_b
    [C_out]; every element written. ``splits`` as for grad_weight. Returns ``grad_b``."""
    prepared = prepare_grad_bias(grad_output, grad_b, choice, splits)
    if prepared is None:
        return grad_b.zero_()
    run(prepared)
    return grad_b


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def split_pixels(pixels: int, block_pixels: int, tiles: int, programs: int,
                 splits: Optional[int] = None) -> tuple[int, int]:
    """(splits, pixels_per_split) for a reduction over ``pixels`` done by ``tiles`` programs per split.

    Without ``splits``: as many as fill ``programs`` programs, while each split keeps at least
    MIN_BLOCKS_PER_SPLIT blocks. pixels_per_split is a multiple of block_pixels, and no split is empty.
    """
    blocks = triton.cdiv(pixels, block_pixels)
    if splits is None:
        splits = min(triton.cdiv(programs, tiles), max(1, blocks // MIN_BLOCKS_PER_SPLIT))
    check(isinstance(splits, int) and splits >= 1, f"splits={splits!r} must be an int >= 1")
    pixels_per_split = triton.cdiv(blocks, min(splits, blocks)) * block_pixels
    return triton.cdiv(pixels, pixels_per_split), pixels_per_split


def _partials_for(out: torch.Tensor, splits: int) -> torch.Tensor:
    """Where the splits write: ``out`` itself for one split, else a [splits, *out.shape] buffer in the
    accumulator's precision (float64 for float64, else float32)."""
    if splits == 1:
        return out.unsqueeze(0)
    dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    return torch.empty((splits, *out.shape), dtype=dtype, device=out.device)


def _add_splits(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add the split slices into ``out`` in a fixed order (torch's sum over a dimension uses no atomics)."""
    if partials.shape[0] > 1:
        out.copy_(partials.sum(dim=0))
    return out
