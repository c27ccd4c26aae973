"""The one launcher: the loader and the launches (check -> allocate -> launch) of every kernel kind.

A kernel is found by its lowered description: ``kernel_of(desc, target)`` renders, caches and imports it
once per process (uri -> render -> disk cache -> import -> memo). A launch builds the argument list from
the kind's argument table, so no launch site lists arguments by hand. The reductions (grad-weight,
grad-bias) sum pixel ranges into slices of a partials buffer that are added in a fixed order afterwards:
nothing is accumulated with atomics, so every run gives the same bits.

Warm calls: an op records the launch it actually ran (``warm.recording``) and ``remember``s it under a key
of everything that decided it; a later call with that key (``warm.recorded(key)(...)``: ``Warm``) binds its
new tensors to the remembered launch (``Launch.refilled``), making the same operand copies, with no check,
plan or lowering. A remembered launch keeps none of its call's tensors. The keys are the ops'
(gconvgen/ops/dispatch.py); runtime/warm.py keeps the memo.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch
import triton

from ..memo import registered
from ..compiler import codegen
from .. import knobs
from ..compiler.arguments import ArgumentTable
from ..compiler.families.base import MIN_BLOCKS_PER_SPLIT
from ..ir import ConvSpec, check
from ..compiler.plan import grad_input_as_forward, transposed_conv
from ..compiler.lowering import (
    DEFAULT, NO_EPILOGUE, Choice, Epilogue, KernelDesc, PixelSpace, lowered_for, needs_wide_index,
    row_alignment)
from . import cache, warm, weights
from .device import allows_tf32, device_target, on_device, target_programs

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
    _KERNELS.clear()
    warm.forget()


def describe(spec: Optional[ConvSpec], kind: str, tensors: tuple[Optional[torch.Tensor], ...], choice: Choice,
             pixels: PixelSpace, dtype: Optional[str] = None, target: Optional[str] = None,
             epilogue: Epilogue = NO_EPILOGUE, weight_memory: str = "strided",
             rows: tuple[tuple[tuple[torch.Tensor, int], ...], tuple[torch.Tensor, ...]] = ((), ())) -> KernelDesc:
    """The lowered description of kernel ``kind`` for a launch on ``tensors`` that tiles ``pixels`` (a
    default config fills the device with them): the target (``target``, else their device's) and its TF32
    setting, 64-bit offsets when some offset or the flattened pixel index needs them, the layout of the
    weight it is given (``weight_memory``, see weights.layout_of) and what the row and pixel starts of the
    activations it reads and writes are multiples of (``rows``: the activations it reads, each with its
    channel count, and those it writes; _aligned_rows)."""
    device = tensors[0].device
    # an element's offset from its tensor's start is below its storage's size: a cheap, safe bound
    largest = max(tensor.untyped_storage().nbytes() // tensor.element_size() - 1 for tensor in tensors
                  if tensor is not None)
    target = target or device_target(device)
    # a grad-input in interleaved column phases (KernelDesc.interleave_columns) flattens its rows over the width
    # rounded up to even: up to twice the pixels at width 1
    flat = pixels.pixels * (2 if kind == "grad_input" else 1)
    facts = (dtype or spec.dtype, choice, target == "interpreter", allows_tf32(device) if device.type == "cuda" else False,
             needs_wide_index(largest, flat), pixels, epilogue, weight_memory)
    desc = lowered_for(spec, kind, *facts)
    if kind == "grad_weight" and not desc.wide_index and needs_wide_index(0, desc.reduction_units(pixels)
                                                                           + desc.reduction_block):
        # a split reduction's units may pad the pixels (tiles of a row's strips, of a column's rows)
        facts = facts[:4] + (True,) + facts[5:]
        desc = lowered_for(spec, kind, *facts)
    if not desc.takes_row_alignment:
        return desc
    alignment = _aligned_rows(spec, desc, *rows)
    return desc if alignment == 1 else lowered_for(spec, kind, *facts, alignment)


# The channels_last copies made inside ``sharing_copies``, by the tensor copied: (that tensor, its copy)
_shared_copies: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("gconvgen_shared_copies",
                                                                               default=None)


@contextlib.contextmanager
def sharing_copies() -> Iterator[None]:
    """Within: the launches that stage the same activation (channels_last_copy) share one copy of it. The
    backward's two kernels both read grad_output; where both stage it (an NCHW layer on a family that reads
    channels_last), the grad-input's copy serves the grad-weight too, one read and one write of grad_output
    fewer. The copies are dropped on leaving."""
    token = _shared_copies.set({})
    try:
        yield
    finally:
        _shared_copies.reset(token)


def channels_last_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a channels_last tensor (itself where it is one); inside ``sharing_copies``, the copy made
    there before of the same tensor, unless it changed since (its version counter, which its views share)."""
    shared = _shared_copies.get()
    if shared is None or tensor.is_inference():  # an inference tensor has no version counter
        return tensor.contiguous(memory_format=torch.channels_last)
    key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device, tensor._version)
    if key not in shared:  # the entry holds the tensor, so its memory is not reused for another while it lasts
        shared[key] = (tensor, tensor.contiguous(memory_format=torch.channels_last))
    return shared[key][1]


