"""The dense depthwise family (families/depthwise_dense.py, templates/depthwise_dense.py.jinja): a small map's
depthwise conv as each channel's flattened map times a dense matrix of its taps, on tensor cores. Its named
edges against torch's float64 conv (every element written), the launches it claims by default, and what it
does for sm_90. The property-based fuzz forces it too (tests/test_fuzz.py test_conv2d_forward_depthwise_dense)."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

import torch.nn.functional as F

import gconvgen
from conftest import (assert_close, assert_same_every_run_and_close, depthwise_grad_weight_runs, reference_conv2d,
                      spy_on_kernels)
from gconvgen.autotune import choice
from gconvgen.compiler.families import suiting_first
from gconvgen.compiler.families.depthwise_dense import dense_steps, reached_pixels
from gconvgen.compiler.lowering import DEFAULT, KERNEL, Choice
from gconvgen.compiler.plan import plan
from gconvgen.compiler.tiles import KernelConfig, PixelSpace
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from test_sm90_compile import compiled_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# channels, multiplier, batch, (H, W) of x, kernel, stride, padding (top, bottom, left, right), dilation, layout,
# config: a 9 x 9 window on a 5 x 5 map (it reaches past the map on every side); ConvNeXt's 7 x 7 on 7 x 7 in two
# tiles of 32 output pixels; a 3 x 3 window on 12 x 10, whose tiles step through a few rows from past the first;
# stride 2 and dilation 2 with uneven padding; a channel multiplier of 2; padding past the window's reach (rows
# and columns of outputs no input reaches); an output of width 1; 17 images (two tiles of 16 samples); a 13 x 1
# window down a 20 x 3 map in steps of 32 pixels that cross rows; rows of 37 columns, wider than the tiles of
# 16 output pixels and steps of 16 input pixels (a tile in one row steps through its windows' columns alone);
# one row of 70 columns (a 1-D conv's map), stride 2 along it
CASES = [
    (3, 1, 2, (5, 5), (9, 9), (1, 1), (4, 4, 4, 4), (1, 1), "nchw", KernelConfig(16, 16, 16, num_stages=1)),
    (4, 1, 2, (7, 7), (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), "nhwc", KernelConfig(16, 32, 16, num_stages=1)),
    (2, 1, 1, (12, 10), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "nchw", KernelConfig(16, 16, 16, num_stages=1)),
    (3, 1, 2, (9, 11), (3, 3), (2, 2), (2, 0, 1, 3), (2, 2), "nhwc", KernelConfig(16, 16, 32, num_stages=1)),
    (3, 2, 2, (6, 5), (3, 5), (1, 1), (1, 1, 2, 2), (1, 1), "nchw", KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 1, (4, 6), (3, 3), (1, 1), (3, 2, 3, 3), (1, 1), "nhwc", KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 2, (6, 1), (3, 1), (1, 1), (1, 1, 0, 0), (1, 1), "nchw", KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 17, (3, 3), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "nhwc", KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 1, (20, 3), (13, 1), (1, 1), (6, 6, 0, 0), (1, 1), "nchw", KernelConfig(16, 16, 32, num_stages=1)),
    (2, 1, 2, (3, 37), (3, 5), (1, 1), (1, 1, 2, 2), (1, 1), "nhwc", KernelConfig(16, 16, 16, num_stages=1)),
    (3, 1, 1, (1, 70), (1, 9), (1, 2), (0, 0, 4, 3), (1, 1), "nchw", KernelConfig(16, 16, 16, num_stages=1)),
]


def _run(channels, multiplier, batch, size, kernel, stride, padding, dilation, layout, config, dtype, *,
         bias=True, specials=(), x_view=None):
    """The forced dense forward of a fresh random conv and torch's float64 one (bias, relu epilogue)."""
    generator = torch.Generator().manual_seed(hash((channels, size, kernel, layout)) % 2**31)
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(batch, channels, *size, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    for index, value in specials:
        x.view(-1)[index] = value
    x = x.contiguous(memory_format=memory) if x_view is None else x_view(x)
    weight = torch.randn(channels * multiplier, 1, *kernel, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    b = torch.randn(channels * multiplier, generator=generator, dtype=torch.float64).to(DTYPES[dtype]) if bias else None
    expected = torch.relu(reference_conv2d(x, weight, b, stride, padding, dilation, channels))
    forced = Choice(KERNEL, config, "depthwise_dense")
    with choice.overridden(lambda spec, kind, *_: forced if kind == "forward" else DEFAULT, every_call=False):
        got = gconvgen.conv2d(x, weight, b, stride, padding, dilation, channels, activation="relu")
    return got, expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES)
def test_the_dense_forward_matches_torch(case, dtype, nan_filled_outputs, monkeypatch):
    ran = spy_on_kernels(monkeypatch, lambda desc: desc.family)
    got, expected = _run(*case, dtype)
    assert ran == ["depthwise_dense"], ran
    assert_close(got, expected, DTYPES[dtype])


def test_the_dense_forward_in_float64(nan_filled_outputs):
    got, expected = _run(*CASES[3], "float64")
    assert torch.isfinite(got).all()  # every element written
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("view", ["storage_offset", "width_step"])
def test_the_dense_forward_reads_views(view, nan_filled_outputs):
    """An input at a storage offset, and one every other column of a wider tensor (its width stride 2)."""
    def x_view(x):
        if view == "storage_offset":
            return torch.cat([torch.zeros(7, dtype=x.dtype), x.reshape(-1)])[7:].view(x.shape)
        return torch.repeat_interleave(x, 2, dim=3)[..., ::2]
    got, expected = _run(*CASES[0][:-1], KernelConfig(16, 16, 16, num_stages=1), "float32", x_view=x_view)
    assert_close(got, expected, torch.float32)


def test_a_nan_input_stays_nan_in_every_output_whose_window_holds_it(nan_filled_outputs):
    """Where torch's output is NaN, so is ours (an inf or NaN may spread to other outputs of its map: the
    README's known limit, T's zeros times it)."""
    got, expected = _run(*CASES[2], "float32", specials=((17, float("nan")), (130, float("inf"))))
    assert expected.isnan().any()
    assert got[expected.isnan()].isnan().all()


@pytest.mark.parametrize("data_format", ["NCL", "NLC"])
def test_a_long_window_on_a_short_row_runs_dense(data_format, monkeypatch, nan_filled_outputs):
    """A depthwise conv1d of a 31-tap window on 24 positions in bfloat16 (a wide filter on a short sequence), a
    batch of 8: the dense kernel by default, against torch's float64 conv."""
    ran = spy_on_kernels(monkeypatch, lambda desc: desc.family)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, 24, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 1, 31, generator=generator, dtype=torch.float64)
    expected = F.conv1d(x.bfloat16().double(), weight.bfloat16().double(), None, 1, 15, 1, 5)
    nlc = data_format == "NLC"
    given = (x.transpose(1, 2).contiguous() if nlc else x).bfloat16()
    keras = weight.permute(2, 1, 0)  # NLC takes a Keras weight [k, in_channels / groups, out_channels]
    got = gconvgen.conv1d(given, (keras if nlc else weight).bfloat16(), None, 1, 15, 1, 5, data_format=data_format)
    assert ran == ["depthwise_dense"], ran
    assert_close(got.transpose(1, 2) if nlc else got, expected, torch.bfloat16)


