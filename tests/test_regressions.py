"""Every wrong result an outside check found, as it was reported: each test is one repro, against torch in
float64 (or eager torch where the report compared with eager). The property-based fuzz (test_fuzz.py) holds
the same cases as @examples and searches around them; these stay as the readable record of each bug."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import gconvgen
from gconvgen.autotune import choice
from gconvgen.compiler.lowering import DEFAULT, KERNEL, Choice, default_config
from gconvgen.compiler.tiles import PixelSpace
from gconvgen.ir import ConvSpec
from conftest import assert_close, spy_on_kernels

P = pytest.param


# ---------------------------------------------------------------------------------------------- row alignment
# depthwise1d and the banded kernel write the strides and widths they index with rounded down to the launch's
# row alignment (so Triton can prove vector loads aligned); the alignment once left out a unit channel stride
# and a width whose stride was not 1, so a width of 1 became 0 and a width of 3 became 2.


@pytest.mark.parametrize("channels, kernel", [
    P(8, 3, id="c8-k3"),
    P(16, 5, id="c16-k5"),
    P(24, 3, id="c24-k3"),
])
def test_depthwise_stride_2_on_a_2x2_map_writes_its_1x1_output(channels, kernel, nan_filled_outputs):
    x, weight = torch.randn(1, channels, 2, 2), torch.randn(channels, 1, kernel, kernel)
    out = gconvgen.conv2d(x, weight, stride=2, padding=kernel // 2, groups=channels)
    expected = F.conv2d(x.double(), weight.double(), stride=2, padding=kernel // 2, groups=channels)
    assert_close(out, expected, torch.float32)


def test_depthwise_output_rows_of_width_1_and_its_gradients(nan_filled_outputs):
    x = torch.randn(2, 64, 2, 2, requires_grad=True)
    weight = torch.randn(64, 1, 3, 3, requires_grad=True)
    out = gconvgen.conv2d(x, weight, stride=2, padding=1, groups=64)
    x64, weight64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = F.conv2d(x64, weight64, stride=2, padding=1, groups=64)
    assert_close(out, expected, torch.float32)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    assert_close(x.grad, x64.grad, torch.float32)
    assert_close(weight.grad, weight64.grad, torch.float32)


def test_depthwise_grad_input_of_width_1_inputs(nan_filled_outputs):
    """Stride-1 depthwise grad-input runs as the transposed forward conv, whose output rows are the input's."""
    x = torch.randn(2, 16, 5, 1, requires_grad=True)
    weight = torch.randn(16, 1, 3, 3)
    gconvgen.conv2d(x, weight, padding=1, groups=16).sum().backward()
    x64 = x.detach().double().requires_grad_()
    F.conv2d(x64, weight.double(), padding=1, groups=16).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32)


def test_depthwise_conv1d_of_output_length_1(nan_filled_outputs):
    x, weight = torch.randn(2, 64, 4), torch.randn(64, 1, 4)
    assert_close(gconvgen.conv1d(x, weight, groups=64), F.conv1d(x.double(), weight.double(), groups=64),
                 torch.float32)


