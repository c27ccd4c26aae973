"""Backward kernels under Triton's interpreter: gradcheck in float64, gradients against torch's autograd in
float64, the split-K reduction and its determinism, only the needed gradients, opcheck, the aten fallback."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gconvgen
from conftest import TOLERANCES, assert_close, reference_conv2d, spy_on_kernels
from gconvgen.compiler import codegen
from gconvgen import knobs
from gconvgen.tools.bench_backward import format_table, time_forward_backward
from gconvgen.compiler.lowering import KERNEL, Choice, KernelConfig, lower
from gconvgen.compiler.families import family
from gconvgen.compiler.plan import plan
from gconvgen.runtime import launch, weights
from gconvgen.ops.backward import conv2d_grad_bias_op, conv2d_grad_input_op, conv2d_grad_weight_op
from gconvgen.runtime.launch import split_pixels
from gconvgen.ops.conv2d import conv2d_op
from gconvgen.ops.dispatch import spec_for_call

P = pytest.param


def pad_policy_reference(x, weight, bias, stride, padding, dilation, groups):
    """channel_policy='pad' written as one dense conv in float64 whose weight is block-diagonal: output o of
    group g = o // co sees input channels [g*ci, (g+1)*ci) that exist, ci = ceil(C_in/groups), co likewise."""
    in_channels, out_channels = x.shape[1], weight.shape[0]
    ci, co = math.ceil(in_channels / groups), math.ceil(out_channels / groups)
    dense = weight.new_zeros(out_channels, in_channels, *weight.shape[2:])
    for out_channel in range(out_channels):
        first = out_channel // co * ci
        real = min(first + ci, in_channels) - first
        dense[out_channel, first:first + real] = weight[out_channel, :real]
    top, bottom, left, right = padding
    return F.conv2d(F.pad(x, (left, right, top, bottom)), dense, bias, stride, 0, dilation)