def _untuned_forward_family(spec: ConvSpec, batch: int, height: int, width: int) -> str:
    pixels = PixelSpace.of("forward", batch, height, width, height, width)
    return suiting_first(plan(spec).families, spec, "forward", pixels)[0]


@pytest.mark.parametrize("kernel, size, batch, dtype, layout, dense", [
    ((27, 27), 14, 64, "bfloat16", "nchw", True),   # RepLKNet's dw27 on its 14 x 14 map
    ((7, 7), 7, 64, "float16", "nhwc", True),       # ConvNeXt's dw7 on its last stage's 7 x 7
    ((9, 9), 14, 64, "bfloat16", "nhwc", True),     # 196 pixels, 81 taps (2.4 a tap)
    ((7, 7), 14, 64, "bfloat16", "nhwc", False),    # 196 pixels, 49 taps (4.0 a tap): the band
    ((7, 7), 56, 64, "bfloat16", "nhwc", False),    # ConvNeXt's first stage's 56 x 56
    ((3, 3), 7, 64, "bfloat16", "nchw", False),     # 9 taps on 49 pixels: T mostly zeros
    ((7, 7), 7, 4, "bfloat16", "nchw", False),      # 4 samples fill a quarter of tl.dot's rows
    ((3, 3), 3, 64, "bfloat16", "nchw", False),     # 9 output pixels, a tile of 16
    ((27, 27), 14, 64, "float32", "nchw", False),   # float32: a dot is no faster than the FMAs
])
def test_small_maps_that_the_window_covers_claim_the_dense_kernel(kernel, size, batch, dtype, layout, dense):
    padding = kernel[0] // 2
    spec = ConvSpec(64, 64, 64, kernel, (1, 1), (padding,) * 4, dtype=dtype, layout=layout)
    assert "depthwise_dense" in plan(spec).families  # offered to the tuner everywhere
    assert (_untuned_forward_family(spec, batch, size, size) == "depthwise_dense") == dense


