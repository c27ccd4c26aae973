"""The tuner: time every candidate of a problem's search space, keep only the correct ones, pick the fastest.

Candidates are PyTorch's own conv (the baseline, so a tuned layer is never slower than aten), the heuristic
default config, stage one of the search space (tiles) and stage two (launch settings of the fastest tiles).
Every candidate's output is checked against a float64 reference before its time counts; a candidate that
fails to compile or run is dropped with the reason. On a GPU the timer is ``triton.testing.do_bench``
(median, after warm-up, rotating input copies when they fit in L2); under Triton's interpreter on CPU it is
a ``time.perf_counter`` median, labelled as such: those timings say nothing about GPU speed.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from .. import knobs
from ..ir import check
from ..runtime.fallback import aten_conv2d
from ..runtime.kernels import TORCH_DTYPES, KernelConfig, compiled_for, default_config, planned
from .database import ATEN, kernel_record, key_of
from .space import DeviceFacts, Problem, config_name, device_facts, load_space

# Allowed error, relative to |reference| + rms(reference): output rounding plus accumulation order.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "tf32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2}
CPU_TIMER_LABEL = "cpu-interpreter timer (perf_counter median; says nothing about GPU speed)"
GPU_TIMER_LABEL = "triton.testing.do_bench median"

Runner = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]


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


def allocate_output(problem: Problem, like: torch.Tensor) -> torch.Tensor:
    """An output buffer [N, C_out, OH, OW] in the activation's memory format, filled with NaN."""
    spec = problem.spec
    fmt = torch.channels_last if spec.layout == "nhwc" else torch.contiguous_format
    out = torch.empty(problem.batch, spec.out_channels, *problem.output_size, dtype=like.dtype, device=like.device,
                      memory_format=fmt)
    return out.fill_(float("nan"))


