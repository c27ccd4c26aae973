"""Lowering: a planned conv becomes one frozen, typed description per kernel to run (KernelDesc).

Every decision about a kernel is a named pass below that writes typed fields: the family, the channel
masks, the layout constants, the reduction order, the index width, the precision, the tile config and
how many groups share a program. The renderer, the launcher, the ahead-of-time compiler, the tuner and
``gconvgen inspect`` read the description and the argument table (arguments.py); none decides again.
A field no pass wrote is an error when the description is built, never a default.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Optional

from . import knobs
from .arguments import ArgumentTable, table_for
from .ir import DTYPES, ConvSpec, check
from .plan import Plan, planned

KINDS = ("forward", "grad_input", "grad_weight", "grad_bias")
FAMILIES = ("igemm", "depthwise", "depthwise_gemm", "reduce")
ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
INT32_MAX = 2**31 - 1
# What a default config's staged operands may take of an SM's shared memory (Hopper has 227 KiB): half
# of it, so two programs fit. Tuned configs are held to the device's own limit by the search space.
DEFAULT_SHARED_MEMORY_BYTES = 112 * 1024
ATEN = "aten"      # a tuning record's choice when PyTorch's own conv won
KERNEL = "kernel"  # a tuning record's choice when a generated kernel won


# ---------------------------------------------------------------------------------------------- configs


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


# Tile limits per family: (least side of a tl.dot operand, largest side). tl.dot needs 16.
_DOT_SIDES = (16, 512)
_BLOCK_LIMITS = {
    "igemm": {"block_m": _DOT_SIDES, "block_n": _DOT_SIDES, "block_k": _DOT_SIDES},
    "depthwise_gemm": {"block_m": _DOT_SIDES, "block_n": (1, 64), "block_k": _DOT_SIDES},
    "depthwise": {"block_m": (1, 1024), "block_n": (1, 1024), "block_k": (0, 0)},
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


@dataclass(frozen=True)
class Choice:
    """What to run for one kernel of one layer: a tuned config of a family, aten, or (untuned) the planner's
    default family with its default config."""

    kind: str                       # KERNEL, ATEN or "default"
    config: Optional[KernelConfig] = None
    family: Optional[str] = None    # None: the planner's default family


DEFAULT = Choice("default")


def pow2_between(value: int, low: int, high: int) -> int:
    """The power of two nearest above ``value``, clamped to [low, high]: a tile side."""
    return max(low, min(high, 1 << max(0, value - 1).bit_length()))


def band_operand_bytes(config: KernelConfig, dtype: str) -> int:
    """Shared memory the depthwise_gemm operands of ``config`` take: num_stages x block_n channels x
    (the [block_m, block_k] input tile + the [block_k, block_k] band)."""
    tile = config.block_m * config.block_k + config.block_k * config.block_k
    return config.num_stages * config.block_n * tile * ELEMENT_BYTES[dtype]


def default_config(spec: Optional[ConvSpec], family: str, kind: str, *, interpret: bool) -> KernelConfig:
    """A sound config chosen at once from the spec; tuning finds better ones.

    Forward igemm tiles (pixels, output channels, reduction); grad-input igemm (input pixels, input
    channels, reduction); grad-weight igemm (output channels, weight columns, pixels); depthwise_gemm
    (output rows, channels, column strip); the direct depthwise kernels and the bias reduction (pixels,
    channels). Under the interpreter each program costs milliseconds, so blocks are large and grids small.
    """
    stages = 1 if interpret else 3
    if family == "reduce":  # the bias gradient
        return KernelConfig(256 if interpret else 64, 64 if interpret else 32, 0, num_stages=1 if interpret else 2)
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    if family == "igemm" and kind == "grad_weight":  # NCHW: 8 warps share the per-element gathers (no spills)
        return KernelConfig(pow2_between(spec.out_channels_per_group, 16, 64),
                            pow2_between(spec.in_channels_per_group * taps, 16, 64), 256 if interpret else 64,
                            num_warps=8 if spec.layout != "nhwc" and not interpret else 4, num_stages=stages)
    if family == "igemm":  # the reduction runs tap by tap: a step is block_k channels of the packed groups
        channels, reduced = ((spec.in_channels_per_group, spec.out_channels_per_group) if kind == "grad_input"
                             else (spec.out_channels_per_group, spec.in_channels_per_group))
        tile = KernelConfig(256 if interpret else 128, pow2_between(channels, 16, 128), 16, num_stages=stages)
        packed = groups_per_program(spec, family, tile, kind)
        # NCHW: the activation tile is a gather with an address per element; 8 warps share it without spilling
        warps = 8 if spec.layout != "nhwc" and not interpret else 4
        return replace(tile, block_k=pow2_between(packed * reduced, 16, 64 if interpret else 32), num_warps=warps)
    if family == "depthwise_gemm":  # accumulators: block_n x block_m x block_k
        if interpret:
            return KernelConfig(32, pow2_between(spec.out_channels, 1, 16), 16, num_stages=1)
        # channels_last: channels are contiguous, enough of them for 16-byte loads; NCHW: the strip is
        wanted = 8 if spec.layout == "nhwc" else 2
        config = KernelConfig(32 if spec.layout == "nhwc" else 64, pow2_between(spec.out_channels, 1, wanted), 32)
        while config.block_n > 1 and band_operand_bytes(config, spec.dtype) > DEFAULT_SHARED_MEMORY_BYTES:
            config = replace(config, block_n=config.block_n // 2)  # float32 and float64 tiles are larger
        return config
    channels = spec.in_channels if kind == "grad_input" else spec.out_channels
    if kind == "grad_weight":
        return depthwise_grad_weight_config(spec, interpret=interpret)
    if interpret:
        return KernelConfig(256, pow2_between(channels, 1, 64), 0, num_stages=1)
    # the window's columns are unrolled: past 16 of them, 8 warps share the loads in flight (no spills at 31)
    warps = 8 if spec.kernel_size[1] > 16 else 4
    if spec.layout == "nhwc":  # channels are contiguous: wide channel tiles
        return KernelConfig(32, pow2_between(channels, 8, 64), 0, num_warps=warps)
    return KernelConfig(128, pow2_between(channels, 1, 8), 0, num_warps=warps)


def tap_tile(spec: ConvSpec) -> int:
    """The taps of the window padded to a power of two: the depthwise grad-weight accumulator's rows."""
    return 1 << (spec.kernel_size[0] * spec.kernel_size[1] - 1).bit_length()


