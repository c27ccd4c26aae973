"""The banded depthwise weight gradient (templates/depthwise_gemm_grad_weight.py.jinja): which convs it serves
and by default, that it matches torch's float64 weight gradient on the shapes its lowering branches on (every
element written, splits added in a fixed order, so bitwise the same run to run), and, compiled for sm_90 as a
launch would specialise it, the shape the training issue asks of it. The property-based fuzz
(tests/test_fuzz.py test_gradients) forces it too; these are its named edges."""
from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import assert_same_every_run_and_close, depthwise_grad_weight_runs
from gconvgen.compiler.lowering import KERNEL, Choice
from gconvgen.compiler.plan import plan
from gconvgen.compiler.tiles import KernelConfig
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from test_sm90_compile import compiled_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def test_half_precision_depthwise_weight_gradients_default_to_tensor_cores():
    depthwise = dict(in_channels=8, out_channels=8, groups=8, kernel_size=(3, 3))
    # (the dense kernel claims small maps at launch: tests/test_dense_depthwise.py)
    assert plan(ConvSpec(**depthwise, dtype="bfloat16")).grad_weight_families == ("depthwise_gemm", "depthwise",
                                                                                 "depthwise_dense")
    assert plan(ConvSpec(**depthwise, dtype="float16")).grad_weight_families[0] == "depthwise_gemm"
    assert plan(ConvSpec(8, 8, 2, (3, 3), dtype="bfloat16")).grad_weight_families == ("igemm_rows", "igemm")


@pytest.mark.parametrize("kernel, stride, layout, dtype, first", [
    ((3, 3), (1, 1), "nchw", "float32", "depthwise_gemm"),
    ((1, 4), (1, 1), "nchw", "float32", "depthwise_gemm"),    # Mamba's k4
    ((1, 64), (1, 1), "nchw", "float32", "depthwise_gemm"),
    ((1, 2), (1, 1), "nchw", "float32", "depthwise"),         # too few taps for the band's waste
    ((1, 65), (1, 1), "nchw", "float32", "depthwise"),        # wider windows spilled (k256: 56 B)
    ((9, 9), (1, 1), "nchw", "float32", "depthwise"),
    ((3, 3), (2, 2), "nchw", "float32", "depthwise"),         # stride 2 spilled (956 B)
    ((3, 3), (1, 1), "nhwc", "float32", "depthwise"),         # the batched dot spilled KBs
    ((3, 3), (1, 1), "strided", "float32", "depthwise"),
    ((3, 3), (1, 1), "nchw", "float64", "depthwise"),
])
def test_float32_nchw_depthwise_weight_gradients_at_stride_1_take_the_band_by_default(kernel, stride, layout, dtype,
                                                                                       first):
    """Float32 NCHW windows of 3 to 64 taps at stride 1 (families.depthwise_gemm.FLOAT32_GRAD_WEIGHT_TAPS):
    the direct kernel's loop is issue-bound there, and the band's dot (FFMA, or TF32 where torch allows it)
    models 1.3-11x better."""
    spec = ConvSpec(8, 8, 8, kernel, stride, dtype=dtype, layout=layout)
    assert plan(spec).grad_weight_families[0] == first
    assert set(plan(spec).grad_weight_families) == {"depthwise", "depthwise_gemm", "depthwise_dense"}


@pytest.mark.parametrize("dtype, width, family", [
    ("bfloat16", 6, "depthwise"), ("bfloat16", 7, "depthwise_gemm"), ("bfloat16", 1, "depthwise"),
    ("float32", 7, "depthwise"), ("float32", 8, "depthwise_gemm")])
def test_rows_narrower_than_seven_columns_take_the_direct_kernel_by_default(dtype, width, family):
    """The banded grad-weight takes rows of 7 columns (the last stages' 7 x 7 maps) and more by default
    (families.depthwise_gemm.MIN_GRAD_WEIGHT_ROW), in float32 of 8 (MIN_FLOAT32_GRAD_WEIGHT_ROW); narrower ones
    the direct kernel."""
    spec = ConvSpec(8, 8, 8, (1, 3), padding=(0, 0, 1, 1), dtype=dtype)
    x, grad_out = (torch.randn(2, 8, 3, width).to(DTYPES[dtype]) for _ in range(2))
    prepared = launch.prepare_grad_weight(spec, x, grad_out, torch.empty(8, 1, 1, 3, dtype=DTYPES[dtype]))
    assert prepared.desc.family == family