# how a launch derives an operand from the tensor it is given, by name (see Launch.derived)
DERIVATIONS: dict[str, Callable[[torch.Tensor, KernelDesc], torch.Tensor]] = {
    "transposed": lambda tensor, desc: weights.transposed(tensor, desc.spec.groups),  # the transposed conv's
    "weight_copy": lambda tensor, desc: weights.hwio_copy(tensor),  # the only layout copied (weights.needs_copy)
    "channels_last": lambda tensor, desc: channels_last_copy(tensor),
}


@dataclass(frozen=True)
class Launch:
    """One prepared launch: the kernel's description, its grid and its argument values in table order
    (tensors and ints), the operand it writes ``result`` through (``output``; 'partials' for a reduction,
    whose split partials are summed afterwards into ``result``). ``derived``
    names, per operand, the copies made of the tensor given for it (DERIVATIONS, in order), so that
    ``refilled`` makes them again for other tensors; ``sources`` names the caller's tensor an operand is
    made from where the names differ (the transposed conv's x is the gradient's grad_output)."""

    desc: KernelDesc
    grid: tuple[int, ...]
    values: tuple
    result: torch.Tensor
    output: str
    partials: Optional[torch.Tensor] = None
    derived: tuple[tuple[str, tuple[str, ...]], ...] = ()
    sources: tuple[tuple[str, str], ...] = ()
    absent: tuple[str, ...] = ()  # optional operands prepared without a tensor (given a placeholder address)

    def arguments(self) -> dict[str, object]:
        """The argument values by kernel argument name (what ``gconvgen inspect`` compiles with)."""
        return dict(zip(self.desc.arguments.names, self.values))

    def deriving(self, operand: str, *derivations: str, source: Optional[str] = None) -> "Launch":
        """This launch, saying that ``operand``'s tensor was made by ``derivations`` (before the ones already
        recorded) from the caller's tensor named ``source`` (default: the operand's own name)."""
        known = dict(self.derived)
        derived = tuple({**known, operand: derivations + known.get(operand, ())}.items())
        sources = self.sources + (((operand, source),) if source is not None else ())
        return replace(self, derived=derived, sources=sources)

    def refilled(self, tensors: dict[str, Optional[torch.Tensor]],
                 result: torch.Tensor) -> tuple[list, Optional[torch.Tensor]]:
        """The argument values of this launch on other tensors with the signature of the ones it was prepared
        on (shapes, strides, dtypes, device; ``tensors`` by the caller's names, ``result`` the output), and a
        new partials buffer where the reduction is split: each operand slot refilled with its tensor (copied as
        ``derived`` says), the kernel, grid, strides and scalars unchanged. No check, plan or lowering."""
        values = list(self.values)
        for position, source, derivations in self._slots:
            tensor = tensors[source]
            for derive in derivations:
                tensor = derive(tensor, self.desc)
            values[position] = tensor
        partials = None
        if self._partials_slot is not None:
            partials = None if self.partials is None else torch.empty_like(self.partials, device=result.device)
            values[self._partials_slot] = result.unsqueeze(0) if partials is None else partials
        for position in self._absent_positions:  # a missing optional operand: any address will do
            values[position] = values[0]
        return values, partials

    def without_tensors(self) -> "Launch":
        """This launch holding none of its call's tensors (a remembered launch must not keep activations
        alive): tensor values None, result and partials as meta tensors of their shapes and dtypes."""
        return replace(self, values=tuple(None if isinstance(value, torch.Tensor) else value for value in self.values),
                       result=self.result.to("meta"), partials=None if self.partials is None else self.partials.to("meta"))

    @functools.cached_property
    def _slots(self) -> tuple[tuple[int, str, tuple[Callable, ...]], ...]:
        """(position, the caller's tensor name, its derivations) of every operand the caller gives; an absent
        optional operand keeps its placeholder (an address the kernel never reads)."""
        sources, derived = dict(self.sources), dict(self.derived)
        return tuple((position, sources.get(op.name, op.name), tuple(DERIVATIONS[d] for d in derived.get(op.name, ())))
                     for position, op in enumerate(self.desc.arguments.operands)
                     if op.name != "partials" and op.name not in self.absent)

    @functools.cached_property
    def _absent_positions(self) -> tuple[int, ...]:
        return tuple(position for position, op in enumerate(self.desc.arguments.operands) if op.name in self.absent)

    @functools.cached_property
    def _partials_slot(self) -> Optional[int]:
        names = [op.name for op in self.desc.arguments.operands]
        return names.index("partials") if self.output == "partials" else None