def make_input(batch, channels, size, dtype, layout):
    x = torch.randn(batch, channels, *size, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def pair(value):
    return value if isinstance(value, tuple) else (value, value)


# batch, in_channels, out_channels, (height, width), kernel, stride, padding, dilation, groups, policy, layout
GRADCHECK_CASES = [
    P(1, 4, 4, (5, 5), 3, 1, 1, 1, 4, "strict", "nchw", id="depthwise"),
    P(1, 3, 5, (5, 4), 3, 1, 1, 1, 3, "pad", "nchw", id="depthwise-uneven-out-pad"),     # C_out % groups != 0
    P(1, 5, 5, (5, 5), 3, 1, 1, 1, 2, "pad", "nchw", id="uneven-groups-pad"),           # C_in, C_out % groups != 0
    P(1, 4, 4, (6, 6), 3, 2, 1, 1, 2, "strict", "nchw", id="stride-2"),
    P(1, 4, 4, (6, 6), 3, 1, 2, 2, 2, "strict", "nchw", id="dilation-2"),
    P(1, 4, 4, (6, 5), 3, 2, "same", 1, 2, "strict", "nchw", id="same-stride-2"),       # asymmetric padding
    P(1, 4, 6, (5, 5), 3, 1, 1, 1, 2, "strict", "channels_last", id="channels-last"),
    P(1, 4, 8, (5, 5), 3, 2, "same", 1, 4, "strict", "channels_last", id="channels-last-depthwise-x2-same-s2"),
    P(1, 4, 4, (5, 6), (2, 3), (1, 2), (0, 1, 2, 0), 1, 2, "strict", "nchw", id="rect-kernel-asymmetric-padding"),
]


@pytest.mark.parametrize("batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy, "
                         "layout", GRADCHECK_CASES)
def test_gradcheck_float64(batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy,
                           layout):
    """Every gradient (x, weight, bias) against finite differences, through the generated kernels in float64.
    fast_mode checks a random projection of the Jacobian: two forward calls per input instead of two per element."""
    conv, leaves = _float64_case(batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups,
                                 policy, layout)
    assert torch.autograd.gradcheck(conv, leaves, fast_mode=True)


def _float64_case(batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy, layout):
    """The conv of one labelled case, and random float64 (x, weight, bias) for it that require gradients."""
    x = make_input(batch, in_channels, size, torch.float64, layout).requires_grad_()
    weight = torch.randn(out_channels, math.ceil(in_channels / groups), *pair(kernel), dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(out_channels, dtype=torch.float64, requires_grad=True)

    def conv(x, weight, bias):
        return gconvgen.conv2d(x, weight, bias, stride, padding, dilation, groups, channel_policy=policy)

    return conv, (x, weight, bias)


def test_gradcheck_float64_full_jacobian():
    """One tiny case element by element (the slow, exact mode): stride 2, grouped, with bias."""
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: gconvgen.conv2d(x, w, b, 2, 1, 1, 2), (x, weight, bias))


# batch, in_channels, out_channels, (height, width), kernel, stride, padding, dilation, groups, policy, layout
DOUBLE_BACKWARD_CASES = [
    P(1, 4, 4, (4, 4), 2, 1, (1, 0, 0, 1), 1, 2, "strict", "nchw", id="grouped-asymmetric-padding"),
    P(1, 3, 5, (5, 4), 3, 2, 1, 1, 3, "pad", "nchw", id="depthwise-uneven-out-pad-stride-2"),  # C_out % groups != 0
    P(1, 4, 4, (5, 5), 2, 1, 1, 2, 2, "strict", "channels_last", id="channels-last-dilation-2"),
]


@pytest.mark.parametrize("batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy, "
                         "layout", DOUBLE_BACKWARD_CASES)
def test_gradgradcheck_float64(batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups,
                               policy, layout):
    """Gradients of the gradients (x, weight, bias and the output gradient) against finite differences."""
    conv, leaves = _float64_case(batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups,
                                 policy, layout)
    assert torch.autograd.gradgradcheck(conv, leaves, fast_mode=True)


def test_gradient_penalty_matches_torch():
    """A WGAN-GP style step: the penalty on the input gradient's norm, back to the weight and bias."""
    x = torch.randn(2, 6, 6, 6)
    weight, bias = torch.randn(6, 2, 3, 3), torch.randn(6)

    def penalty_gradients(conv, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        out = conv(*leaves)
        (grad_x,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
        penalty = (grad_x.flatten(1).norm(dim=1) - 1).square().mean()
        return torch.autograd.grad(penalty, leaves[1:])

    # both in float64: the penalty chains three convs and squares, so float32 rounding would swamp a
    # single conv's tolerance (gradients of around 1e3); float64 compares the formulas themselves
    ours = penalty_gradients(lambda x, w, b: gconvgen.conv2d(x, w, b, 2, 1, 1, 3), torch.float64)
    theirs = penalty_gradients(lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 3), torch.float64)
    for actual, expected in zip(ours, theirs):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected)  # float64 defaults: rtol 1e-7, atol 1e-7


# batch, in_channels, out_channels, (height, width), kernel, stride, padding, dilation, groups, policy, layout
GRADIENT_CASES = [
    P(2, 12, 12, (7, 7), 3, 1, 1, 1, 3, "strict", "nchw", id="grouped"),
    P(2, 8, 16, (7, 6), 3, 1, 1, 1, 8, "strict", "channels_last", id="depthwise-multiplier-2"),
    P(2, 11, 7, (6, 6), 3, 2, 1, 1, 3, "pad", "channels_last", id="uneven-in-and-out-pad-stride-2"),
    P(2, 4, 7, (6, 6), 3, 1, 2, 2, 4, "pad", "nchw", id="depthwise-uneven-out-pad-dilation-2"),
    P(2, 8, 8, (8, 7), 3, 2, "same", 1, 4, "strict", "nchw", id="same-stride-2"),
    P(2, 8, 8, (7, 7), 4, 3, (2, 0, 1, 3), 1, 8, "strict", "channels_last", id="depthwise-stride-3-asymmetric"),
    P(2, 16, 16, (5, 5), 1, 1, 0, 1, 4, "strict", "nchw", id="1x1"),
]


def reference_gradients(x, weight, bias, grad_output, stride, padding, dilation, groups, policy):
    """Gradients of torch's own conv (the block-diagonal form under 'pad') in float64 by torch's autograd."""
    x64, weight64 = (t.detach().double().requires_grad_() for t in (x, weight))
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    reference = pad_policy_reference if policy == "pad" else reference_conv2d
    out = reference(x64, weight64, bias64, stride, padding, dilation, groups)
    leaves = [t for t in (x64, weight64, bias64) if t is not None]
    return torch.autograd.grad(out, leaves, grad_output.double())


def resolved(padding, size, kernel, stride, dilation):
    return gconvgen.resolve_padding(padding, size, pair(kernel), pair(stride), pair(dilation))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy, "
                         "layout", GRADIENT_CASES)
def test_gradients_match_torch_float32(batch, in_channels, out_channels, size, kernel, stride, padding, dilation,
                                       groups, policy, layout, bias, nan_filled_outputs):
    dtype = torch.float32
    x = make_input(batch, in_channels, size, dtype, layout).requires_grad_()
    weight = torch.randn(out_channels, math.ceil(in_channels / groups), *pair(kernel), requires_grad=True)
    bias_tensor = torch.randn(out_channels, requires_grad=True) if bias else None
    out = gconvgen.conv2d(x, weight, bias_tensor, stride, padding, dilation, groups, channel_policy=policy)
    grad_output = torch.randn_like(out)
    leaves = [t for t in (x, weight, bias_tensor) if t is not None]
    actual = torch.autograd.grad(out, leaves, grad_output)
    sides = resolved(padding, size, kernel, stride, dilation)
    expected = reference_gradients(x, weight, bias_tensor, grad_output, pair(stride), sides, pair(dilation), groups,
                                   policy)
    for name, got, want in zip(("x", "weight", "bias"), actual, expected):
        assert_close(got, want, dtype), name
    if layout == "channels_last":
        assert actual[0].is_contiguous(memory_format=torch.channels_last), "channels_last x, channels_last grad"


