"""Differential tests: gconvgen.conv2d against torch.nn.functional.conv2d in float64, run through the
generated Triton kernels under the interpreter (fallbacks are errors, unwritten outputs stay NaN)."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gconvgen
from gconvgen import knobs, memo
from conftest import assert_close, forward_family, spy_on_kernels

P = pytest.param
# batch, in_channels, out_channels, (height, width), kernel, stride, padding, dilation, groups, policy, layout
CASES = [
    P(2, 12, 12, (9, 9), 3, 1, 1, 1, 3, "strict", "nchw", id="grouped"),
    P(2, 10, 20, (7, 7), 3, 1, 1, 1, 5, "strict", "channels_last", id="packed-groups-partial-block"),  # 4+1 groups
    P(2, 8, 8, (9, 9), 3, 1, 1, 1, 8, "strict", "nchw", id="depthwise"),
    P(2, 8, 16, (9, 9), 3, 1, 1, 1, 8, "strict", "channels_last", id="depthwise-multiplier-2"),
    P(2, 6, 8, (7, 7), 3, 1, 1, 1, 1, "strict", "nchw", id="groups-1"),
    P(2, 12, 11, (8, 8), 3, 1, 1, 1, 3, "pad", "nchw", id="uneven-out-pad"),          # C_out % groups != 0
    P(2, 11, 6, (8, 8), 3, 1, 1, 1, 3, "pad", "channels_last", id="uneven-in-pad"),   # C_in % groups != 0
    P(2, 4, 7, (6, 6), 3, 1, 1, 1, 4, "pad", "nchw", id="uneven-depthwise-pad"),     # depthwise, C_out % groups != 0
    P(2, 12, 12, (9, 9), 3, 1, 1, 1, 12, "pad", "nchw", id="divisible-pad"),          # pad == strict when divisible
    P(2, 12, 12, (9, 9), 3, 2, 1, 1, 3, "strict", "nchw", id="stride-2"),
    P(2, 8, 8, (10, 10), 3, 3, 1, 1, 8, "strict", "channels_last", id="stride-3-depthwise"),
    P(2, 8, 8, (9, 9), 3, 1, 2, 2, 2, "strict", "nchw", id="dilation-2"),
    P(2, 8, 8, (9, 9), 3, (2, 1), (1, 0), (2, 1), 8, "strict", "nchw", id="rect-stride-dilation"),
    P(2, 8, 8, (8, 7), 3, 1, (0, 2, 1, 0), 1, 4, "strict", "nchw", id="asymmetric-padding"),
    P(2, 8, 8, (8, 7), 3, 2, "same", 1, 4, "strict", "channels_last", id="same-stride-2"),
    P(2, 8, 8, (7, 8), 4, 2, "same", 1, 8, "strict", "nchw", id="same-stride-2-even-kernel-depthwise"),
    P(2, 8, 8, (7, 7), 3, 1, "valid", 1, 2, "strict", "nchw", id="valid"),
    P(2, 16, 16, (6, 6), 1, 1, 0, 1, 4, "strict", "channels_last", id="1x1"),
    P(2, 8, 8, (9, 9), 5, 1, 2, 1, 2, "strict", "nchw", id="5x5"),
    P(2, 8, 8, (9, 9), (1, 5), 1, (0, 2), 1, 8, "strict", "nchw", id="1x5-depthwise"),
    P(2, 8, 8, (3, 3), 5, 1, 1, 1, 2, "strict", "nchw", id="kernel-equals-padded-input"),
    P(1, 8, 8, (9, 9), 3, 1, 1, 1, 4, "strict", "nchw", id="batch-1"),
    P(2, 12, 12, (9, 9), 3, 1, 1, 1, 3, "strict", "view", id="non-contiguous-view"),
    P(2, 8, 8, (9, 9), 3, 1, 1, 1, 8, "strict", "strided", id="strided-depthwise"),
    P(2, 12, 12, (9, 9), 3, 2, 1, 1, 3, "pad", "strided", id="strided-grouped"),            # neither C nor W packed
    P(2, 12, 12, (9, 9), 3, 1, 1, 1, 3, "strict", "nhwc", id="nhwc-hwio"),
    P(2, 8, 16, (9, 9), 3, 2, "same", 1, 8, "strict", "nhwc", id="nhwc-hwio-depthwise-same"),
    P(2, 6, 6, (9, 11), 7, 1, 3, 1, 6, "strict", "channels_last", id="depthwise-7x7"),          # banded tensor-core form
    P(2, 4, 8, (8, 20), (7, 9), 1, "same", (1, 2), 4, "strict", "nchw",
      id="depthwise-7x9-dilated-multiplier-2"),  # a band with holes: dilation 2 along the width
    P(2, 4, 4, (5, 16), 7, 1, 3, 1, 4, "strict", "nchw", id="depthwise-7x7-aligned-rows"),  # rows read as vectors
]


def resolve_padding_for_reference(padding, size, kernel, stride, dilation):
    """(top, bottom, left, right), written out independently of gconvgen."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":  # TensorFlow: out = ceil(in / stride), the odd pixel after
        sides = []
        for n, k, s, d in zip(size, kernel, stride, dilation):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    if isinstance(padding, int):
        return (padding,) * 4
    return (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else tuple(padding)


def grouped_reference(x, weight, bias, stride, padding, dilation, groups):
    """The channel_policy='pad' definition, group by group, in float64: group g reads input channels
    [g*ci, (g+1)*ci) of the zero-padded input and writes outputs [g*co, (g+1)*co) clipped to C_out."""
    in_channels, out_channels = x.shape[1], weight.shape[0]
    ci, co = math.ceil(in_channels / groups), math.ceil(out_channels / groups)
    top, bottom, left, right = padding
    x64 = F.pad(x.double(), (left, right, top, bottom, 0, ci * groups - in_channels))
    outputs = []
    for g in range(groups):
        w_g = weight[g * co: min((g + 1) * co, out_channels)].double()
        b_g = None if bias is None else bias[g * co: min((g + 1) * co, out_channels)].double()
        outputs.append(F.conv2d(x64[:, g * ci:(g + 1) * ci], w_g, b_g, stride, 0, dilation))
    return torch.cat(outputs, dim=1)


def make_input(batch, channels, size, dtype, layout):
    height, width = size
    if layout == "view":  # a slice of a larger tensor: no dimension but W's is packed, and W's rows have gaps
        return torch.randn(batch + 1, channels + 3, height + 2, width + 5, dtype=dtype)[1:, 2:-1, 1:-1, 3:-2]
    if layout == "strided":  # every other column of channels_last storage: neither C nor W has unit stride
        full = torch.randn(batch, channels, height, 2 * width, dtype=dtype).to(memory_format=torch.channels_last)
        return full[..., ::2]
    if layout == "nhwc":  # NHWC storage, seen through an NCHW-indexed view
        return torch.randn(batch, height, width, channels, dtype=dtype).permute(0, 3, 1, 2)
    x = torch.randn(batch, channels, height, width, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy, layout",
                         CASES)
def test_matches_torch(batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy,
                       layout, bias, dtype, nan_filled_outputs):
    kernel, stride, dilation = (v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, dilation))
    x = make_input(batch, in_channels, size, dtype, layout)
    weight = torch.randn(out_channels, math.ceil(in_channels / groups), *kernel, dtype=dtype)
    bias_tensor = torch.randn(out_channels, dtype=dtype) if bias else None
    sides = resolve_padding_for_reference(padding, size, kernel, stride, dilation)
    expected = grouped_reference(x, weight, bias_tensor, stride, sides, dilation, groups)

    if layout == "nhwc":
        out = gconvgen.conv2d(x.permute(0, 2, 3, 1), weight.permute(2, 3, 1, 0), bias_tensor, stride, padding,
                              dilation, groups, channel_policy=policy, data_format="NHWC")
        assert out.is_contiguous(), "NHWC in must give contiguous NHWC out"
        out = out.permute(0, 3, 1, 2)
    else:
        out = gconvgen.conv2d(x, weight, bias_tensor, stride, padding, dilation, groups, channel_policy=policy)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


