"""Host time per warm call of gconvgen.conv2d with the kernel launch stubbed out, beside F.conv2d's own
dispatch time on the same machine.

    TRITON_INTERPRET=1 python scripts/host_overhead.py [--calls N]      CPU tensors, Triton's interpreter
    python scripts/host_overhead.py --device cuda [--calls N]            CUDA tensors, Triton's real launcher

The kernel launch (``kernel[grid](...)``) is replaced by a no-op, so what is timed is gconvgen's Python
between the call and Triton's launcher: on a warm call, the launch the first call ran with this call's
tensors bound to it (gconvgen/runtime/launch.py ``Warm``), with the output's allocation and any weight or
activation copy it needs. Last, it counts what a cold call (a new input size, kernel already loaded) runs:
calls into gconvgen's functions and switches between its modules.
F.conv2d computes on CPU tensors, so its meta-tensor row (dispatch, no arithmetic) is the fair comparison
there. On CUDA the script first prints each row with real launches (host time per call, asynchronous: the
GPU's work overlaps it), then stubbed. Prints microseconds per call (median of 7 repeats).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "cuda" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import gconvgen  # noqa: E402


def per_call_us(run, calls: int, device: str, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean host time of ``calls`` calls of ``run()``, in microseconds."""
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device, calls = args.device, args.calls
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    x = make(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    weight = make(32, 4, 3, 3).contiguous(memory_format=torch.channels_last)  # ohwi: read as it is
    depthwise_weight = make(32, 1, 3, 3)  # nn.Conv2d's OIHW: copied to hwio on each call
    x_nchw, x_nhwc, keras_weight = x.contiguous(), x.permute(0, 2, 3, 1), make(3, 3, 4, 32)
    bias = make(32)
    module = gconvgen.GroupedConv2d(32, 32, 3, padding=1, groups=32, device=device, dtype=dtype).eval()
    x_meta, weight_meta = x.to("meta"), weight.to("meta")
    ours = [
        ("gconvgen.conv2d, grouped, channels_last weight",
         lambda: gconvgen.conv2d(x, weight, bias, padding=1, groups=8)),
        ("gconvgen.conv2d, grouped, NCHW input staged",
         lambda: gconvgen.conv2d(x_nchw, weight, bias, padding=1, groups=8)),
        ("gconvgen.conv2d, depthwise, OIHW weight copied",
         lambda: gconvgen.conv2d(x, depthwise_weight, bias, padding=1, groups=32)),
        ("gconvgen.conv2d, NHWC with a Keras HWIO weight",
         lambda: gconvgen.conv2d(x_nhwc, keras_weight, bias, padding=1, groups=8, data_format="NHWC")),
        ("GroupedConv2d (depthwise) module call", lambda: module(x)),
    ]
    torch_rows = [
        (f"F.conv2d, {device} tensors (computes)", lambda: F.conv2d(x, weight, bias, padding=1, groups=8)),
        ("F.conv2d, meta tensors (dispatch only)", lambda: F.conv2d(x_meta, weight_meta, None, padding=1, groups=8)),
    ]
    print(f"host time per warm call, {calls} calls x 7 repeats, median (torch {torch.__version__}, "
          f"Triton {triton.__version__}, {device}):")
    with torch.no_grad():
        for _, run in ours:
            run()  # compile and load once, for real
        if device == "cuda":
            for name, run in ours + torch_rows:
                run()
                print(f"  {name + ', launched':<58} {per_call_us(run, calls, device):8.1f} us")
            triton.runtime.jit.JITFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
        else:
            InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
        for name, run in [(name + ", launch stubbed", run) for name, run in ours] + torch_rows:
            run()
            print(f"  {name:<64} {per_call_us(run, calls, device):8.1f} us")
        functions, switches = cold_call_profile(lambda: gconvgen.conv2d(make(2, 32, 10, 10), weight, bias, padding=1,
                                                                         groups=8))
        print(f"cold call (new input size, kernel loaded): {functions} gconvgen function calls, {switches} switches "
              f"between its modules")


def cold_call_profile(run) -> tuple[int, int]:
    """(calls of gconvgen functions, switches between gconvgen modules from one such call to the next) made
    by ``run()``, counted with sys.setprofile."""
    counts = {"calls": 0, "switches": 0, "last": None}

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("gconvgen"):
            counts["calls"] += 1
            counts["switches"] += module != counts["last"]
            counts["last"] = module

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return counts["calls"], counts["switches"]


if __name__ == "__main__":
    main()
