"""``gconvgen inspect``: what the sm_90 compiler emits for the kernels the runtime would launch, on a CPU.

For one problem (a layer at an input size, one kernel kind) it lowers the kernel exactly as a launch would
(the tuning record's choice or the default, the launch's own argument values, from meta tensors), compiles
it for sm_90 with Triton's run-time specialisation (tools/sass.py), and reports the compiler's figures
beside two figures of the tiling: global bytes the programs request over the layer's ideal bytes, and
tensor-core FLOPs issued over useful FLOPs; then how many programs fit one SM (sass.occupancy) and a
modelled time on an H200 (model_kernel), as an upper bound of the share of the layer's roofline floor the
kernel could reach. Static figures and a model, not timings.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from .. import knobs
from ..autotune.database import database, key_of
from ..autotune.space import Problem, config_name
from ..ir import check
from ..compiler.lowering import DEFAULT, ELEMENT_BYTES, H200_SMS, KernelDesc, family
from ..compiler.tiles import cdiv
from ..runtime import launch
from . import sass
from ..runtime.device import TORCH_DTYPES

INSPECT_TARGET = "cuda sm_90 inspect"
DEFAULT_TUNED_TARGET = "NVIDIA H200 sm_90"  # whose tuning records decide the config, when there are any


@dataclass(frozen=True)
class Inspection:
    """One kernel's static figures: the compiler's (sass.KernelFigures) and the tiling's."""

    problem: str
    kind: str
    family: str
    config: str
    uri: str
    figures: sass.KernelFigures
    programs: int
    waves: float                       # programs / SMs (one program per SM at a time assumed)
    requested_over_ideal_bytes: Optional[float]
    issued_over_useful_flops: Optional[float]
    occupancy: sass.Occupancy          # programs resident on one SM at once, and what limits them
    rounds: float                      # programs / (SMs x occupancy.programs_per_sm): rounds of SM slots
    model: Modelled

    def as_dict(self) -> dict:
        """JSON-ready (an infinite modelled time, of a kernel that fits no SM, is null)."""
        row = asdict(self)
        row["figures"] = {k: ({str(key): v for key, v in value.items()} if isinstance(value, dict) else value)
                          for k, value in asdict(self.figures).items()}
        row["model"] = {k: (None if isinstance(value, float) and math.isinf(value) else value)
                        for k, value in row["model"].items()}
        row["rounds"] = None if math.isinf(self.rounds) else self.rounds
        return row


def _meta_tensors(problem: Problem) -> dict[str, torch.Tensor]:
    """Meta tensors of ``problem`` in its layout, strided as the runtime's own would be."""
    spec = problem.spec
    dtype = TORCH_DTYPES[spec.dtype]
    memory_format = torch.channels_last if spec.layout == "nhwc" else torch.contiguous_format
    width = problem.width * (2 if spec.layout == "strided" else 1)
    x = torch.empty(problem.batch, spec.in_channels, problem.height, width, dtype=dtype, device="meta",
                    memory_format=memory_format)
    x = x[..., ::2] if spec.layout == "strided" else x
    out_shape = (problem.batch, spec.out_channels, *problem.output_size)
    return {
        "x": x,
        "weight": torch.empty(spec.weight_shape, dtype=dtype, device="meta", memory_format=memory_format),
        "bias": torch.empty(spec.out_channels, dtype=dtype, device="meta") if spec.bias else None,
        "out": torch.empty(out_shape, dtype=dtype, device="meta", memory_format=memory_format),
        "grad_x": torch.empty(x.shape, dtype=dtype, device="meta", memory_format=memory_format),
        "grad_w": torch.empty(spec.weight_shape, dtype=dtype, device="meta"),
    }


