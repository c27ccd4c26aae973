"""End-to-end model checks: blocks of real architectures, written by hand after torchvision and Hugging Face
transformers (neither is installed beside this torch) with small channel counts, run through the three user
paths and compared with eager torch.

    convert   gconvgen.convert(model): eval forward, and one training step (loss.backward, an SGD step)
    fuse      gconvgen.fuse(model.eval()), then convert for the grouped convs no chain holds: eval forward;
              fuse in training mode (BatchNorms and the activations after them stay): one training step
    compile   the "gconvgen" backend's rewrite with aot_eager for the rest of the graph: eval forward (eval
              BatchNorms folded, residual adds and activations fused) and one training step; and
              torch.compile(model, backend="gconvgen") itself (Inductor for the rest) on two models, as
              Inductor's C++ compiles cost seconds per graph

and wav2vec2's conv under weight norm (a parametrized weight) through convert and the compile backend.

Ground truth is a float64 copy of the model run by eager torch: gconvgen's float32 result must be within
TOLERANCES[float32] of it (atol relative to the result's largest magnitude), or within four times float32 eager
torch's own error where that is looser. A training step compares every parameter's gradient, then every
parameter and buffer after the step. Each 2-D model is a stack whose stride-2 stage takes a 2x2 input to 1x1
(stages at 2x2 and 1x1) and runs at 8x8 too; the 1-D ones at a few tokens (one included) and at more. Every
test asserts that gconvgen's kernels ran: a forward launch per grouped conv, backward kernels in training.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import gconvgen
import gconvgen.integrations.compile
from gconvgen import GroupedConv1d, GroupedConv2d
from conftest import TOLERANCES, spy_on_kernels

P = pytest.param
DTYPE = torch.float32  # gconvgen's and eager's models; the truth is their float64 copy
ATOL, RTOL = TOLERANCES[DTYPE]
# gconvgen's error may be this many times float32 eager torch's (against float64) where that is looser
EAGER_ERROR_FACTOR = 4
LEARNING_RATE, MOMENTUM = 0.1, 0.9


# ---------------------------------------------------------------------------------------------- building blocks


def conv_norm_activation(cin, cout, kernel, stride=1, groups=1, activation=nn.ReLU6):
    """torchvision's Conv2dNormActivation: conv (no bias, padding (k-1)/2), BatchNorm, activation (inplace)."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([activation(inplace=True)] if activation else []))


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: average pool, 1x1 fc1, activation, 1x1 fc2, scale activation, scale."""

    def __init__(self, channels, squeezed, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.activation, self.scale_activation = activation(), scale_activation()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class MobileNetV2Block(nn.Module):
    """MobileNetV2's InvertedResidual: 1x1 expand (absent at expand 1), depthwise 3x3 at ``stride`` (both
    conv-BN-ReLU6), 1x1 project conv-BN; ``x + block(x)`` at stride 1 with equal channels."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_norm_activation(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_norm_activation(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2():
    """Stride 1, 2, 1: from 2x2 the depthwise convs run at 2x2, 2x2 -> 1x1 and 1x1."""
    return nn.Sequential(MobileNetV2Block(8, 8, 1, 1), MobileNetV2Block(8, 12, 2, 2), MobileNetV2Block(12, 12, 1, 2))


class InPlaceResidual(nn.Module):
    """``result = self.block(x)``, then ``result += x`` (in place, as torchvision writes it) where
    ``use_res_connect``."""

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3Block(InPlaceResidual):
    """MobileNetV3's InvertedResidual: 1x1 expand, depthwise ``kernel`` (conv-BN-Hardswish), squeeze-excite with
    Hardsigmoid, 1x1 project conv-BN, ``result += input`` (in place, as torchvision writes it)."""

    def __init__(self, cin, expanded, cout, kernel, stride):
        super().__init__()
        self.block = nn.Sequential(
            conv_norm_activation(cin, expanded, 1, activation=nn.Hardswish),
            conv_norm_activation(expanded, expanded, kernel, stride, groups=expanded, activation=nn.Hardswish),
            SqueezeExcitation(expanded, 8, scale_activation=nn.Hardsigmoid),
            conv_norm_activation(expanded, cout, 1, activation=None))
        self.use_res_connect = stride == 1 and cin == cout


