"""The banded depthwise family (templates/depthwise_gemm.py.jinja): a depthwise conv as a product of input
rows with Toeplitz band matrices built from the weight in registers, on tensor cores; it wastes the band's
zeros but outruns FMAs once the window is wide. Its weight gradient
(depthwise_gemm_grad_weight.py.jinja) reads the band the other way: grad_out strips times input bands, on
tensor cores, summed along the diagonals that are the taps."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ...ir import ConvSpec
from ..tiles import (DEFAULT_SHARED_MEMORY_BYTES, ELEMENT_BYTES, H200_SMS, KernelConfig, PixelSpace, cdiv,
                     in_bounds, pow2_between)
from .base import Family
from .igemm import DOT_SIDES
from .igemm_rows import open_rows, row_phases

WIDE_DEPTHWISE_TAPS = 49  # kh * kw from which half-precision depthwise runs on tensor cores by default
ROW_TAPS = 4  # a height-1 window past this many taps runs on tensor cores in half precision
# grad-weight: fp32 accumulator registers a thread may give the kernel rows of a pass: a 2-D dot's ("rows") and
# a dot batched over channels ("channels", whose mma.sync operands take more registers beside them)
ACCUMULATOR_REGISTERS = {"rows": 64, "channels": 48}
# ... and in columns of strips (strip_columns), where one input tile serves every kernel row of a pass and each row
# adds only its rotated grad_out operand: a batched dot's accumulators may take 80 (EfficientNet's dw5 at 8
# channels and ConvNeXt's dw7 at 4: every kernel row in one pass; RepLKNet's dw31 at 4: 6 rows a pass, where 8
# spilled 512 B on Triton 3.6)
COLUMNS_ACCUMULATOR_REGISTERS = 80
# ... and for a height-1 window's batched dot (conv1d in channels_last), whose one kernel row is the whole pass:
# 4 channels of 32-column strips at k128 (193 registers; 248 on Triton 3.6, no spill; in pieces now, or on flat
# tiles where dilated or strided)
ROW_WINDOW_ACCUMULATOR_REGISTERS = 80
# a height-1 grad-weight window of at most this many columns takes 32-column strips in channels_last, wider ones
# 16 (causal k256 at 32 columns spilled 1.7 KB on Triton 3.6, at 1 or 2 channels; 0 on 3.9 at 2), where it does not
# take pieces (strip_pieces: at stride 1 without dilation past PIECES_WINDOW)
WIDE_STRIP_WINDOW = 128
MIN_GRAD_WEIGHT_ROW = 7  # grad-weight output rows narrower than this take the direct kernel by default
MIN_FLOAT32_GRAD_WEIGHT_ROW = 8  # ... in float32 (ConvNeXt's dw7 at 7 x 7: 2.7% of its floor here, 4.0% direct)
FLOAT32_GRAD_WEIGHT_TAPS = (3, 64)  # float32 grad-weight windows the band takes by default (grad_weight_rank)
# One row's strips (strip_rows) for windows of at most this many columns, each band step's tile gathered from a
# main tile or a halo tile of fewer strips past it. Up to twice as wide (cuDNN's 256 columns), a strip's band steps
# take one gather each from a wide tile, the main tile's strips and as many again (Family.halo): two gathers and a
# select a step cost more instructions than re-reading each step's tile (causal conv1d, NCHW / channels_last, % of
# the floor modelled, strips -> flat: k192 35.3 / 20.4 -> 39.6 / 23.8; k256 27.3 / 16.0 -> 33.2 / 19.1), one
# gather fewer (k256 on the wide tile: 45.6 / 40.5). Wider windows take flat tiles, each band step loading its own.
STRIP_WINDOW = 128
# A height-1 grad-weight window wider than this many columns, at stride 1 without dilation, takes one row's strips
# in pieces (strip_pieces)
PIECES_WINDOW = 32
PIECES_ACCUMULATOR_REGISTERS = 64  # ... whose accumulators take at most this many fp32 registers a thread
KERNEL_ROWS_AT_ONCE = 4  # and at most this many rows: each row's dots keep operands in registers beside them
COLUMNS_ROWS_AT_ONCE = 8  # in columns of strips (RepLKNet's dw31 at 16 rows a pass spilled 8 B in NCHW)
COLUMN_KERNEL_ROWS = 16  # channels_last forward windows of this many rows or more take tiles of one column's rows
COLUMN_ROWS = 32  # ... of this many rows at least
SLIDING_OPEN_ROWS = 7  # forward windows of at most this many open rows (igemm_rows.open_rows) slide down them
# ... in blocks of this many output rows at most: a block steps through the window's reach past its rows too, so
# taller blocks waste fewer steps (ConvNeXt's dw7 at 56 rows: 48.7% of its floor modelled in channels_last and
# 41.9% in NCHW at 16, 57.3 and 51.7 at 32, 47.1 and 56.5 at 64; EfficientNet's dw5 in NCHW 50.1, 60.0, 60.0)
SLIDING_ROWS = 32
SLIDING_BAND_BLOCKS = 15  # ... holding at most this many band blocks (kernel rows x band steps)
NARROW_BAND_COLUMNS = 3  # ... and NCHW windows of at most this many columns slide in strips of 32 columns
SLIDING_LEAST_PROGRAMS = H200_SMS // 4  # ... in grids of this many programs, where a flat one would have more


def is_wide_window(spec: ConvSpec) -> bool:
    """Whether half precision runs on the band by default. Direct costs 2 * kh * kw flop per output element
    against about 4 bytes moved in half precision, so from kh * kw = 49 (k7) it is bound by the CUDA cores' FMA
    rate rather than by memory, and the banded form is the default for float16 and bfloat16 (in float32 and
    float64 a dot is no faster than FMAs, so the band's waste would only cost). A height-1 window (conv1d) goes
    there past ROW_TAPS: depthwise1d forms each tap with gathers, about 32 sm_90 instructions an output at k4 but
    about 130 at k8, where a copy's pace allows about 27, while the band's rows are strips along the length (a
    few wasted FLOPs a tap, on tensor cores). So does every window the band's forward takes sliding down the rows
    (sliding_rows), which reads each input row once and builds its band blocks once a program: MobileNetV2's dw3
    at 80.0% of its floor modelled in channels_last (36.7% direct), 55.1% in NCHW (30.5% on depthwise1d);
    EfficientNet's dw5 68.1 / 50.1% (15.3 / 14.3); at stride 2, MobileNetV2's dw3 81.4 / 69.8% (37.4 / 53.8)."""
    kernel_h, kernel_w = spec.kernel_size
    return spec.dtype in ("float16", "bfloat16") and (kernel_h * kernel_w >= WIDE_DEPTHWISE_TAPS
                                                       or (kernel_h == 1 and kernel_w > ROW_TAPS)
                                                       or sliding_rows(spec, "forward"))


def band_dot(spec: ConvSpec) -> str:
    """The banded dot for ``spec``'s layout. "channels" (channels_last): the input tile holds BLOCK_N
    channels, the contiguous axis, for 16-byte loads, so the dot is batched over them (3-D: mma.sync on
    sm_90). "rows" (NCHW, strided): a program takes its channels one at a time, a 2-D [rows, band] x
    [band, strip] dot each (wgmma on sm_90), its rows lying along the width."""
    return "channels" if spec.layout == "nhwc" else "rows"


def band_operand_bytes(config: KernelConfig, spec: ConvSpec) -> int:
    """Shared memory the banded operands of ``config`` take: num_stages x the channels in flight (block_n
    when the dot is batched over channels, else 1) x (the [block_m, block_k] input tile + the
    [block_k, block_k] band)."""
    tile = config.block_m * config.block_k + config.block_k * config.block_k
    channels = config.block_n if band_dot(spec) == "channels" else 1
    return config.num_stages * channels * tile * ELEMENT_BYTES[spec.dtype]


def strip_rows(spec: ConvSpec, kind: str) -> bool:
    """Whether the forward kernel's tile is consecutive strips of one output row ("strips" in the template),
    which lets it load its input once and gather each band step's tile from registers: a height-1 window (a
    1-D conv's, whose rows are long) of at most 2 x STRIP_WINDOW columns at stride 1 (past STRIP_WINDOW on the
    wide tile, wide_strips), where band step s of strip i reads what step 0 of strip i + s reads. Other windows
    take strips of any rows ("flat"): a 2-D map's rows are a few strips long, at stride s a step's tile is not
    another strip's, and past 2 x STRIP_WINDOW the gathers cost more than the loads they save."""
    return (kind == "forward" and spec.kernel_size[0] == 1 and spec.stride[1] == 1
            and window_width(spec) <= 2 * STRIP_WINDOW)


