"""1-D convs: gconvgen.conv1d (the 2-D kernels at height 1), GroupedConv1d, convert and the torch.compile
backend on nn.Conv1d, and the suites' 1-D layers, against torch.nn.functional.conv1d in float64
(asymmetric and causal padding written out with F.pad). The decoding step is in test_decoding.py."""
from __future__ import annotations

import copy
import logging
import math
import re

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import gconvgen
import gconvgen.integrations.compile
from gconvgen import GroupedConv1d
from gconvgen.nn import conv1d as api1d
from gconvgen.compiler import codegen
from gconvgen.autotune import suites
from gconvgen.compiler.lowering import DEFAULT, PixelSpace, lowered_for
from gconvgen.ops.dispatch import spec_for_call
from conftest import assert_close

P = pytest.param


# ---------------------------------------------------------------------------------------------- references


def reference_padding(padding, length, kernel, stride, dilation):
    """(left, right), written out independently of gconvgen."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0)
        if mode == "causal":  # Keras: everything on the left, so output t sees inputs up to t * stride
            return ((kernel - 1) * dilation, 0)
        total = max((math.ceil(length / stride) - 1) * stride + (kernel - 1) * dilation + 1 - length, 0)
        return (total // 2, total - total // 2)  # TensorFlow's 'same': the odd sample after
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


def reference_conv1d(x, weight, bias, stride, sides, dilation, groups):
    """F.conv1d in float64 under the channel_policy='pad' definition (which is F.conv1d's when the groups
    divide the channels): zero-pad the input channels to groups * ci, run each group's outputs
    [g*co, (g+1)*co) clipped to C_out, concatenate. Differentiable, for the gradient references."""
    in_channels, out_channels = x.shape[1], weight.shape[0]
    ci, co = math.ceil(in_channels / groups), math.ceil(out_channels / groups)
    x64 = F.pad(x.double(), (*sides, 0, ci * groups - in_channels))
    outputs = []
    for g in range(groups):
        rows = slice(g * co, min((g + 1) * co, out_channels))
        outputs.append(F.conv1d(x64[:, g * ci:(g + 1) * ci], weight[rows].double(),
                                None if bias is None else bias[rows].double(), stride, 0, dilation))
    return torch.cat(outputs, dim=1)


# ---------------------------------------------------------------------------------------------- forward

# batch, in_channels, out_channels, length, kernel, stride, padding, dilation, groups, policy, data_format
CASES = [
    P(2, 8, 8, 13, 3, 1, "causal", 2, 8, "strict", "NCL", id="causal-dilation-2-depthwise"),
    P(2, 8, 8, 13, 4, 2, "causal", 1, 4, "strict", "NCL", id="causal-stride-2"),        # ceil(L / 2) outputs
    P(2, 8, 8, 32, 4, 1, "causal", 1, 8, "strict", "NLC", id="mamba-like-nlc"),         # depthwise k4, channels last
    P(2, 8, 8, 11, 4, 2, "same", 1, 4, "strict", "NCL", id="same-stride-2"),            # TF: the odd sample after
    P(2, 6, 6, 10, 5, 1, "SAME", 1, 2, "strict", "NCL", id="same-uppercase"),
    P(2, 6, 6, 10, 3, 1, "VALID", 1, 3, "strict", "NCL", id="valid-uppercase"),
    P(2, 8, 8, 15, 8, 1, 4, 1, 2, "strict", "NCL", id="wav2vec2-like-even-kernel"),     # L + 1 outputs
    P(2, 8, 8, 9, 3, 1, (2, 1), 1, 4, "strict", "NCL", id="asymmetric-pair"),
    P(2, 6, 12, 9, 3, 2, "same", 1, 3, "strict", "channels_last", id="nlc-keras-weight"),  # Keras spelling
    P(2, 11, 13, 9, 3, 1, 1, 1, 3, "pad", "NCL", id="uneven-groups-pad"),               # 11 in, 13 out, 3 groups
    P(2, 7, 6, 9, 3, 1, "causal", 1, 3, "pad", "NLC", id="uneven-groups-pad-nlc"),
    P(2, 8, 8, 9, 1, 1, 0, 1, 4, "strict", "NCL", id="k1"),
    P(2, 8, 8, 5, 7, 1, 1, 1, 2, "strict", "NCL", id="kernel-equals-padded-length"),   # one output
    P(2, 4, 8, 9, 3, 1, 1, 1, 4, "strict", "NCL", id="depthwise-multiplier-2"),
]


def conv1d_call(batch, in_channels, out_channels, length, kernel, stride, padding, dilation, groups, policy,
                data_format, dtype=torch.float32, bias=True):
    """Fresh random operands in the PyTorch layout, the gconvgen output in that layout, and the reference."""
    x = torch.randn(batch, in_channels, length, dtype=dtype)
    weight = torch.randn(out_channels, math.ceil(in_channels / groups), kernel, dtype=dtype)
    bias_tensor = torch.randn(out_channels, dtype=dtype) if bias else None
    sides = reference_padding(padding, length, kernel, stride, dilation)
    expected = reference_conv1d(x, weight, bias_tensor, stride, sides, dilation, groups)
    if data_format == "NCL":
        out = gconvgen.conv1d(x, weight, bias_tensor, stride, padding, dilation, groups, channel_policy=policy)
    else:  # activations [N, L, C] and the Keras weight [k, ci, C_out], views of fresh NLC storage
        x_nlc, weight_kio = x.transpose(1, 2).contiguous(), weight.permute(2, 1, 0).contiguous()
        out = gconvgen.conv1d(x_nlc, weight_kio, bias_tensor, stride, padding, dilation, groups,
                              channel_policy=policy, data_format=data_format)
        assert out.is_contiguous(), "NLC in must give contiguous NLC out"
        out = out.transpose(1, 2)
    return out, expected


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch, in_channels, out_channels, length, kernel, stride, padding, dilation, groups, policy, "
                         "data_format", CASES)
def test_matches_torch(batch, in_channels, out_channels, length, kernel, stride, padding, dilation, groups, policy,
                       data_format, bias, nan_filled_outputs):
    out, expected = conv1d_call(batch, in_channels, out_channels, length, kernel, stride, padding, dilation, groups,
                                policy, data_format, bias=bias)
    if str(padding).lower() == "causal":
        assert out.shape[-1] == math.ceil(length / stride), "causal: output length ceil(L / stride)"
    assert out.dtype == torch.float32
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [P(CASES[0].values, id="causal-depthwise"), P(CASES[8].values, id="nlc-grouped")])
def test_half_precision(case, dtype, nan_filled_outputs):
    out, expected = conv1d_call(*case, dtype=dtype)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


def test_unbatched_input_like_torch(nan_filled_outputs):
    x, weight, bias = torch.randn(8, 10), torch.randn(8, 4, 3), torch.randn(8)
    expected = F.conv1d(x.double(), weight.double(), bias.double(), 1, 1, 1, 2)
    assert_close(gconvgen.conv1d(x, weight, bias, 1, 1, 1, 2), expected, torch.float32)
    out = gconvgen.conv1d(x.T, weight.permute(2, 1, 0), bias, 1, 1, 1, 2, data_format="NLC")  # [L, C] in, [L, C] out
    assert_close(out, expected.T, torch.float32)


def test_runs_the_2d_op_on_height_one_views(monkeypatch):
    """No copies: conv2d gets x.unsqueeze and weight.unsqueeze views, a (1, k) window and (0, 0, left, right)."""
    seen = []
    conv2d = api1d.conv2d
    monkeypatch.setattr(api1d, "conv2d", lambda x, w, *args, **kwargs: seen.append((x, w, args, kwargs))
                        or conv2d(x, w, *args, **kwargs))
    x, weight = torch.randn(2, 8, 12), torch.randn(8, 1, 4)
    gconvgen.conv1d(x, weight, None, 1, "causal", 2, 8)
    x_nlc, weight_kio = torch.randn(2, 12, 8), torch.randn(4, 1, 8)
    gconvgen.conv1d(x_nlc, weight_kio, None, 2, "same", 1, 8, data_format="NLC")
    (x4, w4, args, kwargs), (x4_nlc, w4_nlc, args_nlc, kwargs_nlc) = seen
    assert x4.shape == (2, 8, 1, 12) and w4.shape == (8, 1, 1, 4)
    assert x4.data_ptr() == x.data_ptr() and w4.data_ptr() == weight.data_ptr()
    assert args == (None, (1, 1), (0, 0, 6, 0), (1, 2), 8) and kwargs.get("data_format", "NCHW") == "NCHW"
    assert x4_nlc.shape == (2, 1, 12, 8) and w4_nlc.shape == (1, 4, 1, 8)  # NHWC and HWIO, height 1
    assert x4_nlc.data_ptr() == x_nlc.data_ptr() and w4_nlc.data_ptr() == weight_kio.data_ptr()
    assert args_nlc[2] == (0, 0, 1, 1) and kwargs_nlc["data_format"] == "NHWC"  # "same", stride 2, L 12, k 4


@pytest.mark.parametrize("in_channels, groups, kernel, family", [P(16, 16, 4, "depthwise1d", id="mamba-depthwise-k4"),
                                                                 P(16, 2, 16, "igemm", id="wav2vec2-grouped-k16")])
def test_height_one_kernel_loops_only_over_the_length(in_channels, groups, kernel, family):
    """The rendered kernel of a 1-D conv is the 2-D one with a (1, k) window: one pass over the height taps,
    a reduction of ci * k (not ci * k * k), and a grid that tiles batch * L_out pixels and nothing else
    (depthwise1d: rows of L_out positions, its window read once with k gathers of it)."""
    batch, length = 2, 64
    x, weight = torch.randn(batch, in_channels, 1, length), torch.randn(in_channels, in_channels // groups, 1, kernel)
    spec = spec_for_call(x, weight, None, (1, 1), (0, 0, kernel - 1, 0), (1, 1), groups, "strict")
    pixels = PixelSpace.of("forward", batch, 1, length, 1, length)
    desc = lowered_for(spec, "forward", "float32", DEFAULT, False, False, False, pixels)
    source = codegen.render(desc)
    assert desc.family == family and f"_k1x{kernel}_" in desc.uri and "_p0_0_" in desc.uri
    if family == "depthwise1d":
        assert "tap_h" not in source and source.count("tl.gather(main,") == kernel - 1  # the last tap is the tile
    else:
        # tap by tap: k taps (not k * k), each of GROUP_BLOCK * ci channels
        assert f"GROUP_BLOCK * {in_channels // groups} + BLOCK_K - 1" in source
        assert f"range(0, {kernel} * channel_steps)" in source and "tap_h = tap // " in source
    grid = desc.grid(pixels)
    rows = batch if family == "depthwise1d" else 1  # depthwise1d's programs never span two rows
    assert grid[0] == rows * math.ceil(batch * length / rows / desc.config.block_m), "pixels flatten (batch, length) only"


# ---------------------------------------------------------------------------------------------- gradients

GRADIENT_CASES = [
    P(2, 8, 8, 13, 3, 1, "causal", 2, 8, "strict", "NCL", id="causal-dilation-2-depthwise"),
    P(2, 6, 12, 9, 3, 2, "same", 1, 3, "strict", "NLC", id="grouped-same-stride-2-nlc"),
    P(2, 11, 13, 9, 3, 1, (2, 0), 1, 3, "pad", "NCL", id="uneven-groups-pad-asymmetric"),
]


@pytest.mark.parametrize("batch, in_channels, out_channels, length, kernel, stride, padding, dilation, groups, policy, "
                         "data_format", GRADIENT_CASES)
def test_gradients_match_torch(batch, in_channels, out_channels, length, kernel, stride, padding, dilation, groups,
                               policy, data_format, nan_filled_outputs):
    """Gradients of x, weight and bias through the 2-D backward kernels, against torch's autograd in float64."""
    x = torch.randn(batch, in_channels, length, requires_grad=True)
    weight = torch.randn(out_channels, math.ceil(in_channels / groups), kernel, requires_grad=True)
    bias = torch.randn(out_channels, requires_grad=True)
    if data_format == "NLC":  # views of the leaves: autograd maps the gradients back through them
        out = gconvgen.conv1d(x.transpose(1, 2), weight.permute(2, 1, 0), bias, stride, padding, dilation, groups,
                              channel_policy=policy, data_format="NLC").transpose(1, 2)
    else:
        out = gconvgen.conv1d(x, weight, bias, stride, padding, dilation, groups, channel_policy=policy)
    grad_output = torch.randn_like(out)
    actual = torch.autograd.grad(out, (x, weight, bias), grad_output)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    sides = reference_padding(padding, length, kernel, stride, dilation)
    expected = torch.autograd.grad(reference_conv1d(*leaves64, stride, sides, dilation, groups), leaves64,
                                   grad_output.double())
    for name, got, want in zip(("x", "weight", "bias"), actual, expected):
        assert_close(got, want, torch.float32), name


