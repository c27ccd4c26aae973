"""The banded depthwise grad-input at a stride (families/depthwise_gemm.py strided_grad_input,
templates/depthwise_gemm_grad_input.py.jinja): the transposed conv slides down grad_out's rows on tensor cores,
each grad_out row loaded once for every kernel row, a group of stride_h input-gradient rows stored a step. Its
named edges against torch's float64 gradient (every element written), when the default takes it, and what it
does for sm_90. The property-based fuzz forces it too (tests/test_fuzz.py test_gradients_banded_grad_input)."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

import torch.nn.functional as F

import gconvgen
from conftest import assert_close, reference_conv2d, spy_on_kernels
from gconvgen.compiler.families import depthwise_gemm
from gconvgen.compiler.lowering import KERNEL, Choice
from gconvgen.compiler.plan import grad_input_offers, plan
from gconvgen.compiler.tiles import KernelConfig
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from test_sm90_compile import compiled_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# channels, batch, (H, W) of x, kernel, stride, padding (top, bottom, left, right), dilation, layout, config:
# MobileNetV2's dw3 at stride 2 on an odd map; EfficientNet's dw5 at stride 2, 20 row groups in 7 blocks of 3;
# a window narrower than the stride (rows and columns no tap reaches); stride 3 x 4 with a padding past the
# reach; a dilated window at stride 2 along the height only; one input row; 3 images x 6 strips in two tiles of
# 32 triples; a 7-row window at stride 2 (7 open rows) in strips of 32; widths strided by 8 and 16 (a strip of
# 16 columns reads 2 or 1 grad_out columns and the window's reach)
CASES = [
    (4, 2, (9, 11), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "nhwc", KernelConfig(16, 4, 16, num_stages=1)),
    (3, 1, (40, 21), (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), "nchw", KernelConfig(16, 1, 16, num_stages=1)),
    (2, 2, (13, 17), (1, 1), (3, 2), (0, 0, 0, 0), (1, 1), "nhwc", KernelConfig(16, 2, 16, num_stages=1)),
    (2, 2, (14, 37), (2, 5), (3, 4), (3, 0, 5, 1), (1, 1), "nchw", KernelConfig(16, 2, 16, num_stages=1)),
    (3, 1, (20, 12), (3, 2), (2, 1), (2, 2, 1, 0), (2, 1), "nhwc", KernelConfig(16, 2, 16, num_stages=1)),
    (2, 2, (1, 30), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "nchw", KernelConfig(16, 2, 16, num_stages=1)),
    (2, 3, (6, 90), (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), "nhwc", KernelConfig(32, 2, 16, num_stages=1)),
    (2, 1, (17, 35), (7, 3), (2, 2), (3, 3, 1, 1), (1, 1), "nchw", KernelConfig(16, 1, 32, num_stages=1)),
    (2, 1, (5, 70), (3, 3), (1, 8), (1, 1, 1, 1), (1, 1), "nchw", KernelConfig(16, 1, 16, num_stages=1)),
    (2, 2, (4, 50), (2, 5), (2, 16), (0, 0, 2, 2), (1, 1), "nhwc", KernelConfig(16, 2, 32, num_stages=1)),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("channels, batch, size, kernel, stride, padding, dilation, layout, config", CASES)
def test_strided_grad_input_on_the_band_matches_torch(channels, batch, size, kernel, stride, padding, dilation,
                                                      layout, config, dtype, nan_filled_outputs):
    generator = torch.Generator().manual_seed(hash((channels, size, kernel)) % 2**31)
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(batch, channels, *size, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(channels, 1, *kernel, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    out = reference_conv2d(x, weight.double(), None, stride, padding, dilation, channels)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    (expected,) = torch.autograd.grad(out, x, grad_out.double())
    spec = ConvSpec(channels, channels, channels, kernel, stride, padding, dilation, False, dtype, layout)
    grad_x = torch.empty(x.shape, dtype=DTYPES[dtype]).contiguous(memory_format=memory)
    prepared = launch.prepare_grad_input(spec, grad_out.contiguous(memory_format=memory), weight, grad_x,
                                         Choice(KERNEL, config, "depthwise_gemm"))
    assert prepared.desc.family == "depthwise_gemm" and prepared.desc.kind == "grad_input"
    launch.run(prepared)
    assert_close(grad_x, expected, DTYPES[dtype])


@pytest.mark.parametrize("case", [CASES[3], CASES[6]], ids=["stride3x4", "two-tiles"])
def test_every_program_of_the_grid_writes_some_of_grad_x(case, nan_filled_outputs):
    """The grid is no larger than the tile's triples need: without its last program some of grad_x stays
    unwritten (NaN), with it none does (a grid too small leaves NaN, which the test above catches)."""
    channels, batch, size, kernel, stride, padding, dilation, layout, config = case
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    spec = ConvSpec(channels, channels, channels, kernel, stride, padding, dilation, False, "float32", layout)
    weight = torch.randn(channels, 1, *kernel)
    out_size = [(s + p0 + p1 - d * (k - 1) - 1) // st + 1
                for s, (p0, p1), d, k, st in zip(size, (padding[:2], padding[2:]), dilation, kernel, stride)]
    grad_out = torch.randn(batch, channels, *out_size).contiguous(memory_format=memory)
    for shortened in (True, False):
        grad_x = torch.full((batch, channels, *size), float("nan")).contiguous(memory_format=memory)
        prepared = launch.prepare_grad_input(spec, grad_out, weight, grad_x, Choice(KERNEL, config, "depthwise_gemm"))
        if shortened:
            assert prepared.grid[0] > 1
            prepared = dataclasses.replace(prepared, grid=(prepared.grid[0] - 1, *prepared.grid[1:]))
        launch.run(prepared)
        assert torch.isnan(grad_x).any() == shortened


@pytest.mark.parametrize("data_format", ["NCL", "NLC"])
def test_a_strided_depthwise_conv1d_trains_through_the_banded_grad_input(data_format, monkeypatch):
    """A depthwise conv1d at stride 2 in bfloat16 (a downsampling layer of an audio or sequence model): its input
    gradient runs the banded kernel by default, in either layout, against torch's float64 gradient."""
    ran = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family))
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 45, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, 1, 5, generator=generator, dtype=torch.float64)
    x64 = x.clone().requires_grad_()
    out = F.conv1d(x64, weight, None, 2, 2, 1, 6)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).bfloat16()
    (expected,) = torch.autograd.grad(out, x64, grad_out.double())
    nlc = data_format == "NLC"
    given = (x.transpose(1, 2).contiguous() if nlc else x).bfloat16().requires_grad_()
    keras = weight.permute(2, 1, 0)  # NLC takes a Keras weight [k, in_channels / groups, out_channels]
    got = gconvgen.conv1d(given, (keras if nlc else weight).bfloat16(), None, 2, 2, 1, 6, data_format=data_format)
    (grad_x,) = torch.autograd.grad(got, given, grad_out.transpose(1, 2) if nlc else grad_out)
    assert ("grad_input", "depthwise_gemm") in ran, ran
    assert_close(grad_x.transpose(1, 2) if nlc else grad_x, expected, torch.bfloat16)