def wide_strips(spec: ConvSpec, kind: str) -> bool:
    """Whether one row's strips (strip_rows) take a halo tile at least as long as the main tile (Family.halo): a
    window past STRIP_WINDOW columns. The template loads a halo tile exactly as long as the main tile with it, as
    one wide tile, and takes each band step's tile in one gather from it (whatever the window: a short window's
    halo tile is that long where an element a thread needs it); a longer halo tile (band steps that reach past
    the main tile's strips) stays apart."""
    return strip_rows(spec, kind) and window_width(spec) > STRIP_WINDOW


def window_width(spec: ConvSpec) -> int:
    """The input columns one output column's window spans: (kernel_w - 1) x dilation_w + 1."""
    return (spec.kernel_size[1] - 1) * spec.dilation[1] + 1


def column_rows(spec: ConvSpec, kind: str, config: KernelConfig) -> bool:
    """Whether the forward kernel's tile is BLOCK_M consecutive output rows of one column of strips ("columns"
    in the template), which lets it load each band step's input once for every kernel row and gather each
    kernel row's tile from registers: a channels_last window of at least COLUMN_KERNEL_ROWS rows at stride 1
    along the height, where kernel row r of output row i reads what kernel row 0 of output row i + r x
    dilation_h reads. Otherwise ("flat") every kernel row and band step loads its own input tile: RepLKNet's
    dw31 requested 38x the ideal bytes (6.9% of its floor modelled; 11.6% in columns, bound by the gathers'
    instructions). Shorter windows and NCHW's one-channel dots gain less from the loads than the gathers cost
    (ConvNeXt's dw7: 11.1% flat, 7.6% in columns; RepLKNet's dw31 in NCHW 7.2% flat, 5.0%), and so do tiles
    of fewer than COLUMN_ROWS rows (RepLKNet's dw27 on 14 rows: 3.0% flat, 2.5% in columns of 16): a map
    that short takes the flat tile (fitted)."""
    return (kind == "forward" and spec.kernel_size[0] >= COLUMN_KERNEL_ROWS and spec.stride[0] == 1
            and band_dot(spec) == "channels" and config.block_m >= COLUMN_ROWS)


def sliding_rows(spec: ConvSpec, kind: str, config: Optional[KernelConfig] = None,
                 pixels: Optional[PixelSpace] = None) -> bool:
    """Whether the forward kernel's tile is BLOCK_M (batch, block of up to SLIDING_ROWS output rows, strip)
    triples that slide down their rows ("sliding" in the template), loading each input row once for every kernel
    row and holding every band block through the rows: a window taller than one row whose open rows
    (igemm_rows.open_rows, an accumulator each) are at most SLIDING_OPEN_ROWS and whose band blocks (kernel rows
    x band steps) at most SLIDING_BAND_BLOCKS (ConvNeXt's dw7: 14, at 216-246 registers); at a stride along the
    height a step reads an input row of each phase of the stride some kernel row reads, as igemm_rows does. The
    flat tile loads an input tile and builds a band block for every kernel row and band step of every tile
    (ConvNeXt's dw7: 9.0x the ideal bytes, 11.1% of its floor modelled in channels_last; sliding, 1.7x and
    48.7%, bound by mma.sync's FLOPs). Taller or wider windows take the flat tile or columns (column_rows).
    With the launch's ``pixels`` (and the ``config``): the flat tile where its grid has SLIDING_LEAST_PROGRAMS
    programs or more and the sliding grid fewer. Each sliding program steps through a block's rows and the
    window's reach one after another, where a flat program takes a tile of rows: on a small batch the flat tile
    keeps more of the device busy (ConvNeXt's dw7 at batch 1 in channels_last: 12 sliding programs, 4.6% of the
    floor modelled; 168 flat ones, 10.6%). A quarter of the SMs busy is enough for sliding to win: in NCHW the
    same layer's 96 sliding programs model 36.8% against the flat tile's 8.9%."""
    held = spec.kernel_size[0] * band_steps(spec, DOT_SIDES[0], 0)  # band blocks held, at the narrowest strip
    if not (kind == "forward" and spec.kernel_size[0] > 1 and open_rows(spec) <= SLIDING_OPEN_ROWS
            and held <= SLIDING_BAND_BLOCKS):
        return False
    if pixels is None or config is None:
        return True
    channel_tiles = cdiv(spec.out_channels, config.block_n)
    sliding = sliding_tiles(config, pixels) * channel_tiles
    flat = cdiv(pixels.rows * cdiv(pixels.width, config.block_k), config.block_m) * channel_tiles
    return sliding >= SLIDING_LEAST_PROGRAMS or flat < SLIDING_LEAST_PROGRAMS


def sliding_tiles(config: KernelConfig, pixels: PixelSpace, height: Optional[int] = None,
                  most: int = SLIDING_ROWS) -> int:
    """The tiles of BLOCK_M (batch, block of rows, strip) triples of a sliding forward over ``pixels``; with
    ``height`` and ``most``, of a tile sliding down that many rows (the banded grad-input's row groups) in
    blocks of at most ``most``."""
    height = pixels.height if height is None else height
    strips = cdiv(pixels.width, config.block_k)
    rows = sliding_block_rows(height, pixels.batch * strips, config.block_m, most)
    return cdiv(pixels.batch * cdiv(height, rows) * strips, config.block_m)


