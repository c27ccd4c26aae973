"""The banded depthwise forward sliding down the output rows (families/depthwise_gemm.py sliding_rows,
templates/depthwise_gemm.py.jinja "sliding"): windows reaching up to 6 rows at stride 1 along the height load each
input row once for every kernel row and build their band blocks once a program. Its named edges against torch's
float64 conv (every output element written), when the default takes it, and what it saves for sm_90. The
property-based fuzz forces it too (tests/test_fuzz.py test_conv2d_forward_banded_sliding)."""
from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import assert_close, reference_conv2d
from gconvgen.compiler.families import default_config, depthwise_gemm
from gconvgen.compiler.lowering import KERNEL, Choice
from gconvgen.compiler.plan import plan
from gconvgen.compiler.tiles import KernelConfig, PixelSpace
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from test_sm90_compile import compiled_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# channels, multiplier, batch, (H, W), kernel, stride, padding (top, bottom, left, right), dilation, layout, config:
# 20 output rows in 7 blocks of up to 3 (2 images of one strip split to fill a tile); one output row, from the
# padding alone; a window taller than the map; a dilated height reaching 6 rows; width-strided with a channel
# multiplier; 3 images x 2 blocks x 6 strips in two tiles of 32 triples, the last one part full; a 2-row window,
# each input row in two open rows; strided heights: 2 (both phases read), 3 with a dilation of 2 (a phase no
# kernel row reads), 3 past a 2-row window
CASES = [
    (4, 1, 2, (20, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "nhwc", KernelConfig(16, 4, 16, num_stages=1)),
    (3, 1, 1, (1, 7), (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), "nchw", KernelConfig(16, 2, 16, num_stages=1)),
    (2, 1, 2, (3, 5), (7, 5), (1, 1), (6, 0, 2, 2), (1, 1), "nhwc", KernelConfig(16, 2, 16, num_stages=1)),
    (2, 1, 2, (24, 11), (4, 3), (1, 1), (3, 3, 1, 1), (2, 1), "nchw", KernelConfig(16, 1, 16, num_stages=1)),
    (3, 2, 1, (17, 40), (5, 3), (1, 2), (2, 2, 1, 1), (1, 1), "nhwc", KernelConfig(16, 2, 16, num_stages=1)),
    (2, 1, 3, (18, 90), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "nchw", KernelConfig(32, 1, 16, num_stages=1)),
    (4, 1, 2, (33, 20), (2, 2), (1, 1), (0, 1, 0, 1), (1, 1), "nhwc", KernelConfig(16, 4, 16, num_stages=1)),
    (3, 1, 2, (39, 20), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "nhwc", KernelConfig(16, 2, 16, num_stages=1)),
    (2, 2, 1, (37, 18), (4, 3), (3, 2), (3, 0, 1, 1), (2, 1), "nchw", KernelConfig(16, 4, 16, num_stages=1)),
    (2, 1, 2, (11, 7), (2, 3), (3, 1), (0, 0, 1, 1), (1, 1), "nhwc", KernelConfig(16, 2, 16, num_stages=1)),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("channels, multiplier, batch, size, kernel, stride, padding, dilation, layout, config", CASES)
def test_tiles_sliding_down_the_rows_match_torch(channels, multiplier, batch, size, kernel, stride, padding,
                                                 dilation, layout, config, dtype, nan_filled_outputs):
    generator = torch.Generator().manual_seed(hash((channels, size, kernel)) % 2**31)
    x = torch.randn(batch, channels, *size, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = x.contiguous(memory_format=memory)
    weight = torch.randn(channels * multiplier, 1, *kernel, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    bias = torch.randn(channels * multiplier, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    spec = ConvSpec(channels, channels * multiplier, channels, kernel, stride, padding, dilation, True, dtype, layout)
    expected = reference_conv2d(x.double(), weight.double(), bias.double(), stride, padding, dilation, channels)
    out = torch.empty(expected.shape, dtype=DTYPES[dtype]).contiguous(memory_format=memory)
    prepared = launch.prepare_forward(spec, x, weight, bias, out, Choice(KERNEL, config, "depthwise_gemm"))
    assert prepared.desc.slide_rows == depthwise_gemm.SLIDING_ROWS, "not the tile sliding down the rows"
    launch.run(prepared)
    assert_close(out, expected, DTYPES[dtype])


def test_an_inf_past_a_band_blocks_reach_stays_out_of_the_sum(nan_filled_outputs):
    """A band step past the first loads only the columns some tap of its block reaches (whole row_alignment
    vectors): an inf input past them leaves the outputs of the strip finite, as in torch. 3 x 3 over 24 columns:
    the second band step of the first strip (outputs 0-15) reaches columns 16 and 17, loaded as whole vectors of
    at most 4 columns; the inf is in column 21. (The second strip's own band still multiplies it by its zeros: the
    known limit in README.md.)"""
    x = torch.randn(1, 1, 4, 24, dtype=torch.float64)
    x[0, 0, :, 21] = float("inf")
    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    spec = ConvSpec(1, 1, 1, (3, 3), (1, 1), (1, 1, 0, 0), dtype="float32", layout="nchw")
    expected = reference_conv2d(x, weight, None, (1, 1), (1, 1, 0, 0), (1, 1), 1)
    out = torch.empty(expected.shape, dtype=torch.float32)
    prepared = launch.prepare_forward(spec, x.float(), weight.float(), None, out,
                                      Choice(KERNEL, KernelConfig(16, 1, 16, num_stages=1), "depthwise_gemm"))
    assert prepared.desc.slide_rows and prepared.desc.row_alignment <= 4
    launch.run(prepared)
    assert torch.isfinite(out[..., :16]).all()
    assert_close(out[..., :16], expected[..., :16], torch.float32)


def test_a_window_that_could_slide_takes_the_flat_tile_where_the_flat_grid_keeps_more_sms_busy(nan_filled_outputs):
    """One image of 600 rows of 10 columns: 2 sliding programs (19 blocks of 32 rows, 16 a tile) against 38 flat
    ones (SLIDING_LEAST_PROGRAMS or more), so the flat tile, whose tiles are any rows' strips; against torch."""
    x = torch.randn(1, 1, 600, 10, dtype=torch.float64)
    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    spec = ConvSpec(1, 1, 1, (3, 3), (1, 1), (1, 1, 1, 1), dtype="float32", layout="nhwc")
    expected = reference_conv2d(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    out = torch.empty(expected.shape, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    prepared = launch.prepare_forward(spec, x.float().contiguous(memory_format=torch.channels_last), weight.float(),
                                      None, out, Choice(KERNEL, KernelConfig(16, 1, 16, num_stages=1),
                                                        "depthwise_gemm"))
    assert not prepared.desc.slide_rows and prepared.grid[0] == 38 >= depthwise_gemm.SLIDING_LEAST_PROGRAMS
    launch.run(prepared)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("kernel, stride, dilation, dtype, sliding", [
    ((3, 3), (1, 1), (1, 1), "bfloat16", True),   # MobileNetV2's dw3
    ((5, 5), (1, 1), (1, 1), "float16", True),    # EfficientNet's dw5
    ((7, 7), (1, 1), (1, 1), "bfloat16", True),   # ConvNeXt's dw7
    ((3, 3), (1, 1), (3, 3), "bfloat16", True),   # a reach of 6 rows
    ((3, 3), (2, 2), (1, 1), "bfloat16", True),   # MobileNetV2's dw3 at stride 2: a phase of the stride a row
    ((5, 5), (2, 2), (3, 3), "bfloat16", True),   # a reach of 12 rows at stride 2: 7 open rows
    ((3, 3), (1, 1), (4, 4), "bfloat16", False),  # a reach of 8 rows: more open rows than the registers hold
    ((9, 9), (1, 1), (1, 1), "bfloat16", False),  # flat band tiles
    ((7, 31), (1, 1), (1, 1), "bfloat16", False),  # 7 rows x 3 band steps: more band blocks than it holds
    ((3, 3), (1, 1), (1, 1), "float32", False),   # no faster dot: the direct kernel
])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_windows_of_a_few_rows_slide_down_them_by_default(kernel, stride, dilation, dtype, sliding, layout):
    spec = ConvSpec(96, 96, 96, kernel, stride, padding=tuple((k - 1) * d // 2 for k, d in zip(kernel, dilation)
                                                              for _ in (0, 1)), dilation=dilation, dtype=dtype,
                    layout=layout)
    family = plan(spec).families[0]
    assert (family == "depthwise_gemm" and depthwise_gemm.sliding_rows(spec, "forward")) == sliding, family
    if sliding:
        pixels = PixelSpace.of("forward", 64, 56, 56, 56, 56)
        config = default_config(spec, family, "forward", interpret=False, pixels=pixels)
        assert depthwise_gemm.DepthwiseGemm().slide_rows(spec, "forward", config, pixels) == depthwise_gemm.SLIDING_ROWS


@pytest.mark.parametrize("layout, sliding", [("nhwc", False), ("nchw", True)])
def test_a_small_batch_slides_where_the_flat_tile_would_not_keep_more_of_the_device_busy(layout, sliding):
    """ConvNeXt's dw7 at batch 1: in channels_last 12 sliding programs (8 channels a tile) against 168 flat ones,
    so the flat tile; in NCHW (a channel a program) 96 sliding ones, at least SLIDING_LEAST_PROGRAMS."""
    spec = ConvSpec(96, 96, 96, (7, 7), padding=(3, 3, 3, 3), dtype="bfloat16", layout=layout)
    pixels = PixelSpace.of("forward", 1, 56, 56, 56, 56)
    config = default_config(spec, "depthwise_gemm", "forward", interpret=False, pixels=pixels)
    assert depthwise_gemm.sliding_rows(spec, "forward", config, pixels) == sliding
    assert depthwise_gemm.sliding_rows(spec, "forward", config, PixelSpace.of("forward", 64, 56, 56, 56, 56))


SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem, prepared_launch
    rows = []
    for layer in suites.load_suite("headline").layers:
        if layer.id not in ("convnext-dw7", "effb0-dw5", "mbv2-dw3", "mbv2-dw3-s2"):
            continue
        for layout in ("nhwc", "nchw"):
            forward = layer.problem("bfloat16", layout)
            row = inspect_problem(forward)
            rows.append({"layer": layer.id, "layout": layout, "family": row.family, "spill": row.figures.spill_bytes,
                         "sliding": prepared_launch(forward).desc.slide_rows, "bytes": row.requested_over_ideal_bytes,
                         "percent": row.model.percent_of_floor, "stores": row.figures.global_store_widths})
    print(json.dumps(rows))
""")


def test_short_depthwise_windows_read_each_input_row_once_for_sm90():
    """MobileNetV2's dw3 (at strides 1 and 2), EfficientNet's dw5 and ConvNeXt's dw7 forward as inspect compiles
    them, both layouts: sliding down the rows, no spill, at most 2.2x the ideal bytes (ConvNeXt's flat band tiles:
    8.6-9.0x) and at least 40% of the floor modelled (the direct kernels and flat band tiles before: 11-54%); their
    outputs stored as vectors of at least 8 bytes (NCHW rows of 56 and 28 columns before their alignment reached the
    template: 2-byte stores)."""
    rows = compiled_rows(SCRIPT)
    assert len(rows) == 8
    for row in rows:
        assert row["family"] == "depthwise_gemm" and row["sliding"] > 0 and row["spill"] == 0, row
        assert row["bytes"] <= 2.2 and row["percent"] >= 40, row
        assert row["stores"] and min(int(bits) for bits in row["stores"]) >= 64, row
