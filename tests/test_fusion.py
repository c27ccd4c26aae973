"""Fused epilogues end to end: conv1d's activation and residual, ``gconvgen.fuse(model)`` on torchvision-style
blocks (written by hand: torchvision is not installed beside this torch), and the torch.compile backend's
fusion of batch_norm / add / activation into the conv call."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import gconvgen
import gconvgen.integrations.compile
from gconvgen import GroupedConv1d, GroupedConv2d
from gconvgen.activations import apply as apply_activation

P = pytest.param
ACTIVATIONS = ["relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish"]


# ---------------------------------------------------------------------------------------------- conv1d


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_conv1d_activation_and_residual_forward_and_gradients(activation):
    """activation(conv1d + bias + residual) and its gradients for x, weight, bias and residual, in float64."""
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)  # groups=2, k=3
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    out = gconvgen.conv1d(x, weight, bias, padding=1, groups=2, activation=activation, residual=residual)
    expected = apply_activation(F.conv1d(x, weight, bias, padding=1, groups=2) + residual, activation)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    tensors = (x, weight, bias, residual)
    actual_grads = torch.autograd.grad(out, tensors, grad)
    expected_grads = torch.autograd.grad(expected, tensors, grad)
    for actual, wanted, name in zip(actual_grads, expected_grads, ("x", "weight", "bias", "residual")):
        torch.testing.assert_close(actual, wanted, msg=f"grad {name} differs")


def test_conv1d_residual_in_nlc_and_the_module():
    x = torch.randn(2, 9, 4, dtype=torch.float64)      # NLC
    weight = torch.randn(3, 2, 4, dtype=torch.float64)  # Keras [k, ci, C_out], groups=2
    residual = torch.randn(2, 9, 4, dtype=torch.float64)
    out = gconvgen.conv1d(x, weight, padding="same", groups=2, data_format="NLC", activation="relu", residual=residual)
    expected = F.relu(F.conv1d(x.transpose(1, 2), weight.permute(2, 1, 0), padding=1, groups=2)
                      + residual.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, expected)

    module = GroupedConv1d(4, 4, 3, padding=1, groups=2, activation="silu").double()
    assert "activation='silu'" in repr(module)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    residual = torch.randn(2, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(module(x, residual),
                               F.silu(F.conv1d(x, module.weight, module.bias, padding=1, groups=2) + residual))
    with pytest.raises(ValueError, match="residual has shape"):
        gconvgen.conv1d(x, module.weight, groups=2, residual=torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation='tanh' is not supported"):
        GroupedConv1d(4, 4, 3, groups=2, activation="tanh")


# ---------------------------------------------------------------------------------------------- the blocks


def conv_norm_activation(cin, cout, kernel, stride=1, groups=1, activation=nn.ReLU6, conv=nn.Conv2d,
                         norm=nn.BatchNorm2d):
    """torchvision's Conv2dNormActivation: an nn.Sequential of conv (no bias), BatchNorm and activation."""
    layers = [conv(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), norm(cout)]
    return nn.Sequential(*layers, *([activation(inplace=True)] if activation else []))


class InvertedResidual(nn.Module):
    """MobileNetV2's block as torchvision writes it: 1x1 expand, depthwise 3x3 (both conv-BN-ReLU6),
    1x1 project conv-BN, residual."""

    def __init__(self, channels=4, expand=2):
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(conv_norm_activation(channels, hidden, 1),
                                  conv_norm_activation(hidden, hidden, 3, groups=hidden),
                                  nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.conv(x)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.activation, self.scale_activation = nn.SiLU(), nn.Sigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class MBConv(nn.Module):
    """EfficientNet's MBConv as torchvision writes it: expand conv-BN-SiLU, depthwise conv-BN-SiLU,
    squeeze-excitation, project conv-BN, residual."""

    def __init__(self, channels=4, expand=2):
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(conv_norm_activation(channels, hidden, 1, activation=nn.SiLU),
                                   conv_norm_activation(hidden, hidden, 3, groups=hidden, activation=nn.SiLU),
                                   SqueezeExcitation(hidden, 2),
                                   conv_norm_activation(hidden, channels, 1, activation=None))

    def forward(self, x):
        result = self.block(x)
        result += x
        return result


class ResNeXtBottleneck(nn.Module):
    """torchvision's Bottleneck with groups: one ReLU module called three times in forward, so it cannot be
    absorbed; the grouped conv2's BatchNorm folds."""

    def __init__(self, channels=8, width=8, groups=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + x)


def keras_stack():
    """Keras's Conv2D(groups=...) -> BatchNormalization -> Activation(...) layers, one per activation, and a
    last conv with bias and an activation but no BatchNorm."""
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8, affine=False),
                         nn.GELU(approximate="tanh"),
                         nn.Conv2d(8, 8, 1, groups=2), nn.BatchNorm2d(8, eps=1e-3), nn.Hardswish(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GELU())


def conv1d_block():
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm1d(8), nn.SiLU())