def test_one_token_mamba_prefill(nan_filled_outputs):
    """xz.chunk(2, 1)[0] of a length-1 sequence: a channel-sliced view, causal k4, silu."""
    xz = torch.randn(2, 32, 1)
    x = xz.chunk(2, 1)[0]
    weight, bias = torch.randn(16, 1, 4), torch.randn(16)
    out = gconvgen.conv1d(x, weight, bias, padding="causal", groups=16, activation="silu")
    expected = F.silu(F.conv1d(F.pad(x.double(), (3, 0)), weight.double(), bias.double(), groups=16))
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("data_format", ["NCL", "NLC"])
def test_one_token_prompts_weight_gradient_on_its_gpu_tile(data_format, monkeypatch, nan_filled_outputs):
    """A grad-weight over fewer pixels than a step takes one step of all of them, on a wider channel tile (the
    GPU default the interpreter never picks itself: forced here); 80 channels leave the second tile partial."""
    spec = ConvSpec(80, 80, 80, (1, 4), padding=(0, 0, 3, 0), bias=True, layout="nchw" if data_format == "NCL" else "nhwc")
    config = default_config(spec, "depthwise", "grad_weight", interpret=False, pixels=PixelSpace(2, 1, 2))
    assert (config.block_m, config.block_n) == (2, 64), config
    # 20 pixels still fill the 32-pixel step: the tile is as it was (a wider one would only hold more registers)
    assert default_config(spec, "depthwise", "grad_weight", interpret=False, pixels=PixelSpace(1, 20, 1)) == \
        default_config(spec, "depthwise", "grad_weight", interpret=False, pixels=PixelSpace(1, 64, 1))
    x = torch.randn(2, 80, 1, requires_grad=True)
    weight, bias = torch.randn(80, 1, 4, requires_grad=True), torch.randn(80, requires_grad=True)
    x64, weight64, bias64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    grad = torch.randn(2, 80, 1)
    launched = spy_on_kernels(monkeypatch, lambda desc: (desc.family, desc.config) if desc.kind == "grad_weight" else None)
    with choice.overridden(lambda s, kind, *_: Choice(KERNEL, config, "depthwise") if kind == "grad_weight" else DEFAULT):
        if data_format == "NCL":
            out = gconvgen.conv1d(x, weight, bias, padding="causal", groups=80)
        else:
            out = gconvgen.conv1d(x.transpose(1, 2), weight.permute(2, 1, 0), bias, padding="causal", groups=80,
                                  data_format="NLC").transpose(1, 2)
        out.backward(grad)
    F.conv1d(F.pad(x64, (3, 0)), weight64, bias64, groups=80).backward(grad.double())
    assert launched == [("depthwise", config)]
    assert_close(weight.grad, weight64.grad, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32)
    assert_close(bias.grad, bias64.grad, torch.float32)


@pytest.mark.parametrize("width", [3, 5, 7])
@pytest.mark.parametrize("kernel", [(1, 2), (1, 4)], ids=["k1x2", "k1x4"])
def test_input_strided_along_the_width(width, kernel, nan_filled_outputs):
    x = torch.randn(1, 16, 2, 2 * width)[..., ::2]
    weight = torch.randn(16, 1, *kernel)
    out = gconvgen.conv2d(x, weight, padding=1, groups=16)
    assert_close(out, F.conv2d(x.double(), weight.double(), padding=1, groups=16), torch.float32)


# ---------------------------------------------------------------------------------------------- epilogues


