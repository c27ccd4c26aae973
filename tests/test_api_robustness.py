"""The API where ordinary use meets it sideways: mixed precision (torch.autocast), meta tensors, input
mistakes and the fix their message names, TensorFlow/Keras spellings, torch.func (vmap, grad, jacrev) and
compile_layer's reading of 'cuda'. References are torch.nn.functional.conv2d in float64."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gconvgen
from conftest import assert_close
from gconvgen.nn.layers import _same_device
from gconvgen.ops import conv2d as ops
from gconvgen.ops.autograd import vmap_by_loop

P = pytest.param


def reference(x, weight, bias, padding, groups, policy="strict"):
    """F.conv2d in float64 at stride 1; under channel_policy='pad' group by group: group g reads input
    channels [g*ci, (g+1)*ci) of the zero-padded input and writes outputs [g*co, (g+1)*co) clipped to C_out."""
    x64, weight64 = x.double(), weight.double()
    bias64 = None if bias is None else bias.double()
    if policy == "strict":
        return F.conv2d(x64, weight64, bias64, 1, padding, 1, groups)
    in_channels, out_channels = x.shape[1], weight.shape[0]
    ci, co = math.ceil(in_channels / groups), math.ceil(out_channels / groups)
    x64 = F.pad(x64, (0, 0, 0, 0, 0, ci * groups - in_channels))
    outputs = []
    for g in range(groups):
        rows = slice(g * co, min((g + 1) * co, out_channels))
        outputs.append(F.conv2d(x64[:, g * ci:(g + 1) * ci], weight64[rows], None if bias64 is None else bias64[rows],
                                1, padding))
    return torch.cat(outputs, dim=1)


# ---------------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, None], ids=["fp32-input", "autocast-dtype-input"])
def test_conv2d_under_autocast_returns_the_autocast_dtype(dtype, input_dtype):
    """As F.conv2d: float32 tensors, or an activation already in the autocast dtype beside a float32
    weight (what a previous autocast layer hands over), run in the autocast dtype."""
    x = torch.randn(2, 4, 5, 5, dtype=input_dtype or dtype)
    weight, bias = torch.randn(6, 2, 3, 3), torch.randn(6)
    with torch.autocast("cpu", dtype=dtype):
        out = gconvgen.conv2d(x, weight, bias, padding=1, groups=2)
        expected_dtype = F.conv2d(x, weight, bias, padding=1, groups=2).dtype
    assert out.dtype == expected_dtype == dtype
    assert_close(out, reference(x.to(dtype), weight.to(dtype), bias.to(dtype), 1, 2), dtype)


def test_amp_step_of_a_converted_model_matches_torchs():
    """One step of an ordinary CPU AMP (bfloat16) training loop: the second conv receives a bfloat16
    activation while its weight stays float32, which used to raise TypeError."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8))
    converted = gconvgen.convert(copy.deepcopy(model))
    assert len(converted.gconvgen_report.replaced) == 2
    x = torch.randn(2, 4, 6, 6)
    results = []
    for network in (model, converted):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = network(x)
            loss = out.float().square().mean()
        loss.backward()
        results.append((out, [parameter.grad for parameter in network.parameters()]))
    (expected_out, expected_grads), (out, grads) = results
    assert out.dtype == expected_out.dtype == torch.bfloat16
    assert_close(out, expected_out.double(), torch.bfloat16)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == expected_grad.dtype == torch.float32
        scale = expected_grad.abs().max()  # both sides are bfloat16 convs: compare at bfloat16's resolution
        assert_close(grad / scale, (expected_grad / scale).double(), torch.bfloat16)