def _prepared(desc: KernelDesc, grid: tuple[int, ...], tensors: dict, result: torch.Tensor, output: str,
              scalars: tuple[int, ...] = (), partials: Optional[torch.Tensor] = None,
              derived: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> Launch:
    return Launch(desc, grid, tuple(_arguments(desc.arguments, tensors, scalars)), result, output, partials,
                  tuple((name, steps) for name, steps in derived if steps),
                  absent=tuple(name for name, tensor in tensors.items() if tensor is None))


def run(prepared: Optional[Launch]):
    """Launch a prepared kernel on its tensors' device (None: nothing to compute). Returns what Triton's
    launch returns: the CompiledKernel on a GPU (the tuner reads its ``n_spills``), None in the interpreter."""
    if prepared is None:
        return None
    device = prepared.result.device
    compiled = _launched(prepared, device_target(device), device, prepared.values, prepared.partials,
                         prepared.result)
    warm.note(prepared)
    return compiled


def _launched(prepared: Launch, target: str, device: torch.device, values, partials: Optional[torch.Tensor],
              result: torch.Tensor):
    """Launch ``prepared``'s kernel on ``values`` and add its split partials into ``result``: what a cold and a
    warm launch share. Returns Triton's launch result."""
    kernel = kernel_of(prepared.desc, target)  # the one loader: a dict lookup once loaded
    with on_device(device):
        compiled = kernel[prepared.grid](*values, **prepared.desc.meta)
    if partials is not None:
        _add_splits(partials, result)
    return compiled


# ---------------------------------------------------------------------------------------------- warm calls


@dataclass(frozen=True)
class Warm:
    """A remembered launch (without its call's tensors), its target and device, and the output its
    caller returned (shape and strides: a view of the launch's result memory, e.g. NHWC); calling it on new
    operands allocates that output, refills the launch's operand slots (``Launch.refilled``) and launches."""

    launch: Launch
    target: str
    device: torch.device
    shape: torch.Size
    stride: tuple[int, ...]

    def __call__(self, **tensors: Optional[torch.Tensor]) -> torch.Tensor:
        prepared = self.launch
        result = torch.empty_strided(self.shape, self.stride, dtype=prepared.result.dtype, device=self.device)
        tensors[prepared.output] = result
        values, partials = prepared.refilled(tensors, result)
        _launched(prepared, self.target, self.device, values, partials, result)
        if warm.is_recording():  # a caller recording (rare on a warm call): give it the launch as run
            warm.note(replace(prepared, values=tuple(values), result=result, partials=partials))
        return result


def remember(key: Optional[tuple], launched: list[Launch], result: torch.Tensor) -> None:
    """Keep the one launch a call with ``key`` ran, if it ran exactly one and returned a view of that
    launch's result memory (``result``); a call that ran aten, nothing, several launches or returned a copy
    is not kept (and takes the whole path every time)."""
    if (key is None or not warm.enabled() or len(launched) != 1 or result.is_meta
            or result.data_ptr() != launched[0].result.data_ptr()):
        return
    ran = launched[0]
    device = ran.result.device
    warm.keep(key, Warm(ran.without_tensors(), device_target(device), device, result.shape, result.stride()))


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
    alignment (templates/_shared.jinja aligned_rows): the batch and height strides, and where the channels
    are not the contiguous dimension (``layout`` is not 'nhwc', see lowering.choose_layout_constants) the
    channel stride and the width, else the width (pixel) stride. A stride counts whatever its value
    (a unit channel stride or an odd width makes the alignment 1: rounding must never change a value the
    kernel indexes with); only a dimension of size 1 is left out, whose index is always 0 (or, along the
    height, outside [0, 1) and masked)."""
    batch, channels, height, width = activation.shape
    stride_n, stride_c, stride_h, stride_w = activation.stride()
    values = [stride for size, stride in ((batch, stride_n), (height, stride_h)) if size > 1]
    if layout != "nhwc":
        values += [stride_c] if channels > 1 else []
        values.append(width)
    else:  # channels_last: the igemm kernels read and write each pixel's channels as vectors
        values += [stride_w] if width > 1 else []
    return tuple(values)


def _aligned_rows(spec: ConvSpec, desc: KernelDesc, read: tuple[tuple[torch.Tensor, int], ...],
                  written: tuple[torch.Tensor, ...]) -> int:
    """What the row and pixel starts of the activations the kernel of ``desc`` reads (each with its channel
    count) and writes are multiples of (lowering.row_alignment over _aligned_row_values): a read activation
    that the launch stages is its channels_last copy, whose pixel strides are multiples of its channels; one the
    kernel reads element by element (KernelDesc.rounds_reads: NCHW read in place by an igemm) does not count."""
    values = [value for activation, channels in (read if desc.rounds_reads else ())
              for value in ((channels,) if desc.stage_channels_last else _aligned_row_values(activation, spec.layout))]
    values += [value for activation in written for value in _aligned_row_values(activation, spec.layout)]
    return row_alignment(spec.dtype, tuple(values))


def _weight_copy(weight: torch.Tensor, desc: KernelDesc) -> tuple[str, ...]:
    return ("weight_copy",) if weights.needs_copy(weight, desc) else ()


def _staging(desc: KernelDesc) -> tuple[str, ...]:
    return ("channels_last",) if desc.stage_channels_last else ()


def staged(activation: torch.Tensor, desc: KernelDesc) -> torch.Tensor:
    """The activation a kernel reads, as it wants it: a channels_last copy when ``desc.stage_channels_last``
    (see lowering.choose_layout_constants; shared inside ``sharing_copies``), else itself."""
    return channels_last_copy(activation) if desc.stage_channels_last else activation


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
                    weight_memory=weights.layout_of(weight), rows=(((x, spec.in_channels),), (out,)))
    derived = (("weight", _weight_copy(weight, desc)), ("x", _staging(desc)))
    weight = weights.in_layout(weight, desc.weight_layout)
    x = staged(x, desc)
    return _prepared(desc, desc.grid(pixels),
                     {"x": x, "weight": weight, "bias": bias, "residual": residual, "out": out}, out, "out",
                     derived=derived)


def prepare_grad_input(spec: ConvSpec, grad_output: torch.Tensor, weight: torch.Tensor, grad_x: torch.Tensor,
                       choice: Choice = DEFAULT, target: Optional[str] = None) -> Optional[Launch]:
    """The grad-input launch from grad_output [N, C_out, OH, OW] and weight into grad_x [N, C_in, H, W]:
    the forward launch of the transposed conv where ``choice`` is transposed, or untuned where the planner
    says it serves better (plan.grad_input_as_forward); else the grad-input kernel."""
    batch, _, height, width = grad_x.shape
    if batch * height * width == 0:
        return None
    if choice == DEFAULT:
        transposed = grad_input_as_forward(spec, knobs.padding_budget())
    else:
        transposed = transposed_conv(spec) if choice.transposed else None
        check(transposed is not None or not choice.transposed,
              f"a transposed grad-input choice for {spec}, which is not its own transpose")
    if transposed is not None:
        forward_choice = DEFAULT if choice == DEFAULT else replace(choice, transposed=False)
        prepared = prepare_forward(transposed, grad_output, weights.transposed(weight, spec.groups), None, grad_x,
                                   forward_choice, target)
        return None if prepared is None else prepared.deriving("weight", "transposed").deriving("x", source="grad_output")
    pixels = PixelSpace.of("grad_input", batch, height, width, grad_output.shape[2], grad_output.shape[3])
    desc = describe(spec, "grad_input", (grad_output, weight, grad_x), choice, pixels, target=target,
                    weight_memory=weights.layout_of(weight), rows=(((grad_output, spec.out_channels),), (grad_x,)))
    derived = (("weight", _weight_copy(weight, desc)), ("grad_output", _staging(desc)))
    weight = weights.in_layout(weight, desc.weight_layout)
    grad_output = staged(grad_output, desc)
    return _prepared(desc, desc.grid(pixels),
                     {"grad_output": grad_output, "weight": weight, "grad_input": grad_x}, grad_x, "grad_input",
                     derived=derived)


def prepare_grad_weight(spec: ConvSpec, x: torch.Tensor, grad_output: torch.Tensor, grad_w: torch.Tensor,
                        choice: Choice = DEFAULT, splits: Optional[int] = None,
                        target: Optional[str] = None) -> Optional[Launch]:
    """The grad-weight launch from x and grad_output into grad_w [C_out, ci, kh, kw], split over pixels."""
    batch, _, height, width = x.shape
    out_height, out_width = grad_output.shape[2], grad_output.shape[3]
    space = PixelSpace.of("grad_weight", batch, height, width, out_height, out_width)
    if space.pixels == 0:
        return None
    desc = describe(spec, "grad_weight", (x, grad_output, grad_w), choice, space, target=target,
                    rows=(((x, spec.in_channels), (grad_output, spec.out_channels)), ()))
    x, grad_output = staged(x, desc), staged(grad_output, desc)
    pixels = desc.reduction_units(space)
    tiles = desc.grid(space)[:-1]
    splits, pixels_per_split = split_pixels(pixels, desc.reduction_block, math.prod(tiles),
                                            target_programs(x.device), splits, desc.least_split_blocks)
    partials = _partials_for(grad_w, splits)
    return _prepared(desc, (*tiles, splits), {"x": x, "grad_output": grad_output, "partials": partials}, grad_w,
                     "partials", (pixels, pixels_per_split), partials if splits > 1 else None,
                     (("x", _staging(desc)), ("grad_output", _staging(desc))))


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
                     "partials", (pixels, pixels_per_split), partials if splits > 1 else None)


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
                 splits: Optional[int] = None, least_blocks: int = MIN_BLOCKS_PER_SPLIT) -> tuple[int, int]:
    """(splits, pixels_per_split) for a reduction over ``pixels`` done by ``tiles`` programs per split.

    Without ``splits``: as many as fill ``programs`` programs, while each split keeps at least
    ``least_blocks`` blocks (the kernel's KernelDesc.least_split_blocks). pixels_per_split is a multiple of
    block_pixels, and no split is empty.
    """
    blocks = triton.cdiv(pixels, block_pixels)
    if splits is None:
        splits = min(triton.cdiv(programs, tiles), max(1, blocks // least_blocks))
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
