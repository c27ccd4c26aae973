"""The tuner: time every candidate of a problem's search space, keep only the correct ones, pick the fastest.

Candidates are PyTorch's own conv (the baseline, so a tuned layer is never slower than aten) and, for every
forward kernel family the planner offers, its heuristic default config, stage one of its search space
(tiles) and stage two (launch settings of its fastest tiles).
Every candidate's output is checked against a float64 reference before its time counts; a candidate that
fails to compile or run is dropped with the reason. On a GPU the timer is ``triton.testing.do_bench``
(median, after warm-up, rotating input copies when they fit in L2); under Triton's interpreter on CPU it is
a ``time.perf_counter`` median, labelled as such: those timings say nothing about GPU speed.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .. import knobs
from ..ir import ConvSpec, check
from ..runtime.fallback import aten_conv2d, aten_conv2d_backward
from ..runtime.grad_kernels import default_grad_config, grad_kernel_for
from ..runtime.kernels import TORCH_DTYPES, KernelConfig, compiled_for, default_config, planned
from .database import ATEN, kernel_record, key_of
from .space import DeviceFacts, Problem, SearchSpace, config_name, device_facts, load_space

# Allowed error, relative to |reference| + rms(reference): output rounding plus accumulation order.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "tf32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2}
CPU_TIMER_LABEL = "cpu-interpreter timer (perf_counter median; says nothing about GPU speed)"
GPU_TIMER_LABEL = "triton.testing.do_bench median"

Runner = Callable[..., torch.Tensor]  # runner(*arguments, out) -> the result (see Workload)


# ---------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timer:
    """Times a no-argument function in milliseconds: do_bench on a GPU, perf_counter under the interpreter."""

    label: str
    on_gpu: bool
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_repeats: int = 3

    def measure(self, run: Callable[[], object]) -> float:
        """The median time of ``run()`` in milliseconds, after warm-up."""
        if self.on_gpu:
            import triton.testing  # imports CUDA helpers; only needed on a GPU

            return float(triton.testing.do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        # as do_bench does: warm up for warmup_ms, then time for rep_ms (at least cpu_repeats runs);
        # a CPU conv's first calls (oneDNN set-up) are 100x slower than the rest
        self._cpu_times(run, self.warmup_ms, 1)
        times = self._cpu_times(run, self.rep_ms, self.cpu_repeats)
        return statistics.median(times)

    @staticmethod
    def _cpu_times(run: Callable[[], object], budget_ms: float, at_least: int) -> list[float]:
        times: list[float] = []
        while len(times) < at_least or sum(times) < budget_ms:
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        return times


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cudnn.benchmark on, restored after: F.conv2d picks its fastest algorithm, as a tuned model's would,
    so the aten baseline is the strongest one and a tuned layer is never slower than it."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def timer_for(device: torch.device, *, warmup_ms: int = 10, rep_ms: int = 50) -> Timer:
    """The timer for ``device``: short do_bench runs for tuning by default; the bench passes longer ones."""
    on_gpu = torch.device(device).type != "cpu"
    return Timer(GPU_TIMER_LABEL if on_gpu else CPU_TIMER_LABEL, on_gpu, warmup_ms, rep_ms)


# ---------------------------------------------------------------------------------------------- inputs


def random_activation(problem: Problem, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Fresh normal x [N, C_in, H, W] of the problem's dtype in its layout ('strided' skips every other column)."""
    spec = problem.spec
    width = problem.width * (2 if spec.layout == "strided" else 1)
    x = torch.randn(problem.batch, spec.in_channels, problem.height, width, generator=generator, device=device)
    x = x.to(TORCH_DTYPES[spec.dtype])
    if spec.layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    return x[..., ::2] if spec.layout == "strided" else x


def _memory_format(spec: ConvSpec) -> torch.memory_format:
    """Where the op writes outputs and gradients of activations in ``spec``'s layout."""
    return torch.channels_last if spec.layout == "nhwc" else torch.contiguous_format


def allocate_output(problem: Problem, like: torch.Tensor) -> torch.Tensor:
    """An output buffer [N, C_out, OH, OW] in the activation's memory format, filled with NaN."""
    spec = problem.spec
    out = torch.empty(problem.batch, spec.out_channels, *problem.output_size, dtype=like.dtype, device=like.device,
                      memory_format=_memory_format(spec))
    return out.fill_(float("nan"))