def test_autocast_under_torch_compile():
    """torch.compile traces the same casts (aot_eager keeps CPU compile time low)."""
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3)
    compiled = torch.compile(lambda x, weight: gconvgen.conv2d(x, weight, padding=1, groups=2), backend="aot_eager",
                             fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, weight)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(x.bfloat16(), weight.bfloat16(), None, 1, 2), torch.bfloat16)


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_meta_tensors_give_f_conv2d_shape(channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(2, 6, 9, 7, device="meta").to(memory_format=memory_format)
    weight, bias = torch.empty(9, 2, 3, 3, device="meta"), torch.empty(9, device="meta")
    out = gconvgen.conv2d(x, weight, bias, stride=2, padding=1, groups=3)
    expected = F.conv2d(x, weight, bias, stride=2, padding=1, groups=3)
    assert out.is_meta and out.shape == expected.shape
    assert out.is_contiguous(memory_format=memory_format)

    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()  # the gradient ops have shapes too
    grads = torch.autograd.grad(gconvgen.conv2d(x, weight, bias, 2, 1, 1, 3).sum(), (x, weight, bias))
    assert [tuple(grad.shape) for grad in grads] == [tuple(x.shape), tuple(weight.shape), tuple(bias.shape)]
    assert all(grad.is_meta for grad in grads)


def test_zero_input_channels_say_what_to_do():
    with pytest.raises(ValueError) as raised:
        gconvgen.conv2d(torch.randn(2, 0, 5, 5), torch.randn(6, 0, 3, 3), groups=2)
    message = str(raised.value)
    assert "0 channels" in message and "skip it" in message and "(2, 0, 5, 5)" in message
    assert "groups <= 0" not in message


# input shape, weight shape, groups, data_format passed, the data_format the message suggests
DATA_FORMAT_MIX_UPS = [
    P((2, 5, 5, 8), (3, 3, 2, 8), 4, "NCHW", "NHWC", id="nhwc-hwio-without-data-format"),  # groups exceed H=5
    P((2, 7, 7, 12), (3, 3, 4, 6), 3, "NCHW", "NHWC", id="nhwc-hwio-weight-check"),       # weight's ci misread
    P((2, 8, 5, 6), (8, 2, 3, 3), 4, "NHWC", "NCHW", id="nchw-oihw-with-nhwc"),           # the other way round
]


@pytest.mark.parametrize("x_shape, w_shape, groups, data_format, suggested", DATA_FORMAT_MIX_UPS)
def test_tensors_of_the_other_data_format_suggest_it(x_shape, w_shape, groups, data_format, suggested):
    with pytest.raises(ValueError) as raised:
        gconvgen.conv2d(torch.randn(x_shape), torch.randn(w_shape), groups=groups, data_format=data_format)
    assert f"pass data_format='{suggested}'" in str(raised.value)


def test_nhwc_with_the_suggested_data_format_matches_torch():
    x, weight = torch.randn(2, 5, 5, 8), torch.randn(3, 3, 2, 8)  # NHWC input, HWIO weight
    out = gconvgen.conv2d(x, weight, padding=1, groups=4, data_format="NHWC")
    expected = reference(x.permute(0, 3, 1, 2), weight.permute(3, 2, 0, 1), None, 1, 4).permute(0, 2, 3, 1)
    assert_close(out, expected, torch.float32)


def test_tensorflow_and_keras_spellings():
    """padding='SAME'/'VALID' and data_format='channels_last'/'channels_first' mean what they mean in
    TensorFlow and Keras."""
    x, weight = torch.randn(1, 4, 7, 6), torch.randn(4, 2, 3, 3)
    same_stride_2 = gconvgen.conv2d(x, weight, stride=2, padding="SAME", groups=2)
    assert_close(same_stride_2, reference(F.pad(x, (0, 1, 1, 1)), weight, None, 0, 2)[..., ::2, ::2], torch.float32)
    valid = gconvgen.conv2d(x, weight, padding="VALID", groups=2, data_format="channels_first")
    assert_close(valid, reference(x, weight, None, 0, 2), torch.float32)
    channels_last = gconvgen.conv2d(x.permute(0, 2, 3, 1), weight.permute(2, 3, 1, 0), padding="Same", groups=2,
                                    data_format="channels_last")
    assert_close(channels_last, reference(x, weight, None, 1, 2).permute(0, 2, 3, 1), torch.float32)


def test_grouped_conv2d_takes_nhwc_with_an_oihw_weight():
    module = gconvgen.GroupedConv2d(6, 9, 3, padding="SAME", groups=3, data_format="channels_last")
    assert module.data_format == "NHWC" and "data_format='NHWC'" in repr(module)
    assert {name: p.shape for name, p in module.state_dict().items()} == \
        {name: p.shape for name, p in nn.Conv2d(6, 9, 3, groups=3).state_dict().items()}
    x = torch.randn(2, 5, 4, 6)  # [N, H, W, C]
    out = module(x)
    expected = reference(x.permute(0, 3, 1, 2), module.weight, module.bias, 1, 3).permute(0, 2, 3, 1)
    assert_close(out.detach(), expected, torch.float32)
    assert out.is_contiguous()  # the [N, H, W, C] view of a channels_last output: no copy either way


def test_readme_module_prints():
    module = gconvgen.GroupedConv2d(11, 13, 3, padding=1, groups=3, channel_policy="pad")
    assert repr(module) == ("GroupedConv2d(11, 13, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=3, "
                            "channel_policy='pad')")
    print(module)


# ---------------------------------------------------------------------------------------------- compile_layer


def test_same_device_reads_cuda_as_the_current_device(monkeypatch):
    """compile_layer(spec) compiled for torch.device('cuda') and refused every cuda:0 input."""
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda:0"), torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _same_device(cuda0, cuda) and _same_device(cuda, cuda0) and _same_device(cuda, cuda)
    assert not _same_device(cuda1, cuda) and not _same_device(cuda0, cuda1)
    assert not _same_device(torch.device("cpu"), cuda) and _same_device(torch.device("cpu"), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _same_device(cuda1, cuda) and not _same_device(cuda0, cuda)


# ---------------------------------------------------------------------------------------------- torch.func

# x shape, weight shape, groups, policy
FUNC_CASES = [
    P((2, 4, 5, 5), (6, 2, 3, 3), 2, "strict", id="grouped"),  # a mapped weight folds into groups
    P((2, 5, 5, 5), (4, 3, 3, 3), 2, "pad", id="uneven-pad"),  # C_in, C_out % groups != 0: no folding into groups
]


@pytest.mark.parametrize("mapped", ["x", "weight", "x-and-weight"])
@pytest.mark.parametrize("x_shape, w_shape, groups, policy", FUNC_CASES)
def test_vmap_matches_f_conv2d(x_shape, w_shape, groups, policy, mapped, monkeypatch):
    loops = []
    monkeypatch.setattr(ops, "vmap_by_loop", lambda *args: loops.append(1) or vmap_by_loop(*args))
    batch = 3
    maps_x, maps_weight = mapped != "weight", mapped != "x"
    x = torch.randn(x_shape[0], batch, *x_shape[1:]) if maps_x else torch.randn(x_shape)  # mapped in dim 1
    weight = torch.randn(batch, *w_shape) if maps_weight else torch.randn(w_shape)
    bias = torch.randn(batch, w_shape[0]) if maps_weight else torch.randn(w_shape[0])
    in_dims = (1 if maps_x else None, 0 if maps_weight else None, 0 if maps_weight else None)
    conv = torch.vmap(lambda x, w, b: gconvgen.conv2d(x, w, b, padding=1, groups=groups, channel_policy=policy),
                      in_dims=in_dims)
    out = conv(x, weight, bias)
    expected = torch.stack([reference(x[:, i] if maps_x else x, weight[i] if maps_weight else weight,
                                      bias[i] if maps_weight else bias, 1, groups, policy) for i in range(batch)])
    assert_close(out, expected, torch.float32)
    assert loops == ([1] if maps_weight and policy == "pad" else [])  # one call per index only where needed


@pytest.mark.parametrize("x_shape, w_shape, groups, policy", FUNC_CASES)
def test_func_grad_matches_f_conv2d(x_shape, w_shape, groups, policy):
    x, weight, bias = torch.randn(x_shape), torch.randn(w_shape), torch.randn(w_shape[0])
    target = torch.randn(x_shape[0], w_shape[0], *x_shape[2:], dtype=torch.float64)

    def loss(conv, x, weight, bias):
        return (conv(x, weight, bias).double() * target).sum()

    def ours(x, weight, bias):
        return gconvgen.conv2d(x, weight, bias, padding=1, groups=groups, channel_policy=policy)

    grads = torch.func.grad(lambda *t: loss(ours, *t), argnums=(0, 1, 2))(x, weight, bias)
    expected = torch.func.grad(lambda *t: loss(lambda *u: reference(*u, 1, groups, policy), *t),
                               argnums=(0, 1, 2))(x.double(), weight.double(), bias.double())
    for grad, expected_grad in zip(grads, expected):
        assert_close(grad, expected_grad, torch.float32)


def test_per_sample_gradients_by_vmap_of_grad():
    """torch.func's per-sample-gradient recipe: the weight's gradient for each sample of a batch."""
    x, weight = torch.randn(3, 4, 5, 5), torch.randn(6, 2, 3, 3)

    def per_sample_grads(conv, weight, x):
        def loss(weight, sample):
            return conv(sample[None], weight, padding=1, groups=2).square().sum()
        return torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(weight, x)

    ours = per_sample_grads(gconvgen.conv2d, weight, x)
    expected = per_sample_grads(F.conv2d, weight.double(), x.double())
    assert_close(ours, expected, torch.float32)


def test_jacrev_on_a_tiny_conv():
    x, weight = torch.randn(1, 2, 3, 3), torch.randn(2, 1, 2, 2)
    jacobians = torch.func.jacrev(lambda x, w: gconvgen.conv2d(x, w, groups=2), argnums=(0, 1))(x, weight)
    expected = torch.func.jacrev(lambda x, w: F.conv2d(x, w, groups=2), argnums=(0, 1))(x.double(), weight.double())
    for jacobian, expected_jacobian in zip(jacobians, expected):
        assert_close(jacobian, expected_jacobian, torch.float32)


def test_grad_of_grad_matches_f_conv2d():
    """Nested torch.func levels (a gradient penalty written with torch.func): each level records the op,
    so the outer gradient flows through the inner one's gradient ops."""
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3)

    def penalty(conv, x, weight):
        input_grad = torch.func.grad(lambda x: conv(x, weight, padding=1, groups=2).square().sum())(x)
        return input_grad.square().sum()

    grads = torch.func.grad(lambda *t: penalty(gconvgen.conv2d, *t), argnums=(0, 1))(x, weight)
    expected = torch.func.grad(lambda *t: penalty(F.conv2d, *t), argnums=(0, 1))(x.double(), weight.double())
    for grad, expected_grad in zip(grads, expected):
        scale = expected_grad.abs().max()
        assert_close(grad / scale, expected_grad / scale, torch.float32)


# ---------------------------------------------------------------------------------------------- residuals and errors


# input shape, weight shape, groups, residual shape (in the caller's layout), data_format
BROADCAST_RESIDUALS = [
    P((2, 6, 5, 5), (6, 1, 3, 3), 6, (1, 6, 1, 1), "NCHW", id="depthwise-per-channel"),
    P((2, 8, 5, 5), (8, 2, 3, 3), 4, (2, 1, 5, 5), "NCHW", id="grouped-per-pixel"),    # one map for all channels
    P((2, 5, 5, 8), (3, 3, 2, 8), 4, (1, 1, 1, 8), "NHWC", id="nhwc-per-channel"),
    P((6, 5, 5), (6, 1, 3, 3), 6, (6, 1, 1), "NCHW", id="unbatched-per-channel"),
]


@pytest.mark.parametrize("x_shape, w_shape, groups, residual_shape, data_format", BROADCAST_RESIDUALS)
def test_a_broadcastable_residual_is_added_as_torch_adds_it(x_shape, w_shape, groups, residual_shape, data_format):
    """[1, C, 1, 1] was refused with no fix; it is expanded (a view), so values and gradients are torch's."""
    x, weight, residual = (torch.randn(shape, dtype=torch.float64, requires_grad=True)
                           for shape in (x_shape, w_shape, residual_shape))
    nhwc = data_format == "NHWC"
    out = gconvgen.conv2d(x, weight, padding=1, groups=groups, data_format=data_format, activation="relu",
                          residual=residual)
    x_nchw = x.permute(0, 3, 1, 2) if nhwc else x
    weight_oihw = weight.permute(3, 2, 0, 1) if nhwc else weight
    conv = F.conv2d(x_nchw, weight_oihw, padding=1, groups=groups)
    expected = F.relu((conv.permute(0, 2, 3, 1) if nhwc else conv) + residual)
    torch.testing.assert_close(out, expected)
    grad_output = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (x, weight, residual), grad_output)
    expected_grads = torch.autograd.grad(expected, (x, weight, residual), grad_output)
    for name, grad, truth in zip(("x", "weight", "residual"), grads, expected_grads):
        torch.testing.assert_close(grad, truth, msg=f"grad of {name}")


