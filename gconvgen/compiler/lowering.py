"""Lowering: a planned conv becomes one frozen, typed description per kernel to run (KernelDesc).

Every decision about a kernel is a named pass below that writes typed fields: the family, the channel
masks, the layout constants, the reduction order, the index width, the precision, the weight layout, the
banded kernel's dot, the row alignment, the tile config and how many groups share a program. The
renderer, the launcher, the ahead-of-time compiler, the tuner and ``gconvgen inspect`` read the description
and the argument table (arguments.py); none decides again.
A field no pass wrote is an error when the description is built, never a default.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

from ..memo import memoized
from .. import knobs
from ..activations import NAMES as ACTIVATIONS
from .arguments import ArgumentTable, table_for
from ..ir import DTYPES, ConvSpec, check
from .plan import Plan, planned
# the families' and tiles' names are re-exported: a config is part of the lowered description
from .families import (  # noqa: F401
    FAMILIES as _REGISTRY, GRAD_BIAS_FAMILY, TEMPLATES, check_config, default_config, family, grid_of,
    groups_per_program, kernel_spec, suiting_first)
from .families.depthwise import depthwise_grad_weight_config, tap_tile  # noqa: F401
from .families.depthwise1d import window_halo  # noqa: F401
from .families.depthwise_gemm import band_dot, band_operand_bytes, band_steps  # noqa: F401
from .families.igemm import packed_channels  # noqa: F401
from .tiles import ELEMENT_BYTES, H200_SMS, KernelConfig, PixelSpace  # noqa: F401

KINDS = ("forward", "grad_input", "grad_weight", "grad_bias")
FAMILIES = tuple(_REGISTRY)  # igemm, depthwise, depthwise_gemm, depthwise1d, reduce (compiler/families)
INT32_MAX = 2**31 - 1
ATEN = "aten"      # a tuning record's choice when PyTorch's own conv won
KERNEL = "kernel"  # a tuning record's choice when a generated kernel won


@dataclass(frozen=True)
class Epilogue:
    """What a forward kernel does to its fp32 accumulator before the one store, in cuDNN's order:
    ``activation(conv + bias + residual)``; ``residual`` says whether a residual tensor is added."""

    activation: str = "none"
    residual: bool = False

    def __post_init__(self) -> None:
        check(self.activation in ACTIVATIONS,
              f"activation={self.activation!r} is not supported; use None or one of {ACTIVATIONS[1:]}")
        check(isinstance(self.residual, bool), f"residual={self.residual!r} must be True or False", TypeError)


NO_EPILOGUE = Epilogue()


@dataclass(frozen=True)
class Choice:
    """What to run for one kernel of one layer: a tuned config of a family, aten, or (untuned) the planner's
    default family with its default config. A grad-input choice with ``transposed`` runs the forward kernel
    of ``family`` on the transposed conv (plan.grad_input_offers)."""

    kind: str                       # KERNEL, ATEN or "default"
    config: Optional[KernelConfig] = None
    family: Optional[str] = None    # None: the planner's default family
    transposed: bool = False


DEFAULT = Choice("default")
LAUNCH_FIELDS = ("config", "groups_per_program")  # KernelDesc's launch constexprs; every other field is source
# Source fields that render nothing of their own where they equal another field: left out of the uri's hash
# there, so that kernels which do not use them keep their names (and Triton's cache of them)
SAME_AS = {"read_alignment": "row_alignment"}



# ---------------------------------------------------------------------------------------------- the description


@dataclass(frozen=True)
class KernelDesc:
    """One kernel to run, with every decision made: what the template renders and the launcher launches.

    Source fields (everything but ``config`` and ``groups_per_program``) decide the rendered module and
    its uri; the launch fields are Triton constexprs passed at launch, so one module serves every config.
    """

    kind: str                   # forward, grad_input, grad_weight or grad_bias
    family: str                 # igemm, depthwise, depthwise_gemm, depthwise1d, or reduce (grad_bias)
    spec: Optional[ConvSpec]    # the conv as this kernel sees it (None for grad_bias, which needs the dtype only)
    dtype: str
    template: str
    mask_input_channels: bool   # lowered PadInputChannels
    mask_output_channels: bool  # lowered SliceOutputChannels
    channels_contiguous: bool   # the activation the kernel reads has unit channel stride (channels_last)
    width_contiguous: bool      # ... unit width stride (NCHW)
    stage_channels_last: bool   # the runtime hands the kernel channels_last copies of the activations it reads
    reduction_order: str        # igemm: "tap_major" (forward, grad-input); grad-weight "tap_channel" or "channel_tap"
    wide_index: bool            # 64-bit offsets: some offset or flattened index of this launch needs them
    activation: str             # the forward epilogue's activation ("none" for the other kinds)
    residual: bool              # the forward epilogue adds a residual tensor
    interpret: bool             # rendered for Triton's interpreter
    dot_in_float32: bool        # bf16 tl.dot is wrong under the interpreter: the operands are cast for it
    input_precision: str        # tl.dot's: "tf32" or "ieee"
    accumulator: str            # tl.float32, or tl.float64 for float64
    halo: tuple[int, int]       # depthwise1d: positions read before / after the main input tile; the banded kernel:
    #                             columns (grad-weight) or strips (forward of one row's strips) past it; else (0, 0)
    halo_tile: int              # the side of each halo tile (families' halo: depthwise1d.halo_tile, ...); 0 without
    row_alignment: int          # kernels reading or writing vectors (Family.reads_aligned_rows): what
    #                             every row, channel and pixel start they read and write is a multiple of
    read_alignment: int         # ... and what those they read are (row_alignment or more): a staged read is a
    #                             channels_last copy, its pixel starts multiples of its channels
    weight_layout: str          # the weight memory the kernel reads at literal strides: hwio, ohwi or strided
    band_dot: str               # depthwise_gemm: "rows" (a 2-D dot per channel) or "channels" (batched); else "none"
    band_shift: int             # banded rows: input columns a strip's band starts before its window (an aligned column)
    tap_tile: int               # depthwise grad-weight: the taps (direct: all, padded to a power of two) or
    #                             kernel rows (banded) whose sums a program holds at once; else 0
    step_rows: int              # banded grad-weight in columns of strips (strip_columns): the output rows of a
    #                             step's BLOCK_M input rows; else 0
    pieces: int                 # banded grad-weight of a wide height-1 window (strip_pieces): the BLOCK_K-column
    #                             pieces of a strip's input band, an accumulator each; else 0
    slide_rows: int             # banded forward sliding down the output rows (Family.slide_rows): the most rows
    #                             a block of them has; else 0
    phases: tuple[int, int]     # depthwise and igemm grad-input: (row, column) phases of the stride, one a
    #                             program (Family.phases); else (1, 1)
    interleave_columns: bool    # igemm grad-input of an NCHW output: a program takes every column phase of its row
    #                             phase in turn and stores them interleaved along the width (Family.interleaves_columns)
    held_weights: int           # igemm_rows forward: the most weight elements (taps x BLOCK_K x BLOCK_N) a
    #                             program of one channel step loads once and holds through its rows
    #                             (Family.held_weights); 0: never held
    config: KernelConfig
    groups_per_program: int

    @property
    def arguments(self) -> ArgumentTable:
        """The kernel's declared arguments (arguments.py): what the signature, launch and compile read."""
        return table_for(self.kind)

    @functools.cached_property
    def uri(self) -> str:
        """The rendered module's identity: a readable prefix (kind, family, the conv's name; the dtype for
        grad_bias) and a hash of every source field, so two descriptions share a uri exactly when they render
        the same source. E.g. ``igemm_ci4_co4_g32_k3x3_s1x1_d1x1_p1_1_1_1_nhwc_bfloat16_bias_3f09c1d2a4b5e6f7``.
        The launch fields (``LAUNCH_FIELDS``: the tile config and group packing) are constexprs passed at
        launch: one module serves every config; a field equal to the one it defaults to (``SAME_AS``) is not
        hashed."""
        source = tuple((name, getattr(self, name)) for name in self.__dataclass_fields__ if name not in LAUNCH_FIELDS
                       and not (name in SAME_AS and getattr(self, name) == getattr(self, SAME_AS[name])))
        digest = hashlib.blake2b(repr(source).encode(), digest_size=8).hexdigest()
        if self.kind == "grad_bias":
            return f"grad_bias_{self.dtype}_{digest}"
        prefix = [self.family] if self.kind == "forward" else [self.kind, self.family]
        return "_".join([*prefix, self.spec.name, digest])

    @property
    def takes_row_alignment(self) -> bool:
        """Whether the launch's row alignment reaches this kernel (choose_row_alignment)."""
        return self.spec is not None and aligns_rows(family(self.family), self.spec, self.band_dot, self.kind,
                                                     self.stage_channels_last)

    @property
    def rounds_reads(self) -> bool:
        """Whether the kernel rounds the strides of the activations it reads by the row alignment
        (Family.rounds_reads): the launch measures only those it rounds."""
        return family(self.family).rounds_reads(self.channels_contiguous)

    @property
    def kernel_name(self) -> str:
        """The Triton function's name in the rendered module: ``gconvgen_`` + its uri."""
        return "gconvgen_" + self.uri

    @functools.cached_property
    def meta(self) -> dict:
        """The launch keywords: the tile constexprs, num_warps and num_stages (built once a description)."""
        config = self.config
        return {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                "GROUP_BLOCK": self.groups_per_program, "num_warps": config.num_warps, "num_stages": config.num_stages}

    def grid(self, pixels: PixelSpace, *, splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        """The launch grid over ``pixels`` (PixelSpace.of a launch's shapes; ``splits`` pixel ranges for the
        reductions, grad_weight and grad_bias; grad_bias, which has no spec, reduces ``channels`` channels)."""
        return grid_of(self.kind, self.family, self.spec, self.config, self.groups_per_program, pixels,
                       splits=splits, channels=channels)

    def explain(self) -> str:
        """Every field, one a line: what ``gconvgen plan`` prints for each kernel."""
        lines = [f"{self.kind} kernel {self.uri}"]
        for name in self.__dataclass_fields__:
            if name not in ("kind", "spec"):
                lines.append(f"  {name:<22} {getattr(self, name)}")
        return "\n".join(lines)

    @property
    def reduction_block(self) -> int:
        """Units a split reduction (grad_weight, grad_bias) sums per step: a split's range is a multiple."""
        return family(self.family).reduction_block(self.config)

    def reduction_units(self, pixels: PixelSpace) -> int:
        """What a split reduction over ``pixels`` sums: output pixels, or the banded grad-weight's strips."""
        return family(self.family).reduction_units(self.spec, self.config, pixels)

    @property
    def least_split_blocks(self) -> int:
        """Blocks of reduction_block units each split of a reduction keeps at least."""
        return family(self.family).least_split_blocks(self.band_dot)


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
    epilogue: Epilogue
    weight_memory: str  # the layout of the weight the launch was given (runtime/weights.py: layout_of)
    row_alignment: int  # what the row and channel strides of the launch's activations are multiples of
    pixels: Optional[PixelSpace]  # what the launch tiles; None where it is not known (ahead of a call)


def choose_family(fields: dict, ctx: Context) -> None:
    """The choice's family, else the planner's default (untuned: the first offered that suits the launch's
    pixels, Family.suits; a config without a family: the first offered, which choice._usable checked it
    against). A grad-input's transposed route is a forward launch."""
    if ctx.kind == "grad_bias":
        fields.update(family=GRAD_BIAS_FAMILY, template=TEMPLATES["grad_bias", GRAD_BIAS_FAMILY], spec=None)
        return
    conv_plan = ctx.plan
    offered = {"forward": conv_plan.families, "grad_input": conv_plan.grad_input_families,
               "grad_weight": conv_plan.grad_weight_families}[ctx.kind]
    default = conv_plan.family if ctx.kind == "forward" else offered[0]
    if ctx.choice.config is None and ctx.pixels is not None:  # untuned: the first that suits, the plan's first
        ordered = (default, *(name for name in offered if name != default))
        default = suiting_first(ordered, conv_plan.spec, ctx.kind, ctx.pixels)[0]
    chosen = ctx.choice.family or default
    transposed = (" (or a transposed choice of a forward family, plan.grad_input_offers)"
                  if ctx.kind == "grad_input" else "")
    check(chosen in offered, f"family={chosen!r} cannot compute the {ctx.kind} kernel of {conv_plan.spec}; "
                             f"use one of {offered}{transposed}")
    fields.update(family=chosen, template=TEMPLATES[ctx.kind, chosen], spec=conv_plan.spec)


def lower_padding_to_masks(fields: dict, ctx: Context) -> None:
    """The plan's PadInputChannels / SliceOutputChannels become load and store masks: nothing is copied."""
    masks = ctx.plan.channel_masks if ctx.plan is not None else (False, False)
    fields.update(mask_input_channels=masks[0], mask_output_channels=masks[1])


def choose_layout_constants(fields: dict, ctx: Context) -> None:
    """A unit stride the template writes as a literal 1, so Triton can vectorise along it.

    The igemm kernels read their activations (x; grad_out) as [pixels, channels] tiles, a run of channels
    per tap. In NCHW memory such a tile is a gather, an address per element (pixels are contiguous only
    within a row, and a flattened pixel tile crosses rows at any offset), so NCHW or strided activations are
    staged, but where igemm_rows reads them in place, an element at a time (IgemmRows.reads_in_place): the
    runtime copies them to channels_last (one read and one write of each, which
    ``gconvgen bench`` times as part of the call) and the kernel reads 16-byte runs of channels through its
    pipelined loop. Outputs are written through their own strides. The direct depthwise kernels are not
    staged: they are bound by memory traffic, which a copy would double, and their NCHW loads run along
    the width, consecutive lanes on consecutive addresses. The banded forward of a window of many rows in NCHW is
    staged too (DepthwiseGemm.stages_channels_last), and computes the channels_last conv: the description's
    spec is that conv's, its output written through the NCHW strides."""
    spec, owner = fields["spec"], family(fields["family"])
    stage = spec is not None and owner.stages_channels_last(spec, ctx.kind)
    if stage:
        fields["spec"] = spec = kernel_spec(spec, fields["family"], ctx.kind)
    layout = spec.layout if spec is not None else "strided"
    fields.update(channels_contiguous=layout == "nhwc" or stage, width_contiguous=layout == "nchw" and not stage,
                  stage_channels_last=stage)


def choose_reduction_order(fields: dict, ctx: Context) -> None:
    """igemm forward and grad-input reduce tap by tap ("tap_major": a step is a run of channels at one tap, the
    tap decoded once per step). igemm grad-weight flattens its weight columns (channel, tap): channels
    innermost for channels_last, so consecutive columns are consecutive addresses; taps innermost for NCHW."""
    fields["reduction_order"] = family(fields["family"]).reduction_order(ctx.kind, fields["channels_contiguous"])


def choose_index_width(fields: dict, ctx: Context) -> None:
    """64-bit offsets only where the launch needs them (see needs_wide_index); common shapes stay 32-bit."""
    fields["wide_index"] = ctx.wide_index


def choose_epilogue(fields: dict, ctx: Context) -> None:
    """The forward kernel applies the epilogue before its store; gradient kernels have none (the fused op's
    backward turns the output gradient into the pre-activation gradient first)."""
    check(ctx.kind == "forward" or ctx.epilogue == NO_EPILOGUE, f"kind={ctx.kind!r} has no epilogue")
    fields.update(activation=ctx.epilogue.activation, residual=ctx.epilogue.residual)


def choose_precision(fields: dict, ctx: Context) -> None:
    """float32 dots run on TF32 when torch allows it for convs (as F.conv2d does); float64 accumulates in
    float64; under the interpreter bf16 dot operands are cast to float32 (its bf16 dot is wrong)."""
    fields.update(dtype=ctx.dtype, interpret=ctx.interpret,
                  input_precision="tf32" if ctx.dtype == "float32" and ctx.allow_tf32 else "ieee",
                  accumulator="tl.float64" if ctx.dtype == "float64" else "tl.float32",
                  dot_in_float32=ctx.interpret and ctx.dtype == "bfloat16")


def choose_halo(fields: dict, ctx: Context) -> None:
    """depthwise1d reads each program's input window once: its main tile and the halo positions (window_halo),
    loaded as whole tiles of halo_tile positions (vectors along an NCHW width); its channel tile gives each warp 8
    channels (GATHER_CHANNELS_PER_WARP). The banded kernel's grad-weight reads input columns past each strip's main
    tile, and its forward of one row's strips (strip_rows) the strips past its tile, each in one halo tile."""
    halo, halo_tile = family(fields["family"]).halo(fields["spec"], fields["config"], ctx.kind, fields["band_shift"])
    fields.update(halo=halo, halo_tile=halo_tile)


def choose_weight_layout(fields: dict, ctx: Context) -> None:
    """The direct depthwise kernels (forward, grad-input) read a row of output channels per tap: hwio memory
    makes it one vector load. The igemm forward and grad-input read an (input channel, output channel) tile
    per tap: a channels_last (ohwi) weight is read as it is, input channels contiguous; any other is handed
    over hwio, output channels contiguous. The banded kernel reads the weight as it is: it builds its band blocks
    from segments of the weight's rows in registers."""
    fields["weight_layout"] = family(fields["family"]).weight_layout(ctx.kind, ctx.weight_memory)


def choose_band_dot(fields: dict, ctx: Context) -> None:
    """The banded kernel's dot (Family.band_dot): a 2-D dot a channel where a channel's rows lie along the
    contiguous width ("rows", wgmma on sm_90), batched over the contiguous channels in channels_last
    ("channels"); "none" for other families."""
    fields["band_dot"] = family(fields["family"]).band_dot(fields["spec"])


def aligns_rows(owner, spec: ConvSpec, dot: str, kind: str, staged: bool) -> bool:
    """Whether a kernel of family ``owner`` takes the launch's row alignment (choose_row_alignment)."""
    return owner.reads_aligned_rows(spec, dot, kind) or (staged and owner.computes_staged_as_channels_last())


def choose_row_alignment(fields: dict, ctx: Context) -> None:
    """Kernels that read or write activations as vectors (Family.reads_aligned_rows: depthwise1d, the banded
    kernel's "rows" dot on NCHW, igemm's channels_last pixels and NCHW output rows) take the launch's row
    alignment (ctx.row_alignment: what every row, channel and pixel start the kernel reads and writes is a
    multiple of, runtime/launch.py _aligned_rows). The banded kernel also starts each strip's input band
    band_shift columns before its window, on an aligned column (strips are BLOCK_K x stride >= 16 columns
    apart), so its rows are aligned vector loads (cp.async on sm_90); its band blocks start as many columns
    later. Others: 1 and 0. ``read_alignment``: what the rows the kernel reads are multiples of, at least that;
    the igemm kernels round their (staged) reads to it, their writes to row_alignment. A kernel computing the
    channels_last conv of a staged NCHW input (Family.computes_staged_as_channels_last) writes its NCHW output's
    rows as vectors."""
    owner, spec = family(fields["family"]), fields["spec"]
    aligned = spec is not None and aligns_rows(owner, spec, fields["band_dot"], ctx.kind, fields["stage_channels_last"])
    alignment = ctx.row_alignment if aligned else 1
    # a staged read is the runtime's channels_last copy (launch.staged): whatever the launch writes (an NCHW
    # output of 7-wide rows aligns nothing), its pixel starts are multiples of its channels
    read = {"forward": (spec.in_channels,), "grad_input": (spec.out_channels,),
            "grad_weight": (spec.in_channels, spec.out_channels)}.get(ctx.kind) if aligned else None
    staged = row_alignment(ctx.dtype, read) if read and fields["stage_channels_last"] else 1
    fields.update(row_alignment=alignment, read_alignment=max(alignment, staged),
                  band_shift=owner.band_shift(spec, alignment) if spec is not None else 0)


def choose_tap_tile(fields: dict, ctx: Context) -> None:
    """Depthwise grad-weight sums many taps from each grad_out tile it loads: the direct kernel every tap (a
    [taps, channels] accumulator of tap_tile rows), the banded kernel tap_tile kernel rows a pass, as many as
    its accumulators allow at its config (Family.tap_tile), and when its tile is consecutive rows of a column,
    the output rows of a step (Family.step_rows), and when it is one row's strips of a wide height-1 window, the
    pieces of a strip's band (Family.pieces); the banded forward that slides down the output rows, its open
    rows (Family.slide_rows). A strided grad-input's programs each take one phase of the
    stride, so that a tap that reaches none of its pixels is skipped (Family.phases), or every column phase of
    one row phase in turn (Family.interleaves_columns). The sliding igemm holds
    weights of one channel step up to a size (Family.held_weights)."""
    spec, owner = fields["spec"], family(fields["family"])
    fields.update(tap_tile=owner.tap_tile(spec, ctx.kind, fields["config"], fields["halo_tile"]) if spec else 0,
                  step_rows=owner.step_rows(spec, ctx.kind, fields["config"]) if spec else 0,
                  pieces=owner.pieces(spec, ctx.kind, fields["config"], fields["band_shift"]) if spec else 0,
                  slide_rows=owner.slide_rows(spec, ctx.kind, fields["config"], ctx.pixels) if spec else 0,
                  phases=owner.phases(spec, ctx.kind) if spec else (1, 1),
                  interleave_columns=owner.interleaves_columns(spec, ctx.kind) if spec else False,
                  held_weights=owner.held_weights(ctx.kind) if spec else 0)


def choose_tile_config(fields: dict, ctx: Context) -> None:
    """The tuned config when there is one, else the family's default (default_config), which fills the
    device with the launch's pixels when they are known."""
    config = ctx.choice.config
    if config is None:
        config = default_config(fields["spec"], fields["family"], ctx.kind, interpret=ctx.interpret,
                                pixels=ctx.pixels)
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
    ("choose_epilogue", choose_epilogue),                  # activation and residual fused before the store
    ("choose_precision", choose_precision),                # TF32, accumulator, interpreter casts
    ("choose_weight_layout", choose_weight_layout),        # weight tiles as vector loads at literal strides
    ("choose_band_dot", choose_band_dot),                  # banded kernel: 2-D dot by rows, or batched over channels
    ("choose_row_alignment", choose_row_alignment),        # vector loads along aligned rows (depthwise1d, banded)
    ("choose_tile_config", choose_tile_config),            # tuned config, or the family default
    ("choose_halo", choose_halo),                          # depthwise1d's window, the banded kernel's halo tiles
    ("choose_tap_tile", choose_tap_tile),                  # depthwise grad-weight: the taps summed at once
    ("pack_groups", pack_groups),                          # narrow groups share an igemm program
]