DEPTHWISE_CASES = [case for case in CASES if case.values[8] == case.values[1]]  # groups == in_channels


@pytest.fixture(params=["depthwise", "depthwise_gemm"])
def depthwise_family(request, monkeypatch):
    """Make ``request.param`` the planner's default for every depthwise conv (clearing the memos around it);
    yields it and the list of families that launched."""
    plan_module = importlib.import_module("gconvgen.compiler.plan")

    def select_kernel_family(graph, spec, budget):
        plan_module.select_kernel_family(graph, spec, budget)
        if request.param in graph.nodes[plan_module.CONV]["families"]:
            graph.nodes[plan_module.CONV]["family"] = request.param

    memo.reset()  # plans, descriptions and launches recorded under the unpatched planner
    monkeypatch.setattr(plan_module, "LOGICAL_PIPELINE", [
        (name, select_kernel_family if name == "select_kernel_family" else run_pass)
        for name, run_pass in plan_module.LOGICAL_PIPELINE])
    launched = spy_on_kernels(monkeypatch, forward_family)
    yield request.param, launched
    memo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy, layout",
                         DEPTHWISE_CASES)
def test_both_depthwise_families_match_torch(batch, in_channels, out_channels, size, kernel, stride, padding, dilation,
                                             groups, policy, layout, dtype, depthwise_family, nan_filled_outputs):
    """Every depthwise case through the direct kernel and through the banded tensor-core kernel."""
    family, launched = depthwise_family
    test_matches_torch(batch, in_channels, out_channels, size, kernel, stride, padding, dilation, groups, policy,
                       layout, True, dtype, nan_filled_outputs)
    assert launched == [family]


