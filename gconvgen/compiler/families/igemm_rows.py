"""The implicit GEMM that slides down the output rows (templates/grouped_igemm_rows.py.jinja): the igemm forward
whose program takes a tile of (batch, column) pixels of up to MAX_ROWS consecutive output rows and reads each input
row of their windows once. The flat igemm tile re-reads an input row for every kernel row that reaches it (3 x 3:
nine [pixels, channels] tiles a step, three of each row); here kernel row i of input row q adds into the
accumulator of output row (q - i * dilation) / stride, and the program keeps one accumulator for each output row
still open: (kernel_h - 1) * dilation // stride_h + 1 of them, the oldest stored and a fresh one opened a step.
Its grad-weight (templates/grouped_igemm_rows_grad_weight.py.jinja) slides the same way, holding the open rows'
grad_out tiles and one accumulator a tap: a step loads one grad_out tile and an input tile for each input row and
kernel column, where the flat grad-weight loads an input tile for every tap and a grad_out tile for every tile of
weight columns. Packing of narrow groups, channel masks, weight tiles and the epilogue are the flat igemm's
(families.igemm); the input gradient runs the flat igemm's kernel (or, at stride 1, this family's forward of the
transposed conv)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from ...ir import ConvSpec
from ..tiles import (DEFAULT_SHARED_MEMORY_BYTES, DEFAULT_WAVES, ELEMENT_BYTES, H200_SMS, KernelConfig, PixelSpace,
                     cdiv, pow2_between)
from .igemm import Igemm

MAX_ROWS = 8  # output rows a program slides over at most: (8 + 2) input rows for 3 x 3 windows, against 24 flat
WGMMA_ROWS = 64  # a wgmma tile's least rows: a default tile shrunk under it runs mma.sync
MAX_DEFAULT_GROUP_OUTPUTS = 32  # wider groups take the flat igemm by default unless held (IgemmRows.rank)
# The packed groups' input channels a program reduces in one step at most (its block_k): with one step, every
# tap's weight tile is loaded once and held through the rows (9 x [64, 64] for RegNetY-8GF's 56 a group), up to
# HELD_WEIGHT_ELEMENTS (a 1 x 128 window's 128 taps of [64, 64] would take 1 MiB of shared memory)
HELD_CHANNELS = 64
HELD_WEIGHT_ELEMENTS = 9 * 64 * 64
# A program's open accumulators (open_rows x block_m x block_n fp32) at most: 3 x [128, 32] on 4 warps, or
# 3 x [128, 64] on 8 (96 registers a thread)
ACCUMULATOR_ELEMENTS = 3 * 128 * 64
# The grad-weight's accumulators, one [block_m, block_n] a tap, at most: 9 taps of [32, 32] (72 registers a thread
# on 4 warps); wider groups take several channel tiles, windows of more taps the flat grad-weight. Half-precision
# windows of up to 9 taps (3 x 3), this many registers a thread: [64, 64] on 8 warps (a group of RegNetY-8GF's 56
# channels a program: 207 registers, no spill; 39.2% of its floor modelled against 25.9% at [64, 16], whose four
# column tiles each read grad_out again). Not in float32 (a dot without TF32 is FMAs on register tiles: [64, 64]
# spilled 3.9 KB on RegNetY-8GF) nor float64, nor wider windows (5 x 3 in float32 at [64, 16]: 7.8 KB)
GRAD_WEIGHT_ACCUMULATOR_ELEMENTS = 9 * 32 * 32
GRAD_WEIGHT_ACCUMULATOR_REGISTERS = 144
# The grad-weight's step, block_m x block_n x block_k products a tap, at most: 16 x 16 x 64 (ResNeXt: 214
# registers on 4 warps); 32 x 32 x 32 spilled 48 B on RegNetY-1.6GF (24 channels a group), 32 x 32 x 16 none
GRAD_WEIGHT_STEP_PRODUCTS = 16 * 16 * 64
# A row's step unrolls a dot for every tap of the window: windows of more taps are left to the flat igemm, which
# loops over them (a 1 x 128 window, wav2vec2's positional conv, compiled for over ten minutes in float64)
MAX_TAPS = 7 * 7
# NCHW (and strided) activations of groups of at most this many channels, in and out, are read where they lie
# (IgemmRows.reads_in_place), not staged channels_last, where the forward's open accumulators hold at most
# IN_PLACE_OPEN_COLUMNS columns (open rows x block_n): see IgemmRows.stages_channels_last
IN_PLACE_GROUP_CHANNELS = 64
IN_PLACE_OPEN_COLUMNS = 2 * 64
IN_PLACE_STEP_ELEMENTS = 16  # ... and a grad-weight step's elements a thread at most, reading in place


def grad_weight_accumulators(spec: ConvSpec, warps: int) -> int:
    """The grad-weight's accumulator elements at most on ``warps`` warps: GRAD_WEIGHT_ACCUMULATOR_REGISTERS a
    thread for a half-precision window of up to 9 taps, else GRAD_WEIGHT_ACCUMULATOR_ELEMENTS."""
    if spec.dtype in ("bfloat16", "float16") and spec.kernel_size[0] * spec.kernel_size[1] <= 9:
        return GRAD_WEIGHT_ACCUMULATOR_REGISTERS * 32 * warps
    return GRAD_WEIGHT_ACCUMULATOR_ELEMENTS


def open_rows(spec: ConvSpec) -> int:
    """The output rows whose accumulators a program holds at once: an input row reaches the output rows of
    the kernel rows above it, (kernel_h - 1) * dilation_h // stride_h + 1 of them."""
    return (spec.kernel_size[0] - 1) * spec.dilation[0] // spec.stride[0] + 1


