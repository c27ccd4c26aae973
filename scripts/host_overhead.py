"""Host time per warm call of gconvgen.conv2d with the kernel launch stubbed out, beside F.conv2d's own
dispatch time on the same machine (a tiny CPU conv, and a meta-tensor conv that does no arithmetic).

    TRITON_INTERPRET=1 python scripts/host_overhead.py [--calls N]

The kernel launch (``kernel[grid](...)``) is replaced by a no-op, so what is timed is gconvgen's Python
between the call and Triton's launcher: argument checks, the spec, the tuning choice, the launch arguments.
Runs on CPU; prints microseconds per call (median of repeats).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import gconvgen  # noqa: E402


def per_call_us(run, calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` calls of ``run()``, in microseconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    calls = parser.parse_args().calls
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 4, 3, 3).contiguous(memory_format=torch.channels_last)  # ohwi: read as it is
    depthwise_weight = torch.randn(32, 1, 3, 3)  # nn.Conv2d's OIHW: copied to hwio on each call
    x_nhwc, keras_weight = x.permute(0, 2, 3, 1), torch.randn(3, 3, 4, 32)
    bias = torch.randn(32)
    module = gconvgen.GroupedConv2d(32, 32, 3, padding=1, groups=32).to(memory_format=torch.channels_last).eval()
    x_meta, weight_meta = x.to("meta"), weight.to("meta")
    rows = [
        ("gconvgen.conv2d, grouped, channels_last weight",
         lambda: gconvgen.conv2d(x, weight, bias, padding=1, groups=8)),
        ("gconvgen.conv2d, depthwise, OIHW weight copied",
         lambda: gconvgen.conv2d(x, depthwise_weight, bias, padding=1, groups=32)),
        ("gconvgen.conv2d, NHWC with a Keras HWIO weight",
         lambda: gconvgen.conv2d(x_nhwc, keras_weight, bias, padding=1, groups=8, data_format="NHWC")),
        ("GroupedConv2d (depthwise) under no_grad", lambda: module(x)),
        ("F.conv2d, CPU tensors (computes)", lambda: F.conv2d(x, weight, bias, padding=1, groups=8)),
        ("F.conv2d, meta tensors (dispatch only)", lambda: F.conv2d(x_meta, weight_meta, None, padding=1, groups=8)),
    ]
    with torch.no_grad():
        for _, run in rows[:4]:
            run()  # compile and load once, for real
        InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)  # stub the launch
        print(f"host time per warm call, {calls} calls x 7 repeats, median (torch {torch.__version__}); "
              f"gconvgen's launches stubbed:")
        for name, run in rows:
            run()
            print(f"  {name:<48} {per_call_us(run, calls):8.1f} us")


if __name__ == "__main__":
    main()
