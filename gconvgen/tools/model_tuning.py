"""``gconvgen.tune(model, example_inputs)``: tune the grouped convs of a user's model, not a suite's.

One forward of the model (and one backward with ``backward=True``) is recorded (tools/model_calls.py), the
distinct problems are tuned through the same tuner as ``gconvgen tune --suite`` with a progress bar, each
result goes into the tuning database as it finishes, and a per-layer summary says what each layer now runs
and how it compares with aten. On CPU the kernels run in Triton's interpreter: the time is estimated before
the work starts and refused over a bound, and the summary says that aten wins there and why.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import tqdm
from torch import nn

from .. import knobs
from ..autotune import tuner
from ..autotune.database import choice_of, database, key_of
from ..autotune.estimate import duration_text, tuning_seconds
from ..autotune.space import Problem, config_name, device_facts
from ..ir import check
from ..compiler.lowering import ATEN
from .model_calls import FUNCTIONAL, Recording, check_model_arguments, example_arguments, record_calls
from ..runtime.device import allows_tf32

MAX_INTERPRETER_MINUTES = 10.0  # on CPU, tuning estimated to take longer is refused unless max_minutes says more
INTERPRETER_NOTE = ("CPU: every kernel ran in Triton's interpreter (a Python simulation of the GPU program) and aten "
                    "ran natively, so aten wins every layer here; these times say nothing about GPU speed. Tune on "
                    "the GPU the model will run on.")
FUNCTIONAL_NOTE = ("(F.conv2d) marks an F.conv2d / F.conv1d call in a module's forward: gconvgen runs it under "
                   "torch.compile(model, backend='gconvgen'); gconvgen.convert leaves it to torch.")


@dataclass(frozen=True)
class TunedLayer:
    """One layer's kernel after tuning: its name, route (model_calls.MODULE or FUNCTIONAL), problem, and
    ``status`` 'tuned', 'already tuned' (the database had it; ``force`` tunes again) or 'failed' (``why``);
    ``record`` is the database record (None when failed)."""

    layer: str
    route: str
    problem: Problem
    status: str
    record: Optional[dict]
    why: str = ""


@dataclass
class ModelTuning:
    """What ``tune`` did: a row per layer and kernel, the convs gconvgen does not run (layer, why), where
    the database is and whether the timings were the interpreter's. ``str()`` is the per-layer summary."""

    rows: list[TunedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    database: Optional[Path] = None
    interpreter: bool = False

    def __str__(self) -> str:
        return format_summary(self)


def tune(model: nn.Module, example_inputs: object, *, backward: bool = False, force: bool = False,
         max_minutes: Optional[float] = None, layers: Sequence[str] = (), quiet: bool = False) -> ModelTuning:
    """Tune every grouped and depthwise conv that one forward of ``model`` on ``example_inputs`` runs (a
    tensor, or a tuple of positional arguments, on the device and in the dtype and memory format the model
    will run in), and write the winners to the tuning database, where every later call of those layers finds
    them (``gconvgen.convert``, ``fuse`` and ``torch.compile(backend="gconvgen")`` alike).

    ``backward=True`` also tunes the gradient kernels one backward pass runs (from the sum of the outputs).
    The model is not changed: a converted copy runs (model_calls.record_calls). Layers the database has are
    kept unless ``force``. ``layers`` restricts tuning to those module names. On CPU, kernels run in Triton's
    interpreter (TRITON_INTERPRET=1 must be set before Triton is imported): the time is estimated first and
    refused above ``max_minutes`` (default MAX_INTERPRETER_MINUTES; no bound on a GPU). Unless ``quiet``, a
    progress bar and the summary are printed (stderr and stdout).

    Returns a ModelTuning (``print`` it for the per-layer summary). Raises TypeError / ValueError naming the
    argument for bad arguments, ValueError when the estimate is over ``max_minutes``, and KeyboardInterrupt
    after keeping what was tuned.
    """
    check_model_arguments(model, {"backward": backward, "force": force, "quiet": quiet}, max_minutes)
    check(not isinstance(layers, str), f"layers={layers!r} must be a list of module names, e.g. [{layers!r}]",
          TypeError)
    device = model_device(model, example_inputs)
    check(device.type == "cuda" or knobs.interpret(),
          f"the model is on {device}: tuning on CPU runs the kernels in Triton's interpreter, which is off; start "
          f"Python with TRITON_INTERPRET=1 (Triton reads it when it is imported), or tune on a CUDA device")
    recording = record_calls(model, example_inputs, backward=backward)
    recording = selected_layers(recording, tuple(layers))
    outcome = ModelTuning(skipped=recording.skipped, database=database().path, interpreter=device.type == "cpu")
    records = _tune_problems(recording, force, max_minutes, quiet)
    for (problem, problem_device), calls in recording.problems().items():
        status, record, why = records[problem, problem_device]
        seen = set()
        for call in calls:
            if call.layer not in seen:
                seen.add(call.layer)
                outcome.rows.append(TunedLayer(call.layer, call.route, problem, status, record, why))
    if not quiet:
        print(outcome)
    return outcome


def model_device(model: nn.Module, example_inputs: object) -> torch.device:
    """The device of the first tensor among ``example_inputs``, else of the model's first parameter (CPU
    when there is neither)."""
    for value in example_arguments(example_inputs):
        if isinstance(value, torch.Tensor):
            return value.device
    return next((parameter.device for parameter in model.parameters()), torch.device("cpu"))


def selected_layers(recording: Recording, layers: tuple[str, ...]) -> Recording:
    """``recording`` restricted to the calls of ``layers`` (all when empty); ValueError naming a layer that
    ran no grouped conv, with the closest names that did."""
    if not layers:
        return recording
    known = list(dict.fromkeys(call.layer for call in recording.calls))
    for layer in layers:
        close = difflib.get_close_matches(layer, known, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        check(layer in known, f"layers: {layer!r} ran no grouped conv; the layers that did: "
                              f"{', '.join(known) or 'none'}{hint}")
    return Recording([call for call in recording.calls if call.layer in layers], recording.skipped)


def _tune_problems(recording: Recording, force: bool, max_minutes: Optional[float],
                   quiet: bool) -> dict[tuple[Problem, torch.device], tuple[str, Optional[dict], str]]:
    """Tune each distinct problem the database lacks (all with ``force``), recording each as it finishes.
    Returns (status, record, why) per (problem, device)."""
    db = database()
    outcome, todo = {}, []
    for (problem, device), calls in recording.problems().items():
        key = key_of(problem, device_facts(device).target, allows_tf32(device))
        record = db.lookup(key)
        if record is not None and not force:
            outcome[problem, device] = ("already tuned", record, "")
        else:
            todo.append((calls[0].layer, problem, device))
    _check_interpreter_time([problem for _, problem, device in todo if device.type == "cpu"], max_minutes, quiet)
    estimates = [tuner.planned_trials(problem, device_facts(device)) for _, problem, device in todo]
    with tqdm.tqdm(total=sum(estimates), unit="trial", desc="tuning", dynamic_ncols=True, disable=quiet or not todo,
                   file=sys.stderr) as bar:
        for (layer, problem, device), estimate in zip(todo, estimates):
            label = f"{layer or 'model'} {problem.kind}"
            bar.set_postfix_str(label)
            try:
                result = tuner.tune(problem, device, on_trial=lambda trial: bar.update(1))
                record = result.record()
                db.record({result.key: record})
            except (RuntimeError, ValueError, OSError) as error:  # one layer's failure does not stop the rest
                outcome[problem, device] = ("failed", None, str(error))
                bar.write(f"{label}: not tuned: {error}", file=sys.stderr)
                continue
            bar.total += len(result.trials) - estimate
            bar.refresh()
            outcome[problem, device] = ("tuned", record, "")
            if not quiet:
                bar.write(f"{label}: {chosen_text(record)}", file=sys.stderr)
    return outcome


def _check_interpreter_time(problems: list[Problem], max_minutes: Optional[float], quiet: bool) -> None:
    """Estimate the interpreter's time for ``problems``, say it, and refuse it above ``max_minutes``."""
    if not problems:
        return
    largest = max(problems, key=lambda problem: problem.output_pixels)
    check_interpreter_budget(f"tuning {len(problems)} problem(s)", sum(tuning_seconds(problem) for problem in problems),
                             max_minutes, quiet=quiet, detail=f" (the largest: {largest.describe()})",
                             instead=" to try gconvgen out, or tune")


def check_interpreter_budget(what: str, seconds: float, max_minutes: Optional[float], *, quiet: bool,
                             detail: str = "", instead: str = ", or run") -> None:
    """Refuse ``what`` when the interpreter's estimated ``seconds`` exceed ``max_minutes`` (None:
    MAX_INTERPRETER_MINUTES), saying the value that would let it run; else say the estimate (unless
    ``quiet``) before the work starts. ``instead`` ends the advice ("... a smaller input{instead} on a CUDA
    device")."""
    limit = MAX_INTERPRETER_MINUTES if max_minutes is None else max_minutes
    check(seconds <= 60 * limit,
          f"{what} in Triton's interpreter on CPU would take {duration_text(seconds)}{detail}, over "
          f"max_minutes={limit:g}; pass max_minutes={max(1, round(seconds / 60 * 1.5))} to go ahead, use a smaller "
          f"input{instead} on a CUDA device (CPU timings say nothing about GPU speed)")
    if not quiet:
        print(f"{what} in Triton's interpreter on CPU: {duration_text(seconds)} (estimated)", file=sys.stderr)


def speed_text(value: Optional[float]) -> str:
    """A speed ratio: '1.00x', '0.0027x'; '-' for None."""
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _runs(record: dict) -> tuple[str, str, str, str]:
    """(what a record runs, its ms, its speed against aten, the best kernel where aten won and its speed)."""
    choice = choice_of(record)
    name = ATEN if choice.config is None else config_name(choice.config, choice.family)
    aten_ms = record.get("aten_ms")
    against_aten = speed_text(aten_ms / record["time_ms"] if aten_ms else None)
    best = record.get("best_kernel")
    best_text = "-"
    if choice.config is None and best and aten_ms:
        best_text = (f"{config_name(choice_of(best).config, best.get('family'))} "
                     f"{speed_text(aten_ms / best['time_ms'])}")
    return name, f"{record['time_ms']:.4g}", against_aten, best_text


def chosen_text(record: dict) -> str:
    """One line of what a record runs: 'aten: 0.054 ms, 1.00x aten (best kernel depthwise ...: 0.0027x)'."""
    name, ms, against_aten, best = _runs(record)
    return f"{name}: {ms} ms, {against_aten} aten" + (f" (best kernel {best})" if best != "-" else "")


def format_summary(outcome: ModelTuning) -> str:
    """The per-layer summary: layer, conv, status, what it runs now, its time and speed against aten, and
    where aten won the best kernel tuning timed."""
    headers = ("layer", "conv", "status", "runs now", "ms", "vs aten", "best kernel, vs aten")
    cells = []
    for row in outcome.rows:
        layer = (row.layer or "(model)") + (" (F.conv2d)" if row.route == FUNCTIONAL else "")
        runs = _runs(row.record) if row.record else (f"default config ({row.why})", "-", "-", "-")
        cells.append((layer, row.problem.describe(), row.status, *runs))
    counts = {status: sum(row.status == status for row in outcome.rows) for status in ("tuned", "already tuned",
                                                                                        "failed")}
    lines = [f"gconvgen.tune: {len(outcome.rows)} layer kernel(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    if cells:
        widths = [max(len(header), *(len(cell[i]) for cell in cells)) for i, header in enumerate(headers)]
        lines += ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                  for line in [headers, *cells]]
    lines += [f"not run by gconvgen: {layer}: {why}" for layer, why in outcome.skipped]
    lines.append("vs aten: aten's time over the chosen one's (the database never picks one slower than aten); "
                 "best kernel: the fastest generated kernel where aten won")
    if any(row.route == FUNCTIONAL for row in outcome.rows):
        lines.append(FUNCTIONAL_NOTE)
    if outcome.interpreter:
        lines.append(INTERPRETER_NOTE)
    if outcome.database is not None:
        lines.append(f"tuning database: {outcome.database}")
    return "\n".join(lines)