def _same_strides(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the same values and the same strides (clone() would make a sliced view dense)."""
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor)


@dataclass
class Workload:
    """The tensors every candidate of one problem runs on, and the float64 reference they must match.

    ``copies`` holds (x, out) pairs with the same values; timing rotates through them so that a working
    set that fits in L2 is not served from L2 by the previous run.
    """

    problem: Problem
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    copies: list[tuple[torch.Tensor, torch.Tensor]]
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
        bias = torch.randn(spec.out_channels, generator=generator, device=device).to(dtype) if spec.bias else None
        reference = aten_conv2d(spec, x.double(), weight.double(), None if bias is None else bias.double())
        out = allocate_output(problem, x)
        working_set = (x.numel() + out.numel()) * x.element_size()
        count = 1  # enough copies that one pass over them overflows L2 twice
        if 0 < working_set < facts.l2_bytes:
            count = min(256, math.ceil(2 * facts.l2_bytes / working_set))
        copies = [(x, out)] + [(_same_strides(x), torch.empty_like(out)) for _ in range(count - 1)]
        tf32 = spec.dtype == "float32" and allow_tf32
        return cls(problem, weight, bias, copies, reference, TOLERANCE["tf32" if tf32 else spec.dtype])

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

    def timed(self, runner: Runner) -> Callable[[], object]:
        """A no-argument call of ``runner`` that rotates through the input copies."""
        rotation = itertools.cycle(self.copies)

        def run() -> object:
            x, out = next(rotation)
            return runner(x, self.weight, self.bias, out)

        return run


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Trial:
    """One candidate's outcome: status 'ok' (correct, timed), 'wrong' (rejected) or 'failed' (did not run)."""

    name: str
    config: Optional[KernelConfig]
    status: str
    time_ms: Optional[float] = None
    detail: str = ""


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
        choice = {"choice": ATEN} if winner.config is None else kernel_record(winner.config)
        kernels = sorted((t for t in self.trials if t.status == "ok" and t.config is not None), key=lambda t: t.time_ms)
        if kernels:  # kept when aten wins too: the bench reports how far the best kernel is
            choice["best_kernel"] = {**kernel_record(kernels[0].config), "time_ms": kernels[0].time_ms}
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


def planned_trials(problem: Problem, facts: DeviceFacts) -> int:
    """About how many trials tuning ``problem`` takes (for a progress bar's ETA)."""
    space = load_space(planned(problem.spec, knobs.padding_budget()).family, facts.kind)
    first = space.stage_one(problem, facts)
    return 2 + len(first) + len(space.stage_two(first[: space.finalists], problem, facts))


def tune(problem: Problem, device: torch.device | str, *, extra_configs: Sequence[KernelConfig] = (),
         extra_runners: Sequence[tuple[str, Runner]] = (), on_trial: Optional[Callable[[Trial], None]] = None,
         timer: Optional[Timer] = None) -> TuningResult:
    """Tune ``problem`` on ``device`` (CPU runs Triton's interpreter, which must be on).

    ``extra_configs`` and ``extra_runners`` (name, runner(x, weight, bias, out) -> out) join stage one and are
    checked and timed like the rest; only kernel configs and aten can win. ``on_trial`` sees each trial as
    it finishes. Raises RuntimeError when not even aten runs correctly.
    """
    device = torch.device(device)
    check(device.type == "cuda" or knobs.interpret(),
          f"device={device} needs Triton's interpreter to tune on CPU; set TRITON_INTERPRET=1 or use a CUDA device")
    facts = device_facts(device)
    allow_tf32 = allows_tf32(device)
    timer = timer or timer_for(device)
    compiled = compiled_for(problem.spec, device)
    space = load_space(compiled.family, facts.kind)
    workload = Workload.create(problem, device, facts, allow_tf32)
    trials: list[Trial] = []

    def attempt(name: str, config: Optional[KernelConfig], runner: Runner) -> Trial:
        trial = _try(workload, timer, name, config, runner)
        trials.append(trial)
        if on_trial:
            on_trial(trial)
        return trial

    def kernel_runner(config: KernelConfig) -> Runner:
        return lambda x, weight, bias, out: compiled.launch(x, weight, bias, out, config)

    spec = problem.spec
    with cudnn_benchmark():
        attempt(ATEN, None, lambda x, weight, bias, out: aten_conv2d(spec, x, weight, bias))
    default = default_config(spec, compiled.family, interpret=facts.kind == "interpreter")
    attempt("default", default, kernel_runner(default))
    for name, runner in extra_runners:
        attempt(name, None, runner)
    tried = {default}
    for config in [*extra_configs, *space.stage_one(problem, facts)]:
        if config not in tried:
            tried.add(config)
            attempt(config_name(config), config, kernel_runner(config))
    ranked = sorted((t for t in trials if t.status == "ok" and t.config is not None), key=lambda t: t.time_ms)
    for config in space.stage_two([t.config for t in ranked[: space.finalists]], problem, facts):
        if config not in tried:
            tried.add(config)
            attempt(config_name(config), config, kernel_runner(config))
    return TuningResult(problem, key_of(problem, facts.target, allow_tf32), timer.label, tuple(trials))


def _try(workload: Workload, timer: Timer, name: str, config: Optional[KernelConfig], runner: Runner) -> Trial:
    """Check one candidate against the reference, then time it; any exception drops it with the reason."""
    x, out = workload.copies[0]
    try:
        out.fill_(float("nan"))
        error = workload.error_of(runner(x, workload.weight, workload.bias, out))
        if error:
            return Trial(name, config, "wrong", detail=error)
        return Trial(name, config, "ok", timer.measure(workload.timed(runner)))
    except KeyboardInterrupt:
        raise
    except Exception as failure:  # a compile error, out of resources, a bad launch: drop the candidate
        first_line = (str(failure).strip().splitlines() or [""])[0][:200]
        return Trial(name, config, "failed", detail=f"{type(failure).__name__}: {first_line}")