def test_gradients_through_nhwc_and_unbatched_inputs():
    """data_format='NHWC' with an HWIO weight, and a 3-D input: the op sees views, autograd maps them back."""
    x = torch.randn(2, 6, 5, 8, requires_grad=True)              # NHWC
    weight = torch.randn(3, 3, 2, 8, requires_grad=True)         # HWIO, groups=4
    out = gconvgen.conv2d(x, weight, None, 1, "same", 1, 4, data_format="NHWC")
    grad_output = torch.randn_like(out)
    actual = torch.autograd.grad(out, (x, weight), grad_output)
    expected = reference_gradients(x.permute(0, 3, 1, 2), weight.permute(3, 2, 0, 1), None,
                                   grad_output.permute(0, 3, 1, 2), (1, 1), (1, 1, 1, 1), (1, 1), 4, "strict")
    assert_close(actual[0], expected[0].permute(0, 2, 3, 1), torch.float32)
    assert_close(actual[1], expected[1].permute(2, 3, 1, 0), torch.float32)

    unbatched = torch.randn(4, 5, 5, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    gconvgen.conv2d(unbatched, weight, None, 2, 1, 1, 4).square().sum().backward()
    x64, weight64 = (t.detach().double().requires_grad_() for t in (unbatched, weight))
    F.conv2d(x64, weight64, None, 2, 1, 1, 4).square().sum().backward()
    assert_close(unbatched.grad, x64.grad, torch.float32)
    assert_close(weight.grad, weight64.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups, layout", [P(4, "channels_last", id="grouped-channels-last"),
                                            P(8, "nchw", id="depthwise-nchw")])
