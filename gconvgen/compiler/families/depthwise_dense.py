"""The dense depthwise family (templates/depthwise_dense.py.jinja): a depthwise conv of a small map as a product
of each channel's flattened map with a dense matrix T[input pixels, output pixels] of its taps, built from the
weight in registers, on tensor cores. Where the window covers most of the map, T is mostly taps: RepLKNet's
27 x 27 window on a 14 x 14 map reaches all 196 input pixels from each output pixel, so the product issues 196
products an output where the window has 729 taps (533 of them on the padding), and reads x once a tile of
output pixels, where the band re-reads it for every kernel row and band step. On larger maps most of T is zero:
the band (depthwise_gemm) or the direct kernel wins there. Its input gradient at stride 1 is the forward of the
transposed conv, which this family serves too. Its weight gradient (templates/depthwise_dense_grad_weight.py.jinja)
is T's adjoint: the products of every pair of output and input pixels, summed over samples, are one dot, and a
second dot against a 0/1 matrix sums each tap's diagonal of them; on a small map it replaces the band's, which
re-reads x for every kernel row (RepLKNet's dw27: 49-53x the ideal bytes)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ...ir import ConvSpec, check
from ..tiles import ELEMENT_BYTES, KernelConfig, PixelSpace, cdiv, pow2_between
from .base import Family
from .depthwise_gemm import band_dot
from .igemm import DOT_SIDES

# A launch claims this family (untuned) where the input map has at most this many pixels a window tap (modelled
# % of the floor, channels_last / NCHW, here against the band, bfloat16 at batch 64): RepLKNet's dw27 on 14 x 14
# (0.27 a tap) 32.7 / 41.8 against 2.8 / 3.1, a dw13 on 7 x 7 (0.29) 33.0 / 50.5 against 3.2 / 2.5, a dw5 on
# 7 x 7 (2.0) 40.8 / 49.5 against 23.3 / 23.5, a dw9 on 14 x 14 (2.4) 24.8 / 29.6 against 8.8 / 8.6; past it the
# band wins in one layout or both: a dw7 on 14 x 14 (4.0) 28.1 / 32.3 against 36.6 / 48.8, a dw3 on 7 x 7 (5.4)
# 40.7 / 46.2 against 43.6 / 18.2
DENSE_PIXELS_PER_TAP = 3
DENSE_MAX_PIXELS = 1024  # ... and output maps of at most this many pixels
# ... of at least tl.dot's 16 (a tile of output pixels) in batches of at least half its 16 rows (samples): a
# one-token prompt of Mamba's k4 at batch 1 modelled 1.2% of its floor here, 10.3% on depthwise1d
DENSE_LEAST_PIXELS, DENSE_LEAST_BATCH = 16, 8
# ... and where T's blocks (each built once for a tile of samples), counted at 64 x 16 pixels a block, are at most
# this many elements for each pixel of the batch's input and output: the batch shares them (modelled % of the
# floor, channels_last / NCHW, against the band). A long 1-D window on a short row at batch 8 builds many a
# sample, where the band reads the row once: a causal k64 on 192 positions 6.7 (12.8 / 11.1 against 24.1 / 12.4),
# on 128 6.0 (14.2 / 11.7 against 16.2 / 8.3), a k256 on 512 15 (5.0 / 5.4 against 9.8 / 12.5). A 2-D window on
# a map of a few rows builds few: RepLKNet's dw27 on 14 x 14 at batch 64 2.1, a dw31 on 28 x 28 5.4 (16.5 / 23.3
# against 11.6 / 7.2), a dw7 on 7 x 7 at batch 8 5.2 (11.0 / 8.3 against 9.7 / 7.0); so does a short window on a
# short row: a causal k16 on 48 positions at batch 8 4.0 (22.7 / 12.7 against 11.0 / 4.2)
DENSE_BLOCK_ELEMENTS_PER_PIXEL = 5.5
# The grad-weight claims (untuned) one tile of output pixels (16 x 16, two rows or more) whose input map has at most
# this many pixels a tap, in batches of at least (rows, square tiles) samples (modelled % of the floor,
# channels_last / NCHW, bfloat16, batch 64 unless said, here against the band). Square tiles (pairs_tile, maps of
# at most 8 x 8): ConvNeXt's dw7 on 7 x 7 76.7 / 63.9 against 6.9 / 14.7, a dw3 on 7 x 7 (5.4 a tap) 75.7 / 58.2
# against 11.8 / 13.3, a dw13 75.6 / 64.3 against 2.8 / 3.0; a dw7 at batch 32 51.4 / 44.3 against 5.9 / 12.4 (at
# 8 and 16 the channels_last defaults spilled 12-44 bytes: the band there). Tiles of rows: RepLKNet's dw27 on
# 14 x 14 (0.27 a tap) 60.4 / 56.5 against 3.7 / 3.9, a dw31 on 16 x 16 91.0 / 91.0 against 5.2 / 5.0, a dw9 on
# 14 x 14 (2.4) 30.5 / 40.7 against 10.6 / 14.0, a dw7 (4.0) 30.5 / 40.7 against 15.6 / 27.2, a dw5 (7.8) 30.5 /
# 40.6 against 24.7 / 26.6; past 8 a tap the band wins: a dw3 on 14 x 14 (21.8) 15.5 / 36.8 against 27.7 / 40.8, on
# 10 x 10 (11.1) 29.0 / 27.9 against 20.3 / 26.4. A step's 64 samples share the diagonal dots' work. (The dense
# figures here and at GRAD_WEIGHT_SAMPLES predate the kernel's check of grad_out for non-finite values, which took
# 2-13 points off the suites' two layers.)
DENSE_GRAD_WEIGHT_PIXELS_PER_TAP, DENSE_GRAD_WEIGHT_LEAST_BATCH = 8, {False: 64, True: 32}
# The grad-weight's channels a program in channels_last: a quarter of a 16-byte vector (what it holds a channel,
# held_elements, would not fit the registers of a whole vector's channels)
GRAD_WEIGHT_CHANNEL_SHARE = 4
# The most elements a grad-weight program holds a step (held_elements)
GRAD_WEIGHT_HELD_ELEMENTS = 65536
# The grad-weight's samples a step (on 8 warps), for NCHW tiles of rows; half that for square tiles and in
# channels_last (two channels a program). Chosen so that neither Triton 3.9 nor 3.6 (the GPU machine's) spills
# (modelled % of the floor, 3.9 / 3.6): RepLKNet's dw27 on 14 x 14, NCHW at 64 56.5 / 60.4; channels_last at 64
# 60.4 / spilled 1244 bytes on 3.6, at 32 38.2 / 40.3; ConvNeXt's dw7 on 7 x 7 (square tiles), channels_last at 64
# 76.7 / spilled 24, at 32 71.3 / 76.7; NCHW at 64 on 4 warps 63.9 / spilled 24, at 32 47.3 / 65.6
GRAD_WEIGHT_SAMPLES = 64
# The side of the grad-weight's square tiles of output and input pixels that it pairs at once (pairs_tile)
PAIRS_SIDE = 8


def channel_tile(spec: ConvSpec, kind: str = "forward") -> int:
    """The channels a program takes: a 16-byte vector of them in channels_last (a dot batched over them), one in
    NCHW (a 2-D dot, wgmma on sm_90). The grad-weight holds a channel's products of pairs and diagonal matrix
    and takes a quarter of the vector (GRAD_WEIGHT_CHANNEL_SHARE)."""
    if band_dot(spec) != "channels":
        return 1
    vector = 16 // ELEMENT_BYTES[spec.dtype]
    return max(1, vector // GRAD_WEIGHT_CHANNEL_SHARE) if kind == "grad_weight" else vector


def tap_columns(spec: ConvSpec) -> int:
    """The grad-weight's tap columns a channel (the window's width, a power of two of at least tl.dot's 16)."""
    return pow2_between(spec.kernel_size[1], DOT_SIDES[0], 1 << 30)