@pytest.mark.parametrize("taps, length, dense", [
    (16, 48, True),     # a short window on a short row: T's blocks 4.0 elements a pixel of the batch
    (64, 192, False),   # a long window on a short row: 6.7, the band reads the row once
    (256, 512, False),  # 15
])
def test_a_short_row_claims_the_dense_kernel_where_the_batch_shares_its_blocks(taps, length, dense):
    """Causal depthwise conv1d rows at batch 8 in bfloat16 (DENSE_BLOCK_ELEMENTS_PER_PIXEL)."""
    spec = ConvSpec(64, 64, 64, (1, taps), (1, 1), (0, 0, taps - 1, 0), dtype="bfloat16")
    assert (_untuned_forward_family(spec, 8, 1, length) == "depthwise_dense") == dense


def test_the_stride_one_input_gradient_of_a_small_map_runs_dense(monkeypatch):
    """RepLKNet-like: a 9 x 9 window on a 6 x 6 map in bfloat16 at batch 8 trains through the dense kernel both
    ways (the input gradient is the transposed conv's forward), against torch's float64 gradient."""
    ran = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family))
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(8, 4, 6, 6, generator=generator, dtype=torch.float64).bfloat16()
    weight = torch.randn(4, 1, 9, 9, generator=generator, dtype=torch.float64).bfloat16()
    x64 = x.double().requires_grad_()
    out = F.conv2d(x64, weight.double(), None, 1, 4, 1, 4)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).bfloat16()
    (expected,) = torch.autograd.grad(out, x64, grad_out.double())
    given = x.clone().requires_grad_()
    got = gconvgen.conv2d(given, weight, None, 1, 4, 1, 4)
    assert_close(got, out.detach(), torch.bfloat16)
    (grad_x,) = torch.autograd.grad(got, given, grad_out)
    assert ("forward", "depthwise_dense") in ran and ran.count(("forward", "depthwise_dense")) == 2, ran
    assert_close(grad_x, expected, torch.bfloat16)


