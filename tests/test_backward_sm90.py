"""Every backward template compiles for the GPU: Triton's real compiler (not the interpreter) lowers each
variant to sm_90 machine code, in a subprocess without TRITON_INTERPRET. No GPU is needed for this."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

P = pytest.param
REPOSITORY = Path(__file__).resolve().parent.parent

# id -> (ConvSpec keyword arguments, allow_tf32); each compiles its grad_input and grad_weight kernels
VARIANTS = {
    "resnext-g32-fp16-nhwc": (dict(in_channels=128, out_channels=128, groups=32, kernel_size=(3, 3),
                                   padding=(1, 1, 1, 1), dtype="float16", layout="nhwc"), False),
    "uneven-pad-s2-d2-bf16-nchw": (dict(in_channels=11, out_channels=7, groups=3, kernel_size=(3, 3), stride=(2, 2),
                                        padding=(1, 0, 1, 0), dilation=(2, 2), dtype="bfloat16", layout="nchw",
                                        channel_policy="pad"), False),
    "strided-fp32-tf32": (dict(in_channels=8, out_channels=8, groups=2, kernel_size=(3, 3), padding=(1, 1, 1, 1),
                               dtype="float32", layout="strided"), True),
    "igemm-fp64": (dict(in_channels=8, out_channels=8, groups=2, kernel_size=(3, 3), dtype="float64"), False),
    "convnext-dw7-bf16-nhwc": (dict(in_channels=96, out_channels=96, groups=96, kernel_size=(7, 7),
                                    padding=(3, 3, 3, 3), bias=True, dtype="bfloat16", layout="nhwc"), False),
    "dw-uneven-out-pad-s2-fp16-nchw": (dict(in_channels=4, out_channels=7, groups=4, kernel_size=(3, 3),
                                            stride=(2, 2), padding=(1, 1, 1, 1), dtype="float16", layout="nchw",
                                            channel_policy="pad"), False),
    "dw-fp64-nhwc": (dict(in_channels=8, out_channels=8, groups=8, kernel_size=(3, 3), dtype="float64",
                          layout="nhwc"), False),
}
GRAD_BIAS_DTYPES = ("bfloat16", "float64")

SCRIPT = r'''
import json, sys
from gconvgen.ir import ConvSpec
from gconvgen.runtime.aot import compile_kernel_for_gpu
from gconvgen.runtime.grad_kernels import GradBiasKernel, grad_kernel

variants, bias_dtypes = json.loads(sys.argv[1])

def compile_kernel(fn, dtype, meta):
    # partial sums are kept in the accumulator's dtype: float64 for float64, else float32
    partials = {"partials_ptr": "float64" if dtype == "float64" else "float32"}
    compiled = compile_kernel_for_gpu(fn, meta, dtype, pointer_dtypes=partials, capability=90)
    return len(compiled.asm["cubin"])

results = {}
for name, (spec_args, allow_tf32) in variants.items():
    spec = ConvSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_args.items()})
    for kind in ("grad_input", "grad_weight"):
        kernel = grad_kernel(kind, spec, "sm90-compile-test", allow_tf32, 0.5)
        results[f"{name}:{kind}"] = compile_kernel(kernel.kernel, spec.dtype, kernel.meta(kernel.config))
for dtype in bias_dtypes:
    kernel = GradBiasKernel(dtype, "sm90-compile-test")
    results[f"grad_bias:{dtype}"] = compile_kernel(kernel.kernel, dtype, kernel.config.meta("depthwise"))
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def cubin_sizes(tmp_path_factory):
    """Compile every variant in one subprocess (Triton reads TRITON_INTERPRET when it is imported)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), env.get("PYTHONPATH", "")])
    env["GCONVGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("sm90-cache"))
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    argument = json.dumps([VARIANTS, GRAD_BIAS_DTYPES])
    result = subprocess.run([sys.executable, "-c", SCRIPT, argument], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["grad_input", "grad_weight"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backward_template_compiles_for_sm90(cubin_sizes, variant, kind):
    assert cubin_sizes[f"{variant}:{kind}"] > 0


@pytest.mark.parametrize("dtype", GRAD_BIAS_DTYPES)
def test_grad_bias_template_compiles_for_sm90(cubin_sizes, dtype):
    assert cubin_sizes[f"grad_bias:{dtype}"] > 0
