"""End-to-end model checks: blocks of real architectures, written by hand after torchvision and Hugging Face
transformers (neither is installed beside this torch), with small channel counts, run through the three user
paths and compared with eager torch.

    convert   gconvgen.convert(model): eval forward, and one training step (loss.backward, an SGD step)
    fuse      gconvgen.fuse(model.eval()) (then convert for the grouped convs no chain holds): eval forward;
              fuse in training mode (activations only, BatchNorms stay): one training step
    compile   torch.compile(model, backend="gconvgen", fullgraph=True) (Inductor for the rest): eval
              forward, and one training step

Ground truth is a float64 copy of the model run by eager torch; gconvgen's float32 result must be as close to it
as TOLERANCES[float32] allows (relative to the result's largest magnitude) or as four times float32 eager
torch's own error, whichever is looser. A training step compares every parameter's gradient, then the
parameters and buffers after the step. Each 2-D model runs at an input whose last stages are 2x2 and 1x1 (a
stack of stride-2 stages from 4x4) and at 16x16; the 1-D ones at a few tokens (one included) and at more.
Every test also asserts that gconvgen's kernels ran, one forward launch per grouped conv call.
"""
from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import gconvgen
import gconvgen.compile
from gconvgen import GroupedConv1d, GroupedConv2d
from conftest import TOLERANCES, spy_on_kernels

P = pytest.param
DTYPE, (ATOL, RTOL) = torch.float32, TOLERANCES[torch.float32]
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
    """Stride 1, 2, 1, 2, 1: from 4x4 the depthwise convs run at 4x4, 4x4 -> 2x2, 2x2, 2x2 -> 1x1 and 1x1."""
    return nn.Sequential(MobileNetV2Block(8, 8, 1, 1), MobileNetV2Block(8, 8, 2, 2), MobileNetV2Block(8, 8, 1, 2),
                         MobileNetV2Block(8, 12, 2, 2), MobileNetV2Block(12, 12, 1, 2))


class MobileNetV3Block(nn.Module):
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

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


def mobilenet_v3():
    """Depthwise 5x5 (padding 2) at stride 1, 2, 2, 1: from 4x4 down to 1x1."""
    return nn.Sequential(MobileNetV3Block(8, 16, 8, 5, 1), MobileNetV3Block(8, 16, 8, 5, 2),
                         MobileNetV3Block(8, 24, 8, 5, 2), MobileNetV3Block(8, 24, 8, 5, 1))


class MBConv(nn.Module):
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

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


def efficientnet():
    return nn.Sequential(MBConv(8, 8, 3, 1), MBConv(8, 8, 3, 2), MBConv(8, 8, 5, 2), MBConv(8, 8, 5, 1))


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
    """Blocks at 4x4, 2x2 and 1x1 (from 4x4) between ConvNeXt's downsampling layers (LayerNorm2d, conv k2 s2)."""
    return nn.Sequential(ConvNeXtBlock(8), LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 8, 2, 2), ConvNeXtBlock(8),
                         LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2), ConvNeXtBlock(16))


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
    return nn.Sequential(ResNeXtBottleneck(stride=1), ResNeXtBottleneck(stride=2), ResNeXtBottleneck(stride=2),
                         ResNeXtBottleneck(stride=1))


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
    return nn.Sequential(RegNetYBlock(16, 16, 1), RegNetYBlock(16, 24, 2), RegNetYBlock(24, 24, 2),
                         RegNetYBlock(24, 24, 1))


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
    return nn.Sequential(ShuffleNetV2Unit(8, 16, 2), ShuffleNetV2Unit(16, 16, 1), ShuffleNetV2Unit(16, 16, 2),
                         ShuffleNetV2Unit(16, 16, 1))


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
    return nn.Sequential(IndexedInvertedResidual(8, 1), IndexedInvertedResidual(8, 2), IndexedInvertedResidual(8, 2),
                         IndexedInvertedResidual(8, 1))


class SkipFeatureEncoder(nn.Module):
    """A U-Net-style encoder: per stage ``skip = proj(x)`` (dense 1x1 at the stage's stride), kept in
    ``features`` for the decoder, then ``skip += dw(x)`` (depthwise 3x3, same stride) in place, so the kept
    feature holds the sum. Returns every stage's feature."""

    def __init__(self, channels=8, strides=(1, 2, 2)):
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
# where no chain holds it (it is then converted)
BN_RELU6, BN_HARDSWISH, BN_SILU, BN_RELU, BN_ONLY = (True, "relu6"), (True, "hardswish"), (True, "silu"), \
    (True, "relu"), (True, None)