def mobilenet_v3():
    """Depthwise 5x5 (padding 2) at stride 1, 2, 1."""
    return nn.Sequential(MobileNetV3Block(8, 16, 8, 5, 1), MobileNetV3Block(8, 16, 12, 5, 2),
                         MobileNetV3Block(12, 24, 12, 5, 1))


class MBConv(InPlaceResidual):
    """EfficientNet's MBConv (torchvision): expand conv-BN-SiLU, depthwise conv-BN-SiLU, squeeze-excite (SiLU,
    sigmoid), project conv-BN, ``result += input`` at stride 1 (stochastic depth left out)."""

    def __init__(self, cin, cout, kernel, stride, expand=4):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            conv_norm_activation(cin, hidden, 1, activation=nn.SiLU),
            conv_norm_activation(hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), activation=nn.SiLU),
            conv_norm_activation(hidden, cout, 1, activation=None))
        self.use_res_connect = stride == 1 and cin == cout


def efficientnet():
    """A 3x3 MBConv without expansion (as EfficientNet's first), then a 5x5 one at stride 2."""
    return nn.Sequential(MBConv(8, 8, 3, 1, expand=1), MBConv(8, 12, 5, 2))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: LayerNorm over the channels of an NCHW tensor, in channels-last."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's CNBlock (torchvision): depthwise 7x7 padding 3 with bias, LayerNorm in channels-last,
    Linear-GELU-Linear, layer scale (away from torchvision's 1e-6, so the branch shows), ``result += input``."""

    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.empty(dim, 1, 1).uniform_(0.5, 1.5))

    def forward(self, x):
        result = self.layer_scale * self.block(x)
        result += x
        return result


def convnext():
    """Two blocks (2x2 and 1x1 from 2x2) around ConvNeXt's downsampling layer (LayerNorm2d, conv k2 s2)."""
    return nn.Sequential(ConvNeXtBlock(8), LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2), ConvNeXtBlock(16))


class ResNeXtBottleneck(nn.Module):
    """torchvision's Bottleneck with groups: 1x1, grouped 3x3 at ``stride`` (32 channels in 8 groups), 1x1,
    a projection shortcut where the shape changes, and one ReLU module called three times."""

    def __init__(self, channels=16, width=32, groups=8, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(channels, channels, 1, stride, bias=False),
                                         nn.BatchNorm2d(channels)) if stride != 1 else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def resnext():
    return nn.Sequential(ResNeXtBottleneck(stride=1), ResNeXtBottleneck(stride=2), ResNeXtBottleneck(stride=1))


class RegNetYBlock(nn.Module):
    """RegNet's ResBottleneckBlock with squeeze-excite (RegNetY, torchvision): a 1x1, b grouped 3x3 at
    ``stride`` with group width 8 (conv-BN-ReLU both), se (ReLU, sigmoid, a quarter of the input width),
    c 1x1 conv-BN; ``proj(x) + f(x)`` (``x + f(x)`` without projection), then ReLU."""

    def __init__(self, width_in, width_out, stride, group_width=8):
        super().__init__()
        self.proj = (conv_norm_activation(width_in, width_out, 1, stride, activation=None)
                     if width_in != width_out or stride != 1 else None)
        self.f = nn.Sequential()
        self.f.add_module("a", conv_norm_activation(width_in, width_out, 1, activation=nn.ReLU))
        self.f.add_module("b", conv_norm_activation(width_out, width_out, 3, stride, groups=width_out // group_width,
                                                    activation=nn.ReLU))
        self.f.add_module("se", SqueezeExcitation(width_out, max(1, round(0.25 * width_in))))
        self.f.add_module("c", conv_norm_activation(width_out, width_out, 1, activation=None))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.proj(x) + self.f(x) if self.proj is not None else x + self.f(x)
        return self.activation(x)