def test_gradients_match_torch_half_precision(dtype, groups, layout, nan_filled_outputs):
    """bf16 runs the fp32-operand variant under the interpreter; tolerances scale with the gradient's size."""
    x = make_input(2, 8, (6, 6), dtype, layout).requires_grad_()
    weight = (torch.randn(8, 8 // groups, 3, 3) / 3).to(dtype).requires_grad_()
    bias = torch.randn(8, dtype=dtype, requires_grad=True)
    out = gconvgen.conv2d(x, weight, bias, 1, 1, 1, groups)
    grad_output = torch.randn_like(out)
    actual = torch.autograd.grad(out, (x, weight, bias), grad_output)
    expected = reference_gradients(x, weight, bias, grad_output, (1, 1), (1, 1, 1, 1), (1, 1), groups, "strict")
    _, rtol = TOLERANCES[dtype]
    for name, got, want in zip(("x", "weight", "bias"), actual, expected):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        # a few roundings of the largest gradient: sums of products rounded to the dtype at the end
        atol = 4 * torch.finfo(dtype).eps * want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=name)


class GconvgenOps(TorchDispatchMode):
    """Records the gconvgen ops that run."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "gconvgen":
            self.names.append(func.name().split("::")[1].split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs, expected", [
    P((True, True, True), ["conv2d_grad_input", "conv2d_grad_weight", "conv2d_grad_bias"], id="all"),
    P((False, True, False), ["conv2d_grad_weight"], id="weight-only"),      # a frozen input, e.g. the first layer
    P((True, False, False), ["conv2d_grad_input"], id="input-only"),        # frozen weights (fine-tuning above)
])
def test_only_needed_gradients_run(needs, expected):
    x, weight, bias = torch.randn(2, 4, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(4)
    for tensor, need in zip((x, weight, bias), needs):
        tensor.requires_grad_(need)
    out = gconvgen.conv2d(x, weight, bias, 1, 1, 1, 2)
    with GconvgenOps() as ops:
        out.sum().backward()  # the output gradient is an expanded scalar: strides 0
    assert ops.names == expected
    for tensor, need in zip((x, weight, bias), needs):
        assert (tensor.grad is not None) == need


# (kind, in_channels, out_channels, groups, layout)
SPLIT_CASES = [
    P("igemm", 8, 8, 2, "nchw", id="igemm"),
    P("igemm", 7, 5, 2, "channels_last", id="igemm-pad-channels-last"),  # masks under channel_policy='pad'
    P("depthwise", 4, 8, 4, "nchw", id="depthwise-multiplier-2"),
]


@pytest.mark.parametrize("family, in_channels, out_channels, groups, layout", SPLIT_CASES)
def test_grad_weight_split_k_is_exact_and_deterministic(family, in_channels, out_channels, groups, layout,
                                                        monkeypatch, nan_filled_outputs):
    """Every split count gives the reference, and the same split count gives the same bits on every run."""
    x = make_input(2, in_channels, (6, 6), torch.float32, layout)
    weight = torch.randn(out_channels, math.ceil(in_channels / groups), 3, 3)
    grad_output = torch.randn(2, out_channels, 6, 6)
    spec = spec_for_call(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), groups, "pad")
    assert plan(spec).backward_family == family
    config = KernelConfig(block_m=16, block_n=16, block_k=16) if family == "igemm" else KernelConfig(16, 8, 0)
    choice = Choice(KERNEL, config, family)
    ran = _spy_on_kernels(monkeypatch)
    (expected,) = reference_gradients(x, weight, None, grad_output, (1, 1), (1, 1, 1, 1), (1, 1), groups, "pad")[1:]
    for splits in (1, 2, 5):
        first = launch.grad_weight(spec, x, grad_output, torch.empty_like(weight), choice, splits=splits)
        again = launch.grad_weight(spec, x, grad_output, torch.empty_like(weight), choice, splits=splits)
        assert_close(first, expected, torch.float32)
        assert torch.equal(first, again), f"splits={splits} is not deterministic"
    assert ran == [("grad_weight", family, config)] * 6


def _spy_on_kernels(monkeypatch):
    """The (kind, family, config) of every kernel launched from now on."""
    return spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family, desc.config))


def test_grad_bias_split_k(monkeypatch, nan_filled_outputs):
    grad_output = torch.randn(3, 70, 5, 4).to(memory_format=torch.channels_last)
    config = KernelConfig(16, 64, 0)
    ran = _spy_on_kernels(monkeypatch)
    for splits in (1, 3):
        got = launch.grad_bias(grad_output, torch.empty(70), Choice(KERNEL, config), splits=splits)
        assert_close(got, grad_output.double().sum(dim=(0, 2, 3)), torch.float32)
    assert ran == [("grad_bias", "reduce", config)] * 2


@pytest.mark.parametrize("pixels, block, tiles, programs, splits, expected", [
    P(1000, 100, 1, 1, None, (1, 1000), id="interpreter-one-program"),
    P(1000, 100, 2, 64, None, (2, 500), id="few-blocks-keep-4-per-split"),
    P(100_000, 64, 4, 528, None, (131, 768), id="fill-the-gpu"),  # 132 asked, 131 after rounding to blocks
    P(72, 16, 1, 1, 3, (3, 32), id="forced"),
    P(72, 16, 1, 1, 50, (5, 16), id="forced-beyond-blocks"),
])
def test_split_pixels(pixels, block, tiles, programs, splits, expected):
    got = split_pixels(pixels, block, tiles, programs, splits)
    assert got == expected
    count, per_split = got
    assert per_split % block == 0 and (count - 1) * per_split < pixels <= count * per_split, "no empty split"


def test_empty_batch_backward():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    weight, bias = torch.randn(4, 1, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    gconvgen.conv2d(x, weight, bias, 1, 1, 1, 4).sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("x_layout, bias", [P("nchw", True, id="nchw-bias"),
                                            P("channels_last", False, id="channels-last-depthwise")])
def test_opcheck_with_requires_grad(x_layout, bias):
    """Schema, fake kernel, autograd registration and AOT dispatch with dynamic shapes, forward and backward."""
    groups = 2 if bias else 4
    x = make_input(2, 4, (5, 5), torch.float32, x_layout).requires_grad_()
    weight = torch.randn(4, 4 // groups, 3, 3, requires_grad=True)
    bias_tensor = torch.randn(4, requires_grad=True) if bias else None
    torch.library.opcheck(conv2d_op, (x, weight, bias_tensor, [2, 2], [1, 0, 1, 1], [1, 1], groups, "strict"))


def test_opcheck_backward_ops():
    grad_output, x, weight = torch.randn(2, 5, 3, 3), torch.randn(2, 7, 5, 5), torch.randn(5, 4, 3, 3)
    conv = ([2, 2], [1, 0, 1, 1], [1, 1], 2, "pad")
    torch.library.opcheck(conv2d_grad_input_op, (grad_output, weight, [2, 7, 5, 5], *conv))
    torch.library.opcheck(conv2d_grad_weight_op, (grad_output, x, [5, 4, 3, 3], *conv))
    torch.library.opcheck(conv2d_grad_bias_op, (grad_output,))


@pytest.mark.cpu_only
def test_aten_fallback_gradients_match_torch():
    """CPU without the interpreter: the exact aten form of the same plan, asymmetric padding and 'pad'."""
    x, weight, bias = torch.randn(2, 7, 6, 5, requires_grad=True), torch.randn(5, 4, 3, 3), torch.randn(5)
    weight.requires_grad_(), bias.requires_grad_()
    with knobs.scoped(INTERPRET=0, FALLBACK="warn"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once per process: whether here depends on the tests before
        out = gconvgen.conv2d(x, weight, bias, 2, (1, 0, 2, 1), 1, 2, channel_policy="pad")
        grad_output = torch.randn_like(out)
        actual = torch.autograd.grad(out, (x, weight, bias), grad_output)
    expected = reference_gradients(x, weight, bias, grad_output, (2, 2), (1, 0, 2, 1), (1, 1), 2, "pad")
    for got, want in zip(actual, expected):
        assert_close(got, want, torch.float32)


@pytest.mark.cpu_only
def test_fallback_refused_names_the_switch():
    with knobs.scoped(INTERPRET=0), pytest.raises(RuntimeError, match="GCONVGEN_FALLBACK=error"):
        conv2d_grad_bias_op(torch.randn(2, 3, 4, 4))


def test_bad_backward_arguments_are_named():
    with pytest.raises(ValueError, match=r"input_size=\[2, 4, 5\] must be \[N, C_in, H, W\]"):
        conv2d_grad_input_op(torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3), [2, 4, 5], [1, 1], [1, 1, 1, 1],
                             [1, 1], 4, "strict")
    with pytest.raises(TypeError, match="grad_output .* must match x"):
        conv2d_grad_weight_op(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5, dtype=torch.float64), [4, 1, 3, 3],
                              [1, 1], [1, 1, 1, 1], [1, 1], 4, "strict")
    with pytest.raises(ValueError, match="splits=0 must be an int >= 1"):
        split_pixels(100, 16, 1, 1, 0)


def test_backward_kernels_are_named_by_kind():
    conv_plan = plan(gconvgen.ConvSpec(8, 8, 2, (3, 3), padding=(1, 1, 1, 1), layout="nhwc", dtype="bfloat16"))
    descs = {kind: lower(conv_plan, kind, interpret=False, allow_tf32=False)
             for kind in ("forward", "grad_input", "grad_weight")}
    name = "ci8_co8_g2_k3x3_s1x1_d1x1_p1_1_1_1_nhwc_bfloat16_"
    expected = {"forward": f"igemm_rows_{name}", "grad_input": f"grad_input_igemm_{name}",
                "grad_weight": f"grad_weight_igemm_rows_{name}"}  # the flat igemm's grad-input, the others slide
    for kind, desc in descs.items():
        assert desc.uri.startswith(expected[kind]), desc.uri
    for kind, desc in descs.items():
        assert f"def {desc.kernel_name}(" in codegen.render(desc), kind
    grad_bias = lower(None, "grad_bias", dtype="bfloat16", interpret=True, allow_tf32=False)
    assert grad_bias.uri.startswith("grad_bias_bfloat16_") and f"def {grad_bias.kernel_name}(" in codegen.render(grad_bias)
    with pytest.raises(ValueError, match="kind='grad_output' is not a kernel kind"):
        lower(conv_plan, "grad_output", interpret=False, allow_tf32=False)
    with pytest.raises(ValueError, match="kind='grad_input' needs a plan"):
        lower(None, "grad_input", dtype="bfloat16", interpret=False, allow_tf32=False)


@pytest.mark.cpu_only
def test_bench_forward_backward_runs_and_formats():
    spec = gconvgen.ConvSpec(4, 4, 2, (3, 3), padding=(1, 1, 1, 1), bias=True, layout="nhwc")
    timing = time_forward_backward(spec, batch=1, height=5, width=5, device="cpu", repeats=1)
    assert timing.gconvgen_ms > 0 and timing.torch_ms > 0
    assert "geometric-mean speedup" in format_table([timing])
    with pytest.raises(ValueError, match="height=0 must be an int >= 1"):
        time_forward_backward(spec, batch=1, height=0, width=5, device="cpu")


@pytest.mark.parametrize("kernel, padding, dilation", [
    pytest.param((3, 3), (1, 1, 1, 1), (1, 1), id="k3"),                                # MobileNetV2
    pytest.param((5, 3), (2, 0, 1, 1), (1, 2), id="k5x3-top-padding-only-dilated-columns"),
    pytest.param((3, 3), (0, 0, 0, 0), (1, 1), id="valid"),                             # the gradient pads by the reach
])
def test_nchw_depthwise_grad_input_runs_the_transposed_forward(kernel, padding, dilation, monkeypatch,
                                                                nan_filled_outputs):
    """A stride-1 depthwise conv is its own transpose: untuned, its NCHW input gradient runs the forward
    depthwise1d kernel on the output gradient with the window flipped (plan.grad_input_as_forward), and
    matches F.conv2d's gradient."""
    loaded = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family))
    x = torch.randn(2, 8, 7, 9, requires_grad=True)
    weight = torch.randn(8, 1, *kernel)
    out = gconvgen.conv2d(x, weight, None, 1, padding, dilation, 8)
    grad = torch.randn_like(out)
    grad_x, = torch.autograd.grad(out, x, grad)
    x64, weight64 = x.detach().double().requires_grad_(), weight.detach().double()
    expected, = torch.autograd.grad(reference_conv2d(x64, weight64, None, 1, padding, dilation, 8), x64,
                                    grad.double())
    assert_close(grad_x, expected, torch.float32)
    assert loaded == [("forward", "depthwise1d"), ("forward", "depthwise1d")]  # the conv, then its gradient


