"""The flat igemm's default tiles for a GPU (families/igemm.py): 256 pixels up to 64 channels, reduction steps of the
power of two that pads the channels least, grad-weight columns up to 256 on 8 warps. Run under the interpreter at
exactly those tiles against torch's float64 conv (every output element written), and compiled for sm_90 as a launch
specialises them (wav2vec2's positional conv: what they save, and no spill)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_close, reference_conv2d
from gconvgen.compiler.families.igemm import Igemm, _reduction_step
from gconvgen.compiler.lowering import KERNEL, Choice
from gconvgen.compiler.tiles import KernelConfig
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from test_sm90_compile import _compiler_env, compiled_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# in, out, groups, (H, W), kernel, stride, padding (top, bottom, left, right): a 1-D window of many taps over 48
# channels a group (three reduction steps of 16) on a length shorter than the 256-pixel tile; the same over two
# tiles; a strided grouped 2-D conv (its grad-input in phases of the stride) of 24 channels a group
CASES = [
    (96, 96, 2, (1, 37), (1, 9), (1, 1), (0, 0, 4, 4)),
    (96, 96, 2, (1, 150), (1, 5), (1, 1), (0, 0, 2, 2)),
    (48, 48, 2, (7, 9), (3, 3), (2, 2), (1, 1, 1, 1)),
]


def test_a_reduction_step_pads_the_channels_least():
    channels = (4, 16, 24, 32, 48, 56, 64, 96, 112)
    assert [_reduction_step(c, 32) for c in channels] == [16, 16, 32, 32, 16, 32, 32, 32, 16]


def test_the_positional_conv_takes_256_pixels_and_256_weight_columns():
    spec = ConvSpec(768, 768, 16, (1, 128), (1, 1), (0, 0, 64, 64), bias=True, dtype="bfloat16")
    igemm = Igemm()
    forward, grad_weight = (igemm.default_config(spec, kind, interpret=False) for kind in ("forward", "grad_weight"))
    assert forward == KernelConfig(256, 64, 16, num_warps=8, num_stages=3)
    assert grad_weight == KernelConfig(64, 256, 32, num_warps=8, num_stages=3)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("in_c, out_c, groups, size, kernel, stride, padding", CASES)
def test_the_gpu_default_tiles_match_torch(in_c, out_c, groups, size, kernel, stride, padding, dtype, layout,
                                           nan_filled_outputs):
    generator = torch.Generator().manual_seed(hash((in_c, size, kernel)) % 2**31)
    x = torch.randn(2, in_c, *size, generator=generator, dtype=torch.float64)
    weight = torch.randn(out_c, in_c // groups, *kernel, generator=generator, dtype=torch.float64)
    spec = ConvSpec(in_c, out_c, groups, kernel, stride, padding, dtype=dtype, layout=layout)
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x_in, weight_in = x.to(DTYPES[dtype]).contiguous(memory_format=memory), weight.to(DTYPES[dtype])
    expected = reference_conv2d(x_in.double(), weight_in.double(), None, stride, padding, (1, 1), groups)
    grad_out = torch.randn(expected.shape, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    grad_out = grad_out.contiguous(memory_format=memory)
    igemm = Igemm()

    def choice(kind):
        return Choice(KERNEL, igemm.default_config(spec, kind, interpret=False), "igemm")

    out = torch.empty(expected.shape, dtype=DTYPES[dtype]).contiguous(memory_format=memory)
    prepared = launch.prepare_forward(spec, x_in, weight_in, None, out, choice("forward"))
    assert (prepared.desc.family, prepared.desc.config.block_m) == ("igemm", 256)
    launch.run(prepared)
    assert_close(out, expected, DTYPES[dtype])

    x_ref, weight_ref = x_in.double().requires_grad_(), weight_in.double().requires_grad_()
    reference_conv2d(x_ref, weight_ref, None, stride, padding, (1, 1), groups).backward(grad_out.double())
    grad_x = torch.empty(x_in.shape, dtype=DTYPES[dtype]).contiguous(memory_format=memory)
    prepared = launch.prepare_grad_input(spec, grad_out, weight_in, grad_x, choice("grad_input"))
    assert (prepared.desc.family, prepared.desc.kind) == ("igemm", "grad_input")
    launch.run(prepared)
    assert_close(grad_x, x_ref.grad, DTYPES[dtype])
    grad_w = launch.grad_weight(spec, x_in, grad_out, torch.empty_like(weight_in), choice("grad_weight"))
    assert_close(grad_w, weight_ref.grad, DTYPES[dtype])


SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem
    rows = []
    layer = next(layer for layer in suites.load_suite("headline").layers if layer.id == "wav2vec2-posconv")
    for layout in ("nchw", "nhwc"):
        forward = layer.problem("bfloat16", layout)
        for kind in ("forward", "grad_input", "grad_weight"):
            row = inspect_problem(forward if kind == "forward" else forward.backward(kind))
            rows.append({"layout": layout, "kind": kind, "family": row.family, "config": row.config,
                         "spill": row.figures.spill_bytes, "bytes": row.requested_over_ideal_bytes})
    print(json.dumps(rows))
""")


