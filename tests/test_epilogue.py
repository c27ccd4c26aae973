"""Fused epilogues: activation(conv + bias + residual) in the kernel, against torch in float64, forward and
gradients, in every forward family and both layouts (run through the interpreter; unwritten outputs stay NaN)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gconvgen
from gconvgen.ir import ConvSpec
from gconvgen.compiler.lowering import ACTIVATIONS, KERNEL, Choice, default_config
from gconvgen.runtime import launch
from gconvgen.activations import apply as apply_activation
from conftest import assert_close, spy_on_kernels

P = pytest.param
ALL = ACTIVATIONS[1:]  # relu, relu6, silu, gelu, gelu_tanh, hardswish


def reference(x, weight, bias, residual, padding, groups, activation):
    """torch in float64: activation(F.conv2d + bias + residual)."""
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=padding,
                   groups=groups)
    return apply_activation(out if residual is None else out + residual.double(), activation)


# in_channels, out_channels, groups, kernel, family (None: the planner's), layout
FAMILIES = [
    P(8, 8, 2, 3, "igemm", "nchw", id="igemm-nchw"),
    P(12, 12, 3, 3, "igemm", "channels_last", id="igemm-packed-nhwc"),
    P(6, 12, 6, 3, "depthwise", "nchw", id="depthwise-multiplier-2"),
    P(8, 8, 8, 3, "depthwise", "channels_last", id="depthwise-nhwc"),
    P(8, 8, 8, 5, "depthwise_gemm", "nchw", id="banded-nchw"),
    P(8, 8, 8, 5, "depthwise_gemm", "channels_last", id="banded-nhwc"),
]


@pytest.mark.parametrize("in_channels, out_channels, groups, kernel, family, layout", FAMILIES)
@pytest.mark.parametrize("activation", ALL)
def test_every_family_applies_the_epilogue(in_channels, out_channels, groups, kernel, family, layout, activation,
                                           nan_filled_outputs):
    residual_on = activation in ("relu", "silu", "hardswish")  # half the cases add a residual
    x = torch.randn(2, in_channels, 6, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, in_channels // groups, kernel, kernel)
    bias = torch.randn(out_channels)
    pad = kernel // 2
    residual = torch.randn(2, out_channels, 6, 7) if residual_on else None
    spec = ConvSpec(in_channels, out_channels, groups, (kernel, kernel), padding=(pad,) * 4, bias=True,
                    layout="nhwc" if layout == "channels_last" else "nchw")
    config = default_config(spec, family, "forward", interpret=True)
    out = torch.empty(2, out_channels, 6, 7)
    launch.forward(spec, x, weight, bias, out, Choice(KERNEL, config, family), activation=activation,
                   residual=residual)
    assert_close(out, reference(x, weight, bias, residual, pad, groups, activation), torch.float32)


@pytest.mark.parametrize("activation", ALL)
@pytest.mark.parametrize("groups, data_format", [P(2, "NCHW", id="grouped"), P(6, "NHWC", id="depthwise-nhwc")])
def test_gradients_match_torch(activation, groups, data_format):
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 6 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    nhwc = data_format == "NHWC"
    to_layout = (lambda t: t.permute(0, 2, 3, 1)) if nhwc else (lambda t: t)
    out = gconvgen.conv2d(to_layout(x), weight.permute(2, 3, 1, 0) if nhwc else weight, bias, padding=1,
                          groups=groups, data_format=data_format, activation=activation, residual=to_layout(residual))
    out = out.permute(0, 3, 1, 2) if nhwc else out
    expected = reference(x, weight, bias, residual, 1, groups, activation)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, weight, bias, residual), upstream)
    want = torch.autograd.grad(expected, (x, weight, bias, residual), upstream)
    for name, actual, wanted in zip(("x", "weight", "bias", "residual"), got, want):
        torch.testing.assert_close(actual, wanted, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("activation", ["relu6", "gelu"])
def test_double_backward(activation):
    """A gradient penalty through the fused op: relu6 reads its mask off the output, gelu recomputes."""
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def penalty(conv):
        out = conv(x, weight)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), weight)[0]

    got = penalty(lambda a, b: gconvgen.conv2d(a, b, padding=1, groups=2, activation=activation))
    want = penalty(lambda a, b: apply_activation(F.conv2d(a, b, padding=1, groups=2), activation))
    torch.testing.assert_close(got, want)


def test_grouped_conv2d_module_with_activation_and_residual():
    module = gconvgen.GroupedConv2d(6, 6, 3, padding=1, groups=3, activation="silu")
    x, residual = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        expected = F.silu(F.conv2d(x, module.weight, module.bias, padding=1, groups=3) + residual)
        assert_close(module(x, residual), expected.double(), torch.float32)
    assert "activation='silu'" in repr(module)


@pytest.mark.parametrize("activation, residual_shape, error, match", [
    P("tanh", None, ValueError, "activation='tanh' is not supported; use None or one of", id="unknown-activation"),
    P(None, (2, 6, 4, 4), ValueError, r"residual has shape \(2, 6, 4, 4\); expected the output's \[2, 6, 5, 5\]",
      id="residual-shape"),
])
def test_bad_epilogue_arguments(activation, residual_shape, error, match):
    residual = None if residual_shape is None else torch.randn(residual_shape)
    with pytest.raises(error, match=match):
        gconvgen.conv2d(torch.randn(2, 6, 5, 5), torch.randn(6, 2, 3, 3), padding=1, groups=3,
                        activation=activation, residual=residual)


SM90_SCRIPT = """
import json, torch
from gconvgen.autotune.space import Problem
from gconvgen.tools.inspection import INSPECT_TARGET, _meta_tensors
from gconvgen.ir import ConvSpec
from gconvgen.compiler.lowering import ACTIVATIONS, Choice
from gconvgen.runtime import launch
from gconvgen.tools import sass
specs = [ConvSpec(128, 128, 32, (3, 3), padding=(1, 1, 1, 1), bias=True, dtype="bfloat16", layout="nhwc"),
         ConvSpec(64, 64, 64, (3, 3), padding=(1, 1, 1, 1), bias=True, dtype="float32", layout="nhwc"),
         ConvSpec(64, 64, 64, (7, 7), padding=(3, 3, 3, 3), bias=True, dtype="float16", layout="nhwc"),
         ConvSpec(64, 64, 64, (1, 4), padding=(0, 0, 3, 0), bias=True, dtype="bfloat16", layout="nchw")]
