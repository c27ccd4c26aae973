"""Forward plus backward of one layer, gconvgen against PyTorch eager: what ``gconvgen bench --backward``
measures. ``time_forward_backward`` times one layer; ``format_table`` prints rows and their geometric mean.

    from gconvgen import ConvSpec
    from gconvgen.tools.bench_backward import time_forward_backward, format_table
    spec = ConvSpec(128, 128, 32, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16", layout="nhwc")
    print(format_table([time_forward_backward(spec, batch=64, height=56, width=56)]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..nn.conv2d import conv2d
from ..autotune.measure import CPU_TIMER_LABEL, GPU_TIMER_LABEL, Measurement, Timer
from ..ir import ConvSpec, check
from ..ops import backward as _backward  # noqa: F401  (gconvgen::conv2d's autograd formula, differentiated here)
from ..runtime.fallback import aten_conv2d
from ..runtime.device import TORCH_DTYPES
from .inspection import geometric_mean


@dataclass(frozen=True)
class BackwardTiming:
    """Milliseconds for one forward plus the backward of x, weight and bias, per implementation.

    ``resolved`` is False when the CPU clock could not resolve either time (see measure.Timer.time).
    """

    spec: ConvSpec
    batch: int
    height: int
    width: int
    gconvgen_ms: float
    torch_ms: float
    resolved: bool = True

    @property
    def speedup(self) -> Optional[float]:
        """PyTorch's time over gconvgen's (above 1.0 gconvgen is faster); None when a time is unresolved."""
        return self.torch_ms / self.gconvgen_ms if self.resolved else None


def _inputs(spec: ConvSpec, batch: int, height: int, width: int, device: torch.device):
    """Random x (in the spec's layout), weight and bias that need gradients, and an output gradient."""
    dtype = TORCH_DTYPES[spec.dtype]
    x = torch.randn(batch, spec.in_channels, height, width, dtype=dtype, device=device)
    if spec.layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(spec.weight_shape, dtype=dtype, device=device) / math.sqrt(math.prod(spec.weight_shape[1:]))
    bias = torch.randn(spec.out_channels, dtype=dtype, device=device) if spec.bias else None
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    out_height, out_width = spec.output_size(height, width)
    grad_output = torch.randn(batch, spec.out_channels, out_height, out_width, dtype=dtype, device=device)
    if spec.layout == "nhwc":
        grad_output = grad_output.to(memory_format=torch.channels_last)
    return x, weight, bias, leaves, grad_output


# On CPU, samples are taken for at least this long (and ``repeats`` of them), so that a fast PyTorch step
# gets enough samples for its median to mean something.
CPU_REP_MS = 25


def _time(step: Callable[[], object], device: torch.device, repeats: int) -> Measurement:
    """do_bench for ``repeats`` ms on a GPU; on CPU one warm-up call, then measure.Timer's samples."""
    if device.type == "cuda":
        return Timer(GPU_TIMER_LABEL, True, warmup_ms=max(1, repeats // 4), rep_ms=repeats).time(step)
    return Timer(CPU_TIMER_LABEL, False, warmup_ms=0, rep_ms=CPU_REP_MS, cpu_repeats=repeats).time(step)


def time_forward_backward(spec: ConvSpec, batch: int, height: int, width: int, *,
                          device: str | torch.device = "cuda", repeats: int = 100) -> BackwardTiming:
    """Time forward + backward (grads of x, weight and bias) of ``spec`` on a [batch, C_in, height, width]
    input, for gconvgen and for PyTorch eager (F.conv2d on the same padded problem). On CUDA ``repeats`` is
    the measuring time in ms of triton.testing.do_bench; elsewhere the least number of samples (each of
    1 ms or more, see measure.Timer.time). Raises ValueError for sizes the kernel does not fit."""
    check(isinstance(spec, ConvSpec), f"spec={spec!r} must be a gconvgen.ConvSpec", TypeError)
    for name, value in (("batch", batch), ("height", height), ("width", width), ("repeats", repeats)):
        check(isinstance(value, int) and value >= 1, f"{name}={value!r} must be an int >= 1")
    device = torch.device(device)
    x, weight, bias, leaves, grad_output = _inputs(spec, batch, height, width, device)
    check(min(spec.output_size(height, width)) >= 1,
          f"a {height}x{width} input is smaller than the padded kernel of {spec}; use a larger height/width")

    def gconvgen_step():
        out = conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups,
                     channel_policy=spec.channel_policy)
        return torch.autograd.grad(out, leaves, grad_output)

    def torch_step():
        return torch.autograd.grad(aten_conv2d(spec, x, weight, bias), leaves, grad_output)

    gconvgen_time, torch_time = _time(gconvgen_step, device, repeats), _time(torch_step, device, repeats)
    return BackwardTiming(spec, batch, height, width, gconvgen_time.ms, torch_time.ms,
                          gconvgen_time.resolved and torch_time.resolved)


def format_table(timings: Sequence[BackwardTiming]) -> str:
    """One line per layer (shape, both times, speedup) and the geometric-mean speedup over the layers whose
    times were resolved (an unresolved layer shows no times and no speedup)."""
    check(len(timings) > 0, "timings is empty; time at least one layer")
    lines = [f"{'layer':<58} {'gconvgen ms':>12} {'torch ms':>10} {'speedup':>10}"]
    for timing in timings:
        spec = timing.spec
        layer = (f"{spec.in_channels}->{spec.out_channels} g{spec.groups} k{spec.kernel_size[0]}x{spec.kernel_size[1]} "
                 f"s{spec.stride[0]} N{timing.batch} {timing.height}x{timing.width} {spec.dtype} {spec.layout}")
        if timing.resolved:
            lines.append(f"{layer:<58} {timing.gconvgen_ms:>12.4g} {timing.torch_ms:>10.4g} "
                         f"{timing.speedup:>9.3g}x")
        else:
            lines.append(f"{layer:<58} {'unresolved':>12} {'unresolved':>10} {'n/a':>10}")
    speedups = [t.speedup for t in timings if t.resolved]
    if not speedups:
        lines.append("geometric-mean speedup: n/a (the clock resolved no layer's times)")
        return "\n".join(lines)
    geomean = geometric_mean(speedups)
    lines.append(f"geometric-mean speedup: {geomean:.3g}x over {len(speedups)} of {len(timings)} layer(s), "
                 f"slowest layer {min(speedups):.3g}x")
    return "\n".join(lines)