def test_a_tuned_config_without_a_family_runs_the_family_it_was_checked_for():
    """A record naming no family is checked against the planner's first grad-weight family (choice._usable);
    the launch runs that one, even on rows narrow enough that an untuned launch takes the direct kernel."""
    spec = ConvSpec(8, 8, 8, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16")
    x, grad_out = torch.randn(1, 8, 4, 4).bfloat16(), torch.randn(1, 8, 4, 4).bfloat16()
    grad_w = torch.empty(8, 1, 3, 3, dtype=torch.bfloat16)
    assert launch.prepare_grad_weight(spec, x, grad_out, grad_w).desc.family == "depthwise"
    tuned = launch.prepare_grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, KernelConfig(16, 4, 16, 4, 1), None))
    assert tuned.desc.family == "depthwise_gemm"


def test_a_grad_input_choice_of_a_family_without_that_kernel_is_refused():
    # a stride of 3 along the width: the banded grad-input's strips would not start on whole grad_out columns
    spec = ConvSpec(8, 8, 8, (3, 3), (2, 3), (1, 1, 1, 1))
    grad_out, weight = torch.randn(1, 8, 3, 2), torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match="family='depthwise_gemm' cannot compute the grad_input kernel .* transposed"):
        launch.grad_input(spec, grad_out, weight, torch.empty(1, 8, 5, 5), Choice(KERNEL, None, "depthwise_gemm"))


def test_a_family_without_that_grad_weight_kernel_is_refused():
    spec = ConvSpec(8, 8, 2, (3, 3), dtype="bfloat16")
    x, grad_out = torch.randn(1, 8, 5, 5).bfloat16(), torch.randn(1, 8, 3, 3).bfloat16()
    with pytest.raises(ValueError, match="family='depthwise_gemm' cannot compute the grad_weight kernel"):
        launch.grad_weight(spec, x, grad_out, torch.empty(8, 4, 3, 3, dtype=torch.bfloat16),
                           Choice(KERNEL, None, "depthwise_gemm"))


