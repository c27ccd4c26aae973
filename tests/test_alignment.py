"""The launch's row and pixel alignment (runtime/launch.py _aligned_rows): a kernel rounds the strides it reads
and writes down to it (templates/_shared.jinja aligned_rows) so that Triton can prove vector accesses, which is
only sound while every rounded value really is a multiple. Here each kernel that rounds is handed views whose
rows, channels or pixels are not aligned, through the launcher itself (any output strides), and must match
torch in float64 with every element written; and an aligned launch must take the rounded (vector) variant."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F

from gconvgen.compiler import codegen, lowering
from gconvgen.compiler.lowering import DEFAULT, KERNEL, Choice
from gconvgen.ir import ConvSpec
from gconvgen.runtime import launch
from conftest import assert_close


def _view(shape: tuple[int, ...], layout: str, pad: tuple[int, int, int]) -> torch.Tensor:
    """A NaN-filled [N, C, H, W]-indexed view of ``layout`` memory with ``pad`` = (channels, rows, columns) of
    slack, so that its channel, row and pixel strides are whatever the slack makes them."""
    n, c, h, w = shape
    extra_c, extra_h, extra_w = pad
    if layout == "nhwc":
        return torch.full((n, h + extra_h, w + extra_w, c + extra_c), float("nan"))[:, :h, :w, :c].permute(0, 3, 1, 2)
    return torch.full((n, c + extra_c, h + extra_h, w + extra_w), float("nan"))[:, :c, :h, :w]


SLACK = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (3, 0, 5)]
CASES = [  # channels in, out, groups, kernel, stride, padding (top, bottom, left, right), family
    (16, 16, 2, (3, 3), (1, 1), (1, 1, 1, 1), "igemm"),
    (16, 16, 16, (1, 3), (1, 1), (0, 0, 2, 0), "depthwise1d"),
    (16, 16, 16, (3, 3), (1, 1), (1, 1, 1, 1), "depthwise_gemm"),
]


@pytest.mark.parametrize("slack", SLACK, ids=lambda s: "slack-%d-%d-%d" % s)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("in_c, out_c, groups, kernel, stride, padding, family", CASES,
                         ids=[case[-1] for case in CASES])
def test_forward_into_unaligned_outputs(in_c, out_c, groups, kernel, stride, padding, family, layout, slack):
    spec = ConvSpec(in_c, out_c, groups, kernel, stride, padding, layout=layout)
    x = torch.randn(2, in_c, 5, 16)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_c, in_c // groups, *kernel)
    expected = F.conv2d(F.pad(x.double(), (padding[2], padding[3], padding[0], padding[1])), weight.double(),
                        stride=stride, groups=groups)
    out = _view(tuple(expected.shape), layout, slack)
    launch.forward(spec, x, weight, None, out, Choice(KERNEL, None, family))
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("slack", SLACK, ids=lambda s: "slack-%d-%d-%d" % s)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_igemm_grad_input_into_unaligned_views(layout, slack):
    spec = ConvSpec(16, 16, 2, (3, 3), (1, 1), (1, 1, 1, 1), layout=layout)
    grad_out, weight = torch.randn(2, 16, 5, 16), torch.randn(16, 8, 3, 3)
    if layout == "nhwc":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.grad.conv2d_input((2, 16, 5, 16), weight.double(), grad_out.double(), padding=1, groups=2)
    grad_x = _view((2, 16, 5, 16), layout, slack)
    launch.grad_input(spec, grad_out, weight, grad_x, Choice(KERNEL, None, "igemm"))
    assert_close(grad_x, expected, torch.float32)


@pytest.mark.parametrize("slack", SLACK, ids=lambda s: "slack-%d-%d-%d" % s)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("groups, family", [(2, "igemm"), (16, "depthwise_gemm")])
def test_grad_weight_from_unaligned_views(groups, family, layout, slack):
    spec = ConvSpec(16, 16, groups, (3, 3), (1, 1), (1, 1, 1, 1), layout=layout)
    x, grad_out = _view((2, 16, 5, 16), layout, slack), _view((2, 16, 5, 16), layout, slack[::-1])
    x.copy_(torch.randn(x.shape))
    grad_out.copy_(torch.randn(grad_out.shape))
    expected = torch.nn.grad.conv2d_weight(x.double(), (16, 16 // groups, 3, 3), grad_out.double(), padding=1,
                                           groups=groups)
    grad_w = torch.full((16, 16 // groups, 3, 3), float("nan"))
    launch.grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, None, family), splits=2)
    assert_close(grad_w, expected, torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_an_aligned_igemm_launch_takes_the_vector_variant(layout):
    spec = ConvSpec(16, 16, 2, (3, 3), (1, 1), (1, 1, 1, 1), layout=layout)
    x, weight = torch.randn(2, 16, 5, 16), torch.randn(16, 8, 3, 3)
    out = torch.empty(2, 16, 5, 16)
    if layout == "nhwc":
        x, out = (t.contiguous(memory_format=torch.channels_last) for t in (x, out))
    assert launch.prepare_forward(spec, x, weight, None, out, DEFAULT).desc.row_alignment == 4  # 16 B of float32
    unaligned = _view((2, 16, 5, 16), layout, (1, 1, 1))
    assert launch.prepare_forward(spec, x, weight, None, unaligned, DEFAULT).desc.row_alignment == 1


@pytest.mark.parametrize("family, channels", [("igemm", 16), ("igemm_rows", 80)])
def test_a_staged_read_stays_aligned_when_the_output_is_not(family, channels):
    """An NCHW grouped conv reads the runtime's channels_last copy of x, whose pixel starts are multiples of its
    channels: an output whose rows align nothing (7 wide, or a view with slack) leaves its reads vectors
    (desc.read_alignment), its writes elements; the result matches torch with every element written. (igemm_rows
    stages what IgemmRows.reads_in_place refuses: 40 channels a group, three open rows of 64 columns.)"""
    spec = ConvSpec(channels, channels, 2, (3, 3), (1, 1), (1, 1, 1, 1))
    x, weight = torch.randn(2, channels, 7, 7), torch.randn(channels, channels // 2, 3, 3)
    expected = F.conv2d(x.double(), weight.double(), padding=1, groups=2)
    for out in (torch.full((2, channels, 7, 7), float("nan")), _view((2, channels, 7, 7), "nchw", (1, 1, 1))):
        prepared = launch.prepare_forward(spec, x, weight, None, out, Choice(KERNEL, None, family))
        assert prepared.desc.stage_channels_last
        assert (prepared.desc.row_alignment, prepared.desc.read_alignment) == (1, 4)  # 16 or 80 float32 channels
        launch.run(prepared)
        assert_close(out, expected, torch.float32)
    grad_x = torch.full((2, channels, 7, 7), float("nan"))
    grad_out = torch.randn(2, channels, 7, 7)
    prepared = launch.prepare_grad_input(spec, grad_out, weight, grad_x, Choice(KERNEL, None, "igemm"))
    assert (prepared.desc.row_alignment, prepared.desc.read_alignment) == (1, 4)
    launch.run(prepared)
    expected = torch.nn.grad.conv2d_input((2, channels, 7, 7), weight.double(), grad_out.double(), padding=1, groups=2)
    assert_close(grad_x, expected, torch.float32)


def test_an_input_read_in_place_leaves_the_output_rows_their_own_alignment():
    """igemm_rows reads a narrow group's NCHW input in place, element by element (KernelDesc.rounds_reads is
    False): an input view whose rows align nothing (8 of 9 columns) leaves the dense output's rows their 16-byte
    alignment, and the grad-weight, which writes no activation, one alignment whatever its inputs' rows; the
    results match torch with every element written."""
    spec = ConvSpec(8, 8, 2, (3, 3), (1, 1), (1, 1, 1, 1))
    x, weight = torch.randn(2, 8, 6, 9)[..., :8], torch.randn(8, 4, 3, 3)
    out = torch.full((2, 8, 6, 8), float("nan"))
    prepared = launch.prepare_forward(spec, x, weight, None, out, Choice(KERNEL, None, "igemm_rows"))
    assert not prepared.desc.stage_channels_last and not prepared.desc.rounds_reads
    assert prepared.desc.row_alignment == 4  # the output's 8-wide rows of float32
    launch.run(prepared)
    assert_close(out, F.conv2d(x.double(), weight.double(), padding=1, groups=2), torch.float32)
    grad_out = torch.randn(2, 8, 6, 8)
    descs = [launch.prepare_grad_weight(spec, activation, grad_out, torch.empty(8, 4, 3, 3),
                                        Choice(KERNEL, None, "igemm_rows"), 1).desc
             for activation in (x, x.contiguous())]
    assert descs[0] == descs[1] and not descs[0].stage_channels_last
    grad_w = torch.full((8, 4, 3, 3), float("nan"))
    launch.run(launch.prepare_grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, None, "igemm_rows"), 1))
    expected = torch.nn.grad.conv2d_weight(x.double(), (8, 4, 3, 3), grad_out.double(), padding=1, groups=2)
    assert_close(grad_w, expected, torch.float32)


def test_a_read_alignment_equal_to_the_row_alignment_renders_and_names_the_kernel_as_without_it():
    """read_alignment is hashed into the uri and named in the source only where it differs from row_alignment
    (lowering.SAME_AS): kernels that do not use it keep their names, and Triton's cache of them."""
    spec = ConvSpec(16, 16, 2, (3, 3), (1, 1), (1, 1, 1, 1))
    x, weight = torch.randn(2, 16, 8, 8), torch.randn(16, 8, 3, 3)
    desc = launch.prepare_forward(spec, x, weight, None, torch.empty(2, 16, 8, 8), Choice(KERNEL, None, "igemm")).desc
    assert desc.read_alignment == desc.row_alignment == 4
    source = codegen.render(desc)
    assert "read_alignment" not in source and "desc.row_alignment" in source
    wider = dataclasses.replace(desc, read_alignment=8)
    assert wider.uri != desc.uri and "desc.read_alignment" in codegen.render(wider)
    digest = desc.uri.rsplit("_", 1)[1]  # the hash of every source field but read_alignment
    fields = tuple((name, getattr(desc, name)) for name in desc.__dataclass_fields__
                   if name not in lowering.LAUNCH_FIELDS and name != "read_alignment")
    assert digest == hashlib.blake2b(repr(fields).encode(), digest_size=8).hexdigest()
