"""``gconvgen.report(model, example_inputs)``: which kernel each grouped conv of a user's model ran, and what
it costs against PyTorch, layer by layer and for the whole model.

Per layer (one forward recorded by tools/model_calls.py; layers of one problem share a row): the kernel gconvgen
runs (family and tiles, tuned or default, or aten where tuning found PyTorch faster), checked against a
float64 reference and timed as a gconvgen.conv2d call against eager ``F.conv2d`` in the same dtype and
layout (bench.bench_layer) and against ``torch.compile`` of that F.conv2d. For the whole model: the forward
and a training step (forward + backward) of the eager model against its gconvgen-converted copy, and
torch.compile of the eager model. On CPU the kernels run in Triton's interpreter: the report says so once,
and the work is estimated first and refused above a bound.
"""
from __future__ import annotations

import copy
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import tqdm
from torch import nn
from torch.utils import _pytree

from . import bench
from .. import knobs
from ..autotune import measure
from ..autotune.estimate import interpreter_seconds
from ..autotune.space import Problem, device_facts
from ..ir import check
from .model_calls import FUNCTIONAL, check_model_arguments, converted_copy, example_arguments, record_calls
from .model_tuning import FUNCTIONAL_NOTE, check_interpreter_budget, model_device
from ..runtime.fallback import aten_conv2d

# interpreter runs of a layer's kernel: bench_layer's two checks and two timings; the whole model's forward
# (a check and a timing) and training step (a timing of forward + the two gradient kernels)
_LAYER_RUNS, _MODEL_RUNS = 10, 17


@dataclass(frozen=True)
class LayerReport:
    """One conv problem of the model: the layers that run it, its route, and its bench row; ``compile_ms``
    is torch.compile of the same F.conv2d (None with ``compile_why`` saying why)."""

    layers: tuple[str, ...]
    route: str
    problem: str
    bench: bench.BenchRow
    compile_ms: Optional[float] = None
    compile_why: str = ""


@dataclass(frozen=True)
class StepReport:
    """The whole model's forward or training step: eager, the gconvgen-converted copy, torch.compile (None
    where it did not run), and whether the converted copy's output matched eager's."""

    step: str
    eager_ms: float
    gconvgen_ms: float
    compile_ms: Optional[float]
    correct: bool
    unresolved: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelReport:
    """Everything ``report`` measured; ``str()`` is the default table, ``format(verbose=True)`` adds the
    model terms, ``as_dict()`` is the JSON the command line writes."""

    inputs: list[str]
    layers: list[LayerReport]
    steps: list[StepReport]
    skipped: list[tuple[str, str]]
    environment: dict
    timer: str
    note: str

    def __str__(self) -> str:
        return self.format()

    def format(self, *, verbose: bool = False, markdown: bool = False, note: bool = True) -> str:
        return format_report(self, verbose=verbose, markdown=markdown, note=note)

    def as_dict(self) -> dict:
        return asdict(self)


