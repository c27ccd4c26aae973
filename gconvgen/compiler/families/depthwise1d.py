"""The row family (templates/depthwise1d.py.jinja): depthwise convs with a short window along the width, built
to run at memory speed: conv1d's depthwise layers and Mamba's causal k4 (one kernel row), and NCHW 2-D
depthwise convs row by row. A program reads each kernel row's input window once (its main tile and halos)
and forms the taps with tl.gather."""
from __future__ import annotations

from typing import Optional

from ...ir import ConvSpec, check
from ..tiles import ELEMENT_BYTES, KernelConfig, PixelSpace, cdiv, in_bounds, pow2_between
from .base import Family
from .depthwise_gemm import is_wide_window

SHORT_WINDOW_TAPS = 8  # kw up to which a height-1 depthwise conv runs as depthwise1d (in half precision past
# depthwise_gemm.ROW_TAPS the banded kernel is the default)
# A halo tile's least side. Triton gives each tl.gather a warp-local layout with min(side, 32) lanes along the
# positions and the rest across channels; from 4 positions a warp spans at most 8 channels, so with
# block_n >= 8 x num_warps every warp has channels of its own (Triton 3.6 asserts otherwise; 3.9 repeats work).
LEAST_HALO_TILE = 4
GATHER_CHANNELS_PER_WARP = 8
VECTOR_BYTES = 16  # the widest global load


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


def halo_tile(spec: ConvSpec, block_n: int, num_warps: int, block_m: int = 1 << 30) -> int:
    """The side of a halo tile (0 without a halo): a power of two >= the halo and LEAST_HALO_TILE. For a
    height-1 window (conv1d, one kernel row) also large enough that each thread's share of a
    [halo_tile, block_n] tile is one 16-byte vector (Triton gives a load at most elements / threads per
    thread), along the width in NCHW, where a vector lies along the positions: the positions past the halo
    cost a few requested bytes (the neighbour's tile, in L2), far fewer instructions than scalar loads. A
    2-D window reads kernel_h rows a program, where a wider halo would add its bytes kernel_h times. Never
    past the main tile's BLOCK_M x stride positions (a tile shrunk for a one-token prompt), unless the halo is."""
    halo = max(window_halo(spec))
    if not halo:
        return 0
    least = LEAST_HALO_TILE
    if spec.kernel_size[0] == 1:
        vector = VECTOR_BYTES // ELEMENT_BYTES[spec.dtype]
        least = max(least, cdiv(vector * 32 * num_warps, block_n), vector if spec.layout == "nchw" else 1)
        least = max(LEAST_HALO_TILE, min(least, block_m * spec.stride[1]))
    return pow2_between(halo, least, 1 << 30)


def _warps(spec: ConvSpec, block_n: int) -> int:
    """sm_90 makes each tap's tl.gather warp-local: 8 lanes across channels, warps side by side along them,
    so a channel tile under 8 x num_warps would repeat work: one warp per 8 channels, but for a height-1
    window in NCHW one per 32, so that a [halo_tile, block_n] halo tile still gives each thread a whole
    vector along the width (halo_tile); at most 4."""
    one_row_nchw = spec.kernel_size[0] == 1 and spec.layout == "nchw"
    return max(1, min(4, block_n // (32 if one_row_nchw else GATHER_CHANNELS_PER_WARP)))


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
        """(output positions of one row, channels): 16 outputs a thread (_warps), and for a height-1 window a
        main tile of at least 4 halo tiles per halo side, so the halo adds at most a quarter to the input read
        (requested bytes within 1.2x of the ideal) while every halo load is a whole 16-byte vector
        (halo_tile); no spills."""
        channels = spec.out_channels
        if interpret:
            return KernelConfig(256, pow2_between(channels, 8, 64), 0, num_warps=1, num_stages=1)
        block_n = pow2_between(channels, 8, 128 if spec.layout == "nhwc" else 64)
        warps = _warps(spec, block_n)
        sides = sum(1 for side in window_halo(spec) if side)
        block_m = max(8, 512 * warps // block_n)
        if spec.kernel_size[0] == 1:
            block_m = max(block_m, 4 * sides * halo_tile(spec, block_n, warps))
        return KernelConfig(block_m, block_n, 0, num_warps=warps, num_stages=1)

    def refit(self, config: KernelConfig, spec: ConvSpec, kind: str) -> KernelConfig:
        return KernelConfig(config.block_m, config.block_n, config.block_k, num_warps=_warps(spec, config.block_n),
                            num_stages=config.num_stages)

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """(row x position tile, channel tile): a program never spans two rows."""
        return (pixels.rows * cdiv(pixels.width, config.block_m), cdiv(spec.out_channels, config.block_n))

    def reads_aligned_rows(self, spec: ConvSpec, band_dot: str, kind: str = "forward") -> bool:
        return True

    def halo(self, spec: ConvSpec, config: KernelConfig, kind: str = "forward",
             band_shift: int = 0) -> tuple[tuple[int, int], int]:
        """The main tile's halo (window_halo), loaded as whole tiles of halo_tile positions; the channel tile
        must give each warp 8 channels (GATHER_CHANNELS_PER_WARP)."""
        check(config.block_n >= GATHER_CHANNELS_PER_WARP * config.num_warps,
              f"block_n={config.block_n} with num_warps={config.num_warps} is not legal for the depthwise1d family: "
              f"its gathers need block_n >= {GATHER_CHANNELS_PER_WARP} x num_warps")
        return window_halo(spec), halo_tile(spec, config.block_n, config.num_warps, config.block_m)

    def requested(self, desc, problem, programs: int, arguments: dict):
        """Each program's input window (main tile and whole halo tiles) and k weight rows, as far as the masks
        let it read: positions in [0, width) of input rows in [0, height), channels below out_channels (a masked
        lane requests nothing: a one-token prompt's tile of BLOCK_M positions reads one, its halo none)."""
        spec, config = problem.spec, desc.config
        main = config.block_m * spec.stride[1]
        width, halo = arguments["width"], desc.halo_tile
        starts = range(0, cdiv(arguments["out_width"], config.block_m) * main, main)
        front, back = desc.halo
        row = (in_bounds(starts, 0, main, width) + (in_bounds(starts, -halo, halo, width) if front else 0)
               + (in_bounds(starts, main, halo, width) if back else 0))
        rows_read = self.rows_in_bounds(spec, arguments)
        tiles = arguments["batch"] * arguments["out_height"] * len(starts)
        loaded = spec.out_channels * (arguments["batch"] * rows_read * row + tiles * self.taps(spec))
        return loaded * ELEMENT_BYTES[spec.dtype], None