def tap_rows(spec: ConvSpec) -> int:
    """The square-tile grad-weight's kernel rows, E_h's rows (the window's height, a power of two of at least
    tl.dot's 16)."""
    return pow2_between(spec.kernel_size[0], DOT_SIDES[0], 1 << 30)


def held_elements(spec: ConvSpec, config: KernelConfig) -> int:
    """What a grad-weight program holds a step, in elements: for each of its channels the grad_out tile
    [BLOCK_K x BLOCK_N, BLOCK_M], the products of pairs and the 0/1 matrices of the diagonal dots (pairs_tile)."""
    tile = config.block_k * config.block_n
    if pairs_tile(config):  # G [tile, tile], E_w [tile, tap columns], E_h [tap rows (16 or more), tile]
        held = tile * config.block_m + tile * tile + tile * tap_columns(spec) + tap_rows(spec) * tile
    else:  # G [tile, BLOCK_N], E [BLOCK_N x BLOCK_N, tap columns]
        pairs = config.block_n * config.block_n
        held = tile * config.block_m + config.block_k * pairs + pairs * tap_columns(spec)
    return channel_tile(spec, "grad_weight") * held


def pairs_tile(config: KernelConfig) -> bool:
    """Whether the grad-weight takes its output pixels in square tiles of PAIRS_SIDE x PAIRS_SIDE and pairs them
    with input tiles of that shape (a last stage's 7 x 7 map in one), rather than row by input row."""
    return config.block_n < DOT_SIDES[0]