# model, input shape, the convs fused in eval mode (name: what was folded/absorbed)
BLOCKS = [
    P(InvertedResidual, (2, 4, 5, 5), {"conv.1.0": ("conv.1.1", "relu6")}, id="mobilenetv2-inverted-residual"),
    P(MBConv, (2, 4, 5, 5), {"block.1.0": ("block.1.1", "silu")}, id="efficientnet-mbconv"),
    P(ResNeXtBottleneck, (2, 8, 5, 5), {"conv2": ("bn2", None)}, id="resnext-bottleneck"),
    P(keras_stack, (2, 4, 5, 5), {"0": ("1", "relu"), "3": ("4", "gelu_tanh"), "6": ("7", "hardswish"),
                                  "9": (None, "gelu")}, id="keras-conv-bn-activation"),
    P(conv1d_block, (2, 4, 7), {"0": ("1", "silu")}, id="conv1d-bn-silu"),
]


def with_statistics(model):
    """``model`` with BatchNorm running statistics and affine parameters away from 0 and 1, so a fold that
    misses one of them shows."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            if module.affine:
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)
    return model


def eval_close(fused, reference, x):
    """The fused float32 model against the original in float64 on the same input."""
    with torch.no_grad():
        torch.testing.assert_close(fused(x).double(), reference.double()(x.double()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make_model, shape, expected", BLOCKS)
def test_fuse_in_eval_mode_folds_batch_norms_and_matches(make_model, shape, expected):
    original = with_statistics(make_model()).eval()
    model = copy.deepcopy(original)
    assert gconvgen.fuse(model) is model
    report = model.gconvgen_fuse_report
    assert [name for name, _ in report.fused] == list(expected), str(report)
    for name, (bn, activation) in expected.items():
        conv = model.get_submodule(name)
        assert type(conv) in (GroupedConv2d, GroupedConv1d) and conv.activation == activation
        if bn:
            assert type(model.get_submodule(bn)) is nn.Identity
            assert conv.weight is not original.get_submodule(name).weight, "a folded conv has new Parameters"
    assert "fused" in str(report)
    if make_model is ResNeXtBottleneck:  # the traced forward calls self.relu three times
        assert report.skipped == [("relu", "activation not absorbed: it is called 3 times in the parent's forward")]
    eval_close(model, original, torch.randn(shape))


@pytest.mark.parametrize("make_model, shape, expected", [BLOCKS[3], BLOCKS[1]])
def test_fuse_in_train_mode_absorbs_activations_only(make_model, shape, expected):
    """BatchNorm in training mode needs batch statistics: it stays, and so does the activation after it;
    a conv followed directly by an activation is fused, sharing its Parameters."""
    original = with_statistics(make_model()).train()
    model = gconvgen.fuse(copy.deepcopy(original))
    fused = dict(model.gconvgen_fuse_report.fused)
    direct = [name for name, (bn, _) in expected.items() if bn is None]
    assert list(fused) == direct
    assert all("training mode" in why for _, why in model.gconvgen_fuse_report.skipped)
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    x = torch.randn(shape)
    torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)


def test_fused_model_trains_one_step_like_the_unfused_one():
    """Train mode, float64: the fused activations give the same loss and gradients as torch's modules."""
    original = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.SiLU(), nn.Conv2d(8, 8, 3, groups=8),
                             nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=4), nn.ReLU6()).double()
    model = gconvgen.fuse(copy.deepcopy(original))
    assert [name for name, _ in model.gconvgen_fuse_report.fused] == ["0", "5"]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    losses = [net(x).square().mean() for net in (original, model)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, expected), (_, actual) in zip(original.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, msg=f"grad of {name} differs")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it


def test_fuse_reports_what_it_skips_and_why():
    shared = nn.ReLU()
    hooked = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    hooked.register_forward_hook(lambda module, inputs, output: output)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),  # 0-2
        hooked, nn.BatchNorm2d(4),                                                                         # 3-4
        nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="circular"), nn.ReLU(),                       # 5-6
        nn.Conv2d(4, 4, 1, groups=2), nn.BatchNorm2d(6),                                                   # 7-8
        nn.Conv2d(4, 4, 1, groups=2), shared, nn.Sequential(shared),                                       # 9-11
        nn.Conv2d(4, 4, 1, groups=4), nn.ReLU(inplace=True),                                               # 12-13
        Untraceable()).eval()                                                                              # 14
    gconvgen.fuse(model)
    report = model.gconvgen_fuse_report
    skipped = dict(report.skipped)
    assert "no running statistics (track_running_stats=False)" in skipped["1"]
    assert "hooks registered on it" in skipped["3"]
    assert "padding_mode='circular' is not supported" in skipped["5"]
    assert "it has 6 channels but the conv outputs 4" in skipped["8"]
    assert "reachable under several names" in skipped["10"]
    assert "could not be traced" in skipped["14"] and "nn.Sequential" in skipped["14"]
    assert dict(report.fused) == {"12": "Conv2d 4->4 k1x1 groups=4 + relu '13' absorbed"}, "inplace=True is fine"
    assert [type(module).__name__ for module in model][:12] == [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "Conv2d", "ReLU", "Conv2d", "BatchNorm2d",
        "Conv2d", "ReLU", "Sequential"]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        gconvgen.fuse("mobilenet")