def test_the_positional_conv_reads_a_third_less_for_sm90():
    """wav2vec2's positional conv as inspect compiles it: every kernel on the wide tiles without a spill, at most
    56x the ideal bytes (128-pixel tiles of 32-channel steps and 64 weight columns requested 86-88x)."""
    rows = compiled_rows(SCRIPT)
    assert len(rows) == 6
    for row in rows:
        assert row["family"] == "igemm" and row["spill"] == 0, row
        assert row["bytes"] <= 56, row


# NCHW grad-inputs at a stride of 2 along the width, each program both column phases of a row phase, interleaved
# for the store (Igemm.interleaves_columns): input widths 1 (column phase 1 empty), 2, 5 and 9 (odd: the tile's
# last pixel of a row past the width), a dilation of 2 (column phase 1 reached by no tap), a stride of 3 x 2, a
# stride of 2 x 1 (rows alone); 16-pixel tiles over several programs, batch 1 and 2
INTERLEAVED = [
    # batch, (H, W), kernel, stride, padding, dilation
    (2, (5, 1), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, (3, 2), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (2, (7, 5), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, (6, 9), (3, 2), (2, 2), (1, 0, 0, 1), (1, 1)),
    (2, (8, 9), (3, 3), (2, 2), (2, 2, 2, 2), (2, 2)),
    (1, (10, 8), (3, 3), (3, 2), (1, 1, 1, 1), (1, 1)),
    (2, (6, 7), (3, 3), (2, 1), (1, 1, 1, 1), (1, 1)),
]


@pytest.mark.parametrize("batch, size, kernel, stride, padding, dilation", INTERLEAVED)
def test_an_nchw_strided_grad_input_interleaves_its_column_phases(batch, size, kernel, stride, padding, dilation,
                                                                  nan_filled_outputs):
    spec = ConvSpec(12, 24, 3, kernel, stride, padding, dilation, dtype="float32", layout="nchw")
    generator = torch.Generator().manual_seed(hash((batch, size, kernel, stride)) % 2**31)
    x = torch.randn(batch, 12, *size, generator=generator, dtype=torch.float64)
    weight = torch.randn(24, 4, *kernel, generator=generator, dtype=torch.float64)
    x_ref, weight_in = x.clone().requires_grad_(), weight.float()
    out = reference_conv2d(x_ref, weight, None, stride, padding, dilation, 3)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    out.backward(grad_out)
    # grad_out a view at a storage offset, every other channel of a wider tensor
    wide = torch.randn(grad_out.shape[0], 2 * grad_out.shape[1] + 1, *grad_out.shape[2:], generator=generator)
    wide[:, 1::2] = grad_out.float()
    grad_x = torch.empty(x.shape, dtype=torch.float32)
    prepared = launch.prepare_grad_input(spec, wide[:, 1::2], weight_in, grad_x,
                                         Choice(KERNEL, KernelConfig(16, 16, 16, num_stages=1), "igemm"))
    assert prepared.desc.interleave_columns == (stride[1] == 2)
    launch.run(prepared)
    assert_close(grad_x, x_ref.grad, torch.float32)


def test_an_nchw_strided_grad_input_stores_vectors_of_half_the_work_for_sm90(tmp_path):
    """ResNeXt-50's layer2.0 grad-input in NCHW as inspect compiles it: both column phases of a row phase a program,
    interleaved, so it issues 2x the useful FLOPs and requests at most 3.2x the ideal bytes (whole rows a phase:
    4.0x and 5.0x), its stores 16-byte vectors, no spill."""
    report = tmp_path / "inspect.json"
    done = subprocess.run([sys.executable, "-m", "gconvgen", "inspect", "--layer", "resnext50-l2-s2", "--layout", "nchw",
                           "--kind", "grad_input", "--json", str(report)], capture_output=True, text=True,
                          env=_compiler_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads(report.read_text())
    figures = row["figures"]
    assert row["family"] == "igemm" and figures["spill_bytes"] == 0, row
    assert set(figures["global_store_widths"]) == {"128"}, row
    assert row["issued_over_useful_flops"] <= 2.0 and row["requested_over_ideal_bytes"] <= 3.2, row