@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
def test_bias_view_with_a_stride(groups, nan_filled_outputs):
    x, weight = torch.randn(2, 8, 6, 6), torch.randn(8, 8 // groups, 3, 3)
    bias = torch.randn(16)[::2]  # every other element: stride 2
    out = gconvgen.conv2d(x, weight, bias, 1, 1, 1, groups)
    assert_close(out, F.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1, groups), torch.float32)


def test_integer_scalars_and_one_element_tuples_like_torch():
    x, weight = torch.randn(2, 8, 7, 7), torch.randn(8, 4, 3, 3)
    out = gconvgen.conv2d(x, weight, None, (2,), (1,), np.int64(1), np.int64(2))
    assert_close(out, F.conv2d(x.double(), weight.double(), None, (2,), (1,), 1, 2), torch.float32)


def test_matches_torch_padding_same_stride_1():
    """At stride 1 'same' is PyTorch's own rule too."""
    x, weight = torch.randn(2, 8, 7, 6), torch.randn(8, 2, 4, 3)
    out = gconvgen.conv2d(x, weight, None, 1, "same", (1, 2), 4)
    assert_close(out, F.conv2d(x.double(), weight.double(), None, 1, "same", (1, 2), 4), torch.float32)


def test_unbatched_input_like_torch():
    x, weight, bias = torch.randn(8, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(8)
    out = gconvgen.conv2d(x, weight, bias, 1, 1, 1, 2)
    assert_close(out, F.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1, 2), torch.float32)


def test_empty_batch_returns_empty_output():
    out = gconvgen.conv2d(torch.randn(0, 8, 9, 9), torch.randn(8, 1, 3, 3), None, 2, 1, 1, 8)
    assert out.shape == (0, 8, 5, 5)


def test_random_specs_fuzz(nan_filled_outputs):
    """Random grouped convs (fresh each run: see the seed in the header), both policies, all layouts."""
    generator = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    with knobs.scoped(PADDING_BUDGET=4.0):  # every uneven split runs; the budget's refusal is tested elsewhere
        for _ in range(8):
            _one_random_spec(generator)


def _one_random_spec(generator):
    """One random grouped conv of test_random_specs_fuzz against the per-group reference (or nothing, when
    it drew a conv that is refused or does not fit)."""
    pick = lambda low, high: int(torch.randint(low, high + 1, (), generator=generator))  # noqa: E731
    groups = pick(1, 4)
    policy = "pad" if pick(0, 1) else "strict"
    per_group_in = pick(1, 5)
    in_channels = groups * per_group_in - (pick(0, per_group_in - 1) if policy == "pad" else 0)
    out_channels = groups * pick(1, 4) - (pick(0, 1) if policy == "pad" else 0)
    if policy == "pad" and (in_channels <= (groups - 1) * math.ceil(in_channels / groups)
                            or out_channels <= (groups - 1) * math.ceil(out_channels / groups)):
        return  # a group would be empty: the planner refuses that (tested elsewhere)
    kernel, stride, dilation = (pick(1, 3), pick(1, 3)), (pick(1, 2), pick(1, 2)), (pick(1, 2), pick(1, 2))
    padding = tuple(pick(0, 2) for _ in range(4))
    size = (pick(4, 8), pick(4, 8))
    if any(n + padding[2 * i] + padding[2 * i + 1] < d * (k - 1) + 1
           for i, (n, k, d) in enumerate(zip(size, kernel, dilation))):
        return  # the window is larger than the padded input
    layout = ["nchw", "channels_last", "view"][pick(0, 2)]
    x = make_input(2, in_channels, size, torch.float32, layout)
    weight = torch.randn(out_channels, math.ceil(in_channels / groups), *kernel)
    bias = torch.randn(out_channels) if pick(0, 1) else None
    out = gconvgen.conv2d(x, weight, bias, stride, padding, dilation, groups, channel_policy=policy)
    expected = grouped_reference(x, weight, bias, stride, padding, dilation, groups)
    assert_close(out, expected, torch.float32)


