"""The tuner: time every candidate of a problem's search space, keep only the correct ones, pick the fastest.

A problem is one layer's forward kernel or one of its backward kernels. Candidates are PyTorch's own
computation (the baseline, so a tuned kernel is never slower than aten) and, for every kernel family of
the problem, its heuristic default config, stage one of its search space (tiles) and stage two (launch
settings of its fastest tiles). Every candidate's output is checked against a float64 reference before its
time counts; a candidate that fails to compile or run is dropped with the reason. The timer and the
workload are in measure.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .. import knobs
from ..ir import check
from ..compiler.families import kernel_spec
from ..compiler.lowering import ATEN, KERNEL, Choice, KernelConfig, default_config, suiting_first
from ..compiler.plan import grad_input_offers, planned, transposed_conv
from ..runtime import launch
from ..runtime.device import allows_tf32
from ..runtime.fallback import aten_conv2d, aten_conv2d_backward
from .database import kernel_record, key_of
from .measure import Runner, Timer, Workload, cudnn_benchmark, timer_for
from .space import DeviceFacts, Problem, SearchSpace, config_name, device_facts, load_space


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Trial:
    """One candidate's outcome: status 'ok' (correct, timed), 'wrong' (rejected) or 'failed' (did not run)."""

    name: str
    config: Optional[KernelConfig]
    status: str
    time_ms: Optional[float] = None
    detail: str = ""
    family: Optional[str] = None  # the forward kernel family of a kernel config
    transposed: bool = False      # a grad-input run as the forward kernel of the transposed conv