def prepared_launch(problem: Problem, tuned_target: str = DEFAULT_TUNED_TARGET) -> launch.Launch:
    """The launch the runtime would prepare for ``problem`` on an H200: the tuning record under
    ``tuned_target`` (nearest batch size) when there is one, else the default; its splits fill 132 SMs."""
    choice = database().choice(key_of(problem, tuned_target, False))
    choice = DEFAULT if choice.kind == "aten" else choice
    t = _meta_tensors(problem)
    spec = problem.spec
    if problem.kind == "forward":
        return launch.prepare_forward(spec, t["x"], t["weight"], t["bias"], t["out"], choice, INSPECT_TARGET)
    if problem.kind == "grad_input":
        return launch.prepare_grad_input(spec, t["out"], t["weight"], t["grad_x"], choice, INSPECT_TARGET)
    first = launch.prepare_grad_weight(spec, t["x"], t["out"], t["grad_w"], choice, 1, INSPECT_TARGET)
    pixels = first.arguments()["pixels"]
    tiles = math.prod(first.grid[:-1])
    splits, _ = launch.split_pixels(pixels, first.desc.reduction_block, tiles, 4 * H200_SMS,
                                    least_blocks=first.desc.least_split_blocks)
    return launch.prepare_grad_weight(spec, t["x"], t["out"], t["grad_w"], choice, splits, INSPECT_TARGET)