def test_depthwise_weight_read_tap_major_whatever_its_strides(nan_filled_outputs):
    """The direct depthwise kernel reads the weight tap-major (runtime/weights.py): a TF/Keras HWIO view is
    read as it is, a contiguous or strided weight through a copy; an in-place write is seen by the next call."""
    from gconvgen.runtime import weights
    x = torch.randn(2, 8, 6, 6)
    expect = lambda w: F.conv2d(x.double(), w.detach().double(), None, 1, 1, 1, 8)  # noqa: E731
    hwio = torch.randn(3, 3, 1, 8)
    oihw = hwio.permute(3, 2, 0, 1)
    assert weights.layout_of(oihw) == "hwio" and weights.in_layout(oihw, "hwio") is oihw
    strided = torch.randn(8, 1, 6, 3)[:, :, ::2]  # rows 2 apart
    weight = torch.nn.Parameter(torch.randn(8, 1, 3, 3))
    with torch.no_grad():
        for w in (oihw, strided, weight):
            assert_close(gconvgen.conv2d(x, w, None, 1, 1, 1, 8), expect(w), torch.float32)
        weight.data.mul_(-2.0)  # a write the version counter does not see
        assert_close(gconvgen.conv2d(x, weight, None, 1, 1, 1, 8), expect(weight), torch.float32)