@dataclass(frozen=True)
class TuningResult:
    """Every trial of one problem and the winner: the fastest correct kernel config or aten."""

    problem: Problem
    key: str
    timer: str
    trials: tuple[Trial, ...] = field(default_factory=tuple)

    @property
    def winner(self) -> Trial:
        recordable = [t for t in self.trials if t.status == "ok" and (t.config is not None or t.name == ATEN)]
        check(recordable, f"no candidate for {self.problem.describe()} ran correctly, not even aten: "
                          + "; ".join(f"{t.name}: {t.detail}" for t in self.trials), RuntimeError)
        return min(recordable, key=lambda t: t.time_ms)

    def time_of(self, name: str) -> Optional[float]:
        """The time of the correct trial called ``name`` ('aten', 'default', ...), else None."""
        return next((t.time_ms for t in self.trials if t.name == name and t.status == "ok"), None)

    def record(self) -> dict:
        """The database record: the choice plus what it was measured against."""
        winner = self.winner
        choice = ({"choice": ATEN} if winner.config is None
                  else kernel_record(winner.config, winner.family, winner.transposed))
        kernels = sorted((t for t in self.trials if t.status == "ok" and t.config is not None), key=lambda t: t.time_ms)
        if kernels:  # kept when aten wins too: the bench reports how far the best kernel is
            best = kernels[0]
            choice["best_kernel"] = {**kernel_record(best.config, best.family, best.transposed), "time_ms": best.time_ms}
        return {
            **choice,
            "time_ms": winner.time_ms,
            "aten_ms": self.time_of(ATEN),
            "default_ms": self.time_of("default"),
            "timer": self.timer,
            "trials": len(self.trials),
            "rejected": sum(t.status == "wrong" for t in self.trials),
            "failed": sum(t.status == "failed" for t in self.trials),
            "problem": self.problem.describe(),
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


# ---------------------------------------------------------------------------------------------- the tuner


def aten_runner(problem: Problem) -> Runner:
    """PyTorch's own computation of ``problem``'s kernel: the baseline every tuning result must beat."""
    spec = problem.spec
    if problem.kind == "forward":
        return lambda x, weight, bias, out: aten_conv2d(spec, x, weight, bias)
    if problem.kind == "grad_input":
        return lambda grad_output, weight, out: aten_conv2d_backward(spec, grad_output, out, weight, (True, False))[0]
    return lambda x, grad_output, out: aten_conv2d_backward(spec, grad_output, x, out, (False, True))[1]


@dataclass
class KernelRunner:
    """``problem``'s kernel of ``family`` with ``config``, called as the Workload calls every candidate
    (a Runner); ``compiled`` is the CompiledKernel of its last GPU launch (None in the interpreter)."""

    problem: Problem
    family: str
    config: KernelConfig
    transposed: bool = False
    compiled: object = None

    def __call__(self, *arguments: Optional[torch.Tensor]) -> torch.Tensor:
        choice = Choice(KERNEL, self.config, self.family, self.transposed)
        spec, kind = self.problem.spec, self.problem.kind
        if kind == "forward":
            prepared = launch.prepare_forward(spec, *arguments, choice)
        elif kind == "grad_input":
            prepared = launch.prepare_grad_input(spec, *arguments, choice)
        else:
            prepared = launch.prepare_grad_weight(spec, *arguments, choice)
        self.compiled = launch.run(prepared) or self.compiled
        return arguments[-1]


def kernel_runner(problem: Problem, family: str, config: KernelConfig, transposed: bool = False) -> KernelRunner:
    """``problem``'s kernel of ``family`` with ``config`` (``transposed``: a grad-input run as that family's
    forward kernel of the transposed conv), called as the Workload calls every candidate."""
    return KernelRunner(problem, family, config, transposed)


def spilled_words(runner: Runner) -> int:
    """The 4-byte words of local memory a thread of ``runner``'s compiled kernel spills registers to
    (Triton's ``n_spills``: the loaded binary's local size / 4); 0 for aten, the interpreter, and a kernel
    not yet launched."""
    return getattr(getattr(runner, "compiled", None), "n_spills", 0) or 0


@dataclass(frozen=True)
class Family:
    """One kernel family a problem can run: its search space and heuristic default config, and the problem
    its configs are shaped for (a transposed grad-input's: the transposed conv's forward)."""

    name: str
    space: SearchSpace
    default: KernelConfig
    problem: Problem
    transposed: bool = False

    @property
    def title(self) -> str:
        """The family's name in trial names: 'depthwise', or 'transposed depthwise' for a transposed grad-input."""
        return f"transposed {self.name}" if self.transposed else self.name

    def label(self, config: KernelConfig) -> str:
        return f"{self.title} {config_name(config, None)}"


def _search_spaces(problem: Problem) -> list[tuple[str, str, Problem, bool]]:
    """(family, search space name, the problem its configs are for, transposed) of every kernel tuning
    ``problem`` searches, the one an untuned call runs first: every forward family the planner offers; for
    grad-input, the direct kernel (space ``grad_input_<family>``) and, where the conv is its own transpose,
    each forward family of the transposed conv (plan.grad_input_offers); for grad-weight, each family with a
    grad-weight kernel (plan.grad_weight_families, space ``grad_weight_<family>``)."""
    budget = knobs.padding_budget()
    spec = problem.spec
    if problem.kind == "forward":  # the first that claims or suits the launch's pixels (Family.claims, suits)
        offered = suiting_first(planned(spec, budget).families, spec, "forward", problem.pixel_space)
        return [(family, family, problem, False) for family in offered]
    if problem.kind == "grad_input":
        transposed = transposed_conv(spec)
        forward = None if transposed is None else Problem(transposed, problem.batch, *problem.output_size)
        offers = grad_input_offers(spec, budget)
        direct = [(family, f"grad_input_{family}", problem, False) for family, is_transposed in offers
                  if not is_transposed]
        if forward is None:
            return direct
        forwards = suiting_first(tuple(family for family, is_transposed in offers if is_transposed), transposed,
                                 "forward", forward.pixel_space)
        transposed_forwards = [(family, family, forward, True) for family in forwards]
        return transposed_forwards + direct if offers[0][1] else direct + transposed_forwards
    # the family an untuned call runs first (the first that suits the launch's pixels, Family.suits)
    offered = suiting_first(planned(spec, budget).grad_weight_families, spec, "grad_weight", problem.pixel_space)
    return [(family, f"{problem.kind}_{family}", problem, False) for family in offered]


def families_of(problem: Problem, facts: DeviceFacts) -> list[Family]:
    """The kernel families tuning ``problem`` searches (see _search_spaces) on a device of ``facts``."""
    interpret = facts.kind == "interpreter"
    return [Family(family, load_space(space, facts.kind),
                   default_config(kernel_spec(shaped.spec, family, shaped.kind), family, shaped.kind,
                                  interpret=interpret, pixels=shaped.pixel_space),
                   shaped, transposed)
            for family, space, shaped, transposed in _search_spaces(problem)]


def planned_trials(problem: Problem, facts: DeviceFacts) -> int:
    """About how many trials tuning ``problem`` takes (for a progress bar's ETA)."""
    trials = 1  # aten
    for _, name, shaped, _ in _search_spaces(problem):
        space = load_space(name, facts.kind)
        first = space.stage_one(shaped, facts)
        trials += 1 + len(first) + len(space.stage_two(first[: space.finalists], shaped, facts))
    return trials


def tune(problem: Problem, device: torch.device | str, *, extra_configs: Sequence[KernelConfig] = (),
         extra_runners: Sequence[tuple[str, Runner]] = (), on_trial: Optional[Callable[[Trial], None]] = None,
         timer: Optional[Timer] = None) -> TuningResult:
    """Tune ``problem`` (its forward kernel, or the backward kernel ``problem.kind``) on ``device`` (CPU runs
    Triton's interpreter, which must be on).

    Every kernel family of the problem is searched: its default config, then its search space in two
    stages. ``extra_configs`` (of the default family) and ``extra_runners`` (name, runner(*arguments, out)
    -> out; see Workload) join stage one and are checked and timed like the rest; only kernel configs and
    aten can win. ``on_trial`` sees each trial as it finishes. Raises RuntimeError when not even aten runs
    correctly.
    """
    device = torch.device(device)
    check(device.type == "cuda" or knobs.interpret(),
          f"device={device} needs Triton's interpreter to tune on CPU; set TRITON_INTERPRET=1 or use a CUDA device")
    facts = device_facts(device)
    allow_tf32 = allows_tf32(device)
    timer = timer or timer_for(device)
    workload = Workload.create(problem, device, facts, allow_tf32)
    trials: list[Trial] = []

    def attempt(name: str, runner: Runner, config: Optional[KernelConfig] = None, family: Optional[Family] = None):
        trial = Trial(name, config, "", family=family and family.name, transposed=bool(family and family.transposed))
        trial = _try(workload, timer, trial, runner)
        trials.append(trial)
        if on_trial:
            on_trial(trial)

    def attempt_config(family: Family, config: KernelConfig, name: Optional[str] = None) -> None:
        attempt(name or family.label(config), kernel_runner(problem, family.name, config, family.transposed), config,
                family)

    with cudnn_benchmark():
        attempt(ATEN, aten_runner(problem))
    for name, runner in extra_runners:
        attempt(name, runner)
    families = families_of(problem, facts)
    for family in families:
        # the default family with its default config is what an untuned key runs: named "default"
        attempt_config(family, family.default, "default" if family is families[0] else f"{family.title} default")
        tried = {family.default}
        for config in _untried([*(extra_configs if family is families[0] else ()),
                                *family.space.stage_one(family.problem, facts)], tried):
            attempt_config(family, config)
        ranked = sorted((t for t in trials if t.status == "ok" and (t.family, t.transposed) == (family.name, family.transposed)),
                        key=lambda t: t.time_ms)
        for config in _untried(family.space.stage_two([t.config for t in ranked[: family.space.finalists]],
                                                      family.problem, facts), tried):
            attempt_config(family, config)
    return TuningResult(problem, key_of(problem, facts.target, allow_tf32), timer.label, tuple(trials))


def _untried(configs: Iterable[KernelConfig], tried: set[KernelConfig]) -> Iterator[KernelConfig]:
    """The configs not in ``tried``, in order, each added to it as it is handed out."""
    for config in configs:
        if config not in tried:
            tried.add(config)
            yield config


def _try(workload: Workload, timer: Timer, candidate: Trial, runner: Runner) -> Trial:
    """Check one candidate against the reference, then time it; any exception drops it with the reason."""
    try:
        error = workload.check(runner)
        if error:
            return replace(candidate, status="wrong", detail=error)
        spilled = spilled_words(runner)
        if spilled:  # the compiler's output decides: a spilling config is dropped before it is timed
            return replace(candidate, status="failed",
                           detail=f"spills registers: {spilled} words of local memory a thread (n_spills)")
        return replace(candidate, status="ok", time_ms=timer.measure(workload.timed(runner)))
    except KeyboardInterrupt:
        raise
    except Exception as failure:  # a compile error, out of resources, a bad launch: drop the candidate
        first_line = (str(failure).strip().splitlines() or [""])[0][:200]
        return replace(candidate, status="failed", detail=f"{type(failure).__name__}: {first_line}")