def inspect_problem(problem: Problem, tuned_target: str = DEFAULT_TUNED_TARGET) -> Inspection:
    """Compile ``problem``'s kernel for sm_90 as it would launch and report its figures.

    Needs TRITON_INTERPRET unset (the interpreter has no compiler); raises RuntimeError otherwise."""
    check(not knobs.interpret(), "gconvgen inspect compiles for sm_90 and needs TRITON_INTERPRET unset", RuntimeError)
    prepared = prepared_launch(problem, tuned_target)
    desc = prepared.desc
    kernel = launch.kernel_of(desc, INSPECT_TARGET)
    arguments = {name: sass.Pointer(str(value.dtype).removeprefix("torch.")) if isinstance(value, torch.Tensor)
                 else value for name, value in prepared.arguments().items()}
    meta = desc.meta
    constexprs = {name: meta[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_BLOCK")}
    with warnings.catch_warnings():  # Triton 3.9 warns once that its FP-fusion default will change; the
        # default (fusion on) is what the runtime's launches compile with, so the figures stay those
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset", category=UserWarning)
        compiled = sass.compile_like_launch(kernel, arguments, constexprs, num_warps=meta["num_warps"],
                                            num_stages=meta["num_stages"])
    programs = math.prod(prepared.grid)
    shared = problem.kind == "grad_weight" and desc.stage_channels_last and stages_grad_output(problem, tuned_target)
    requested, issued = tiling_figures(desc, problem, prepared.grid, prepared.arguments(), shared)
    figures = sass.figures(compiled)
    fits = sass.occupancy(figures.registers, figures.num_warps, figures.shared_memory_bytes)
    rounds = programs / (H200_SMS * fits.programs_per_sm) if fits.programs_per_sm else math.inf
    flops, notes = issued_flops(desc, problem, programs, prepared.arguments(), issued, figures.tensor_core)
    return Inspection(problem.describe(), problem.kind, desc.family, config_name(desc.config, None), desc.uri,
                      figures, programs, programs / H200_SMS, requested, issued, fits, rounds,
                      model_kernel(figures, fits, problem, programs, requested, flops, notes))


def stages_grad_output(problem: Problem, tuned_target: str = DEFAULT_TUNED_TARGET) -> bool:
    """Whether ``problem``'s grad-input kernel reads a channels_last copy of grad_output: in a training step the
    grad-weight then reads that copy too (launch.sharing_copies), and makes none of its own."""
    return prepared_launch(replace(problem, kind="grad_input"), tuned_target).desc.stage_channels_last


def ideal_bytes_and_flops(problem: Problem) -> tuple[int, int]:
    """The layer's ideal bytes (each operand once: BENCHMARK_LAYERS.md's formula, per kernel) and useful FLOPs."""
    spec = problem.spec
    element = ELEMENT_BYTES[spec.dtype]
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    x = problem.batch * spec.in_channels * problem.height * problem.width
    out = problem.output_pixels * spec.out_channels
    weight = spec.out_channels * spec.in_channels_per_group * taps
    return element * (x + out + weight), 2 * out * spec.in_channels_per_group * taps


def tiling_figures(desc: KernelDesc, problem: Problem, grid: tuple[int, ...], arguments: dict,
                   shared_grad_output: bool = False) -> tuple[Optional[float], Optional[float]]:
    """(global bytes the programs request / ideal bytes, tensor-core FLOPs issued / useful FLOPs) of the
    tiling, counting every operand tile each program loads (L2 may serve repeats: this bounds traffic
    from above; a masked lane requests nothing, which depthwise1d's and the banded forward's one-row strips count,
    the other tile models counting their tiles whole) and a staged activation's copy, but not a grad-weight's
    copy of grad_output that the grad-input made (``shared_grad_output``, stages_grad_output); each family models
    its own operand tiles (Family.requested). None where the family's model is not written (the direct
    depthwise grad-input kernel)."""
    spec = problem.spec
    ideal_bytes, useful_flops = ideal_bytes_and_flops(problem)
    element = ELEMENT_BYTES[spec.dtype]
    programs = math.prod(grid)
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    written = {"forward": problem.output_pixels * spec.out_channels,
               "grad_input": problem.batch * spec.in_channels * problem.height * problem.width,
               "grad_weight": grid[-1] * spec.out_channels * spec.in_channels_per_group * taps}[desc.kind]
    writes = written * element
    if desc.stage_channels_last:  # the runtime's channels_last copies of the activations read: once in, once out
        x = problem.batch * spec.in_channels * problem.height * problem.width
        grad_out = problem.output_pixels * spec.out_channels
        grad_weight = x + (0 if shared_grad_output else grad_out)
        writes += 2 * {"forward": x, "grad_input": grad_out, "grad_weight": grad_weight}[desc.kind] * element
    modelled = family(desc.family).requested(desc, problem, programs, arguments)
    if modelled is None:
        return None, None
    requested, tensor_flops = modelled
    return (requested + writes) / ideal_bytes, None if tensor_flops is None else tensor_flops / useful_flops


# ---------------------------------------------------------------------------------------------- the model

# Modelling constants of an H200 SXM (sm_90, 132 SMs), in one place. The floor's two rates are BENCHMARK_LAYERS.md's
# "seen here once" figures (a large device-to-device copy counting read + write; a large bf16 matmul).
COPY_BANDWIDTH = 4.3e12          # bytes/s
MATRIX_RATE = 790e12             # FLOP/s, bf16 and fp16 dense, through wgmma
# Other dtypes' tensor-core rate in the proportion of NVIDIA's H200 sheet (dense: 989 bf16, 495 tf32, 67 fp64)
MATRIX_RATES = {"bfloat16": MATRIX_RATE, "float16": MATRIX_RATE, "float32": MATRIX_RATE / 2,
                "float64": MATRIX_RATE * 67 / 989}
# mma.sync, an assumption to replace with a measurement: half of wgmma. On Hopper the warp-level MMA takes both
# operands from registers and is synchronous, so the tensor cores idle between one warp's instructions; only
# wgmma (operands in shared memory, asynchronous) reaches the sheet's rate, and reports of mma.sync and WMMA
# GEMMs on H100 stop near half of it.
MMA_SYNC_SHARE = 0.5
# CUDA cores: 132 SMs x 128 fp32 lanes x 2 flop a clock at CLOCK_HZ (BENCHMARK_LAYERS.md: about 67 TFLOP/s);
# fp64 at half (the sheet: 34 TFLOP/s)
FMA_RATES = {"bfloat16": 67e12, "float16": 67e12, "float32": 67e12, "float64": 33.5e12}
# The clock: 1.98 GHz, the H200 SXM's boost clock, at which 132 x 128 x 2 flop a clock is the 67 TFLOP/s above
# (an FFMA is then one warp-instruction a scheduler a clock, as it is on sm_90). The fastest clock the part
# runs keeps the modelled time a lower bound.
CLOCK_HZ = 1.98e9
SCHEDULERS_PER_SM = 4            # warp schedulers (sub-partitions) of an SM, one warp-instruction a clock each


@dataclass(frozen=True)
class Modelled:
    """A kernel's modelled time on an H200 (model_kernel): a lower bound of its time under the model's terms,
    so percent_of_floor is an upper bound of what the kernel could reach. Not a timing."""

    floor_s: float                # max(ideal bytes / copy bandwidth, useful FLOPs / matrix rate)
    bytes_s: float                # requested bytes / copy bandwidth
    flops_s: float                # issued FLOPs on the unit the SASS uses, the busiest SM's share
    issue_s: float                # the busiest SM's warp-instructions / (busy schedulers x clock)
    time_s: float                 # the slowest of the three (inf when no program fits an SM)
    bound: str                    # "bytes", "flops", "issue", or "occupancy" when no program fits
    percent_of_floor: float       # floor_s / time_s x 100, at most 100
    unit: str                     # "wgmma", "mma.sync", "wgmma+mma.sync" or "fma": where the issued FLOPs run
    requested_bytes: float
    issued_flops: float
    loop_trips: float             # passes a warp makes through the innermost loop (0: no loop)
    warp_instructions: float      # instructions one warp issues
    busiest_sm_programs: int      # ceil(programs / SMs): no SM can run fewer, whatever the scheduler does
    busy_schedulers: int          # schedulers with a warp of this kernel on that SM: min(4, resident warps)
    notes: tuple[str, ...]        # where the model fell back, and to what


def floor_seconds(problem: Problem) -> float:
    """The kernel's roofline floor (BENCHMARK_LAYERS.md): max(ideal bytes / COPY_BANDWIDTH, useful FLOPs /
    the dtype's matrix rate). Each backward kernel's ideal is the forward's, so a layer's forward + backward
    floor is three forward floors."""
    ideal_bytes, useful_flops = ideal_bytes_and_flops(problem)
    return max(ideal_bytes / COPY_BANDWIDTH, useful_flops / MATRIX_RATES[problem.spec.dtype])


def issued_flops(desc: KernelDesc, problem: Problem, programs: int, arguments: dict,
                 issued_over_useful: Optional[float], tensor_core: str) -> tuple[float, tuple[str, ...]]:
    """(FLOPs the launch issues, notes). A family that models its dot tiles (Family.requested): the FLOPs
    those tiles issue, on whatever unit the SASS uses (a float32 dot without TF32 is FMAs). Otherwise, on
    tensor cores: the useful FLOPs, with a note; on CUDA-core FMAs: every program's whole tile, masked lanes
    included, 2 FLOPs a multiply-add: block_m x block_n outputs, each multiplied tile_depth deep
    (Family.tile_depth) once per tap (grad-input: per tap and channel of its group, of the taps only those
    reaching the program's phase of the stride, KernelDesc.phases: the others' code is branched over) or, for
    grad-weight, once per step of block_m of its pixels_per_split."""
    useful = ideal_bytes_and_flops(problem)[1]
    if issued_over_useful is not None:
        return issued_over_useful * useful, ()
    if tensor_core != "none":
        return useful, ("flops: the useful FLOPs (the family models no tensor-core tiles)",)
    spec, config = desc.spec, desc.config
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    passes = {"forward": taps, "grad_input": taps * spec.out_channels_per_group / math.prod(desc.phases),
              "grad_weight": cdiv(arguments.get("pixels_per_split", 0), config.block_m)}[desc.kind]
    depth = family(desc.family).tile_depth(config, spec, desc.kind)
    return 2.0 * programs * config.block_m * config.block_n * depth * passes, ()


def model_kernel(figures: sass.KernelFigures, fits: sass.Occupancy, problem: Problem, programs: int,
                 requested_over_ideal: Optional[float], flops: float, notes: tuple[str, ...] = ()) -> Modelled:
    """The modelled time of one launch of ``programs`` programs issuing ``flops`` FLOPs (issued_flops): the
    slowest of
    (a) bytes: the tiling's requested bytes (requested/ideal x ideal, with a staged copy) at COPY_BANDWIDTH.
        Every requested byte is taken to cross the copy bandwidth, though L2 and L1 serve repeated tiles:
        where the tiling's ratio is large and (a) binds, the real kernel may beat this term;
    (b) flops: ``flops`` on the unit the SASS uses: wgmma at the matrix rate, mma.sync at MMA_SYNC_SHARE
        of it, else FMAs at the FMA rate;
    (c) issue: the warp-instructions of the busiest SM at SCHEDULERS_PER_SM a clock.
    (b) and (c) count the busiest SM, which runs ceil(programs / 132) programs, with only the schedulers that
    have warps: min(4, resident programs x warps). (a) takes the device's bandwidth even when few SMs load.

    A warp's instructions: straight-line code runs its body once. With a loop, its passes are the work a warp
    must do (flops / 2 / programs / warps multiply-adds) less the multiply-adds outside the loop, over the
    loop's multiply-adds per pass, both read from the SASS (sass.multiply_adds); it runs body - loop + loop
    x passes. This is total work / work per pass: an unrolled loop takes fewer passes, and the family needs
    no trip-count model of its own. Instructions outside the innermost loop count once (an outer loop's are
    undercounted), and so does code a branch skips (overcounted). A loop without multiply-adds counts one
    pass (a note says so). Requested bytes of a family without a tile model are the ideal bytes (a note
    says so). ``notes`` are carried into the result."""
    notes = list(notes)
    ideal_bytes = ideal_bytes_and_flops(problem)[0]
    dtype = problem.spec.dtype
    if requested_over_ideal is None:
        notes.append("bytes: the ideal bytes (the family models no tiles)")
    requested_bytes = (1.0 if requested_over_ideal is None else requested_over_ideal) * ideal_bytes
    unit = "fma" if figures.tensor_core == "none" else figures.tensor_core
    # a kernel with dots on both units is taken at the slower one's rate for all its FLOPs (an upper bound)
    rate = {"wgmma": MATRIX_RATES[dtype]}.get(unit, MATRIX_RATES[dtype] * MMA_SYNC_SHARE if "mma.sync" in unit
                                              else FMA_RATES[dtype])

    warps, loop = figures.num_warps, figures.inner_loop_instructions
    trips = 0.0
    if loop and figures.inner_loop_products:
        work = flops / 2 / programs / warps
        trips = max(0.0, (work - (figures.products - figures.inner_loop_products)) / figures.inner_loop_products)
    elif loop:
        trips = 1.0
        notes.append("issue: a loop without multiply-adds, counted once")
    warp_instructions = figures.body_instructions - loop + loop * trips

    busiest = cdiv(programs, H200_SMS)
    resident = min(busiest, fits.programs_per_sm)
    busy = min(SCHEDULERS_PER_SM, resident * warps)
    floor = floor_seconds(problem)
    bytes_s = requested_bytes / COPY_BANDWIDTH
    if not busy:  # one program asks for more than an SM has
        return Modelled(floor, bytes_s, math.inf, math.inf, math.inf, "occupancy", 0.0, unit, requested_bytes,
                        flops, trips, warp_instructions, busiest, 0, tuple(notes))
    share = busy / SCHEDULERS_PER_SM
    flops_s = busiest * flops / programs / (rate / H200_SMS * share)
    issue_s = busiest * warps * warp_instructions / (busy * CLOCK_HZ)
    terms = {"bytes": bytes_s, "flops": flops_s, "issue": issue_s}
    bound = max(terms, key=terms.get)
    time_s = terms[bound]
    return Modelled(floor, bytes_s, flops_s, issue_s, time_s, bound, min(100.0, 100 * floor / time_s), unit,
                    requested_bytes, flops, trips, warp_instructions, busiest, busy, tuple(notes))


@dataclass(frozen=True)
class LayerModel:
    """One layer's modelled share of its floor in one layout: the forward kernel alone, and forward + backward
    (forward, grad_input and grad_weight kernels, their modelled times summed, against three forward floors).
    A figure is None when its kernels were not inspected. An upper bound, not a timing."""

    floor_s: float
    forward_s: Optional[float]
    forward_percent: Optional[float]
    forward_backward_s: Optional[float]
    forward_backward_percent: Optional[float]


def layer_model(by_kind: dict[str, Inspection]) -> LayerModel:
    """The LayerModel of one layer and layout from its inspections by kind (any of forward, grad_input,
    grad_weight; at least one). Raises ValueError for none."""
    check(bool(by_kind), "layer_model needs at least one inspected kernel")
    floor = next(iter(by_kind.values())).model.floor_s  # every kernel's ideal is the forward's

    def percent(floor_s: float, time_s: float) -> float:
        return min(100.0, 100 * floor_s / time_s)

    forward = by_kind["forward"].model.time_s if "forward" in by_kind else None
    kinds = ("forward", "grad_input", "grad_weight")
    both = sum(by_kind[kind].model.time_s for kind in kinds) if all(kind in by_kind for kind in kinds) else None
    return LayerModel(floor, forward, None if forward is None else percent(floor, forward),
                      both, None if both is None else percent(3 * floor, both))


def geometric_mean(values: list[float]) -> Optional[float]:
    """The geometric mean of positive ``values`` (a zero makes it zero); None for none."""
    if not values:
        return None
    if min(values) <= 0:
        return 0.0
    return math.exp(sum(map(math.log, values)) / len(values))