def _same_strides(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the same values and the same strides (clone() would make a sliced view dense)."""
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor)


@dataclass
class Workload:
    """The arguments every candidate of one problem runs on, and the float64 reference they must match.

    A candidate is called as ``runner(*arguments, out)``: forward (x, weight, bias, out), grad_input
    (grad_output, weight, grad_x) and grad_weight (x, grad_output, grad_weight). ``copies`` holds such
    argument tuples with the same values; timing rotates through them so that a working set that fits in L2
    is not served from L2 by the previous run (the weight, read by every program, is shared).
    """

    problem: Problem
    copies: list[tuple[Optional[torch.Tensor], ...]]
    reference: torch.Tensor
    tolerance: float

    @classmethod
    def create(cls, problem: Problem, device: torch.device, facts: DeviceFacts, allow_tf32: bool,
               seed: Optional[int] = None) -> "Workload":
        """Fresh random inputs (from ``seed`` when given) and their reference on ``device``."""
        spec = problem.spec
        # a private generator: tuning on a user's first call must not move their random stream
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # fresh inputs each time: a candidate cannot pass on lucky values
        else:
            generator.manual_seed(seed)
        dtype = TORCH_DTYPES[spec.dtype]
        x = random_activation(problem, device, generator)
        weight = torch.randn(spec.weight_shape, generator=generator, device=device).to(dtype)
        if spec.layout == "nhwc":
            weight = weight.contiguous(memory_format=torch.channels_last)  # as model.to(channels_last) does
        if problem.kind == "forward":
            bias = torch.randn(spec.out_channels, generator=generator, device=device).to(dtype) if spec.bias else None
            arguments, varying = (x, weight, bias), (0,)
            reference = aten_conv2d(spec, x.double(), weight.double(), None if bias is None else bias.double())
            out = allocate_output(problem, x)
        else:
            grad_output = allocate_output(problem, x).copy_(
                torch.randn(problem.batch, spec.out_channels, *problem.output_size, generator=generator, device=device))
            needs = (problem.kind == "grad_input", problem.kind == "grad_weight")
            grads = aten_conv2d_backward(spec, grad_output.double(), x.double(), weight.double(), needs)
            if problem.kind == "grad_input":
                arguments, varying, reference = (grad_output, weight), (0,), grads[0]
                out = torch.full_like(x, float("nan"), memory_format=_memory_format(spec))
            else:
                arguments, varying, reference = (x, grad_output), (0, 1), grads[1]
                out = torch.full(spec.weight_shape, float("nan"), dtype=dtype, device=device)
        working_set = sum(arguments[i].numel() * arguments[i].element_size() for i in varying)
        working_set += out.numel() * out.element_size()
        count = 1  # enough copies that one pass over them overflows L2 twice
        if 0 < working_set < facts.l2_bytes:
            count = min(256, math.ceil(2 * facts.l2_bytes / working_set))
        copies = [(*arguments, out)] + [
            (*(_same_strides(a) if i in varying else a for i, a in enumerate(arguments)), torch.empty_like(out))
            for _ in range(count - 1)]
        tf32 = spec.dtype == "float32" and allow_tf32
        return cls(problem, copies, reference, TOLERANCE["tf32" if tf32 else spec.dtype])

    def error_of(self, result: torch.Tensor) -> Optional[str]:
        """None when ``result`` matches the reference, else why it does not."""
        if tuple(result.shape) != tuple(self.reference.shape):
            return f"shape {tuple(result.shape)} != reference {tuple(self.reference.shape)}"
        actual = result.double()
        if not torch.isfinite(actual).all():
            return "non-finite outputs (elements left unwritten?)"
        error = (actual - self.reference).abs()
        allowed = self.tolerance * (self.reference.abs() + self.reference.square().mean().sqrt())
        if (error > allowed).any():
            worst = int((error - allowed).argmax())
            return f"wrong result: max error {error.max().item():.3g}, allowed {allowed.flatten()[worst].item():.3g}"
        return None

    def check(self, runner: Runner) -> Optional[str]:
        """Run ``runner`` once on the first copy, its output NaN-filled first: None when correct, else why not."""
        *arguments, out = self.copies[0]
        out.fill_(float("nan"))
        return self.error_of(runner(*arguments, out))

    def timed(self, runner: Runner) -> Callable[[], object]:
        """A no-argument call of ``runner`` that rotates through the argument copies."""
        rotation = itertools.cycle(self.copies)
        return lambda: runner(*next(rotation))


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
        choice = {"choice": ATEN} if winner.config is None else kernel_record(winner.config, winner.family)
        kernels = sorted((t for t in self.trials if t.status == "ok" and t.config is not None), key=lambda t: t.time_ms)
        if kernels:  # kept when aten wins too: the bench reports how far the best kernel is
            choice["best_kernel"] = {**kernel_record(kernels[0].config, kernels[0].family), "time_ms": kernels[0].time_ms}
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


def allows_tf32(device: torch.device) -> bool:
    """Whether float32 kernels on ``device`` may use TF32: torch's cuDNN setting, as compiled_for reads it."""
    return device.type == "cuda" and torch.backends.cudnn.allow_tf32


def aten_runner(problem: Problem) -> Runner:
    """PyTorch's own computation of ``problem``'s kernel: the baseline every tuning result must beat."""
    spec = problem.spec
    if problem.kind == "forward":
        return lambda x, weight, bias, out: aten_conv2d(spec, x, weight, bias)
    if problem.kind == "grad_input":
        return lambda grad_output, weight, out: aten_conv2d_backward(spec, grad_output, out, weight, (True, False))[0]
    return lambda x, grad_output, out: aten_conv2d_backward(spec, grad_output, x, out, (False, True))[1]


@dataclass(frozen=True)
class Family:
    """One kernel family a problem can run: its compiled kernel, search space and heuristic default config."""

    name: str
    kernel: object  # CompiledConv, GradInputKernel or GradWeightKernel: .launch(*arguments, out, config)
    space: SearchSpace
    default: KernelConfig


def families_of(problem: Problem, device: torch.device, facts: DeviceFacts) -> list[Family]:
    """The kernel families tuning ``problem`` searches, the planner's default first: every forward family the
    planner offers, or the one backward family (space ``<kind>_<family>``)."""
    spec, interpret = problem.spec, facts.kind == "interpreter"
    conv_plan = planned(spec, knobs.padding_budget())
    if problem.kind == "forward":
        return [Family(name, compiled_for(spec, device, name), load_space(name, facts.kind),
                       default_config(spec, name, interpret=interpret)) for name in conv_plan.families]
    family = conv_plan.backward_family
    return [Family(family, grad_kernel_for(problem.kind, spec, device), load_space(f"{problem.kind}_{family}", facts.kind),
                   default_grad_config(problem.kind, spec, family, interpret=interpret))]


def planned_trials(problem: Problem, facts: DeviceFacts) -> int:
    """About how many trials tuning ``problem`` takes (for a progress bar's ETA)."""
    conv_plan = planned(problem.spec, knobs.padding_budget())
    names = conv_plan.families if problem.kind == "forward" else (f"{problem.kind}_{conv_plan.backward_family}",)
    trials = 1  # aten
    for name in names:
        space = load_space(name, facts.kind)
        first = space.stage_one(problem, facts)
        trials += 1 + len(first) + len(space.stage_two(first[: space.finalists], problem, facts))
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

    def attempt(name: str, runner: Runner, config: Optional[KernelConfig] = None, family: Optional[str] = None):
        trial = _try(workload, timer, Trial(name, config, "", family=family), runner)
        trials.append(trial)
        if on_trial:
            on_trial(trial)

    with cudnn_benchmark():
        attempt(ATEN, aten_runner(problem))
    for name, runner in extra_runners:
        attempt(name, runner)
    families = families_of(problem, device, facts)
    for family in families:
        def try_configs(configs: Iterable[KernelConfig], tried: set[KernelConfig]) -> None:
            for config in configs:
                if config not in tried:
                    tried.add(config)
                    attempt(config_name(config, family.name), functools.partial(family.kernel.launch, config=config),
                            config, family.name)

        # the default family with its default config is what an untuned key runs: named "default"
        attempt("default" if family is families[0] else f"{family.name} default",
                functools.partial(family.kernel.launch, config=family.default), family.default, family.name)
        tried = {family.default}
        try_configs([*(extra_configs if family is families[0] else ()), *family.space.stage_one(problem, facts)], tried)
        ranked = sorted((t for t in trials if t.status == "ok" and t.family == family.name), key=lambda t: t.time_ms)
        try_configs(family.space.stage_two([t.config for t in ranked[: family.space.finalists]], problem, facts), tried)
    return TuningResult(problem, key_of(problem, facts.target, allow_tf32), timer.label, tuple(trials))


def _try(workload: Workload, timer: Timer, candidate: Trial, runner: Runner) -> Trial:
    """Check one candidate against the reference, then time it; any exception drops it with the reason."""
    try:
        error = workload.check(runner)
        if error:
            return replace(candidate, status="wrong", detail=error)
        return replace(candidate, status="ok", time_ms=timer.measure(workload.timed(runner)))
    except KeyboardInterrupt:
        raise
    except Exception as failure:  # a compile error, out of resources, a bad launch: drop the candidate
        first_line = (str(failure).strip().splitlines() or [""])[0][:200]
        return replace(candidate, status="failed", detail=f"{type(failure).__name__}: {first_line}")