def test_every_program_of_the_grid_writes_some_of_the_output(nan_filled_outputs):
    """The grid is no larger than the tiles need: without its last program some of the output stays NaN."""
    channels, multiplier, batch, size, kernel, stride, padding, dilation, layout, config = CASES[7]
    spec = ConvSpec(channels, channels, channels, kernel, stride, padding, dilation, False, "float32", layout)
    x = torch.randn(batch, channels, *size).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, *kernel)
    for shortened in (True, False):
        out = torch.full((batch, channels, *size), float("nan")).contiguous(memory_format=torch.channels_last)
        prepared = launch.prepare_forward(spec, x, weight, None, out, Choice(KERNEL, config, "depthwise_dense"))
        if shortened:
            assert prepared.grid[0] > 1
            prepared = dataclasses.replace(prepared, grid=(prepared.grid[0] - 1, *prepared.grid[1:]))
        launch.run(prepared)
        assert torch.isnan(out).any() == shortened


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("block_n, block_k", [(16, 16), (32, 16), (16, 32), (64, 64)])
def test_a_tile_steps_through_every_input_pixel_its_windows_reach(case, block_n, block_k):
    """reached_pixels (what the template steps through) against the pixels each tile's windows reach, counted
    tap by tap: within the map, from a multiple of BLOCK_K, holding every reached pixel."""
    channels, multiplier, batch, (height, width), kernel, stride, padding, dilation, *_ = case
    spec = ConvSpec(channels, channels * multiplier, channels, kernel, stride, padding, dilation)
    out_height, out_width = spec.output_size(height, width)
    out_pixels = out_height * out_width
    for q0 in range(0, out_pixels, block_n):
        first, end = reached_pixels(spec, q0, block_n, block_k, out_height, out_width, height, width)
        reached = {row * width + column
                   for q in range(q0, min(q0 + block_n, out_pixels))
                   for i in range(kernel[0]) for j in range(kernel[1])
                   if 0 <= (row := q // out_width * stride[0] - padding[0] + i * dilation[0]) < height
                   and 0 <= (column := q % out_width * stride[1] - padding[2] + j * dilation[1]) < width}
        assert first % block_k == 0 and first >= 0 and end <= height * width, (q0, first, end)
        assert all(first <= pixel < end for pixel in reached), (q0, first, end, sorted(reached))


def test_a_tile_in_one_row_steps_through_its_windows_columns_alone():
    """A 1-D conv of 4 taps on 2048 positions: a tile of 64 outputs steps through 67 inputs (5 steps of 16 from a
    multiple of 16), not the row; a 3 x 3 window on 12 x 10 in tiles of 16 pixels (two rows) through its rows."""
    causal = ConvSpec(8, 8, 8, (1, 4), (1, 1), (0, 0, 3, 0))
    assert reached_pixels(causal, 640, 64, 16, 1, 2048, 1, 2048) == (624, 704)
    assert dense_steps(causal, 64, 16, 1, 2048, 1, 2048) == 32 * 5 - 1  # the first tile reads no input before 0
    spec = ConvSpec(2, 2, 2, (3, 3), (1, 1), (1, 1, 1, 1))
    assert reached_pixels(spec, 32, 16, 16, 12, 10, 12, 10) == (16, 60)  # output rows 3-4: input rows 2-5


SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem
    rows = []
    for layer in suites.load_suite("secondary").layers:
        if layer.id not in ("replknet-dw27", "convnext-dw7-768"):
            continue
        for layout in ("nhwc", "nchw"):
            for kind in ("forward", "grad_input", "grad_weight"):
                problem = layer.problem("bfloat16", layout)
                row = inspect_problem(problem if kind == "forward" else problem.backward(kind))
                rows.append({"layer": layer.id, "layout": layout, "kind": kind, "family": row.family,
                             "spill": row.figures.spill_bytes, "tc": row.figures.tensor_core,
                             "bytes": row.requested_over_ideal_bytes, "percent": row.model.percent_of_floor})
    print(json.dumps(rows))
""")


@pytest.fixture(scope="module")
def small_map_rows() -> list:
    """RepLKNet's dw27 on 14 x 14 and ConvNeXt's dw7 on 7 x 7 (768 channels), each kind in both layouts, as
    inspect compiles them for sm_90: one subprocess for the file's two tests."""
    return compiled_rows(SCRIPT)


def test_small_maps_run_dense_on_tensor_cores_for_sm90(small_map_rows):
    """Forward and input gradient: the dense kernel, no spill, on wgmma (NCHW) or mma.sync (the batched dot),
    and under inspect's model at least 25% of the floor (the band before: 2.8-3.1% and 18.9%)."""
    rows = [row for row in small_map_rows if row["kind"] != "grad_weight"]
    assert len(rows) == 8
    for row in rows:
        assert row["family"] == "depthwise_dense" and row["spill"] == 0, row
        assert row["tc"] == ("wgmma" if row["layout"] == "nchw" else "mma.sync"), row
        assert row["percent"] >= 25, row


# ---------------------------------------------------------------------------------------------- grad-weight

# channels, multiplier, batch, (H, W) of x, kernel, stride, padding (top, bottom, left, right), dilation, config:
# a 9 x 9 window on a 5 x 5 map (past the map on every side); ConvNeXt's 7 x 7 on 7 x 7 at the interpreter's
# default; a 20 x 18 map, past one tile of 16 x 16 output pixels both ways (tiles of input columns each reaches);
# stride 2 x 3 with dilation 2 in height and uneven padding; a channel multiplier of 2; padding past the window's
# reach; an output of width 1; one row of 40 columns at stride 2 (a 1-D conv's, several column tiles); a 1 x 1
# window; 17 images (two steps of 16 samples). Tiles taken row by input row (16 x 16), then square ones (8 x 8)
GRAD_WEIGHT_CASES = [
    (3, 1, 2, (5, 5), (9, 9), (1, 1), (4, 4, 4, 4), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 2, (7, 7), (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), None),
    (2, 1, 1, (20, 18), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (3, 1, 2, (9, 11), (3, 5), (2, 3), (2, 0, 1, 3), (2, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (2, 2, 2, (6, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 1, (4, 6), (3, 3), (1, 1), (3, 2, 3, 3), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 2, (6, 1), (3, 1), (1, 1), (1, 1, 0, 0), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 2, (1, 40), (1, 9), (1, 2), (0, 0, 4, 3), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 2, (3, 4), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    (2, 1, 17, (3, 3), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), KernelConfig(16, 16, 16, num_stages=1)),
    # square tiles of 8 x 8 paired with input tiles: ConvNeXt's 7 x 7 on 7 x 7; a 9 x 9 window on 5 x 5; a 19 x 17
    # map (three tiles of output rows, each reaching several input tiles); stride 2 x 3 with dilation 2 in
    # height; a channel multiplier of 2; an output of width 1; 17 images
    (2, 1, 2, (7, 7), (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), KernelConfig(16, 8, 8, num_stages=1)),
    (3, 1, 2, (5, 5), (9, 9), (1, 1), (4, 4, 4, 4), (1, 1), KernelConfig(16, 8, 8, num_stages=1)),
    (2, 1, 1, (19, 17), (3, 5), (1, 1), (1, 1, 2, 2), (1, 1), KernelConfig(16, 8, 8, num_stages=1)),
    (3, 1, 2, (9, 11), (3, 5), (2, 3), (2, 0, 1, 3), (2, 1), KernelConfig(16, 8, 8, num_stages=1)),
    (2, 2, 2, (6, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), KernelConfig(16, 8, 8, num_stages=1)),
    (2, 1, 2, (6, 1), (3, 1), (1, 1), (1, 1, 0, 0), (1, 1), KernelConfig(16, 8, 8, num_stages=1)),
    (2, 1, 17, (3, 3), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), KernelConfig(16, 8, 8, num_stages=1)),
]


def _grad_weight(*case, specials=(), splits=3):
    """The forced dense grad-weight of a case (twice) and torch's float64 one."""
    return depthwise_grad_weight_runs("depthwise_dense", *case, specials=specials, splits=splits)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("case", GRAD_WEIGHT_CASES)
def test_the_dense_grad_weight_matches_torch_bitwise_every_run(case, dtype, layout):
    runs, expected = _grad_weight(*case, dtype, layout)
    assert_same_every_run_and_close(runs, expected, dtype)


@pytest.mark.parametrize("side", [16, 8])
def test_a_nan_input_makes_every_tap_that_reads_it_nan_in_the_grad_weight(side):
    """Where torch's weight gradient is NaN, so is ours, in both tile forms (an inf or NaN may spread to other taps
    of its channel: the README's known limit, a pair in no window times it in the diagonal dot)."""
    runs, expected = _grad_weight(*GRAD_WEIGHT_CASES[2][:-1], KernelConfig(16, side, side, num_stages=1), "float32",
                                  "nchw", specials=((17, float("nan")), (390, float("inf"))))
    assert expected.isnan().any()
    assert runs[0][expected.isnan()].isnan().all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_training_takes_the_forced_dense_grad_weight(layout, monkeypatch, nan_filled_outputs):
    """Through autograd: conv2d's weight gradient by the dense kernel (a choice forced for it alone) matches
    torch's float64 one, and the input gradient the default's."""
    ran = spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family))
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 6, 7, generator=generator, dtype=torch.float64).contiguous(memory_format=memory)
    weight = torch.randn(4, 1, 5, 5, generator=generator, dtype=torch.float64)
    grad = torch.randn(3, 4, 6, 7, generator=generator, dtype=torch.float64)
    x32, w32 = (t.float().requires_grad_() for t in (x, weight))
    forced = Choice(KERNEL, KernelConfig(16, 16, 16, num_stages=1), "depthwise_dense")
    with choice.overridden(lambda spec, kind, *_: forced if kind == "grad_weight" else DEFAULT, every_call=False):
        gconvgen.conv2d(x32, w32, None, 1, 2, 1, 4).backward(grad.float())
    x64, w64 = (t.clone().requires_grad_() for t in (x, weight))
    F.conv2d(x64, w64, None, 1, 2, 1, 4).backward(grad)
    assert ("grad_weight", "depthwise_dense") in ran, ran
    assert_close(w32.grad, w64.grad, torch.float32)
    assert_close(x32.grad, x64.grad, torch.float32)


def _grad_weight_pixels(batch, size):
    return PixelSpace.of("grad_weight", batch, *size, *size)


@pytest.mark.parametrize("kernel, size, batch, dtype, claimed", [
    ((27, 27), (14, 14), 64, "bfloat16", True),   # RepLKNet's dw27 (0.27 input pixels a tap), tiles of rows
    ((5, 5), (14, 14), 64, "bfloat16", True),     # 7.8 pixels a tap
    ((3, 3), (14, 14), 64, "bfloat16", False),    # 21.8: the band's
    ((9, 9), (14, 14), 32, "bfloat16", False),    # tiles of rows from 64 samples
    ((7, 7), (7, 7), 32, "float16", True),        # ConvNeXt's dw7 on its last stage, square tiles from 32 samples
    ((3, 3), (7, 7), 64, "bfloat16", True),       # 5.4 pixels a tap
    ((7, 7), (7, 7), 16, "bfloat16", False),
    ((7, 7), (7, 7), 64, "float32", False),       # float32 takes the band (its float32 windows) or direct
    ((7, 7), (17, 7), 64, "bfloat16", False),     # past one tile of 16 output rows
    ((1, 9), (1, 16), 64, "bfloat16", False),     # one output row: a 1-D conv's
])
def test_the_dense_grad_weight_claims_one_tile_of_a_small_map(kernel, size, batch, dtype, claimed):
    """DepthwiseDense.claims for the weight gradient: half precision, one tile of 16 x 16 output pixels (two rows
    or more) whose input has at most 8 pixels a tap (DENSE_GRAD_WEIGHT_PIXELS_PER_TAP), from a batch of 32 on maps
    of 8 x 8 or less (square tiles), of 64 past them (DENSE_GRAD_WEIGHT_LEAST_BATCH)."""
    spec = ConvSpec(8, 8, 8, kernel, padding=tuple(k // 2 for k in kernel for _ in (0, 1)), dtype=dtype)
    families = plan(spec).grad_weight_families
    assert "depthwise_dense" in families and families[0] != "depthwise_dense"
    first = suiting_first(families, spec, "grad_weight", _grad_weight_pixels(batch, size))[0]
    assert (first == "depthwise_dense") == claimed


def test_the_dense_grad_weight_default_steps_through_samples():
    """On a GPU, steps of 64 samples in NCHW tiles of 16 x 16 output pixels taken row by input row, 32 in
    channels_last or in square tiles of 8 x 8 paired with input tiles where they cover the map (fewer where the
    batch has fewer); a config that would hold too much, or tiles neither, is refused with what to change."""
    from gconvgen.compiler.families import default_config
    for layout, samples in (("nchw", 64), ("nhwc", 32)):  # channels_last: two channels a program
        spec = ConvSpec(512, 512, 512, (27, 27), padding=(13, 13, 13, 13), dtype="bfloat16", layout=layout)
        config = default_config(spec, "depthwise_dense", "grad_weight", interpret=False,
                                pixels=_grad_weight_pixels(64, (14, 14)))
        assert (config.block_m, config.block_n, config.block_k) == (samples, 16, 16)
        small = default_config(spec, "depthwise_dense", "grad_weight", interpret=False,
                               pixels=_grad_weight_pixels(20, (7, 7)))
        assert (small.block_m, small.block_n, small.block_k) == (32, 8, 8)
    spec = ConvSpec(8, 8, 8, (7, 7), padding=(3, 3, 3, 3), dtype="bfloat16", layout="nhwc")
    x, grad_out = torch.randn(2, 8, 7, 7).bfloat16(), torch.randn(2, 8, 7, 7).bfloat16()
    grad_w = torch.empty(8, 1, 7, 7, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block_m=256, block_n=16.*use fewer samples"):
        launch.grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, KernelConfig(256, 16, 16), "depthwise_dense"))
    with pytest.raises(ValueError, match="block_n=8, block_k=16: .* or 8 both"):
        launch.grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, KernelConfig(16, 8, 16), "depthwise_dense"))
    with pytest.raises(ValueError, match="block_n=8, block_k=8: the depthwise_dense forward takes tiles of 16"):
        launch.forward(spec, x, grad_w, None, torch.empty_like(x),
                       Choice(KERNEL, KernelConfig(16, 8, 8), "depthwise_dense"))