def lower(conv_plan: Optional[Plan], kind: str, *, dtype: Optional[str] = None, choice: Choice = DEFAULT,
          interpret: bool, allow_tf32: bool, wide_index: bool = False, epilogue: Epilogue = NO_EPILOGUE,
          weight_memory: str = "strided", pixels: Optional[PixelSpace] = None, row_alignment: int = 1) -> KernelDesc:
    """The description of kernel ``kind`` of ``conv_plan`` (None for grad_bias, which takes ``dtype``).

    ``choice`` is a tuning record's (its family and config; DEFAULT for the planner's); ``interpret``
    renders for Triton's interpreter; ``allow_tf32`` lets float32 dots use TF32; ``wide_index`` asks for
    64-bit offsets (needs_wide_index); ``epilogue`` is a forward kernel's fused activation and residual;
    ``weight_memory`` is the layout of the weight the launch is given (runtime/weights.py ``layout_of``);
    ``row_alignment`` what its activations' row and channel strides are multiples of (``row_alignment``);
    ``pixels`` is what the launch tiles, for a default config that fills the device (None: not known, the
    default from the spec alone). Raises ValueError for a family or config that cannot run it.
    """
    check(kind in KINDS, f"kind={kind!r} is not a kernel kind; use one of {KINDS}")
    check(conv_plan is not None or kind == "grad_bias", f"kind={kind!r} needs a plan")
    dtype = dtype or conv_plan.spec.dtype
    check(dtype in DTYPES, f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    ctx = Context(conv_plan, kind, dtype, choice, interpret, allow_tf32, wide_index, epilogue, weight_memory,
                  row_alignment, pixels)
    fields: dict = {"kind": kind}
    for name, run_pass in LOWERING_PIPELINE:
        run_pass(fields, ctx)
    return KernelDesc(**fields)


@memoized(4096)
def lowered(spec: Optional[ConvSpec], kind: str, dtype: str, choice: Choice, interpret: bool, allow_tf32: bool,
            wide_index: bool, pixels: Optional[PixelSpace], padding_budget: float, epilogue: Epilogue = NO_EPILOGUE,
            weight_memory: str = "strided", row_alignment: int = 1) -> KernelDesc:
    """``lower`` memoised on its inputs: a warm call builds no description. ``pixels`` is keyed exactly, not
    bucketed: the grid is ceiling divisions of the exact extents, so a bucket would either leave a default
    under two waves or halve a tile that needed no halving; the memo holds one description per launch
    shape, as the warm-call memo (runtime/launch.py) does, within maxsize."""
    conv_plan = None if spec is None else planned(spec, padding_budget)
    return lower(conv_plan, kind, dtype=dtype, choice=choice, interpret=interpret, allow_tf32=allow_tf32,
                 wide_index=wide_index, epilogue=epilogue, weight_memory=weight_memory, pixels=pixels,
                 row_alignment=row_alignment)


def lowered_for(spec: Optional[ConvSpec], kind: str, dtype: str, choice: Choice, interpret: bool, allow_tf32: bool,
                wide_index: bool, pixels: Optional[PixelSpace], epilogue: Epilogue = NO_EPILOGUE,
                weight_memory: str = "strided", row_alignment: int = 1) -> KernelDesc:
    """``lowered`` under the current padding budget (GCONVGEN_PADDING_BUDGET)."""
    return lowered(spec, kind, dtype, choice, interpret, allow_tf32, wide_index, pixels, knobs.padding_budget(),
                   epilogue, weight_memory, row_alignment)


def row_alignment(dtype: str, strides: tuple[int, ...]) -> int:
    """The largest power of two, up to 16 bytes' worth of ``dtype`` elements, that divides every stride in
    ``strides``: with it, a vector of that many elements at an aligned position of any row stays aligned."""
    alignment = 16 // ELEMENT_BYTES[dtype]
    while alignment > 1 and any(stride % alignment for stride in strides):
        alignment //= 2
    return alignment


def needs_wide_index(largest_offset: int, largest_flat_index: int) -> bool:
    """Whether a launch needs 64-bit offsets: some element's offset from its tensor's start, or a flattened
    (batch, height, width) index, does not fit in int32."""
    return largest_offset > INT32_MAX or largest_flat_index > INT32_MAX
