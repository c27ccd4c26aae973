"""Training through gconvgen: convert(model), the torch.compile backend "gconvgen", and three small blocks of
real architectures trained one step against eager torch."""
from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import gconvgen
import gconvgen.integrations.compile
from gconvgen import GroupedConv2d
from conftest import spy_on_kernels

P = pytest.param


# ---------------------------------------------------------------------------------------------- the models


class ResNeXtBottleneck(nn.Module):
    """torchvision's ResNeXt bottleneck: 1x1, grouped 3x3 (stride 2 here), 1x1, projection shortcut."""

    def __init__(self, channels=16, width=16, groups=4, stride=2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.downsample = nn.Sequential(nn.Conv2d(channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise 3x3, 1x1 project, residual."""

    def __init__(self, channels=8, expand=4):
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.block(x)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7 with bias, LayerNorm over channels, MLP, layer scale, residual."""

    def __init__(self, dim=8):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.gamma * self.mlp(self.norm(out))
        return x + out.permute(0, 3, 1, 2)


# model, input [N, C, H, W], channels_last
MODELS = [
    P(ResNeXtBottleneck, (2, 16, 8, 8), False, id="resnext-bottleneck"),
    P(InvertedResidual, (2, 8, 6, 6), True, id="mobilenetv2-inverted-residual"),
    P(ConvNeXtBlock, (2, 8, 6, 6), False, id="convnext-block"),
]


@pytest.fixture
def launched_kinds(monkeypatch):
    """The kinds of the gconvgen kernels launched during the test (forward, grad_input, grad_weight, grad_bias)."""
    return spy_on_kernels(monkeypatch, lambda desc: desc.kind)


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


@pytest.mark.parametrize("route", ["backend-gconvgen", "converted-aot-eager"])
@pytest.mark.parametrize("make_model, shape, channels_last", MODELS)
def test_one_training_step_matches_eager_torch(make_model, shape, channels_last, route, caplog, launched_kinds):
    """backend-gconvgen: the unconverted model under torch.compile(backend="gconvgen") (Inductor for the rest);
    converted-aot-eager: convert(model), then torch.compile with the gconvgen backend handing on to aot_eager."""
    reference = make_model()
    model = copy.deepcopy(reference)
    x = torch.randn(shape)
    if channels_last:
        x, reference, model = (t.to(memory_format=torch.channels_last) for t in (x, reference, model))
    torch._dynamo.reset()
    if route == "backend-gconvgen":
        compiled = torch.compile(model, backend="gconvgen", fullgraph=True)
    else:
        gconvgen.convert(model)
        assert model.gconvgen_report.replaced, "nothing was converted"
        compiled = torch.compile(model, backend=gconvgen.integrations.compile.make_backend("aot_eager"), fullgraph=True)
    with caplog.at_level(logging.INFO, logger="gconvgen.integrations.compile"):
        loss = train_step(compiled, x)
    reference_loss = train_step(reference, x)
    assert "grad_weight" in launched_kinds, f"gconvgen's backward kernels did not run: {launched_kinds}"
    if route == "backend-gconvgen":
        assert "1 grouped conv(s) now run by gconvgen" in caplog.text
    assert_same_training(reference, model, reference_loss, loss)


def test_converted_model_compiles_with_the_default_backend():
    """The custom ops' fake kernels let Inductor trace a converted model, forward and backward, in one graph."""
    reference = ConvNeXtBlock()
    model = gconvgen.convert(copy.deepcopy(reference))
    x = torch.randn(2, 8, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    assert_same_training(reference, model, train_step(reference, x), train_step(compiled, x))


def test_backend_inference_matches_eager():
    reference = InvertedResidual().eval()
    x = torch.randn(2, 8, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(reference), backend=gconvgen.integrations.compile.make_backend("aot_eager"),
                             fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), atol=1e-5, rtol=1e-4)


def test_backend_rewrites_only_grouped_convs():
    """Grouped F.conv2d calls (what Dynamo makes of nn.Conv2d) become gconvgen.conv2d; a dense conv stays."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding="same", groups=2))
    x = torch.randn(1, 4, 5, 5)
    torch._dynamo.reset()
    out = torch.compile(model, backend=gconvgen.integrations.compile.make_backend(record), fullgraph=True)(x)
    calls = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert calls.count(gconvgen.conv2d) == 1 and calls.count(torch.conv2d) == 1
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-4)


def test_rewrite_of_module_calls_and_aten_convolution():
    """Graphs that keep nn.Conv2d as module calls (symbolic_trace; Dynamo before inlining modules) and aten
    graphs (aten.convolution) are rewritten too; a transposed convolution is not."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1))
    x = torch.randn(1, 4, 5, 5)
    traced = torch.fx.symbolic_trace(model)
    FakeTensorProp(traced, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    assert gconvgen.integrations.compile.rewrite_grouped_convs(traced) == 1
    torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-4)

    def aten_convs(x, weight):
        grouped = torch.ops.aten.convolution.default(x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 4)
        transposed = torch.ops.aten.convolution.default(x, weight, None, [1, 1], [1, 1], [1, 1], True, [0, 0], 4)
        return grouped + transposed

    weight = torch.randn(4, 1, 3, 3)
    traced = torch.fx.symbolic_trace(aten_convs)
    FakeTensorProp(traced, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x, weight)
    assert gconvgen.integrations.compile.rewrite_grouped_convs(traced) == 1
    torch.testing.assert_close(traced(x, weight), aten_convs(x, weight), atol=1e-5, rtol=1e-4)


def test_backend_is_registered_by_name_and_entry_point():
    assert gconvgen.integrations.compile.BACKEND_NAME in torch._dynamo.list_backends(exclude_tags=())
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    module, _, attribute = project["project"]["entry-points"]["torch_dynamo_backends"]["gconvgen"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is gconvgen.integrations.compile.backend
    with pytest.raises(TypeError, match="inner=3 must be a torch.compile backend"):
        gconvgen.integrations.compile.make_backend(3)


# ---------------------------------------------------------------------------------------------- convert


class Circular(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="circular")


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert_keeps_parameters_state_dict_and_reports(caplog):
    shared = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), shared, nn.Sequential(shared, Circular()),
                          MyConv(8, 8, 1, groups=2), nn.BatchNorm2d(8).double())
    model[3].register_buffer("scale", torch.ones(8))
    keys_before = list(model.state_dict())
    parameters_before = dict(model.named_parameters(remove_duplicate=False))
    with caplog.at_level(logging.INFO, logger="gconvgen.nn.convert"):
        returned = gconvgen.convert(model)
    assert returned is model
    assert type(model[0]) is nn.Conv2d, "a dense conv is not selected"
    assert type(model[1]) is GroupedConv2d and model[2][0] is model[1], "a shared conv stays shared"
    assert type(model[2][1].conv) is nn.Conv2d and type(model[3]) is MyConv
    assert list(model.state_dict()) == keys_before
    for name, parameter in model.named_parameters(remove_duplicate=False):
        assert parameter is parameters_before[name], f"{name} is a new Parameter"
    report = model.gconvgen_report
    assert [name for name, _ in report.replaced] == ["1", "2.0"]
    skipped = dict(report.skipped)
    assert "padding_mode='circular' is not supported" in skipped["2.1.conv"]
    assert "MyConv overrides nn.Conv2d.forward" in skipped["3"]
    assert "replaced 2 conv(s), skipped 2" in caplog.text


def test_convert_with_filter_fn_and_hooks():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2))
    model[1].register_forward_hook(lambda module, inputs, output: output)
    gconvgen.convert(model, filter_fn=lambda module, name: True)
    assert type(model[0]) is GroupedConv2d, "filter_fn selects a groups=1 conv"
    assert type(model[1]) is nn.Conv2d
    assert "hooks registered on it" in dict(model.gconvgen_report.skipped)["1"]
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(model[0](x), nn.functional.conv2d(x, model[0].weight, model[0].bias, padding=1),
                               atol=1e-5, rtol=1e-4)


def test_convert_refuses_bad_arguments_and_the_root_conv():
    with pytest.raises(TypeError, match="filter_fn=3 must be a callable"):
        gconvgen.convert(nn.Sequential(), filter_fn=3)
    with pytest.raises(ValueError, match="channel_policy='even' is not a policy"):
        gconvgen.convert(nn.Sequential(), channel_policy="even")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        gconvgen.convert("resnet")
    conv = nn.Conv2d(4, 4, 3, groups=2)
    assert gconvgen.convert(conv) is conv and type(conv) is nn.Conv2d
    assert "use GroupedConv2d.from_conv(model)" in conv.gconvgen_report.skipped[0][1]