@pytest.mark.parametrize("dtype, family", [(torch.float32, "depthwise"), (torch.bfloat16, "depthwise_gemm")])
def test_channels_last_depthwise_grad_input_runs_the_transposed_forward(dtype, family, monkeypatch,
                                                                        nan_filled_outputs):
    """In channels_last a stride-1 depthwise conv's untuned input gradient runs its own forward kernel on the
    output gradient with the window flipped (plan.grad_input_as_forward): in float32 the direct kernel's row
    tiles (Depthwise.forward_serves_input_gradient), in half precision the band sliding down the rows
    (depthwise_gemm.sliding_rows); it matches F.conv2d's gradient."""
    loaded = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family))
    x = torch.randn(2, 8, 7, 9).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(8, 1, 3, 3).to(dtype)
    out = gconvgen.conv2d(x, weight, None, 1, 1, 1, 8)
    grad = torch.randn_like(out)
    grad_x, = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    expected, = torch.autograd.grad(reference_conv2d(x64, weight.double(), None, 1, (1, 1, 1, 1), 1, 8), x64,
                                    grad.double())
    assert_close(grad_x, expected, dtype)
    assert loaded == [("forward", family), ("forward", family)]  # the conv, then its gradient


@pytest.mark.parametrize("in_c, out_c, groups, kernel, padding, dilation", [
    pytest.param(8, 8, 2, (3, 3), (1, 1, 1, 1), (1, 1), id="resnext-like"),
    pytest.param(6, 9, 3, (3, 2), (2, 0, 1, 0), (1, 2), id="more-outputs-uneven-sides-dilated"),
    pytest.param(12, 8, 4, (2, 3), (0, 0, 0, 0), (2, 1), id="fewer-outputs-valid"),
    pytest.param(6, 6, 1, (3, 3), (1, 1, 1, 1), (1, 1), id="one-group"),
])
@pytest.mark.parametrize("family", ["igemm_rows", "igemm"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_grouped_grad_input_as_the_transposed_forward(in_c, out_c, groups, kernel, padding, dilation, family,
                                                      channels_last, monkeypatch, nan_filled_outputs):
    """A stride-1 grouped conv's input gradient is the forward conv of the output gradient with each group's
    weight transposed and flipped (plan.transposed_conv, weights.transposed): run on each igemm family's
    forward, it matches F.conv2d's gradient with every element written."""
    loaded = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family, desc.spec.in_channels))
    x = torch.randn(2, in_c, 7, 6)
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    weight = torch.randn(out_c, in_c // groups, *kernel)
    transposed = Choice(KERNEL, None, family, transposed=True)
    with gconvgen.autotune.choice.overridden(lambda spec, kind, *rest: transposed if kind == "grad_input" else
                                             gconvgen.autotune.choice.DEFAULT):
        out = gconvgen.conv2d(x, weight, None, 1, padding, dilation, groups)
        grad = torch.randn_like(out)
        grad_x, = torch.autograd.grad(out, x, grad)
    x64, weight64 = x.detach().double().requires_grad_(), weight.double()
    expected, = torch.autograd.grad(reference_conv2d(x64, weight64, None, 1, padding, dilation, groups), x64,
                                    grad.double())
    assert_close(grad_x, expected, torch.float32)
    assert ("forward", family, out_c) in loaded and not any(kind == "grad_input" for kind, *_ in loaded), loaded


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_one_output_a_group_transposes_to_a_depthwise_conv_with_a_multiplier(channels_last, monkeypatch,
                                                                              nan_filled_outputs):
    """12 inputs to 4 outputs in 4 groups: its transpose is the depthwise conv of 4 channels with 3 outputs each,
    which the depthwise families' forward computes."""
    loaded = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family, desc.spec.out_channels))
    x = torch.randn(2, 12, 6, 5)
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    weight = torch.randn(4, 3, 3, 3)
    transposed = Choice(KERNEL, None, "depthwise", transposed=True)
    with gconvgen.autotune.choice.overridden(lambda spec, kind, *rest: transposed if kind == "grad_input" else
                                             gconvgen.autotune.choice.DEFAULT):
        out = gconvgen.conv2d(x, weight, None, 1, (1, 0, 2, 1), 1, 4)
        grad = torch.randn_like(out)
        grad_x, = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    expected, = torch.autograd.grad(reference_conv2d(x64, weight.double(), None, 1, (1, 0, 2, 1), (1, 1), 4), x64,
                                    grad.double())
    assert_close(grad_x, expected, torch.float32)
    assert ("forward", "depthwise", 12) in loaded, loaded


