"""The depthwise1d family (templates/depthwise1d.py.jinja): depthwise convs with a short (1, k) window, whose
programs read their input window once (main tile and halos) and form the taps with tl.gather. Forward
differential tests against torch.nn.functional.conv1d in float64, with tiles small enough that every case
spans several position tiles (so halos cross program boundaries), plus the planner's offer."""
from __future__ import annotations

import math

import pytest
import torch

import gconvgen
from gconvgen.ir import ConvSpec
from gconvgen.compiler.lowering import DEFAULT, KERNEL, Choice, KernelConfig, default_config, lower, window_halo
from gconvgen.autotune import suites
from gconvgen.autotune.space import DeviceFacts, load_space
from gconvgen.compiler.plan import plan
from gconvgen.autotune import choice
from gconvgen.runtime import launch
from conftest import assert_close, forward_family, spy_on_kernels
from test_conv1d import reference_conv1d, reference_padding

P = pytest.param

# batch, channels, multiplier, length, kernel, stride, padding, dilation, data_format
CASES = [
    P(2, 8, 1, 37, 4, 1, "causal", 1, "NCL", id="causal-k4"),                # Mamba's conv, uneven length
    P(2, 8, 1, 37, 4, 1, "causal", 1, "NLC", id="causal-k4-nlc"),
    P(2, 6, 1, 29, 2, 1, "causal", 1, "NCL", id="causal-k2"),
    P(2, 8, 1, 33, 3, 1, "causal", 2, "NLC", id="causal-dilation-2"),         # front halo of 4 positions
    P(2, 8, 1, 31, 3, 2, "same", 1, "NCL", id="same-stride-2"),              # main tile of 2 x BLOCK_M positions
    P(2, 8, 1, 30, 4, 2, "causal", 1, "NLC", id="causal-stride-2-nlc"),
    P(2, 7, 1, 26, 5, 1, 2, 1, "NCL", id="symmetric-k5"),                     # front and back halos
    P(1, 5, 1, 23, 3, 1, "valid", 1, "NLC", id="valid-back-halo-only"),
    P(2, 4, 2, 27, 4, 1, "causal", 1, "NCL", id="multiplier-2"),              # out channel c reads c // 2
    P(2, 4, 2, 27, 3, 1, "same", 1, "NLC", id="multiplier-2-nlc"),
    P(3, 9, 1, 19, 8, 1, (7, 0), 1, "NCL", id="k8-uneven-channels"),          # the longest window offered
    P(2, 8, 1, 12, 1, 1, 0, 1, "NCL", id="k1"),                               # no halo, one tap
]
SMALL = KernelConfig(8, 8, 0, num_warps=1, num_stages=1)  # several position tiles in every case


@pytest.fixture
def small_tiles(monkeypatch):
    """Run every forward kernel as depthwise1d with SMALL tiles (the choice a tuning record gives); yields the
    families that launched."""
    launched = spy_on_kernels(monkeypatch, forward_family)
    with choice.overridden(lambda spec, kind, *_: Choice(KERNEL, SMALL, "depthwise1d") if kind == "forward"
                           else DEFAULT, every_call=False):
        yield launched


def run_conv1d(batch, channels, multiplier, length, kernel, stride, padding, dilation, data_format, dtype,
               bias=True):
    """gconvgen.conv1d's depthwise output in the NCL order, and the float64 reference."""
    x = torch.randn(batch, channels, length, dtype=dtype)
    weight = torch.randn(channels * multiplier, 1, kernel, dtype=dtype)
    bias_tensor = torch.randn(channels * multiplier, dtype=dtype) if bias else None
    sides = reference_padding(padding, length, kernel, stride, dilation)
    expected = reference_conv1d(x, weight, bias_tensor, stride, sides, dilation, channels)
    if data_format == "NCL":
        out = gconvgen.conv1d(x, weight, bias_tensor, stride, padding, dilation, channels)
    else:  # [N, L, C] activations and the Keras weight [k, 1, C_out]
        out = gconvgen.conv1d(x.transpose(1, 2).contiguous(), weight.permute(2, 1, 0).contiguous(), bias_tensor,
                              stride, padding, dilation, channels, data_format="NLC").transpose(1, 2)
    return out, expected


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch, channels, multiplier, length, kernel, stride, padding, dilation, data_format", CASES)
def test_matches_torch(batch, channels, multiplier, length, kernel, stride, padding, dilation, data_format, bias,
                       small_tiles, nan_filled_outputs):
    out, expected = run_conv1d(batch, channels, multiplier, length, kernel, stride, padding, dilation, data_format,
                               torch.float32, bias)
    assert small_tiles == ["depthwise1d"]
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [P(CASES[1].values, id="causal-k4-nlc"), P(CASES[4].values, id="same-stride-2")])
def test_half_precision(case, dtype, small_tiles, nan_filled_outputs):
    out, expected = run_conv1d(*case, dtype)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


