"""How long Triton's interpreter will take: an estimate said before a real-size layer is tuned or timed on CPU.

The interpreter runs a kernel's programs one after another in Python, so a run's time grows with the
launch's programs, that is with the output's pixels, at a cost per program that depends on the family and
the layer. ``interpreter_seconds`` measures it: each kernel family's default config runs (twice: the first
call renders and loads it) on the same layer at batch 1 and at most CALIBRATION_PIXELS output pixels, and
the second run's time is scaled by the ratio of output pixels. Tuning runs every candidate about
RUNS_PER_TRIAL times. The figures are estimates within a factor of about two (against measured tuning of
small layers), not promises.
"""
from __future__ import annotations

import math
import time

import torch

from ..ir import check
from .measure import Workload
from .space import Problem, device_facts
from .tuner import families_of, kernel_runner

CALIBRATION_PIXELS = 256  # the calibration run's output pixels at most (a 16 x 16 output)
RUNS_PER_TRIAL = 5        # tuning: the correctness check, a warm-up call and three timed samples (measure.Timer)
SMALLER_TILES = 1.5       # candidates with smaller tiles than the default run more programs (measured: 1-3x)


def calibration_problem(problem: Problem) -> Problem:
    """``problem``'s layer at batch 1 and an input whose output is at most 16 x 16 (a height-1 layer keeps
    height 1): as small as the interpreter's time per program can be measured on."""
    if problem.output_pixels <= CALIBRATION_PIXELS:
        return problem
    spec = problem.spec
    side = int(math.isqrt(CALIBRATION_PIXELS))
    out_height, out_width = problem.output_size
    top, bottom, left, right = spec.padding

    def input_for(out: int, size: int, axis: int, padding: int) -> int:
        needed = (out - 1) * spec.stride[axis] + spec.dilation[axis] * (spec.kernel_size[axis] - 1) + 1 - padding
        return min(size, max(1, needed))

    height = input_for(min(out_height, side), problem.height, 0, top + bottom)
    width = input_for(min(out_width, side if out_height > 1 else CALIBRATION_PIXELS), problem.width, 1, left + right)
    return Problem(spec, 1, height, width, problem.kind)


def interpreter_seconds(problem: Problem) -> dict[str, float]:
    """Seconds one run of each kernel family's default config of ``problem`` takes in Triton's interpreter
    (estimated from a calibration run, see the module's docstring), by (family name, transposed). Needs the interpreter on."""
    device = torch.device("cpu")
    facts = device_facts(device)
    small = calibration_problem(problem)
    workload = Workload.create(small, device, facts, False, seed=0)
    scale = problem.output_pixels / small.output_pixels
    seconds = {}
    for family in families_of(small, facts):
        runner = kernel_runner(small, family.name, family.default, family.transposed)
        try:
            runner(*workload.copies[0])  # renders and loads the kernel
            start = time.perf_counter()
            runner(*workload.copies[0])
            seconds[family.name, family.transposed] = (time.perf_counter() - start) * scale
        except Exception:  # a family that cannot run this layer: tuning drops it at once, costing nothing
            seconds[family.name, family.transposed] = 0.0
    return seconds


def tuning_seconds(problem: Problem) -> float:
    """About how many seconds tuning ``problem`` takes in Triton's interpreter: each family's candidates
    (its default, then its search space's two stages) times RUNS_PER_TRIAL runs of its default's time."""
    facts = device_facts(torch.device("cpu"))
    per_run = interpreter_seconds(problem)
    total = 0.0
    for family in families_of(problem, facts):
        first = family.space.stage_one(family.problem, facts)
        candidates = 1 + len(first) + len(family.space.stage_two(first[: family.space.finalists], family.problem, facts))
        total += per_run.get((family.name, family.transposed), 0.0) * candidates * RUNS_PER_TRIAL * SMALLER_TILES
    return total


def duration_text(seconds: float) -> str:
    """'about 40 s', 'about 12 min', 'about 3.4 h'."""
    check(seconds >= 0, f"seconds={seconds!r} must be >= 0")
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"