def test_the_transposed_weight_swaps_each_groups_channels_and_flips_its_window():
    weight = torch.randn(6, 2, 3, 2)  # 3 groups of 2 outputs from 2 inputs
    transposed = weights.transposed(weight, 3)
    assert transposed.shape == (6, 2, 3, 2) and weights.layout_of(transposed) == "hwio"
    for g, o, c in itertools.product(range(3), range(2), range(2)):
        assert torch.equal(transposed[g * 2 + c, o], weight[g * 2 + o, c].flip((0, 1)))


def _grad_input_under(config: Choice, x, weight, stride, padding, dilation, groups):
    """(gconvgen's input gradient with ``config`` forced on the grad-input kernel, F.conv2d's in float64)."""
    with gconvgen.autotune.choice.overridden(lambda spec, kind, *rest: config if kind == "grad_input" else
                                             gconvgen.autotune.choice.DEFAULT):
        out = gconvgen.conv2d(x, weight, None, stride, padding, dilation, groups)
        grad = torch.randn_like(out)
        grad_x, = torch.autograd.grad(out, x, grad)
    x64, weight64 = x.detach().double().requires_grad_(), weight.double()
    expected, = torch.autograd.grad(reference_conv2d(x64, weight64, None, stride, padding, dilation, groups), x64,
                                    grad.double())
    return grad_x, expected


