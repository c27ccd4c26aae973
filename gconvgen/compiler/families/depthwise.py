"""The direct depthwise family (templates/depthwise_direct.py.jinja, depthwise_grad_input.py.jinja,
depthwise_grad_weight.py.jinja): one input channel per group, fp32 FMAs, each tap's row of channels one
vector load of an HWIO weight. It computes every depthwise conv's gradients."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from ...ir import ConvSpec
from ..tiles import ELEMENT_BYTES, KernelConfig, PixelSpace, cdiv, pow2_between
from .base import Family

# Elements of the [pixels, taps, channels] x window a depthwise grad-weight step gathers, per warp: 32 values
# a thread, converted to the accumulator's type, beside the [taps, channels] accumulator.
_WINDOW_ELEMENTS_PER_WARP = 1024


def tap_tile(spec: ConvSpec) -> int:
    """The taps of the window padded to a power of two: the depthwise grad-weight accumulator's rows."""
    return 1 << (spec.kernel_size[0] * spec.kernel_size[1] - 1).bit_length()


# The channel tile of a depthwise grad-weight whose pixels are fewer than a step's (Depthwise.fitted).
GRAD_WEIGHT_FEW_PIXELS_CHANNELS = 64

ROW_TILE_PIXELS = 64  # the widest tile of one row's pixels (the interpreter's 256-pixel tiles stay flat)


def row_tiles(spec: ConvSpec, kind: str, config: KernelConfig) -> bool:
    """Whether the forward tile is BLOCK_M consecutive pixels of one output row ("row" in the template), which
    lets each kernel row's input be loaded once for all its taps and each tap's tile be gathered from
    registers: a channels_last window wider than one column at stride 1 along the width, where tap (th, tw) of
    pixel i reads what tap (th, 0) of pixel i + tw reads, on tiles of at most ROW_TILE_PIXELS (wider ones
    would mostly outrun real maps' rows, and one program a row would multiply the interpreter's programs).
    Otherwise every tap loads its own tile (MobileNetV2's dw3 requested 6.7x the ideal bytes, EfficientNet's
    dw5 14.2x). NCHW depthwise convs take the row kernel (depthwise1d) by default; their direct forward keeps
    the flat tile."""
    return (kind == "forward" and spec.layout == "nhwc" and spec.kernel_size[1] > 1 and spec.stride[1] == 1
            and config.block_m <= ROW_TILE_PIXELS)


def row_tiles_by_default(spec: ConvSpec) -> bool:
    """Whether the forward's default tile is one row's pixels (row_tiles at the widest such tile)."""
    return row_tiles(spec, "forward", KernelConfig(ROW_TILE_PIXELS, 8, 0))


def _gather_rows(config: KernelConfig) -> int:
    """The fewest pixels a row tile (or its halo tile) of ``config`` holds: an element a thread (Triton 3.6's
    gather from a smaller tile fails to compile)."""
    return cdiv(32 * config.num_warps, config.block_n)