# ---------------------------------------------------------------------------------------------- the module


def test_grouped_conv1d_state_dict_is_nn_conv1d_s(nan_filled_outputs):
    torch_conv = nn.Conv1d(8, 8, 5, stride=2, padding=2, groups=4)
    ours = GroupedConv1d(8, 8, 5, stride=2, padding=2, groups=4)
    shapes = {name: tensor.shape for name, tensor in torch_conv.state_dict().items()}
    assert {name: tensor.shape for name, tensor in ours.state_dict().items()} == shapes
    ours.load_state_dict(torch_conv.state_dict())
    x = torch.randn(2, 8, 11)
    assert_close(ours(x), F.conv1d(x.double(), torch_conv.weight.double(), torch_conv.bias.double(), 2, 2, 1, 4),
                 torch.float32)
    torch_conv.load_state_dict(ours.state_dict())

    causal = GroupedConv1d(8, 8, 4, padding="causal", groups=8)  # what nn.Conv1d cannot say
    assert causal.padding == "causal" and "channel_policy='strict'" in repr(causal)
    assert_close(causal(x), reference_conv1d(x, causal.weight, causal.bias, 1, (3, 0), 1, 8), torch.float32)
    uneven = GroupedConv1d(11, 13, 3, padding=1, groups=3, channel_policy="pad")
    assert uneven.weight.shape == (13, 4, 3) and uneven.bias.shape == (13,)