@pytest.mark.parametrize("kernel, padding", [((3, 3), (1, 1, 1, 1)), ((5, 5), (2, 2, 2, 2))], ids=["k3", "k5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_strided_nchw_depthwise_grad_input_at_its_gpu_tile(kernel, padding, dtype, nan_filled_outputs):
    """The direct depthwise grad-input's GPU default for NCHW (Depthwise.default_config: 64 pixels by up to 16
    channels on 2 warps), run under the interpreter: every phase's pixels, a last channel tile part full."""
    from gconvgen.compiler.families.depthwise import Depthwise
    from gconvgen.ir import ConvSpec
    channels = 20
    spec = ConvSpec(channels, channels, channels, kernel, (2, 2), padding, dtype=str(dtype).removeprefix("torch."))
    config = Depthwise().default_config(spec, "grad_input", interpret=False)
    assert (config.block_m, config.num_warps) == (64, 2)
    x = torch.randn(3, channels, 9, 11, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(channels, 1, *kernel, dtype=torch.float64).to(dtype)
    grad_x, expected = _grad_input_under(Choice(KERNEL, config, "depthwise"), x, weight, (2, 2), padding, (1, 1),
                                         channels)
    assert_close(grad_x, expected, dtype)


@pytest.mark.parametrize("size, kernel, stride, padding, dilation, groups, per_group", [
    pytest.param((9, 7), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2, (4, 4), id="k3-s2-odd-map"),  # ResNeXt's s2
    pytest.param((5, 6), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 3, (2, 3), id="k1-s2-pixels-no-tap-reaches"),
    pytest.param((9, 8), (3, 3), (2, 2), (2, 1, 2, 0), (2, 2), 2, (3, 2), id="s2-dilated-2-phases-no-tap-reaches"),
    pytest.param((8, 10), (3, 5), (3, 2), (0, 2, 1, 3), (2, 1), 2, (2, 5), id="s3x2-dilated-uneven-sides"),
    pytest.param((7, 1), (3, 1), (2, 1), (1, 1, 0, 0), (1, 1), 2, (2, 2), id="s2x1-width-1"),
    pytest.param((2, 3), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2, (2, 2), id="map-under-the-window"),
])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_strided_grouped_grad_input_takes_one_phase_a_program(size, kernel, stride, padding, dilation, groups,
                                                              per_group, channels_last, monkeypatch,
                                                              nan_filled_outputs):
    """A strided grouped input gradient runs the implicit GEMM in phases of the stride (Igemm.phases: each
    program's pixels share their rows modulo the stride, in channels_last their columns too, and it reduces
    over the taps reaching them alone, none where a dilation the stride shares leaves a phase unreached; in
    NCHW at a stride of 2 along the width a program takes both column phases in turn, interleaved for its
    store), on 16-pixel tiles that cross the phases' rows and the batch, and matches F.conv2d's gradient with
    every element written."""
    loaded = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family, desc.phases, desc.interleave_columns))
    in_per_group, out_per_group = per_group
    x = torch.randn(3, groups * in_per_group, *size)
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    weight = torch.randn(groups * out_per_group, in_per_group, *kernel)
    small = Choice(KERNEL, KernelConfig(16, 16, 16, num_stages=1), "igemm")
    grad_x, expected = _grad_input_under(small, x, weight, stride, padding, dilation, groups)
    assert_close(grad_x, expected, torch.float32)
    interleaved = not channels_last and stride[1] == 2
    phases = stride if channels_last or interleaved else (stride[0], 1)
    assert ("grad_input", "igemm", phases, interleaved) in loaded


@pytest.mark.parametrize("size, kernel, stride, padding, dilation, multiplier", [
    pytest.param((9, 7), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, id="k3-s2-odd-map"),       # MobileNetV2's s2
    pytest.param((11, 6), (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 1, id="k5-s2"),             # EfficientNet's s2
    pytest.param((8, 10), (3, 2), (3, 2), (0, 2, 1, 0), (2, 1), 2, id="s3x2-dilated-multiplier"),
    pytest.param((7, 1), (3, 1), (2, 1), (1, 1, 0, 0), (1, 1), 1, id="s2x1-width-1"),
    pytest.param((2, 3), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, id="map-under-the-window"),
])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_strided_depthwise_grad_input_takes_one_phase_a_program(size, kernel, stride, padding, dilation, multiplier,
                                                                channels_last, monkeypatch, nan_filled_outputs):
    """A strided depthwise input gradient runs the direct kernel in phases of the stride (Depthwise.phases:
    each program's pixels share their rows modulo the stride, in channels_last their columns too, and the taps
    reaching none of them are skipped), on tiles that cross the phases' rows and the batch, and matches
    F.conv2d's gradient with every element written."""
    loaded = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family, desc.phases))
    channels = 5
    x = torch.randn(3, channels, *size)
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    weight = torch.randn(channels * multiplier, 1, *kernel)
    small = Choice(KERNEL, KernelConfig(4, 4, 0, num_stages=1), "depthwise")
    grad_x, expected = _grad_input_under(small, x, weight, stride, padding, dilation, channels)
    assert_close(grad_x, expected, torch.float32)
    assert ("grad_input", "depthwise", stride if channels_last else (stride[0], 1)) in loaded


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("channels", [8, 80])
def test_nchw_backward_stages_grad_output_once(channels, activation, monkeypatch, nan_filled_outputs):
    """An NCHW grouped conv's backward on the igemm families: the grad-input (the transposed conv's forward,
    here the flat igemm, which stages) and the grad-weight both read grad_output. Where both read channels_last
    copies (igemm_rows stages what IgemmRows.reads_in_place refuses: 40 channels a group here, three open rows
    of 64 columns) they share one copy (launch.sharing_copies), cold and warm, through the plain and the fused
    op; narrow groups (4 channels) the grad-weight reads in place. The gradients match F.conv2d's."""
    launches = []
    spec = gconvgen.ConvSpec(channels, channels, 2, (3, 3), (1, 1), (1, 1, 1, 1))
    wide = not family("igemm_rows").reads_in_place(spec)
    assert wide == (channels == 80)

    def spy(prepared, target, device, values, partials, result):
        launches.append((prepared.desc.kind, prepared.desc.family, prepared.desc.stage_channels_last, dict(zip(
            prepared.desc.arguments.names, values))))
        return launched(prepared, target, device, values, partials, result)

    launched = launch._launched
    x = torch.randn(2, channels, 5, 6, requires_grad=True)
    weight = torch.randn(channels, channels // 2, 3, 3, requires_grad=True)
    for call in range(2):  # cold, then warm
        out = gconvgen.conv2d(x, weight, None, 1, 1, 1, 2, activation=activation)
        grad = torch.randn_like(out)
        launches.clear()
        monkeypatch.setattr(launch, "_launched", spy)
        grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad)
        monkeypatch.setattr(launch, "_launched", launched)
        # the grad-input is the transposed conv's forward, whose x is grad_output; the fused op's relu has its
        # gradient made by torch first, a new tensor
        assert [launched_[:3] for launched_ in launches] == [("forward", "igemm", True),
                                                            ("grad_weight", "igemm_rows", wide)]
        (*_, grad_input), (*_, grad_weight) = launches
        assert grad_input["x_ptr"].is_contiguous(memory_format=torch.channels_last)
        # one copy both read, or the grad-weight reads grad_output where it lies
        assert (grad_input["x_ptr"].data_ptr() == grad_weight["grad_out_ptr"].data_ptr()) == wide
        assert grad_weight["grad_out_ptr"].is_contiguous(memory_format=torch.channels_last) == wide
        x64, weight64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        pre = reference_conv2d(x64, weight64, None, 1, (1, 1, 1, 1), 1, 2)
        expected = torch.autograd.grad(pre.relu() if activation == "relu" else pre, (x64, weight64), grad.double())
        assert_close(grad_x, expected[0], torch.float32)
        assert_close(grad_w, expected[1], torch.float32)


def test_a_shared_copy_follows_in_place_changes():
    """Inside launch.sharing_copies a second copy of the same tensor is the first one, unless the tensor (or a
    view of it) changed in place since; outside, every call copies."""
    tensor = torch.randn(2, 3, 4, 5)
    with launch.sharing_copies():
        first = launch.channels_last_copy(tensor)
        assert launch.channels_last_copy(tensor) is first
        assert first.is_contiguous(memory_format=torch.channels_last) and torch.equal(first, tensor)
        tensor[0].add_(1.0)  # through a view: the version counter is shared
        second = launch.channels_last_copy(tensor)
        assert second is not first and torch.equal(second, tensor)
    assert launch.channels_last_copy(tensor) is not launch.channels_last_copy(tensor)