@pytest.mark.parametrize("activation, torch_activation", [
    P("relu", F.relu, id="relu"),
    P("relu6", F.relu6, id="relu6"),
    P("hardswish", F.hardswish, id="hardswish"),
    P("silu", F.silu, id="silu"),
])
def test_fused_activations_keep_nan_as_torch_does(activation, torch_activation):
    x = torch.randn(1, 4, 5, 5)
    x[0, 0, 2, 2] = float("nan")
    residual = torch.randn(1, 4, 5, 5)
    residual[0, 3, 0, 0] = float("nan")
    weight = torch.randn(4, 1, 3, 3)
    out = gconvgen.conv2d(x, weight, padding=1, groups=4, activation=activation, residual=residual)
    expected = torch_activation(F.conv2d(x.double(), weight.double(), padding=1, groups=4) + residual.double())
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("bias_value", [3.0, -3.0], ids=["plus-3", "minus-3"])
def test_fused_hardswish_gradient_at_its_kinks_is_torchs(bias_value):
    """A zero input and bias +-3 put every pre-activation on a kink of hardswish: torch's gradient is 1 at +3
    and 0 at -3."""
    x, weight = torch.zeros(1, 4, 3, 3), torch.randn(4, 1, 3, 3)
    bias = torch.full((4,), bias_value, requires_grad=True)
    gconvgen.conv2d(x, weight, bias, padding=1, groups=4, activation="hardswish").sum().backward()
    bias_eager = bias.detach().clone().requires_grad_()
    F.hardswish(F.conv2d(x, weight, bias_eager, padding=1, groups=4)).sum().backward()
    assert torch.equal(bias.grad, bias_eager.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation, torch_activation", [
    P("silu", F.silu, id="silu"),
    P("gelu", F.gelu, id="gelu"),
    P("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"), id="gelu_tanh"),
    P("hardswish", F.hardswish, id="hardswish"),
])
def test_fused_half_precision_gradient_is_the_unfused_one(activation, torch_activation, dtype):
    """The fused activation's derivative is torch's, computed in float32 and rounded once: the gradients of
    the fused conv are bit for bit those of gconvgen's conv followed by torch's activation (the derivative
    built from half-precision ops was 1.7x further from float64)."""
    x = torch.randn(2, 8, 6, 6, dtype=dtype, requires_grad=True)
    weight = torch.randn(8, 1, 3, 3, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 8, 6, 6, dtype=dtype)
    gconvgen.conv2d(x, weight, padding=1, groups=8, activation=activation).backward(grad)
    x_unfused, weight_unfused = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    torch_activation(gconvgen.conv2d(x_unfused, weight_unfused, padding=1, groups=8)).backward(grad)
    assert torch.equal(weight.grad, weight_unfused.grad)
    assert torch.equal(x.grad, x_unfused.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_silu_gradient_is_atens_bit_for_bit_where_it_is_not_differentiated(dtype):
    """aten's own CPU kernels round silu_backward differently from the formula written out in float32 (46 of
    819,200 float16 elements, most float32 ones): where grad mode is off the fused backward calls aten's op,
    as torch's silu rule does; under grad mode it keeps the differentiable formula, close to aten's."""
    from gconvgen import activations
    grad, pre = torch.randn(819_200, dtype=dtype), 3 * torch.randn(819_200, dtype=dtype)
    expected = torch.ops.aten.silu_backward(grad, pre)
    with torch.no_grad():
        assert torch.equal(activations.gradient(grad, "silu", pre=pre), expected)
    with torch.enable_grad():
        pre = pre.requires_grad_()
        differentiable = activations.gradient(grad, "silu", pre=pre)
        assert differentiable.grad_fn is not None
        torch.testing.assert_close(differentiable, expected)


def test_double_backward_through_fused_relu_is_zero_like_eager():
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3)
    out = gconvgen.conv2d(x, weight, padding=1, groups=4, activation="relu")
    grad_x, = torch.autograd.grad(out.sum(), x, create_graph=True)
    second, = torch.autograd.grad(grad_x.sum(), x)
    assert torch.equal(second, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------- forward-mode AD


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_forward_mode_tangents_are_the_convs(activation):
    """torch.func.jvp and forward_ad dual tensors carry tangents through gconvgen.conv2d (the conv is linear
    in x, weight and bias; the activation's derivative multiplies), never silent zeros."""
    x, weight, bias = (torch.randn(1, 4, 5, 5, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64),
                       torch.randn(4, dtype=torch.float64))
    tangents = (torch.randn_like(x), torch.randn_like(weight), torch.randn_like(bias))
    torch_activation = {None: lambda t: t, "relu": F.relu, "silu": F.silu}[activation]

    def ours(x, weight, bias):
        return gconvgen.conv2d(x, weight, bias, padding=1, groups=4, activation=activation)

    def theirs(x, weight, bias):
        return torch_activation(F.conv2d(x, weight, bias, padding=1, groups=4))

    _, tangent = torch.func.jvp(ours, (x, weight, bias), tangents)
    _, expected = torch.func.jvp(theirs, (x, weight, bias), tangents)
    torch.testing.assert_close(tangent, expected)
    with fwAD.dual_level():
        dual = ours(fwAD.make_dual(x, tangents[0]), weight, fwAD.make_dual(bias, tangents[2]))
        tangent = fwAD.unpack_dual(dual).tangent
    with fwAD.dual_level():
        dual = theirs(fwAD.make_dual(x, tangents[0]), weight, fwAD.make_dual(bias, tangents[2]))
        expected = fwAD.unpack_dual(dual).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, expected)