def test_grouped_weight_read_tap_major_whatever_its_strides(nan_filled_outputs):
    """The igemm forward reads the weight at literal strides: a Keras HWIO view and a channels_last (OHWI)
    weight as they are, packed narrow groups included; a contiguous weight through an HWIO copy that sees
    in-place writes."""
    from gconvgen.runtime import weights
    x = torch.randn(2, 12, 6, 6).contiguous(memory_format=torch.channels_last)
    expect = lambda w: F.conv2d(x.double(), w.detach().double(), None, 1, 1, 1, 3)  # noqa: E731
    hwio = torch.randn(3, 3, 4, 12)
    oihw = hwio.permute(3, 2, 0, 1)
    ohwi = torch.randn(12, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert weights.layout_of(oihw) == "hwio" and weights.layout_of(ohwi) == "ohwi"
    assert weights.layout_of(weights.in_layout(oihw.contiguous(), "hwio")) == "hwio"
    weight = torch.nn.Parameter(torch.randn(12, 4, 3, 3))
    with torch.no_grad():
        for w in (oihw, ohwi, weight):
            assert_close(gconvgen.conv2d(x, w, None, 1, 1, 1, 3), expect(w), torch.float32)
        weight.data.mul_(-2.0)  # a write the version counter does not see
        assert_close(gconvgen.conv2d(x, weight, None, 1, 1, 1, 3), expect(weight), torch.float32)


# batch, channels (x multiplier), length, kernel_w, stride, dilation, (left, right) padding, layout, dtype,
# block_m, block_k, whether the tile is one row's strips; the banded kernel forced with small tiles, its band
# blocks built in registers from the weight
BANDED_ROWS = [
    P(2, 3, 1, 4, 9, 1, 1, (8, 0), "nchw", "float32", 16, 16, True, id="strips-rows-shorter-than-the-window"),
    P(2, 3, 1, 1, 9, 1, 1, (8, 0), "nhwc", "float32", 16, 16, True, id="strips-one-token"),
    P(1, 2, 1, 61, 40, 1, 1, (39, 0), "nchw", "bfloat16", 16, 16, True, id="strips-halo-past-row"),  # 4 band steps
    P(3, 4, 1, 37, 20, 1, 1, (19, 0), "nhwc", "float16", 16, 16, True, id="strips-channels-last"),
    P(2, 3, 2, 70, 9, 1, 3, (11, 13), "nhwc", "float32", 16, 16, True, id="strips-dilated-multiplier"),
    P(1, 2, 1, 300, 33, 1, 1, (16, 16), "nchw", "float32", 16, 16, True, id="strips-tiles-of-a-long-row"),
    P(2, 4, 1, 290, 20, 1, 1, (19, 0), "nhwc", "bfloat16", 16, 16, True, id="strips-tiles-channels-last"),
    P(2, 3, 1, 29, 9, 1, 2, (4, 4), "nchw", "float64", 16, 16, True, id="strips-float64"),
    P(1, 2, 1, 64, 20, 1, 1, (5, 2), "nchw", "bfloat16", 16, 16, True, id="strips-aligned-rows-band-shift-3"),
    P(2, 3, 1, 59, 9, 2, 1, (4, 4), "nchw", "float16", 16, 16, False, id="flat-stride-2"),
    P(2, 4, 1, 45, 5, 3, 2, (3, 3), "nhwc", "float32", 32, 16, False, id="flat-stride-3-dilated"),
    # windows past STRIP_WINDOW (128 columns) take the wide tile (the main tile's strips and as many again), past
    # twice that flat tiles at stride 1 too
    P(2, 2, 1, 150, 130, 1, 1, (129, 0), "nchw", "bfloat16", 16, 16, "wide", id="wide-causal-k130"),
    P(1, 3, 1, 140, 65, 1, 2, (64, 64), "nhwc", "float32", 16, 16, "wide", id="wide-dilated-window-129-wide"),
    P(2, 3, 1, 300, 256, 1, 1, (255, 0), "nhwc", "bfloat16", 16, 16, "wide", id="wide-causal-k256-channels-last"),
    P(1, 2, 1, 400, 65, 1, 5, (320, 0), "nchw", "bfloat16", 16, 16, False, id="flat-dilated-window-321-wide"),
]


@pytest.mark.parametrize("batch, channels, multiplier, length, kernel_w, stride, dilation, padding, layout, dtype, "
                         "block_m, block_k, strips", BANDED_ROWS)
def test_banded_rows_match_torch(batch, channels, multiplier, length, kernel_w, stride, dilation, padding, layout,
                                 dtype, block_m, block_k, strips, nan_filled_outputs, monkeypatch):
    """conv1d on the banded kernel, both tilings of its rows: one row's consecutive strips with the input loaded
    once and each band step's tile gathered from it (families.depthwise_gemm.strip_rows: a height-1 window at
    stride 1 of at most 2 x STRIP_WINDOW columns, past STRIP_WINDOW from the wide tile), or strips of any rows, each
    step's tile loaded. Rows shorter than a
    tile or than the window, halos past the row's end, several tiles a row, dilation, channel multipliers; every
    output written."""
    from gconvgen.autotune import choice
    from gconvgen.compiler.families.depthwise_gemm import strip_rows
    from gconvgen.compiler.lowering import Choice, KERNEL, KernelConfig
    torch_dtype = getattr(torch, dtype)
    # the float64 reference of the values the kernel is given (rounded to dtype): a 256-tap window's sum of input
    # rounding errors alone passes bfloat16's tolerance now and then
    x, weight, bias = (torch.randn(*shape, dtype=torch.float64).to(torch_dtype).double() for shape in (
        (batch, channels, length), (channels * multiplier, 1, kernel_w), (channels * multiplier,)))
    expected = F.conv1d(F.pad(x, padding), weight, bias, stride=stride, dilation=dilation, groups=channels)
    config = KernelConfig(block_m, 2, block_k, num_warps=1, num_stages=1)
    launched = spy_on_kernels(monkeypatch, lambda desc: desc if desc.kind == "forward" else None)
    nlc = layout == "nhwc"
    with choice.overridden(lambda spec, kind, *_: Choice(KERNEL, config, "depthwise_gemm")):
        out = gconvgen.conv1d(x.to(torch_dtype).transpose(1, 2).contiguous() if nlc else x.to(torch_dtype),
                              weight.to(torch_dtype).permute(2, 1, 0) if nlc else weight.to(torch_dtype),
                              bias.to(torch_dtype), stride=stride, padding=padding, dilation=dilation,
                              groups=channels, data_format="NLC" if nlc else "NCL")
    (desc,) = launched
    assert desc.family == "depthwise_gemm" and desc.weight_layout == "strided"
    assert strip_rows(desc.spec, "forward") == bool(strips) and (desc.halo_tile > 0) == bool(strips)
    # the wide tile: a halo tile as long as the main tile, loaded with it as one
    assert (desc.halo_tile == desc.config.block_m) == (strips == "wide")
    assert desc.band_dot == ("channels" if nlc else "rows")  # channels_last memory: the dot batched over channels
    # 16-byte aligned rows start each strip's band on an aligned column, band_shift columns early
    assert desc.band_shift == (-padding[0] % desc.row_alignment if not nlc else 0)
    out = out.transpose(1, 2) if nlc else out
    if torch_dtype == torch.float64:
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    else:
        assert_close(out, expected, torch_dtype)


# batch, channels, multiplier, (H, W), kernel, stride, dilation, padding (top, bottom, left, right), block_m, rows
DIRECT_ROWS = [
    P(2, 5, 1, (6, 9), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 16, True, id="row-shorter-than-the-tile"),
    P(1, 4, 1, (3, 1), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 16, True, id="row-one-pixel-wide"),
    P(2, 3, 2, (5, 40), (2, 5), (2, 1), (1, 2), (0, 1, 4, 1), 16, True, id="row-tiles-dilated-multiplier"),
    P(1, 6, 1, (4, 37), (1, 7), (1, 1), (1, 1), (0, 0, 6, 0), 32, True, id="row-halo-past-the-row"),
    P(2, 4, 1, (3, 20), (3, 9), (1, 1), (1, 3), (1, 1, 12, 12), 16, True, id="row-halo-of-several-tiles"),
    P(2, 4, 1, (7, 9), (3, 3), (1, 2), (1, 1), (1, 1, 1, 1), 16, False, id="flat-stride-2"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch, channels, multiplier, size, kernel, stride, dilation, padding, block_m, rows",
                         DIRECT_ROWS)
def test_direct_depthwise_row_tiles_match_torch(batch, channels, multiplier, size, kernel, stride, dilation, padding,
                                                block_m, rows, dtype, nan_filled_outputs, monkeypatch):
    """The direct depthwise forward in channels_last, both tilings: one output row's consecutive pixels, each
    kernel row's input loaded once and each tap's tile gathered from it (families.depthwise.row_tiles: stride 1
    along the width), or pixels of any rows. Rows narrower than the tile, one pixel wide, halos past the row's
    end and past several tiles, dilation, channel multipliers; every output written, NaN where torch's is."""
    from gconvgen.autotune import choice
    from gconvgen.compiler.families.depthwise import row_tiles
    from gconvgen.compiler.lowering import Choice, KERNEL, KernelConfig
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(batch, channels, *size, dtype=torch.float64)
    x[0, 0, size[0] // 2, size[1] // 2] = float("nan")
    x[-1, -1, 0, -1] = float("inf")
    weight = torch.randn(channels * multiplier, 1, *kernel, dtype=torch.float64)
    expected = F.conv2d(F.pad(x, (padding[2], padding[3], padding[0], padding[1])), weight, None, stride, 0, dilation,
                        channels)
    config = KernelConfig(block_m, 4, 0, num_warps=1, num_stages=1)
    launched = spy_on_kernels(monkeypatch, lambda desc: desc if desc.kind == "forward" else None)
    with choice.overridden(lambda spec, kind, *_: Choice(KERNEL, config, "depthwise")):
        out = gconvgen.conv2d(x.to(torch_dtype).contiguous(memory_format=torch.channels_last),
                              weight.to(torch_dtype), None, stride, padding, dilation, channels)
    (desc,) = launched
    assert desc.family == "depthwise" and row_tiles(desc.spec, "forward", desc.config) == rows and (desc.halo_tile > 0) == rows
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert_close(out[finite], expected[finite], torch_dtype)


def test_one_channel_rows_padded_past_the_width_are_not_read_as_vectors(nan_filled_outputs):
    """A one-channel NCHW view whose rows are padded (row stride 64, width 57) has aligned row starts but not an
    aligned width: the banded kernel's vector loads would read the padding (NaN here), so the launch's row
    alignment counts the width whatever the channel stride (runtime/launch.py _aligned_row_values)."""
    base = torch.full((2, 1, 6, 64), float("nan"), dtype=torch.bfloat16)
    base[..., :57] = torch.randn(2, 1, 6, 57, dtype=torch.bfloat16)
    x, weight = base[..., :57], torch.randn(1, 1, 7, 7, dtype=torch.bfloat16)
    out = gconvgen.conv2d(x, weight, None, 1, (3, 3, 3, 10), 1, 1)  # 64 output columns: aligned output rows
    assert_close(out, F.conv2d(F.pad(x.double(), (3, 10, 3, 3)), weight.double(), None, 1, 0), torch.bfloat16)