def regnet_y():
    return nn.Sequential(RegNetYBlock(16, 16, 1), RegNetYBlock(16, 24, 2), RegNetYBlock(24, 24, 1))


def channel_shuffle(x, groups):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


class ShuffleNetV2Unit(nn.Module):
    """ShuffleNetV2's InvertedResidual (torchvision): at stride 1 the channels split in two and the second half
    goes through 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; at stride 2 the whole input goes through that
    branch and through a depthwise 3x3-BN, 1x1-BN-ReLU branch; concatenation, channel shuffle."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, features = stride, cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                         nn.BatchNorm2d(cin), nn.Conv2d(cin, features, 1, bias=False),
                                         nn.BatchNorm2d(features), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else features, features, 1, bias=False), nn.BatchNorm2d(features),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3, stride, 1, groups=features, bias=False), nn.BatchNorm2d(features),
            nn.Conv2d(features, features, 1, bias=False), nn.BatchNorm2d(features), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def shufflenet_v2():
    return nn.Sequential(ShuffleNetV2Unit(8, 8, 1), ShuffleNetV2Unit(8, 16, 2), ShuffleNetV2Unit(16, 16, 1))


class IndexedInvertedResidual(nn.Module):
    """MobileNetV2's block with the depthwise conv, its BatchNorm and ReLU6 as direct children, and the expand
    and project stages nn.Sequentials whose layers forward calls by index (``self.expand[1](self.expand[0](x))``),
    as ported code often does."""

    def __init__(self, channels, stride, expand=2):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.dw_bn, self.dw_act = nn.BatchNorm2d(hidden), nn.ReLU6()
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.stride = stride

    def forward(self, x):
        out = self.expand[2](self.expand[1](self.expand[0](x)))
        out = self.dw_act(self.dw_bn(self.dw(out)))
        out = self.project[1](self.project[0](out))
        return x + out if self.stride == 1 else out


def indexed_mobilenet_v2():
    return nn.Sequential(IndexedInvertedResidual(8, 1), IndexedInvertedResidual(8, 2), IndexedInvertedResidual(8, 1))


class SkipFeatureEncoder(nn.Module):
    """A U-Net-style encoder: per stage ``skip = proj(x)`` (dense 1x1 at the stage's stride), kept in
    ``features`` for the decoder, then ``skip += dw(x)`` (depthwise 3x3, same stride) in place, so the kept
    feature holds the sum. Returns every stage's feature."""

    def __init__(self, channels=8, strides=(1, 2, 1)):
        super().__init__()
        self.projs = nn.ModuleList(nn.Conv2d(channels, channels, 1, stride) for stride in strides)
        self.dws = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride, 1, groups=channels) for stride in strides)

    def forward(self, x):
        features = []
        for proj, dw in zip(self.projs, self.dws):
            skip = proj(x)
            features.append(skip)
            skip += dw(x)
            x = skip
        return tuple(features)


class SamePad(nn.Module):
    """wav2vec2's SamePad: drops the last position an even kernel with padding k // 2 adds."""

    def __init__(self, kernel):
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, :-self.remove] if self.remove > 0 else x


class Wav2Vec2PositionalConv(nn.Module):
    """wav2vec2's positional conv embedding and the encoder's use of it (Hugging Face, weight norm left out):
    hidden [B, T, C] transposed to [B, C, T], conv1d kernel k, padding k // 2, 16 groups, SamePad, GELU,
    transposed back, added to hidden, LayerNorm."""

    def __init__(self, hidden=32, kernel=16, groups=16):
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=groups)
        self.padding, self.activation = SamePad(kernel), nn.GELU()
        self.layer_norm = nn.LayerNorm(hidden)

    def forward(self, hidden_states):
        position = self.activation(self.padding(self.conv(hidden_states.transpose(1, 2))))
        return self.layer_norm(hidden_states + position.transpose(1, 2))