# channels, multiplier, (height, width), kernel, stride, padding (top, bottom, left, right), dilation; NCHW
CASES_2D = [
    P(8, 1, (7, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), id="k3"),                  # MobileNetV2
    P(8, 1, (9, 12), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), id="k3-stride-2"),
    P(7, 1, (8, 11), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), id="k5-uneven-channels"),  # EfficientNet
    P(8, 1, (10, 9), (3, 3), (1, 1), (2, 0, 1, 1), (2, 1), id="dilated-rows-top-padding-only"),
    P(4, 2, (6, 10), (3, 2), (2, 1), (0, 1, 1, 0), (1, 1), id="multiplier-2-even-width"),
    P(8, 1, (7, 9), (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), id="k7"),
]


@pytest.mark.parametrize("channels, multiplier, size, kernel, stride, padding, dilation", CASES_2D)
def test_two_dimensional_windows_row_by_row(channels, multiplier, size, kernel, stride, padding, dilation,
                                            small_tiles, nan_filled_outputs):
    """An NCHW 2-D depthwise conv with a short window along the width runs kernel row by kernel row, each
    input row's window read once; rows above and below the input are the padding."""
    x = torch.randn(2, channels, *size)
    weight, bias = torch.randn(channels * multiplier, 1, *kernel), torch.randn(channels * multiplier)
    out = gconvgen.conv2d(x, weight, bias, stride, padding, dilation, channels)
    top, bottom, left, right = padding
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x.double(), (left, right, top, bottom)),
                                          weight.double(), bias.double(), stride, 0, dilation, channels)
    assert small_tiles == ["depthwise1d"]
    assert_close(out, expected, torch.float32)


def test_default_tiles_and_a_two_dimensional_input(nan_filled_outputs):
    """The planner's default on an input of height 3 (every row its own 1-D conv) and an output row longer than
    one default interpreter tile."""
    x, weight, bias = torch.randn(2, 8, 3, 300), torch.randn(8, 1, 1, 4), torch.randn(8)
    out = gconvgen.conv2d(x, weight, bias, 1, (0, 0, 3, 0), 1, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x.double(), (3, 0)), weight.double(), bias.double(),
                                          groups=8)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("spec, offered", [
    P(ConvSpec(5120, 5120, 5120, (1, 4), padding=(0, 0, 3, 0), bias=True), True, id="mamba-causal"),
    P(ConvSpec(8, 16, 8, (1, 3), (1, 2), (0, 0, 1, 1)), True, id="multiplier-2-stride-2"),
    P(ConvSpec(8, 8, 8, (1, 9), padding=(0, 0, 4, 4)), False, id="k9-too-long"),
    P(ConvSpec(8, 8, 8, (3, 3), padding=(1, 1, 1, 1)), True, id="2-d-nchw"),
    P(ConvSpec(8, 8, 8, (3, 3), padding=(1, 1, 1, 1), layout="nhwc"), False, id="2-d-nhwc-direct"),
    P(ConvSpec(8, 8, 8, (7, 7), padding=(3, 3, 3, 3), dtype="bfloat16"), "after", id="2-d-k7-bf16-banded-first"),
    P(ConvSpec(8, 8, 8, (1, 3), (2, 1)), True, id="height-stride"),
    P(ConvSpec(8, 8, 8, (1, 3), (1, 3)), False, id="stride-3-not-a-power-of-two"),
    P(ConvSpec(8, 8, 8, (1, 3), padding=(0, 0, 5, 0)), False, id="padding-past-the-window"),
    P(ConvSpec(16, 16, 4, (1, 3)), False, id="grouped-not-depthwise"),
])
def test_the_planner_offers_it_for_short_windows_first_in_height_1_and_nchw(spec, offered):
    families = plan(spec).families
    if offered == "after":
        assert families[0] == "depthwise_gemm" and {"depthwise", "depthwise1d"} <= set(families)
    elif offered:
        assert families[0] == "depthwise1d" and {"depthwise", "depthwise_gemm"} <= set(families)
    else:
        assert "depthwise1d" not in families


