"""The benchmark: gconvgen against F.conv2d and against the roofline floor, layer by layer.

For each layer and layout it times a user's call of gconvgen.conv2d (its checks, the op's dispatch and the
tuning database's choice), the generated kernel alone, and F.conv2d (cudnn.benchmark on, same layout and dtype), after checking gconvgen's output
against a float64 reference. The floor is max(bytes / copy bandwidth, flops / matmul rate) with both
ceilings measured in the same run (shared BENCHMARK_LAYERS.md). On CPU everything runs through Triton's
interpreter: those timings say nothing about GPU speed, and the report says so. A time the CPU clock could
not resolve (see measure.Timer.time) is marked unresolved and gets no ratio, never a made-up one.
"""
from __future__ import annotations

import contextlib
import math
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import triton

from ..compiler import codegen
from ..nn.conv2d import conv2d
from .. import knobs
from .inspection import geometric_mean
from ..autotune.choice import choice_for
from ..autotune.database import choice_of, database, key_of
from ..autotune.space import Problem, config_name, device_facts
from ..autotune.measure import Measurement, Timer, Workload, cudnn_benchmark
from ..compiler.lowering import ATEN, DEFAULT, ELEMENT_BYTES, Choice, lowered
from ..runtime import launch
from ..runtime.device import allows_tf32
from ..runtime.fallback import aten_conv2d

BENCH_SCHEMA_VERSION = 2  # 2: ratios are null where a time is unresolved; rows say which
CPU_NOTE = ("CPU run: every kernel ran through Triton's interpreter and F.conv2d on the CPU; these timings say "
            "nothing about GPU speed. Run on a GPU for real numbers.")


@dataclass(frozen=True)
class Ceilings:
    """The machine's two roofline ceilings, measured in this run (None where the clock could not resolve
    the copy or the matmul: then no layer has a floor)."""

    copy_bytes_per_s: Optional[float]   # device-to-device copy, read + write bytes
    matmul_flops_per_s: Optional[float]
    matmul: str                         # what was multiplied, e.g. 'bfloat16 8192^3'


def measure_ceilings(device: torch.device, timer: Timer) -> Ceilings:
    """A large copy and a large matmul on ``device`` (bf16 on a GPU; small fp32 ones on CPU)."""
    on_gpu = torch.device(device).type == "cuda"
    copy_elements = (1 << 29) if on_gpu else (1 << 23)  # 1 GiB of bf16 / 32 MiB of fp32
    source = torch.ones(copy_elements, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device)
    target = torch.empty_like(source)
    copy_time = timer.time(lambda: target.copy_(source))
    size, dtype = (8192, torch.bfloat16) if on_gpu else (512, torch.float32)
    left = torch.randn(size, size, device=device).to(dtype)
    right = torch.randn(size, size, device=device).to(dtype)
    matmul_time = timer.time(lambda: left @ right)

    def rate(amount: float, measured: Measurement) -> Optional[float]:
        return amount / (measured.ms * 1e-3) if measured.resolved else None

    return Ceilings(rate(2 * source.numel() * source.element_size(), copy_time), rate(2 * size ** 3, matmul_time),
                    f"{str(dtype).removeprefix('torch.')} {size}^3")


def roofline(problem: Problem) -> tuple[int, int]:
    """(bytes, flops) of one forward conv: bytes = b * (input + output + weight), flops = 2 * MACs."""
    spec = problem.spec
    out_height, out_width = problem.output_size
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    element = ELEMENT_BYTES[spec.dtype]
    bytes_moved = element * (problem.batch * spec.in_channels * problem.height * problem.width
                             + problem.batch * spec.out_channels * out_height * out_width
                             + spec.out_channels * spec.in_channels_per_group * taps)
    flops = 2 * problem.batch * spec.out_channels * out_height * out_width * spec.in_channels_per_group * taps
    return bytes_moved, flops