class MambaConv(nn.Module):
    """The conv of Mamba's mixer (Hugging Face's slow path): in_proj to x and gate z, x as [B, C, L] through
    ``conv1d(x, w, b, padding=k-1, groups=C)[..., :L]`` (depthwise, causal, k4) and SiLU, gated by silu(z),
    out_proj."""

    def __init__(self, d_model=8, d_inner=16, kernel=4):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_inner)
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel, groups=d_inner, padding=kernel - 1)
        self.act = nn.SiLU()
        self.out_proj = nn.Linear(d_inner, d_model)

    def forward(self, hidden_states):
        length = hidden_states.shape[1]
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :length])
        return self.out_proj((x * F.silu(gate)).transpose(1, 2))


# ---------------------------------------------------------------------------------------------- the cases

# what gconvgen.fuse makes of each grouped conv in eval mode: (BatchNorm folded, activation absorbed), or None
# where no chain holds it (convert then takes it)
BN_RELU6, BN_HARDSWISH, BN_SILU, BN_RELU, BN_ONLY = ((True, "relu6"), (True, "hardswish"), (True, "silu"),
                                                    (True, "relu"), (True, None))


def images(channels):
    """A 2-D model's inputs: four images of 2x2 (its stride-2 stage makes 1x1 of them; a training-mode BatchNorm
    there normalizes four values a channel, as two would make its gradients too ill-conditioned for float32 to
    match) and one of 8x8 (one image keeps the interpreter's time down)."""
    return {"2x2-to-1x1": (4, channels, 2, 2), "8x8": (1, channels, 8, 8)}


# name: model, the fusion of its grouped convs, {input name: shape}, the smallest input first and the largest last
MODELS = {
    "mobilenetv2": (mobilenet_v2, BN_RELU6, images(8)),
    "mobilenetv3": (mobilenet_v3, BN_HARDSWISH, images(8)),
    "efficientnet": (efficientnet, BN_SILU, images(8)),
    "convnext": (convnext, None, images(8)),
    "resnext": (resnext, BN_ONLY, images(16)),
    "regnety": (regnet_y, BN_RELU, images(16)),
    "shufflenetv2": (shufflenet_v2, BN_ONLY, images(8)),
    "indexed-calls": (indexed_mobilenet_v2, BN_RELU6, images(8)),
    "inplace-skip": (SkipFeatureEncoder, None, images(8)),
    "wav2vec2-k16": (lambda: Wav2Vec2PositionalConv(kernel=16), None,
                     {"1-token": (2, 1, 32), "24-tokens": (2, 24, 32)}),
    "wav2vec2-k15": (lambda: Wav2Vec2PositionalConv(kernel=15), None,
                     {"3-tokens": (2, 3, 32), "24-tokens": (2, 24, 32)}),
    "mamba": (MambaConv, None, {"1-token": (2, 1, 8), "3-tokens": (2, 3, 8), "32-tokens": (2, 32, 8)}),
}


def cases(names=tuple(MODELS), inputs="all"):
    """(make_model, shape, fusion) params of the named models at their inputs: "all", "small" (all but the
    largest) or "large" (the largest)."""
    params = []
    for name in names:
        make_model, fusion, shapes = MODELS[name]
        chosen = list(shapes.items())
        chosen = {"all": chosen, "small": chosen[:-1], "large": chosen[-1:]}[inputs]
        params += [P(make_model, shape, fusion, id=f"{name}-{input_name}") for input_name, shape in chosen]
    return params


EVERY_MODEL = tuple(MODELS)
# indexed-calls is MobileNetV2 written for fuse's tracer: the other paths see the same convs as mobilenetv2
BUT_INDEXED = tuple(name for name in MODELS if name != "indexed-calls")
# the models with a chain for fuse (where nothing is fused, fuse then convert is convert)
FUSED = tuple(name for name, (_, fusion, _) in MODELS.items() if fusion is not None)
# the compile backend's training step, on the small inputs as each compile costs seconds: the models whose convs
# or epilogues differ (grouped, depthwise with bias, 1-D, activation fused in training), and inplace-skip at both
# inputs (its in-place add must stay one); mobilenetv2 trains under Inductor below
COMPILED_TRAINING = ("convnext", "resnext", "shufflenetv2", "inplace-skip", "wav2vec2-k16", "wav2vec2-k15", "mamba")