def row_phases(spec: ConvSpec) -> dict[int, list[int]]:
    """The input rows a step reads, as phases p of the stride (input row t * stride_h + p at step t), each with
    the kernel rows i that read it, (p - i * dilation_h) % stride_h == 0: a phase no kernel row reads is not
    loaded."""
    stride, dilation = spec.stride[0], spec.dilation[0]
    phases = {p: [i for i in range(spec.kernel_size[0]) if (p - i * dilation) % stride == 0] for p in range(stride)}
    return {p: rows for p, rows in phases.items() if rows}


def rows_per_program(out_height: int) -> int:
    """The output rows a program takes: the height split evenly into programs of at most MAX_ROWS (14 rows: two
    of 7, not 8 and 6). The kernel takes cdiv(out_height, row blocks) from its grid, the same."""
    return cdiv(out_height, cdiv(out_height, MAX_ROWS))


class IgemmRows(Igemm):
    name = "igemm_rows"
    templates = {"forward": "grouped_igemm_rows.py.jinja", "grad_weight": "grouped_igemm_rows_grad_weight.py.jinja"}

    def rank(self, spec: ConvSpec) -> Optional[int]:
        """Every conv the flat igemm computes; the default for windows taller than one row, where the flat tile
        re-reads input rows (a one-row window reads each once either way), of groups of at most
        MAX_DEFAULT_GROUP_OUTPUTS output channels, or of at most HELD_CHANNELS whose default tile holds its
        weights (holds_weights): a step re-reading every tap's weight tile outweighs the input rows it saves for
        wider groups (RegNetY-8GF's 56 a group, weights re-read: 14.7% of its floor modelled against the flat tile's
        16.7%; held: 39.9%). Not windows of more than MAX_TAPS taps, whose unrolled steps compile for minutes."""
        if spec.is_depthwise or self.taps(spec) > MAX_TAPS:
            return None
        if spec.kernel_size[0] == 1:
            return 2
        outputs, config = spec.out_channels_per_group, self.default_config(spec, "forward", interpret=False)
        held = outputs <= HELD_CHANNELS and self.holds_weights(config, spec)
        return 0 if outputs <= MAX_DEFAULT_GROUP_OUTPUTS or held else 2

    def grad_weight_rank(self, spec: ConvSpec) -> Optional[int]:
        """The default grad-weight for windows taller than one row whose accumulators, one a tap at the default
        tile, fit grad_weight_accumulators (every 3 x 3 window: ResNeXt's groups of 4-64 channels, RegNetY's 24
        and 56); None elsewhere (7 x 7)."""
        if spec.is_depthwise or spec.kernel_size[0] == 1:
            return None
        config = self.default_config(spec, "grad_weight", interpret=False)
        fits = self.taps(spec) * config.block_m * config.block_n <= grad_weight_accumulators(spec, config.num_warps)
        return 0 if fits else None

    def suits(self, spec: ConvSpec, kind: str, pixels: PixelSpace) -> bool:
        """Launches whose grid at a 64-pixel tile (wgmma's least) fills DEFAULT_WAVES waves of the H200's SMs, so
        that filling the device (families.filled) leaves the tile on wgmma. A program takes up to MAX_ROWS rows,
        so its grid is that many times smaller than the flat tile's: on RegNetY-1.6GF's stage 4 (7 x 7 map,
        batch 32) filling shrank it to 16 pixels, 5.8% of the floor modelled against the flat tile's 12.6%.
        Grad-weight: any launch (its splits fill the device)."""
        if kind == "grad_weight":
            return True
        config = self.default_config(spec, kind, interpret=False)
        config = self.refit(replace(config, block_m=min(config.block_m, WGMMA_ROWS)), spec, kind)
        grid = self.grid(kind, spec, config, self.groups_per_program(spec, config, kind), pixels)
        return math.prod(grid) >= DEFAULT_WAVES * H200_SMS

    def computes_backward(self, spec: ConvSpec) -> bool:
        return False  # the gradients run the flat igemm's kernels

    def stages_channels_last(self, spec: ConvSpec, kind: str) -> bool:
        """NCHW activations that reads_in_place allows are read where they lie: a row's step loads each input
        row once a kernel column, 2-byte elements along the width (a tap's column shift leaves no vector
        aligned), where a channels_last copy costs one read and one write of the whole activation, about the
        ideal bytes of the conv again. Modelled, % of the floor, staged -> in place: ResNeXt-50's layer1
        forward 29.0 -> 40.9, layer2.0 (stride 2) 31.2 -> 62.4, RegNetY-1.6GF's stage 3 22.4 -> 28.8,
        ResNeXt-101's layer4.0 29.8 -> 55.7, bound by the bytes either way (the loop's issue grows, 274 -> 365
        instructions on layer1, under them)."""
        return super().stages_channels_last(spec, kind) and not self.reads_in_place(spec)

    def reads_in_place(self, spec: ConvSpec) -> bool:
        """Whether this family's kernels read ``spec``'s NCHW or strided activations where they lie, element by
        element along the width (stages_channels_last): groups of at most IN_PLACE_GROUP_CHANNELS channels whose
        forward tile's open accumulators hold at most IN_PLACE_OPEN_COLUMNS columns (open rows x block_n), for
        the input tiles read into registers beside them (not through cp.async into shared memory). RegNetY-8GF's
        56 channels a group, three open rows of 64 columns (a stride of 1), spilled 16 B at 255 registers in
        place; ResNeXt-101's 64, two rows at a stride of 2, none (238 registers), nor ResNeXt-50's 3 x 16 and
        RegNetY-1.6GF's 3 x 32."""
        channels = max(spec.in_channels_per_group, spec.out_channels_per_group)
        if spec.layout == "nhwc" or channels > IN_PLACE_GROUP_CHANNELS:
            return False
        config = self.default_config(spec, "forward", interpret=False)
        return open_rows(spec) * config.block_n <= IN_PLACE_OPEN_COLUMNS

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """The flat igemm's forward tile, block_m pixels of (batch, column) a row, halved while the open rows'
        accumulators pass ACCUMULATOR_ELEMENTS; in fewer stages while its operands pass the shared memory of
        DEFAULT_SHARED_MEMORY_BYTES. Grad-weight: (the packed groups' output channels, up to 64, their input
        channels, up to 64 and as the taps' accumulators allow (grad_weight_accumulators), pixels a step up to
        GRAD_WEIGHT_STEP_PRODUCTS for each 4 warps), groups packed as the output-channel tile allows; 8 warps
        for 64 output channels or for a deep step read in place (IN_PLACE_STEP_ELEMENTS). A group's output
        channels in one tile read its input once, its input channels its grad_out once (RegNetY-8GF's 56 a
        group: 21.7% of its floor modelled at 32 x 32, 25.9% at 64 x 16, 39.2% at 64 x 64)."""
        if kind == "grad_weight":
            block_m = pow2_between(spec.out_channels_per_group, 16, 64)
            packed = min(spec.groups, max(1, block_m // spec.out_channels_per_group))
            warps = 8 if block_m > 32 else 4
            # (sized as for a 3 x 3 window, a power of two of at least 16: 9 x 512 x warps or 9 x 1024 elements
            # over 9 x block_m; up to 64 where the registers bound the accumulators, else 32)
            accumulators = grad_weight_accumulators(spec, warps)
            most = 64 if accumulators > GRAD_WEIGHT_ACCUMULATOR_ELEMENTS else 32
            block_n = pow2_between(packed * spec.in_channels_per_group, 16, min(most, accumulators // (9 * block_m)))
            block_k = pow2_between(GRAD_WEIGHT_STEP_PRODUCTS * warps // 4 // (block_m * block_n), 16, 64)
            # reading in place, a step's elements (a grad_out tile and an input tile a phase and kernel column)
            # are loaded one by one: 8 warps where they pass IN_PLACE_STEP_ELEMENTS a thread on 4 (ResNeXt-50's
            # layer1 at 16 x 16 x 64, 32 a thread: 12 B spilled at 255 registers on 4, none at 215 on 8), the step
            # left as it is (RegNetY-1.6GF's 32 x 32 x 16 on 8 spilled 36 B at 128 registers on Triton 3.6)
            step = block_m * block_k + len(row_phases(spec)) * spec.kernel_size[1] * block_k * block_n
            if self.reads_in_place(spec) and step > IN_PLACE_STEP_ELEMENTS * 32 * warps:
                warps = 8
            return KernelConfig(block_m, block_n, block_k, num_warps=warps, num_stages=1 if interpret else 2)
        config = super().default_config(spec, kind, interpret=interpret)
        while config.block_m > 16 and open_rows(spec) * config.block_m * config.block_n > ACCUMULATOR_ELEMENTS:
            config = self.refit(replace(config, block_m=config.block_m // 2), spec, kind)
        while config.num_stages > 1 and self.operand_bytes(config, spec) > DEFAULT_SHARED_MEMORY_BYTES:
            config = replace(config, num_stages=config.num_stages - 1)
        return config

    def default_pixels(self, channels: int, interpret: bool) -> int:
        """128 pixels of a row (256 under the interpreter): a row's step re-reads no weight tile where it holds
        them, and elsewhere its open rows' accumulators share the registers (ResNeXt-50's layer 1 at 256 took
        198 to 221 registers on 4 warps for 1.4% less modelled time)."""
        return 256 if interpret else 128

    def reduction_step(self, channels: int, interpret: bool) -> int:
        """On a GPU the next power of two up to 32, not the flat igemm's least-padding step: a row's step unrolls
        its taps, and a window of many taps compiles for minutes (a 128-tap conv1d in float32
        took over 150 s at 32 or 16 channels a step; in more, smaller steps the sm_90 check of every variant,
        tests/test_sm90_compile.py, ran past 20 minutes)."""
        return super().reduction_step(channels, interpret) if interpret else pow2_between(channels, 16, 32)

    def _config(self, spec: ConvSpec, kind: str, block_m: int, block_n: int, *, interpret: bool) -> KernelConfig:
        """The flat igemm's tile, with a reduction step of every input channel of the packed groups where they
        are at most HELD_CHANNELS: one channel step, whose weight tiles the kernel loads once and holds
        (step_operands); held tiles of 64 x 64 on 8 warps (ResNeXt-101's layer 4 in NCHW spilled 48 B on 4 in
        Triton 3.6)."""
        config = super()._config(spec, kind, block_m, block_n, interpret=interpret)
        channels = self.groups_per_program(spec, config, kind) * spec.in_channels_per_group
        held = replace(config, block_k=pow2_between(channels, 16, HELD_CHANNELS))
        if channels > HELD_CHANNELS or not self.holds_weights(held, spec):
            return config
        wide = held.block_k * held.block_n >= 64 * 64 and not interpret
        return replace(held, num_warps=8) if wide else held

    def held_weights(self, kind: str) -> int:
        return HELD_WEIGHT_ELEMENTS if kind == "forward" else 0

    def holds_weights(self, config: KernelConfig, spec: ConvSpec, packed: Optional[int] = None) -> bool:
        """Whether the forward at ``config`` (``packed`` groups a program, by default as many as it packs)
        loads its weight tiles once and holds them through the rows: one channel step of the packed groups,
        and every tap's tile within HELD_WEIGHT_ELEMENTS (the template's constexpr `hold`)."""
        packed = self.groups_per_program(spec, config, "forward") if packed is None else packed
        one_step = packed * spec.in_channels_per_group <= config.block_k
        return one_step and self.taps(spec) * config.block_k * config.block_n <= HELD_WEIGHT_ELEMENTS

    def refit(self, config: KernelConfig, spec: ConvSpec, kind: str) -> KernelConfig:
        """The flat igemm's refit, in the stages the operands' shared memory allows."""
        if kind == "grad_weight":
            return config
        refitted = super().refit(config, spec, kind)
        return replace(refitted, num_stages=min(refitted.num_stages, config.num_stages))

    def tile_depth(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        """An accumulator a row still open; grad-weight: one a tap."""
        return self.taps(spec) if kind == "grad_weight" else open_rows(spec)

    def operand_bytes(self, config: KernelConfig, spec: ConvSpec) -> int:
        """num_stages x a step's operands, and the weights held through the rows (step_operands)."""
        inputs, weights, held = self.step_operands(spec, config, self.groups_per_program(spec, config, "forward"))
        return (config.num_stages * (inputs + weights) + held) * ELEMENT_BYTES[spec.dtype]

    def step_operands(self, spec: ConvSpec, config: KernelConfig, packed: int) -> tuple[int, int, int]:
        """The elements a step loads, (input, weight), and the weights loaded once before the rows: for each
        channel step of ``packed`` groups, a [block_m, block_k] input tile for each input row of the step that
        a kernel row reads (row_phases) and kernel column, and a [block_k, block_n] weight tile for each tap.
        With one channel step (ResNeXt's packed groups, RegNetY's 24 and 56 channels) the weight tiles are the
        same every step: the kernel loads them once and holds them (0 a step), up to HELD_WEIGHT_ELEMENTS."""
        channel_steps = math.ceil(packed * spec.in_channels_per_group / config.block_k)
        inputs = channel_steps * len(row_phases(spec)) * spec.kernel_size[1] * config.block_m * config.block_k
        weights = channel_steps * self.taps(spec) * config.block_k * config.block_n
        return (inputs, 0, weights) if self.holds_weights(config, spec, packed) else (inputs, weights, 0)

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """(tiles of block_m (batch, column) pixels x the programs down the output rows, channel tiles, group
        blocks); grad-weight: (output-channel tiles x input-channel tiles, group blocks, splits)."""
        if kind == "grad_weight":
            return (cdiv(packed * spec.out_channels_per_group, config.block_m)
                    * cdiv(packed * spec.in_channels_per_group, config.block_n), cdiv(spec.groups, packed), splits)
        out_height = pixels.rows // pixels.batch
        row_blocks = cdiv(out_height, rows_per_program(out_height))
        return (cdiv(pixels.batch * pixels.width, config.block_m) * row_blocks,
                cdiv(packed * spec.out_channels_per_group, config.block_n), cdiv(spec.groups, packed))

    def reduction_units(self, spec: Optional[ConvSpec], config: KernelConfig, pixels: PixelSpace) -> int:
        """Grad-weight sums tiles of block_k (batch, output column) pixels over a block of rows_per_program output
        rows, block_k units a tile: (row blocks x tiles) x block_k. The kernel takes the row blocks from it."""
        out_height = pixels.rows // max(pixels.batch, 1)
        row_blocks = cdiv(out_height, rows_per_program(out_height)) if out_height else 0
        return row_blocks * cdiv(pixels.batch * pixels.width, config.block_k) * config.block_k

    def requested(self, desc, problem, programs: int, arguments: dict):
        """Per program and step (output rows + open_rows - 1 of them): the step's operands, the held weights once
        (step_operands), and a dot of each weight tile with its input tile. Grad-weight: per tile of its split's
        units and step, a [block_m, block_k] grad_out tile and a [block_k, block_n] input tile for each input
        row that a kernel row reads (row_phases) and kernel column, and a dot for each tap."""
        spec, config = problem.spec, desc.config
        steps = rows_per_program(problem.output_size[0]) + open_rows(spec) - 1  # a row block's (a tile's)
        if desc.kind == "grad_weight":
            m, n, k = config.block_m, config.block_n, config.block_k
            steps *= cdiv(arguments.get("pixels_per_split", 0), k)
            loads = m * k + len(row_phases(spec)) * spec.kernel_size[1] * k * n
            return (programs * steps * loads * ELEMENT_BYTES[spec.dtype],
                    programs * steps * self.taps(spec) * 2 * m * n * k)
        inputs, weights, held = self.step_operands(spec, config, desc.groups_per_program)
        return (programs * (steps * (inputs + weights) + held) * ELEMENT_BYTES[spec.dtype],
                programs * steps * (weights + held) * 2 * config.block_m)