@dataclass(frozen=True)
class BenchRow:
    """One layer in one layout. Times in ms; speedup = F.conv2d time / gconvgen time; % of floor = floor / time.

    A ratio is None where a time it needs is unresolved; ``unresolved`` maps each such time ('gconvgen',
    'kernel', 'F.conv2d', 'staging') to why the clock could not resolve it (empty when every time was
    resolved). ``staging_ms`` is the channels_last copy of the input that an NCHW grouped conv makes
    (lowering.choose_layout_constants), timed alone; it is part of gconvgen's and the kernel's times; None
    where the kernel reads its input as it is.
    """

    layer: str
    model: str
    layout: str
    dtype: str
    choice: str
    gconvgen_ms: float
    kernel_ms: float
    kernel_config: str
    aten_ms: float
    speedup: Optional[float]
    kernel_speedup: Optional[float]
    floor_ms: Optional[float]
    pct_of_floor: Optional[float]
    kernel_pct_of_floor: Optional[float]
    aten_pct_of_floor: Optional[float]
    bound: str
    bytes: int
    flops: int
    correct: bool
    error: str
    unresolved: dict[str, str] = field(default_factory=dict)
    staging_ms: Optional[float] = None


def _describe_choice(key: str, choice: Choice) -> tuple[str, Choice]:
    """A readable choice and the kernel to time as 'the generated kernel' (where aten won, its best kernel)."""
    db = database()
    record = db.lookup_nearest(key) or {}
    tuned = "tuned" if db.lookup(key) else "tuned at the nearest batch size"
    if choice.kind == ATEN:
        best = record.get("best_kernel")
        return f"aten ({tuned})", choice_of(best) if best else DEFAULT
    if choice.kind == "default":
        return "default (untuned)", choice
    return f"kernel ({tuned})", choice


def bench_layer(layer_id: str, model: str, problem: Problem, device: torch.device, timer: Timer,
                ceilings: Ceilings) -> BenchRow:
    """Check and time one layer (``layer_id`` of ``model``, named in the row) in one layout."""
    spec = problem.spec
    facts = device_facts(device)
    workload = Workload.create(problem, device, facts, allows_tf32(device))
    key = key_of(problem, facts.target, allows_tf32(device))
    label, timed_choice = _describe_choice(key, choice_for(spec, "forward", device, problem.batch, problem.height,
                                                           problem.width))
    desc = lowered(spec, "forward", spec.dtype, timed_choice, facts.kind == "interpreter", allows_tf32(device), False,
                   problem.pixel_space, knobs.padding_budget())

    def gconvgen(x, weight, bias, out):  # what a user's call costs: checks, the op's dispatch, the launch
        return conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups,
                      channel_policy=spec.channel_policy)

    def kernel(x, weight, bias, out):
        return launch.forward(spec, x, weight, bias, out, timed_choice)

    def aten(x, weight, bias, out):
        return aten_conv2d(spec, x, weight, bias)

    error = workload.check(gconvgen) or workload.check(kernel)
    with cudnn_benchmark():  # for F.conv2d, and for gconvgen where aten won
        aten_time = timer.time(workload.timed(aten))
        gconvgen_time = timer.time(workload.timed(gconvgen))
    kernel_time = timer.time(workload.timed(kernel))  # the generated kernel alone (the best one where aten won)
    staged = [("staging", timer.time(workload.timed(lambda x, weight, bias, out: launch.staged(x, desc))))
              ] if desc.stage_channels_last else []
    bytes_moved, flops = roofline(problem)
    floor_ms, bound = None, "unknown"  # unless both ceilings were resolved
    if ceilings.copy_bytes_per_s and ceilings.matmul_flops_per_s:
        memory_ms = bytes_moved / ceilings.copy_bytes_per_s * 1e3
        compute_ms = flops / ceilings.matmul_flops_per_s * 1e3
        floor_ms, bound = max(memory_ms, compute_ms), "memory" if memory_ms >= compute_ms else "compute"
    unresolved = {name: measured.why for name, measured in [("gconvgen", gconvgen_time), ("kernel", kernel_time),
                                                            ("F.conv2d", aten_time), *staged] if not measured.resolved}
    return BenchRow(
        layer=layer_id, model=model, layout=spec.layout, dtype=spec.dtype, choice=label,
        gconvgen_ms=gconvgen_time.ms, kernel_ms=kernel_time.ms,
        kernel_config=config_name(desc.config, desc.family), aten_ms=aten_time.ms,
        speedup=_ratio(aten_time, gconvgen_time), kernel_speedup=_ratio(aten_time, kernel_time), floor_ms=floor_ms,
        pct_of_floor=_percent_of_floor(floor_ms, gconvgen_time),
        kernel_pct_of_floor=_percent_of_floor(floor_ms, kernel_time),
        aten_pct_of_floor=_percent_of_floor(floor_ms, aten_time),
        bound=bound,
        bytes=bytes_moved, flops=flops, correct=error is None, error=error or "", unresolved=unresolved,
        staging_ms=staged[0][1].ms if staged else None,
    )


