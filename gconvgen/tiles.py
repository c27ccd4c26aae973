"""Tiles: the launch configuration of a kernel (KernelConfig), the legal tiles of each family, and the
default config the planner picks for a conv at once (tuning finds better ones)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from .ir import ConvSpec, check

ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# What a default config's staged operands may take of an SM's shared memory (Hopper has 227 KiB): half
# of it, so two programs fit. Tuned configs are held to the device's own limit by the search space.
DEFAULT_SHARED_MEMORY_BYTES = 112 * 1024
# The device the default configs are written for: an H200's 132 SMs. A default grid aims for DEFAULT_WAVES
# waves of programs: with one wave or less, SMs sit idle while the slowest program finishes.
H200_SMS = 132
DEFAULT_WAVES = 2


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. block_m / block_n / block_k are the tile sides (what each tiles depends on
    the family and kind: see default_config); num_warps and num_stages are Triton's launch settings."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            check(type(value) is int, f"KernelConfig {name}={value!r} must be an int", TypeError)


@dataclass(frozen=True)
class PixelSpace:
    """The pixels a launch's programs tile: ``rows`` rows (batch x image rows) of ``width`` pixels, of the
    image the kernel walks: the output for the forward, grad-weight and grad-bias, the input for grad-input.
    The grid is a function of it (grid_of); so is a default config, which shrinks its tiles to fill the
    device (default_config)."""

    rows: int
    width: int

    @staticmethod
    def of(kind: str, batch: int, height: int, width: int, out_height: int, out_width: int) -> "PixelSpace":
        """Kernel ``kind``'s pixels for an input of [batch, ., height, width] and an output of out_height x
        out_width."""
        if kind == "grad_input":
            return PixelSpace(batch * height, width)
        return PixelSpace(batch * out_height, out_width)

    @property
    def pixels(self) -> int:
        """rows x width: the flattened (batch, row, column) index's range."""
        return self.rows * self.width


# Tile limits per family: (least side of a tl.dot operand, largest side). tl.dot needs 16.
_DOT_SIDES = (16, 512)
_BLOCK_LIMITS = {
    "igemm": {"block_m": _DOT_SIDES, "block_n": _DOT_SIDES, "block_k": _DOT_SIDES},
    "depthwise_gemm": {"block_m": _DOT_SIDES, "block_n": (1, 64), "block_k": _DOT_SIDES},
    "depthwise": {"block_m": (1, 1024), "block_n": (1, 1024), "block_k": (0, 0)},
    "depthwise1d": {"block_m": (8, 1024), "block_n": (8, 1024), "block_k": (0, 0)},
    "reduce": {"block_m": (1, 1024), "block_n": (1, 1024), "block_k": (0, 0)},
}
NUM_WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8


def check_config(config: KernelConfig, family: str) -> None:
    """Raise ValueError unless ``config`` is legal for ``family``: every tile side a power of two within the
    family's limits (block_k 0 where the family has no reduction tile), num_warps one of NUM_WARPS and
    1 <= num_stages <= MAX_STAGES. A tuning record is checked with this before it is used."""
    check(isinstance(config, KernelConfig), f"config={config!r} must be a KernelConfig", TypeError)
    check(family in _BLOCK_LIMITS, f"family={family!r} is not a kernel family; use one of {sorted(_BLOCK_LIMITS)}")
    for name, (low, high) in _BLOCK_LIMITS[family].items():
        value = getattr(config, name)
        power_of_two = value > 0 and value & (value - 1) == 0
        check(low <= value <= high and (power_of_two or value == low == 0),
              f"{name}={value} is not legal for the {family} family; use a power of two in [{low}, {high}]"
              if high else f"{name}={value} is not legal for the {family} family; it has no such tile, use 0")
    check(config.num_warps in NUM_WARPS, f"num_warps={config.num_warps} must be one of {NUM_WARPS}")
    check(1 <= config.num_stages <= MAX_STAGES, f"num_stages={config.num_stages} must be in [1, {MAX_STAGES}]")


def pow2_between(value: int, low: int, high: int) -> int:
    """The power of two nearest above ``value``, clamped to [low, high]: a tile side."""
    return max(low, min(high, 1 << max(0, value - 1).bit_length()))