def reached_pixels(spec: ConvSpec, q0: int, block_n: int, block_k: int, out_height: int, out_width: int,
                   height: int, width: int) -> tuple[int, int]:
    """The flattened input pixels [first, end) that the tile of output pixels [q0, q0 + block_n) steps through,
    as the template computes them: the rows its windows reach, and where the tile lies in one output row (a 1-D
    conv's always) the columns, from a multiple of block_k (end <= first: none)."""
    q_last = min(q0 + block_n, out_height * out_width) - 1
    (stride_h, stride_w), (top, _, left, _) = spec.stride, spec.padding
    reach_h, reach_w = ((k - 1) * d for k, d in zip(spec.kernel_size, spec.dilation))
    first_row = max(q0 // out_width * stride_h - top, 0)
    last_row = min(q_last // out_width * stride_h - top + reach_h, height - 1)
    one_row = q0 // out_width == q_last // out_width
    first_column = max(q0 % out_width * stride_w - left, 0) if one_row else 0
    last_column = min(q_last % out_width * stride_w - left + reach_w, width - 1) if one_row else width - 1
    return (first_row * width + first_column) // block_k * block_k, last_row * width + last_column + 1


def dense_steps(spec: ConvSpec, block_n: int, block_k: int, out_height: int, out_width: int, height: int,
                width: int) -> int:
    """The steps of block_k input pixels that every tile of block_n output pixels of one (sample tile, channel)
    takes."""
    steps = 0
    for q0 in range(0, out_height * out_width, block_n):
        first, end = reached_pixels(spec, q0, block_n, block_k, out_height, out_width, height, width)
        steps += max(0, cdiv(end - first, block_k))
    return steps


class DepthwiseDense(Family):
    name = "depthwise_dense"
    templates = {"forward": "depthwise_dense.py.jinja", "grad_weight": "depthwise_dense_grad_weight.py.jinja"}
    # the grad-weight's square tiles of PAIRS_SIDE output pixels a side take block_n = block_k = 8
    limits = {"block_m": DOT_SIDES, "block_n": (PAIRS_SIDE, DOT_SIDES[1]), "block_k": (PAIRS_SIDE, DOT_SIDES[1])}

    def rank(self, spec: ConvSpec) -> Optional[int]:
        """Every depthwise conv; never the planner's default (a small map claims it, DepthwiseDense.claims)."""
        return 3 if spec.is_depthwise else None

    def grad_weight_rank(self, spec: ConvSpec) -> Optional[int]:
        """Every depthwise conv whose least tile holds at most GRAD_WEIGHT_HELD_ELEMENTS (windows up to 128
        columns wide in NCHW, 64 in channels_last); never the planner's default (a small map claims it,
        DepthwiseDense.claims)."""
        least = KernelConfig(DOT_SIDES[0], DOT_SIDES[0], DOT_SIDES[0])
        return 3 if spec.is_depthwise and held_elements(spec, least) <= GRAD_WEIGHT_HELD_ELEMENTS else None

    def claims(self, spec: ConvSpec, kind: str, pixels: PixelSpace) -> bool:
        """A half-precision forward over an output map of DENSE_LEAST_PIXELS to DENSE_MAX_PIXELS pixels, in
        batches of DENSE_LEAST_BATCH or more, whose input pixels are at most DENSE_PIXELS_PER_TAP a window tap
        (T is mostly taps) and whose T blocks at most DENSE_BLOCK_ELEMENTS_PER_PIXEL a pixel of the batch; a
        half-precision grad-weight over one tile of output pixels (16 x 16, two rows or more), in batches of
        DENSE_GRAD_WEIGHT_LEAST_BATCH or more, whose input pixels are at most DENSE_GRAD_WEIGHT_PIXELS_PER_TAP
        a tap."""
        if kind not in ("forward", "grad_weight") or spec.dtype not in ("float16", "bfloat16"):
            return False
        out_height, out_width = pixels.height, pixels.width
        out_pixels = out_height * out_width
        # the input that output map needs (a stride may leave a few more rows or columns unread)
        height, width = (max(1, (out - 1) * stride + (k - 1) * dilation + 1 - before - after)
                         for out, stride, k, dilation, before, after in zip(
                             (out_height, out_width), spec.stride, spec.kernel_size, spec.dilation,
                             spec.padding[::2], spec.padding[1::2]))
        pixels_per_tap = height * width / self.taps(spec)
        if kind == "grad_weight":
            square = out_height <= PAIRS_SIDE and out_width <= PAIRS_SIDE
            least_batch = DENSE_GRAD_WEIGHT_LEAST_BATCH[square]
            return (pixels.batch >= least_batch and 1 < out_height <= DOT_SIDES[0] and out_width <= DOT_SIDES[0]
                    and pixels_per_tap <= DENSE_GRAD_WEIGHT_PIXELS_PER_TAP)
        if pixels.batch < DENSE_LEAST_BATCH or not DENSE_LEAST_PIXELS <= out_pixels <= DENSE_MAX_PIXELS:
            return False
        if pixels_per_tap > DENSE_PIXELS_PER_TAP:
            return False
        blocks = dense_steps(spec, 64, 16, out_height, out_width, height, width) * 64 * 16
        return blocks <= DENSE_BLOCK_ELEMENTS_PER_PIXEL * pixels.batch * (height * width + out_pixels)

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """(samples, output pixels, input pixels a step): a [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] dot a
        channel and step. Steps of 16 input pixels keep T's block in few registers (RepLKNet's dw27 on 14 x 14
        in NCHW: 41.8% of its floor modelled, 35.0% at 32); 64 samples share each block of T (19.8% at 32).
        NCHW: 64 output pixels, which read x once for 64 of them (30.5% at 32), on 4 warps. channels_last: 8
        channels' [8, 64, 32] accumulators on 8 warps (64 registers a thread; [8, 64, 64] on 4 spilled 12 KB on
        a dw31 on 28 x 28), filled to the device by fewer samples a tile where the channels are few (filled).
        grad-weight: (samples a step, output columns a tile, output rows a tile), fitted to the map (fitted)."""
        if kind == "grad_weight":
            return KernelConfig(DOT_SIDES[0] if interpret else GRAD_WEIGHT_SAMPLES, 16, 16, num_warps=8, num_stages=1)
        if interpret:
            return KernelConfig(16, 16, 16, num_stages=1)
        if spec.layout == "nchw":
            return KernelConfig(64, 64, 16, num_warps=4, num_stages=1)
        return KernelConfig(64, 32, 16, num_warps=8, num_stages=1)

    def fitted(self, config: KernelConfig, spec: ConvSpec, kind: str, pixels: PixelSpace) -> KernelConfig:
        """Tiles no larger than the batch and the output map (powers of two, at least tl.dot's 16). The
        grad-weight: square tiles of PAIRS_SIDE output pixels a side paired with input tiles where they cover the
        map (pairs_tile), else tiles of 16 x 16 output pixels taken row by input row (the diagonal matrix grows as
        the square of the columns); GRAD_WEIGHT_SAMPLES a step in NCHW rows, half that otherwise."""
        if kind == "grad_weight":
            pairs = pixels.height <= PAIRS_SIDE and pixels.width <= PAIRS_SIDE
            side = PAIRS_SIDE if pairs else DOT_SIDES[0]
            most = GRAD_WEIGHT_SAMPLES if band_dot(spec) == "rows" and not pairs else GRAD_WEIGHT_SAMPLES // 2
            return replace(config, block_n=side, block_k=side,
                           block_m=min(most, pow2_between(pixels.batch, DOT_SIDES[0], 1 << 30)))
        pixel_tile = pow2_between(pixels.height * pixels.width, DOT_SIDES[0], 1 << 30)
        return replace(config, block_m=min(config.block_m, pow2_between(pixels.batch, DOT_SIDES[0], 1 << 30)),
                       block_n=min(config.block_n, pixel_tile), block_k=min(config.block_k, pixel_tile))

    def keeps_floor(self, config: KernelConfig, spec: ConvSpec) -> bool:
        """tl.dot's 16 rows and columns."""
        return config.block_m >= DOT_SIDES[0] and config.block_n >= DOT_SIDES[0]

    def groups_per_program(self, spec: ConvSpec, config: KernelConfig, kind: str) -> int:
        """A depthwise group is a channel: a 16-byte vector of them in channels_last (a quarter of one for the
        grad-weight), one in NCHW. Raises ValueError for a grad-weight tile that would hold more than
        GRAD_WEIGHT_HELD_ELEMENTS."""
        square = config.block_n == config.block_k == PAIRS_SIDE
        check(kind == "grad_weight" and (square or not pairs_tile(config) and config.block_k >= DOT_SIDES[0])
              or kind != "grad_weight" and min(config.block_n, config.block_k) >= DOT_SIDES[0],
              f"block_n={config.block_n}, block_k={config.block_k}: the depthwise_dense {kind} takes tiles of "
              f"{DOT_SIDES[0]} or more a side" + (f", or {PAIRS_SIDE} both (square tiles of output pixels paired "
                                                  "with input tiles)" if kind == "grad_weight" else ""), ValueError)
        if kind == "grad_weight":
            held = held_elements(spec, config)
            check(held <= GRAD_WEIGHT_HELD_ELEMENTS,
                  f"block_m={config.block_m}, block_n={config.block_n}, block_k={config.block_k}: a depthwise_dense "
                  f"grad-weight program would hold {held} elements a step (held_elements), past "
                  f"{GRAD_WEIGHT_HELD_ELEMENTS}; use fewer samples (block_m), output columns (block_n) or rows "
                  f"(block_k)", ValueError)
        return channel_tile(spec, kind)

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """(sample tiles x tiles of output pixels, channel tiles of ``packed`` channels); grad-weight: (channel
        tiles, splits of the batch)."""
        if kind == "grad_weight":
            return (cdiv(spec.out_channels, packed), splits)
        tiles = cdiv(pixels.batch, config.block_m) * cdiv(pixels.height * pixels.width, config.block_n)
        return (tiles, cdiv(spec.out_channels, packed))

    def reduction_units(self, spec: Optional[ConvSpec], config: KernelConfig, pixels: PixelSpace) -> int:
        """The grad-weight sums over samples (each step takes every output pixel of BLOCK_M of them)."""
        return pixels.batch

    def weight_layout(self, kind: str, weight_memory: str) -> str:
        """hwio: a tap's channels are one vector (the batched dot's gathers of T)."""
        return "hwio"

    def band_dot(self, spec: ConvSpec) -> str:
        """The banded kernel's dot by layout (depthwise_gemm.band_dot): batched over channels_last's channels,
        else a 2-D dot a channel."""
        return band_dot(spec)

    def tile_depth(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        return channel_tile(spec, kind)  # a [channels, block_m, block_n] accumulator

    def operand_bytes(self, config: KernelConfig, spec: ConvSpec) -> int:
        """num_stages x the channels x (the [block_m, block_k] x tile + T's [block_k, block_n] block)."""
        tile = config.block_m * config.block_k + config.block_k * config.block_n
        return config.num_stages * channel_tile(spec) * tile * ELEMENT_BYTES[spec.dtype]

    def requested(self, desc, problem, programs: int, arguments: dict):
        """Per (sample tile, channel) and step of each tile of output pixels: a [block_m, block_k] x tile and T's
        [block_k, block_n] block, each element of it a load of the weight; a dot of the two."""
        spec, config = problem.spec, desc.config
        if desc.kind == "grad_weight":
            return self._grad_weight_requested(desc, problem, arguments)
        m, n, k = config.block_m, config.block_n, config.block_k
        steps = dense_steps(spec, n, k, arguments["out_height"], arguments["out_width"], arguments["height"],
                            arguments["width"])
        packed = desc.groups_per_program
        channels = cdiv(arguments["batch"], m) * cdiv(spec.out_channels, packed) * packed
        loaded = channels * steps * (m * k + k * n) * ELEMENT_BYTES[spec.dtype]
        return loaded, channels * steps * 2 * m * n * k

    def _grad_weight_requested(self, desc, problem, arguments: dict):
        """Per channel and step of BLOCK_M samples, for each tile of BLOCK_K x BLOCK_N output pixels: the grad_out
        tile once, then the x it reaches (dense_grad_weight_steps): tiles of rows, for each tile of BLOCK_N input
        columns a [BLOCK_M, BLOCK_N] x tile of each input row, with a [BLOCK_K x BLOCK_N, BLOCK_M] x [BLOCK_M,
        BLOCK_N] dot and a [BLOCK_K, BLOCK_N x BLOCK_N] x [BLOCK_N x BLOCK_N, tap columns] one; square tiles, each
        input tile of the same shape with a dot of the two tiles and the two diagonal dots. The diagonal dots run
        on TF32 in half precision: counted twice, at half the rate of the 16-bit dot."""
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        out_height, out_width = arguments["out_height"], arguments["out_width"]
        steps = cdiv(arguments["batch"], m) * spec.out_channels
        inputs = dense_grad_weight_steps(spec, config, out_height, out_width, arguments["height"], arguments["width"])
        tile, columns = k * n, tap_columns(spec)
        if pairs_tile(config):  # an input tile: a dot of the two tiles, then E_w's and E_h's
            x_tile, products = tile * m, tile * m * tile
            diagonals = tile * tile * columns + tap_rows(spec) * tile * columns
        else:  # an input row: a dot of the tile with the row, then E's
            x_tile, products, diagonals = m * n, tile * m * n, k * n * n * columns
        loaded = steps * (cdiv(out_height, k) * cdiv(out_width, n) * tile * m + inputs * x_tile)
        diagonal_share = 2 if spec.dtype in ("float16", "bfloat16") else 1  # TF32: half the 16-bit rate
        flops = steps * inputs * 2 * (products + diagonal_share * diagonals)
        return loaded * ELEMENT_BYTES[spec.dtype], flops


def dense_grad_weight_steps(spec: ConvSpec, config: KernelConfig, out_height: int, out_width: int, height: int,
                            width: int) -> int:
    """The input a grad-weight program loads for each step of samples, in x tiles: over its tiles of output rows
    and columns, the input rows of each tile's reach (square tiles: its tiles of input rows) times its tiles of
    input columns."""
    k, n = config.block_k, config.block_n
    per_row = 1 if not pairs_tile(config) else k
    row_steps = sum(cdiv(max(0, end - first), per_row) for first, end in (
        reached_range(spec, 0, start, k, out_height, height) for start in range(0, out_height, k)))
    column_tiles = sum(cdiv(max(0, end - first), n) for first, end in (
        reached_range(spec, 1, start, n, out_width, width) for start in range(0, out_width, n)))
    return row_steps * column_tiles


def reached_range(spec: ConvSpec, axis: int, start: int, block: int, out_extent: int, extent: int) -> tuple[int, int]:
    """The input rows (axis 0) or columns (1) [first, end) that the windows of output rows or columns
    [start, start + block) reach, as the grad-weight template computes them."""
    stride, dilation, before = spec.stride[axis], spec.dilation[axis], spec.padding[2 * axis]
    last = min(start + block, out_extent) - 1
    reach = (spec.kernel_size[axis] - 1) * dilation + 1
    return max(start * stride - before, 0), min(last * stride - before + reach, extent)
