"""What a kernel family declares (the base class every family module subclasses). Defaults describe a family
with none of the special cases: no packed groups, no staging, no reduction order, a strided weight, no band
or row alignment, no halo, no tap tile; a subclass overrides what it does differently."""
from __future__ import annotations

import math
from typing import Optional

from ...ir import ConvSpec
from ..tiles import ELEMENT_BYTES, KernelConfig, PixelSpace, cdiv

# a reduction is split only while every split keeps at least this many blocks of pixels to sum (each split pays
# its program's set-up and epilogue once)
MIN_BLOCKS_PER_SPLIT = 4


class Family:
    """One kernel family. ``name`` is what tuning records and KernelDescs hold; ``templates`` maps each
    kernel kind it has a kernel for to its template; ``limits`` gives each tile side's (least, largest)
    (block_k (0, 0): no reduction tile)."""

    name: str
    templates: dict[str, str]
    limits: dict[str, tuple[int, int]]

    # ------------------------------------------------------------------ domain
    def rank(self, spec: ConvSpec) -> Optional[int]:
        """None when this family's forward kernel does not compute ``spec``; else its place in the planner's
        order (0 first: the default). The tuner times every family that ranks."""
        return None

    def computes_backward(self, spec: ConvSpec) -> bool:
        """Whether this family's grad-input and grad-weight kernels are the ones for ``spec``."""
        return False

    def grad_input_rank(self, spec: ConvSpec) -> Optional[int]:
        """None when this family has no grad-input kernel for ``spec``; else its place among those that do
        (0 first: the default). The backward family's kernel ranks 1."""
        return 1 if self.computes_backward(spec) else None

    def grad_weight_rank(self, spec: ConvSpec) -> Optional[int]:
        """None when this family has no grad-weight kernel for ``spec``; else its place among those that do
        (0 first: the default). The backward family's kernel ranks 1."""
        return 1 if self.computes_backward(spec) else None

    def suits(self, spec: ConvSpec, kind: str, pixels: PixelSpace) -> bool:
        """Whether an untuned launch of kernel ``kind`` over ``pixels`` may take this family by default (the
        lowering passes over a family that ranks first but does not suit the launch's shape)."""
        return True

    def claims(self, spec: ConvSpec, kind: str, pixels: PixelSpace) -> bool:
        """Whether an untuned launch of kernel ``kind`` over ``pixels`` takes this family ahead of the plan's
        default, where the planner offers it (a family whose edge depends on the map, which the plan does not
        know: the dense depthwise product on small maps)."""
        return False

    # ------------------------------------------------------------------ tiles and grid
    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        raise NotImplementedError(f"the {self.name} family has no default config")

    def fitted(self, config: KernelConfig, spec: ConvSpec, kind: str, pixels: PixelSpace) -> KernelConfig:
        """A default tile fitted to the launch's ``pixels`` before it is filled (families.default_config)."""
        return config

    def refit(self, config: KernelConfig, spec: ConvSpec, kind: str) -> KernelConfig:
        """A default tile after one of its sides was halved to fill the device: what else follows the tile."""
        return config

    def keeps_floor(self, config: KernelConfig, spec: ConvSpec) -> bool:
        """Whether a shrunk default tile keeps the family's floor (its limits are checked by the caller)."""
        return True

    def groups_per_program(self, spec: ConvSpec, config: KernelConfig, kind: str) -> int:
        return 1

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """The launch grid (see families.grid_of)."""
        channels = spec.in_channels if kind == "grad_input" else spec.out_channels
        return (self.pixel_tiles(spec, kind, config, pixels), cdiv(channels, config.block_n))

    def pixel_tiles(self, spec: ConvSpec, kind: str, config: KernelConfig, pixels: PixelSpace) -> int:
        """The grid's pixel tiles: of one phase of the stride each (Family.phases), or of one row phase each where a
        program takes every column phase in turn (Family.interleaves_columns)."""
        phases = self.phases(spec, kind)
        return pixels.tiles(config.block_m, phases) // (phases[1] if self.interleaves_columns(spec, kind) else 1)

    def reduction_block(self, config: KernelConfig) -> int:
        """Units a split reduction (grad_weight, grad_bias) sums per step: a split's range is a multiple."""
        return config.block_m

    def reduction_units(self, spec: Optional[ConvSpec], config: KernelConfig, pixels: PixelSpace) -> int:
        """What a split reduction sums over (the kernel's ``pixels`` argument): output pixels."""
        return pixels.pixels

    def least_split_blocks(self, band_dot: str) -> int:
        """Blocks of reduction_block units each split of a reduction keeps at least (launch.split_pixels)."""
        return MIN_BLOCKS_PER_SPLIT

    # ------------------------------------------------------------------ lowering decisions
    def stages_channels_last(self, spec: ConvSpec, kind: str) -> bool:
        """Whether the runtime copies the activation kernel ``kind`` of ``spec`` reads to channels_last."""
        return False

    def computes_staged_as_channels_last(self) -> bool:
        """Whether a staged kernel of this family computes the channels_last conv (its output written through
        its own strides), not the conv of the spec's layout with channels_last reads (lowering.choose_layout_constants)."""
        return False

    def reduction_order(self, kind: str, channels_contiguous: bool) -> str:
        return "none"

    def weight_layout(self, kind: str, weight_memory: str) -> str:
        """The weight memory the kernel reads at literal strides, given the launch's (runtime/weights.py)."""
        return "strided"

    def band_dot(self, spec: ConvSpec) -> str:
        return "none"

    def reads_aligned_rows(self, spec: ConvSpec, band_dot: str, kind: str = "forward") -> bool:
        """Whether kernel ``kind`` reads or writes activation rows as vectors along the width (and so takes
        the launch's row alignment, KernelDesc.row_alignment)."""
        return False

    def rounds_reads(self, channels_contiguous: bool) -> bool:
        """Whether a kernel that takes the launch's row alignment rounds the strides of the activations it reads
        by it (so that the launch measures them too, launch._aligned_rows), given whether it reads them with
        channels contiguous (channels_last or staged)."""
        return True

    def band_shift(self, spec: ConvSpec, row_alignment: int) -> int:
        return 0

    def tap_tile(self, spec: ConvSpec, kind: str, config: KernelConfig, halo_tile: int) -> int:
        return 0

    def forward_serves_input_gradient(self, spec: ConvSpec) -> bool:
        """Whether this family's forward kernel on ``spec`` (a transposed conv) serves an input gradient
        better than the family's own grad-input kernel, untuned (plan.grad_input_as_forward)."""
        return False

    def phases(self, spec: ConvSpec, kind: str) -> tuple[int, int]:
        """(row phases, column phases): kernel ``kind``'s programs each take input pixels of one phase, their
        rows and columns modulo these (KernelDesc.phases); (1, 1): any pixels."""
        return (1, 1)

    def interleaves_columns(self, spec: ConvSpec, kind: str) -> bool:
        """Whether a program of kernel ``kind`` in phases of the stride takes every column phase of its row phase
        in turn, BLOCK_M pixels of each, and interleaves them along the width to store them
        (KernelDesc.interleave_columns); the grid then has a program for every row phase's tile."""
        return False

    def held_weights(self, kind: str) -> int:
        """The most weight elements a program of kernel ``kind`` loads once and holds (KernelDesc.held_weights);
        0: none."""
        return 0

    def step_rows(self, spec: ConvSpec, kind: str, config: KernelConfig) -> int:
        """The output rows a step of a tile of one column's rows takes (KernelDesc.step_rows); 0 otherwise."""
        return 0

    def pieces(self, spec: ConvSpec, kind: str, config: KernelConfig, band_shift: int) -> int:
        """The BLOCK_K-column pieces of a strip's input band a grad-weight tile of one row's strips holds an
        accumulator each for (KernelDesc.pieces); 0: not that tile."""
        return 0

    def slide_rows(self, spec: ConvSpec, kind: str, config: KernelConfig, pixels: Optional[PixelSpace]) -> int:
        """The most output rows a block of a forward tile sliding down them takes (KernelDesc.slide_rows), for a
        launch over ``pixels`` (None: not known); 0: the tile does not slide."""
        return 0

    def halo(self, spec: ConvSpec, config: KernelConfig, kind: str = "forward",
             band_shift: int = 0) -> tuple[tuple[int, int], int]:
        """(positions read before and after the main tile, the side of the tiles holding them)."""
        return (0, 0), 0

    # ------------------------------------------------------------------ the tuner's search space
    def tile_depth(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        """What a tile's block_m x block_n outputs are multiplied by in registers (tile_elements)."""
        return 1

    def accumulator_registers(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        """Registers the least accumulator a program of kernel ``kind`` must hold (0: left to tile_elements)."""
        return 0

    def operand_bytes(self, config: KernelConfig, spec: ConvSpec) -> int:
        """Shared memory the pipelined operand tiles take: num_stages x (BLOCK_M x BLOCK_K + BLOCK_K x BLOCK_N)."""
        return (config.num_stages * (config.block_m * config.block_k + config.block_k * config.block_n)
                * ELEMENT_BYTES[spec.dtype])

    # ------------------------------------------------------------------ inspect's model
    def requested(self, desc, problem, programs: int, arguments: dict) -> Optional[tuple[float, Optional[float]]]:
        """(global bytes the programs request, tensor-core FLOPs issued or None) of a launch, counting every
        operand tile each program loads; None where the family's model is not written."""
        return None

    @staticmethod
    def taps(spec: ConvSpec) -> int:
        return math.prod(spec.kernel_size)

    @staticmethod
    def rows_in_bounds(spec: ConvSpec, arguments: dict) -> int:
        """(output row, kernel row) pairs of one image whose input row lies in [0, height): the rows a tile
        model's masks let it read (the rest are the conv's padding)."""
        (stride_h, _), (pad_top, *_), (dilation_h, _) = spec.stride, spec.padding, spec.dilation
        return sum(0 <= out_h * stride_h - pad_top + tap_h * dilation_h < arguments["height"]
                   for out_h in range(arguments["out_height"]) for tap_h in range(spec.kernel_size[0]))