# channels, multiplier, (H, W), kernel, stride, padding (top, bottom, left, right), dilation, config: each row is
# an edge of the kernel: a halo tile or none, stride 3 (a main tile past BLOCK_K x stride), dilation, a last pass
# holding fewer kernel rows, one output column, a 1 x 1 map, a channel multiplier, strips past one row; in
# columns of strips (strip_columns): columns of several row tiles, the last past the map, dilation in height,
# one output row, a map shorter than the window, stride 3 in height (rows 2 and 3 above take stride 2), stride
# with dilation, a last pass holding fewer kernel rows
CASES = [
    (5, 1, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (3, 1, (7, 40), (5, 5), (1, 2), (2, 2, 1, 1), (1, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (2, 1, (5, 13), (3, 3), (2, 3), (1, 1, 1, 1), (1, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (3, 1, (6, 9), (1, 7), (1, 1), (0, 0, 3, 3), (1, 2), KernelConfig(32, 4, 16, num_stages=1)),
    (2, 2, (8, 8), (7, 2), (2, 1), (3, 3, 0, 0), (1, 1), KernelConfig(16, 1, 32, num_stages=1)),
    (4, 1, (6, 3), (3, 3), (1, 1), (1, 1, 0, 0), (1, 1), None),
    (2, 1, (1, 1), (1, 1), (1, 3), (0, 0, 0, 0), (1, 1), None),
    (3, 1, (2, 70), (1, 4), (1, 1), (0, 0, 3, 0), (1, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (3, 1, (37, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (2, 1, (11, 6), (5, 3), (1, 1), (2, 2, 1, 1), (2, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (2, 1, (5, 7), (5, 3), (1, 1), (0, 0, 1, 1), (1, 1), None),
    (3, 1, (2, 5), (7, 3), (1, 1), (3, 3, 1, 1), (1, 1), KernelConfig(16, 1, 16, num_stages=1)),
    (3, 1, (31, 9), (3, 3), (3, 1), (1, 2, 1, 1), (1, 1), KernelConfig(32, 2, 16, num_stages=1)),
    (2, 1, (13, 7), (3, 3), (2, 1), (2, 2, 1, 1), (2, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (2, 1, (12, 6), (9, 3), (1, 1), (4, 4, 1, 1), (1, 1), KernelConfig(32, 2, 16, num_stages=1)),
    # in pieces (strip_pieces): a causal k40 (its band one column early in NCHW float32), a k33 centred on a row
    # shorter than the window plus its padding, a k64 on two rows of two tiles of 16 strips, a k35 on a map of 3
    # rows with padding rows (a height-1 window on a 2-D map)
    (3, 1, (1, 100), (1, 40), (1, 1), (0, 0, 39, 0), (1, 1), None),
    (3, 1, (1, 20), (1, 33), (1, 1), (0, 0, 16, 16), (1, 1), KernelConfig(16, 2, 16, num_stages=1)),
    (2, 2, (2, 270), (1, 64), (1, 1), (0, 0, 63, 0), (1, 1), KernelConfig(16, 4, 16, num_stages=1)),
    (2, 1, (3, 40), (1, 35), (2, 1), (1, 0, 5, 3), (1, 1), KernelConfig(32, 1, 32, num_stages=1)),
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("channels, multiplier, size, kernel, stride, padding, dilation, config", CASES)
def test_banded_grad_weight_matches_torch_bitwise_every_run(channels, multiplier, size, kernel, stride, padding,
                                                            dilation, config, dtype, layout):
    runs, expected = depthwise_grad_weight_runs("depthwise_gemm", channels, multiplier, 2, size, kernel, stride,
                                                padding, dilation, config, dtype, layout)
    assert_same_every_run_and_close(runs, expected, dtype)


@pytest.mark.parametrize("size, kernel, padding, config, pieces, shift", [
    ((1, 100), (1, 40), (0, 0, 39, 0), None, 4, 1),
    ((2, 270), (1, 64), (0, 0, 63, 0), KernelConfig(16, 4, 16, num_stages=1), 5, 1),
    ((1, 100), (1, 32), (0, 0, 31, 0), None, 0, 1),            # PIECES_WINDOW: the flat tile
    ((1, 300), (1, 280), (0, 0, 279, 0), KernelConfig(16, 4, 16, num_stages=1), 0, 1),  # 19 pieces past 16 strips
])
def test_wide_height_one_windows_take_the_grad_weight_in_pieces(size, kernel, padding, config, pieces, shift):
    """A height-1 window wider than PIECES_WINDOW columns at stride 1 takes one row's strips in pieces where
    the pieces reach at most BLOCK_M strips past a tile's first; NCHW float32 rows aligned to 4 elements start
    its band a column early for a causal k40 or k64 (band_shift 1)."""
    spec = ConvSpec(3, 3, 3, kernel, padding=padding)
    x = torch.randn(2, 3, *size)
    grad_out = torch.randn(2, 3, size[0], size[1] + padding[2] + padding[3] - kernel[1] + 1)
    prepared = launch.prepare_grad_weight(spec, x, grad_out, torch.empty(3, 1, *kernel),
                                          Choice(KERNEL, config, "depthwise_gemm"))
    assert prepared.desc.pieces == pieces
    assert prepared.desc.band_shift == shift


SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem, prepared_launch
    rows = []
    for layer in suites.load_suite("headline").layers:
        if layer.id not in ("mbv2-dw3", "effb0-dw5", "convnext-dw7", "mamba-causal"):
            continue
        for layout in ("nchw", "nhwc"):
            problem = layer.problem("bfloat16", layout).backward("grad_weight")
            row = inspect_problem(problem)
            rows.append({"id": layer.id, "layout": layout, "family": row.family, "spill": row.figures.spill_bytes,
                         "tensor_core": row.figures.tensor_core, "bytes": row.requested_over_ideal_bytes,
                         "percent": row.model.percent_of_floor,
                         "step_rows": prepared_launch(problem).desc.step_rows})
    print(json.dumps(rows))
""")


def test_depthwise_grad_weight_on_tensor_cores_for_sm90():
    """MobileNetV2's dw3, EfficientNet's dw5, ConvNeXt's dw7 and Mamba's k4 weight gradients, as inspect
    compiles them: the banded kernel on tensor cores, no spill, within 2x the ideal bytes and at 45% of the
    floor or more in the model. The 2-D windows run in columns of strips, each input row loaded once a pass
    for every kernel row (before: 2.7-9.8x the bytes, 10-37%); Mamba's k4 (one kernel row) on wgmma in NCHW."""
    rows = compiled_rows(SCRIPT)
    assert len(rows) == 8
    for row in rows:
        assert row["family"] == "depthwise_gemm" and row["spill"] == 0, row
        assert row["tensor_core"] in ("wgmma", "mma.sync"), row
        assert (row["step_rows"] > 0) == (row["id"] != "mamba-causal"), row
        assert row["bytes"] <= 2.05, row
        assert row["percent"] >= 45.0, row
    assert all(row["tensor_core"] == "wgmma" for row in rows if row["id"] == "mamba-causal" and row["layout"] == "nchw")


def test_two_strip_widths_of_one_window_share_its_module():
    """The description of a config's tile leaves its BLOCK_K out (one module serves every config of a spec): a
    causal k33 in pieces takes 2 pieces at strips of 32 and of 64 columns, and both launches in one process run the
    one module with the taps placed by their own BLOCK_K."""
    spec = ConvSpec(2, 2, 2, (1, 33), padding=(0, 0, 32, 0), dtype="float32", layout="nhwc")
    x, grad_out = (torch.randn(1, 2, 1, 150, dtype=torch.float64) for _ in range(2))
    expected = torch.nn.grad.conv2d_weight(torch.nn.functional.pad(x, (32, 0)), (2, 1, 1, 33), grad_out, groups=2)
    x, grad_out = (t.float().contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    uris = set()
    for block_k in (32, 64):
        choice = Choice(KERNEL, KernelConfig(16, 2, block_k, num_stages=1), "depthwise_gemm")
        desc = launch.prepare_grad_weight(spec, x, grad_out, torch.empty(2, 1, 1, 33), choice).desc
        assert desc.pieces == 2
        uris.add(desc.uri)
        grad_w = torch.full((2, 1, 1, 33), float("nan"))
        launch.grad_weight(spec, x, grad_out, grad_w, choice, splits=1)
        torch.testing.assert_close(grad_w.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(uris) == 1


def test_a_grad_weight_whose_padded_units_pass_int32_takes_64_bit_offsets():
    """In pieces a row of one strip is a tile of 16 units (strips): 2**27 rows of one output column flatten to
    2**31 units, past int32 where the pixels are not (launch.describe lowers again with 64-bit offsets)."""
    from gconvgen.compiler.tiles import PixelSpace
    spec = ConvSpec(3, 3, 3, (1, 40), padding=(0, 0, 39, 0), dtype="bfloat16")
    x, grad_out = torch.randn(1, 3, 1, 1).bfloat16(), torch.randn(1, 3, 1, 1).bfloat16()
    tensors = (x, grad_out, torch.empty(3, 1, 1, 40, dtype=torch.bfloat16))
    choice = Choice(KERNEL, None, "depthwise_gemm")
    for rows, wide in ((2 ** 20, False), (2 ** 27, True)):
        desc = launch.describe(spec, "grad_weight", tensors, choice, PixelSpace.of("grad_weight", rows, 1, 1, 1, 1))
        assert desc.pieces and desc.wide_index == wide, (rows, desc.config, desc.reduction_units(
            PixelSpace.of("grad_weight", rows, 1, 1, 1, 1)))


PIECES_SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem, prepared_launch
    rows = []
    for layer in suites.load_suite("sequence").layers:
        if layer.id not in ("causal-k64", "causal-k256"):
            continue
        for layout in ("nchw", "nhwc"):
            problem = layer.problem("bfloat16", layout).backward("grad_weight")
            row = inspect_problem(problem)
            rows.append({"id": layer.id, "layout": layout, "family": row.family, "spill": row.figures.spill_bytes,
                         "bytes": row.requested_over_ideal_bytes, "percent": row.model.percent_of_floor,
                         "pieces": prepared_launch(problem).desc.pieces})
    print(json.dumps(rows))
""")


def test_wide_causal_grad_weights_in_pieces_for_sm90():
    """The causal k64 and k256 weight gradients (cuDNN's widest) as inspect compiles them: in pieces, within
    1.3x the ideal bytes (the flat tile re-read each input column for every strip whose band held it: k256
    4.97x / 8.95x, 20.1 / 11.2% of the floor), no spill, and at 50% of the floor or more in the model."""
    rows = compiled_rows(PIECES_SCRIPT)
    assert len(rows) == 4
    for row in rows:
        assert row["family"] == "depthwise_gemm" and row["pieces"] > 0 and row["spill"] == 0, row
        assert row["bytes"] <= 1.3 and row["percent"] >= 50.0, row


def test_the_gpu_search_space_keeps_one_kernel_rows_accumulators_in_registers():
    """No pass holds less than one kernel row: the space drops configs whose row of accumulators passes 128
    registers a thread, before its layout rule (causal k256 in channels_last fits 4 channels at most)."""
    from gconvgen.autotune.space import DeviceFacts, Problem, load_space
    from gconvgen.compiler.families import family
    spec = ConvSpec(128, 128, 128, (1, 256), padding=(0, 0, 255, 0), dtype="bfloat16", layout="nhwc")
    problem = Problem(spec, 8, 1, 2048, "grad_weight")
    kept = load_space("grad_weight_depthwise_gemm", "gpu").stage_one(problem, DeviceFacts("NVIDIA H200", 132, 232448))
    assert kept and max(config.block_n for config in kept) <= 4
    for config in kept:
        assert family("depthwise_gemm").accumulator_registers(config, spec, "grad_weight") <= 128 * 32 * config.num_warps


@pytest.mark.parametrize("layout, least", [("nhwc", 1), ("nchw", 4)])
def test_a_dot_batched_over_channels_splits_a_small_maps_reduction_down_to_one_block(layout, least):
    """ConvNeXt's dw7 at batch 1 (96 channels, 56 x 56): channels_last's few channel tiles split their strips
    down to one block a split to fill an H200 (24 programs otherwise); NCHW's one-channel dot keeps four blocks
    a split, each of which sums its taps' diagonals once a channel."""
    from gconvgen.compiler.lowering import PixelSpace, default_config, lower
    from gconvgen.compiler.tiles import H200_SMS
    spec = ConvSpec(96, 96, 96, (7, 7), padding=(3, 3, 3, 3), dtype="bfloat16", layout=layout)
    pixels = PixelSpace.of("grad_weight", 1, 56, 56, 56, 56)
    config = default_config(spec, "depthwise_gemm", "grad_weight", interpret=False, pixels=pixels)
    desc = lower(plan(spec), "grad_weight", choice=Choice(KERNEL, config, "depthwise_gemm"), interpret=False,
                 allow_tf32=False)
    assert desc.least_split_blocks == least
    units = desc.reduction_units(pixels)
    blocks = -(-units // desc.reduction_block)
    tiles = -(-96 // config.block_n)
    splits, per_split = launch.split_pixels(units, desc.reduction_block, tiles, 4 * H200_SMS,
                                            least_blocks=desc.least_split_blocks)
    assert splits == max(1, min(-(-4 * H200_SMS // tiles), blocks // least)), (splits, blocks, tiles)
    assert per_split >= least * desc.reduction_block or splits == 1
    if layout == "nhwc":
        assert splits > 1  # one block a split: more programs than channel tiles


@pytest.mark.parametrize("taps, layout, expected", [
    (2, "nhwc", (16, 4, 32, 8)), (4, "nhwc", (16, 4, 32, 8)), (32, "nhwc", (16, 4, 32, 8)),
    (64, "nhwc", (32, 4, 16, 4)), (128, "nhwc", (32, 2, 16, 4)), (256, "nhwc", (32, 1, 16, 4)),
    (64, "nchw", (32, 4, 16, 4)), (128, "nchw", (32, 2, 16, 4)), (256, "nchw", (32, 1, 16, 4))])
def test_conv1d_weight_gradient_defaults(taps, layout, expected):
    """channels_last windows up to PIECES_WINDOW columns: 16 strips of 32 columns a step, 4 channels batched.
    Wider ones in pieces (DepthwiseGemm._pieces_config), either layout: 32 strips of 16 columns a step on 4
    warps, 4 channels, halved while their accumulators pass 64 registers a thread (k128: 2, k256: 1)."""
    from gconvgen.compiler.lowering import default_config
    spec = ConvSpec(1536, 1536, 1536, (1, taps), padding=(0, 0, taps - 1, 0), dtype="bfloat16", layout=layout)
    config = default_config(spec, "depthwise_gemm", "grad_weight", interpret=False)
    assert (config.block_m, config.block_n, config.block_k, config.num_warps) == expected