def test_fuse_grouped_modules_and_the_original_stays():
    """GroupedConv2d modules fuse too; the model passed in changes in place, a deep copy's original does not."""
    original = with_statistics(nn.Sequential(GroupedConv2d(4, 6, 3, padding="same", groups=2), nn.BatchNorm2d(6),
                                             nn.SiLU())).eval()
    weight_before = original[0].weight.detach().clone()
    model = gconvgen.fuse(copy.deepcopy(original))
    assert type(original[1]) is nn.BatchNorm2d and torch.equal(original[0].weight, weight_before)
    assert model[0].activation == "silu" and model[0].padding == "same"
    eval_close(model, original, torch.randn(2, 4, 5, 5))


# ---------------------------------------------------------------------------------------------- compile backend


class ConvBatchNormAddSilu(nn.Module):
    """conv -> batch_norm -> + residual -> F.silu, all in forward code (no activation module)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)

    def forward(self, x, residual):
        return F.silu(self.bn(self.conv(x)) + residual)


def compiled_and_graphs(model, inner="aot_eager"):
    """``model`` under torch.compile(backend=make_backend(recorder), fullgraph=True); the recorder keeps each
    rewritten graph and hands it to ``inner``."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend(inner)(graph_module, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, backend=gconvgen.integrations.compile.make_backend(record), fullgraph=True), graphs


def fused_calls(graph_module):
    return [(node.target, node.kwargs) for node in graph_module.graph.nodes
            if node.target in (gconvgen.conv2d, gconvgen.conv1d)]


@pytest.mark.parametrize("make_model, shapes, function, expected", [
    P(lambda: conv_norm_activation(4, 4, 3, groups=4), [(2, 4, 5, 5)], gconvgen.conv2d, {"activation": "relu6"},
      id="conv-bn-relu6"),
    P(ConvBatchNormAddSilu, [(2, 4, 5, 5)] * 2, gconvgen.conv2d, {"activation": "silu", "residual": True},
      id="conv-bn-add-silu"),
    P(conv1d_block, [(2, 4, 7)], gconvgen.conv1d, {"activation": "silu"}, id="conv1d-bn-silu"),
])
def test_backend_fuses_batch_norm_residual_and_activation(make_model, shapes, function, expected):
    model = with_statistics(make_model()).eval()
    inputs = [torch.randn(shape) for shape in shapes]
    compiled, graphs = compiled_and_graphs(model)
    with torch.no_grad():
        out = compiled(*inputs)
        torch.testing.assert_close(out.double(), model.double()(*(x.double() for x in inputs)), atol=1e-4, rtol=1e-4)
    assert len(graphs) == 1, "a graph break"
    [(target, kwargs)] = fused_calls(graphs[0])
    assert target is function and kwargs.get("activation") == expected["activation"]
    assert ("residual" in kwargs) == ("residual" in expected)
    remaining = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert not remaining & {F.batch_norm, F.silu, F.relu, F.hardtanh}, remaining


def test_rewrite_fuses_module_calls_of_a_traced_graph():
    """A symbolically traced Sequential keeps conv, BatchNorm and ReLU as module calls: the BatchNorm's tensors
    become get_attr nodes and the chain one fused call."""
    model = with_statistics(conv_norm_activation(4, 4, 3, groups=2, activation=nn.ReLU)).eval()
    x = torch.randn(2, 4, 5, 5)
    traced = torch.fx.symbolic_trace(model)
    FakeTensorProp(traced, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    assert gconvgen.integrations.compile.rewrite_grouped_convs(traced) == 1
    assert [kwargs for _, kwargs in fused_calls(traced)] == [{"activation": "relu"}]
    assert not [node for node in traced.graph.nodes if node.op == "call_module"]
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-4)


def test_backend_leaves_epilogues_with_other_users_and_trains():
    """The conv's output is also returned, so relu stays unfused; a conv -> relu in train mode fuses and its
    gradients match eager torch's."""

    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.second = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x):
            kept = self.first(x)
            return torch.relu(kept) + kept, F.relu(self.second(x), inplace=True)

    model = TwoUses().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    compiled, graphs = compiled_and_graphs(model)
    outputs = compiled(x)
    assert [kwargs for _, kwargs in fused_calls(graphs[0])] == [{}, {"activation": "relu"}]
    expected = model(x)
    for actual, wanted in zip(outputs, expected):
        torch.testing.assert_close(actual, wanted)
    grads = [torch.autograd.grad(sum(out.sum() for out in outs), list(model.parameters()))
             for outs in (outputs, expected)]
    for actual, wanted in zip(*grads):
        torch.testing.assert_close(actual, wanted)
