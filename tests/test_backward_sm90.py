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
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gconvgen import codegen
from gconvgen.ir import ConvSpec
from gconvgen.plan import plan
from gconvgen.runtime import cache
from gconvgen.runtime.grad_kernels import GradBiasKernel, default_grad_config

POINTERS = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}
ACCUMULATORS = {"float64": "*fp64"}
TARGET = GPUTarget("cuda", 90, 32)
variants, bias_dtypes = json.loads(sys.argv[1])

def compile_kernel(fn, dtype, config):
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        if name.startswith("BLOCK_"):
            signature[name], constexprs[name] = "constexpr", getattr(config, "block_" + name[-1].lower())
        elif name == "partials_ptr":
            signature[name] = ACCUMULATORS.get(dtype, "*fp32")
        elif name.endswith("_ptr"):
            signature[name] = POINTERS[dtype]
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return len(compiled.asm["cubin"])

results = {}
for name, (spec_args, allow_tf32) in variants.items():
    spec = ConvSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_args.items()})
    conv_plan = plan(spec)
    for kind in ("grad_input", "grad_weight"):
        uri = codegen.kernel_uri(conv_plan, interpret=False, allow_tf32=allow_tf32, kind=kind)
        render = lambda: codegen.render(conv_plan, interpret=False, allow_tf32=allow_tf32, kind=kind)
        path = cache.ensure_module_file("sm90-compile-test", uri, render)
        fn = getattr(cache.import_module(path), "gconvgen_" + uri)
        config = default_grad_config(kind, spec, conv_plan.family, interpret=False)
        results[f"{name}:{kind}"] = compile_kernel(fn, spec.dtype, config)
for dtype in bias_dtypes:
    kernel = GradBiasKernel(dtype, "sm90-compile-test")
    results[f"grad_bias:{dtype}"] = compile_kernel(kernel.kernel, dtype, kernel.config)
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