def test_a_broadcast_residual_on_the_warm_path_reads_the_new_values():
    """The second call of a signature replays the first's launch: it must read this call's residual."""
    x, weight = torch.randn(2, 6, 5, 5), torch.randn(6, 1, 3, 3)
    for _ in range(2):
        residual = torch.randn(1, 6, 1, 1)
        expected = F.conv2d(x.double(), weight.double(), padding=1, groups=6) + residual.double()
        assert_close(gconvgen.conv2d(x, weight, padding=1, groups=6, residual=residual), expected, torch.float32)


def test_conv1d_takes_a_per_channel_residual():
    x, weight, residual = torch.randn(2, 8, 7), torch.randn(8, 1, 3), torch.randn(1, 8, 1)
    out = gconvgen.conv1d(x, weight, padding="causal", groups=8, residual=residual)
    expected = F.conv1d(F.pad(x.double(), (2, 0)), weight.double(), groups=8) + residual.double()
    assert_close(out, expected, torch.float32)


def test_the_other_data_format_is_suggested_after_the_error_it_explains():
    """A padding-budget refusal led with an NHWC hint; now the refusal comes first, the hint after it."""
    with pytest.raises(ValueError) as raised:
        gconvgen.conv2d(torch.randn(2, 3, 9, 5), torch.randn(3, 2, 3, 3), groups=2, channel_policy="pad")
    message = str(raised.value)
    assert message.startswith("channel padding for in_channels=3") and "over the padding budget" in message
    assert message.index("budget") < message.index("pass data_format='NHWC'")