def test_from_conv_shares_parameters():
    conv = nn.Conv1d(6, 12, 3, padding="same", dilation=2, groups=3, bias=False)
    module = GroupedConv1d.from_conv(conv)
    assert module.weight is conv.weight and module.bias is None and module.padding == "same"
    x = torch.randn(2, 6, 10)
    assert_close(module(x), F.conv1d(x.double(), conv.weight.double(), None, 1, "same", 2, 3), torch.float32)
    with pytest.raises(TypeError, match="conv must be an nn.Conv1d, got Conv2d"):
        GroupedConv1d.from_conv(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="padding_mode='circular' is not supported"):
        GroupedConv1d(4, 4, 3, groups=2, padding_mode="circular")
    with pytest.raises(ValueError, match="in_channels=11 is not divisible by groups=3"):
        GroupedConv1d(11, 6, 3, groups=3)


# ---------------------------------------------------------------------------------------------- convert, compile


def conv1d_stack():
    """A small 1-D stack: pointwise, depthwise causal-style, grouped 'same', pointwise."""
    return nn.Sequential(nn.Conv1d(4, 8, 1), nn.SiLU(), nn.Conv1d(8, 8, 3, padding=1, groups=8),
                         nn.Conv1d(8, 8, 3, padding="same", groups=2, bias=False), nn.ReLU(), nn.Conv1d(8, 4, 1))