def depthwise_grad_weight_config(spec: ConvSpec, *, interpret: bool) -> KernelConfig:
    """Depthwise grad-weight tiles (pixels per step, channels): the [taps, channels] accumulator holds every
    tap, so the channel tile narrows as the window grows (at most 32 accumulators a thread at 4 warps, 8
    warps past that), and the pixels per step fill the window's budget (one pixel a step at 31x31), counted
    as if the channel tile were at least 32 wide: a narrower one spreads the window over fewer lanes (a
    16-channel tile spilled 128 bytes at 16 pixels a step, none at 8)."""
    taps = tap_tile(spec)
    if interpret:  # few, large steps
        block_n = pow2_between(spec.out_channels, 1, 64)
        return KernelConfig(max(1, min(256, (1 << 18) // (taps * block_n))), block_n, 0, num_stages=1)
    least = 8 if spec.layout == "nhwc" else 1  # channels_last: 16-byte channel rows
    block_n = pow2_between(spec.out_channels, least, max(least, min(32, 8192 // taps)))
    num_warps = 4 if taps * block_n <= 4096 else 8
    block_m = max(1, _WINDOW_ELEMENTS_PER_WARP * num_warps // (taps * max(block_n, 32)))
    return KernelConfig(block_m, block_n, 0, num_warps=num_warps, num_stages=2)


class Depthwise(Family):
    name = "depthwise"
    templates = {"forward": "depthwise_direct.py.jinja", "grad_input": "depthwise_grad_input.py.jinja",
                 "grad_weight": "depthwise_grad_weight.py.jinja"}
    limits = {"block_m": (1, 1024), "block_n": (1, 1024), "block_k": (0, 0)}

    def rank(self, spec: ConvSpec) -> Optional[int]:
        """Every depthwise conv; the default where neither the banded nor the row kernel is."""
        return 1 if spec.is_depthwise else None

    def computes_backward(self, spec: ConvSpec) -> bool:
        return spec.is_depthwise

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """(pixels, channels); grad-weight: every tap in one program (depthwise_grad_weight_config)."""
        if kind == "grad_weight":
            return depthwise_grad_weight_config(spec, interpret=interpret)
        channels = spec.in_channels if kind == "grad_input" else spec.out_channels
        if interpret:
            return KernelConfig(256, pow2_between(channels, 1, 64), 0, num_stages=1)
        # the window's columns are unrolled: past 16 of them, 8 warps share the loads in flight, on tiles of at
        # most 32 x 32 (32 x 64 spilled 24 bytes on RepLKNet's k27 grad-input at 14 x 14)
        warps = 8 if spec.kernel_size[1] > 16 else 4
        if kind == "forward" and row_tiles_by_default(spec) and spec.kernel_size[1] <= 16:
            # one row's pixels on 2 warps: each thread holds more of the pixels each tap's tile is gathered along
            # (MobileNetV2's dw3 modelled 36.7% of its floor at 64 x 32 on 2 warps, 25.6% at 32 x 64 on 4)
            return KernelConfig(64, pow2_between(channels, 8, 32), 0, num_warps=2)
        if spec.layout == "nhwc":  # channels are contiguous: wide channel tiles
            return KernelConfig(32, pow2_between(channels, 8, 32 if warps == 8 else 64), 0, num_warps=warps)
        if kind == "grad_input":
            # 64 pixels on 2 warps, 16 outputs a thread up to 3 x 3 windows, 8 past them: each thread's gathers
            # of grad_out share more of their index arithmetic (MobileNetV2's dw3 at stride 2: 11.1% of its floor
            # modelled at 128 x 8 on 4 warps, 17.4% here; EfficientNet's dw5 at stride 2 6.5 and 6.6%, where 16
            # outputs a thread took 239 registers for 6.3%)
            return KernelConfig(64, pow2_between(channels, 1, 16 if self.taps(spec) <= 9 else 8), 0, num_warps=2)
        return KernelConfig(128, pow2_between(channels, 1, 8), 0, num_warps=warps)

    def phases(self, spec: ConvSpec, kind: str) -> tuple[int, int]:
        """A strided grad-input's programs each take input pixels of one phase, their rows modulo the stride
        (and in channels_last their columns), so whether a tap reaches them is the program's and the taps that
        reach none are skipped rather than loaded masked (MobileNetV2's dw3 at stride 2 in channels_last: 10.7x
        the ideal bytes requested with every tap loaded, 3.3x by phases). An NCHW phase keeps whole rows, so its
        stores stay along the width."""
        if kind != "grad_input":
            return (1, 1)
        return (spec.stride[0], spec.stride[1] if spec.layout == "nhwc" else 1)

    def forward_serves_input_gradient(self, spec: ConvSpec) -> bool:
        """Where the forward takes tiles of one row's pixels (row_tiles at its default tile), it loads each
        input row once a kernel row, the grad-input kernel every tap's tile (MobileNetV2's dw3 channels_last:
        36.7% of the floor modelled against 15.0%, EfficientNet's dw5 15.3% against 7.0%)."""
        return row_tiles_by_default(spec)

    def keeps_floor(self, config: KernelConfig, spec: ConvSpec) -> bool:
        """Channels_last channel tiles of whole 16-byte vectors, and one load a thread at least (a 16-byte
        vector in channels_last, an element elsewhere, where pixels are gathered)."""
        vector = 16 // ELEMENT_BYTES[spec.dtype] if spec.layout == "nhwc" else 1
        return config.block_n >= vector and config.block_m * config.block_n >= 32 * config.num_warps * vector

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        if kind == "grad_weight":  # every tap in one program
            return (cdiv(spec.out_channels, config.block_n), splits)
        if row_tiles(spec, kind, config):
            return (pixels.rows * cdiv(pixels.width, config.block_m), cdiv(spec.out_channels, config.block_n))
        return super().grid(kind, spec, config, packed, pixels)  # a strided grad-input in phases (Depthwise.phases)

    def fitted(self, config: KernelConfig, spec: ConvSpec, kind: str, pixels: PixelSpace) -> KernelConfig:
        """A tile of one row's pixels (row_tiles) no wider than the row (a power of two), with at least an
        element a thread (_gather_rows). A grad-weight over fewer pixels than a step: one step of all of them
        (a power of two), whose window holds as many times more channels as it holds fewer pixels, up to
        GRAD_WEIGHT_FEW_PIXELS_CHANNELS (Mamba's k4 on a one-token prompt gathered 32 rows for one pixel: 3.7% of
        its floor modelled in channels_last, 2.3% in NCL; one row of 32 channels 21.4 / 22.5%, of 64 37.2 / 41.0%,
        of 128 23.2 / 33.3)."""
        if kind == "grad_weight":
            if pixels.pixels >= config.block_m:
                return config
            rows = pow2_between(pixels.pixels, 1, config.block_m)
            wider = min(GRAD_WEIGHT_FEW_PIXELS_CHANNELS, config.block_n * config.block_m // rows)
            return replace(config, block_m=rows, block_n=pow2_between(spec.out_channels, config.block_n, wider))
        if not row_tiles(spec, kind, config):
            return config
        return replace(config, block_m=min(config.block_m, pow2_between(pixels.width, _gather_rows(config), 1 << 30)))

    def halo(self, spec: ConvSpec, config: KernelConfig, kind: str = "forward",
             band_shift: int = 0) -> tuple[tuple[int, int], int]:
        """A tile of one row's pixels (row_tiles): the (kernel_w - 1) x dilation_w input pixels its taps read
        past the tile, loaded as one tile of a power of two pixels, with at least an element a thread
        (_gather_rows)."""
        if not row_tiles(spec, kind, config):
            return (0, 0), 0
        reach = (spec.kernel_size[1] - 1) * spec.dilation[1]
        return (0, reach), pow2_between(reach, _gather_rows(config), 1 << 30)

    def weight_layout(self, kind: str, weight_memory: str) -> str:
        """A row of output channels per tap: hwio memory makes it one vector load."""
        return "hwio" if kind in ("forward", "grad_input") else "strided"

    def tap_tile(self, spec: ConvSpec, kind: str, config: KernelConfig, halo_tile: int) -> int:
        """grad-weight accumulates every tap in one program (grad_out is loaded once, not once per tap)."""
        return tap_tile(spec) if kind == "grad_weight" else 0

    def tile_depth(self, config: KernelConfig, spec: ConvSpec, kind: str) -> int:
        """grad-weight's step gathers a [BLOCK_M, taps, BLOCK_N] window."""
        return tap_tile(spec) if kind == "grad_weight" else 1

    def requested(self, desc, problem, programs: int, arguments: dict):
        spec, config = problem.spec, desc.config
        m, n, element, taps = config.block_m, config.block_n, ELEMENT_BYTES[spec.dtype], self.taps(spec)
        if desc.kind == "forward" and desc.halo_tile:  # a kernel row's main and halo tiles, each tap's weights
            return programs * spec.kernel_size[0] * ((m + desc.halo_tile) * n + spec.kernel_size[1] * n) * element, None
        if desc.kind == "forward":
            return programs * taps * (m * n + n) * element, None
        if desc.kind == "grad_weight":  # a grad_out tile and an x window a step
            steps = -(-arguments.get("pixels_per_split", 0) // m)
            return programs * steps * m * n * (1 + taps) * element, None
        # grad-input: per channel multiple and tap, a [pixels, channels] grad_out tile and a weight row; each
        # tap reaches one phase of the stride's, whose programs are as many as each other phase's
        return programs * spec.out_channels_per_group * taps / math.prod(desc.phases) * (m * n + n) * element, None