# Elements of the [pixels, taps, channels] x window a depthwise grad-weight step gathers, per warp: 32 values
# a thread, converted to the accumulator's type, beside the [taps, channels] accumulator.
_WINDOW_ELEMENTS_PER_WARP = 1024


def depthwise_grad_weight_config(spec: ConvSpec, *, interpret: bool) -> KernelConfig:
    """Depthwise grad-weight tiles (pixels per step, channels): the [taps, channels] accumulator holds every
    tap, so the channel tile narrows as the window grows (at most 32 accumulators a thread at 4 warps, 8
    warps past that), and the pixels per step fill the window's budget (one pixel a step at 31x31)."""
    taps = tap_tile(spec)
    if interpret:  # few, large steps
        block_n = pow2_between(spec.out_channels, 1, 64)
        return KernelConfig(max(1, min(256, (1 << 18) // (taps * block_n))), block_n, 0, num_stages=1)
    least = 8 if spec.layout == "nhwc" else 1  # channels_last: 16-byte channel rows
    block_n = pow2_between(spec.out_channels, least, max(least, min(32, 8192 // taps)))
    num_warps = 4 if taps * block_n <= 4096 else 8
    block_m = max(1, _WINDOW_ELEMENTS_PER_WARP * num_warps // (taps * block_n))
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


# ---------------------------------------------------------------------------------------------- the description


@dataclass(frozen=True)
class KernelDesc:
    """One kernel to run, with every decision made: what the template renders and the launcher launches.

    Source fields (everything but ``config`` and ``groups_per_program``) decide the rendered module and
    its uri; the launch fields are Triton constexprs passed at launch, so one module serves every config.
    """

    kind: str                   # forward, grad_input, grad_weight or grad_bias
    family: str                 # igemm, depthwise, depthwise_gemm, or reduce (grad_bias)
    spec: Optional[ConvSpec]    # the conv as this kernel sees it (None for grad_bias, which needs the dtype only)
    dtype: str
    template: str
    mask_input_channels: bool   # lowered PadInputChannels
    mask_output_channels: bool  # lowered SliceOutputChannels
    channels_contiguous: bool   # the activation the kernel reads has unit channel stride (channels_last)
    width_contiguous: bool      # ... unit width stride (NCHW)
    reduction_order: str        # igemm: "tap_major" (forward, grad-input); grad-weight "tap_channel" or "channel_tap"
    wide_index: bool            # 64-bit offsets: some offset or flattened index of this launch needs them
    interpret: bool             # rendered for Triton's interpreter
    dot_in_float32: bool        # bf16 tl.dot is wrong under the interpreter: the operands are cast for it
    input_precision: str        # tl.dot's: "tf32" or "ieee"
    accumulator: str            # tl.float32, or tl.float64 for float64
    weight_tap_major: bool      # direct depthwise forward / grad-input: the weight is read tap-major (literal strides)
    tap_tile: int               # depthwise grad-weight: the window's taps padded to a power of two; else 0
    config: KernelConfig
    groups_per_program: int

    @property
    def arguments(self) -> ArgumentTable:
        """The kernel's declared arguments (arguments.py): what the signature, launch and compile read."""
        return table_for(self.kind)

    @property
    def uri(self) -> str:
        """A readable name unique to the rendered source, e.g.
        ``igemm_ci4_co4_g32_k3x3_s1x1_d1x1_p1_1_1_1_nhwc_bfloat16_bias`` or ``grad_weight_depthwise_...``;
        ``grad_bias_bfloat16`` for the bias gradient. Flags: maskin/maskout (channel masks), tf32, i64, interp."""
        flags = [flag for flag, on in (("tf32", self.input_precision == "tf32"), ("i64", self.wide_index),
                                       ("interp", self.interpret)) if on]
        if self.kind == "grad_bias":
            return "_".join(["grad_bias", self.dtype, *flags])
        spec = self.spec
        parts = [self.family] if self.kind == "forward" else [self.kind, self.family]
        parts += [f"ci{spec.in_channels}", f"co{spec.out_channels}", f"g{spec.groups}",
                  "k{}x{}".format(*spec.kernel_size), "s{}x{}".format(*spec.stride), "d{}x{}".format(*spec.dilation),
                  "p" + "_".join(map(str, spec.padding)), spec.layout, spec.dtype]
        parts += [flag for flag, on in (("bias", spec.bias), ("maskin", self.mask_input_channels),
                                        ("maskout", self.mask_output_channels)) if on]
        return "_".join(parts + flags)

    @property
    def kernel_name(self) -> str:
        """The Triton function's name in the rendered module: ``gconvgen_`` + its uri."""
        return "gconvgen_" + self.uri

    @property
    def meta(self) -> dict:
        """The launch keywords: the tile constexprs, num_warps and num_stages."""
        config = self.config
        return {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                "GROUP_BLOCK": self.groups_per_program, "num_warps": config.num_warps, "num_stages": config.num_stages}

    def grid(self, batch: int, height: int, width: int, out_height: int, out_width: int, *, splits: int = 1,
             channels: int = 0) -> tuple[int, ...]:
        """The launch grid for an input of [batch, ., height, width] and an output of out_height x out_width
        (``splits`` pixel ranges for the reductions, grad_weight and grad_bias; grad_bias, which has no
        spec, reduces ``channels`` channels)."""
        config, spec, packed = self.config, self.spec, self.groups_per_program
        if self.kind == "grad_bias":
            return (_cdiv(channels, config.block_n), splits)
        if self.family == "igemm":
            if self.kind == "grad_weight":
                columns = packed * spec.in_channels_per_group * spec.kernel_size[0] * spec.kernel_size[1]
                return (_cdiv(packed * spec.out_channels_per_group, config.block_m) * _cdiv(columns, config.block_n),
                        _cdiv(spec.groups, packed), splits)
            pixels = batch * (height * width if self.kind == "grad_input" else out_height * out_width)
            return (_cdiv(pixels, config.block_m), _cdiv(packed * packed_channels(spec, self.kind), config.block_n),
                    _cdiv(spec.groups, packed))
        if self.family == "depthwise_gemm":
            return (_cdiv(batch * out_height, config.block_m), _cdiv(out_width, config.block_k),
                    _cdiv(spec.out_channels, config.block_n))
        if self.kind == "grad_weight":  # every tap in one program
            return (_cdiv(spec.out_channels, config.block_n), splits)
        if self.kind == "grad_input":
            return (_cdiv(batch * height * width, config.block_m), _cdiv(spec.in_channels, config.block_n))
        return (_cdiv(batch * out_height * out_width, config.block_m), _cdiv(spec.out_channels, config.block_n))

    def explain(self) -> str:
        """Every field, one a line: what ``gconvgen plan`` prints for each kernel."""
        lines = [f"{self.kind} kernel {self.uri}"]
        for name in self.__dataclass_fields__:
            if name not in ("kind", "spec"):
                lines.append(f"  {name:<22} {getattr(self, name)}")
        return "\n".join(lines)

    @property
    def reduction_block(self) -> int:
        """Pixels a split reduction (grad_weight, grad_bias) sums per step: a split's range is a multiple."""
        return self.config.block_k if self.family == "igemm" else self.config.block_m


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------- lowering passes
# Each pass reads the context and writes fields; the description is built from the fields at the end.


@dataclass(frozen=True)
class Context:
    """What lowering starts from: the plan, which kernel, the tuning choice and the launch's facts."""

    plan: Optional[Plan]
    kind: str
    dtype: str
    choice: Choice
    interpret: bool
    allow_tf32: bool
    wide_index: bool


def choose_family(fields: dict, ctx: Context) -> None:
    """Forward: the tuned family, else the planner's default; backward: the plan's backward family."""
    if ctx.kind == "grad_bias":
        fields.update(family="reduce", template="grad_bias.py.jinja", spec=None)
        return
    conv_plan = ctx.plan
    family = conv_plan.backward_family if ctx.kind != "forward" else (ctx.choice.family or conv_plan.family)
    check(ctx.kind != "forward" or family in conv_plan.families,
          f"family={family!r} cannot compute {conv_plan.spec}; use one of {conv_plan.families}")
    fields.update(family=family, template=TEMPLATES[ctx.kind, family], spec=conv_plan.spec)


def lower_padding_to_masks(fields: dict, ctx: Context) -> None:
    """The plan's PadInputChannels / SliceOutputChannels become load and store masks: nothing is copied."""
    masks = ctx.plan.channel_masks if ctx.plan is not None else (False, False)
    fields.update(mask_input_channels=masks[0], mask_output_channels=masks[1])


def choose_layout_constants(fields: dict, ctx: Context) -> None:
    """A unit stride the template writes as a literal 1, so Triton can vectorise along it."""
    layout = ctx.plan.spec.layout if ctx.plan is not None else "strided"
    fields.update(channels_contiguous=layout == "nhwc", width_contiguous=layout == "nchw")


def choose_reduction_order(fields: dict, ctx: Context) -> None:
    """igemm forward and grad-input reduce tap by tap ("tap_major": a step is a run of channels at one tap, the
    tap decoded once per step). igemm grad-weight flattens its weight columns (channel, tap): channels
    innermost for channels_last, so consecutive columns are consecutive addresses; taps innermost for NCHW."""
    if fields["family"] != "igemm":
        fields["reduction_order"] = "none"
    elif ctx.kind in ("forward", "grad_input"):
        fields["reduction_order"] = "tap_major"
    else:
        fields["reduction_order"] = "tap_channel" if fields["channels_contiguous"] else "channel_tap"


def choose_index_width(fields: dict, ctx: Context) -> None:
    """64-bit offsets only where the launch needs them (see needs_wide_index); common shapes stay 32-bit."""
    fields["wide_index"] = ctx.wide_index


def choose_precision(fields: dict, ctx: Context) -> None:
    """float32 dots run on TF32 when torch allows it for convs (as F.conv2d does); float64 accumulates in
    float64; under the interpreter bf16 dot operands are cast to float32 (its bf16 dot is wrong)."""
    fields.update(dtype=ctx.dtype, interpret=ctx.interpret,
                  input_precision="tf32" if ctx.dtype == "float32" and ctx.allow_tf32 else "ieee",
                  accumulator="tl.float64" if ctx.dtype == "float64" else "tl.float32",
                  dot_in_float32=ctx.interpret and ctx.dtype == "bfloat16")


def choose_weight_layout(fields: dict, ctx: Context) -> None:
    """The direct depthwise kernels read a weight row of channels per tap: the runtime hands them the weight
    tap-major (runtime/weights.py), so the row is one vector load at literal strides."""
    direct = fields["family"] == "depthwise" and ctx.kind in ("forward", "grad_input")
    fields["weight_tap_major"] = direct


def choose_tap_tile(fields: dict, ctx: Context) -> None:
    """Depthwise grad-weight accumulates every tap in one program (grad_out is loaded once, not once per
    tap): its [taps, channels] accumulator has tap_tile rows."""
    depthwise_grad_weight = ctx.kind == "grad_weight" and fields["family"] == "depthwise"
    fields["tap_tile"] = tap_tile(fields["spec"]) if depthwise_grad_weight else 0


def choose_tile_config(fields: dict, ctx: Context) -> None:
    """The tuned config when there is one, else the family's default (default_config)."""
    config = ctx.choice.config
    if config is None:
        config = default_config(fields["spec"], fields["family"], ctx.kind, interpret=ctx.interpret)
    check_config(config, fields["family"])
    fields["config"] = config


def pack_groups(fields: dict, ctx: Context) -> None:
    """Narrow igemm groups share a program (groups_per_program)."""
    spec = fields["spec"]
    fields["groups_per_program"] = 1 if spec is None else groups_per_program(spec, fields["family"], fields["config"],
                                                                               ctx.kind)


LOWERING_PIPELINE: list[tuple[str, Callable[[dict, Context], None]]] = [
    ("choose_family", choose_family),                      # tuned or planned family; backward follows the plan
    ("lower_padding_to_masks", lower_padding_to_masks),    # channel padding becomes masks, never a copy
    ("choose_layout_constants", choose_layout_constants),  # literal unit strides for vector loads
    ("choose_reduction_order", choose_reduction_order),    # igemm's flattened reduction: contiguous first
    ("choose_index_width", choose_index_width),            # 64-bit offsets only where a launch needs them
    ("choose_precision", choose_precision),                # TF32, accumulator, interpreter casts
    ("choose_weight_layout", choose_weight_layout),        # direct depthwise: tap-major weight rows
    ("choose_tap_tile", choose_tap_tile),                  # depthwise grad-weight holds every tap
    ("choose_tile_config", choose_tile_config),            # tuned config, or the family default
    ("pack_groups", pack_groups),                          # narrow groups share an igemm program
]

TEMPLATES = {
    ("forward", "igemm"): "grouped_igemm.py.jinja",
    ("forward", "depthwise"): "depthwise_direct.py.jinja",
    ("forward", "depthwise_gemm"): "depthwise_gemm.py.jinja",
    ("grad_input", "igemm"): "grouped_igemm_grad_input.py.jinja",
    ("grad_input", "depthwise"): "depthwise_grad_input.py.jinja",
    ("grad_weight", "igemm"): "grouped_igemm_grad_weight.py.jinja",
    ("grad_weight", "depthwise"): "depthwise_grad_weight.py.jinja",
}


def lower(conv_plan: Optional[Plan], kind: str, *, dtype: Optional[str] = None, choice: Choice = DEFAULT,
          interpret: bool, allow_tf32: bool, wide_index: bool = False) -> KernelDesc:
    """The description of kernel ``kind`` of ``conv_plan`` (None for grad_bias, which takes ``dtype``).

    ``choice`` is a tuning record's (its family and config; DEFAULT for the planner's); ``interpret``
    renders for Triton's interpreter; ``allow_tf32`` lets float32 dots use TF32; ``wide_index`` asks for
    64-bit offsets (needs_wide_index). Raises ValueError for a family or config that cannot run it.
    """
    check(kind in KINDS, f"kind={kind!r} is not a kernel kind; use one of {KINDS}")
    check(conv_plan is not None or kind == "grad_bias", f"kind={kind!r} needs a plan")
    dtype = dtype or conv_plan.spec.dtype
    check(dtype in DTYPES, f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    ctx = Context(conv_plan, kind, dtype, choice, interpret, allow_tf32, wide_index)
    fields: dict = {"kind": kind}
    for name, run_pass in LOWERING_PIPELINE:
        run_pass(fields, ctx)
    return KernelDesc(**fields)


@functools.lru_cache(maxsize=4096)
def lowered(spec: Optional[ConvSpec], kind: str, dtype: str, choice: Choice, interpret: bool, allow_tf32: bool,
            wide_index: bool, padding_budget: float) -> KernelDesc:
    """``lower`` memoised on its inputs: a warm call builds no description."""
    conv_plan = None if spec is None else planned(spec, padding_budget)
    return lower(conv_plan, kind, dtype=dtype, choice=choice, interpret=interpret, allow_tf32=allow_tf32,
                 wide_index=wide_index)


def lowered_for(spec: Optional[ConvSpec], kind: str, dtype: str, choice: Choice, interpret: bool, allow_tf32: bool,
                wide_index: bool) -> KernelDesc:
    """``lowered`` under the current padding budget (GCONVGEN_PADDING_BUDGET)."""
    return lowered(spec, kind, dtype, choice, interpret, allow_tf32, wide_index, knobs.padding_budget())


def needs_wide_index(largest_offset: int, largest_flat_index: int) -> bool:
    """Whether a launch needs 64-bit offsets: some element's offset from its tensor's start, or a flattened
    (batch, height, width) index, does not fit in int32."""
    return largest_offset > INT32_MAX or largest_flat_index > INT32_MAX