def _ratio(numerator: Measurement, denominator: Measurement) -> Optional[float]:
    """numerator / denominator in time, or None unless the clock resolved both."""
    return numerator.ms / denominator.ms if numerator.resolved and denominator.resolved else None


def _percent_of_floor(floor_ms: Optional[float], measured: Measurement) -> Optional[float]:
    """The floor as a percentage of a measured time, or None when the time or the floor is unresolved."""
    return 100 * floor_ms / measured.ms if measured.resolved and floor_ms is not None else None


def summary(rows: list[BenchRow]) -> dict:
    """Geometric means of speedup and % of floor per layout and over all rows, and the worst speedup, over
    the rows whose times were resolved (None where there are none); ``layers`` counts all rows,
    ``resolved`` those with a speedup."""
    groups = {layout: [r for r in rows if r.layout == layout] for layout in dict.fromkeys(r.layout for r in rows)}
    groups["all"] = rows

    def mean(values: list[Optional[float]]) -> Optional[float]:
        known = [value for value in values if value is not None]
        return geometric_mean(known)

    return {name: {"speedup": mean([r.speedup for r in group]),
                   "kernel_speedup": mean([r.kernel_speedup for r in group]),
                   "pct_of_floor": mean([r.pct_of_floor for r in group]),
                   "min_speedup": min((r.speedup for r in group if r.speedup is not None), default=None),
                   "layers": len(group), "resolved": sum(r.speedup is not None for r in group)}
            for name, group in groups.items()}


def environment(device: torch.device) -> dict:
    """Date, device, driver and library versions, for the report."""
    on_gpu = torch.device(device).type == "cuda"
    driver = None
    if on_gpu:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": (torch.cuda.get_device_name(device) if on_gpu
                   else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "triton": triton.__version__,
        "gconvgen": codegen.gconvgen_version(),
        "python": platform.python_version(),
    }


def report(suite: str, rows: list[BenchRow], ceilings: Ceilings, timer: Timer, device: torch.device,
           deferred: list[dict], failed: list[dict]) -> dict:
    """Everything the bench measured, as the JSON it writes. ``deferred`` and ``failed`` list
    {"id", "why"} for layers kept for later and layers that could not be measured."""
    on_cpu = torch.device(device).type == "cpu"
    return {
        "schema_version": BENCH_SCHEMA_VERSION,
        "suite": suite,
        "environment": environment(device),
        "timer": timer.label,
        "ceilings": {"copy_GB_per_s": _scaled(ceilings.copy_bytes_per_s, 1e9),
                     "matmul_TFLOP_per_s": _scaled(ceilings.matmul_flops_per_s, 1e12), "matmul": ceilings.matmul},
        "rows": [asdict(row) for row in rows],
        "geomean": summary(rows),
        "deferred": deferred,
        "failed": failed,
        "note": CPU_NOTE if on_cpu else "",
    }


