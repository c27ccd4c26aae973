"""Forward plus backward of one layer, gconvgen against PyTorch eager: what ``gconvgen bench --backward``
measures. ``time_forward_backward`` times one layer; ``format_table`` prints rows and their geometric mean.

    from gconvgen import ConvSpec
    from gconvgen.bench_backward import time_forward_backward, format_table
    spec = ConvSpec(128, 128, 32, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16", layout="nhwc")
    print(format_table([time_forward_backward(spec, batch=64, height=56, width=56)]))
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import triton.testing

from .api import conv2d
from .ir import ConvSpec, check
from .runtime.fallback import aten_conv2d
from .runtime.ops import TORCH_DTYPES


@dataclass(frozen=True)
class BackwardTiming:
    """Milliseconds for one forward plus the backward of x, weight and bias, per implementation."""

    spec: ConvSpec
    batch: int
    height: int
    width: int
    gconvgen_ms: float
    torch_ms: float

    @property
    def speedup(self) -> float:
        """PyTorch's time over gconvgen's: above 1.0 gconvgen is faster."""
        return self.torch_ms / self.gconvgen_ms


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


def _milliseconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(step, warmup=max(1, repeats // 4), rep=repeats)
    step()  # compile / warm up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) * 1000 / repeats


def time_forward_backward(spec: ConvSpec, batch: int, height: int, width: int, *,
                          device: str | torch.device = "cuda", repeats: int = 100) -> BackwardTiming:
    """Time forward + backward (grads of x, weight and bias) of ``spec`` on a [batch, C_in, height, width]
    input, for gconvgen and for PyTorch eager (F.conv2d on the same padded problem). On CUDA ``repeats`` is
    the measuring time in ms of triton.testing.do_bench; elsewhere the number of runs. Raises ValueError
    for sizes the kernel does not fit."""
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

    return BackwardTiming(spec, batch, height, width, _milliseconds(gconvgen_step, device, repeats),
                          _milliseconds(torch_step, device, repeats))


def format_table(timings: Sequence[BackwardTiming]) -> str:
    """One line per layer (shape, both times, speedup) and the geometric-mean speedup."""
    check(len(timings) > 0, "timings is empty; time at least one layer")
    lines = [f"{'layer':<58} {'gconvgen ms':>12} {'torch ms':>10} {'speedup':>8}"]
    for timing in timings:
        spec = timing.spec
        layer = (f"{spec.in_channels}->{spec.out_channels} g{spec.groups} k{spec.kernel_size[0]}x{spec.kernel_size[1]} "
                 f"s{spec.stride[0]} N{timing.batch} {timing.height}x{timing.width} {spec.dtype} {spec.layout}")
        lines.append(f"{layer:<58} {timing.gconvgen_ms:>12.3f} {timing.torch_ms:>10.3f} {timing.speedup:>7.2f}x")
    geomean = math.exp(sum(math.log(t.speedup) for t in timings) / len(timings))
    lines.append(f"geometric-mean speedup: {geomean:.2f}x, slowest layer {min(t.speedup for t in timings):.2f}x")
    return "\n".join(lines)
