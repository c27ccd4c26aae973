"""The banded depthwise family (templates/depthwise_gemm.py.jinja): a depthwise conv as a product of input
rows with Toeplitz band matrices written out from the weight per launch (runtime/weights.py), on tensor cores;
it wastes the band's zeros but outruns FMAs once the window is wide."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ...ir import ConvSpec
from ..tiles import DEFAULT_SHARED_MEMORY_BYTES, ELEMENT_BYTES, KernelConfig, PixelSpace, cdiv, pow2_between
from .base import Family
from .igemm import DOT_SIDES

WIDE_DEPTHWISE_TAPS = 49  # kh * kw from which half-precision depthwise runs on tensor cores by default
ROW_TAPS = 4  # a height-1 window past this many taps runs on tensor cores in half precision


def is_wide_window(spec: ConvSpec) -> bool:
    """Direct costs 2 * kh * kw flop per output element against about 4 bytes moved in half precision, so
    from kh * kw = 49 (k7) it is bound by the CUDA cores' FMA rate rather than by memory, and the banded
    form is the default for float16 and bfloat16 (in float32 and float64 a dot is no faster than FMAs, so
    the band's waste would only cost). A height-1 window (conv1d) goes there past ROW_TAPS: depthwise1d
    forms each tap with gathers, about 32 sm_90 instructions an output at k4 but about 130 at k8, where a
    copy's pace allows about 27, while the band's rows are strips along the length (a few wasted FLOPs a
    tap, on tensor cores)."""
    kernel_h, kernel_w = spec.kernel_size
    return spec.dtype in ("float16", "bfloat16") and (kernel_h * kernel_w >= WIDE_DEPTHWISE_TAPS
                                                       or (kernel_h == 1 and kernel_w > ROW_TAPS))


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


def band_steps(spec: ConvSpec, block_k: int, band_shift: int) -> int:
    """How many [block_k, block_k] band matrices cover the input band of one strip of block_k output
    columns: band_shift columns read early (KernelDesc.band_shift), then (block_k - 1) x stride + the
    window's width columns, in block_k steps."""
    window_width = (spec.kernel_size[1] - 1) * spec.dilation[1] + 1
    return -(-(band_shift + (block_k - 1) * spec.stride[1] + window_width) // block_k)


class DepthwiseGemm(Family):
    name = "depthwise_gemm"
    templates = {"forward": "depthwise_gemm.py.jinja"}
    limits = {"block_m": DOT_SIDES, "block_n": (1, 64), "block_k": DOT_SIDES}

    def rank(self, spec: ConvSpec) -> Optional[int]:
        """Every depthwise conv; the default for wide half-precision windows (is_wide_window)."""
        if not spec.is_depthwise:
            return None
        return 0 if is_wide_window(spec) else 2

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """(output rows, channels, column strip); accumulators: block_n x block_m x block_k."""
        if interpret:
            return KernelConfig(32, pow2_between(spec.out_channels, 1, 16), 16, num_stages=1)
        strip = 16 if spec.kernel_size[1] <= 16 else 32  # a band of two 16-column strips covers k <= 17
        if band_dot(spec) == "rows":  # one channel's 2-D dot: 128 rows on 8 warps (wgmma, no spills at k7 and k31)
            config = KernelConfig(128, 1, strip, num_warps=8, num_stages=3)
            while config.num_stages > 1 and band_operand_bytes(config, spec) > DEFAULT_SHARED_MEMORY_BYTES:
                config = replace(config, num_stages=config.num_stages - 1)  # float64 tiles are larger
            return config
        # channels_last: 8 channels for 16-byte loads; 8 warps hold the batched dot without spilling at k7 and k31
        config = KernelConfig(32, pow2_between(spec.out_channels, 1, 8), strip, num_warps=8)
        while config.block_n > 1 and band_operand_bytes(config, spec) > DEFAULT_SHARED_MEMORY_BYTES:
            config = replace(config, block_n=config.block_n // 2)  # float32 and float64 tiles are larger
        return config

    def keeps_floor(self, config: KernelConfig, spec: ConvSpec) -> bool:
        """tl.dot's 16 rows, and channels_last channel tiles of whole 16-byte vectors."""
        vector = 16 // ELEMENT_BYTES[spec.dtype] if spec.layout == "nhwc" else 1
        return config.block_m >= DOT_SIDES[0] and config.block_n >= vector

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """(tiles of BLOCK_M strips of BLOCK_K output columns over every output row, 1, channel tiles)."""
        return (cdiv(pixels.rows * cdiv(pixels.width, config.block_k), config.block_m), 1,
                cdiv(spec.out_channels, config.block_n))

    def weight_layout(self, kind: str, weight_memory: str) -> str:
        return "band"

    def band_dot(self, spec: ConvSpec) -> str:
        return band_dot(spec)

    def reads_aligned_rows(self, spec: ConvSpec, band_dot: str) -> bool:
        """The "rows" dot on NCHW reads each strip's input band as vectors (cp.async on sm_90)."""
        return band_dot == "rows" and spec.layout == "nchw"

    def band_shift(self, spec: ConvSpec, row_alignment: int) -> int:
        """Each strip's input band starts this many columns before its window, on an aligned column (strips
        are BLOCK_K x stride >= 16 columns apart); its band matrices start as many columns later."""
        return -spec.padding[2] % row_alignment if self.reads_aligned_rows(spec, band_dot(spec)) else 0

    def tile_depth(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        return config.block_k  # a [block_n, block_m, block_k] accumulator

    def operand_bytes(self, config: KernelConfig, spec: ConvSpec) -> int:
        return band_operand_bytes(config, spec)

    def requested(self, desc, problem, programs: int, arguments: dict):
        """Each band step's input tile and band matrix, per channel, plus the runtime's write of the band
        matrices (runtime/weights.py band_copy: C_out x kernel_h x steps x block_k x block_k) before the launch."""
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        per_row = band_steps(spec, k, desc.band_shift)
        steps = programs * spec.kernel_size[0] * per_row
        band_write = spec.out_channels * spec.kernel_size[0] * per_row * k * k
        return (steps * n * (m * k + k * k) + band_write) * ELEMENT_BYTES[spec.dtype], steps * n * 2 * m * k * k