def train_step(model, x):
    """One SGD step with momentum on a fresh optimizer; returns the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def assert_same_training(reference, trained, reference_loss, loss):
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-4)
    for (name, expected), (_, actual) in zip(reference.state_dict().items(), trained.state_dict().items()):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=f"{name} differs after one step")


def test_convert_replaces_grouped_conv1d_and_trains_like_torch():
    reference = conv1d_stack()
    model = gconvgen.convert(copy.deepcopy(reference))
    assert [name for name, _ in model.gconvgen_report.replaced] == ["2", "3"]
    assert type(model[0]) is nn.Conv1d and type(model[2]) is GroupedConv1d and type(model[3]) is GroupedConv1d
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 4, 12)
    assert_same_training(reference, model, train_step(reference, x), train_step(model, x))


@pytest.mark.parametrize("route", ["backend-rewrites-f-conv1d", "converted-model"])
def test_compiled_training_step_matches_eager_torch(route, caplog):
    """torch.compile(backend=make_backend("aot_eager"), fullgraph=True): on the plain model the backend turns
    the grouped F.conv1d calls into gconvgen.conv1d; a converted model's GroupedConv1d traces as it is."""
    reference = conv1d_stack()
    model = copy.deepcopy(reference)
    if route == "converted-model":
        gconvgen.convert(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=gconvgen.integrations.compile.make_backend("aot_eager"), fullgraph=True)
    x = torch.randn(2, 4, 12)
    with caplog.at_level(logging.INFO, logger="gconvgen.integrations.compile"):
        loss = train_step(compiled, x)
    if route == "backend-rewrites-f-conv1d":
        assert "2 grouped conv(s) now run by gconvgen" in caplog.text
    assert_same_training(reference, model, train_step(reference, x), loss)


