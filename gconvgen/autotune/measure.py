"""What tuning and benchmarking measure with: the timer (do_bench on a GPU; under Triton's interpreter a
median of perf_counter_ns samples, each long enough for the clock, marked unresolved when it is not) and
the workload (fresh random arguments of one problem, copies to rotate through so L2 does not serve them,
and the float64 reference every candidate must match)."""
from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..ir import ConvSpec
from ..runtime.fallback import aten_conv2d, aten_conv2d_backward
from ..runtime.device import TORCH_DTYPES
from .space import DeviceFacts, Problem

# Allowed error, relative to |reference| + rms(reference): output rounding plus accumulation order.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "tf32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2}
CPU_TIMER_LABEL = ("cpu-interpreter timer (one torch thread, perf_counter_ns median of samples of >= 1 ms each; "
                   "says nothing about GPU speed)")
GPU_TIMER_LABEL = "triton.testing.do_bench median"

Runner = Callable[..., torch.Tensor]  # runner(*arguments, out) -> the result (see Workload)


# ---------------------------------------------------------------------------------------------- timing

# A CPU sample repeats the call until it lasts at least this long and at least CLOCK_STEPS_PER_SAMPLE steps
# of the clock: one F.conv2d call of a smoke layer takes ~0.05 ms, far below what a preempted process or a
# coarse clock can tell apart, so timing single calls gave medians of 0.05 ms or 8 ms at random.
MIN_SAMPLE_NS = 1_000_000
CLOCK_STEPS_PER_SAMPLE = 100
# The median means something only when most samples agree with it: unless more than half of them lie
# within this factor of it (a machine busy with something else, a clock that jumps), a time is unresolved.
MAX_SPREAD = 2.0
# torch threads while timing on CPU. With two, a conv waits at every parallel region for its second thread,
# and on a machine whose other core is busy that thread runs only at the scheduler's next tick: a 0.1 ms
# F.conv2d read 8, 16 or 32 ms. The interpreter runs the kernels on one thread anyway.
CPU_TIMING_THREADS = 1


@dataclass(frozen=True)
class Measurement:
    """One timing: the median milliseconds per call and whether the clock resolved it.

    ``resolved`` is False when a sample could not be made long enough for the clock within the time budget,
    or when the samples disagree (no more than half within MAX_SPREAD of the median); ``why`` says which.
    An unresolved time is not a measurement: the bench prints no ratio for it.
    """

    ms: float
    resolved: bool = True
    calls_per_sample: int = 1
    samples: int = 1
    why: str = ""


@dataclass(frozen=True)
class Timer:
    """Times a no-argument function in milliseconds: do_bench on a GPU, batched perf_counter_ns samples on CPU."""

    label: str
    on_gpu: bool
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_repeats: int = 3
    clock: Callable[[], int] = time.perf_counter_ns  # nanoseconds; tests pass a coarse one

    def measure(self, run: Callable[[], object]) -> float:
        """The median time of ``run()`` in milliseconds, after warm-up (see ``time`` for whether it is resolved)."""
        return self.time(run).ms

    def time(self, run: Callable[[], object]) -> Measurement:
        """The median time of ``run()`` in milliseconds after warm-up, and whether the clock resolved it.

        On a GPU: triton.testing.do_bench (always resolved). On CPU, on CPU_TIMING_THREADS torch threads and
        as do_bench does: warm up for
        ``warmup_ms`` (a CPU conv's first calls, oneDNN's set-up, are 100x slower than the rest), then take
        samples for ``rep_ms`` (at least ``cpu_repeats``), each of as many back-to-back calls as make it last
        MIN_SAMPLE_NS and CLOCK_STEPS_PER_SAMPLE clock steps; the count is estimated from the fastest call
        seen and raised until the median sample is that long, or found not to fit in ``rep_ms``.
        """
        if self.on_gpu:
            import triton.testing  # imports CUDA helpers; only needed on a GPU

            return Measurement(float(triton.testing.do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms,
                                                             return_mode="median")))
        with _torch_threads(CPU_TIMING_THREADS):
            return self._cpu_time(run)

    def _cpu_time(self, run: Callable[[], object]) -> Measurement:
        step_ns = clock_step_ns(self.clock)
        if not math.isfinite(step_ns):
            run()
            return Measurement(math.inf, False, 1, 0, "the clock did not move in 100 ms")
        sample_ns = max(MIN_SAMPLE_NS, CLOCK_STEPS_PER_SAMPLE * step_ns)
        budget_ns = max(self.rep_ms * 1e6, self.cpu_repeats * MIN_SAMPLE_NS)  # for all samples
        samples = self._samples(run, 1, self.warmup_ms * 1e6, 1)
        number, why = 1, ""
        for _ in range(4):  # the estimate only grows: one or two rounds unless the clock is too coarse
            # the fastest call seen (noise only adds time); a batch that read 0 was shorter than one step
            fastest = min(samples) / number or step_ns / number
            number = max(number, math.ceil(sample_ns / fastest))
            if number > 1 and sample_ns > budget_ns:
                why = (f"a call takes about {fastest / 1e6:.3g} ms, under the {sample_ns / 1e6:.3g} ms a sample "
                       f"needs with a clock step of {step_ns / 1e6:.3g} ms, and {number} calls per sample would not "
                       f"fit in {budget_ns / 1e6:.3g} ms")
                number = max(1, int(budget_ns // fastest) // max(1, self.cpu_repeats))
            samples = self._samples(run, number, self.rep_ms * 1e6, self.cpu_repeats)
            if why or statistics.median(samples) >= sample_ns:
                break
        per_call_ms = [ns / number / 1e6 for ns in samples]
        median = statistics.median(per_call_ms)
        agreeing = sum(median / MAX_SPREAD <= ms <= median * MAX_SPREAD for ms in per_call_ms)
        if not why and statistics.median(samples) < sample_ns:
            why = (f"samples of {number} calls last {statistics.median(samples) / 1e6:.3g} ms, under the "
                   f"{sample_ns / 1e6:.3g} ms the clock needs")
        if not why and not agreeing > len(samples) / 2:
            why = (f"samples disagree: {agreeing} of {len(samples)} lie within {MAX_SPREAD:g}x of the median "
                   f"{median:.3g} ms per call ({min(per_call_ms):.3g} to {max(per_call_ms):.3g} ms)")
        return Measurement(median, not why, number, len(samples), why)

    def _samples(self, run: Callable[[], object], number: int, budget_ns: float, at_least: int) -> list[int]:
        """Nanoseconds of ``number`` back-to-back calls, sample after sample, until ``budget_ns`` is spent
        and there are ``at_least`` samples."""
        samples: list[int] = []
        while len(samples) < at_least or sum(samples) < budget_ns:
            start = self.clock()
            for _ in range(number):
                run()
            samples.append(self.clock() - start)
        return samples


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def clock_step_ns(clock: Callable[[], int] = time.perf_counter_ns, steps: int = 5) -> float:
    """The smallest step ``clock`` (nanoseconds) is seen to take over ``steps`` changes; inf when it does
    not change for 100 ms of real time. perf_counter_ns steps by tens of ns; a clock that steps by
    milliseconds cannot time a call that takes microseconds."""
    deadline = time.monotonic_ns() + 100_000_000
    smallest, previous, seen = math.inf, clock(), 0
    while seen < steps and time.monotonic_ns() < deadline:
        now = clock()
        if now != previous:
            smallest, previous, seen = min(smallest, now - previous), now, seen + 1
    return smallest


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