# ---------------------------------------------------------------------------------------------- fuse's report


class ConvReadTwice(nn.Module):
    """The conv's output feeds the BatchNorm and the residual add: folding would change the add's input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.act(self.bn(y)) + y


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


def test_fuse_says_why_it_skips_chains_the_forward_does_not_run_alone():
    """Both were reported as 'fused 0 conv(s), skipped 0'."""
    read_twice, called_twice = gconvgen.fuse(ConvReadTwice().eval()), gconvgen.fuse(ConvCalledTwice().eval())
    assert dict(read_twice.gconvgen_fuse_report.skipped) == {
        "bn": "BatchNorm not folded: the output of 'conv' is also read by 'add' in the parent's forward, which "
              "needs it unfused"}
    assert dict(called_twice.gconvgen_fuse_report.skipped) == {
        "conv": "not fused with 'bn' after it: it is called 2 times in the parent's forward"}
    assert "skipped 1" in str(called_twice.gconvgen_fuse_report)


def test_fuse_keeps_a_frozen_batch_norm_of_a_model_in_training_mode():
    """An eval-mode BatchNorm in a model being trained (fine-tuning with frozen statistics) was folded."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.ReLU()).train()
    model[1].eval()
    parameters = dict(model.named_parameters())
    gconvgen.fuse(model)
    report = model.gconvgen_fuse_report
    assert not report.fused and not report.new_parameters and type(model[1]) is nn.BatchNorm2d
    why = dict(report.skipped)["1"]
    assert "inside a model in training mode" in why and "model.eval()" in why
    assert dict(model.named_parameters()) == parameters


def test_fuse_reports_the_new_parameters_an_old_optimizer_does_not_hold():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, groups=2),
                          nn.ReLU()).eval()
    held = {id(parameter) for parameter in torch.optim.SGD(model.parameters(), lr=0.1).param_groups[0]["params"]}
    gconvgen.fuse(model)
    report = model.gconvgen_fuse_report
    assert report.new_parameters == ["0"], "the conv after no BatchNorm keeps its Parameters"
    assert id(model[0].weight) not in held and id(model[2].weight) in held
    assert "new Parameters" in str(report) and "make it again" in str(report)