# model, input shape, the fusion of its grouped convs
MODELS = [
    P(mobilenet_v2, (2, 8, 4, 4), BN_RELU6, id="mobilenetv2-4x4-to-1x1"),
    P(mobilenet_v2, (2, 8, 16, 16), BN_RELU6, id="mobilenetv2-16x16"),
    P(mobilenet_v3, (2, 8, 4, 4), BN_HARDSWISH, id="mobilenetv3-4x4-to-1x1"),
    P(mobilenet_v3, (2, 8, 16, 16), BN_HARDSWISH, id="mobilenetv3-16x16"),
    P(efficientnet, (2, 8, 4, 4), BN_SILU, id="efficientnet-4x4-to-1x1"),
    P(efficientnet, (2, 8, 16, 16), BN_SILU, id="efficientnet-16x16"),
    P(convnext, (2, 8, 4, 4), None, id="convnext-4x4-to-1x1"),
    P(convnext, (2, 8, 16, 16), None, id="convnext-16x16"),
    P(resnext, (2, 16, 4, 4), BN_ONLY, id="resnext-4x4-to-1x1"),
    P(resnext, (2, 16, 16, 16), BN_ONLY, id="resnext-16x16"),
    P(regnet_y, (2, 16, 4, 4), BN_RELU, id="regnety-4x4-to-1x1"),
    P(regnet_y, (2, 16, 16, 16), BN_RELU, id="regnety-16x16"),
    P(shufflenet_v2, (2, 8, 4, 4), BN_ONLY, id="shufflenetv2-4x4-to-1x1"),
    P(shufflenet_v2, (2, 8, 16, 16), BN_ONLY, id="shufflenetv2-16x16"),
    P(indexed_mobilenet_v2, (2, 8, 4, 4), BN_RELU6, id="indexed-calls-4x4-to-1x1"),
    P(indexed_mobilenet_v2, (2, 8, 16, 16), BN_RELU6, id="indexed-calls-16x16"),
    P(SkipFeatureEncoder, (2, 8, 4, 4), None, id="inplace-skip-4x4-to-1x1"),
    P(SkipFeatureEncoder, (2, 8, 16, 16), None, id="inplace-skip-16x16"),
    P(lambda: Wav2Vec2PositionalConv(kernel=16), (2, 1, 32), None, id="wav2vec2-k16-1-token"),
    P(lambda: Wav2Vec2PositionalConv(kernel=16), (2, 24, 32), None, id="wav2vec2-k16-24-tokens"),
    P(lambda: Wav2Vec2PositionalConv(kernel=15), (2, 3, 32), None, id="wav2vec2-k15-3-tokens"),
    P(lambda: Wav2Vec2PositionalConv(kernel=15), (2, 24, 32), None, id="wav2vec2-k15-24-tokens"),
    P(MambaConv, (2, 1, 8), None, id="mamba-1-token"),
    P(MambaConv, (2, 3, 8), None, id="mamba-3-tokens"),
    P(MambaConv, (2, 32, 8), None, id="mamba-32-tokens"),
]


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