UNRESOLVED = "unresolved"  # printed instead of a time the clock could not resolve, and of ratios made from it


def ratio_text(value: Optional[float], suffix: str = "x") -> str:
    """A speedup (or percentage) to three significant digits, so 0.0026x does not read 0.00x; 'n/a' for None."""
    return "n/a" if value is None else f"{value:.3g}{suffix}"


def _ms_text(ms: float, name: str, row: BenchRow) -> str:
    """A time, or UNRESOLVED where the row says the clock could not resolve it."""
    return UNRESOLVED if name in row.unresolved else f"{ms:.4g}"


def _scaled(value: Optional[float], unit: float) -> Optional[float]:
    """``value`` in ``unit``s, None staying None (an unresolved ceiling)."""
    return None if value is None else value / unit


def _columns(verbose: bool) -> list[tuple[str, Callable[[BenchRow], str]]]:
    """The table's columns: those a user reads, and with ``verbose`` the roofline model's terms too."""
    columns = [
        ("layer", lambda r: r.layer), ("layout", lambda r: r.layout), ("choice", lambda r: r.choice),
        ("kernel", lambda r: r.kernel_config), ("gconvgen ms", lambda r: _ms_text(r.gconvgen_ms, "gconvgen", r)),
        ("F.conv2d ms", lambda r: _ms_text(r.aten_ms, "F.conv2d", r)), ("speedup", lambda r: ratio_text(r.speedup)),
        ("check", lambda r: "ok" if r.correct else "WRONG"),
    ]
    if verbose:
        columns[-1:-1] = [
            ("kernel ms", lambda r: _ms_text(r.kernel_ms, "kernel", r)),
            ("staging ms", lambda r: "-" if r.staging_ms is None else _ms_text(r.staging_ms, "staging", r)),
            ("floor ms", lambda r: UNRESOLVED if r.floor_ms is None else f"{r.floor_ms:.4g}"),
            ("% floor", lambda r: ratio_text(r.pct_of_floor, "%")),
            ("aten % floor", lambda r: ratio_text(r.aten_pct_of_floor, "%")), ("bound", lambda r: r.bound),
        ]
    return columns


LEGEND = """\
choice: what gconvgen.conv2d ran: a generated kernel (tuned, or the planner's default when untuned) or aten,
  where tuning found PyTorch faster; kernel: the generated kernel's family and tiles (m, n, k: tile sizes;
  w: warps; s: pipeline stages), the best one tuning timed where aten won
gconvgen ms: one gconvgen.conv2d call (argument checks, dispatch and the launch); F.conv2d ms: PyTorch,
  cudnn.benchmark on, same dtype and memory layout; speedup: F.conv2d ms / gconvgen ms, above one when
  gconvgen is faster; check: gconvgen's output against a float64 reference"""
INTERPRETER_RATIOS = """\
On CPU gconvgen's times are Triton's interpreter's (a Python simulation of the GPU program) and F.conv2d's
  are native: the speedups measure the interpreter, not gconvgen's kernels."""
VERBOSE_LEGEND = """\
kernel ms: the generated kernel's launch alone; staging ms: the channels_last copy of an NCHW input (part of
  both times); floor ms: max(bytes / copy bandwidth, flops / matmul rate) with the ceilings measured in this
  run; % floor: floor ms / gconvgen ms (aten % floor: of F.conv2d ms); bound: which ceiling sets the floor"""


def _rate_text(value: Optional[float], unit: str) -> str:
    """A ceiling's rate for the table's header, or why there is no floor."""
    return f"{UNRESOLVED} (no floor)" if value is None else f"{value:.3g} {unit}"