results = []
for index, activation in enumerate(ACTIVATIONS[1:]):  # each activation once, the families rotating
    spec = specs[index % 4]
    problem = Problem(spec, 4, 1, 64) if spec.kernel_size[0] == 1 else Problem(spec, 4, 14, 14)
    t = _meta_tensors(problem)
    residual = t["out"] if index % 2 else None
    prepared = launch.prepare_forward(spec, t["x"], t["weight"], t["bias"], t["out"], Choice("default"),
                                      INSPECT_TARGET, activation=activation, residual=residual)
    desc = prepared.desc
    arguments = {name: sass.Pointer(str(value.dtype).removeprefix("torch.")) if isinstance(value, torch.Tensor)
                 else value for name, value in prepared.arguments().items()}
    meta = desc.meta
    compiled = sass.compile_like_launch(launch.kernel_of(desc, INSPECT_TARGET), arguments,
                                        {k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_BLOCK")},
                                        num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    results.append({"uri": desc.uri, "cubin": len(compiled.asm["cubin"]), "residual": desc.residual,
                    "activation": desc.activation})
print(json.dumps(results))
"""


def test_epilogue_variants_compile_for_sm90():
    """Every activation, with and without a residual, in each forward family, through Triton's real
    compiler for sm_90 as a launch specialises it (the interpreter accepts what the compiler may not)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SM90_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(ALL) and all(result["cubin"] > 0 for result in results)
    assert {result["activation"] for result in results} == set(ALL) and len({r["uri"] for r in results}) == len(ALL)
    assert any(result["residual"] for result in results) and not all(result["residual"] for result in results)
    assert {result["uri"].split("_ci")[0] for result in results} == {"igemm", "depthwise", "depthwise_gemm",
                                                                      "depthwise1d"}


@pytest.mark.parametrize("activation", ALL)
def test_depthwise1d_applies_the_epilogue(activation, monkeypatch, nan_filled_outputs):
    """The 1-D family (Mamba's causal conv -> SiLU), NCL, with a residual: every activation."""
    families = spy_on_kernels(monkeypatch, lambda desc: desc.family)
    x, weight, bias, residual = torch.randn(2, 8, 19), torch.randn(8, 1, 4), torch.randn(8), torch.randn(2, 8, 19)
    out = gconvgen.conv1d(x, weight, bias, padding="causal", groups=8, activation=activation, residual=residual)
    expected = apply_activation(F.conv1d(F.pad(x.double(), (3, 0)), weight.double(), bias.double(), groups=8)
                                + residual.double(), activation)
    assert_close(out, expected, torch.float32)
    assert families == ["depthwise1d"]