def test_jacfwd_and_hessian_match_torch():
    x, weight = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    jacobian = torch.func.jacfwd(lambda x: gconvgen.conv2d(x, weight, padding=1, groups=2))(x)
    expected = torch.func.jacfwd(lambda x: F.conv2d(x, weight, padding=1, groups=2))(x)
    torch.testing.assert_close(jacobian, expected)
    hessian = torch.func.hessian(lambda w: gconvgen.conv2d(x, w, padding=1, groups=2, activation="silu").sum())(weight)
    expected = torch.func.hessian(lambda w: F.silu(F.conv2d(x, w, padding=1, groups=2)).sum())(weight)
    torch.testing.assert_close(hessian, expected)


# ---------------------------------------------------------------------------------------------- compile and fuse


class _InPlaceResidual(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.style = style

    def forward(self, x, skip):
        if self.style == "add_":
            skip.add_(self.conv(x))
        else:
            skip += self.conv(x)
        return F.silu(skip)


@pytest.mark.parametrize("style", ["add_", "iadd"])
def test_compile_backend_keeps_an_in_place_residual_add(style):
    """An add that writes into an operand is not a residual epilogue: the caller's tensor must change."""
    torch._dynamo.reset()
    model = _InPlaceResidual(style)
    x, skip = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
    skip_eager, skip_compiled = skip.clone(), skip.clone()
    expected = model(x, skip_eager)
    out = torch.compile(model, backend="gconvgen", fullgraph=True)(x, skip_compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(skip_compiled, skip_eager, atol=1e-4, rtol=1e-4)


class _NestedCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.block = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.block[1](self.block[0](self.conv(x)))


def test_fuse_follows_nested_submodule_calls():
    model = _NestedCalls()
    model.block[0].running_mean.normal_()
    model.block[0].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 8, 5, 5)
    expected = model(x)
    fused = gconvgen.fuse(model)
    assert len(fused.gconvgen_fuse_report.fused) == 1
    assert isinstance(fused.block[0], nn.Identity) and isinstance(fused.block[1], nn.Identity)
    torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=1e-4)


class _NestedAndWhole(_NestedCalls):
    def forward(self, x):
        return self.block[1](self.block[0](self.conv(x))) + self.block(x)


def test_fuse_leaves_a_nested_module_that_also_runs_through_its_parent():
    model = _NestedAndWhole().eval()
    x = torch.randn(2, 8, 5, 5)
    expected = model(x)
    fused = gconvgen.fuse(model)
    torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=1e-4)
    assert isinstance(fused.block[0], nn.BatchNorm2d)


def test_convert_says_why_it_skips_a_weight_normed_conv():
    """wav2vec2's positional conv is weight-normed (a parametrized weight): convert leaves it, with the reason
    and the fix, never a raw torch error."""
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1, groups=4), dim=2)
    model = gconvgen.convert(nn.Sequential(conv))
    (name, reason), = model.gconvgen_report.skipped
    assert "parametrized" in reason and "remove_parametrizations" in reason


def test_interpreters_before_triton_3_9_take_one_element_scalars_as_range_bounds(monkeypatch):
    """Triton's interpreter before 3.9 (3.6 on the GPU machine) holds a kernel's scalars as one-element arrays
    and passes them to int() for a range bound, which numpy 2.4 refuses: every split reduction's
    ``range(first, end, BLOCK)`` failed (TypeError: only 0-dimensional arrays can be converted to Python
    scalars). gconvgen wraps the interpreter's tensor patching to squeeze them first (runtime.device)."""
    from types import SimpleNamespace

    import numpy as np
    import triton
    from triton.runtime import interpreter

    from gconvgen.runtime import device

    class Scope:  # the interpreter's _LangPatchScope, as far as the patching uses it
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    def patch_tensor_before_3_9(tensor, scope):  # Triton 3.6's _patch_lang_tensor, as far as __index__ goes
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    class Scalar:
        def __init__(self, value):
            self.handle = SimpleNamespace(data=np.array([value], dtype=np.int32))

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_tensor_before_3_9, raising=False)
    device._index_scalars_of_any_shape()
    interpreter._patch_lang_tensor(Scalar, Scope())
    assert list(range(Scalar(1), Scalar(7), Scalar(2))) == [1, 3, 5]