@pytest.mark.parametrize("kernel, stride, dtype, multiplier, offered, default", [
    ((3, 3), (2, 2), "bfloat16", 1, True, True),    # MobileNetV2's dw3 at stride 2
    ((5, 5), (2, 2), "float16", 1, True, True),     # EfficientNet's dw5 at stride 2
    ((3, 3), (2, 2), "float32", 1, True, False),    # offered to the tuner; FMAs are as fast as a float32 dot
    ((3, 3), (1, 1), "bfloat16", 1, False, False),  # stride 1: the transposed conv's forward
    ((3, 3), (2, 3), "bfloat16", 1, False, False),  # a width stride that is not a power of two
    ((3, 3), (2, 2), "bfloat16", 2, False, False),  # a channel multiplier
    ((9, 3), (2, 2), "bfloat16", 1, False, False),  # 9 open rows
])
def test_the_banded_grad_input_is_offered_at_a_stride(kernel, stride, dtype, multiplier, offered, default):
    spec = ConvSpec(8, 8 * multiplier, 8, kernel, stride, (1, 1, 1, 1), dtype=dtype, layout="nhwc")
    assert depthwise_gemm.strided_grad_input(spec) == offered
    assert (("depthwise_gemm", False) in grad_input_offers(spec, 0.5)) == offered
    assert (plan(spec).grad_input_families[0] == "depthwise_gemm") == default


def test_a_strip_reads_the_grad_out_columns_its_window_reaches():
    """A 16-column strip at stride 2 with a 5-column window padded by 2 reads 10 grad_out columns (SPAN): the 8 its
    columns start at, one before and one after; in NCHW its band starts on an aligned column, 8 before (17
    columns: two band steps of 16, one of 32). A 3-column window padded by 1 reaches nothing before: 9."""
    spec = ConvSpec(8, 8, 8, (5, 5), (2, 2), (2, 2, 2, 2), dtype="bfloat16", layout="nhwc")
    assert depthwise_gemm.grad_input_span(spec, 16, 1) == 10
    assert depthwise_gemm.grad_input_span(spec, 16, 8) == 17
    assert depthwise_gemm.grad_input_span(spec, 32, 8) == 25
    narrow = ConvSpec(8, 8, 8, (3, 3), (2, 2), (1, 1, 1, 1), dtype="bfloat16", layout="nhwc")
    assert depthwise_gemm.grad_input_span(narrow, 16, 8) == 9


SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem
    rows = []
    for suite, ids in (("headline", ("mbv2-dw3-s2",)), ("secondary", ("effb0-dw5-s2",))):
        for layer in suites.load_suite(suite).layers:
            if layer.id not in ids:
                continue
            for layout in ("nhwc", "nchw"):
                row = inspect_problem(layer.problem("bfloat16", layout).backward("grad_input"))
                rows.append({"layer": layer.id, "layout": layout, "family": row.family,
                             "spill": row.figures.spill_bytes, "loads": row.figures.global_load_widths,
                             "stores": row.figures.global_store_widths, "bytes": row.requested_over_ideal_bytes,
                             "percent": row.model.percent_of_floor})
    print(json.dumps(rows))
""")


def test_strided_depthwise_grad_inputs_read_grad_out_once_for_sm90():
    """MobileNetV2's dw3 and EfficientNet's dw5 at stride 2, their grad-input as inspect compiles it, both layouts:
    the banded kernel, no spill, grad_out read and grad_x written as vectors of 4 elements or more (the SASS: 16
    bytes but where rows of 28 columns allow 8, EfficientNet's grad_out in NCHW), and under
    inspect's model at most 1.5x the ideal bytes and at least 40% of the floor (the direct kernel before: 3.3-11x
    the ideal bytes, 6.6-30.5%)."""
    rows = compiled_rows(SCRIPT)
    assert len(rows) == 4
    for row in rows:
        assert row["family"] == "depthwise_gemm" and row["spill"] == 0, row
        assert {"64", "128"} & set(row["loads"]) and set(row["stores"]) <= {"64", "128"}, row
        assert row["bytes"] <= 1.5 and row["percent"] >= 40, row