def report(model: nn.Module, example_inputs: object, *, torch_compile: bool = True, training: bool = True,
           max_minutes: Optional[float] = None, quiet: bool = False) -> ModelReport:
    """Check and time the grouped convs of ``model`` on ``example_inputs`` (a tensor or a tuple of positional
    arguments, on the device and in the dtype and memory format the model runs in) and the whole model, as
    the module's docstring says. ``torch_compile=False`` skips torch.compile; ``training=False`` the training
    step. The model is not changed (copies run). On CPU (TRITON_INTERPRET=1 set before Triton is imported)
    the work is estimated first and refused above ``max_minutes`` (default MAX_INTERPRETER_MINUTES). Unless
    ``quiet``, progress goes to stderr.

    Returns a ModelReport (``print`` it). Raises TypeError / ValueError naming the argument.
    """
    check_model_arguments(model, {"torch_compile": torch_compile, "training": training, "quiet": quiet}, max_minutes)
    device = model_device(model, example_inputs)
    check(device.type == "cuda" or knobs.interpret(),
          f"the model is on {device}: on CPU gconvgen's kernels run in Triton's interpreter, which is off; start "
          f"Python with TRITON_INTERPRET=1 (Triton reads it when it is imported), or use a CUDA device")
    arguments = example_arguments(example_inputs)
    recording = record_calls(model, arguments)
    grouped = {problem: calls for (problem, _), calls in recording.problems().items() if problem.kind == "forward"}
    if device.type == "cpu":
        _check_interpreter_time(grouped, training, max_minutes, quiet)
    timer = measure.timer_for(device, warmup_ms=25, rep_ms=100)
    ceilings = bench.measure_ceilings(device, timer)
    layers = []
    for problem, calls in tqdm.tqdm(grouped.items(), desc="layers", unit="layer", disable=quiet, file=sys.stderr,
                                    dynamic_ncols=True):
        names = tuple(dict.fromkeys(call.layer or "(model)" for call in calls))
        row = bench.bench_layer(names[0], type(model).__name__, problem, device, timer, ceilings)
        compiled_ms, why = _compiled_conv_ms(problem, device, timer, len(grouped)) if torch_compile else (None, "off")
        layers.append(LayerReport(names, calls[0].route, problem.describe(), row, compiled_ms, why))
    steps = _whole_model(model, arguments, timer, torch_compile, training, quiet)
    on_cpu = device.type == "cpu"
    return ModelReport([_shape_text(value) for value in arguments], layers, steps, recording.skipped,
                       bench.environment(device), timer.label, bench.CPU_NOTE if on_cpu else "")


def _check_interpreter_time(grouped: dict, training: bool, max_minutes: Optional[float], quiet: bool) -> None:
    """Estimate the interpreter's share of the report, say it, and refuse it above ``max_minutes``."""
    per_run = {problem: next(iter(interpreter_seconds(problem).values()), 0.0) for problem in grouped}
    model_runs = _MODEL_RUNS if training else 5
    seconds = sum(per_run[problem] * (_LAYER_RUNS + model_runs * len(calls)) for problem, calls in grouped.items())
    check_interpreter_budget(f"timing {len(grouped)} conv problem(s) and the whole model", seconds, max_minutes,
                             quiet=quiet)


def _compiled_conv_ms(problem: Problem, device: torch.device, timer: measure.Timer,
                      layers: int) -> tuple[Optional[float], str]:
    """torch.compile (Inductor) of the layer's F.conv2d, timed on the bench's workload; (None, why) where it
    does not compile or the clock cannot resolve it."""
    spec = problem.spec
    workload = measure.Workload.create(problem, device, device_facts(device), False)

    def conv(x, weight, bias):
        return aten_conv2d(spec, x, weight, bias)

    try:
        with torch._dynamo.config.patch(recompile_limit=max(8, 2 * layers)):
            compiled = torch.compile(conv, dynamic=False)
            timed = workload.timed(lambda x, weight, bias, out: compiled(x, weight, bias))
            timed()  # compiles
            measured = timer.time(timed)
    except Exception as error:  # Inductor's own failure (no compiler, an unsupported op): say it, time the rest
        return None, f"torch.compile failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
    return (measured.ms, "") if measured.resolved else (None, measured.why)


