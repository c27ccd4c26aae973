"""The implicit GEMM that slides down the output rows (families/igemm_rows.py, templates/grouped_igemm_rows.py.jinja):
its named edges against torch's float64 conv (every output element written), its sums against the flat igemm's,
when it is the default, and, compiled for sm_90 as a launch would specialise it, what it saves; the same for its
grad-weight (templates/grouped_igemm_rows_grad_weight.py.jinja). The property-based fuzz (tests/test_fuzz.py
test_conv2d_forward_igemm_rows, test_gradients) forces both too, on programs of 1 to 3 rows."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from conftest import reference_conv2d
from gconvgen.compiler.families import igemm_rows
from gconvgen.compiler.lowering import KERNEL, Choice
from gconvgen.compiler.plan import plan
from gconvgen.compiler.tiles import KernelConfig
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from test_sm90_compile import compiled_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SMALL = KernelConfig(16, 16, 16, num_stages=1)

# in, out, groups, (H, W), kernel, stride, padding (top, bottom, left, right), dilation, config: each row is an edge
# of the sliding rows: more rows than a program takes (three programs of 7 rows for 19, the last short), a
# stride in height (two input rows a step) and one past the window (a phase no kernel row reads), dilation in
# height (open rows no kernel row of a phase reaches), padding past the map, one output row, a map shorter than
# the window, a one-row window, packed groups over two channel steps, uneven groups under 'pad'
CASES = [
    (8, 8, 2, (19, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "strict", SMALL),
    (8, 12, 4, (11, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "strict", None),
    (6, 6, 3, (19, 4), (3, 2), (2, 1), (1, 2, 0, 1), (1, 1), "strict", SMALL),
    (4, 6, 2, (9, 9), (2, 3), (3, 2), (0, 1, 1, 1), (2, 1), "strict", None),
    (4, 4, 1, (10, 3), (5, 1), (1, 1), (2, 2, 0, 0), (2, 1), "strict", SMALL),
    (6, 4, 2, (3, 3), (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), "strict", None),
    (6, 4, 2, (1, 4), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "strict", None),
    (9, 6, 3, (5, 5), (1, 3), (1, 1), (0, 0, 1, 1), (1, 1), "strict", None),
    (40, 40, 2, (17, 3), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "strict", KernelConfig(16, 32, 16, num_stages=1)),
    (7, 5, 2, (12, 7), (3, 3), (1, 1), (2, 2, 1, 1), (1, 1), "pad", SMALL),
    (112, 112, 2, (6, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "strict", None),  # 56 a group: one step of 64, held
    # 64 a group at a stride of 2: two open rows, NCHW read in place (IgemmRows.reads_in_place), weights held
    (128, 128, 2, (7, 6), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "strict", None),
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("in_c, out_c, groups, size, kernel, stride, padding, dilation, policy, config", CASES)
def test_sliding_rows_match_torch(in_c, out_c, groups, size, kernel, stride, padding, dilation, policy, config,
                                  dtype, layout):
    generator = torch.Generator().manual_seed(hash((in_c, size, kernel, stride)) % 2**31)
    ci = -(-in_c // groups)
    x = torch.randn(2, in_c, *size, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    weight = torch.randn(out_c, ci, *kernel, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    bias = torch.randn(out_c, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    spec = ConvSpec(in_c, out_c, groups, kernel, stride, padding, dilation, True, dtype, layout, policy)
    padded_x = torch.nn.functional.pad(x.double(), (0, 0, 0, 0, 0, ci * groups - in_c))
    padded_w = torch.nn.functional.pad(weight.double(), (0, 0, 0, 0, 0, 0, 0, -(-out_c // groups) * groups - out_c))
    padded_b = torch.nn.functional.pad(bias.double(), (0, padded_w.shape[0] - out_c))
    expected = reference_conv2d(padded_x, padded_w, padded_b, stride, padding, dilation, groups)[:, :out_c]
    out = torch.full(expected.shape, float("nan"), dtype=DTYPES[dtype])
    prepared = launch.prepare_forward(spec, x, weight, bias, out, Choice(KERNEL, config, "igemm_rows"))
    assert prepared.desc.family == "igemm_rows"
    launch.run(prepared)
    assert not out.isnan().any(), "an output element was not written"
    tolerance = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert (out.double() - expected).abs().max().item() <= tolerance * (expected.abs().max().item() + 1.0)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_each_output_row_sums_its_taps_as_the_flat_igemm_does(layout):
    """One channel step a tap: kernel row by kernel row, column by column, the flat kernel's order, so the two
    agree bitwise in float32. Each group's input is one channel (the other three are zeros), so every tap's dot
    is one product, exact whatever order the interpreter's matmul sums in (numpy's BLAS picks its kernel by the
    machine and the operands' memory, and on some machines sums a 16-deep dot differently for the two
    kernels' tiles); the sum over the taps, in float32, then differs unless the kernels add them in one order."""
    spec = ConvSpec(8, 8, 2, (3, 3), (1, 1), (1, 1, 1, 1), layout=layout)
    x, weight = torch.randn(2, 8, 13, 6), torch.randn(8, 4, 3, 3)
    x[:, [1, 2, 3, 5, 6, 7]] = 0.0  # each group's first input channel only
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    outputs = []
    for family in ("igemm", "igemm_rows"):
        out = torch.full((2, 8, 13, 6), float("nan"))
        launch.forward(spec, x, weight, None, out, Choice(KERNEL, SMALL, family))
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("in_c, groups, batch, size, kernel, first", [
    (128, 32, 64, 56, (3, 3), "igemm_rows"),   # ResNeXt-50 layer 1
    (336, 14, 64, 14, (3, 3), "igemm_rows"),   # RegNetY-1.6GF stage 3: 24 channels a group
    (896, 16, 64, 14, (3, 3), "igemm_rows"),   # RegNetY-8GF stage 3: 56 a group, its weights held (one step)
    (2048, 16, 64, 14, (3, 3), "igemm"),       # 128 a group: weights re-read every step, wider than 32 outputs
    (888, 37, 32, 7, (3, 3), "igemm"),         # RegNetY-1.6GF stage 4: its grid at 64 pixels would not fill an H200
    (128, 32, 64, 56, (1, 3), "igemm"),        # a one-row window reads each input row once either way
])
def test_the_default_slides_down_rows_of_narrow_groups_on_maps_that_fill_the_device(in_c, groups, batch, size,
                                                                                    kernel, first):
    spec = ConvSpec(in_c, in_c, groups, kernel, padding=(kernel[0] // 2,) * 2 + (kernel[1] // 2,) * 2,
                    dtype="bfloat16", layout="nhwc")
    x = torch.empty(batch, in_c, size, size, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.empty(in_c, in_c // groups, *kernel, dtype=torch.bfloat16)
    out = torch.empty(batch, in_c, size, size, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert launch.prepare_forward(spec, x, weight, None, out).desc.family == first


@pytest.mark.parametrize("kernel, offered", [((7, 7), True), ((1, 49), True), ((1, 50), False), ((1, 128), False)])
def test_windows_of_more_taps_than_a_step_unrolls_are_left_to_the_flat_igemm(kernel, offered):
    """A row's step unrolls a dot a tap (a 1 x 128 window compiled for over ten minutes in float64): past
    MAX_TAPS the planner does not offer the family, and forcing it names the ones it does."""
    assert igemm_rows.MAX_TAPS == 49
    spec = ConvSpec(96, 96, 2, kernel, padding=(kernel[0] // 2,) * 2 + (kernel[1] // 2,) * 2, dtype="float64")
    assert ("igemm_rows" in plan(spec).families) == offered and "igemm" in plan(spec).families
    if not offered:
        with pytest.raises(ValueError, match=r"family='igemm_rows' cannot compute .* use one of \('igemm',\)"):
            plan(spec, family="igemm_rows")


def test_a_program_takes_the_height_in_even_parts_of_at_most_max_rows():
    assert [igemm_rows.rows_per_program(h) for h in (1, 7, 8, 9, 14, 19, 56)] == [1, 7, 8, 5, 7, 7, 8]
    assert igemm_rows.open_rows(ConvSpec(4, 4, 2, (3, 3))) == 3
    assert igemm_rows.open_rows(ConvSpec(4, 4, 2, (3, 3), (2, 2))) == 2
    assert igemm_rows.open_rows(ConvSpec(4, 4, 2, (5, 1), dilation=(2, 1))) == 9


SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem
    rows = []
    for layer in suites.load_suite("headline").layers:
        if not layer.id.startswith("resnext50"):
            continue
        for layout in ("nchw", "nhwc"):
            row = inspect_problem(layer.problem("bfloat16", layout))
            rows.append({"id": layer.id, "layout": layout, "family": row.family, "spill": row.figures.spill_bytes,
                         "tensor_core": row.figures.tensor_core, "bytes": row.requested_over_ideal_bytes,
                         "async": row.figures.cp_async_widths,
                         "percent": row.model.percent_of_floor})
    print(json.dumps(rows))
""")


def test_resnext_forwards_slide_down_rows_on_wgmma_for_sm90():
    """ResNeXt-50's grouped 3 x 3 forwards as inspect compiles them: the sliding rows on wgmma, no spill, at
    most 2.6x the ideal bytes in either layout (the flat tile requested 5.6x; NCHW staged channels_last 3.2-3.5x,
    the copy counted, where it is now read in place: IgemmRows.stages_channels_last) and at least 40% of the
    floor modelled (29-31% staged). Their one channel step's weight tiles are loaded before the rows, so the
    pipelined loop copies only 16-byte input vectors in channels_last; NCHW's 2-byte loads go through registers."""
    rows = compiled_rows(SCRIPT)
    assert len(rows) == 6
    for row in rows:
        assert row["family"] == "igemm_rows" and row["spill"] == 0 and row["tensor_core"] == "wgmma", row
        assert row["bytes"] <= 2.6 and row["percent"] >= 40, row
        assert set(row["async"]) == ({"128"} if row["layout"] == "nhwc" else set()), row


@pytest.mark.parametrize("max_rows", [1, 3, 8])
def test_a_program_takes_its_rows_from_the_grid(max_rows, monkeypatch):
    """The kernel splits the height into as many row blocks as its grid has (not by a constant of its own), so a
    description memoised under one MAX_ROWS still writes every row under another (the fuzz draws several)."""
    spec = ConvSpec(8, 8, 2, (3, 3), (1, 1), (1, 1, 1, 1))
    x, weight = torch.randn(2, 8, 9, 5), torch.randn(8, 4, 3, 3)
    expected = reference_conv2d(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 2)
    for rows in (max_rows, igemm_rows.MAX_ROWS):
        monkeypatch.setattr(igemm_rows, "MAX_ROWS", rows)
        out = torch.full((2, 8, 9, 5), float("nan"))
        launch.forward(spec, x, weight, None, out, Choice(KERNEL, SMALL, "igemm_rows"))
        assert not out.isnan().any(), f"rows not written at MAX_ROWS {rows}"
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def _grad_weight_of(in_c, out_c, groups, size, kernel, stride, padding, dilation, policy, dtype, layout):
    """(spec, x, grad_out, torch's float64 weight gradient) of a CASES row, the last two from the channel-padded
    conv the plan computes, its padded output channels dropped."""
    generator = torch.Generator().manual_seed(hash((in_c, size, kernel, stride, "grad_weight")) % 2**31)
    ci, co = -(-in_c // groups), -(-out_c // groups)
    x = torch.randn(2, in_c, *size, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    spec = ConvSpec(in_c, out_c, groups, kernel, stride, padding, dilation, False, dtype, layout, policy)
    padded_x = torch.nn.functional.pad(x.double(), (0, 0, 0, 0, 0, ci * groups - in_c))
    weight64 = torch.randn(co * groups, ci, *kernel, generator=generator, dtype=torch.float64, requires_grad=True)
    out64 = reference_conv2d(padded_x, weight64, None, stride, padding, dilation, groups)
    grad_out = torch.randn(out64.shape, generator=generator, dtype=torch.float64)[:, :out_c].to(DTYPES[dtype])
    expected, = torch.autograd.grad(out64[:, :out_c], weight64, grad_out.double())
    return spec, x, grad_out, expected[:out_c]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_whole_group_grad_weight_tile_matches_torch(dtype, layout):
    """The GPU default grad-weight tile of 56 channels a group (RegNetY-8GF's), a group's 64 x 64 output and input
    channels a program in bfloat16 (64 x 16 in float32), under the interpreter on a small map in two splits: every
    weight element written."""
    spec, x, grad_out, expected = _grad_weight_of(112, 112, 2, (5, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1),
                                                  "strict", dtype, layout)
    config = igemm_rows.IgemmRows().default_config(spec, "grad_weight", interpret=False)
    assert (config.block_m, config.block_n) == ((64, 64) if dtype == "bfloat16" else (64, 16))
    grad_w = torch.full(expected.shape, float("nan"), dtype=DTYPES[dtype])
    launch.run(launch.prepare_grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, config, "igemm_rows"), 2))
    assert not grad_w.isnan().any(), "a weight element was not written"
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert (grad_w.double() - expected).abs().max().item() <= tolerance * (expected.abs().max().item() + 1.0)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("in_c, out_c, groups, size, kernel, stride, padding, dilation, policy, config",
                         [case for case in CASES if case[4][0] > 1])  # a one-row window has no sliding grad-weight
def test_sliding_rows_grad_weight_matches_torch(in_c, out_c, groups, size, kernel, stride, padding, dilation, policy,
                                                config, dtype, layout, splits):
    """The grad-weight sliding down the rows, at the forward's edges (CASES), in one split or three (the units of
    a split cross row blocks and images), every weight element written."""
    spec, x, grad_out, expected = _grad_weight_of(in_c, out_c, groups, size, kernel, stride, padding, dilation,
                                                  policy, dtype, layout)
    config = None if config is None else dataclasses.replace(config, block_k=16)
    grad_w = torch.full(expected.shape, float("nan"), dtype=DTYPES[dtype])
    prepared = launch.prepare_grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, config, "igemm_rows"), splits)
    assert prepared.desc.family == "igemm_rows"
    launch.run(prepared)
    assert not grad_w.isnan().any(), "a weight element was not written"
    tolerance = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert (grad_w.double() - expected).abs().max().item() <= tolerance * (expected.abs().max().item() + 1.0)


@pytest.mark.parametrize("max_rows", [1, 3, 8])
def test_the_grad_weight_takes_its_row_blocks_from_its_units(max_rows, monkeypatch):
    """The grad-weight kernel reads how many row blocks there are from its units (IgemmRows.reduction_units),
    not from a constant of its own, so a description memoised under one MAX_ROWS sums every row under
    another."""
    spec, x, grad_out, expected = _grad_weight_of(8, 8, 2, (9, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "strict",
                                                  "float32", "nchw")
    for rows in (max_rows, igemm_rows.MAX_ROWS):
        monkeypatch.setattr(igemm_rows, "MAX_ROWS", rows)
        grad_w = torch.full(expected.shape, float("nan"))
        launch.grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, SMALL, "igemm_rows"), 2)
        torch.testing.assert_close(grad_w.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_c, groups, kernel, first", [
    (128, 32, (3, 3), "igemm_rows"),   # ResNeXt-50 layer 1: 4 channels a group, four groups packed
    (336, 14, (3, 3), "igemm_rows"),   # RegNetY-1.6GF stage 3: 24 channels a group
    (896, 16, (3, 3), "igemm_rows"),   # RegNetY-8GF stage 3: 56 a group, in 64 x 64 channel tiles on 8 warps
    (128, 32, (5, 5), "igemm_rows"),   # 25 taps of 16 x 16 accumulators
    (128, 32, (7, 7), "igemm"),        # 49 taps of 16 x 16 accumulators would not fit
    (128, 32, (1, 3), "igemm"),        # a one-row window: no rows to slide down
])
def test_the_default_grad_weight_slides_down_rows_where_its_tap_accumulators_fit(in_c, groups, kernel, first):
    spec = ConvSpec(in_c, in_c, groups, kernel, dtype="bfloat16", layout="nhwc")
    assert plan(spec).grad_weight_families[0] == first


GRAD_WEIGHT_SCRIPT = SCRIPT.replace('layer.problem("bfloat16", layout)',
                                    'layer.problem("bfloat16", layout).backward("grad_weight")')


def test_resnext_grad_weights_slide_down_rows_without_spills_for_sm90():
    """ResNeXt-50's grouped 3 x 3 weight gradients as inspect compiles them: the sliding rows, no spill, at most
    2.7x the ideal bytes in channels_last (the flat kernel requested 3.0-7.6x) and 4.7x in NCHW (5.0-9.6x, the
    staging copies counted)."""
    rows = compiled_rows(GRAD_WEIGHT_SCRIPT)
    assert len(rows) == 6
    for row in rows:
        assert row["family"] == "igemm_rows" and row["spill"] == 0, row
        assert row["bytes"] <= (2.7 if row["layout"] == "nhwc" else 4.7), row


WIDE_GROUPS_SCRIPT = (GRAD_WEIGHT_SCRIPT.replace('layer.id.startswith("resnext50")', 'layer.id == "regnety8gf-s3"')
                      .replace('"family": row.family,', '"family": row.family, "config": row.config,'))


def test_a_wide_groups_grad_weight_takes_a_whole_group_in_one_tile_for_sm90():
    """RegNetY-8GF's 56 channels a group: the grad-weight tile holds a group's 64 output channels (its input is
    read once, not twice) by its 64 input channels (its grad_out read once, not four times) on 8 warps, without
    a spill, at most 3.5x the ideal bytes in channels_last and 4.5x in NCHW (64 x 16 tiles requested 5.2x and
    6.2x, 32 x 32 tiles on 4 warps 6.2x and 8.2x)."""
    rows = compiled_rows(WIDE_GROUPS_SCRIPT)
    assert len(rows) == 2
    for row in rows:
        assert row["family"] == "igemm_rows" and row["spill"] == 0, row
        assert row["config"].startswith("m64 n64"), row
        assert row["bytes"] <= (3.5 if row["layout"] == "nhwc" else 4.5), row


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("row", [0, 1, -2, -1])
@pytest.mark.parametrize("stride, padding", [((1, 1), (1, 1, 1, 1)), ((1, 1), (0, 0, 0, 0)), ((2, 1), (1, 0, 1, 1))])
def test_an_inf_or_nan_input_reaches_the_taps_torch_reaches(value, row, stride, padding):
    """A non-finite input on the first or last rows of the map, where the blocks' first and last steps pair input
    rows with open rows outside the block (rows before the map's first output row or past its last): those
    pairs are skipped, not multiplied by a zero grad_out, so a tap whose every real pair misses the value stays
    finite, as torch's does (three blocks of 3 rows, so the value sits at a block's edge too)."""
    spec, x, grad_out, _ = _grad_weight_of(8, 8, 2, (9, 5), (3, 3), stride, padding, (1, 1), "strict", "float32",
                                           "nchw")
    x = x.clone()
    x[1, 3, row, 2] = value
    weight64 = torch.zeros(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out64 = reference_conv2d(x.double(), weight64, None, stride, padding, (1, 1), 2)
    expected, = torch.autograd.grad(out64, weight64, grad_out.double())
    monkey_rows = igemm_rows.MAX_ROWS
    try:
        igemm_rows.MAX_ROWS = 3
        grad_w = torch.full(expected.shape, 7.0)
        launch.grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, SMALL, "igemm_rows"), 2)
    finally:
        igemm_rows.MAX_ROWS = monkey_rows
    assert torch.equal(grad_w.isnan(), expected.isnan()) and torch.equal(grad_w.isinf(), expected.isinf())
    finite = expected.isfinite()  # all finite where no output reads the row (stride 2, the last row)
    assert finite.any()
    torch.testing.assert_close(grad_w.double()[finite], expected[finite], atol=1e-5, rtol=1e-5)