def test_rewrite_of_conv1d_module_calls_and_aten_convolution():
    """nn.Conv1d module calls (symbolic_trace) and 1-D aten.convolution become gconvgen.conv1d; dense ones stay."""
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, groups=4), nn.Conv1d(4, 4, 1))
    x = torch.randn(1, 4, 9)
    traced = torch.fx.symbolic_trace(model)
    FakeTensorProp(traced, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    assert gconvgen.integrations.compile.rewrite_grouped_convs(traced) == 1
    assert sum(node.target is gconvgen.conv1d for node in traced.graph.nodes) == 1
    torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-4)

    def aten_conv(x, weight):
        return torch.ops.aten.convolution.default(x, weight, None, [2], [1], [1], False, [0], 2)

    weight = torch.randn(4, 2, 3)
    traced = torch.fx.symbolic_trace(aten_conv)
    FakeTensorProp(traced, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x, weight)
    assert gconvgen.integrations.compile.rewrite_grouped_convs(traced) == 1
    torch.testing.assert_close(traced(x, weight), aten_conv(x, weight), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- suites


def test_suite_1d_layers_are_height_one_problems(nan_filled_outputs):
    """The headline's 1-D layers are 2-D problems of height 1; the causal one is exactly Mamba's conv (padding
    k - 1, first L outputs), checked on the smoke layer as the bench calls gconvgen."""
    layers = {layer.id: layer for layer in suites.load_suite("headline").runnable}
    mamba = layers["mamba-causal"].problem("bfloat16", "nchw")
    assert (mamba.spec.kernel_size, mamba.spec.padding, mamba.spec.groups) == ((1, 4), (0, 0, 3, 0), 5120)
    assert (mamba.height, mamba.width, mamba.output_size) == (1, 2048, (1, 2048))
    wav2vec2 = layers["wav2vec2-posconv"].problem("bfloat16", "nhwc")
    assert (wav2vec2.spec.kernel_size, wav2vec2.spec.padding, wav2vec2.output_size) == ((1, 128), (0, 0, 64, 64),
                                                                                          (1, 782))
    problem = {layer.id: layer for layer in suites.load_suite("smoke").runnable}["smoke-causal1d"].problem("float32",
                                                                                                          "nchw")
    spec = problem.spec
    x = torch.randn(problem.batch, spec.in_channels, problem.height, problem.width)
    weight, bias = torch.randn(spec.weight_shape), torch.randn(spec.out_channels)
    out = gconvgen.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
    expected = F.conv1d(x[:, :, 0].double(), weight[:, :, 0].double(), bias.double(), padding=3,
                        groups=spec.groups)[..., :problem.width]
    assert_close(out[:, :, 0], expected, torch.float32)


@pytest.mark.parametrize("fields, fragment", [
    P('"dims": 2, "causal": true, "padding": 3', "causal=true needs dims=1", id="causal-2d"),
    P('"dims": 1, "causal": true, "padding": 2', "must be (kernel - 1) * dilation = 3", id="causal-padding"),
    P('"dims": 3, "padding": 1', "dims=3 must be 1 or 2", id="dims-3"),
])
def test_suite_file_errors_for_1d_layers(fields, fragment, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"schema_version": 1, "layers": [{"id": "a", "in_channels": 8, "out_channels": 8, "groups": 8, '
                    f'"kernel": 4, "batch": 1, "size": 16, {fields}}}]}}')
    with pytest.raises(ValueError, match=re.escape(fragment)):
        suites.load_suite(str(path))


# ---------------------------------------------------------------------------------------------- bad input


def x_():
    return torch.randn(2, 8, 9)


def w_():
    return torch.randn(8, 4, 3)


BAD_CASES = [
    P(lambda: gconvgen.conv2d(torch.randn(2, 8, 5, 5), torch.randn(8, 1, 3, 3), padding="causal", groups=8),
      ValueError, ["padding='causal'", "'same'"], id="causal-to-conv2d"),
    P(lambda: gconvgen.conv1d(x_(), torch.randn(8, 4), groups=2), ValueError,
      ["weight", "(8, 4)", "2-D", "[out_channels, in_channels/groups, k]"], id="weight-2d"),
    P(lambda: gconvgen.conv1d(torch.randn(2, 8, 9, 9), w_(), groups=2), ValueError, ["input", "4-D", "[N, C, L]"],
      id="input-4d"),
    P(lambda: gconvgen.conv1d(torch.randn(2, 8, 4), torch.randn(8, 4, 7), padding=1, groups=2), ValueError,
      ["kernel_size=7", "padded input length is 6", "(4 + padding 1+1)"], id="kernel-larger-than-padded-input"),
    P(lambda: gconvgen.conv1d(x_(), w_(), groups=2, data_format="NHWC"), ValueError,
      ["data_format='NHWC'", "'NCL'", "'NLC'", "channels_last"], id="unknown-data-format"),
    P(lambda: gconvgen.conv1d(x_(), w_(), padding="full", groups=2), ValueError, ["padding='full'", "'causal'"],
      id="unknown-padding-word"),
    P(lambda: gconvgen.conv1d(x_(), w_(), padding=(1, 1, 1), groups=2), ValueError, ["padding=(1, 1, 1)", "3 values"],
      id="padding-three-sides"),
    P(lambda: gconvgen.conv1d(x_(), w_(), padding=-1, groups=2), ValueError, ["padding=-1", ">= 0"],
      id="negative-padding"),
    P(lambda: gconvgen.conv1d(x_(), w_(), stride=(1, 2), groups=2), ValueError, ["stride=(1, 2)", "2 values"],
      id="stride-pair"),
    P(lambda: gconvgen.conv1d(x_(), w_(), dilation=0, groups=2), ValueError, ["dilation=0"], id="zero-dilation"),
    P(lambda: gconvgen.conv1d(x_(), torch.randn(8, 3, 3), groups=2), ValueError,
      ["weight has 3 input channels per group", "in_channels=8", "needs 4", "[out_channels, in_channels/groups, k]"],
      id="weight-channels-per-group"),
    P(lambda: gconvgen.conv1d(x_().transpose(1, 2), torch.randn(3, 3, 8), groups=2, data_format="NLC"), ValueError,
      ["weight has 3 input channels per group", "needs 4", "[k, in_channels/groups, out_channels]"],
      id="keras-weight-channels-per-group"),
    P(lambda: gconvgen.conv1d(x_(), w_().double(), groups=2), TypeError, ["weight.dtype=torch.float64"],
      id="mismatched-dtypes"),
    P(lambda: gconvgen.conv1d(x_(), w_(), groups=2.0), TypeError, ["groups=2.0"], id="float-groups"),
    P(lambda: gconvgen.conv1d(torch.randn(2, 11, 9), torch.randn(6, 4, 3), groups=3), ValueError,
      ["in_channels=11 is not divisible by groups=3", "channel_policy='pad'"], id="uneven-groups-strict"),
    P(lambda: GroupedConv1d(8, 8, 3, padding="full", groups=2), ValueError, ["padding='full'"], id="module-padding"),
]


@pytest.mark.parametrize("call, error, fragments", BAD_CASES)
def test_rejects_bad_input_naming_the_parameter(call, error, fragments):
    with pytest.raises(error) as raised:
        call()
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} missing from: {raised.value}"