def _whole_model(model: nn.Module, arguments: tuple, timer: measure.Timer, torch_compile: bool, training: bool,
                 quiet: bool) -> list[StepReport]:
    """The forward (and training step) of copies of ``model``: eager, converted, and compiled."""
    eager, converted = copy.deepcopy(model), converted_copy(model)
    compiled = torch.compile(copy.deepcopy(model)) if torch_compile else None
    steps = []
    for step, run in (("forward", _forward), ("forward + backward", _training_step))[: 2 if training else 1]:
        if not quiet:
            print(f"whole model: {step} ...", file=sys.stderr)
        expected, actual = _outputs(eager, arguments), _outputs(converted, arguments)
        times = {"eager": timer.time(lambda: run(eager, arguments)),
                 "gconvgen": timer.time(lambda: run(converted, arguments))}
        compile_ms = None
        if compiled is not None:
            try:
                run(compiled, arguments)  # compiles
                measured = timer.time(lambda: run(compiled, arguments))
                compile_ms = measured.ms if measured.resolved else None
            except Exception:  # Inductor's failure on this model: no column value rather than no report
                compiled = None
        steps.append(StepReport(step, times["eager"].ms, times["gconvgen"].ms, compile_ms, _close(expected, actual),
                                {name: t.why for name, t in times.items() if not t.resolved}))
    return steps


def _forward(model: nn.Module, arguments: tuple) -> object:
    with torch.no_grad():
        return model(*arguments)