def band_dot(spec: ConvSpec) -> str:
    """The depthwise_gemm dot for ``spec``'s layout. "channels" (channels_last): the input tile holds BLOCK_N
    channels, the contiguous axis, for 16-byte loads, so the dot is batched over them (3-D: mma.sync on
    sm_90). "rows" (NCHW, strided): a program takes its channels one at a time, a 2-D [rows, band] x
    [band, strip] dot each (wgmma on sm_90), its rows lying along the width."""
    return "channels" if spec.layout == "nhwc" else "rows"


def band_operand_bytes(config: KernelConfig, spec: ConvSpec) -> int:
    """Shared memory the depthwise_gemm operands of ``config`` take: num_stages x the channels in flight
    (block_n when the dot is batched over channels, else 1) x (the [block_m, block_k] input tile + the
    [block_k, block_k] band)."""
    tile = config.block_m * config.block_k + config.block_k * config.block_k
    channels = config.block_n if band_dot(spec) == "channels" else 1
    return config.num_stages * channels * tile * ELEMENT_BYTES[spec.dtype]


def band_steps(spec: ConvSpec, block_k: int, band_shift: int) -> int:
    """How many [block_k, block_k] band matrices cover the input band of one depthwise_gemm strip of block_k
    output columns: band_shift columns read early (KernelDesc.band_shift), then (block_k - 1) x stride + the window's
    width columns, in block_k steps."""
    window_width = (spec.kernel_size[1] - 1) * spec.dilation[1] + 1
    return -(-(band_shift + (block_k - 1) * spec.stride[1] + window_width) // block_k)


def default_config(spec: Optional[ConvSpec], family: str, kind: str, *, interpret: bool,
                   pixels: Optional[PixelSpace] = None) -> KernelConfig:
    """A sound config chosen at once from the spec and, when given, the launch's ``pixels``; tuning finds
    better ones.

    Forward igemm tiles (pixels, output channels, reduction); grad-input igemm (input pixels, input
    channels, reduction); grad-weight igemm (output channels, weight columns, pixels); depthwise_gemm
    (output rows, channels, column strip); depthwise1d (output positions of one row, channels); the direct
    depthwise kernels and the bias reduction (pixels, channels). Under the interpreter each program costs
    milliseconds, so blocks are large and grids small. On a GPU, a forward or grad-input tile chosen from
    the spec shrinks until its grid over ``pixels`` fills the device (filled); the reductions (grad-weight,
    grad-bias) split their pixels to fill it instead (runtime/launch.py split_pixels).
    """
    config = _spec_default(spec, family, kind, interpret=interpret)
    if interpret or pixels is None or kind not in ("forward", "grad_input"):
        return config
    return filled(config, spec, family, kind, pixels)


def _spec_default(spec: Optional[ConvSpec], family: str, kind: str, *, interpret: bool) -> KernelConfig:
    """default_config's tile chosen from the spec alone: the largest a default starts from."""
    stages = 1 if interpret else 3
    if family == "reduce":  # the bias gradient
        return KernelConfig(256 if interpret else 64, 64 if interpret else 32, 0, num_stages=1 if interpret else 2)
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    if family == "igemm" and kind == "grad_weight":  # NCHW activations are staged channels_last as well
        return KernelConfig(pow2_between(spec.out_channels_per_group, 16, 64),
                            pow2_between(spec.in_channels_per_group * taps, 16, 64), 256 if interpret else 64,
                            num_stages=stages)
    if family == "igemm":
        channels = pow2_between(packed_channels(spec, kind), 16, 128)
        return _igemm_config(spec, kind, 256 if interpret else 128, channels, interpret=interpret)
    if family == "depthwise_gemm":  # accumulators: block_n x block_m x block_k
        if interpret:
            return KernelConfig(32, pow2_between(spec.out_channels, 1, 16), 16, num_stages=1)
        if band_dot(spec) == "rows":  # one channel's 2-D dot: 128 rows on 8 warps (wgmma, no spills at k7 and k31)
            config = KernelConfig(128, 1, 32, num_warps=8, num_stages=3)
            while config.num_stages > 1 and band_operand_bytes(config, spec) > DEFAULT_SHARED_MEMORY_BYTES:
                config = replace(config, num_stages=config.num_stages - 1)  # float64 tiles are larger
            return config
        # channels_last: 8 channels for 16-byte loads; 8 warps hold the batched dot without spilling at k7 and k31
        config = KernelConfig(32, pow2_between(spec.out_channels, 1, 8), 32, num_warps=8)
        while config.block_n > 1 and band_operand_bytes(config, spec) > DEFAULT_SHARED_MEMORY_BYTES:
            config = replace(config, block_n=config.block_n // 2)  # float32 and float64 tiles are larger
        return config
    channels = spec.in_channels if kind == "grad_input" else spec.out_channels
    if family == "depthwise1d":  # (output positions of one row, channels)
        if interpret:
            return KernelConfig(256, pow2_between(channels, 8, 64), 0, num_warps=1, num_stages=1)
        block_n = pow2_between(channels, 8, 128 if spec.layout == "nhwc" else 64)
        warps = _depthwise1d_warps(block_n)
        # 16 outputs a thread, no spills
        return KernelConfig(max(8, 512 * warps // block_n), block_n, 0, num_warps=warps, num_stages=1)
    if kind == "grad_weight":
        return depthwise_grad_weight_config(spec, interpret=interpret)
    if interpret:
        return KernelConfig(256, pow2_between(channels, 1, 64), 0, num_stages=1)
    # the window's columns are unrolled: past 16 of them, 8 warps share the loads in flight, on tiles of at
    # most 32 x 32 (32 x 64 spilled 24 bytes on RepLKNet's k27 grad-input at 14 x 14)
    warps = 8 if spec.kernel_size[1] > 16 else 4
    if spec.layout == "nhwc":  # channels are contiguous: wide channel tiles
        return KernelConfig(32, pow2_between(channels, 8, 32 if warps == 8 else 64), 0, num_warps=warps)
    return KernelConfig(128, pow2_between(channels, 1, 8), 0, num_warps=warps)


# A warp's least share of an igemm accumulator: one 16x16 tensor-core tile. A shrunk tile runs fewer warps
# rather than warps that repeat each other's work.
_ACCUMULATOR_ELEMENTS_PER_WARP = 16 * 16


def _igemm_config(spec: ConvSpec, kind: str, block_m: int, block_n: int, *, interpret: bool) -> KernelConfig:
    """The igemm forward or grad-input config of tile (block_m pixels, block_n channels of the packed groups):
    the reduction runs tap by tap, a step is block_k channels of the packed groups. An NCHW activation is
    staged channels_last (lowering.choose_layout_constants), but an NCHW output is stored along the width:
    a 128 x 64 accumulator takes 8 warps to convert for that store without spills."""
    reduced = spec.out_channels_per_group if kind == "grad_input" else spec.in_channels_per_group
    tile = KernelConfig(block_m, block_n, 16, num_stages=1 if interpret else 3)
    packed = groups_per_program(spec, "igemm", tile, kind)
    wide_store = spec.layout != "nhwc" and block_m * block_n >= 128 * 64 and not interpret
    warps = min(8 if wide_store else 4, max(1, block_m * block_n // _ACCUMULATOR_ELEMENTS_PER_WARP))
    return replace(tile, block_k=pow2_between(packed * reduced, 16, 64 if interpret else 32), num_warps=warps)


def _depthwise1d_warps(block_n: int) -> int:
    """sm_90 makes each tap's tl.gather warp-local: 8 lanes across channels, warps side by side along them,
    so a channel tile under 8 x num_warps would repeat work: one warp per 8 channels, at most 4."""
    return max(1, min(4, block_n // 8))


def filled(config: KernelConfig, spec: ConvSpec, family: str, kind: str, pixels: PixelSpace) -> KernelConfig:
    """``config`` with its pixel tile (block_m: pixels, positions, or the banded family's rows) halved, then
    its channel tile (block_n), while its grid over ``pixels`` has fewer than DEFAULT_WAVES x H200_SMS
    programs and the halved tile keeps the family's floor (keeps_floor); where even the floor has fewer,
    the floor. Halving the channel tile of packed igemm groups packs fewer groups: the grid grows either way."""
    wanted = DEFAULT_WAVES * H200_SMS
    for side in ("block_m", "block_n"):
        while programs_of(config, spec, family, kind, pixels) < wanted:
            smaller = replace(config, **{side: getattr(config, side) // 2})
            if family == "igemm":  # the reduction step follows the packed groups, the warps the tile
                smaller = _igemm_config(spec, kind, smaller.block_m, smaller.block_n, interpret=False)
            elif family == "depthwise1d":
                smaller = replace(smaller, num_warps=_depthwise1d_warps(smaller.block_n))
            if not keeps_floor(smaller, spec, family):
                break
            config = smaller
    return config


def keeps_floor(config: KernelConfig, spec: ConvSpec, family: str) -> bool:
    """Whether a shrunk default tile is still sane: within the family's limits (check_config); tl.dot sides
    of 16 (igemm; the banded family's rows); channels_last channel tiles of whole 16-byte vectors (the banded
    and direct depthwise families); and a direct depthwise tile of one load a thread at least (a 16-byte
    vector in channels_last, an element elsewhere, where pixels are gathered)."""
    vector = 16 // ELEMENT_BYTES[spec.dtype] if spec.layout == "nhwc" else 1
    within = all(getattr(config, side) >= low for side, (low, _) in _BLOCK_LIMITS[family].items())
    if family in ("igemm", "depthwise1d"):
        return within
    if family == "depthwise_gemm":
        return within and config.block_m >= _DOT_SIDES[0] and config.block_n >= vector
    return within and config.block_n >= vector and config.block_m * config.block_n >= 32 * config.num_warps * vector


def programs_of(config: KernelConfig, spec: ConvSpec, family: str, kind: str, pixels: PixelSpace) -> int:
    """The programs of ``config``'s grid over ``pixels`` (grid_of, with the groups it packs)."""
    return math.prod(grid_of(kind, family, spec, config, groups_per_program(spec, family, config, kind), pixels))


def grid_of(kind: str, family: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int,
            pixels: PixelSpace, *, splits: int = 1, channels: int = 0) -> tuple[int, ...]:
    """The launch grid of a kernel tiling ``pixels`` with ``config`` and ``packed`` groups a program
    (``splits`` pixel ranges for the reductions, grad_weight and grad_bias; grad_bias, which has no spec,
    reduces ``channels`` channels)."""
    if kind == "grad_bias":
        return (_cdiv(channels, config.block_n), splits)
    if family == "igemm":
        if kind == "grad_weight":
            columns = packed * spec.in_channels_per_group * spec.kernel_size[0] * spec.kernel_size[1]
            return (_cdiv(packed * spec.out_channels_per_group, config.block_m) * _cdiv(columns, config.block_n),
                    _cdiv(spec.groups, packed), splits)
        return (_cdiv(pixels.pixels, config.block_m), _cdiv(packed * packed_channels(spec, kind), config.block_n),
                _cdiv(spec.groups, packed))
    if family == "depthwise_gemm":
        return (_cdiv(pixels.rows, config.block_m), _cdiv(pixels.width, config.block_k),
                _cdiv(spec.out_channels, config.block_n))
    if family == "depthwise1d":  # (row x position tile, channel tile): a program never spans two rows
        return (pixels.rows * _cdiv(pixels.width, config.block_m), _cdiv(spec.out_channels, config.block_n))
    if kind == "grad_weight":  # every tap in one program
        return (_cdiv(spec.out_channels, config.block_n), splits)
    channels = spec.in_channels if kind == "grad_input" else spec.out_channels
    return (_cdiv(pixels.pixels, config.block_m), _cdiv(channels, config.block_n))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tap_tile(spec: ConvSpec) -> int:
    """The taps of the window padded to a power of two: the depthwise grad-weight accumulator's rows."""
    return 1 << (spec.kernel_size[0] * spec.kernel_size[1] - 1).bit_length()


# Elements of the [pixels, taps, channels] x window a depthwise grad-weight step gathers, per warp: 32 values
# a thread, converted to the accumulator's type, beside the [taps, channels] accumulator.
_WINDOW_ELEMENTS_PER_WARP = 1024


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


def packed_channels(spec: ConvSpec, kind: str) -> int:
    """The channels per group that an igemm kernel's channel tile packs: input channels for grad-input,
    output channels for the forward and grad-weight."""
    return spec.in_channels_per_group if kind == "grad_input" else spec.out_channels_per_group


def groups_per_program(spec: ConvSpec, family: str, config: KernelConfig, kind: str) -> int:
    """How many consecutive groups one igemm program computes: as many as fill its channel tile (block_n
    for the forward and grad-input, block_m for grad-weight), so that narrow groups (ResNeXt's 4 channels)
    fill a tensor-core tile and their loads cover whole runs of channels; 1 for other families."""
    if family != "igemm":
        return 1
    tile = config.block_m if kind == "grad_weight" else config.block_n
    return min(spec.groups, max(1, tile // packed_channels(spec, kind)))