def format_table(data: dict, *, markdown: bool = False, verbose: bool = False, note: bool = True) -> str:
    """The report as a text (or markdown) table: one row per layer and layout, then the geometric means and
    a legend; why each unresolved time is unresolved comes first. ``verbose`` adds the roofline model's
    columns; ``note`` the CPU note (the command line prints it once, before the work)."""
    rows = [BenchRow(**row) for row in data["rows"]]
    columns = _columns(verbose)
    cells = [[cell(row) for _, cell in columns] for row in rows]
    for name, means in data["geomean"].items():
        summary = {"layer": f"geomean ({name})", "speedup": ratio_text(means["speedup"]),
                   "% floor": ratio_text(means["pct_of_floor"], "%"), "check": f"min {ratio_text(means['min_speedup'])}"}
        cells.append([summary.get(header, "") for header, _ in columns])
    headers = [name for name, _ in columns]
    env, ceil = data["environment"], data["ceilings"]
    lines = [f"suite {data['suite']} on {env['device']} | torch {env['torch']} | triton {env['triton']}"
             f" | cudnn {env['cudnn']} | driver {env['driver']} | {env['date']}",
             f"timer: {data['timer']}"]
    if verbose:
        lines.append(f"ceilings measured in this run: copy {_rate_text(ceil['copy_GB_per_s'], 'GB/s')}, "
                     f"{ceil['matmul']} matmul {_rate_text(ceil['matmul_TFLOP_per_s'], 'TFLOP/s')}")
    if data["note"] and (note or markdown):
        lines.insert(0, f"NOTE: {data['note']}")
    lines += [f"kept for later: {d['id']} ({d['why']})" for d in data["deferred"]]
    lines += [f"FAILED: {d['id']} ({d['why']})" for d in data["failed"]]
    lines += [f"{UNRESOLVED}: {row.layer} {row.layout} {name} time ({why}); no ratio is given for it"
              for row in rows for name, why in row.unresolved.items()]
    legend = LEGEND + ("\n" + VERBOSE_LEGEND if verbose else "\n(--verbose adds the roofline columns)")
    if data["note"]:
        legend += "\n" + INTERPRETER_RATIOS
    header = "\n".join(f"- {line}" if markdown else line for line in lines)
    return header + "\n\n" + text_table(headers, cells, markdown=markdown) + "\n\n" + legend + "\n"


def text_table(headers: list[str], cells: list[list[str]], *, markdown: bool = False) -> str:
    """``cells`` under ``headers`` as aligned text columns, or as a markdown table."""
    if markdown:
        table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(table + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *cells])


def plot(data: dict, path: str) -> None:
    """Bar charts of speedup over F.conv2d and % of the roofline floor per layer and layout, saved to ``path``.

    Needs matplotlib (``pip install 'gconvgen[plot]'``); raises RuntimeError saying so when it is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed; run pip install 'gconvgen[plot]' "
                           "(or pip install matplotlib), or drop --plot") from None
    rows = data["rows"]
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    figure, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(layers)), 8), sharex=True)
    width = 0.8 / max(1, len(layouts))
    for panel, (key, line, title) in zip(axes, (("speedup", 1.0, "speedup over F.conv2d"),
                                                ("pct_of_floor", 70.0, "% of roofline floor"))):
        for index, layout in enumerate(layouts):
            values = {row["layer"]: row[key] for row in rows if row["layout"] == layout}
            positions = [i + index * width for i in range(len(layers))]
            heights = [values.get(layer) for layer in layers]  # no bar where a time was unresolved
            panel.bar(positions, [math.nan if h is None else h for h in heights], width, label=layout)
        panel.axhline(line, color="black", linewidth=0.8, linestyle="--")
        panel.set_ylabel(title)
        panel.legend()
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(layers))])
    axes[1].set_xticklabels(layers, rotation=30, ha="right")
    env = data["environment"]
    figure.suptitle(f"gconvgen vs F.conv2d, suite {data['suite']}\n{env['device']}"
                    + (" (timings say nothing about GPU speed)" if data["note"] else ""), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