def _training_step(model: nn.Module, arguments: tuple) -> None:
    model.zero_grad(set_to_none=True)
    tensors = [leaf for leaf in _pytree.tree_leaves(model(*arguments))
               if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if tensors:
        torch.autograd.backward(tensors, [torch.ones_like(tensor) for tensor in tensors])


def _outputs(model: nn.Module, arguments: tuple) -> list[torch.Tensor]:
    return [leaf for leaf in _pytree.tree_leaves(_forward(model, arguments)) if isinstance(leaf, torch.Tensor)]


def _close(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> bool:
    """Whether the converted model's outputs match eager's within the dtype's tuning tolerance (four times:
    both sides round)."""
    if len(expected) != len(actual):
        return False
    for want, got in zip(expected, actual):
        if want.shape != got.shape or not want.is_floating_point():
            if not torch.equal(want, got):
                return False
            continue
        tolerance = 4 * measure.TOLERANCE.get(str(want.dtype).removeprefix("torch."), 1e-4)
        want, got = want.double(), got.double()
        allowed = tolerance * (want.abs() + want.square().mean().sqrt())
        if not bool(((want - got).abs() <= allowed).all()):
            return False
    return True


def _shape_text(value: object) -> str:
    if isinstance(value, torch.Tensor):
        layout = "channels_last" if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) \
            and not value.is_contiguous() else "contiguous"
        return f"{'x'.join(map(str, value.shape))} {str(value.dtype).removeprefix('torch.')} {layout}"
    return type(value).__name__


def _ms(value: Optional[float], why: str = "") -> str:
    return "n/a" if value is None or why else f"{value:.4g}"


LEGEND = (
    "kernel: what ran for the layer: a generated kernel's family and tiles (m, n, k: tile sizes; w: warps; s: "
    "pipeline stages), or aten where tuning found PyTorch faster",
    "source: tuned (the tuning database's winner) or default (untuned: the planner's heuristic config; "
    "gconvgen tune --model tunes it)",
    "gconvgen ms: one gconvgen.conv2d call at the layer's input size; F.conv2d ms: PyTorch eager, same dtype and "
    "layout; vs F.conv2d: F.conv2d ms / gconvgen ms, above one when gconvgen is faster",
    "check: gconvgen's output against a float64 reference (whole model: the converted model's output against "
    "eager's)",
    "whole model: the eager model against its gconvgen-converted copy (forward under no_grad; forward + backward: "
    "a training step without the optimizer)",
    "compile ms: torch.compile of the layer's F.conv2d, and of the whole eager model; vs compile: compile ms / "
    "gconvgen ms",
)
VERBOSE_LEGEND = ("kernel ms: the generated kernel's launch alone (where aten won, the best kernel tuning timed); "
                  "floor ms: max(bytes / copy bandwidth, flops / matmul rate), both ceilings measured in this run; "
                  "% floor: floor ms / gconvgen ms")


def format_report(data: ModelReport, *, verbose: bool = False, markdown: bool = False, note: bool = True) -> str:
    """The per-layer table, the whole-model table and the legend (see bench.format_table for ``note``)."""
    env = data.environment
    lines = [f"model on {env['device']} | input {', '.join(data.inputs)} | torch {env['torch']} | "
             f"triton {env['triton']} | {env['date']}", f"timer: {data.timer}"]
    if data.note and (note or markdown):
        lines.insert(0, f"NOTE: {data.note}")
    headers = ["layer", "conv", "kernel", "source", "gconvgen ms", "F.conv2d ms", "vs F.conv2d", "compile ms",
               "vs compile", "check"]
    compiled = any(layer.compile_why != "off" for layer in data.layers) or any(
        step.compile_ms is not None for step in data.steps)
    if not compiled:  # torch_compile=False: no columns of n/a
        headers = [header for header in headers if header not in ("compile ms", "vs compile")]
    if verbose:
        headers[-1:-1] = ["kernel ms", "floor ms", "% floor"]
    cells = []
    for layer in data.layers:
        row = layer.bench
        aten = row.choice.startswith("aten")
        cell = {"layer": ", ".join(layer.layers) + (" (F.conv2d)" if layer.route == FUNCTIONAL else ""),
                "conv": layer.problem, "kernel": "aten" if aten else row.kernel_config,
                "source": row.choice.split("(", 1)[-1].rstrip(")"),
                "gconvgen ms": _ms(row.gconvgen_ms, row.unresolved.get("gconvgen", "")),
                "F.conv2d ms": _ms(row.aten_ms, row.unresolved.get("F.conv2d", "")),
                "vs F.conv2d": bench.ratio_text(row.speedup), "compile ms": _ms(layer.compile_ms),
                "vs compile": _ratio(layer.compile_ms, None if "gconvgen" in row.unresolved else row.gconvgen_ms),
                "check": "ok" if row.correct else "WRONG", "kernel ms": _ms(row.kernel_ms),
                "floor ms": _ms(row.floor_ms), "% floor": bench.ratio_text(row.pct_of_floor, "%")}
        cells.append([cell[header] for header in headers])
    step_headers = ["whole model", "eager ms", "gconvgen ms", "vs eager", "compile ms", "check"]
    step_cells = [[step.step, _ms(step.eager_ms, step.unresolved.get("eager", "")),
                   _ms(step.gconvgen_ms, step.unresolved.get("gconvgen", "")),
                   _ratio(None if step.unresolved else step.eager_ms, step.gconvgen_ms), _ms(step.compile_ms),
                   "ok" if step.correct else "WRONG"] for step in data.steps]
    if not compiled:
        step_headers.remove("compile ms")
        step_cells = [cells_of_step[:4] + cells_of_step[5:] for cells_of_step in step_cells]
    lines += [f"not run by gconvgen: {layer}: {why}" for layer, why in data.skipped]
    lines += [f"unresolved: {layer.layers[0]} {name} time ({why})" for layer in data.layers
              for name, why in layer.bench.unresolved.items()]
    tables = [bench.text_table(headers, cells, markdown=markdown) if cells else "no grouped conv ran",
              bench.text_table(step_headers, step_cells, markdown=markdown)]
    items = [item for item in LEGEND if compiled or not item.startswith("compile ms")]
    items.append(VERBOSE_LEGEND if verbose else "(verbose adds the kernel's launch alone and the roofline floor)")
    if data.note:
        items.append(" ".join(bench.INTERPRETER_RATIOS.split()))
    if any(layer.route == FUNCTIONAL for layer in data.layers):
        items.append(FUNCTIONAL_NOTE)
    legend = "\n".join(textwrap.fill(item, 110, subsequent_indent="  ") for item in items)
    header = "\n".join(f"- {line}" if markdown else line for line in lines)
    return header + "\n\n" + "\n\n".join(tables) + "\n\n" + legend + "\n"


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    return bench.ratio_text(numerator / denominator if numerator and denominator else None)