def grad_input_block_groups(spec: ConvSpec) -> int:
    """The most row groups a block of a banded grad-input takes: SLIDING_ROWS grad_x rows."""
    return max(1, SLIDING_ROWS // spec.stride[0])


def sliding_block_rows(out_height: int, pairs: int, block_m: int, most: int = SLIDING_ROWS) -> int:
    """The output rows of a block of a sliding forward (sliding_rows), as its template splits the height: evenly
    into blocks of at most SLIDING_ROWS rows, or into more where that many blocks of the launch's ``pairs``
    (batch, strip) pairs would leave a tile of ``block_m`` triples part empty: as many as fill one, up to a
    block a row (ConvNeXt's dw7 on a 7 x 7 map at batch 1: one pair; 16-row blocks modelled 4.6% of its floor,
    blocks of a row as many as the flat tile)."""
    blocks = min(out_height, max(cdiv(out_height, most), cdiv(block_m, pairs)))
    return cdiv(out_height, blocks)


def strided_grad_input(spec: ConvSpec) -> bool:
    """Whether the banded grad-input kernel (depthwise_gemm_grad_input.py.jinja) computes ``spec``'s input
    gradient: a depthwise conv of one output a channel at a stride (at stride 1 the input gradient is the forward
    of the transposed conv, plan.transposed_conv), along the width a power of two up to 16 (its strips of
    BLOCK_K >= 16 columns start BLOCK_K / stride_w grad_out columns apart), holding at most SLIDING_OPEN_ROWS
    open rows (grad_input_slots) and SLIDING_BAND_BLOCKS band blocks (kernel rows x band steps at 16-column
    strips, in NCHW with each band starting on a 16-byte vector, the most its rows can be aligned to)."""
    stride_w = spec.stride[1]
    if not (spec.is_depthwise and spec.out_channels == spec.in_channels and spec.stride != (1, 1)
            and stride_w <= 16 and stride_w & (stride_w - 1) == 0):
        return False
    vector = 16 // ELEMENT_BYTES[spec.dtype] if band_dot(spec) == "rows" else 1
    span = grad_input_span(spec, DOT_SIDES[0], grad_input_alignment(spec, vector))
    held = spec.kernel_size[0] * cdiv(span, DOT_SIDES[0])
    return grad_input_slots(spec) <= SLIDING_OPEN_ROWS and held <= SLIDING_BAND_BLOCKS


def grad_input_slots(spec: ConvSpec) -> int:
    """The open grad_x rows of the banded grad-input, an accumulator each: the window's reach and its first row,
    or a row group (stride_h rows) where that is more."""
    return max(row_reach(spec) + 1, spec.stride[0])


def grad_input_lead(spec: ConvSpec, alignment: int) -> int:
    """The grad_out columns a banded grad-input strip reads before its first grad_x column's (over stride_w):
    how far back the window reaches, rounded up to a multiple of ``alignment`` (the template's lead)."""
    return cdiv((window_width(spec) - 1 - spec.padding[2]) // spec.stride[1], alignment) * alignment


def grad_input_span(spec: ConvSpec, block_k: int, alignment: int) -> int:
    """The grad_out columns a banded grad-input strip of block_k grad_x columns reads (the template's SPAN)."""
    return (block_k - 1 + spec.padding[2]) // spec.stride[1] + grad_input_lead(spec, alignment) + 1


def grad_input_alignment(spec: ConvSpec, row_alignment: int) -> int:
    """What the banded grad-input's bands start on: the launch's row alignment, at most 16 / stride_w (strips
    start a multiple of that many grad_out columns apart)."""
    return min(row_alignment, 16 // spec.stride[1])


def grad_input_groups(spec: ConvSpec, height: int) -> int:
    """The row groups of a banded grad-input over grad_x's ``height`` rows: group g is the stride_h rows from
    g x stride_h - pad_top, from the group holding row 0 to the one holding the last."""
    stride_h, pad_top = spec.stride[0], spec.padding[0]
    return (height - 1 + pad_top) // stride_h - pad_top // stride_h + 1


def strip_columns(spec: ConvSpec, kind: str, config: KernelConfig) -> bool:
    """Whether the grad-weight tile is BLOCK_M consecutive input rows of one column of strips ("columns" in the
    template), which lets a pass load its input once for every kernel row: a window taller than one row, where
    kernel row r of output row i reads input row i x stride_h + r x dilation_h, and a tile of at least twice
    the window's reach (row_reach). Otherwise each kernel row loads its own input tiles (kernel_h times the
    input)."""
    return kind == "grad_weight" and spec.kernel_size[0] > 1 and config.block_m >= 2 * row_reach(spec)


def strip_pieces(spec: ConvSpec, kind: str, config: KernelConfig) -> bool:
    """Whether the grad-weight tile is BLOCK_M consecutive strips of one output row, its input band cut into
    pieces of BLOCK_K columns ("pieces" in the template): a height-1 window wider than PIECES_WINDOW columns at
    stride 1 without dilation, whose pieces (piece_count, at any band_shift) are at most BLOCK_M, so that the wide
    tile of 2 x BLOCK_M strips holds the step's and the pieces' reach past them with its last strip to spare
    (never loaded: a strip past the row's end reads it). Piece p of strip i's band is the input strip i + p, so a
    step loads its input once and takes each piece's tile in one gather from it; the flat tile's band of main and
    halo tiles re-reads every input column for each strip whose band holds it (causal k256: 17 times)."""
    return (kind == "grad_weight" and spec.kernel_size[0] == 1 and spec.stride[1] == 1 and spec.dilation[1] == 1
            and window_width(spec) > PIECES_WINDOW
            and piece_count(spec, config.block_k, config.block_k - 1) <= config.block_m)


def piece_count(spec: ConvSpec, block_k: int, band_shift: int) -> int:
    """The pieces of block_k columns that cover a strip's input band (strip_pieces): band_shift columns read early,
    then (block_k - 1) + the window's width columns."""
    return cdiv(band_shift + block_k - 1 + window_width(spec), block_k)


def column_step_rows(spec: ConvSpec, config: KernelConfig) -> int:
    """The output rows of a step of BLOCK_M input rows in columns of strips: (BLOCK_M - row_reach) // stride_h,
    the most whose windows the tile holds, and few enough that the rows the template's rotation wraps around
    are past them."""
    return (config.block_m - row_reach(spec)) // spec.stride[0]


def row_reach(spec: ConvSpec) -> int:
    """The input rows a window reads past its first: (kernel_h - 1) x dilation_h."""
    return (spec.kernel_size[0] - 1) * spec.dilation[0]


def band_segment(spec: ConvSpec, block_k: int) -> int:
    """The weight offsets a band block is gathered from (the template's SEGMENT): block_k x the least power of two
    past stride_w, which holds its block_k + (block_k - 1) x stride_w offsets."""
    return block_k * 2 ** spec.stride[1].bit_length()


def band_steps(spec: ConvSpec, block_k: int, band_shift: int) -> int:
    """How many [block_k, block_k] band matrices cover the input band of one strip of block_k output
    columns: band_shift columns read early (KernelDesc.band_shift), then (block_k - 1) x stride + the
    window's width columns, in block_k steps."""
    return -(-(band_shift + (block_k - 1) * spec.stride[1] + window_width(spec)) // block_k)


def kernel_rows_at_once(spec: ConvSpec, config: KernelConfig, halo_tile: int) -> int:
    """The kernel rows a grad-weight pass holds (KernelDesc.tap_tile), so that one grad_out tile serves them
    all: as many as its accumulator budget allows, each [channels in flight, block_k, main tile + halo_tile]
    accumulators (two registers each in float64), up to KERNEL_ROWS_AT_ONCE (RepLKNet's k27 on a 14 x 14 map
    took all 27 rows at 16-column strips and spilled 208 B), COLUMNS_ROWS_AT_ONCE in columns of strips (whose
    rows load no input tiles of their own); then the fewest rows a pass that keeps that many passes (k7 at 5 a
    pass: 4 + 3)."""
    cap = COLUMNS_ROWS_AT_ONCE if strip_columns(spec, "grad_weight", config) else KERNEL_ROWS_AT_ONCE
    at_once = max(1, min(cap, accumulator_budget(spec, config) // row_accumulators(spec, config, halo_tile)))
    kernel_h = spec.kernel_size[0]
    return cdiv(kernel_h, cdiv(kernel_h, at_once))


def row_accumulators(spec: ConvSpec, config: KernelConfig, halo_tile: int) -> int:
    """Accumulator registers of one kernel row of a grad-weight pass: [channels in flight, block_k, main tile +
    halo_tile], two registers each in float64."""
    channels = config.block_n if band_dot(spec) == "channels" else 1
    registers = 2 if spec.dtype == "float64" else 1
    if strip_pieces(spec, "grad_weight", config):  # [channels, block_k, block_k] a piece, at the most pieces
        pieces = piece_count(spec, config.block_k, config.block_k - 1)
        return config.block_n * pieces * config.block_k * config.block_k * registers
    return channels * config.block_k * (grad_weight_main(spec, config.block_k) + halo_tile) * registers


def accumulator_budget(spec: ConvSpec, config: KernelConfig) -> int:
    """ACCUMULATOR_REGISTERS (COLUMNS_ACCUMULATOR_REGISTERS for a batched dot in columns of strips,
    ROW_WINDOW_ACCUMULATOR_REGISTERS for one of a height-1 window) of every thread of ``config``."""
    dot = band_dot(spec)
    if dot == "channels" and spec.kernel_size[0] == 1:
        return ROW_WINDOW_ACCUMULATOR_REGISTERS * 32 * config.num_warps
    columns = dot == "channels" and strip_columns(spec, "grad_weight", config)
    return (COLUMNS_ACCUMULATOR_REGISTERS if columns else ACCUMULATOR_REGISTERS[dot]) * 32 * config.num_warps


def grad_weight_main(spec: ConvSpec, block_k: int) -> int:
    """A grad-weight strip's main input tile: its block_k x stride columns, rounded up to a power of two."""
    return block_k * (1 << (spec.stride[1] - 1).bit_length())


def grad_weight_halo(spec: ConvSpec, block_k: int, band_shift: int) -> int:
    """Input columns a grad-weight strip of block_k outputs reads past its main tile (0: none): it reads
    band_shift + (block_k - 1) x stride + the window's width columns from its main tile (grad_weight_main) on."""
    return max(0, band_shift + (block_k - 1) * spec.stride[1] + window_width(spec) - grad_weight_main(spec, block_k))


class DepthwiseGemm(Family):
    name = "depthwise_gemm"
    templates = {"forward": "depthwise_gemm.py.jinja", "grad_input": "depthwise_gemm_grad_input.py.jinja",
                 "grad_weight": "depthwise_gemm_grad_weight.py.jinja"}
    limits = {"block_m": DOT_SIDES, "block_n": (1, 64), "block_k": DOT_SIDES}

    def rank(self, spec: ConvSpec) -> Optional[int]:
        """Every depthwise conv; the default for wide half-precision windows (is_wide_window)."""
        if not spec.is_depthwise:
            return None
        return 0 if is_wide_window(spec) else 2

    def grad_input_rank(self, spec: ConvSpec) -> Optional[int]:
        """Depthwise convs at a stride (strided_grad_input); the default in half precision, where the direct
        kernel's FMAs gather every tap of every phase: MobileNetV2's dw3 at stride 2 modelled 30.5% of its floor
        in channels_last and 17.4% in NCHW there, issue-bound on its index arithmetic."""
        if not strided_grad_input(spec):
            return None
        return 0 if spec.dtype in ("float16", "bfloat16") else 2

    def grad_weight_rank(self, spec: ConvSpec) -> Optional[int]:
        """Every depthwise conv; the default in half precision, where the tensor cores take the products, and in
        float32 NCHW at stride 1 for windows of FLOAT32_GRAD_WEIGHT_TAPS taps. A float32 dot is no faster than
        the direct kernel's FMAs (TF32 where torch allows it), but the direct kernel's loop is issue-bound
        there: at batch 64 the band modelled MobileNetV2's dw3 24.2% of its floor against 6.3%, EfficientNet's
        dw5 15.3 against 7.1, ConvNeXt's dw7 12.7 against 4.0, Mamba's k4 50.1 against 40.0, a causal k64 35.8
        against 3.1. Outside that it spilled (stride 2: 956 B on MobileNetV2's dw3; RepLKNet's dw31 1272 B, a
        causal k256 56 B; channels_last 3-20 KB) or modelled worse (a causal k2: 49.1 against 64.6); float64
        stays direct."""
        if not spec.is_depthwise:
            return None
        kernel_h, kernel_w = spec.kernel_size
        float32_band = (spec.dtype == "float32" and spec.layout == "nchw" and spec.stride == (1, 1)
                        and FLOAT32_GRAD_WEIGHT_TAPS[0] <= kernel_h * kernel_w <= FLOAT32_GRAD_WEIGHT_TAPS[1])
        return 0 if spec.dtype in ("float16", "bfloat16") or float32_band else 2

    def suits(self, spec: ConvSpec, kind: str, pixels: PixelSpace) -> bool:
        """grad-weight: output rows of at least MIN_GRAD_WEIGHT_ROW columns, so a strip (16 at the least) is
        near half full or more. A one-token row modelled 0.2-0.4% of its floor against the direct kernel's
        2.3-3.7%; the last stages' 7 x 7 maps (ConvNeXt's dw7, MobileNetV2's dw3, EfficientNet's dw5 at batch
        64) model 6.9-12.8% here against 2.1-9.9% on the direct kernel; 4 to 6 columns are mixed (dw3 in
        channels_last: 6.4-9.2% here, 10.0-11.5% there); in float32 from MIN_FLOAT32_GRAD_WEIGHT_ROW."""
        least = MIN_FLOAT32_GRAD_WEIGHT_ROW if spec.dtype == "float32" else MIN_GRAD_WEIGHT_ROW
        return kind != "grad_weight" or pixels.width >= least

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """(output rows, channels, column strip); accumulators: block_n x block_m x block_k.
        grad-weight: (strips a step, channels, strip)."""
        if kind == "grad_weight":
            return self._grad_weight_config(spec, interpret)
        if interpret:
            return KernelConfig(32, pow2_between(spec.out_channels, 1, 16), 16, num_stages=1)
        if kind == "grad_input":
            return self._grad_input_config(spec)
        strip = 16 if spec.kernel_size[1] <= 16 else 32  # a band of two 16-column strips covers k <= 17
        if band_dot(spec) == "rows" and strip_rows(spec, kind):
            # one row's strips of 16 columns on 4 warps: on 8 the gathers of each band step's tile cost more
            # instructions than the copy's pace allows (causal k8 modelled 47% of its floor on 8 warps, 96% on 4)
            return KernelConfig(128, 1, 16, num_warps=4, num_stages=3)
        if band_dot(spec) == "rows" and sliding_rows(spec, kind):
            # on 4 warps, one stage (ConvNeXt's dw7 at 64 triples: 44.8% of its floor modelled, 34.7 at 128 on 8
            # warps, 128 on 4 spilled 328 B). A window of up to NARROW_BAND_COLUMNS columns takes 64 triples in
            # strips of 32: each strip's band starts band_shift columns early, on an aligned one, and its second
            # band step reads whole vectors, a share of the input that a wider strip halves (MobileNetV2's dw3:
            # 1.8x the ideal bytes, 55.1%, at 16; 1.5x, 67.2%, at 32; at stride 2 69.8 -> 76.3). Wider windows'
            # band FLOPs and registers grow more (ConvNeXt's dw7 in strips of 32: 41.0% and 232 B spilled):
            # strips of 16, in 32 triples, whose programs issue half the instructions (in blocks of 32 rows,
            # EfficientNet's dw5 60.0 -> 67.0%, ConvNeXt's dw7 51.7 -> 52.5, at 768 channels on 7 x 7 10.6 -> 18.9)
            narrow = window_width(spec) <= NARROW_BAND_COLUMNS
            return KernelConfig(64 if narrow else 32, 1, 32 if narrow else strip, num_warps=4, num_stages=1)
        if band_dot(spec) == "rows":  # one channel's 2-D dot: 128 rows on 8 warps (wgmma, no spills at k7 and k31)
            # a height-1 window on flat tiles (past 2 x STRIP_WINDOW, or strided) in strips of 64 columns: each
            # band step re-reads its input tile, and wider strips take fewer steps (causal k256 on flat tiles: 19.9%
            # of its floor modelled at 32, 33.2% at 64; RepLKNet's dw31 on 56-wide rows keeps 32: 7.2%, 6.1% at 64)
            strip = 64 if spec.kernel_size[0] == 1 and window_width(spec) > STRIP_WINDOW else strip
            config = KernelConfig(128, 1, strip, num_warps=8, num_stages=3)
            while config.num_stages > 1 and band_operand_bytes(config, spec) > DEFAULT_SHARED_MEMORY_BYTES:
                config = replace(config, num_stages=config.num_stages - 1)  # float64 tiles are larger
            return config
        # channels_last: 8 channels for 16-byte loads; 8 warps hold the batched dot without spilling at k7 and k31,
        # and one row's strips up to STRIP_WINDOW, 5 band steps unrolled (causal k128: 186 registers, 66.3% of its
        # floor modelled; 30.1% at 4 channels), and on the wide tile up to twice that (causal k256: 9 band steps,
        # 255 registers and no spill on Triton 3.9 and 3.6, 40.5%; 28.6% in tiles of 16 strips)
        channels = 8
        if sliding_rows(spec, kind) and spec.out_channels % 8:
            # channel rows that are not whole 16-byte vectors load in narrower pieces: 4 channels, twice the
            # programs (ShuffleNetV2's 116 channels, 14 x 14 at batch 64: 8 kept 30 sliding programs, too few, and
            # the flat tile modelled 11.1% of its floor; 4 channels, sliding, 38.0%; direct before, 19.7%)
            channels = 4
        config = KernelConfig(32, pow2_between(spec.out_channels, 1, channels), strip, num_warps=8)
        while config.block_n > 1 and band_operand_bytes(config, spec) > DEFAULT_SHARED_MEMORY_BYTES:
            config = replace(config, block_n=config.block_n // 2)  # float32 and float64 tiles are larger
        return config

    def _grad_input_config(self, spec: ConvSpec) -> KernelConfig:
        """The sliding forward's tiles (strided_grad_input slides as it does): NCHW 64 triples of one channel on
        4 warps in strips of 32 columns, whose band's aligned start costs a smaller share of its grad_out reads
        (at stride 2, MobileNetV2's dw3 79.8% of its floor modelled, 75.5% in strips of 16; EfficientNet's dw5
        73.1 and 71.0); channels_last 32 triples of 8 channels (4 where rows are not whole 16-byte vectors) on 8
        warps in strips of 16 (90.0% and 82.8%; 88.0 and 71.0 in strips of 32)."""
        if band_dot(spec) == "rows":
            return KernelConfig(64, 1, 32, num_warps=4, num_stages=1)
        channels = 8 if spec.out_channels % 8 == 0 else 4
        return KernelConfig(32, pow2_between(spec.out_channels, 1, channels), 16, num_warps=8, num_stages=1)

    def _grad_weight_config(self, spec: ConvSpec, interpret: bool) -> KernelConfig:
        """NCHW: one channel at a time, 64 strips a step on 8 warps; strips of 64 columns (narrower maps:
        fitted), of 16 in columns of strips (strip_columns: ConvNeXt's dw7 modelled 22% of its floor at 64, whose
        accumulators take 3 kernel rows a pass, and 51% at 16, all 7 rows in one pass).
        channels_last: 8 channels (16-byte loads) of 16-column strips batched, one stage (two made ptxas spill
        on Mamba's k4 at 64 registers and RepLKNet's k31 at 255, for the same modelled time), 32 strips a step;
        in columns of strips 64 rows a step (ConvNeXt's dw7 at 56 x 56: 58 output rows a step against 26 at 32),
        and 4 channels where 8 would not take every kernel row in one pass (dw7: 48% against 25% in two passes);
        a height-1 window 4 channels of 32-column strips (16 past WIDE_STRIP_WINDOW), 16 strips a step, where it
        does not take pieces: a height-1 window wider than PIECES_WINDOW at stride 1 without dilation takes one
        row's strips in pieces, in either layout (_pieces_config).
        Accumulators per kernel row: channels x strip x (strip x stride + halo) fp32."""
        if interpret:
            return KernelConfig(32, pow2_between(spec.out_channels, 1, 4), 16, num_stages=1)
        pieces = KernelConfig(32, pow2_between(spec.out_channels, 1, 4), 16, num_warps=4, num_stages=1)
        if strip_pieces(spec, "grad_weight", pieces):
            return self._pieces_config(spec, pieces)
        columns = strip_columns(spec, "grad_weight", KernelConfig(64, 1, 16))
        if band_dot(spec) == "rows":
            config = KernelConfig(64, 1, 16 if columns else 64, num_warps=8, num_stages=2)
            while config.block_k > DOT_SIDES[0] and self._row_accumulators(config, spec) > accumulator_budget(spec, config):
                config = replace(config, block_k=config.block_k // 2)  # a wide window's halo (causal k256)
            return config
        if spec.kernel_size[0] == 1:
            # a height-1 window: 4 channels of 32-column strips, 16 strips a step, so each input column is read
            # (32 + halo) / 32 times, not (16 + halo) / 16 (% of the floor modelled in channels_last, 8 or fewer
            # channels of 16-column strips -> this: Mamba's k4 66.7 -> 80.0, causal k16 64.6 -> 80.0, k64 32.3 ->
            # 50.0, k128 20.0 -> 33.4); past WIDE_STRIP_WINDOW columns 16-column strips (causal k256: 8.6 -> 11.2)
            strip = 32 if window_width(spec) <= WIDE_STRIP_WINDOW else 16
            config = KernelConfig(16, pow2_between(spec.out_channels, 1, 4), strip, num_warps=8, num_stages=1)
        else:
            # channel rows that are not whole 16-byte vectors (ShuffleNet's 116) load element by element, and 8
            # channels' element loads spilled 40 B: 4 channels then
            channels = 8 if spec.out_channels % 8 == 0 else 4
            config = KernelConfig(64 if columns else 32, pow2_between(spec.out_channels, 1, channels), 16,
                                  num_warps=8, num_stages=1)
        if columns and spec.kernel_size[0] * self._row_accumulators(config, spec) > accumulator_budget(spec, config):
            config = replace(config, block_n=min(config.block_n, 4))
        while config.block_n > 1 and self._row_accumulators(config, spec) > accumulator_budget(spec, config):
            config = replace(config, block_n=config.block_n // 2)  # a wide window's halo (causal k256)
        narrow = replace(config, num_warps=4)
        one_pass = spec.kernel_size[0] * self._row_accumulators(narrow, spec) <= accumulator_budget(spec, narrow)
        if columns and one_pass:
            # every kernel row in one pass on 4 warps too: twice the programs an SM, fewer instructions issued
            # (ShuffleNetV2's dw3 at 4 channels on 14 x 14: 27.7% of its floor modelled, 20.7% on 8 warps); where
            # 4 warps would take two passes they read the input twice (MobileNetV2's dw3: 25.3%, 50.6% on 8)
            config = narrow
        return config

    def _pieces_config(self, spec: ConvSpec, config: KernelConfig) -> KernelConfig:
        """In pieces (strip_pieces): 32 strips of 16 columns a step on 4 warps, 4 channels batched, halved while
        their accumulators would pass PIECES_ACCUMULATOR_REGISTERS a thread. % of the floor modelled, NCL /
        channels_last, bfloat16 at batch 8 on 2048 positions (against the flat tile): causal k64 94.0 / 94.0
        (66.7 / 50.0), k128 on 2 channels 63.6 / 57.9 (50.1 / 33.4), k256 on one 56.4 / 52.3 (20.1 / 11.2); no
        spill on Triton 3.9 or 3.6, where 4 channels on 8 warps spilled 24 B at k128 (3.9) and 60 B at k256 (3.6),
        2 channels 56-76 B at k256, and one channel on 8 warps 24 B at k256 (3.9)."""
        while config.block_n > 1 and (self._row_accumulators(config, spec) // (32 * config.num_warps)
                                      > PIECES_ACCUMULATOR_REGISTERS):
            config = replace(config, block_n=config.block_n // 2)
        return config

    def accumulator_registers(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        """grad-weight: one kernel row's accumulators, what a pass holds at the least."""
        return self._row_accumulators(config, spec) if kind == "grad_weight" else 0

    def _row_accumulators(self, config: KernelConfig, spec: ConvSpec) -> int:
        """row_accumulators with the halo taken at band_shift 0 (before the launch's alignment is known)."""
        return row_accumulators(spec, config, self.halo(spec, config, "grad_weight", 0)[1])

    def fitted(self, config: KernelConfig, spec: ConvSpec, kind: str, pixels: PixelSpace) -> KernelConfig:
        """A forward tile of one row's strips (strip_rows) no taller than the row's strips (a power of two, at
        least tl.dot's 16 rows): a short prompt's row would leave the rest of the tile idle.
        A grad-weight strip of 16 columns for output rows of 32 or fewer (32-column strips spilled 32-192 B on
        EfficientNet's dw5 at 28 x 28, ConvNeXt's dw7 at 7 x 7 and RepLKNet's dw27 at 14 x 14 in NCHW), in one
        stage (two spilled 64 B on EfficientNet's stride-2 dw5, for the same modelled time). A grad-weight tile of
        one column's rows (strip_columns) no taller than the map and the window's reach (a power of two, at least
        16); on a map shorter than the window's reach, a flat tile. A sliding forward's strip no wider than its
        rows' power of two, at least 16 (ShuffleNetV2's dw3 on 14 columns in NCHW: 22.6% in strips of 32,
        74.3% in 16). A grad-weight in pieces (strip_pieces) no more strips a step than a row has (a power of
        two, at least 16)."""
        if kind == "grad_input" or (kind == "forward" and sliding_rows(spec, kind)):
            return replace(config, block_k=min(config.block_k, pow2_between(pixels.width, DOT_SIDES[0], 1 << 30)))
        if strip_rows(spec, kind):
            strips = cdiv(pixels.width, config.block_k)
            return replace(config, block_m=min(config.block_m, pow2_between(strips, DOT_SIDES[0], 1 << 30)))
        if column_rows(spec, kind, config):  # a map of fewer rows: the flat tile (shrunk below COLUMN_ROWS)
            rows = pow2_between(pixels.height, DOT_SIDES[0], 1 << 30)
            return replace(config, block_m=min(config.block_m, rows if rows >= COLUMN_ROWS else COLUMN_ROWS // 2))
        if kind != "grad_weight":
            return config
        if strip_pieces(spec, kind, config):
            # no more strips a step than the row has (a power of two, at least 16): a short row would leave the
            # rest of the tile idle; where its pieces then pass BLOCK_M, the flat tile
            strips = cdiv(pixels.width, config.block_k)
            return replace(config, block_m=min(config.block_m, pow2_between(strips, DOT_SIDES[0], 1 << 30)))
        if strip_columns(spec, kind, config):
            rows = pow2_between(pixels.height * spec.stride[0] + row_reach(spec), DOT_SIDES[0], 1 << 30)
            if pixels.height < row_reach(spec):
                # most of a column's step would be rows past the map (RepLKNet's dw27 on 14 rows: 64 rows a
                # step, 4.4% of its floor modelled): the flat tile, whose rows are any strips
                rows = max(DOT_SIDES[0], pow2_between(2 * row_reach(spec), 1, 1 << 30) // 2)
            config = replace(config, block_m=min(config.block_m, rows))
        if pixels.width > 32:
            return config
        return replace(config, block_k=DOT_SIDES[0], num_stages=1)

    def keeps_floor(self, config: KernelConfig, spec: ConvSpec) -> bool:
        """tl.dot's 16 rows, and channels_last channel tiles of whole 16-byte vectors, or where a pixel's
        channels are not a multiple of them, of the widest power of two that divides them (ShuffleNetV2's 116
        channels: 4)."""
        vector = 16 // ELEMENT_BYTES[spec.dtype] if spec.layout == "nhwc" else 1
        vector = min(vector, spec.out_channels & -spec.out_channels)
        return config.block_m >= DOT_SIDES[0] and config.block_n >= vector

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """(tiles of BLOCK_M strips of BLOCK_K output columns over every output row, of each row's strips
        (strip_rows), of a column's rows (column_rows), or of (batch, row block, strip) triples (sliding_rows), 1,
        channel tiles); grad-weight: (channel tiles, splits of the strips)."""
        if kind == "grad_weight":
            return (cdiv(spec.out_channels, config.block_n), splits)
        strips = cdiv(pixels.width, config.block_k)
        if kind == "grad_input":
            # (batch, block of row groups, strip) triples over grad_x's pixels
            tiles = sliding_tiles(config, pixels, grad_input_groups(spec, pixels.height),
                                  grad_input_block_groups(spec))
        elif strip_rows(spec, kind):
            tiles = pixels.rows * cdiv(strips, config.block_m)
        elif column_rows(spec, kind, config):
            tiles = pixels.batch * strips * cdiv(pixels.height, config.block_m)
        elif sliding_rows(spec, kind, config, pixels):
            tiles = sliding_tiles(config, pixels)
        else:
            tiles = cdiv(pixels.rows * strips, config.block_m)
        return (tiles, 1, cdiv(spec.out_channels, config.block_n))

    def reduction_units(self, spec: Optional[ConvSpec], config: KernelConfig, pixels: PixelSpace) -> int:
        """grad-weight sums strips of BLOCK_K output columns, over every output row; in columns of strips
        (strip_columns), BLOCK_M units a step of column_step_rows output rows of one column."""
        strips = cdiv(pixels.width, config.block_k)
        if strip_pieces(spec, "grad_weight", config):
            return pixels.rows * cdiv(strips, config.block_m) * config.block_m
        if strip_columns(spec, "grad_weight", config):
            return pixels.batch * strips * cdiv(pixels.height, column_step_rows(spec, config)) * config.block_m
        return pixels.rows * strips

    def weight_layout(self, kind: str, weight_memory: str) -> str:
        return "strided"  # the forward builds its band blocks from the weight's rows in registers

    def band_dot(self, spec: ConvSpec) -> str:
        return band_dot(spec)

    def stages_channels_last(self, spec: ConvSpec, kind: str) -> bool:
        """The forward of an NCHW window of at least COLUMN_KERNEL_ROWS rows at stride 1 along the height: on a
        channels_last copy it takes the channels_last kernel's columns of strips (column_rows: each band step's
        input loaded once for every kernel row, a dot batched over 8 channels), where NCHW's one-channel dots
        took flat tiles (RepLKNet's dw31: 36.4x the ideal bytes requested, 7.2% of its floor modelled; in
        columns of one channel 5.0%)."""
        return (kind == "forward" and spec.layout == "nchw" and spec.kernel_size[0] >= COLUMN_KERNEL_ROWS
                and spec.stride[0] == 1)

    def computes_staged_as_channels_last(self) -> bool:
        return True

    def least_split_blocks(self, band_dot: str) -> int:
        """A dot batched over channels (channels_last) splits its reduction down to one block a split: a small
        map's few channel tiles otherwise leave most SMs idle (% of the floor modelled at least 4 / 2 / 1 blocks a
        split: ConvNeXt's dw7 at batch 1, 24 / 48 / 96 programs: 8.6 / 12.8 / 16.8; RepLKNet's dw31 at batch 1:
        6.0 / 9.2 / 9.0). One channel at a time ("rows") keeps the default: each split sums its taps' diagonals
        once a channel (ConvNeXt's dw7 at batch 1 in NCHW: 27.1 / 14.8 / 10.4)."""
        return 1 if band_dot == "channels" else super().least_split_blocks(band_dot)

    def reads_aligned_rows(self, spec: ConvSpec, band_dot: str, kind: str = "forward") -> bool:
        """The "rows" dot on NCHW reads each strip's input band (and grad-weight its grad_out strips) as
        vectors (cp.async on sm_90)."""
        return band_dot == "rows" and spec.layout == "nchw"

    def band_shift(self, spec: ConvSpec, row_alignment: int) -> int:
        """Each strip's input band starts this many columns before its window, on an aligned column (strips
        are BLOCK_K x stride >= 16 columns apart); its band matrices start as many columns later."""
        return -spec.padding[2] % row_alignment if self.reads_aligned_rows(spec, band_dot(spec)) else 0

    def tap_tile(self, spec: ConvSpec, kind: str, config: KernelConfig, halo_tile: int) -> int:
        """grad-weight: the kernel rows a pass holds (kernel_rows_at_once)."""
        return kernel_rows_at_once(spec, config, halo_tile) if kind == "grad_weight" else 0

    def step_rows(self, spec: ConvSpec, kind: str, config: KernelConfig) -> int:
        """grad-weight in columns of strips (strip_columns): column_step_rows output rows a step; the forward
        in columns (column_rows): its BLOCK_M output rows."""
        if column_rows(spec, kind, config):
            return config.block_m
        return column_step_rows(spec, config) if strip_columns(spec, kind, config) else 0

    def pieces(self, spec: ConvSpec, kind: str, config: KernelConfig, band_shift: int) -> int:
        """grad-weight in pieces (strip_pieces): the pieces of a strip's input band (piece_count)."""
        return piece_count(spec, config.block_k, band_shift) if strip_pieces(spec, kind, config) else 0

    def slide_rows(self, spec: ConvSpec, kind: str, config: KernelConfig, pixels: Optional[PixelSpace]) -> int:
        """The forward sliding down the output rows (sliding_rows): SLIDING_ROWS, the most a block has; the
        grad-input, the most row groups a block has (grad_input_block_groups)."""
        if kind == "grad_input":
            return grad_input_block_groups(spec)
        return SLIDING_ROWS if sliding_rows(spec, kind, config, pixels) else 0

    def halo(self, spec: ConvSpec, config: KernelConfig, kind: str = "forward",
             band_shift: int = 0) -> tuple[tuple[int, int], int]:
        """grad-weight: the input columns past a strip's main tile (grad_weight_halo), loaded as one tile of a
        power of two >= 16 columns (tl.dot's least side). The forward of one row's strips (strip_rows): the
        band_steps - 1 strips its band steps reach past the tile; in columns (column_rows), the row_reach input
        rows its kernel rows read past its rows; either loaded as one tile of a power of two, with at least one
        element a thread, and on the wide tile (wide_strips) at least the main tile's strips. A grad-weight in
        pieces (strip_pieces) has no halo tile: its step's input is one tile of strips."""
        if strip_rows(spec, kind) or column_rows(spec, kind, config):
            ahead = band_steps(spec, config.block_k, band_shift) - 1 if strip_rows(spec, kind) else row_reach(spec)
            # at least an element a thread: Triton 3.6's gather from a smaller tile fails to compile
            channels = config.block_n if band_dot(spec) == "channels" else 1
            least = cdiv(32 * config.num_warps, config.block_k * channels)
            if wide_strips(spec, kind):  # at least as long as the main tile: as long, the wide tile
                least = max(least, config.block_m)
            return (0, ahead), pow2_between(ahead, least, 1 << 30)
        reach = grad_weight_halo(spec, config.block_k, band_shift) if kind == "grad_weight" else 0
        if strip_pieces(spec, kind, config):  # the pieces past a strip's first hold the reach: no tile of its own
            return (0, reach), 0
        return (0, reach), pow2_between(reach, DOT_SIDES[0], 1 << 30) if reach else 0

    def tile_depth(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        return config.block_k  # a [block_n, block_m, block_k] accumulator

    def operand_bytes(self, config: KernelConfig, spec: ConvSpec) -> int:
        return band_operand_bytes(config, spec)

    def requested(self, desc, problem, programs: int, arguments: dict):
        if desc.kind == "grad_weight":
            return self._grad_weight_requested(desc, problem, programs, arguments)
        if desc.kind == "grad_input":
            return self._grad_input_requested(desc, problem, programs, arguments)
        return self._forward_requested(desc, problem, programs, arguments)

    def _grad_input_requested(self, desc, problem, programs: int, arguments: dict):
        """Per program and channel: the band blocks of every kernel row and band step built once (a weight
        segment each); at each step (the block's row groups and the lag before them) each band step's tile of
        the step's grad_out row, the columns up to the span (whole vectors), and a dot for every kernel row."""
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        alignment = grad_input_alignment(spec, desc.row_alignment)
        span = grad_input_span(spec, k, alignment)
        steps = cdiv(span, k)
        reached = [min(k, cdiv(span - step * k, alignment) * alignment) for step in range(steps)]
        channels = programs * n
        strips = cdiv(arguments["width"], k)
        groups = grad_input_groups(spec, arguments["height"])
        lag = row_reach(spec) // spec.stride[0]
        rows = sliding_block_rows(groups, arguments["batch"] * strips, m, grad_input_block_groups(spec)) + lag
        segment = band_segment(spec, k)
        loaded = channels * (rows * m * sum(reached) + spec.kernel_size[0] * steps * segment)
        return loaded * ELEMENT_BYTES[spec.dtype], channels * rows * spec.kernel_size[0] * steps * 2 * m * k * k

    def _grad_weight_requested(self, desc, problem, programs: int, arguments: dict):
        """Per step and channel: in each pass over the kernel rows a [block_m, block_k] grad_out tile (in columns
        of strips, strip_columns, its step_rows output rows: the rest are masked, no load), and the input
        band's main and halo tiles of block_m rows, for each kernel row ("flat") or once a pass (strip_columns);
        each kernel row a dot of the grad_out tile with its input tiles. In pieces (strip_pieces): the step's
        grad_out tile and its input strips with the pieces' reach past them, once, and a dot for each piece."""
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        band = grad_weight_main(spec, k) + desc.halo_tile
        steps = programs * n * -(-arguments.get("pixels_per_split", 0) // m)
        if desc.pieces:  # strip_pieces: the step's strips of grad_out and of input, and the pieces' reach past them
            loaded = steps * (m + m + desc.pieces - 1) * k * ELEMENT_BYTES[spec.dtype]
            return loaded, steps * desc.pieces * 2 * k * m * k
        kernel_h = spec.kernel_size[0]
        passes = cdiv(kernel_h, desc.tap_tile)
        x_rows = (passes if desc.step_rows else kernel_h) * m
        grad_out_rows = passes * (desc.step_rows or m)
        loaded = steps * (grad_out_rows * k + x_rows * band) * ELEMENT_BYTES[spec.dtype]
        return loaded, steps * kernel_h * 2 * k * m * band

    def _forward_requested(self, desc, problem, programs: int, arguments: dict):
        """Per channel and kernel row: the input, each band step's tile ("flat"), and each band step's weight
        segment; one row's strips apart (_strips_requested); in columns (column_rows) the main and halo tiles
        of each band step once for every kernel row; sliding down the rows (sliding_rows) each band step's tile
        of an input row once for every kernel row, a program's rows and the window's reach past them."""
        if desc.slide_rows:
            return self._sliding_requested(desc, problem, programs, arguments)
        if desc.halo_tile and not desc.step_rows:
            return self._strips_requested(desc, problem, programs, arguments)
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        steps = band_steps(spec, k, desc.band_shift)
        rows = programs * n * spec.kernel_size[0]
        tiles = steps * (m + desc.halo_tile) * k / spec.kernel_size[0] if desc.step_rows else steps * m * k
        segment = band_segment(spec, k)
        return rows * (tiles + steps * segment) * ELEMENT_BYTES[spec.dtype], rows * steps * 2 * m * k * k

    def _strips_requested(self, desc, problem, programs: int, arguments: dict):
        """One row's strips (strip_rows): per program, channel and kernel row the main and halo tiles once (of the
        wide tile the strips the band steps read) and each band step's weight segment, as far as the masks let
        them read (a masked lane requests nothing): input columns in [0, width) of input rows in [0, height),
        offsets of the segment that are taps (the segment's lead of at most one offset left out)."""
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        steps = band_steps(spec, k, desc.band_shift)
        width, window, dilation = arguments["width"], window_width(spec), spec.dilation[1]
        tiles = cdiv(cdiv(arguments["out_width"], k), m)
        lead = spec.padding[2] + desc.band_shift
        starts = range(-lead, tiles * m * k - lead, m * k)  # each tile's first input column
        if desc.halo_tile == m:  # the wide tile
            row = in_bounds(starts, 0, (m + steps - 1) * k, width)
        else:
            row = in_bounds(starts, 0, m * k, width) + in_bounds(starts, m * k, desc.halo_tile * k, width)
        rows_read = self.rows_in_bounds(spec, arguments)
        segment = band_segment(spec, k)
        taps = 0
        for step in range(steps):
            first = step * k - desc.band_shift - (k - 1) * spec.stride[1]
            low, high = max(first, 0), min(first + segment, window)
            taps += max(0, cdiv(high, dilation) - cdiv(low, dilation))  # offsets that are multiples of the dilation
        channels = spec.out_channels if desc.band_dot == "channels" else cdiv(spec.out_channels, n) * n
        tile_rows = arguments["batch"] * arguments["out_height"] * spec.kernel_size[0] * tiles
        loaded = channels * (arguments["batch"] * rows_read * row + tile_rows * taps)
        return loaded * ELEMENT_BYTES[spec.dtype], programs * n * spec.kernel_size[0] * steps * 2 * m * k * k

    def _sliding_requested(self, desc, problem, programs: int, arguments: dict):
        """Sliding down the rows (sliding_rows): per program and channel, the band blocks of every kernel row and
        band step built once (a weight segment each); at each step (the block's rows and the open rows past them)
        each band step's tile of the step's input row of every phase of the stride some kernel row reads
        (row_phases), the columns some tap reaches (row_alignment vectors), and a dot for every kernel row."""
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        steps = band_steps(spec, k, desc.band_shift)
        width = window_width(spec)
        reached = [min(k, cdiv(max(0, width + desc.band_shift - spec.stride[1] + k * (spec.stride[1] - step)),
                               desc.row_alignment) * desc.row_alignment) if step else k for step in range(steps)]
        channels = programs * n
        strips = cdiv(arguments["out_width"], k)
        rows = sliding_block_rows(arguments["out_height"], arguments["batch"] * strips, m) + open_rows(spec) - 1
        segment = band_segment(spec, k)
        loaded = channels * (rows * len(row_phases(spec)) * m * sum(reached) + spec.kernel_size[0] * steps * segment)
        return loaded * ELEMENT_BYTES[spec.dtype], channels * rows * spec.kernel_size[0] * steps * 2 * m * k * k