def test_windows_too_wide_for_the_held_tiles_are_not_offered():
    """The least tile holds a diagonal matrix of 256 pairs x the tap columns: windows up to 128 columns in NCHW, 64
    in channels_last (two channels a program) are offered; wider ones are not."""
    def offered(width, layout):
        spec = ConvSpec(8, 8, 8, (1, width), dtype="bfloat16", layout=layout)
        return "depthwise_dense" in plan(spec).grad_weight_families
    assert offered(128, "nchw") and not offered(129, "nchw")
    assert offered(64, "nhwc") and not offered(65, "nhwc")


def test_small_map_weight_gradients_run_dense_for_sm90(small_map_rows):
    """Their weight gradients (RepLKNet's in tiles of rows, ConvNeXt's in square tiles): the dense kernel, no
    spill, tensor cores, x and grad_out read about once, and in the model at 35% of the floor or more (the band:
    3.7-3.9% and 6.9-14.7%)."""
    rows = [row for row in small_map_rows if row["kind"] == "grad_weight"]
    assert len(rows) == 4
    for row in rows:
        assert row["family"] == "depthwise_dense" and row["spill"] == 0 and row["tc"] != "none", row
        assert row["percent"] >= 35 and row["bytes"] <= 1.5, row


@pytest.mark.parametrize("side", [16, 8])
def test_an_inf_grad_out_makes_every_tap_of_its_channel_nonfinite(side):
    """torch multiplies each grad_out element by every tap's input, the padding's zeros included, so an inf one
    turns each tap of its channel inf or NaN, those only the padding reaches too (here a 5-row window on a map of
    1 row, as in the long fuzz's case, where kernel rows 3 and 4 came out 0). Ours: NaN where torch's is NaN,
    non-finite where it is inf (the README's known limit); the other channels as torch's."""
    spec = ConvSpec(3, 3, 3, (5, 4), (3, 2), (4, 4, 1, 2), (2, 1), False, "float32", "nchw")
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 1, 4, generator=generator, dtype=torch.float64)
    padded = F.pad(x, (1, 2, 4, 4))
    grad_out = torch.randn(F.conv2d(padded, torch.zeros(3, 1, 5, 4, dtype=torch.float64), None, (3, 2), 0, (2, 1),
                                    3).shape, generator=generator, dtype=torch.float64)
    grad_out[1, 2, 0, 1] = float("-inf")
    expected = torch.nn.grad.conv2d_weight(padded, (3, 1, 5, 4), grad_out, (3, 2), 0, (2, 1), 3)
    assert not expected[2].isfinite().any() and expected[2].isnan().any() and expected[:2].isfinite().all()
    got = torch.full((3, 1, 5, 4), float("nan"))
    launch.grad_weight(spec, x.float(), grad_out.float(), got, Choice(KERNEL, KernelConfig(16, side, side),
                                                                      "depthwise_dense"))
    assert not got[2].isfinite().any() and got[2][expected[2].isnan()].isnan().all()
    torch.testing.assert_close(got[:2].double(), expected[:2], atol=1e-4, rtol=1e-4)
