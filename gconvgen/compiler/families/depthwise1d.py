"""The row family (templates/depthwise1d.py.jinja): depthwise convs with a short window along the width, built
to run at memory speed: conv1d's depthwise layers and Mamba's causal k4 (one kernel row), and NCHW 2-D
depthwise convs row by row. A program reads each kernel row's input window once (its main tile and halos)
and forms the taps with tl.gather."""
from __future__ import annotations

from typing import Optional

from ...ir import ConvSpec, check
from ..tiles import ELEMENT_BYTES, KernelConfig, PixelSpace, cdiv, pow2_between
from .base import Family
from .depthwise_gemm import is_wide_window

SHORT_WINDOW_TAPS = 8  # kw up to which a height-1 depthwise conv runs as depthwise1d by default
# A halo tile's least side. Triton gives each tl.gather a warp-local layout with min(side, 32) lanes along the
# positions and the rest across channels; from 4 positions a warp spans at most 8 channels, so with
# block_n >= 8 x num_warps every warp has channels of its own (Triton 3.6 asserts otherwise; 3.9 repeats work).
LEAST_HALO_TILE = 4
GATHER_CHANNELS_PER_WARP = 8


def is_short_window(spec: ConvSpec) -> bool:
    """A depthwise conv whose window is short along the width: at kw <= SHORT_WINDOW_TAPS a kernel row moves
    about 4 bytes per 2 kw flop, so it must run at memory speed, which depthwise1d is built for (each input
    row's window read once per program and kernel row). Its main tile of BLOCK_M * stride positions must be a
    power of two (a power-of-two stride along the width), and padding past the window's reach would only
    widen the halo with zeros. Any height, stride, padding and dilation along the height."""
    kernel_w, stride_w = spec.kernel_size[1], spec.stride[1]
    reach = (kernel_w - 1) * spec.dilation[1]
    return (spec.is_depthwise and kernel_w <= SHORT_WINDOW_TAPS and stride_w & (stride_w - 1) == 0
            and max(spec.padding[2:]) <= reach)


def window_halo(spec: ConvSpec) -> tuple[int, int]:
    """The halo of a program: positions it reads (front) before its main input tile of BLOCK_M * stride
    positions, which starts at its first output position x stride, and (back) after it. Output j, tap t reads
    main-tile offset j * stride + t * dilation - left padding: as far back as the left padding and
    (k - 1) * dilation - left padding - stride + 1 past the tile, whatever BLOCK_M is."""
    left, stride = spec.padding[2], spec.stride[1]
    return (left, max(0, (spec.kernel_size[1] - 1) * spec.dilation[1] - left - stride + 1))


def _warps(block_n: int) -> int:
    """sm_90 makes each tap's tl.gather warp-local: 8 lanes across channels, warps side by side along them,
    so a channel tile under 8 x num_warps would repeat work: one warp per 8 channels, at most 4."""
    return max(1, min(4, block_n // 8))


class Depthwise1d(Family):
    name = "depthwise1d"
    templates = {"forward": "depthwise1d.py.jinja"}
    limits = {"block_m": (8, 1024), "block_n": (8, 1024), "block_k": (0, 0)}

    def rank(self, spec: ConvSpec) -> Optional[int]:
        """Short windows (is_short_window) of height-1 windows (conv1d) or NCHW 2-D ones, where the direct
        kernel's loads are per element: the default unless the banded form is (in channels_last 2-D the
        direct kernel's loads are 16-byte vectors of channels already)."""
        if not (is_short_window(spec) and (spec.kernel_size[0] == 1 or spec.layout == "nchw")):
            return None
        return 2 if is_wide_window(spec) else 0

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """(output positions of one row, channels): 16 outputs a thread, no spills."""
        channels = spec.out_channels
        if interpret:
            return KernelConfig(256, pow2_between(channels, 8, 64), 0, num_warps=1, num_stages=1)
        block_n = pow2_between(channels, 8, 128 if spec.layout == "nhwc" else 64)
        warps = _warps(block_n)
        return KernelConfig(max(8, 512 * warps // block_n), block_n, 0, num_warps=warps, num_stages=1)

    def refit(self, config: KernelConfig, spec: ConvSpec, kind: str) -> KernelConfig:
        return KernelConfig(config.block_m, config.block_n, config.block_k, num_warps=_warps(config.block_n),
                            num_stages=config.num_stages)

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """(row x position tile, channel tile): a program never spans two rows."""
        return (pixels.rows * cdiv(pixels.width, config.block_m), cdiv(spec.out_channels, config.block_n))

    def reads_aligned_rows(self, spec: ConvSpec, band_dot: str) -> bool:
        return True

    def halo(self, spec: ConvSpec, config: KernelConfig) -> tuple[tuple[int, int], int]:
        """The main tile's halo (window_halo), loaded as tiles of halo_tile positions masked to the ones read;
        the channel tile must give each warp 8 channels (GATHER_CHANNELS_PER_WARP)."""
        halo = window_halo(spec)
        check(config.block_n >= GATHER_CHANNELS_PER_WARP * config.num_warps,
              f"block_n={config.block_n} with num_warps={config.num_warps} is not legal for the depthwise1d family: "
              f"its gathers need block_n >= {GATHER_CHANNELS_PER_WARP} x num_warps")
        return halo, pow2_between(max(halo), LEAST_HALO_TILE, 1 << 30) if max(halo) else 0

    def requested(self, desc, problem, programs: int, arguments: dict):
        """Its input window once (main tile and the halo positions read), k weight rows."""
        spec, config = problem.spec, desc.config
        window = config.block_m * spec.stride[1] + sum(desc.halo)
        return programs * (window * config.block_n + self.taps(spec) * config.block_n) * ELEMENT_BYTES[spec.dtype], None
