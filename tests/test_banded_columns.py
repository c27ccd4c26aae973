"""The banded depthwise forward in tiles of one column of strips' rows (families/depthwise_gemm.py column_rows,
templates/depthwise_gemm.py.jinja "columns"): channels_last windows of at least COLUMN_KERNEL_ROWS rows load each
band step's input once for every kernel row. Its named edges against torch's float64 conv (every output element
written), when the default takes it, and what it saves for sm_90. The property-based fuzz forces it too
(tests/test_fuzz.py test_conv2d_forward_banded_columns)."""
from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import assert_close, reference_conv2d
from gconvgen.compiler.families import default_config, depthwise_gemm
from gconvgen.compiler.lowering import KERNEL, Choice, lower
from gconvgen.compiler.plan import plan
from gconvgen.compiler.tiles import KernelConfig, PixelSpace
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from test_sm90_compile import compiled_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# channels, multiplier, (H, W), kernel, padding (top, bottom, left, right), dilation, config: a tile of more rows
# than the output's (20 of 32), with the halo past the map; two tiles down a column (40 rows of 32); a window
# taller than the map (out rows from the padding alone); dilated rows; a window as wide as a strip
CASES = [
    (4, 1, (20, 9), (17, 3), (8, 8, 1, 1), (1, 1), KernelConfig(32, 4, 16, num_stages=1)),
    (3, 2, (40, 7), (16, 5), (7, 8, 2, 2), (1, 1), KernelConfig(32, 2, 16, num_stages=1)),
    (2, 1, (6, 5), (18, 1), (16, 17, 0, 0), (1, 1), KernelConfig(32, 2, 16, num_stages=1)),
    (4, 1, (40, 6), (17, 2), (3, 0, 0, 1), (2, 1), KernelConfig(64, 4, 16, num_stages=1)),
    (5, 1, (33, 20), (16, 16), (15, 0, 7, 8), (1, 1), KernelConfig(32, 4, 32, num_stages=1)),
]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("channels, multiplier, size, kernel, padding, dilation, config", CASES)
def test_tiles_of_a_columns_rows_match_torch(channels, multiplier, size, kernel, padding, dilation, config, dtype,
                                             layout, nan_filled_outputs):
    """In channels_last, and in NCHW on the runtime's channels_last copy of x, its output written NCHW
    (DepthwiseGemm.stages_channels_last)."""
    generator = torch.Generator().manual_seed(hash((channels, size, kernel)) % 2**31)
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, channels, *size, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    x = x.contiguous(memory_format=memory)
    weight = torch.randn(channels * multiplier, 1, *kernel, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    bias = torch.randn(channels * multiplier, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    spec = ConvSpec(channels, channels * multiplier, channels, kernel, (1, 1), padding, dilation, True, dtype, layout)
    expected = reference_conv2d(x.double(), weight.double(), bias.double(), (1, 1), padding, dilation, channels)
    out = torch.empty(expected.shape, dtype=DTYPES[dtype]).contiguous(memory_format=memory)
    prepared = launch.prepare_forward(spec, x, weight, bias, out, Choice(KERNEL, config, "depthwise_gemm"))
    assert prepared.desc.step_rows == config.block_m, "not the tile of a column's rows"
    assert prepared.desc.stage_channels_last == (layout == "nchw")
    launch.run(prepared)
    assert_close(out, expected, DTYPES[dtype])


@pytest.mark.parametrize("kernel, layout, rows, batch, columns", [
    ((31, 31), "nhwc", 56, 64, True),
    ((17, 3), "nhwc", 20, 64, True),
    ((31, 31), "nhwc", 14, 64, False),  # fewer than COLUMN_ROWS output rows: the flat tile
    ((31, 31), "nhwc", 56, 1, False),  # a tile halved under COLUMN_ROWS to fill the device: the flat tile
    ((15, 15), "nhwc", 56, 64, False),  # a window of fewer than COLUMN_KERNEL_ROWS rows
    ((31, 31), "nchw", 56, 64, False),  # one channel's dot at a time (the NCHW conv's own tile; its kernel is
])                                      # the channels_last conv's on a staged copy: the next test)
def test_tall_channels_last_windows_take_a_columns_rows_on_a_gpu_by_default(kernel, layout, rows, batch, columns):
    spec = ConvSpec(128, 128, 128, kernel, padding=tuple(k // 2 for k in kernel for _ in (0, 1)), dtype="bfloat16",
                    layout=layout)
    assert plan(spec).families[0] == "depthwise_gemm"
    config = default_config(spec, "depthwise_gemm", "forward", interpret=False,
                            pixels=PixelSpace.of("forward", batch, rows, 56, rows, 56))
    assert depthwise_gemm.column_rows(spec, "forward", config) == columns, config


@pytest.mark.parametrize("kernel, stride, staged", [((31, 31), (1, 1), True), ((17, 3), (1, 2), True),
                                                    ((15, 15), (1, 1), False), ((31, 31), (2, 2), False)])
def test_a_tall_nchw_window_takes_a_columns_rows_on_a_channels_last_copy(kernel, stride, staged):
    """An NCHW forward window of at least COLUMN_KERNEL_ROWS rows at stride 1 along the height: the runtime copies
    x to channels_last and the kernel is the channels_last conv's, in columns of strips on a GPU by default."""
    spec = ConvSpec(128, 128, 128, kernel, stride, tuple(k // 2 for k in kernel for _ in (0, 1)), dtype="bfloat16",
                    layout="nchw")
    desc = lower(plan(spec), "forward", interpret=False, allow_tf32=False,
                 pixels=PixelSpace.of("forward", 64, 56, 56, *spec.output_size(56, 56)))
    assert (desc.stage_channels_last, desc.spec.layout == "nhwc") == (staged, staged)
    assert (desc.band_dot, desc.step_rows > 0) == (("channels", True) if staged else ("rows", False))


SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem, prepared_launch
    rows = []
    layer = next(layer for layer in suites.load_suite("headline").layers if layer.id == "replknet-dw31")
    for layout in ("nhwc", "nchw"):
        forward = layer.problem("bfloat16", layout)
        for problem in (forward, forward.backward("grad_input")):
            row = inspect_problem(problem)
            rows.append({"layout": layout, "kind": problem.kind, "family": row.family,
                         "spill": row.figures.spill_bytes, "columns": prepared_launch(forward).desc.step_rows,
                         "bytes": row.requested_over_ideal_bytes, "percent": row.model.percent_of_floor,
                         "stores": row.figures.global_store_widths})
    print(json.dumps(rows))
""")


def test_replknet_forward_reads_its_input_once_a_band_step_for_sm90():
    """RepLKNet's dw31 as inspect compiles it, forward and its grad-input (the transposed forward): tiles of a
    column's rows, no spill, at least 11% of the floor modelled, 16-byte stores; at most 6x the ideal bytes in
    channels_last (flat tiles: 38x), 7x in NCHW with its channels_last copy counted (NCHW's flat tiles of one
    channel: 36x, 7.2%)."""
    rows = compiled_rows(SCRIPT)
    assert len(rows) == 4
    for row in rows:
        assert row["family"] == "depthwise_gemm" and row["columns"] > 0 and row["spill"] == 0, row
        assert row["bytes"] <= (6 if row["layout"] == "nhwc" else 7) and row["percent"] >= 11, row
        assert set(row["stores"]) == {"128"}, row


def test_the_tuner_shapes_a_staged_nchw_forward_as_the_channels_last_kernel_it_runs():
    """RepLKNet's dw31 in NCHW: the tuner's default and its space's rules take the channels_last conv the staged
    kernel computes (families.kernel_spec), so the default it times is the config an untuned call runs."""
    from gconvgen.autotune import suites
    from gconvgen.autotune.space import DeviceFacts
    from gconvgen.autotune.tuner import families_of
    from gconvgen.compiler.families import kernel_spec
    layer = next(layer for layer in suites.load_suite("headline").layers if layer.id == "replknet-dw31")
    problem = layer.problem("bfloat16", "nchw")
    banded = next(f for f in families_of(problem, DeviceFacts("cuda:90", 132, 232448)) if f.name == "depthwise_gemm")
    assert kernel_spec(problem.spec, "depthwise_gemm", "forward").layout == "nhwc"
    untuned = lower(plan(problem.spec), "forward", interpret=False, allow_tf32=False, pixels=problem.pixel_space)
    assert banded.default == untuned.config and untuned.config.block_n == 8, (banded.default, untuned.config)