# ---------------------------------------------------------------------------------------------- helpers


def with_statistics(model):
    """``model`` with BatchNorm running statistics and affine parameters away from 0 and 1, so an eval forward
    (or a fold) that misses one of them shows."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model


def grouped_convs(model) -> list[str]:
    """The names of ``model``'s torch convs with groups > 1 (what every path hands to gconvgen)."""
    return [name for name, module in model.named_modules()
            if type(module) in (nn.Conv2d, nn.Conv1d) and module.groups > 1]


def outputs_of(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def assert_as_accurate(actual, eager, truth, what, scale=0.0):
    """gconvgen's float32 ``actual`` against the float64 ``truth``: within ATOL times the largest magnitude of
    the truth (or ``scale``, where larger) plus RTOL, or within EAGER_ERROR_FACTOR times float32 eager's error
    (``eager`` against ``truth``) where that is looser."""
    truth = truth.detach().double()
    assert actual.shape == truth.shape, (what, actual.shape, truth.shape)
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    eager_error = (eager.detach().double() - truth).abs().max().item()
    scale = max(truth.abs().max().item(), scale)
    atol = max(ATOL * scale, EAGER_ERROR_FACTOR * eager_error, 1e-7)
    torch.testing.assert_close(actual.detach().double(), truth, atol=atol, rtol=RTOL, msg=lambda message: (
        f"{what}: {message}\nfloat32 eager's max error: {eager_error:.3g}; largest magnitude {scale:.3g}"))


def models(make_model, shape, mode):
    """(gconvgen's copy, float32 eager, float64 eager) of one model in ``mode`` ("eval" or "train"), and an input."""
    original = with_statistics(make_model()).to(DTYPE)
    original.train(mode == "train")
    return copy.deepcopy(original), original, copy.deepcopy(original).double(), torch.randn(shape, dtype=DTYPE)


def assert_same_outputs(model, eager, truth, x):
    with torch.no_grad():
        actual, expected, exact = (outputs_of(net(input)) for net, input in
                                   ((model, x), (eager, x), (truth, x.double())))
    assert len(actual) == len(exact)
    for index, (out, out_eager, out_truth) in enumerate(zip(actual, expected, exact)):
        assert_as_accurate(out, out_eager, out_truth, f"output {index}")


def train_step(model, x, probes, parameters):
    """One SGD step (momentum, fresh optimizer) of ``model`` on loss = sum of mean(output * probe); returns the
    gradient of each of ``parameters`` (name: Parameter) before the step."""
    optimizer = torch.optim.SGD(parameters.values(), lr=LEARNING_RATE, momentum=MOMENTUM)
    loss = sum((out * probe.to(out.dtype)).mean() for out, probe in zip(outputs_of(model(x)), probes))
    loss.backward()
    missing = [name for name, parameter in parameters.items() if parameter.grad is None]
    assert not missing, f"no gradient reached {missing}"
    grads = {name: parameter.grad.detach().clone() for name, parameter in parameters.items()}
    optimizer.step()
    return grads


def assert_same_training_step(model, eager, truth, x, run=None):
    """One training step of ``model`` (called through ``run``, its compiled form, where given), of float32 eager
    and of float64 eager on the same input: every gradient, then every parameter and buffer after the step."""
    with torch.no_grad():
        probes = [torch.randn_like(out) for out in outputs_of(eager(x))]
    grads = train_step(model if run is None else run, x, probes, dict(model.named_parameters()))
    eager_grads = train_step(eager, x, probes, dict(eager.named_parameters()))
    exact_grads = train_step(truth, x.double(), probes, dict(truth.named_parameters()))
    assert list(grads) == list(exact_grads)
    # a gradient that is zero in exact arithmetic (a shift before a training-mode BatchNorm) is rounding noise
    # of the gradients flowing through the model: their largest magnitude scales the tolerance of every one
    largest = max(grad.abs().max().item() for grad in exact_grads.values())
    for name, exact in exact_grads.items():
        assert_as_accurate(grads[name], eager_grads[name], exact, f"gradient of {name}", scale=largest)
    states, eager_states = model.state_dict(), eager.state_dict()
    assert list(states) == list(truth.state_dict())
    for name, exact in truth.state_dict().items():
        if exact.is_floating_point():
            assert_as_accurate(states[name], eager_states[name], exact, f"{name} after the step")
        else:
            assert torch.equal(states[name], exact), name


@pytest.fixture
def launches(monkeypatch):
    """The kinds of gconvgen's kernels launched during the test (forward, grad_input, grad_weight, grad_bias)."""
    return spy_on_kernels(monkeypatch, lambda desc: desc.kind)


def assert_every_grouped_conv_ran(launches, convs, training):
    """One forward launch per grouped conv (each is called once; in training a grad-input may run as a forward
    kernel too), and the backward kernels in training."""
    assert convs, "the model has no grouped conv"
    forward = launches.count("forward")
    assert forward >= len(convs) if training else forward == len(convs), (
        f"{forward} forward launches for {len(convs)} grouped convs {convs}: {launches}")
    if training:
        assert "grad_weight" in launches, f"gconvgen's backward kernels did not run: {launches}"


def rewritten(model):
    """``model`` under torch.compile with the "gconvgen" backend's rewrite and aot_eager for the rest of the
    graph (what backend="gconvgen" does, without Inductor's C++ compiles, which cost seconds per graph)."""
    torch._dynamo.reset()
    return torch.compile(model, backend=gconvgen.integrations.compile.make_backend("aot_eager"), fullgraph=True)


# ---------------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("make_model, shape, fusion", cases(EVERY_MODEL))
def test_convert_eval_forward(make_model, shape, fusion, launches):
    model, eager, truth, x = models(make_model, shape, "eval")
    convs = grouped_convs(model)
    gconvgen.convert(model)
    assert [name for name, _ in model.gconvgen_report.replaced] == convs, str(model.gconvgen_report)
    assert_same_outputs(model, eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=False)


@pytest.mark.parametrize("make_model, shape, fusion", cases(BUT_INDEXED))
def test_convert_training_step(make_model, shape, fusion, launches):
    model, eager, truth, x = models(make_model, shape, "train")
    convs = grouped_convs(model)
    gconvgen.convert(model)
    assert [name for name, _ in model.gconvgen_report.replaced] == convs, str(model.gconvgen_report)
    assert_same_training_step(model, eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=True)


# ---------------------------------------------------------------------------------------------- fuse


def batch_norms(model) -> int:
    return sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


@pytest.mark.parametrize("make_model, shape, fusion", cases(FUSED) + cases(["convnext", "wav2vec2-k16"], "small"))
def test_fuse_eval_forward(make_model, shape, fusion, launches):
    """Eval mode: each grouped conv's chain fused as the model's structure says (BatchNorm folded, the
    activation after it absorbed), then convert for the convs no chain holds."""
    model, eager, truth, x = models(make_model, shape, "eval")
    convs = grouped_convs(model)
    assert gconvgen.fuse(model) is model
    report = model.gconvgen_fuse_report
    fused = dict(report.fused)
    if fusion is None:
        assert not fused, str(report)
    else:
        folds, activation = fusion
        assert sorted(fused) == sorted(convs), str(report)
        for name in convs:
            conv = model.get_submodule(name)
            assert type(conv) in (GroupedConv2d, GroupedConv1d) and conv.activation == activation, (name, conv)
        assert batch_norms(model) == batch_norms(eager) - (len(convs) if folds else 0)
    gconvgen.convert(model)
    assert not grouped_convs(model), "a grouped conv is left with torch"
    assert_same_outputs(model, eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=False)


@pytest.mark.parametrize("make_model, shape, fusion",
                         cases(["shufflenetv2"], "small") + cases(["wav2vec2-k15"], "large"))
def test_fuse_train_mode_training_step(make_model, shape, fusion, launches):
    """Training mode: BatchNorms need batch statistics, so they stay, and so do the activations after them
    (no conv of these models is followed by an activation directly); fuse keeps the parameters, and convert
    takes the grouped convs."""
    model, eager, truth, x = models(make_model, shape, "train")
    convs = grouped_convs(model)
    parameters_before = dict(model.named_parameters())
    gconvgen.fuse(model)
    report = model.gconvgen_fuse_report
    assert not report.fused, str(report)
    assert all("training mode" in why for _, why in report.skipped if "BatchNorm" in why), str(report)
    assert batch_norms(model) == batch_norms(eager)
    gconvgen.convert(model)
    assert dict(model.named_parameters()) == parameters_before
    assert_same_training_step(model, eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=True)


# ---------------------------------------------------------------------------------------------- compile backend


@pytest.mark.parametrize("make_model, shape, fusion",
                         cases(BUT_INDEXED, "small") + cases(["inplace-skip"], "large"))
def test_compile_backend_eval_forward(make_model, shape, fusion, launches):
    """The rewrite folds eval BatchNorms and fuses residual adds and activations into the conv calls."""
    model, eager, truth, x = models(make_model, shape, "eval")
    convs = grouped_convs(model)
    assert_same_outputs(rewritten(model), eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=False)


@pytest.mark.parametrize("make_model, shape, fusion", cases(COMPILED_TRAINING, "small")
                         + cases(["inplace-skip"], "large"))
def test_compile_backend_training_step(make_model, shape, fusion, launches):
    model, eager, truth, x = models(make_model, shape, "train")
    convs = grouped_convs(model)
    assert_same_training_step(model, eager, truth, x, run=rewritten(model))
    assert_every_grouped_conv_ran(launches, convs, training=True)


def mobilenet_v2_tail():
    """mobilenet_v2's last two blocks: 2x2 -> 1x1 at stride 2, then a residual block at 1x1."""
    return nn.Sequential(*list(mobilenet_v2())[1:])


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("make_model, shape, fusion", [
    P(mobilenet_v2_tail, images(8)["2x2-to-1x1"], BN_RELU6, id="mobilenetv2-tail-2x2-to-1x1"),
    *cases(["mamba"], "large")])
def test_gconvgen_backend_with_inductor(make_model, shape, fusion, mode, launches):
    """torch.compile(model, backend="gconvgen") as users write it: Inductor compiles the rest of the graph (a
    first run compiles its C++ for a minute and more; its cache in /tmp/torchinductor_$USER serves the next)."""
    model, eager, truth, x = models(make_model, shape, mode)
    convs = grouped_convs(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gconvgen", fullgraph=True)
    if mode == "eval":
        assert_same_outputs(compiled, eager, truth, x)
    else:
        assert_same_training_step(model, eager, truth, x, run=compiled)
    assert_every_grouped_conv_ran(launches, convs, training=mode == "train")


def weight_normed_positional_conv():
    """wav2vec2's positional conv as Hugging Face builds it: the weight a parametrization (weight norm over
    dim 2), computed from weight_g and weight_v on every forward."""
    model = Wav2Vec2PositionalConv(kernel=16)
    model.conv = nn.utils.parametrizations.weight_norm(model.conv, name="weight", dim=2)
    return model


@pytest.mark.parametrize("path", ["convert", "compile"])
def test_weight_normed_conv_trains_like_eager(path, launches):
    """convert may leave a parametrized conv to torch (its weight is no Parameter), but the model must train as
    before; the compile backend sees the computed weight and runs the conv."""
    model, eager, truth, x = models(weight_normed_positional_conv, (2, 24, 32), "train")
    run = None
    if path == "convert":
        gconvgen.convert(model)
    else:
        run = rewritten(model)
    assert_same_training_step(model, eager, truth, x, run=run)
    if path == "compile":
        assert_every_grouped_conv_ran(launches, ["conv"], training=True)