@pytest.mark.parametrize("padding, kernel, stride, dilation, halo", [
    P((3, 0), 4, 1, 1, (3, 0), id="causal-k4"),       # three positions before, none after
    P((1, 1), 3, 1, 1, (1, 1), id="same-k3"),
    P((0, 0), 3, 1, 1, (0, 2), id="valid-k3"),
    P((1, 1), 3, 2, 1, (1, 0), id="stride-2"),        # the main tile of 2 x BLOCK_M reaches the last tap
    P((4, 0), 3, 1, 2, (4, 0), id="causal-dilation-2"),
    P((3, 4), 8, 1, 1, (3, 4), id="k8-asymmetric"),
])
def test_window_halo(padding, kernel, stride, dilation, halo):
    spec = ConvSpec(8, 8, 8, (1, kernel), (1, stride), (0, 0, *padding), (1, dilation))
    assert window_halo(spec) == halo
    # the halo covers every tap of every output of a tile, whatever BLOCK_M is
    for block_m in (8, 64):
        offsets = [j * stride + t * dilation - padding[0] for j in range(block_m) for t in range(kernel)]
        assert min(offsets) == -halo[0] and max(offsets) == block_m * stride + halo[1] - 1


def test_a_channel_tile_narrower_than_8_a_warp_is_refused():
    spec = ConvSpec(64, 64, 64, (1, 4), padding=(0, 0, 3, 0))
    with pytest.raises(ValueError, match=r"block_n=16 with num_warps=4 is not legal for the depthwise1d family"):
        lower(plan(spec), "forward", choice=Choice(KERNEL, KernelConfig(64, 16, 0, num_warps=4), "depthwise1d"),
              interpret=False, allow_tf32=False)
    with pytest.raises(ValueError, match="block_n=4 is not legal for the depthwise1d family"):
        lower(plan(spec), "forward", choice=Choice(KERNEL, KernelConfig(64, 4, 0, num_warps=1), "depthwise1d"),
              interpret=False, allow_tf32=False)


def test_default_gpu_tiles_keep_gathers_free_of_repeated_work():
    for layout in ("nchw", "nhwc"):
        for channels in (8, 24, 5120):
            spec = ConvSpec(channels, channels, channels, (1, 4), padding=(0, 0, 3, 0), layout=layout)
            config = default_config(spec, "depthwise1d", "forward", interpret=False)
            assert config.block_n >= 8 * config.num_warps and config.block_m * config.block_n <= 16 * 32 * config.num_warps
            assert math.log2(config.block_m).is_integer()


def test_gpu_space_offers_only_tiles_the_lowering_accepts():
    """Every candidate of the Mamba layer, both layouts, both stages: gathers with 8 channels a warp, tiles that
    fit one output row, and a description that lowers."""
    h200 = DeviceFacts("NVIDIA H200 sm_90", multiprocessors=132, shared_memory_bytes=232448, l2_bytes=60 << 20)
    layer = suites.load_suite("headline").select(("mamba-causal",)).layers[0]
    space = load_space("depthwise1d", "gpu")
    for layout in ("nchw", "nhwc"):
        problem = layer.problem("bfloat16", layout)
        first = space.stage_one(problem, h200)
        candidates = first + space.stage_two(first[:space.finalists], problem, h200)
        assert first and all(c.block_n >= 8 * c.num_warps and 512 <= c.block_m * c.block_n <= 4096 for c in candidates)
        for config in candidates:
            lower(plan(problem.spec), "forward", choice=Choice(KERNEL, config, "depthwise1d"), interpret=False,
                  allow_tf32=False)


@pytest.mark.parametrize("case", [P(CASES[0].values, id="causal-k4"), P(CASES[6].values, id="symmetric-k5")])
def test_64_bit_offsets(case, monkeypatch, small_tiles, nan_filled_outputs):
    """The i64 variant (a launch whose offsets pass int32) computes the same."""
    monkeypatch.setattr(launch, "needs_wide_index", lambda *_: True)
    out, expected = run_conv1d(*case, torch.float32)
    assert_close(out, expected, torch.float32)