def assert_as_accurate(actual, eager, truth, what):
    """gconvgen's float32 ``actual`` against the float64 ``truth``: within ATOL times the truth's largest
    magnitude (or EAGER_ERROR_FACTOR times float32 eager's error ``eager``, where looser) plus RTOL."""
    truth = truth.detach().double()
    assert actual.shape == truth.shape, (what, actual.shape, truth.shape)
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    eager_error = (eager.detach().double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    atol = max(ATOL * scale, EAGER_ERROR_FACTOR * eager_error, 1e-7)
    torch.testing.assert_close(actual.detach().double(), truth, atol=atol, rtol=RTOL, msg=lambda message: (
        f"{what}: {message}\nfloat32 eager's max error: {eager_error:.3g}; largest magnitude {scale:.3g}"))


def eval_triple(make_model, shape):
    """(gconvgen's copy, float32 eager, float64 eager) of one model in eval mode, and an input."""
    original = with_statistics(make_model()).eval()
    return copy.deepcopy(original), original, copy.deepcopy(original).double(), torch.randn(shape)


def assert_same_outputs(model, eager, truth, x):
    with torch.no_grad():
        actual, expected, exact = (outputs_of(net(input)) for net, input in
                                   ((model, x), (eager, x), (truth, x.double())))
    assert len(actual) == len(exact)
    for index, (out, out_eager, out_truth) in enumerate(zip(actual, expected, exact)):
        assert_as_accurate(out, out_eager, out_truth, f"output {index}")


def train_step(model, x, probes, parameters=None):
    """One SGD step (momentum, fresh optimizer) on loss = sum of mean(output * probe); returns each named
    parameter's gradient (before the step)."""
    parameters = dict(parameters if parameters is not None else model.named_parameters())
    optimizer = torch.optim.SGD(parameters.values(), lr=LEARNING_RATE, momentum=MOMENTUM)
    outputs = outputs_of(model(x))
    loss = sum((out * probe.to(out.dtype)).mean() for out, probe in zip(outputs, probes))
    loss.backward()
    grads = {name: parameter.grad.detach().clone() for name, parameter in parameters.items()}
    optimizer.step()
    return grads


def assert_same_training_step(model, eager, truth, x, run=None):
    """One training step of ``model`` (through ``run``, e.g. its compiled form), of float32 eager and of
    float64 eager on the same input: every gradient, then every parameter and buffer after the step."""
    with torch.no_grad():
        probes = [torch.randn_like(out) for out in outputs_of(eager(x))]
    grads = train_step(run or model, x, probes, model.named_parameters())
    eager_grads = train_step(eager, x, probes)
    exact_grads = train_step(truth, x.double(), probes)
    assert list(grads) == list(exact_grads)
    for name, exact in exact_grads.items():
        assert_as_accurate(grads[name], eager_grads[name], exact, f"gradient of {name}")
    states, eager_states = model.state_dict(), eager.state_dict()
    for name, exact in truth.state_dict().items():
        if exact.is_floating_point():
            assert_as_accurate(states[name], eager_states[name], exact, f"{name} after the step")
        else:
            assert torch.equal(states[name], exact), name


def train_triple(make_model, shape):
    """(gconvgen's copy, float32 eager, float64 eager) of one model in training mode, and an input."""
    original = with_statistics(make_model()).train()
    return copy.deepcopy(original), original, copy.deepcopy(original).double(), torch.randn(shape)


@pytest.fixture
def launches(monkeypatch):
    """The kinds of gconvgen's kernels launched during the test (forward, grad_input, grad_weight, grad_bias)."""
    return spy_on_kernels(monkeypatch, lambda desc: desc.kind)


def assert_every_grouped_conv_ran(launches, convs, training):
    assert convs, "the model has no grouped conv"
    assert launches.count("forward") >= len(convs), (
        f"{launches.count('forward')} forward launches for {len(convs)} grouped convs: {convs}")
    if training:
        assert "grad_weight" in launches, f"gconvgen's backward kernels did not run: {launches}"


def compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, backend="gconvgen", fullgraph=True)


# ---------------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("make_model, shape, fusion", MODELS)
def test_convert_eval_forward(make_model, shape, fusion, launches):
    model, eager, truth, x = eval_triple(make_model, shape)
    convs = grouped_convs(model)
    gconvgen.convert(model)
    assert [name for name, _ in model.gconvgen_report.replaced] == convs, str(model.gconvgen_report)
    assert_same_outputs(model, eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=False)


@pytest.mark.parametrize("make_model, shape, fusion", MODELS)
def test_convert_training_step(make_model, shape, fusion, launches):
    model, eager, truth, x = train_triple(make_model, shape)
    convs = grouped_convs(model)
    gconvgen.convert(model)
    assert [name for name, _ in model.gconvgen_report.replaced] == convs, str(model.gconvgen_report)
    assert_same_training_step(model, eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=True)


# ---------------------------------------------------------------------------------------------- fuse


def batch_norms(model) -> int:
    return sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


@pytest.mark.parametrize("make_model, shape, fusion", MODELS)
def test_fuse_eval_forward(make_model, shape, fusion, launches):
    """Eval mode: each grouped conv's chain fused as the model's structure says (BatchNorm folded, the
    activation after it absorbed), then convert for the convs no chain holds."""
    model, eager, truth, x = eval_triple(make_model, shape)
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


TRAIN_MODE_FUSE = [case for case in MODELS if case.id.endswith(("16x16", "24-tokens", "32-tokens"))]


@pytest.mark.parametrize("make_model, shape, fusion", TRAIN_MODE_FUSE)
def test_fuse_train_mode_training_step(make_model, shape, fusion, launches):
    """Training mode: BatchNorms need batch statistics, so they stay, and so do the activations after them;
    fuse keeps the parameters (names and tensors), and convert takes the grouped convs it left."""
    model, eager, truth, x = train_triple(make_model, shape)
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


@pytest.mark.parametrize("make_model, shape, fusion", MODELS)
def test_compile_backend_eval_forward(make_model, shape, fusion, launches):
    model, eager, truth, x = eval_triple(make_model, shape)
    convs = grouped_convs(model)
    assert_same_outputs(compiled(model), eager, truth, x)
    assert_every_grouped_conv_ran(launches, convs, training=False)


@pytest.mark.parametrize("make_model, shape, fusion", MODELS)
def test_compile_backend_training_step(make_model, shape, fusion, launches):
    model, eager, truth, x = train_triple(make_model, shape)
    convs = grouped_convs(model)
    assert_same_training_step(model, eager, truth, x, run=compiled(model))
    assert_every_grouped_conv_ran(launches, convs, training=True)
