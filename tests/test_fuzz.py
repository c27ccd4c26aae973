"""The differential fuzz: hypothesis draws whole conv problems and checks every generated kernel against
torch in float64. It owns correctness; the other test files pin named cases.

What it covers, each property against torch.nn.functional.conv2d / conv1d in float64 on the same inputs
(rounded to the dtype first), with every output element checked written (outputs start as NaN):

- test_conv2d_forward_<family> (one test per family, each with its own share of the examples),
  test_conv2d_forward_default and test_conv1d_forward: every forward kernel family the planner offers for
  a problem (``plan(spec).families``: igemm, depthwise, depthwise_gemm, depthwise1d) is FORCED through the
  choice override (autotune/choice.py ``overridden``), with its default config or a small tile config (so a case spans
  several tiles and halos cross program boundaries), or the planner's untuned default runs; a spy asserts
  that the family forced (or planned) is the one that ran. Fused epilogues (every activation, with and
  without a residual), NaN and +-inf inputs (positions compared exactly with torch), uneven groups under
  channel_policy='pad', fp32 / fp16 / bf16, NCHW / channels_last / data_format='NHWC' ('NLC' for conv1d),
  strided views of every kind (a storage offset, padded rows, a width step, sliced channels, stride-0
  broadcasts, each with NaN in the memory between the view's elements), weights in four memory orders,
  strided biases, residuals full, strided, broadcast or one per channel, unbatched inputs, outputs and
  inputs of 1 x 1, widths of 1, odd widths, strides 1-3, dilation 1-2, asymmetric, 'same' and causal
  padding, maps and channel counts past one default tile. The run with special values is a warm call, so
  it takes the warm path (runtime/launch.py ``Warm``: the first call's launch on this call's tensors).
- test_gradients: grad_input (the default, which for stride-1 depthwise may run the forward kernel of the
  transposed conv, plan.grad_input_as_forward; forced direct with a non-DEFAULT choice, which bypasses
  it; and forced onto the transposed forward with the direct depthwise family, a tuned route), grad_weight
  (the planner's default, or forced onto each family plan.grad_weight_families offers: the direct and the
  banded depthwise kernels, igemm; with its default or a small tile config) and grad_bias, through autograd
  against torch's float64 autograd, fused activations included (and pre-activations exactly at their kinks).
- test_decode_step: gconvgen.causal_conv1d_update (one or several tokens, rolling or circular states,
  state pools with padded slots, SiLU, float32 weights with half inputs) against a float64 loop written here;
  test_conv1d_sequence_states: conv1d's initial_states / return_final_states / seq_idx likewise.
- test_the_fuzz_reaches_its_domain / test_every_family_runs_when_forced: the strategies really reach
  every family, kind and edge they claim (a family is never silently skipped).

Profiles (tests/conftest.py): "ci", the default, small enough for the whole file to run in about a minute
on two idle CPU cores (two on a busy machine); "long", 20 times the examples (about 15 minutes), to run
before landing a kernel change:

    pytest tests/test_fuzz.py --hypothesis-profile=long

Reproducing a failure: hypothesis prints the falsifying example as a constructor call (a ``ConvProblem``:
paste it into an ``@example`` or call ``check_forward`` on it) and a ``@reproduce_failure(...)`` blob
(print_blob); failures are also saved in .hypothesis/examples and replayed first on the next run, and
``--hypothesis-seed N`` repeats a run's generation. Tensor values come from the drawn ``seed`` alone.

Every wrong result known when this file was written, and every one it found, is an ``@example`` on its test.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import unittest.mock
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import (HealthCheck, Phase, assume, currently_in_test_context, event, example, find, given, note,
                        settings)
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

import gconvgen
from gconvgen import knobs, memo
from gconvgen.compiler.lowering import DEFAULT, KERNEL, Choice, KernelConfig, PixelSpace, band_steps, lower
from gconvgen.compiler.families import igemm_rows, suiting_first
from gconvgen.compiler.families import depthwise_gemm
from gconvgen.compiler.families.base import MIN_BLOCKS_PER_SPLIT
from gconvgen.compiler.families.depthwise_dense import dense_grad_weight_steps, dense_steps, reached_pixels
from gconvgen.compiler.families.depthwise_gemm import SLIDING_OPEN_ROWS, sliding_block_rows
from gconvgen.compiler.families.igemm_rows import open_rows, rows_per_program
from gconvgen.compiler.plan import grad_input_as_forward, plan, transposed_conv
from gconvgen.autotune import choice
from gconvgen.runtime import launch
from gconvgen.ops.dispatch import spec_for_call
from conftest import TOLERANCES, spy_on_kernels

# NaN and inf inputs make the interpreter's numpy say so; a division by zero would still show
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")

FAMILIES = ("igemm", "igemm_rows", "depthwise", "depthwise_gemm", "depthwise1d", "depthwise_dense")
IGEMM = ("igemm", "igemm_rows")  # the implicit GEMMs: flat tiles, and tiles that slide down the rows
ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# memory of the activations: NCHW; channels_last memory through the NCHW-indexed API; data_format NHWC / NLC
LAYOUTS = ("nchw", "channels_last", "nhwc")
LAYOUT_DRAWS = ("nchw", "nchw", "channels_last", "nhwc")  # NCHW, the most common, half the time
# how the input view is cut from its memory (make_view): each breaks an assumption a kernel may make
VIEWS = ("dense", "storage_offset", "padded_rows", "width_step", "channel_slice", "batch_broadcast",
         "width_broadcast")
VIEW_DRAWS = ("dense",) * 3 + VIEWS[1:]  # a dense input a third of the time
WEIGHT_MEMORY = ("oihw", "ohwi", "hwio", "width_step")  # OIHW, channels_last OHWI, Keras HWIO, big[..., ::2]
SPECIALS = (float("nan"), float("inf"), float("-inf"))
RESIDUAL_VIEWS = ("dense", "width_step", "batch_broadcast", "per_channel")

# Small tile configs per (kernel kind, family), choices of (block_m, block_n, block_k, num_warps): the
# interpreter space's shapes shrunk so that the tiny maps
# below still span several tiles. A config the lowering refuses for a problem is assumed away; one that
# would cut the problem into too many programs for the interpreter (MAX_ITERATIONS) runs the default instead.
SMALL_TILES = {
    ("forward", "igemm"): ((16, 32, 64), (16, 32), (16, 32), (1, 4)),
    ("forward", "igemm_rows"): ((16, 32, 64), (16, 32), (16, 32), (1, 4)),
    ("forward", "depthwise"): ((8, 16, 32, 64), (1, 2, 4, 8), (0,), (1, 4)),
    ("forward", "depthwise_gemm"): ((16,), (1, 2, 4, 8), (16,), (1, 4)),
    ("forward", "depthwise1d"): ((8, 16), (8, 16), (0,), (1, 2)),
    ("forward", "depthwise_dense"): ((16,), (16, 32), (16, 32), (1, 4)),
    ("grad_weight", "depthwise_dense"): ((16,), (8, 16), (8, 16), (1, 4)),
    ("grad_input", "igemm"): ((16, 32, 64), (16,), (16, 32), (1, 4)),
    ("grad_input", "depthwise"): ((8, 16, 32, 64), (1, 2, 8), (0,), (1, 4)),
    ("grad_input", "depthwise_gemm"): ((16, 32), (1, 2, 4), (16, 32), (1, 4)),
    ("grad_weight", "igemm"): ((16,), (16, 32), (16, 32), (1, 4)),
    ("grad_weight", "igemm_rows"): ((16,), (16, 32), (16, 32), (1, 4)),
    ("grad_weight", "depthwise"): ((1, 4, 16, 32), (1, 2, 8, 64), (0,), (1, 4)),
    ("grad_weight", "depthwise_gemm"): ((16, 32), (1, 2, 4), (16, 32), (1, 4)),
}


def budget(share: float) -> int:
    """A test's examples: ``share`` of the loaded profile's max_examples (conftest: "ci" or "long")."""
    return max(1, round(settings.default.max_examples * share))


# ---------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class ConvProblem:
    """One call of gconvgen.conv2d (or conv1d), with all it takes to build its tensors.

    ``padding`` is what the API is given: 4 sides or 'same' (conv2d); (left, right), 'same', 'causal' or
    'valid' (conv1d, whose ``size`` is (1, L) and ``kernel`` (1, k)). ``family`` None runs the planner's
    default (untuned); else that family is forced, with ``config`` (None: the family's default config).
    ``specials`` are (flat index into the input's values, NaN or +-inf) put into a second run, with
    ``residual_specials`` into the residual's. ``unbatched``: the API is given [C, H, W] ([C, L]) tensors.
    ``wide_index``: every launch takes its kernels' 64-bit offset variant (as one past 2**31 elements would).
    ``max_rows``: igemm_rows programs take at most this many output rows (0: its MAX_ROWS), so that the tiny
    maps here span several programs down their rows. ``strip_window``: the banded kernel takes one row's strips
    for windows of at most this many columns (0: its STRIP_WINDOW), and up to twice as many on the wide tile, so
    that windows the draws reach take the wide tile and the flat tiles of wider ones. ``staged``: igemm_rows copies
    an NCHW or strided activation channels_last for groups of any width (IN_PLACE_GROUP_CHANNELS 0), as it does
    groups wider than that, where it otherwise reads the narrow groups drawn here in place. ``pieces``: the banded
    grad-weight takes one row's strips in pieces for height-1 windows of any width (PIECES_WINDOW 0), as it does
    windows wider than the draws reach."""

    api: str
    batch: int
    in_channels: int
    out_channels: int
    groups: int
    size: tuple
    kernel: tuple
    stride: tuple = (1, 1)
    padding: object = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    policy: str = "strict"
    layout: str = "nchw"
    view: str = "dense"
    weight_memory: str = "oihw"
    dtype: str = "float32"
    bias: bool = True
    bias_strided: bool = False
    activation: str = "none"
    residual: bool = False
    residual_view: str = "dense"
    family: str | None = None
    config: KernelConfig | None = None
    specials: tuple = ()
    residual_specials: tuple = ()
    unbatched: bool = False
    wide_index: bool = False
    max_rows: int = 0
    strip_window: int = 0
    staged: bool = False
    pieces: bool = False
    seed: int = 0


@dataclass(frozen=True)
class GradientProblem:
    """A forward problem trained through: ``grad_input`` "default" (the planner's, maybe the transposed
    forward), "direct" (a non-DEFAULT choice: the grad-input kernel of ``grad_input_family``, None the
    planner's first, with ``grad_input_config`` or its default) or "transposed" (a tuned choice of the
    transposed conv's forward with the direct depthwise family, a route the planner offers but never takes
    untuned); ``grad_weight_family`` None is the planner's default grad-weight kernel, else that family's is
    forced, with ``grad_weight_config`` (None: its default config). ``at_kinks``: the input and residual are zeros, so each pre-activation is its bias exactly (drawn
    at the activations' kinks: -3, 0, 3, 6). ``specials``: NaN and infinities in x."""

    conv: ConvProblem
    grad_input: str = "default"
    grad_input_config: KernelConfig | None = None
    grad_weight_family: str | None = None
    grad_weight_config: KernelConfig | None = None
    at_kinks: bool = False
    programs: int = 1  # what the split reductions (grad-weight, grad-bias) aim to fill: > 1 splits their pixels
    specials: tuple = ()  # (flat index, NaN or +-inf) put into x
    grad_input_family: str | None = None


def sides_of(problem: ConvProblem) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), resolved here independently of gconvgen: 'same' is TensorFlow's at any
    stride (out = ceil(in / stride), the odd pixel after), 'causal' Keras's ((k - 1) * dilation before)."""
    padding = problem.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "causal":
            return (0, 0, (problem.kernel[1] - 1) * problem.dilation[1], 0)
        sides = []
        for length, k, s, d in zip(problem.size, problem.kernel, problem.stride, problem.dilation):
            total = max((math.ceil(length / s) - 1) * s + d * (k - 1) + 1 - length, 0)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    return (0, 0, *padding) if problem.api == "conv1d" else tuple(padding)


def output_size(problem: ConvProblem) -> tuple[int, int]:
    top, bottom, left, right = sides_of(problem)
    return tuple((length + before + after - d * (k - 1) - 1) // s + 1 for length, before, after, k, s, d in
                 ((problem.size[0], top, bottom, problem.kernel[0], problem.stride[0], problem.dilation[0]),
                  (problem.size[1], left, right, problem.kernel[1], problem.stride[1], problem.dilation[1])))


def weight_shape(problem: ConvProblem) -> tuple[int, int, int, int]:
    return (problem.out_channels, math.ceil(problem.in_channels / problem.groups), *problem.kernel)


# ---------------------------------------------------------------------------------------------- tensors


def _memory_format(layout: str) -> torch.memory_format:
    return torch.contiguous_format if layout == "nchw" else torch.channels_last


def _dense_strides(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    _, c, h, w = shape
    return (c * h * w, h * w, w, 1) if layout == "nchw" else (h * w * c, 1, w * c, c)


def make_view(values: torch.Tensor | None, shape: tuple[int, ...], layout: str, view: str,
              meta_dtype: torch.dtype | None = None) -> torch.Tensor:
    """An NCHW-indexed [N, C, H, W] view ``view`` of memory in ``layout``, holding ``values`` (of the view's
    shape; of its base's for the broadcasts: [1, C, H, W] or [N, C, H, 1]). Memory the view does not cover is
    NaN, so a kernel that reads past the view's elements shows in its output. ``values`` None gives a 'meta'
    view of ``meta_dtype``: its shape, strides and dtype only, to plan it."""
    n, c, h, w = shape
    fmt = _memory_format(layout)
    dtype, device = (meta_dtype, "meta") if values is None else (values.dtype, "cpu")

    def empty(*size):
        memory = fmt if len(size) == 4 else torch.contiguous_format
        buffer = torch.empty(size, dtype=dtype, device=device, memory_format=memory)
        return buffer if device == "meta" else buffer.fill_(float("nan"))

    if view in ("batch_broadcast", "width_broadcast"):
        base = empty(1, c, h, w) if view == "batch_broadcast" else empty(n, c, h, 1)
        if values is not None:
            base.copy_(values)
        return base.expand(n, c, h, w)
    if view == "dense":
        x = empty(n, c, h, w)
    elif view == "storage_offset":  # one element in: no row, channel or image starts aligned
        buffer = empty(n * c * h * w + 1)
        x = buffer.as_strided(shape, _dense_strides(shape, layout), 1)
    elif view == "padded_rows":  # big[..., 1:]: rows of W + 1 elements, the view one element in
        x = empty(n, c, h, w + 1)[..., 1:]
    elif view == "width_step":  # big[..., ::2]: a width stride of 2 (2C in channels_last)
        x = empty(n, c, h, 2 * w)[..., ::2]
    elif view == "channel_slice":  # big[:, 1:C + 1]
        x = empty(n, c + 2, h, w)[:, 1:c + 1]
    else:
        raise ValueError(view)
    if values is not None:
        x.copy_(values)
    return x


def _view_base_shape(shape: tuple[int, ...], view: str) -> tuple[int, ...]:
    n, c, h, w = shape
    return {"batch_broadcast": (1, c, h, w), "width_broadcast": (n, c, h, 1)}.get(view, shape)


def make_weight(values: torch.Tensor | None, shape: tuple[int, ...], memory: str,
                meta_dtype: torch.dtype | None = None) -> torch.Tensor:
    """An OIHW-indexed weight in ``memory``: contiguous OIHW, channels_last (OHWI), a Keras HWIO buffer or
    every other column of a wider OIHW one (``values`` None: on 'meta', of ``meta_dtype``)."""
    dtype, device = (meta_dtype, "meta") if values is None else (values.dtype, "cpu")
    o, i, kh, kw = shape
    if memory == "hwio":
        weight = torch.empty((kh, kw, i, o), device=device, dtype=dtype).permute(3, 2, 0, 1)
    elif memory == "width_step":
        weight = torch.empty((o, i, kh, 2 * kw), device=device, dtype=dtype)[..., ::2]
    else:
        weight = torch.empty(shape, device=device, dtype=dtype,
                             memory_format=_memory_format("nchw" if memory == "oihw" else "channels_last"))
    if values is not None:
        weight.copy_(values)
    return weight


@dataclass
class Tensors:
    """A problem's tensors as the kernels see them: NCHW-indexed x and residual (views of any kind), an
    OIHW-indexed weight (in any memory), the bias."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor | None


def make_tensors(problem: ConvProblem, specials: tuple = (), residual_specials: tuple = (), zeros: bool = False,
                 bias_values: tuple | None = None) -> Tensors:
    """The problem's tensors from its seed (the same values every call), with ``specials`` put into x and
    ``residual_specials`` into the residual; ``zeros``: x and the residual are zeros, ``bias_values`` the
    bias (cycled over the channels)."""
    generator = torch.Generator().manual_seed(problem.seed)
    dtype = DTYPES[problem.dtype]
    shape = (problem.batch, problem.in_channels, *problem.size)
    values = torch.randn(_view_base_shape(shape, problem.view), generator=generator)
    if zeros:
        values.zero_()
    flat = values.view(-1)
    for index, value in specials:
        flat[index % flat.numel()] = value
    weight = torch.randn(weight_shape(problem), generator=generator)
    bias = torch.randn(problem.out_channels, generator=generator) if problem.bias else None
    if bias_values is not None:
        bias = torch.tensor([bias_values[i % len(bias_values)] for i in range(problem.out_channels)])
    out_shape = (problem.batch, problem.out_channels, *output_size(problem))
    residual = None
    if problem.residual:  # per_channel: [1, C_out, 1, 1], which the API broadcasts as torch's + would
        if problem.residual_view == "per_channel":
            out_shape = (1, problem.out_channels, 1, 1)
        view = "dense" if problem.residual_view == "per_channel" else problem.residual_view
        residual_values = torch.randn(_view_base_shape(out_shape, view), generator=generator)
        if zeros:
            residual_values.zero_()
        for index, value in residual_specials:
            residual_values.view(-1)[index % residual_values.numel()] = value
        residual = make_view(residual_values.to(dtype), out_shape, "nchw" if problem.layout == "nchw" else "nhwc",
                             view)
    if bias is not None:
        bias = bias.to(dtype)
        if problem.bias_strided:  # every other element of a buffer twice as long
            bias = torch.full((2 * problem.out_channels,), float("nan"), dtype=dtype)[::2].copy_(bias)
    return Tensors(make_view(values.to(dtype), shape, problem.layout, problem.view),
                   make_weight(weight.to(dtype), weight_shape(problem), problem.weight_memory), bias, residual)


def spec_of(problem: ConvProblem):
    """The ConvSpec gconvgen makes of the problem's call (spec_for_call on its views, built on 'meta')."""
    shape = (problem.batch, problem.in_channels, *problem.size)
    dtype = DTYPES[problem.dtype]
    x = make_view(None, shape, problem.layout, problem.view, meta_dtype=dtype)
    weight = make_weight(None, weight_shape(problem), problem.weight_memory, meta_dtype=dtype)
    bias = torch.empty(problem.out_channels, device="meta", dtype=dtype) if problem.bias else None
    stride, dilation = problem.stride, problem.dilation
    return spec_for_call(x, weight, bias, stride, sides_of(problem), dilation, problem.groups, problem.policy)


def call_gconvgen(problem: ConvProblem, t: Tensors) -> torch.Tensor:
    """gconvgen.conv2d or conv1d on the problem's tensors, through the API in the problem's data format;
    returns the output NCHW-indexed ([N, C_out, OH, OW]; conv1d's with OH = 1)."""
    nhwc = problem.layout == "nhwc"
    kwargs = {"channel_policy": problem.policy,
              "activation": None if problem.activation == "none" else problem.activation}
    to_api = (lambda a: a.permute(0, 2, 3, 1)) if nhwc else (lambda a: a)
    x, residual = to_api(t.x), None if t.residual is None else to_api(t.residual)
    weight = t.weight.permute(2, 3, 1, 0) if nhwc else t.weight  # HWIO for NHWC
    one_d = problem.api == "conv1d"
    if one_d:  # no height: [N, C, L] / [N, L, C], weight [C_out, ci, k] / Keras [k, ci, C_out]
        x, weight = x.squeeze(1 if nhwc else 2), weight.squeeze(0 if nhwc else 2)
        residual = None if residual is None else residual.squeeze(1 if nhwc else 2)
    if problem.unbatched:  # no batch dimension (batch 1)
        x, residual = x[0], None if residual is None else residual[0]
    if one_d:
        out = gconvgen.conv1d(x, weight, t.bias, problem.stride[1], problem.padding, problem.dilation[1],
                              problem.groups, data_format="NLC" if nhwc else "NCL", residual=residual, **kwargs)
    else:
        out = gconvgen.conv2d(x, weight, t.bias, problem.stride, problem.padding, problem.dilation, problem.groups,
                              data_format="NHWC" if nhwc else "NCHW", residual=residual, **kwargs)
    out = out.unsqueeze(0) if problem.unbatched else out
    out = out.unsqueeze(1 if nhwc else 2) if one_d else out
    return out.permute(0, 3, 1, 2) if nhwc else out


# ---------------------------------------------------------------------------------------------- references


class _Hardswish(torch.autograd.Function):
    """F.hardswish whose gradient is NaN where its input is NaN. torch's own backward kernel returns NaN there
    or passes the gradient through depending on the element's place (float64's vectorised loop or its scalar
    tail), so the reference takes NaN, as gconvgen does (activations._hardswish_gradient)."""

    @staticmethod
    def forward(ctx, pre):
        ctx.save_for_backward(pre)
        return F.hardswish(pre)

    @staticmethod
    def backward(ctx, grad):
        (pre,) = ctx.saved_tensors
        return torch.where(pre.isnan(), pre, torch.ops.aten.hardswish_backward(grad, pre))


def activation_reference(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """torch's own activations: what the fused epilogue must equal, NaN and inf included (hardswish's gradient
    NaN at a NaN input, _Hardswish)."""
    functions = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
                 "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "hardswish": _Hardswish.apply}
    return functions[activation](pre)


def reference_conv(x, weight, bias, stride, sides, dilation, groups):
    """F.conv2d in float64 (differentiable) under the channel_policy='pad' definition, which is F.conv2d's
    own where the groups divide the channels: group g reads input channels [g*ci, (g+1)*ci) of the input
    zero-padded to groups * ci channels and writes outputs [g*co, (g+1)*co) clipped to C_out. Written as one
    grouped conv, so a NaN or inf reaches only the outputs of its own group (as in torch). It reads contiguous
    copies: memory format does not change a conv's values, and torch's float64 CPU backward refuses some
    channels_last operands (slow_conv2d: "grad_weight must be contiguous", a 1 x 1 output of an hwio weight)."""
    in_channels, out_channels = x.shape[1], weight.shape[0]
    ci, co = math.ceil(in_channels / groups), math.ceil(out_channels / groups)
    top, bottom, left, right = sides
    x64 = F.pad(x.double(), (left, right, top, bottom, 0, ci * groups - in_channels)).contiguous()
    weight64 = F.pad(weight.double(), (0, 0, 0, 0, 0, 0, 0, co * groups - out_channels)).contiguous()
    bias64 = None if bias is None else F.pad(bias.double(), (0, co * groups - out_channels))
    return F.conv2d(x64, weight64, bias64, stride, 0, dilation, groups)[:, :out_channels]


def reference_output(problem: ConvProblem, x, weight, bias, residual) -> torch.Tensor:
    """activation(conv + bias + residual) in float64."""
    pre = reference_conv(x, weight, bias, problem.stride, sides_of(problem), problem.dilation, problem.groups)
    return activation_reference(pre if residual is None else pre + residual.double(), problem.activation)


def tolerances(dtype: torch.dtype, reduction: int) -> tuple[float, float]:
    """conftest's (atol, rtol) for ``dtype``, atol grown with the square root of the reduction length past 64
    terms (rounding errors of a sum grow about so); the tiny problems here rarely reach it."""
    atol, rtol = TOLERANCES[dtype]
    return atol * max(1.0, math.sqrt(reduction / 64)), rtol


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduction: int, *,
                   exact_nonfinite: bool = True, compare_finite: bool = True, what: str = "output") -> None:
    """``actual`` (in ``dtype``) against the float64 ``expected``: NaN exactly where torch has NaN and the same
    infinities where torch has them (``exact_nonfinite``), the finite rest within tolerance.

    With ``exact_nonfinite`` False (the known limit of the banded depthwise kernel and packed igemm groups,
    README: they multiply the zeros of their band or block-diagonal weight tile with neighbouring inputs, so an
    inf or NaN input can make neighbouring outputs NaN where torch keeps them finite): NaN is still required
    where torch has NaN and a non-finite value where torch has an infinity, but an output NaN where torch's is
    finite is allowed, and only outputs finite in both are compared (none with ``compare_finite`` False)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    actual = actual.double()
    nan, inf = expected.isnan(), expected.isinf()
    missing_nan = nan & ~actual.isnan()
    assert not missing_nan.any(), (f"{what}: {int(missing_nan.sum())} elements finite where torch has NaN, "
                                   f"first at {missing_nan.nonzero()[0].tolist()}: {actual[missing_nan][:4].tolist()}")
    if exact_nonfinite:
        wrong = (nan != actual.isnan()) | ((inf | actual.isinf()) & (actual != expected))
        assert not wrong.any(), (f"{what}: {int(wrong.sum())} elements non-finite where torch's are not (or the other "
                                 f"way), first at {wrong.nonzero()[0].tolist()}: ours {actual[wrong][:4].tolist()}, "
                                 f"torch {expected[wrong][:4].tolist()}")
        compared = torch.isfinite(expected)
    else:
        lost = inf & torch.isfinite(actual)
        assert not lost.any(), f"{what}: finite where torch has an infinity, at {lost.nonzero()[0].tolist()}"
        compared = torch.isfinite(expected) & torch.isfinite(actual)
    if not compare_finite:
        return
    atol, rtol = tolerances(dtype, reduction)
    torch.testing.assert_close(actual[compared], expected[compared], atol=atol, rtol=rtol,
                               msg=lambda message: f"{what}: {message}")


# ---------------------------------------------------------------------------------------------- forcing, spying


@contextlib.contextmanager
def forced_choices(forward: Choice = DEFAULT, grad_input: Choice = DEFAULT, grad_weight: Choice = DEFAULT):
    """Override the choice (what a tuning record would give) of the three tuned kinds inside the block."""
    table = {"forward": forward, "grad_input": grad_input, "grad_weight": grad_weight}
    with choice.overridden(lambda spec, kind, *_: table.get(kind, DEFAULT), every_call=False):
        yield


@contextlib.contextmanager
def kernels_launched():
    """The KernelDesc of every kernel loaded for a launch inside the block (conftest.spy_on_kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        yield spy_on_kernels(patch)


@contextlib.contextmanager
def launch_variant(problem: ConvProblem):
    """Inside the block, launches take the 64-bit offset variant of their kernels where ``problem.wide_index``
    (launch.needs_wide_index answers yes; the tensors stay small), else what their sizes need; igemm_rows
    programs take at most ``problem.max_rows`` output rows where it is set (igemm_rows.MAX_ROWS otherwise); and
    the banded kernel takes one row's strips for windows of at most ``problem.strip_window`` columns where it is
    set, twice as many on the wide tile (depthwise_gemm.STRIP_WINDOW otherwise; the memos of launches lowered
    under the other are emptied); igemm_rows stages NCHW activations of any group width where
    ``problem.staged`` (igemm_rows.IN_PLACE_GROUP_CHANNELS 0, memos emptied likewise); the banded grad-weight takes
    one row's strips in pieces for height-1 windows of any width where ``problem.pieces`` (PIECES_WINDOW 0,
    likewise)."""
    with contextlib.ExitStack() as stack:
        if problem.wide_index:
            stack.enter_context(unittest.mock.patch.object(launch, "needs_wide_index", lambda *_: True))
        if problem.max_rows:
            stack.enter_context(unittest.mock.patch.object(igemm_rows, "MAX_ROWS", problem.max_rows))
        if problem.strip_window:
            stack.callback(memo.reset)
            stack.enter_context(unittest.mock.patch.object(depthwise_gemm, "STRIP_WINDOW", problem.strip_window))
            memo.reset()
        if problem.staged:
            stack.callback(memo.reset)
            stack.enter_context(unittest.mock.patch.object(igemm_rows, "IN_PLACE_GROUP_CHANNELS", 0))
            memo.reset()
        if problem.pieces:
            stack.callback(memo.reset)
            stack.enter_context(unittest.mock.patch.object(depthwise_gemm, "PIECES_WINDOW", 0))
            memo.reset()
        yield


def forward_choice(problem: ConvProblem) -> Choice:
    return DEFAULT if problem.family is None else Choice(KERNEL, problem.config, problem.family)


def tolerates_nonfinite_spread(desc) -> bool:
    """The README's known limit: the banded and dense depthwise kernels and packed narrow igemm groups (several
    groups in one program's block-diagonal weight tile) may spread an inf or NaN input to neighbouring outputs as
    NaN. The igemm grad-weights keep only the diagonal blocks of their products, so packing spreads nothing
    there."""
    return desc.family in ("depthwise_gemm", "depthwise_dense") or (desc.family in IGEMM and desc.groups_per_program > 1
                                                                    and desc.kind != "grad_weight")


# ---------------------------------------------------------------------------------------------- strategies


def _sides(draw, reach: int, beyond: bool) -> int:
    """A padding side: 0 up to the window's reach (one past it where the family allows)."""
    return draw(st.integers(0, reach + (1 if beyond else 0)))


@st.composite
def small_configs(draw, kind: str, family: str) -> KernelConfig | None:
    """None (the family's default config) or a small tile config of the (kind, family) space."""
    if draw(st.integers(0, 2)) == 0:
        return None
    *sides, warps = (draw(st.sampled_from(options)) for options in SMALL_TILES[kind, family])
    if (kind, family) == ("grad_weight", "depthwise_dense"):  # square tiles of 8 x 8, or 16 x 16 row by row
        sides[2] = sides[1]
    return KernelConfig(*sides, num_warps=warps, num_stages=draw(st.sampled_from((1, 2))))


def described(spec, kind: str, family: str | None, config: KernelConfig | None):
    """The lowered description, or None where the lowering's own check refuses the (family, config) for this
    conv (it raises ValueError): the strategies assume such configs away."""
    try:
        return lower(plan(spec), kind, choice=Choice(KERNEL, config, family), interpret=True, allow_tf32=False)
    except ValueError:
        return None


# Interpreted loop iterations (programs x steps a program) a small config may cost one launch: each costs
# the interpreter several milliseconds, so a tile config that cuts a problem into dozens of programs would
# spend the time budget on one example; such a problem runs its family's default config instead.
MAX_ITERATIONS = 160


def iterations(problem: ConvProblem, desc) -> int:
    """About how many loop iterations the interpreter runs for ``desc`` on ``problem``: its programs times
    each program's steps (taps for the direct and depthwise1d kernels, reduction steps for the others)."""
    out_h, out_w = output_size(problem)
    pixels = PixelSpace.of(desc.kind, problem.batch, *problem.size, out_h, out_w)
    taps = problem.kernel[0] * problem.kernel[1]
    rows_steps = rows_per_program(out_h) + open_rows(desc.spec) - 1 if desc.family == "igemm_rows" else 1
    if desc.kind == "grad_weight" and desc.family == "depthwise_dense":  # each input row and column tile reached
        return (math.prod(desc.grid(pixels)) * -(-problem.batch // desc.config.block_m)
                * dense_grad_weight_steps(desc.spec, desc.config, out_h, out_w, *problem.size))
    if desc.kind == "grad_weight":  # igemm_rows: each tile out_rows + open_rows - 1 steps
        return math.prod(desc.grid(pixels)) * -(-desc.reduction_units(pixels) // desc.reduction_block) * rows_steps
    if desc.family == "igemm":  # a strided grad-input's program takes the taps reaching its phase (phases)
        phases = desc.phases[0] * (1 if desc.interleave_columns else desc.phases[1])
        return (math.prod(desc.grid(pixels)) * -(-taps // phases)
                * -(-desc.spec.in_channels_per_group // desc.config.block_k))
    if desc.family == "igemm_rows":  # out_rows + open_rows - 1 steps, each every tap's dot
        return (math.prod(desc.grid(pixels)) * rows_steps * taps
                * -(-desc.spec.in_channels_per_group // desc.config.block_k))
    if desc.family == "depthwise_gemm" and desc.kind == "grad_input":  # sliding down grad_out's rows
        spec, k = desc.spec, desc.config.block_k
        pairs = problem.batch * -(-problem.size[1] // k)
        groups = depthwise_gemm.grad_input_groups(spec, problem.size[0])
        slides = (sliding_block_rows(groups, pairs, desc.config.block_m, depthwise_gemm.grad_input_block_groups(spec))
                  + (problem.kernel[0] - 1) * problem.dilation[0] // problem.stride[0])
        return math.prod(desc.grid(pixels)) * problem.kernel[0] * slides * -(-depthwise_gemm.grad_input_span(spec, k, 1) // k)
    if desc.family == "depthwise_gemm":  # sliding down the rows: each step every kernel row's dots
        reach = (problem.kernel[0] - 1) * problem.dilation[0]
        pairs = problem.batch * -(-out_w // desc.config.block_k)
        slides = sliding_block_rows(out_h, pairs, desc.config.block_m) + reach if desc.slide_rows else 1
        return (math.prod(desc.grid(pixels)) * problem.kernel[0] * slides
                * band_steps(desc.spec, desc.config.block_k, desc.band_shift))
    if desc.family == "depthwise_dense":  # each tile of output pixels steps through the input rows it reaches
        steps = dense_steps(desc.spec, desc.config.block_n, desc.config.block_k, out_h, out_w, *problem.size)
        return math.prod(desc.grid(pixels)) * max(1, steps) // -(-(out_h * out_w) // desc.config.block_n)
    return math.prod(desc.grid(pixels)) * taps


def _extent(draw, least: int, most: int, large: bool) -> int:
    """An input side from ``least`` (where the window just fits: one output) to ``most``: a third of the time
    ``least`` or one more, the maps smaller than a tile or a halo; ``large``: from ``most`` // 2."""
    most = max(least, most)
    if large:
        return draw(st.integers(max(least, most // 2), most))
    return draw(st.integers(least, min(least + 1, most)) if draw(st.integers(0, 2)) == 0 else st.integers(least, most))


def special_values(most: int):
    """Up to ``most`` (flat index, NaN or +-inf) to put into a tensor's values (the index wraps)."""
    return st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=most).map(tuple)


@st.composite
def conv_problems(draw, api: str = "conv2d", families: tuple = FAMILIES + (None,), specials: bool = True,
                  max_channels: int = 16, kernel_sides: tuple = (1, 2, 3, 4, 5, 7), wide_odds: int = 4,
                  transposable: bool = False, layouts: tuple = (), max_iterations: int = MAX_ITERATIONS,
                  extents: tuple = ("small", "long_rows", "small", "long_rows", "large")) -> ConvProblem:
    """A coherent problem for one forward family (None: the planner's default): channels the family computes,
    a geometry at the edges the lowering branches on, a layout and view, a dtype, an epilogue, special values,
    and a tile config the lowering accepts. Shrinks toward one image, few channels, 1 x 1 outputs, NCHW.
    One default depthwise problem in ``wide_odds`` (0: none) is 7 x 7 in half precision, where the banded
    kernel is the planner's default. ``transposable``: a conv with a transpose (plan.transposed_conv: stride 1,
    padding within the window's reach, channels its groups divide, one output a channel if depthwise), whose
    input gradient may run as a forward conv.
    ``extents``: the map sizes drawn ("tiny": at most 3 x 3, where outputs of 1 x 1 and of width 1 are common;
    "sequence": a 1-D row of up to 300 positions, several of the banded kernel's tiles of 16 strips);
    ``layouts``: the layouts drawn (empty: every one, NCHW most often); a forced config that would run more
    than ``max_iterations`` interpreted iterations gives way to the family's default."""
    family = draw(st.sampled_from(families))
    # a transposable problem is grouped a third of the time (a transpose at stride 1 only), else depthwise
    depthwise = (family in ("depthwise", "depthwise_gemm", "depthwise1d", "depthwise_dense")
                 or (family is None and draw(st.integers(0, 2) if transposable else st.integers(0, 1)) > 0))
    policy = "strict" if transposable else draw(st.sampled_from(("strict", "pad")))
    if depthwise:  # groups = in_channels; a channel multiplier, or uneven outputs under 'pad'
        # now and then more channels than a default channel tile (64 in the interpreter) holds
        channels = draw(st.integers(1, max_channels) if max_channels < 16 or draw(st.integers(0, 7))
                        else st.sampled_from((63, 65, 80)))
        per_group = 1 if transposable else draw(st.integers(1, 2))
        low = (channels - 1) * per_group + 1 if policy == "pad" else channels * per_group
        in_channels, groups, out_channels = channels, channels, draw(st.integers(low, channels * per_group))
    else:  # at least two input channels per group; the last group short under 'pad'
        groups = draw(st.integers(1, 4))
        in_per_group, out_per_group = draw(st.integers(2, 4)), draw(st.integers(1, 4))
        if policy == "pad":
            in_channels = draw(st.integers((groups - 1) * in_per_group + 1, groups * in_per_group))
            out_channels = draw(st.integers((groups - 1) * out_per_group + 1, groups * out_per_group))
            assume(in_channels != groups)  # one channel per group is depthwise
        else:
            in_channels, out_channels = groups * in_per_group, groups * out_per_group

    one_d = api == "conv1d"
    short_window = family == "depthwise1d"
    layout = draw(st.sampled_from(layouts or (("nchw",) * 4 + LAYOUTS[1:] if transposable else LAYOUT_DRAWS)))
    sides = st.sampled_from(kernel_sides)
    wide = not one_d and family is None and depthwise and wide_odds > 0 and draw(st.integers(1, wide_odds)) == 1
    kernel_h = 7 if wide else 1 if one_d or (short_window and layout != "nchw") else draw(sides)
    kernel_w = 7 if wide else draw(sides)
    stride_h = 1 if one_d or transposable else draw(st.integers(1, 3))
    stride_w = 1 if transposable else draw(st.sampled_from((1, 2)) if short_window else st.integers(1, 3))
    dilation = (1 if one_d else draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    reach_h, reach_w = (kernel_h - 1) * dilation[0], (kernel_w - 1) * dilation[1]
    # rows longer than a banded strip (16) or a depthwise1d tile; now and then more pixels than a default
    # interpreter tile (256)
    extent = draw(st.sampled_from(extents))
    max_h, max_w = {"tiny": (3, 3), "small": (9, 9), "long_rows": (2, 20), "large": (12, 24),
                    "sequence": (1, 300)}[extent]
    max_h = 1 if one_d else max_h
    large = extent == "large"
    mode = draw(st.sampled_from(("sides", "same", "causal", "valid") if one_d else ("sides", "same")))
    # padding past the window's reach: not for depthwise1d along the width, nor for a transposable conv
    beyond_h, beyond_w = not transposable, not (short_window or transposable)
    if mode == "same":
        size = (1 if one_d else _extent(draw, 1, max_h, large), _extent(draw, 1, max_w, large))
        padding = "same"
    else:
        if one_d:
            left, right = ((reach_w, 0) if mode == "causal" else (0, 0) if mode == "valid"
                           else (_sides(draw, reach_w, beyond_w), _sides(draw, reach_w, beyond_w)))
            top = bottom = 0
            padding = mode if mode in ("causal", "valid") else (left, right)
        else:
            top, bottom = _sides(draw, reach_h, beyond_h), _sides(draw, reach_h, beyond_h)
            left, right = _sides(draw, reach_w, beyond_w), _sides(draw, reach_w, beyond_w)
            padding = (top, bottom, left, right)
        # the least input the window fits in: outputs of 1 shrink to here
        least_h, least_w = max(1, reach_h + 1 - top - bottom), max(1, reach_w + 1 - left - right)
        size = (1 if one_d else _extent(draw, least_h, max_h, large), _extent(draw, least_w, max_w, large))
    batch = draw(st.sampled_from((1, 2, 3)))
    activation = draw(st.sampled_from(ACTIVATIONS))
    problem = ConvProblem(
        api=api, batch=batch, in_channels=in_channels, out_channels=out_channels, groups=groups, size=size,
        kernel=(kernel_h, kernel_w), stride=(stride_h, stride_w), padding=padding, dilation=dilation, policy=policy,
        layout=layout, view=draw(st.sampled_from(VIEW_DRAWS)), weight_memory=draw(st.sampled_from(WEIGHT_MEMORY)),
        dtype=draw(st.sampled_from(("float16", "bfloat16") if wide else tuple(DTYPES))), bias=draw(st.booleans()),
        bias_strided=draw(st.booleans()), activation=activation,
        residual=draw(st.booleans()), residual_view=draw(st.sampled_from(RESIDUAL_VIEWS)),
        specials=draw(special_values(3)) if specials else (),
        seed=draw(st.integers(0, 2**31 - 1)))
    problem = dataclasses.replace(
        problem, unbatched=batch == 1 and draw(st.booleans()), wide_index=draw(st.integers(0, 4)) == 0,
        max_rows=draw(st.sampled_from((0, 1, 1, 2, 3))),
        strip_window=draw(st.sampled_from((0, 0, 8, 16))) if family == "depthwise_gemm" else 0,
        # (from the seed, not a draw of its own: a draw here moves every later one, and the domain's samples)
        staged=family in (None, "igemm_rows") and not depthwise and problem.seed % 4 == 0,
        pieces=depthwise and problem.seed % 3 == 1,
        residual_specials=draw(special_values(2)) if specials and problem.residual else ())
    try:
        spec = spec_of(problem)
        offered = plan(spec).families
    except ValueError:  # e.g. channel padding over the budget
        assume(False)
    assume(family is None or family in offered)
    if family is not None:
        config = draw(small_configs("forward", family))
        with launch_variant(problem):
            desc = described(spec, "forward", family, config)
            assume(desc is not None)
            cheap = iterations(problem, desc) <= max_iterations
        problem = dataclasses.replace(problem, family=family, config=config if cheap else None)
    return problem


@st.composite
def gradient_problems(draw) -> GradientProblem:
    """A forward problem (no special values) and the backward's choices: grad-input default or direct,
    small tile configs for the direct grad-input and for grad-weight, and at times every pre-activation at
    an activation's kink, and the split reductions split into several pixel ranges (as on a GPU)."""
    # the direct depthwise grad-input costs the interpreter about 50 ms a tap and program: smaller problems,
    # and 7 x 7 (half precision, whose transposed forward is the banded kernel) only by default
    transposable = draw(st.integers(0, 3)) == 0
    # the forward forced onto any family but the dense one, which has no gradient kernels of its own (its input
    # gradient, the transposed conv's forward on a small map from a batch of 8: tests/test_dense_depthwise.py)
    problem = draw(conv_problems(families=tuple(f for f in FAMILIES if f != "depthwise_dense") + (None,),
                                 specials=False, max_channels=8, kernel_sides=(1, 2, 3, 4, 5),
                                 wide_odds=1 if transposable else 8, transposable=transposable))
    spec = spec_of(problem)
    bias_free = dataclasses.replace(spec, bias=False)
    # the transposed route twice as often where there is one: grouped convs have one only at stride 1
    routes = ("default", "direct") + (("transposed",) * 2 if transposed_conv(bias_free) else ())
    direct = "default" if problem.kernel == (7, 7) else draw(st.sampled_from(routes))
    grad_weight_family = draw(st.sampled_from((None, *plan(bias_free).grad_weight_families)))
    offered = plan(bias_free).grad_input_families  # forced direct: any of them (the banded one at a stride)
    grad_input_family = draw(st.sampled_from(offered)) if direct == "direct" and len(offered) > 1 else offered[0]
    families = {"grad_input": grad_input_family, "grad_weight": grad_weight_family}
    configs = {}
    for kind in (("grad_input",) if direct == "direct" else ()) + (("grad_weight",) if grad_weight_family else ()):
        config = draw(small_configs(kind, families[kind]))
        desc = described(bias_free, kind, families[kind], config)
        assume(desc is not None)
        configs[kind] = config if iterations(problem, desc) <= MAX_ITERATIONS else None
    grad_input_config, grad_weight_config = configs.get("grad_input"), configs.get("grad_weight")
    at_kinks = draw(st.integers(0, 5)) == 0
    if at_kinks:  # an activation with kinks, and biases at them
        problem = dataclasses.replace(problem, bias=True, activation=draw(st.sampled_from(tuple(KINKS))))
    programs = draw(st.sampled_from((1, 1, 3, 64)))
    specials = draw(special_values(2)) if not at_kinks and draw(st.integers(0, 4)) == 0 else ()
    return GradientProblem(problem, direct, grad_input_config, grad_weight_family, grad_weight_config, at_kinks,
                           programs, specials, grad_input_family=grad_input_family if direct == "direct" else None)


# ---------------------------------------------------------------------------------------------- the checks


def check_forward(problem: ConvProblem) -> None:
    """Run ``problem`` through gconvgen's API with its family forced (or the default), assert that family ran
    and every output element matches torch; then again (a warm call, replayed) with its special values."""
    note_in_test(f"spec: {spec_of(problem)}")
    family = problem.family or _default_forward_family(problem)
    event_in_test(f"family {family}{'' if problem.family else ' (default)'}")
    reduction = weight_shape(problem)[1] * problem.kernel[0] * problem.kernel[1]
    dtype = DTYPES[problem.dtype]
    special = problem.specials or problem.residual_specials
    # the second run, under the same provider, takes the warm path (the first's launch, refilled)
    with forced_choices(forward=forward_choice(problem)), launch_variant(problem):
        for specials, residual_specials in [((), ())] + ([(problem.specials, problem.residual_specials)]
                                                         if special else []):
            t = make_tensors(problem, specials, residual_specials)
            expected = reference_output(problem, t.x, t.weight, t.bias, t.residual)
            with kernels_launched() as launched:
                out = call_gconvgen(problem, t)
            assert out.dtype == dtype
            ran = [desc for desc in launched if desc.kind == "forward"]
            assert [desc.family for desc in ran] == [family], f"forced {family}, ran {[d.family for d in ran]}"
            assert not problem.wide_index or all(desc.wide_index for desc in launched), "64-bit offsets not taken"
            if not (specials or residual_specials):  # outputs were NaN before the launch: NaN is an unwritten one
                assert_matches(out, expected, dtype, reduction, what="output")
            else:  # NaN / inf inputs: the run before proved every element written
                exact = not tolerates_nonfinite_spread(ran[0])
                assert_matches(out, expected, dtype, reduction, exact_nonfinite=exact,
                               what="output with NaN/inf inputs")


def check_gradients(case: GradientProblem) -> None:
    """Forward and backward through autograd with the case's choices; every gradient (x, weight, bias,
    residual) against torch's float64 autograd. Where grad-input is forced direct, the grad-input kernel ran;
    where it is the default, the transposed conv's forward kernel ran exactly where plan.grad_input_as_forward
    offers it for the spec the backward saw, else the grad-input kernel."""
    problem = case.conv
    dtype = DTYPES[problem.dtype]
    t = make_tensors(problem, case.specials, zeros=case.at_kinks,
                     bias_values=(-3.0, 0.0, 3.0, 6.0) if case.at_kinks else None)
    # leaves with the views' own strides (detach keeps them), so the kernels read what the forward test reads
    leaves = {name: tensor.detach().requires_grad_() for name, tensor in
              (("x", t.x), ("weight", t.weight), ("bias", t.bias), ("residual", t.residual)) if tensor is not None}
    leaves64 = {name: leaf.detach().double().requires_grad_() for name, leaf in leaves.items()}
    expected = reference_output(problem, leaves64["x"], leaves64["weight"], leaves64.get("bias"),
                                leaves64.get("residual"))
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(problem.seed + 1)).to(dtype)
    if not case.at_kinks:
        grad_output[near_a_kink(problem, leaves64, dtype)] = 0
    wanted = torch.autograd.grad(expected, list(leaves64.values()), grad_output.double())

    grad_input = (DEFAULT if case.grad_input == "default"
                  else Choice(KERNEL, case.grad_input_config, case.grad_input_family) if case.grad_input == "direct" else
                  Choice(KERNEL, None, _transposed_forced_family(problem), transposed=True))
    grad_weight = (DEFAULT if case.grad_weight_family is None
                   else Choice(KERNEL, case.grad_weight_config, case.grad_weight_family))
    with forced_choices(forward_choice(problem), grad_input, grad_weight), kernels_launched() as launched, \
            grad_input_launches() as prepared, launch_variant(problem), \
            unittest.mock.patch.object(launch, "target_programs", lambda device: case.programs):
        out = call_gconvgen(problem, Tensors(leaves["x"], leaves["weight"], leaves.get("bias"),
                                             leaves.get("residual")))
        grads = torch.autograd.grad(out, list(leaves.values()), grad_output)

    kinds = [desc.kind for desc in launched]
    assert not problem.wide_index or all(desc.wide_index for desc in launched), "64-bit offsets not taken"
    assert len(prepared) == 1, f"grad-input prepared {len(prepared)} times"
    (spec, choice), = prepared
    assert choice == grad_input, f"grad-input ran {choice}, the provider said {grad_input}"
    transposed = (grad_input_as_forward(spec, knobs.padding_budget()) if choice == DEFAULT
                  else transposed_conv(spec) if choice.transposed else None)
    if transposed is None:
        assert "grad_input" in kinds, f"the grad-input kernel did not run: {kinds}"
    else:
        assert "grad_input" not in kinds and any(d.kind == "forward" and d.spec == transposed for d in launched), \
            f"the transposed forward {transposed} did not run: {[(d.kind, d.spec) for d in launched]}"
    event_in_test(f"grad_input by {'the transposed forward' if transposed else 'the grad-input kernel'}")
    assert "grad_weight" in kinds and ("bias" not in leaves or "grad_bias" in kinds), kinds
    grad_weight_family = case.grad_weight_family or _default_grad_weight_family(case.conv)
    ran = [desc.family for desc in launched if desc.kind == "grad_weight"]
    assert ran == [grad_weight_family], f"grad-weight ran {ran}, wanted {grad_weight_family}"
    event_in_test(f"grad_weight by {grad_weight_family}{'' if case.grad_weight_family else ' (default)'}")

    out_pixels = out.shape[0] * out.shape[2] * out.shape[3]
    reductions = {"x": problem.out_channels // problem.groups * problem.kernel[0] * problem.kernel[1],
                  "weight": out_pixels, "bias": out_pixels,
                  "residual": out_pixels if problem.residual_view == "per_channel" else 1}
    # with NaN / inf in x: NaN exactly where torch's gradient has NaN, inf where it has inf; where a kernel ran
    # that spreads a non-finite input to its neighbours (the banded kernel, packed groups), NaN may also stand
    # where torch's is finite, and only gradients finite in both are compared. relu and relu6 take their
    # gradient off the forward's output: after a forward that spread NaN to outputs torch keeps finite, their
    # gradient there differs (finite values too), so only the non-finite gradients are required then
    spreading = [desc for desc in launched if tolerates_nonfinite_spread(desc)]
    exact = not spreading
    compare_finite = problem.activation not in ("relu", "relu6") or not any(d.kind == "forward" for d in spreading)
    for name, got, want in zip(leaves, grads, wanted):
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        if case.specials:
            event_in_test("NaN / inf inputs through the backward")
            assert_matches(got, want, dtype, reductions[name], exact_nonfinite=exact, compare_finite=compare_finite,
                           what=f"grad of {name}")
            continue
        assert torch.isfinite(got).all(), f"grad of {name}: not every element written (NaN) or not finite"
        atol, rtol = tolerances(dtype, reductions[name])
        if dtype != torch.float32 and problem.activation not in ("none", "relu", "relu6"):
            # the backward recomputes the pre-activation rounded to the dtype (as eager torch would hold it) and
            # takes the activation's gradient there: a rounding of each term, a few ulps of the largest
            atol = max(atol, 4 * torch.finfo(dtype).eps * want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                   msg=lambda message, name=name: f"grad of {name}: {message}")


# where an activation's derivative jumps
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0)}


def near_a_kink(problem: ConvProblem, leaves64: dict, dtype: torch.dtype) -> torch.Tensor:
    """The outputs whose float64 pre-activation lies within rounding distance (in ``dtype``) of a kink of the
    activation, or for relu6 is NaN. The backward takes the derivative at the pre-activation as the dtype holds
    it (the output of relu / relu6, a recomputed pre-activation otherwise, as eager torch would), which may lie
    on the other side of the kink than float64's: a jump of the whole output gradient there, not a wrong result.
    The test zeroes the output gradient at these outputs (the kinks themselves are tested exactly by the
    ``at_kinks`` cases, whose pre-activations every dtype holds exactly)."""
    with torch.no_grad():
        conv = reference_conv(leaves64["x"], leaves64["weight"], leaves64.get("bias"), problem.stride,
                              sides_of(problem), problem.dilation, problem.groups)
        residual = leaves64.get("residual")
        pre = conv if residual is None else conv + residual
        scale = conv.abs() + (0 if residual is None else residual.abs())
        near = torch.zeros(pre.shape, dtype=torch.bool)
        for kink in KINKS.get(problem.activation, ()):
            near |= (pre - kink).abs() <= 4 * torch.finfo(dtype).eps * (scale + abs(kink) + 1)
        if problem.activation == "relu6":
            # torch's hardtanh_backward at a NaN passes the gradient in its scalar tail and zeroes it in its
            # vector body (x86 CPU, float64: an element's place in its 8-wide chunks decides): no reference there
            near |= torch.isnan(pre)
    return near


@contextlib.contextmanager
def grad_input_launches():
    """(spec, choice) of every grad-input launch prepared inside the block (launch.prepare_grad_input)."""
    from gconvgen.runtime import launch

    seen: list = []
    prepare = launch.prepare_grad_input

    def spy(spec, grad_output, weight, grad_x, choice=DEFAULT, target=None):
        seen.append((spec, choice))
        return prepare(spec, grad_output, weight, grad_x, choice, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "prepare_grad_input", spy)
        yield seen


def note_in_test(text: str) -> None:
    if currently_in_test_context():
        note(text)


def event_in_test(text: str) -> None:
    if currently_in_test_context():
        event(text)


# ---------------------------------------------------------------------------------------------- the tests


def _known(**fields) -> ConvProblem:
    """A problem of the known-wrong list: float32 NCHW dense, no bias, the planner's default family."""
    return ConvProblem(**{"api": "conv2d", "batch": 1, "bias": False, "seed": 1, **fields})


# One test per forced family (each its own share of the examples and its own saved failures), and the
# planner's untuned default, which carries the known wrong results as explicit examples.


@settings(max_examples=budget(0.25))
@given(problem=conv_problems(families=("igemm",)))
def test_conv2d_forward_igemm(problem, nan_filled_outputs):
    check_forward(problem)


@settings(max_examples=budget(0.25))
@given(problem=conv_problems(families=("igemm_rows",)))
def test_conv2d_forward_igemm_rows(problem, nan_filled_outputs):
    check_forward(problem)


@settings(max_examples=budget(0.25))
@given(problem=conv_problems(families=("depthwise",)))
def test_conv2d_forward_depthwise(problem, nan_filled_outputs):
    check_forward(problem)


@settings(max_examples=budget(0.25))
@given(problem=conv_problems(families=("depthwise_gemm",)))
def test_conv2d_forward_depthwise_gemm(problem, nan_filled_outputs):
    check_forward(problem)


@settings(max_examples=budget(0.25))
@given(problem=conv_problems(families=("depthwise1d",)))
def test_conv2d_forward_depthwise1d(problem, nan_filled_outputs):
    check_forward(problem)


def dense_maps():
    """Depthwise problems forced onto the dense kernel: windows up to 13 x 13, on maps up to 9 x 9 (and rows of
    20), often smaller than the window, so that a tile's windows reach past the map, every row or a few."""
    return conv_problems(families=("depthwise_dense",), kernel_sides=(1, 2, 3, 5, 7, 9, 13),
                         extents=("tiny", "small", "small", "long_rows"))


@settings(max_examples=budget(0.25))
@given(problem=dense_maps())
@example(
    problem=ConvProblem(api='conv2d',
     batch=3,
     in_channels=63,
     out_channels=126,
     groups=63,
     size=(2, 6),
     kernel=(1, 1),
     stride=(2, 1),
     padding='same',
     dilation=(1, 2),
     policy='strict',
     layout='nchw',
     view='padded_rows',
     weight_memory='width_step',
     dtype='bfloat16',
     bias=True,
     bias_strided=False,
     activation='none',
     residual=False,
     residual_view='per_channel',
     family='depthwise_dense',
     config=None,
     specials=((2209, -math.inf), (9979, math.nan), (12684, math.nan)),
     residual_specials=(),
     unbatched=False,
     wide_index=False,
     max_rows=0,
     seed=254634),
).via('discovered failure')
def test_conv2d_forward_depthwise_dense(problem, nan_filled_outputs):
    """The dense kernel: tiles of output pixels whose windows reach all of a small map or some of its rows,
    windows larger than the map, strides, dilations, several tiles, non-finite inputs, both layouts."""
    check_forward(problem)


def banded_rows():
    """conv1d problems forced onto the banded kernel: wide (up to 40 taps) and narrow windows, rows of up to
    300 positions."""
    return conv_problems(api="conv1d", families=("depthwise_gemm",), kernel_sides=(2, 5, 9, 17, 24, 40),
                         extents=("tiny", "long_rows", "sequence", "sequence"))


@settings(max_examples=budget(0.25))
@given(problem=banded_rows())
def test_conv1d_forward_banded_rows(problem, nan_filled_outputs):
    """The banded kernel on 1-D rows: wide windows (up to 40 taps, dilated) over rows of up to 300 positions,
    where a tile of one row's strips loads its input once and gathers each band step's tile (strip_rows),
    its halo from the next tile, past STRIP_WINDOW from the wide tile (the main tile's strips and as many again),
    and flat tiles at stride > 1 and for windows past twice STRIP_WINDOW (strip_window: 8 or 16 here)."""
    check_forward(problem)


@st.composite
def banded_columns(draw):
    """conv2d problems forced onto the banded kernel in channels_last, or in NCHW on the runtime's channels_last
    copy (DepthwiseGemm.stages_channels_last), with windows of 16 to 18 rows (dilated now and then) over maps of
    17 to 40 output rows: tiles of one column of strips' rows (column_rows), one or two down a column, the halo
    past the tile, the map's last rows and its padding."""
    problem = draw(conv_problems(families=("depthwise_gemm",), layouts=("channels_last", "nhwc", "nchw"), max_channels=6,
                                 kernel_sides=(1, 2, 3, 5), extents=("tiny", "small", "long_rows")))
    kernel_h, dilation_h = draw(st.sampled_from((16, 17, 18))), draw(st.sampled_from((1, 1, 2)))
    reach = (kernel_h - 1) * dilation_h
    top, bottom = draw(st.integers(0, reach + 2)), draw(st.integers(0, reach + 2))
    height = draw(st.integers(17, 40)) + reach - top - bottom  # the output rows drawn, at stride 1
    assume(height >= 1)
    left, right = (problem.padding[2:] if isinstance(problem.padding, tuple)
                   else ((problem.kernel[1] - 1) * problem.dilation[1] // 2,) * 2)
    problem = dataclasses.replace(problem, kernel=(kernel_h, problem.kernel[1]), stride=(1, problem.stride[1]),
                                  dilation=(dilation_h, problem.dilation[1]), size=(height, problem.size[1]),
                                  padding=(top, bottom, left, right), max_rows=0,
                                  config=KernelConfig(draw(st.sampled_from((32, 64))),
                                                      draw(st.sampled_from((1, 2, 4))), 16, num_stages=1))
    assume(output_size(problem)[1] >= 1)
    return problem


@settings(max_examples=budget(0.1))
@given(problem=banded_columns())
def test_conv2d_forward_banded_columns(problem, nan_filled_outputs):
    """The banded kernel in channels_last (NCHW: on a staged copy) on windows of at least COLUMN_KERNEL_ROWS rows,
    where a tile of one column of strips' output rows loads each band step's input once and gathers each kernel
    row's tile (column_rows): its halo past the tile, rows past the map, dilated heights, non-finite inputs."""
    check_forward(problem)


@st.composite
def banded_sliding(draw):
    """conv2d problems forced onto the banded kernel with windows of 2 to 7 rows (dilated now and then) of at most
    SLIDING_OPEN_ROWS open rows, at strides 1 to 3 along the height, in either layout, over maps of 1 to 40 output
    rows: tiles of (batch, block of rows, strip) triples sliding down the rows (sliding_rows), one to three blocks
    down the rows, the window's reach before and past a block's rows and the map, phases of the stride no kernel
    row reads, strided widths, several tiles, strips of 16 and 32 columns (fewer band steps than the template
    unrolls for 16)."""
    problem = draw(conv_problems(families=("depthwise_gemm",), max_channels=4, kernel_sides=(1, 2, 3, 5, 7),
                                 extents=("tiny", "small", "long_rows")))
    kernel_h, dilation_h = draw(st.integers(2, 7)), draw(st.sampled_from((1, 1, 2)))
    stride_h = draw(st.sampled_from((1, 1, 2, 3)))
    reach = (kernel_h - 1) * dilation_h
    assume(reach // stride_h + 1 <= SLIDING_OPEN_ROWS)
    top, bottom = draw(st.integers(0, reach + 1)), draw(st.integers(0, reach + 1))
    out_rows = draw(st.sampled_from((1, 2, 5, 16, 17, 33, 40)))
    # the output rows drawn, and now and then rows past the last window's
    height = (out_rows - 1) * stride_h + reach + 1 - top - bottom + draw(st.integers(0, stride_h - 1))
    assume(height >= 1)
    left, right = (problem.padding[2:] if isinstance(problem.padding, tuple)
                   else ((problem.kernel[1] - 1) * problem.dilation[1] // 2,) * 2)
    width, batch = problem.size[1], problem.batch
    if draw(st.integers(0, 3)) == 0:  # rows of 6 or 7 strips of 16 in 3 images: two tiles of 16 triples or more
        width, batch = draw(st.integers(81, 100)), 3
    problem = dataclasses.replace(problem, kernel=(kernel_h, problem.kernel[1]),
                                  stride=(stride_h, problem.stride[1]),
                                  dilation=(dilation_h, problem.dilation[1]), size=(height, width), batch=batch,
                                  unbatched=problem.unbatched and batch == 1, padding=(top, bottom, left, right),
                                  max_rows=0, config=KernelConfig(16, draw(st.sampled_from((1, 2, 4))),
                                                                  draw(st.sampled_from((16, 16, 32))), num_stages=1))
    assume(output_size(problem)[1] >= 1)
    return problem


@settings(max_examples=budget(0.15))
@given(problem=banded_sliding())
def test_conv2d_forward_banded_sliding(problem, nan_filled_outputs):
    """The banded kernel on windows of a few rows, whose tile of (batch, block of rows, strip) triples slides down
    the output rows and holds its band blocks (sliding_rows): rows before and past a block's, several blocks down
    the rows, several tiles, dilated and strided heights, non-finite inputs, both layouts."""
    check_forward(problem)


@st.composite
def banded_grad_input(draw) -> GradientProblem:
    """Depthwise conv2d problems at a stride, trained through with the input gradient forced onto the banded
    kernel (depthwise_gemm.strided_grad_input): strides of 1 to 3 rows and 1 to 16 columns (not both 1),
    windows of 1 to 7 rows (dilated now and then) of at most SLIDING_OPEN_ROWS open rows, paddings from none to
    one past the reach, maps of 1 to 40 rows (one to three blocks of row groups; rows and columns no window
    reaches), strided widths, several tiles, strips of 16 and 32 columns; both layouts, every dtype, views,
    NaN/inf inputs, 64-bit offsets (conv_problems)."""
    problem = draw(conv_problems(families=("depthwise_gemm",), max_channels=4, kernel_sides=(1, 2, 3, 5, 7),
                                 extents=("tiny", "small", "long_rows")))
    assume(problem.out_channels == problem.in_channels and problem.api == "conv2d")
    kernel_h, dilation_h = draw(st.integers(1, 7)), draw(st.sampled_from((1, 1, 2)))
    stride = (draw(st.sampled_from((1, 2, 2, 3))), draw(st.sampled_from((1, 2, 2, 4, 8, 16))))
    assume(stride != (1, 1))
    reach = (kernel_h - 1) * dilation_h
    top, bottom = draw(st.integers(0, reach + 1)), draw(st.integers(0, reach + 1))
    height = draw(st.sampled_from((1, 2, 5, 16, 17, 33, 40)))
    left, right = (problem.padding[2:] if isinstance(problem.padding, tuple)
                   else ((problem.kernel[1] - 1) * problem.dilation[1] // 2,) * 2)
    width, batch = problem.size[1], problem.batch
    if draw(st.integers(0, 3)) == 0:  # rows of 6 or 7 strips of 16 in 3 images: two tiles of 16 triples or more
        width, batch = draw(st.integers(81, 100)), 3
    problem = dataclasses.replace(problem, kernel=(kernel_h, problem.kernel[1]), stride=stride,
                                  dilation=(dilation_h, problem.dilation[1]), size=(height, width), batch=batch,
                                  unbatched=problem.unbatched and batch == 1, padding=(top, bottom, left, right),
                                  family=None, config=None, specials=(), residual_specials=())
    assume(min(output_size(problem)) >= 1)
    spec = dataclasses.replace(spec_of(problem), bias=False)
    assume(depthwise_gemm.strided_grad_input(spec))
    config = KernelConfig(draw(st.sampled_from((16, 32))), draw(st.sampled_from((1, 2, 4))),
                          draw(st.sampled_from((16, 16, 32))), num_stages=1)
    desc = described(spec, "grad_input", "depthwise_gemm", config)
    assume(desc is not None)
    cheap = iterations(problem, desc) <= MAX_ITERATIONS
    specials = draw(special_values(2)) if draw(st.integers(0, 3)) == 0 else ()
    return GradientProblem(problem, "direct", config if cheap else None, specials=specials,
                           grad_input_family="depthwise_gemm")


@st.composite
def banded_pieces(draw) -> GradientProblem:
    """conv1d problems trained through with the weight gradient forced onto the banded kernel's tile of one row's
    strips in pieces (strip_pieces; pieces: any window width): windows of 1 to 64 taps at stride 1 without
    dilation, rows of up to 300 positions (several tiles of a row's strips), causal, same, valid and one-sided
    paddings, tiles of 16 and 32 strips of 16 and 32 columns, 1 to 4 channels a program; both layouts, every
    dtype, views, NaN/inf inputs, 64-bit offsets (conv_problems), the reduction split as on a GPU."""
    problem = draw(conv_problems(api="conv1d", families=("depthwise_gemm",), max_channels=6,
                                 kernel_sides=(1, 2, 5, 9, 17, 24, 40, 64),
                                 extents=("tiny", "long_rows", "sequence")))
    problem = dataclasses.replace(problem, stride=(1, 1), dilation=(1, 1), family=None, config=None, pieces=True,
                                  specials=(), residual_specials=())
    config = KernelConfig(draw(st.sampled_from((16, 32))), draw(st.sampled_from((1, 2, 4))),
                          draw(st.sampled_from((16, 16, 32))), num_stages=1)
    if draw(st.integers(0, 3)) == 0:  # 17 to 19 strips of 16: a row's strips in two tiles of 16
        problem = dataclasses.replace(problem, size=(1, draw(st.integers(257, 300))))
        config = dataclasses.replace(config, block_m=16, block_k=16)
    spec = dataclasses.replace(spec_of(problem), bias=False)
    with launch_variant(problem):
        desc = described(spec, "grad_weight", "depthwise_gemm", config)
    assume(desc is not None and desc.pieces)
    specials = draw(special_values(2)) if draw(st.integers(0, 3)) == 0 else ()
    return GradientProblem(problem, grad_weight_family="depthwise_gemm", grad_weight_config=config,
                           programs=draw(st.sampled_from((1, 4))), specials=specials)


@settings(max_examples=budget(0.15))
@given(case=banded_pieces())
def test_gradients_banded_pieces(case, nan_filled_outputs):
    """The banded grad-weight of a height-1 window in pieces, forced: a step's strips of one row, the wide tile
    of its input strips and the pieces' reach past them (the row's end, padding before it), each piece's tile
    gathered, and the taps of each block of offsets from two pieces' accumulators; every gradient against
    torch's."""
    check_gradients(case)


@settings(max_examples=budget(0.15))
@given(case=banded_grad_input())
# a map of one column (found by the long profile): grad_out [2, 2, 1, 1] reads as channels_last, so the spec is,
# while grad_x keeps x's NCHW strides: the kernel must write grad_x through its own strides
@example(case=GradientProblem(_known(batch=2, in_channels=2, out_channels=2, groups=2, size=(2, 1), kernel=(1, 1),
                                     stride=(2, 1)), "direct",
                              KernelConfig(16, 1, 16, num_warps=4, num_stages=1), grad_input_family="depthwise_gemm"))
def test_gradients_banded_grad_input(case, nan_filled_outputs):
    """The banded grad-input at a stride, forced: its tile of (batch, block of row groups, strip) triples slides
    down grad_out's rows and stores a group of stride_h rows a step; every gradient against torch's."""
    check_gradients(case)


@st.composite
def direct_rows(draw):
    """conv2d problems forced onto the direct depthwise kernel in channels_last, on maps of a few rows of up to
    20 pixels, mostly in tiles of 8 or 16 pixels: tiles of one row's pixels (row_tiles), several a row, are a
    program a row and tile (up to 6 x MAX_ITERATIONS interpreted iterations)."""
    problem = draw(conv_problems(families=("depthwise",), layouts=("channels_last", "nhwc"), max_channels=8,
                                 kernel_sides=(2, 3, 4, 5), extents=("tiny", "long_rows", "long_rows"),
                                 max_iterations=6 * MAX_ITERATIONS))
    if draw(st.integers(0, 3)):
        config = KernelConfig(draw(st.sampled_from((8, 16))), draw(st.sampled_from((1, 2, 4, 8))), 0,
                              num_warps=draw(st.sampled_from((1, 4))), num_stages=1)
        desc = described(spec_of(problem), "forward", "depthwise", config)
        if desc is not None and iterations(problem, desc) <= 6 * MAX_ITERATIONS:
            problem = dataclasses.replace(problem, config=config)
    return problem


@settings(max_examples=budget(0.25))
@given(problem=direct_rows())
def test_conv2d_forward_direct_rows(problem, nan_filled_outputs):
    """The direct depthwise kernel in channels_last, where a tile of one output row's pixels loads each kernel
    row's input once and gathers each tap's tile (row_tiles), its halo past the tile and the row's end, and
    flat tiles at stride > 1 along the width or in the interpreter's default 256-pixel tiles."""
    check_forward(problem)


@settings(max_examples=budget(0.5))
@given(problem=conv_problems(families=("depthwise1d", "depthwise_gemm", None), extents=("tiny",)))
def test_row_aligned_kernels_on_tiny_maps(problem, nan_filled_outputs):
    """The kernels that read rows as aligned vectors (depthwise1d, the banded kernel's NCHW rows) write their
    strides and widths rounded to the launch's row alignment: on maps of at most 3 x 3 (outputs of width 1,
    unit channel strides, odd widths) a value the alignment left out would be rounded to a wrong one."""
    check_forward(problem)


@settings(max_examples=budget(0.25))
@given(problem=conv_problems(families=(None,)))
# 1. depthwise stride 2 on a 2 x 2 map, output 1 x 1
@example(problem=_known(in_channels=8, out_channels=8, groups=8, size=(2, 2), kernel=(3, 3), stride=(2, 2),
                        padding=(1, 1, 1, 1)))
@example(problem=_known(in_channels=16, out_channels=16, groups=16, size=(2, 2), kernel=(5, 5), stride=(2, 2),
                        padding=(2, 2, 2, 2)))
@example(problem=_known(in_channels=8, out_channels=8, groups=8, size=(2, 2), kernel=(5, 5), stride=(2, 2),
                        padding=(2, 2, 2, 2)))
@example(problem=_known(in_channels=16, out_channels=16, groups=16, size=(2, 2), kernel=(3, 3), stride=(2, 2),
                        padding=(1, 1, 1, 1)))
@example(problem=_known(batch=2, in_channels=64, out_channels=64, groups=64, size=(2, 2), kernel=(3, 3),
                        stride=(2, 2), padding=(1, 1, 1, 1)))
# 2. input strided along the width: big[..., ::2]
@example(problem=_known(in_channels=16, out_channels=16, groups=16, size=(2, 3), kernel=(1, 2),
                        padding=(1, 1, 1, 1), view="width_step"))
@example(problem=_known(in_channels=16, out_channels=16, groups=16, size=(2, 5), kernel=(1, 4),
                        padding=(1, 1, 1, 1), view="width_step"))
@example(problem=_known(in_channels=16, out_channels=16, groups=16, size=(2, 7), kernel=(1, 2),
                        padding=(1, 1, 1, 1), view="width_step"))
# 3. NaN through a fused relu / relu6 must stay NaN, as F.relu(F.conv2d(...)) keeps it
@example(problem=_known(in_channels=8, out_channels=8, groups=8, size=(4, 4), kernel=(3, 3), padding=(1, 1, 1, 1),
                        activation="relu", specials=((5, float("nan")),)))
@example(problem=_known(in_channels=8, out_channels=8, groups=8, size=(4, 4), kernel=(3, 3), padding=(1, 1, 1, 1),
                        layout="channels_last", activation="relu6", residual=True, specials=((21, float("nan")),)))
def test_conv2d_forward_default(problem, nan_filled_outputs):
    check_forward(problem)


@settings(max_examples=budget(0.4))
@given(problem=conv_problems(api="conv1d"))
# 1. depthwise, one output per channel from a 4-sample input
@example(problem=_known(api="conv1d", batch=2, in_channels=64, out_channels=64, groups=64, size=(1, 4), kernel=(1, 4),
                        padding="valid"))
def test_conv1d_forward(problem, nan_filled_outputs):
    check_forward(problem)


@settings(max_examples=budget(0.4))
@given(case=gradient_problems())
# 4. hardswish at pre-activation exactly +-3 (zero input, bias +-3): torch's gradient is 1 at +3 and 0 at -3
@example(case=GradientProblem(_known(in_channels=4, out_channels=4, groups=4, size=(3, 3), kernel=(3, 3),
                                     padding=(1, 1, 1, 1), bias=True, activation="hardswish"), at_kinks=True))
@example(case=GradientProblem(_known(in_channels=4, out_channels=4, groups=2, size=(3, 3), kernel=(3, 3),
                                     padding=(1, 1, 1, 1), bias=True, activation="hardswish"), grad_input="direct",
                              at_kinks=True))
# 5. hardswish at a NaN pre-activation (found by the long profile): torch's own backward kernel passes the
# gradient through or returns NaN depending on the element's place; the gradient of x must be NaN there, in
# one group and in packed groups (whose forward spreads the NaN to the other group's pre-activation)
@example(case=GradientProblem(_known(batch=3, in_channels=2, out_channels=1, groups=1, size=(2, 2), kernel=(1, 1),
                                     padding=(0, 0, 0, 1), family="igemm", activation="hardswish"),
                              specials=((0, float("nan")),)))
@example(case=GradientProblem(_known(batch=3, in_channels=3, out_channels=2, groups=2, size=(1, 2), kernel=(1, 1),
                                     dilation=(1, 2), policy="pad", family="igemm", activation="hardswish"),
                              grad_weight_family="igemm", specials=((0, float("nan")),)))
# relu6 at a NaN pre-activation (found by CI's profile): torch's own gradient there is 0 or passes through by the
# element's place in its vector chunks, so the output gradient is zeroed there (near_a_kink); the rest must match
@example(case=GradientProblem(_known(in_channels=1, out_channels=1, groups=1, size=(1, 8), kernel=(1, 1),
                                     padding="same", layout="channels_last", family="depthwise1d",
                                     activation="relu6", wide_index=True), specials=((0, float("nan")),)))
# split reductions: grad-weight and grad-bias sum several pixel ranges in a fixed order (as on a GPU)
@example(case=GradientProblem(_known(batch=2, in_channels=4, out_channels=6, groups=2, size=(8, 8), kernel=(3, 3),
                                     padding=(1, 1, 1, 1), bias=True),
                              grad_weight_config=KernelConfig(16, 16, 16, num_warps=1, num_stages=1), programs=64))
@example(case=GradientProblem(_known(batch=2, in_channels=4, out_channels=4, groups=4, size=(8, 8), kernel=(3, 3),
                                     padding=(1, 1, 1, 1), bias=True),
                              grad_weight_config=KernelConfig(8, 4, 0, num_warps=1, num_stages=1), programs=64))
# 6. a 1 x 1 output of a channels_last input and an hwio weight (found by CI): torch's float64 CPU backward
# refuses those operands, so the reference must read contiguous copies
@example(case=GradientProblem(_known(batch=2, in_channels=2, out_channels=1, groups=1, size=(1, 2), kernel=(1, 2),
                                     layout="channels_last", weight_memory="hwio", bias=True, activation="relu",
                                     wide_index=True), at_kinks=True))
def test_gradients(case, nan_filled_outputs):
    check_gradients(case)


@dataclass(frozen=True)
class DecodeProblem:
    """``steps`` calls of causal_conv1d_update, each with ``tokens`` new inputs per sequence (None: x is
    [B, C], one token; else [B, C, tokens]), on a state of ``state_len`` >= k - 1 columns: zeros or random
    (prefilled), a plain rolling state or a circular buffer (``circular``: the call says where its next
    write goes, cache_seqlens), of its own rows or picked from a larger pool (``pool``: conv_state_indices,
    -1 for a padded slot), maybe a view (``state_view``); the weight [C, 1, k] or [C, k] in x's dtype or
    float32 (``wide_weight``), with or without bias, then SiLU or no activation."""

    batch: int
    channels: int
    kernel: int
    steps: int
    tokens: int | None
    state_len: int
    dtype: str
    bias: bool
    weight_rank: int
    wide_weight: bool
    activation: str | None
    prefilled: bool
    circular: bool
    pool: bool
    state_view: bool
    seed: int


@st.composite
def decode_problems(draw) -> DecodeProblem:
    kernel = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(tuple(DTYPES)))
    return DecodeProblem(
        batch=draw(st.integers(1, 3)), channels=draw(st.integers(1, 16)), kernel=kernel, steps=draw(st.integers(1, 4)),
        tokens=draw(st.none() | st.integers(1, 6)), state_len=kernel - 1 + draw(st.integers(0, 3)), dtype=dtype,
        bias=draw(st.booleans()), weight_rank=draw(st.sampled_from((2, 3))),
        wide_weight=dtype != "float32" and draw(st.booleans()), activation=draw(st.sampled_from((None, "silu"))),
        prefilled=draw(st.booleans()), circular=draw(st.booleans()), pool=draw(st.booleans()),
        state_view=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _decode(**fields) -> DecodeProblem:
    """The least decode problem: one sequence of one channel, k = 1, one step of one token, float32."""
    return DecodeProblem(**{"batch": 1, "channels": 1, "kernel": 1, "steps": 1, "tokens": None, "state_len": 0,
                            "dtype": "float32", "bias": False, "weight_rank": 3, "wide_weight": False,
                            "activation": None, "prefilled": False, "circular": False, "pool": False,
                            "state_view": False, "seed": 0, **fields})


@settings(max_examples=budget(1.0))
@given(case=decode_problems())
# found by this fuzz: k = 1 (a state of no columns) with several tokens, or as a circular buffer
@example(case=_decode(tokens=2))
@example(case=_decode(circular=True))
def test_decode_step(case):
    """Every output against a float64 loop over the tokens, one at a time: the window is the k - 1 inputs
    before the token (read from the state: its last columns, or the circular buffer's positions before the
    write position) then the token; each token is then written to the state (shifted left by one, or at
    the write position). The state after each call equals the loop's exactly; pool rows no sequence names,
    and the rows of padded slots (-1, whose output is 0), do not change."""
    dtype = DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(case.seed)
    tokens = case.tokens or 1
    sequence = torch.randn(case.batch, case.channels, case.steps * tokens, generator=generator).to(dtype)
    weight_dtype = torch.float32 if case.wide_weight else dtype
    weight = torch.randn(case.channels, 1, case.kernel, generator=generator).to(weight_dtype)
    bias = torch.randn(case.channels, generator=generator).to(weight_dtype) if case.bias else None
    rows = case.batch + (2 if case.pool else 0)
    start = torch.randn(rows, case.channels, case.state_len, generator=generator).to(dtype)
    if not case.prefilled:
        start.zero_()
    if case.pool:  # each sequence a row of the pool, the last sequence (of two or more) a padded slot
        picked = torch.randperm(rows, generator=generator)[:case.batch]
        if case.batch > 1:
            picked[-1] = -1
        indices = picked.to(torch.int32)
    else:
        indices = None
    if case.state_view:  # a view one column into a wider buffer: not contiguous
        state = torch.full((rows, case.channels, case.state_len + 1), float("nan"), dtype=dtype)[..., 1:]
        state.copy_(start)
    else:
        state = start.clone()
    write = torch.randint(0, 3 * case.state_len + 1, (case.batch,), generator=generator) if case.circular else None

    expected_state = start.double()
    taps64 = weight.double()[:, 0]
    for step in range(case.steps):
        x = sequence[:, :, step * tokens:(step + 1) * tokens]
        out = gconvgen.causal_conv1d_update(
            x if case.tokens else x[..., 0], state, weight if case.weight_rank == 3 else weight[:, 0], bias,
            activation=case.activation, cache_seqlens=None if write is None else write.to(torch.int32),
            conv_state_indices=indices)
        expected = torch.zeros(case.batch, case.channels, tokens, dtype=torch.float64)
        for b in range(case.batch):
            row = b if indices is None else int(indices[b])
            if row < 0:  # a padded slot: output 0, no state read or written
                continue
            for t in range(tokens):
                if write is None:  # the last k - 1 columns are the previous inputs, oldest first
                    history = expected_state[row, :, expected_state.shape[-1] - (case.kernel - 1):]
                else:  # the k - 1 positions before the write position, circularly
                    at = int(write[b]) + t
                    history = expected_state[row][:, [(at - case.kernel + 1 + j) % case.state_len
                                                      for j in range(case.kernel - 1)]]
                window = torch.cat([history, x[b, :, t:t + 1].double()], dim=-1)
                value = (window * taps64).sum(-1) + (0 if bias is None else bias.double())
                expected[b, :, t] = F.silu(value) if case.activation == "silu" else value
                if write is None:  # shifted left by one, the token appended (nothing kept with no columns)
                    shifted = torch.cat([expected_state[row], x[b, :, t:t + 1].double()], dim=-1)
                    expected_state[row] = shifted[:, shifted.shape[-1] - case.state_len:]
                elif case.state_len:  # written at the write position
                    expected_state[row, :, (int(write[b]) + t) % case.state_len] = x[b, :, t].double()
        if write is not None:
            write = write + tokens  # the caller advances cache_seqlens
        expected = expected if case.tokens else expected[..., 0]
        assert out.dtype == dtype and out.shape == expected.shape, (out.dtype, out.shape)
        assert_matches(out, expected, dtype, case.kernel, what=f"step {step}")
        assert torch.equal(state.double(), expected_state), f"step {step}: the state is not the loop's"


@dataclass(frozen=True)
class SequenceProblem:
    """gconvgen.conv1d as a sequence model's causal depthwise conv (causal-conv1d's causal_conv1d_fn):
    ``mode`` "initial_states" (the inputs before the first given; ``final`` also returns the last k - 1),
    "final_states" (return_final_states alone) or "seq_idx" (several sequences packed in a row, a negative
    id a padded position whose output is 0: runs of ids along the row after leading padding, or with
    ``scattered_ids`` any id of -1..2 at each position, so one sequence may resume after another); a float32
    weight and bias with half input (``wide_weight``); ``nonfinite`` puts an inf and a NaN in x; ``grad``
    also checks the gradients of x, the weight, the bias and the initial states (with a non-finite x in
    ``seq_idx`` mode only: the masked taps and padded outputs send no gradient, so no 0 x inf)."""

    batch: int
    channels: int
    length: int
    kernel: int
    data_format: str
    dtype: str
    wide_weight: bool
    bias: bool
    activation: str | None
    residual: bool
    mode: str
    final: bool
    scattered_ids: bool
    nonfinite: bool
    grad: bool
    seed: int


@st.composite
def sequence_problems(draw) -> SequenceProblem:
    dtype = draw(st.sampled_from(tuple(DTYPES)))
    mode = draw(st.sampled_from(("initial_states", "final_states", "seq_idx")))
    return SequenceProblem(
        batch=draw(st.integers(1, 3)), channels=draw(st.integers(1, 16)), length=draw(st.integers(1, 20)),
        kernel=draw(st.integers(1, 5)), data_format=draw(st.sampled_from(("NCL", "NLC"))), dtype=dtype,
        wide_weight=dtype != "float32" and draw(st.booleans()), bias=draw(st.booleans()),
        activation=draw(st.sampled_from((None, "silu", "swish"))), residual=draw(st.booleans()), mode=mode,
        final=mode == "final_states" or (mode == "initial_states" and draw(st.booleans())),
        scattered_ids=mode == "seq_idx" and draw(st.booleans()), nonfinite=draw(st.booleans()),
        grad=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=budget(0.25))
@given(case=sequence_problems())
# an inf in a sequence's own inputs, float16 (the banded grad-weight): the zero gradient of the last strip's
# columns past the row times that inf made two of its channel's taps NaN where torch's are finite (found by
# the long profile), the banded kernel's known limit
@example(case=SequenceProblem(batch=1, channels=12, length=20, kernel=5, data_format="NCL", dtype="float16",
                              wide_weight=False, bias=True, activation=None, residual=True, mode="seq_idx", final=False,
                              scattered_ids=False, nonfinite=True, grad=True, seed=1))
def test_conv1d_sequence_states(case, nan_filled_outputs):
    """Each output against a float64 sum over its window: the k - 1 inputs before it (those of another packed
    sequence, or before the row, are zeros; before the row, the initial states where given), then the input;
    plus bias and residual, then SiLU. The final states are the last k - 1 inputs exactly. With ``grad``, the
    gradients of that sum (autograd through it in float64)."""
    dtype = DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(case.seed)
    n, c, length, k = case.batch, case.channels, case.length, case.kernel
    x = torch.randn(n, c, length, generator=generator).to(dtype)
    # non-finite inputs with gradients in packed rows: padding's and other sequences' inputs have none
    grad = case.grad and (not case.nonfinite or case.mode == "seq_idx")
    if case.nonfinite:
        x.view(-1)[torch.randint(x.numel(), (2,), generator=generator)] = torch.tensor([float("inf"), float("nan")],
                                                                                      dtype=dtype)
    weight_dtype = torch.float32 if case.wide_weight else dtype
    weight = torch.randn(c, 1, k, generator=generator).to(weight_dtype)
    bias = torch.randn(c, generator=generator).to(weight_dtype) if case.bias else None
    residual = torch.randn(n, c, length, generator=generator).to(dtype) if case.residual else None
    initial = torch.randn(n, c, k - 1, generator=generator).to(dtype) if case.mode == "initial_states" else None
    seq_idx = None
    if case.mode == "seq_idx" and case.scattered_ids:
        seq_idx = torch.randint(-1, 3, (n, length), generator=generator, dtype=torch.int32)
    elif case.mode == "seq_idx":  # sequences in order along each row; a leading run of -1 is padding
        starts = torch.rand(n, length, generator=generator) < 0.25
        seq_idx = (starts.cumsum(dim=1) - (torch.rand(n, 1, generator=generator) < 0.5).long()).to(torch.int32)
    leaves = {name: t for name, t in (("x", x), ("weight", weight), ("bias", bias), ("initial_states", initial))
              if t is not None}
    for leaf in leaves.values():
        leaf.requires_grad_(grad)

    nlc = case.data_format == "NLC"
    to_api = (lambda t: t.transpose(1, 2)) if nlc else (lambda t: t)
    with forced_choices(), kernels_launched() as launched:
        result = gconvgen.conv1d(
            to_api(x), weight.permute(2, 1, 0) if nlc else weight, bias, padding="causal", groups=c,
            data_format=case.data_format, activation=case.activation,
            residual=None if residual is None else to_api(residual), seq_idx=seq_idx,
            initial_states=None if initial is None else to_api(initial), return_final_states=case.final)
    out, final = result if case.final else (result, None)

    leaves64 = {name: t.detach().double().requires_grad_(grad) for name, t in leaves.items()}
    x64, weight64, bias64, initial64 = (leaves64.get(name) for name in ("x", "weight", "bias", "initial_states"))
    history = torch.cat([torch.zeros(n, c, k - 1, dtype=torch.float64) if initial is None else initial64, x64],
                        dim=-1)  # position t of x is column t + k - 1
    columns = []
    for t in range(length):
        value = torch.zeros(n, c, dtype=torch.float64) if bias is None else bias64.expand(n, c)
        for tap in range(k):
            source = t - (k - 1 - tap)
            term = weight64[:, 0, tap] * history[:, :, source + k - 1]
            if seq_idx is not None:  # another sequence's input reads as zero, padding's outputs read nothing
                own = (((source < 0) | (seq_idx[:, max(source, 0)] == seq_idx[:, t])) & (seq_idx[:, t] >= 0))[:, None]
                # where, not *: inf x 0 is NaN; masked before the product too, or its weight gradient is 0 x inf
                term = torch.where(own, weight64[:, 0, tap] * torch.where(own, history[:, :, source + k - 1], 0.0), 0.0)
            value = value + term
        value = value + (0 if residual is None else residual[:, :, t].double())
        value = F.silu(value) if case.activation in ("silu", "swish") else value
        columns.append(value if seq_idx is None else torch.where((seq_idx[:, t] >= 0)[:, None], value, 0.0))
    expected = torch.stack(columns, dim=-1)
    assert out.dtype == dtype
    # the banded kernel (half precision past 4 taps) may spread an inf or NaN input to neighbouring outputs
    exact = not any(tolerates_nonfinite_spread(desc) for desc in launched)
    assert_matches(to_api(out).detach(), expected.detach(), dtype, k, exact_nonfinite=exact)
    if case.final:
        assert final.dtype == dtype
        torch.testing.assert_close(to_api(final).double(), history[:, :, history.shape[-1] - (k - 1):].detach(),
                                   rtol=0, atol=0, equal_nan=True, msg="final states")
    if grad:
        grad_out = torch.randn(n, c, length, generator=generator).to(dtype)
        with kernels_launched() as backward:
            out.backward(to_api(grad_out))
        expected.backward(grad_out.double())
        # the banded grad-weight multiplies the zero gradient of a strip's columns past the row by its inputs too
        exact = not any(tolerates_nonfinite_spread(desc) for desc in [*launched, *backward])
        for name, ours in leaves.items():
            if ours.numel() == 0:  # k = 1: empty initial states, which no output reads
                continue
            assert ours.grad is not None and ours.grad.dtype == ours.dtype, name
            assert_matches(ours.grad, leaves64[name].grad, ours.dtype, n * length, exact_nonfinite=exact,
                           what=f"grad {name}")


# ---------------------------------------------------------------------------------------------- the fuzz's domain


@contextlib.contextmanager
def without_local_constants():
    """Hypothesis now and then draws a constant found in the source of a local module imported so far (its
    providers._get_local_constants reads every new module of sys.modules), so what a fixed seed draws depends on
    which modules were imported before: a file run alone and the whole suite drew different problems (gconvgen's
    lazily imported modules, the test files collected). Within, it finds none. Its private API: where a
    Hypothesis lacks it (older ones read no local constants), nothing to do."""
    try:
        from hypothesis.internal.conjecture import providers
        found, cache, none = providers._get_local_constants, providers.CONSTANTS_CACHE, providers.Constants()
    except (ImportError, AttributeError):
        yield
        return
    cache.cache.clear()  # the pools of constants it has drawn from so far
    providers._get_local_constants = lambda: none
    try:
        yield
    finally:
        providers._get_local_constants = found
        cache.cache.clear()


def drawn(strategy, count: int) -> list:
    """``count`` values of ``strategy`` as the fuzz draws them (no kernel runs), the same every run, whatever
    ran before (a fixed seed, no local constants; derandomize=True would draw a less varied sample): what the
    domain tests inspect."""
    values: list = []

    @fixed_seed(0)
    @settings(max_examples=count, phases=[Phase.generate], database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value):
        values.append(value)

    with without_local_constants():
        collect()
    return values


@pytest.fixture(scope="module")
def drawn_problems():
    return {"conv2d": drawn(conv_problems(), 1000), "conv1d": drawn(conv_problems(api="conv1d"), 200),
            "default": drawn(conv_problems(families=(None,)), 200),
            # gradients: 2000, where a few entries of GRADIENT_DOMAIN had 0 to 3 in 600 (a banded grad-input forced)
            "gradients": drawn(gradient_problems(), 2000), "banded_rows": drawn(banded_rows(), 200),
            "direct_rows": drawn(direct_rows(), 200), "sequences": drawn(sequence_problems(), 200),
            "banded_columns": drawn(banded_columns(), 100), "banded_sliding": drawn(banded_sliding(), 100),
            "dense": drawn(dense_maps(), 100), "banded_pieces": drawn(banded_pieces(), 100),
            # each family forced, apart: in the conv2d sample a family's share of problems over several programs
            # is a few in a thousand
            **{f"forced {f}": drawn(conv_problems(families=(f,)), 150) for f in FAMILIES}}


def _transposed_forced_family(problem: ConvProblem) -> str:
    """The forward family a case forced onto the transposed route runs: the direct depthwise kernel where the
    transposed conv is depthwise (a grouped conv of one output a group transposes to a depthwise conv with a
    channel multiplier), else the igemm that slides down the rows."""
    transposed = transposed_conv(dataclasses.replace(spec_of(problem), bias=False))
    return "depthwise" if transposed.is_depthwise else "igemm_rows"


def _transposed_family(problem: ConvProblem) -> str | None:
    """The family of the forward conv that computes the problem's input gradient by default, if one does: the
    first the transposed conv's plan offers that suits the launch's pixels."""
    transposed = grad_input_as_forward(dataclasses.replace(spec_of(problem), bias=False), knobs.padding_budget())
    if transposed is None:
        return None
    out_h, out_w = output_size(problem)
    pixels = PixelSpace.of("forward", problem.batch, out_h, out_w, *problem.size)
    return suiting_first(plan(transposed).families, transposed, "forward", pixels)[0]


def _programs(problem: ConvProblem) -> int:
    """The programs of the problem's forward launch with its forced config (its family's default if None)."""
    with launch_variant(problem):
        desc = described(spec_of(problem), "forward", problem.family, problem.config)
        out_h, out_w = output_size(problem)
        return math.prod(desc.grid(PixelSpace.of("forward", problem.batch, *problem.size, out_h, out_w)))


def _strip_tiles(problem: ConvProblem, wide: bool = False) -> int:
    """How many tiles of one row's strips the banded forward launch of the problem has a row (0: flat tiles; with
    ``wide``, 0 unless on the wide tile, whose halo tile is as long as its main tile)."""
    with launch_variant(problem):
        desc = described(spec_of(problem), "forward", problem.family, problem.config)
    if not desc.halo_tile or (wide and desc.halo_tile != desc.config.block_m):
        return 0
    return -(-(-(-output_size(problem)[1] // desc.config.block_k)) // desc.config.block_m)


def _column_tiles(problem: ConvProblem) -> int:
    """How many tiles of one column of strips' rows the banded forward launch of the problem has down a column
    (0: flat tiles)."""
    desc = _forward_desc(problem)
    return -(-output_size(problem)[0] // desc.step_rows) if desc.step_rows else 0


def _forward_desc(problem: ConvProblem):
    """The forward kernel description of the problem's launch."""
    with launch_variant(problem):
        pixels = PixelSpace.of("forward", problem.batch, *problem.size, *output_size(problem))
        return lower(plan(spec_of(problem)), "forward", choice=Choice(KERNEL, problem.config, problem.family),
                     interpret=True, allow_tf32=False, pixels=pixels)


def _sliding_blocks(problem: ConvProblem) -> tuple[int, int]:
    """(tiles of triples, blocks down the rows) of the banded forward launch of the problem sliding down the
    output rows ((0, 0): another tile)."""
    with launch_variant(problem):
        desc = described(spec_of(problem), "forward", problem.family, problem.config)
        if desc is None or not desc.slide_rows:
            return 0, 0
        out_h, out_w = output_size(problem)
        rows = sliding_block_rows(out_h, problem.batch * -(-out_w // desc.config.block_k), desc.config.block_m)
        return desc.grid(PixelSpace.of("forward", problem.batch, *problem.size, out_h, out_w))[0], -(-out_h // rows)


def _row_blocks(problem: ConvProblem) -> int:
    """How many programs down the output rows the igemm_rows forward launch of the problem has (0: another
    family runs it)."""
    with launch_variant(problem):
        desc = described(spec_of(problem), "forward", problem.family, problem.config)
        out_h = output_size(problem)[0]
        return -(-out_h // rows_per_program(out_h)) if desc is not None and desc.family == "igemm_rows" else 0


def _pixel_row_tiles(problem: ConvProblem) -> int:
    """How many tiles of one output row's pixels the direct depthwise forward launch of the problem has a row
    (0: flat tiles)."""
    desc = described(spec_of(problem), "forward", problem.family, problem.config)
    return -(-output_size(problem)[1] // desc.config.block_m) if desc is not None and desc.halo_tile else 0


def _dense_tiles(problem: ConvProblem) -> tuple[int, bool]:
    """(tiles of output pixels, whether a tile's steps start past the map's first row) of the dense forward
    launch of the problem; (0, False) where another family runs it."""
    with launch_variant(problem):
        desc = described(spec_of(problem), "forward", problem.family, problem.config)
    if desc is None or desc.family != "depthwise_dense":
        return 0, False
    out_h, out_w = output_size(problem)
    block_n, block_k = desc.config.block_n, desc.config.block_k
    starts = [reached_pixels(desc.spec, q0, block_n, block_k, out_h, out_w, *problem.size)[0]
              for q0 in range(0, out_h * out_w, block_n)]
    return len(starts), any(start > 0 for start in starts)


def _default_grad_weight_family(problem: ConvProblem) -> str:
    """The grad-weight family an untuned launch runs: the first the plan offers that suits its pixels."""
    spec = dataclasses.replace(spec_of(problem), bias=False)
    pixels = PixelSpace.of("grad_weight", problem.batch, *problem.size, *output_size(problem))
    return suiting_first(plan(spec).grad_weight_families, spec, "grad_weight", pixels)[0]


def _igemm_rows_grad_weight_staged(case) -> bool | None:
    """Whether the igemm_rows grad-weight of an NCHW case reads channels_last copies of its activations (None:
    another family's grad-weight runs, or the layout is channels_last)."""
    problem = case.conv
    if problem.layout != "nchw" or (case.grad_weight_family or _default_grad_weight_family(problem)) != "igemm_rows":
        return None
    pixels = PixelSpace.of("grad_weight", problem.batch, *problem.size, *output_size(problem))
    with launch_variant(problem):
        desc = lower(plan(dataclasses.replace(spec_of(problem), bias=False)), "grad_weight",
                     choice=Choice(KERNEL, case.grad_weight_config, "igemm_rows"), interpret=True, allow_tf32=False,
                     pixels=pixels)
    return desc.stage_channels_last


def _forced_banded_grad_weight(case):
    """(the description, its pixels) of the banded grad-weight a case forced onto it; None where not forced."""
    if case.grad_weight_family != "depthwise_gemm":
        return None
    problem = case.conv
    pixels = PixelSpace.of("grad_weight", problem.batch, *problem.size, *output_size(problem))
    with launch_variant(problem):
        desc = lower(plan(spec_of(problem)), "grad_weight",
                     choice=Choice(KERNEL, case.grad_weight_config, "depthwise_gemm"), interpret=True,
                     allow_tf32=False, pixels=pixels)
    return desc, pixels


def _banded_grad_weight_tile(case) -> str:
    """The tile of the banded grad-weight a case forced onto it runs: "columns" (strip_columns; "columns,
    strided" at a stride in height), "pieces" (strip_pieces), "flat" or "" where it is not forced there."""
    forced = _forced_banded_grad_weight(case)
    if forced is None:
        return ""
    if forced[0].pieces:
        return "pieces"
    if not forced[0].step_rows:
        return "flat"
    return "columns, strided" if case.conv.stride[0] > 1 else "columns"


def _pieces_strip_tiles(case) -> int:
    """How many tiles of one row's strips the banded grad-weight a case forced onto its pieces tile has a row (0:
    another tile)."""
    forced = _forced_banded_grad_weight(case)
    if forced is None or not forced[0].pieces:
        return 0
    config = forced[0].config
    return -(-(-(-output_size(case.conv)[1] // config.block_k)) // config.block_m)


def _banded_grad_weight_split_small(case) -> bool:
    """Whether the banded grad-weight a case forced onto it runs as a dot batched over channels whose reduction
    the launch (for ``case.programs``) splits finer than MIN_BLOCKS_PER_SPLIT blocks a split would."""
    forced = _forced_banded_grad_weight(case)
    if forced is None:
        return False
    desc, pixels = forced
    units = desc.reduction_units(pixels)
    splits, _ = launch.split_pixels(units, desc.reduction_block, math.prod(desc.grid(pixels)[:-1]), case.programs,
                                    least_blocks=desc.least_split_blocks)
    blocks = -(-units // desc.reduction_block)
    return desc.band_dot == "channels" and splits > max(1, blocks // MIN_BLOCKS_PER_SPLIT)


def _grad_input_phases(case, family: str) -> int:
    """The stride's phases the grad-input kernel of ``family`` (depthwise: the direct kernel, igemm: the
    implicit GEMM) takes one of a program for a case (the product of desc.phases; 0 where the case's input
    gradient runs another kernel)."""
    desc = _grad_input_desc(case, family)
    return 0 if desc is None else math.prod(desc.phases)


def _grad_input_desc(case, family: str):
    """The grad-input kernel description of ``family`` for a case (None where its input gradient runs another
    kernel)."""
    if _grad_input_family(case) != family:
        return None
    spec = dataclasses.replace(spec_of(case.conv), bias=False)
    pixels = PixelSpace.of("grad_input", case.conv.batch, *case.conv.size, *output_size(case.conv))
    return lower(plan(spec), "grad_input", choice=Choice(KERNEL, case.grad_input_config, family), interpret=True,
                 allow_tf32=False, pixels=pixels)


def _interleaved(case) -> bool:
    """Whether a case's grad-input runs the igemm kernel in interleaved column phases."""
    desc = _grad_input_desc(case, "igemm")
    return desc is not None and desc.interleave_columns


def _grad_input_family(case) -> str | None:
    """The family whose grad-input kernel a case runs (None: the transposed conv's forward): the one it forces,
    else the first the plan offers."""
    spec = dataclasses.replace(spec_of(case.conv), bias=False)
    direct = case.grad_input == "direct" or (case.grad_input == "default" and _transposed_family(case.conv) is None)
    return (case.grad_input_family or plan(spec).grad_input_families[0]) if direct else None


def _spec_family(problem: ConvProblem) -> str:
    with launch_variant(problem):
        return problem.family or _default_forward_family(problem)


def _default_forward_family(problem: ConvProblem) -> str:
    """The forward family an untuned launch runs: the first the plan offers that suits its pixels."""
    spec = spec_of(problem)
    pixels = PixelSpace.of("forward", problem.batch, *problem.size, *output_size(problem))
    return suiting_first(plan(spec).families, spec, "forward", pixels)[0]


DOMAIN = [
    *[(f"family {f} forced", "conv2d", lambda p, f=f: p.family == f) for f in FAMILIES],
    # igemm_rows is the default only where its grid fills an H200 (IgemmRows.suits), and the dense kernel from a
    # batch of 8 (DepthwiseDense.claims), both past these draws: their choice is tested on real layers' shapes
    # (test_igemm_rows.py, test_dense_depthwise.py)
    *[(f"family {f} as the default", "default", lambda p, f=f: _spec_family(p) == f) for f in FAMILIES
      if f not in ("igemm_rows", "depthwise_dense")],
    *[(f"conv1d family {f} forced", "conv1d", lambda p, f=f: p.family == f) for f in FAMILIES],
    *[(f"family {f} over several programs", f"forced {f}", lambda p, f=f: p.family == f and _programs(p) > 2)
      for f in FAMILIES],
    ("a 1 x 1 output", "conv2d", lambda p: output_size(p) == (1, 1)),
    ("an output of width 1 and height > 1", "conv2d", lambda p: output_size(p)[1] == 1 and output_size(p)[0] > 1),
    ("a 1 x 1 input", "conv2d", lambda p: p.size == (1, 1)),
    ("a 2 x 2 input", "conv2d", lambda p: p.size == (2, 2)),
    ("a 1 x W input", "conv2d", lambda p: p.size[0] == 1 and p.size[1] > 2),
    ("an H x 1 input", "conv2d", lambda p: p.size[1] == 1 and p.size[0] > 2),
    ("an input smaller than the window", "conv2d", lambda p: p.size[1] < (p.kernel[1] - 1) * p.dilation[1] + 1),
    ("an odd width over 16", "conv2d", lambda p: p.size[1] % 2 and p.size[1] > 16),
    ("more pixels than a default interpreter tile", "conv2d",
     lambda p: p.batch * output_size(p)[0] * output_size(p)[1] > 256),
    ("more channels than a default channel tile", "conv2d", lambda p: p.out_channels > 64),
    ("stride 3", "conv2d", lambda p: 3 in p.stride),
    ("dilation 2 both ways", "conv2d", lambda p: p.dilation == (2, 2)),
    ("asymmetric padding", "conv2d", lambda p: not isinstance(p.padding, str) and p.padding[2] != p.padding[3]),
    ("'same' padding at stride 2", "conv2d", lambda p: p.padding == "same" and 2 in p.stride),
    *[(f"conv1d {m} padding", "conv1d", lambda p, m=m: p.padding == m) for m in ("causal", "same", "valid")],
    *[(f"layout {layout}", "conv2d", lambda p, layout=layout: p.layout == layout) for layout in LAYOUTS],
    *[(f"conv1d layout {layout}", "conv1d", lambda p, layout=layout: p.layout == layout) for layout in LAYOUTS],
    *[(f"view {view}", "conv2d", lambda p, view=view: p.view == view) for view in VIEWS],
    ("spec layout 'strided'", "conv2d", lambda p: spec_of(p).layout == "strided"),
    *[(f"weight memory {memory}", "conv2d", lambda p, memory=memory: p.weight_memory == memory)
      for memory in WEIGHT_MEMORY],
    ("a strided bias", "conv2d", lambda p: p.bias and p.bias_strided),
    *[(f"a residual view {view}", "conv2d", lambda p, view=view: p.residual and p.residual_view == view)
      for view in RESIDUAL_VIEWS],
    *[(f"dtype {dtype}", "conv2d", lambda p, dtype=dtype: p.dtype == dtype) for dtype in DTYPES],
    ("batch 1", "conv2d", lambda p: p.batch == 1),
    ("odd batch 3", "conv2d", lambda p: p.batch == 3),
    ("uneven groups under 'pad' (igemm)", "conv2d", lambda p: p.policy == "pad" and p.groups < p.in_channels
     and p.in_channels % p.groups and p.out_channels % p.groups),
    ("uneven depthwise outputs under 'pad'", "conv2d",
     lambda p: p.policy == "pad" and p.groups == p.in_channels and p.out_channels % p.groups),
    *[(f"packed {f} groups", "conv2d", lambda p, f=f: p.family == f and p.groups > 1 and p.config is not None
       and p.config.block_n >= 2 * math.ceil(p.out_channels / p.groups)) for f in IGEMM],
    ("igemm_rows down several programs of rows", "conv2d", lambda p: _row_blocks(p) > 1),
    ("igemm_rows with input rows no kernel row reads (stride past the window)", "conv2d",
     lambda p: _row_blocks(p) and p.stride[0] > (p.kernel[0] - 1) * p.dilation[0] + 1),
    ("igemm_rows, strided in height", "conv2d", lambda p: _row_blocks(p) and p.stride[0] > 1 and p.kernel[0] > 1),
    ("igemm_rows, dilated in height", "conv2d", lambda p: _row_blocks(p) and p.dilation[0] > 1 and p.kernel[0] > 1),
    ("igemm_rows with one output row", "conv2d", lambda p: _row_blocks(p) and output_size(p)[0] == 1),
    ("igemm_rows with a NaN or inf input", "conv2d", lambda p: _row_blocks(p) and bool(p.specials)),
    *[(f"igemm_rows reading an NCHW input in place, {view} view", "conv2d",
       lambda p, view=view: _row_blocks(p) and p.layout == "nchw" and p.view == view
       and not _forward_desc(p).stage_channels_last) for view in ("dense", "storage_offset", "width_step")],
    ("igemm_rows on a staged copy of an NCHW input", "conv2d",
     lambda p: _row_blocks(p) and _forward_desc(p).stage_channels_last),
    *[(f"{a} with a residual", "conv2d", lambda p, a=a: p.activation == a and p.residual) for a in ACTIVATIONS],
    *[(f"{a} without a residual", "conv2d", lambda p, a=a: p.activation == a and not p.residual)
      for a in ACTIVATIONS],
    *[(f"a {v} input", "conv2d", lambda p, v=v: any(str(s) == str(v) for _, s in p.specials)) for v in SPECIALS],
    *[(f"a {v} residual", "conv2d", lambda p, v=v: any(str(s) == str(v) for _, s in p.residual_specials))
      for v in SPECIALS],
    *[(f"banded rows in one row's strips, {layout}", "banded_rows",
       lambda p, layout=layout: p.layout == layout and _strip_tiles(p) > 0) for layout in ("nchw", "channels_last")],
    ("banded rows in several tiles of one row's strips", "banded_rows", lambda p: _strip_tiles(p) > 1),
    # (several wide tiles a row need rows past 256 outputs here: test_forward's banded rows at k256 has them)
    ("banded rows in one row's strips on the wide tile (a window past STRIP_WINDOW)", "banded_rows",
     lambda p: p.strip_window and _strip_tiles(p, wide=True) > 0),
    ("banded rows in flat tiles", "banded_rows", lambda p: _strip_tiles(p) == 0 and output_size(p)[1] > 16),
    ("banded rows in flat tiles at stride 1 (a window past the strips' widest)", "banded_rows",
     lambda p: p.strip_window and p.stride[1] == 1 and _strip_tiles(p) == 0 and output_size(p)[1] > 16),
    ("banded rows with a NaN or inf input", "banded_rows", lambda p: bool(p.specials)),
    *[(f"the banded grad-weight in pieces, {what}", "banded_pieces", condition) for what, condition in (
        ("one tile of a row's strips", lambda c: _pieces_strip_tiles(c) == 1),
        ("a row's strips in several tiles", lambda c: _pieces_strip_tiles(c) > 1),
        ("one piece", lambda c: _forced_banded_grad_weight(c)[0].pieces == 1),
        ("five pieces or more", lambda c: _forced_banded_grad_weight(c)[0].pieces >= 5),
        ("32-column strips", lambda c: _forced_banded_grad_weight(c)[0].config.block_k == 32),
        ("causal", lambda c: c.conv.padding == "causal"),
        ("in channels_last", lambda c: c.conv.layout != "nchw"),
        ("on a view", lambda c: c.conv.view != "dense"),
        ("with a NaN or inf input", lambda c: bool(c.specials)),
        ("split", lambda c: c.programs > 1),
        ("64-bit offsets", lambda c: c.conv.wide_index))],
    ("banded columns in one tile down a column", "banded_columns", lambda p: _column_tiles(p) == 1),
    ("banded columns in several tiles down a column", "banded_columns", lambda p: _column_tiles(p) > 1),
    ("banded columns, dilated in height", "banded_columns", lambda p: _column_tiles(p) and p.dilation[0] > 1),
    ("banded columns with a NaN or inf input", "banded_columns", lambda p: _column_tiles(p) and bool(p.specials)),
    ("banded columns with 64-bit offsets", "banded_columns", lambda p: _column_tiles(p) and p.wide_index),
    ("banded columns on a staged copy of an NCHW input", "banded_columns",
     lambda p: _column_tiles(p) and _forward_desc(p).stage_channels_last),
    *[(f"banded columns in {dtype}", "banded_columns", lambda p, dtype=dtype: _column_tiles(p) and p.dtype == dtype)
      for dtype in DTYPES],
    ("banded sliding in one block down the rows", "banded_sliding", lambda p: _sliding_blocks(p)[1] == 1),
    ("banded sliding in several blocks down the rows", "banded_sliding", lambda p: _sliding_blocks(p)[1] > 1),
    ("banded sliding in several tiles of triples", "banded_sliding", lambda p: _sliding_blocks(p)[0] > 1),
    ("banded sliding, dilated in height", "banded_sliding", lambda p: _sliding_blocks(p)[1] and p.dilation[0] > 1),
    ("banded sliding, strided in width", "banded_sliding", lambda p: _sliding_blocks(p)[1] and p.stride[1] > 1),
    ("banded sliding in strips of 32 columns", "banded_sliding",
     lambda p: _sliding_blocks(p)[1] and p.config.block_k == 32),
    *[(f"banded sliding at stride {s} in height", "banded_sliding",
       lambda p, s=s: _sliding_blocks(p)[1] and p.stride[0] == s) for s in (2, 3)],
    ("banded sliding, strided in height, several blocks", "banded_sliding",
     lambda p: _sliding_blocks(p)[1] > 1 and p.stride[0] > 1),
    ("banded sliding with a NaN or inf input", "banded_sliding", lambda p: _sliding_blocks(p)[1] and bool(p.specials)),
    ("banded sliding with 64-bit offsets", "banded_sliding", lambda p: _sliding_blocks(p)[1] and p.wide_index),
    *[(f"banded sliding, {layout}", "banded_sliding", lambda p, layout=layout: _sliding_blocks(p)[1] and
       p.layout == layout) for layout in ("nchw", "channels_last")],
    *[(f"banded sliding in {dtype}", "banded_sliding",
       lambda p, dtype=dtype: _sliding_blocks(p)[1] and p.dtype == dtype) for dtype in DTYPES],
    ("dense in one tile of output pixels", "dense", lambda p: _dense_tiles(p)[0] == 1),
    ("dense in several tiles of output pixels", "dense", lambda p: _dense_tiles(p)[0] > 1),
    ("dense with a tile whose windows skip the first rows", "dense", lambda p: _dense_tiles(p)[1]),
    ("dense with a window larger than the map", "dense",
     lambda p: _dense_tiles(p)[0] and (p.kernel[0] > p.size[0] or p.kernel[1] > p.size[1])),
    ("dense, dilated", "dense", lambda p: _dense_tiles(p)[0] and max(p.dilation) > 1),
    *[(f"dense at stride {s}", "dense", lambda p, s=s: _dense_tiles(p)[0] and s in p.stride) for s in (2, 3)],
    ("dense with a channel multiplier", "dense", lambda p: _dense_tiles(p)[0] and p.out_channels > p.groups),
    ("dense with a NaN or inf input", "dense", lambda p: _dense_tiles(p)[0] and bool(p.specials)),
    ("dense with 64-bit offsets", "dense", lambda p: _dense_tiles(p)[0] and p.wide_index),
    *[(f"dense, {layout}", "dense", lambda p, layout=layout: _dense_tiles(p)[0] and p.layout == layout)
      for layout in LAYOUTS],
    *[(f"dense in {dtype}", "dense", lambda p, dtype=dtype: _dense_tiles(p)[0] and p.dtype == dtype)
      for dtype in DTYPES],
    ("direct depthwise in one row's pixel tiles", "direct_rows", lambda p: _pixel_row_tiles(p) > 0),
    ("direct depthwise in several tiles of one row's pixels", "direct_rows", lambda p: _pixel_row_tiles(p) > 1),
    ("direct depthwise in row tiles, dilated", "direct_rows", lambda p: _pixel_row_tiles(p) and p.dilation[1] > 1),
    ("direct depthwise in row tiles with a NaN or inf input", "direct_rows",
     lambda p: _pixel_row_tiles(p) and bool(p.specials)),
    ("direct depthwise in flat tiles, channels_last", "direct_rows", lambda p: _pixel_row_tiles(p) == 0),
    *[(f"packed sequences (seq_idx) with {ids}, an inf and a NaN in x and gradients", "sequences",
       lambda p, scattered=scattered: p.mode == "seq_idx" and p.scattered_ids == scattered and p.nonfinite and p.grad)
      for ids, scattered in (("runs of ids", False), ("scattered ids", True))],
    ("initial states with gradients", "sequences", lambda p: p.mode == "initial_states" and p.grad),
    *[(f"family {f} forced, 64-bit offsets", "conv2d", lambda p, f=f: p.family == f and p.wide_index)
      for f in FAMILIES],
    ("conv1d with 64-bit offsets", "conv1d", lambda p: p.wide_index),
    ("an unbatched conv2d input", "conv2d", lambda p: p.unbatched),
    ("an unbatched conv1d input", "conv1d", lambda p: p.unbatched),
]


@pytest.mark.parametrize("what, sample, condition", DOMAIN, ids=[d[0] for d in DOMAIN])
def test_the_fuzz_reaches_its_domain(what, sample, condition, drawn_problems):
    """Among the problems the fuzz draws (a fixed sample of conv2d's, conv1d's, or the default family's),
    some have ``what``: no family, kind or edge the fuzz claims is silently out of its reach."""
    assert any(condition(problem) for problem in drawn_problems[sample]), f"the fuzz never draws {what}"


GRADIENT_DOMAIN = [
    ("grad_input forced direct", lambda c: c.grad_input == "direct"),
    ("grad_input direct with a small config", lambda c: c.grad_input_config is not None),
    ("grad_input forced onto the transposed forward", lambda c: c.grad_input == "transposed"),
    ("grad_weight with a small config", lambda c: c.grad_weight_config is not None),
    *[(f"grad_weight forced onto {f}", lambda c, f=f: c.grad_weight_family == f)
      for f in ("depthwise", "depthwise_gemm", "depthwise_dense", "igemm", "igemm_rows")],
    # the dense grad-weight's edges (its default needs a batch of 64, its maps past one tile of 16 x 16 output
    # pixels more than these draws: tests/test_dense_depthwise.py)
    *[(f"grad_weight forced onto depthwise_dense in tiles of {side} x {side}", lambda c, side=side:
       c.grad_weight_family == "depthwise_dense" and c.grad_weight_config is not None
       and c.grad_weight_config.block_n == side) for side in (8, 16)],
    ("grad_weight forced onto depthwise_dense, strided or dilated", lambda c: c.grad_weight_family == "depthwise_dense"
     and (max(c.conv.stride) > 1 or max(c.conv.dilation) > 1)),
    ("grad_weight forced onto depthwise_dense with a NaN or inf input", lambda c: c.specials
     and c.grad_weight_family == "depthwise_dense"),
    ("grad_weight forced onto igemm_rows, several row blocks", lambda c: c.grad_weight_family == "igemm_rows"
     and c.conv.max_rows and output_size(c.conv)[0] > c.conv.max_rows),
    ("grad_weight forced onto igemm_rows, strided or dilated in height", lambda c: c.grad_weight_family == "igemm_rows"
     and (c.conv.stride[0] > 1 or c.conv.dilation[0] > 1)),
    *[(f"grad_weight on igemm_rows, NCHW {how}", lambda c, staged=staged: _igemm_rows_grad_weight_staged(c) is staged)
      for how, staged in (("in place", False), ("on staged copies", True))],
    ("grad_weight on igemm_rows with a NaN or inf input", lambda c: c.specials
     and (c.grad_weight_family or _default_grad_weight_family(c.conv)) == "igemm_rows"),
    *[(f"grad_weight forced onto the banded kernel's {t} tile", lambda c, t=t: _banded_grad_weight_tile(c) == t)
      for t in ("columns", "columns, strided", "flat")],
    # (the fuzz's tiny maps split only the columns tile's reduction that finely: the flat tile's splits, strips
    # that start mid-row and steps over several rows, are tests/test_banded_grad_weight.py's named cases, which
    # ask for three splits, in both layouts)
    ("grad_weight forced onto the banded kernel's columns tile batched over channels, under four blocks a split",
     lambda c: _banded_grad_weight_tile(c) == "columns" and _banded_grad_weight_split_small(c)),
    *[(f"grad_weight by default on {f}", lambda c, f=f: c.grad_weight_family is None
       and _default_grad_weight_family(c.conv) == f)
      for f in ("depthwise", "depthwise_gemm", "igemm", "igemm_rows")],
    # (as the direct depthwise forward: float32 or float64 channels_last windows only, which the transposable
    # draws, 7 x 7 in half precision, leave out; tests/test_backward.py
    # test_channels_last_depthwise_grad_input_runs_the_transposed_forward runs it)
    *[(f"the transposed grad_input by default, as {f}", lambda c, f=f: c.grad_input == "default"
       and _transposed_family(c.conv) == f) for f in ("depthwise1d", "depthwise_gemm", "igemm")],
    ("grad_input forced onto the transposed forward of a grouped conv", lambda c: c.grad_input == "transposed"
     and c.conv.groups < c.conv.in_channels),
    ("grad_input forced onto the transposed forward of a grouped conv, dilated", lambda c: c.grad_input == "transposed"
     and c.conv.groups < c.conv.in_channels and max(c.conv.dilation) > 1),
    *[(f"backward family {f}", lambda c, f=f: plan(spec_of(c.conv)).backward_family == f)
      for f in ("igemm", "depthwise")],
    ("grad_input forced onto the banded kernel", lambda c: c.grad_input_family == "depthwise_gemm"),
    ("grad_input on the banded kernel by default", lambda c: c.grad_input == "default"
     and _grad_input_family(c) == "depthwise_gemm"),
    *[entry for f in ("depthwise", "igemm") for entry in (
        (f"{f} grad_input in phases of the stride", lambda c, f=f: _grad_input_phases(c, f) > 1),
        (f"{f} grad_input in phases, a height the stride does not divide",
         lambda c, f=f: _grad_input_phases(c, f) > 1 and c.conv.size[0] % c.conv.stride[0]),
        (f"{f} grad_input in phases of a stride of 3", lambda c, f=f: _grad_input_phases(c, f) > 1
         and 3 in c.conv.stride),
        (f"{f} grad_input in phases, dilated", lambda c, f=f: _grad_input_phases(c, f) > 1
         and max(c.conv.dilation) > 1),
        (f"{f} grad_input in phases over several programs", lambda c, f=f: _grad_input_phases(c, f) > 1
         and c.grad_input_config is not None),
        (f"{f} grad_input in phases with a NaN or inf input", lambda c, f=f: _grad_input_phases(c, f) > 1
         and c.specials),
        (f"{f} grad_input in phases of rows alone, strided NCHW", lambda c, f=f: _grad_input_phases(c, f) > 1
         and c.conv.layout == "nchw" and c.conv.stride[1] > 1 and _grad_input_desc(c, f).phases[1] == 1),
        (f"{f} grad_input in phases with 64-bit offsets", lambda c, f=f: _grad_input_phases(c, f) > 1
         and c.conv.wide_index))],
    # (Igemm.interleaves_columns: a stride of 2 along an NCHW width; widths 1 and odd, dilated)
    *[(f"igemm grad_input in interleaved column phases{what}", lambda c, when=when: _interleaved(c) and when(c))
      for what, when in (("", lambda c: True), (", an odd width", lambda c: c.conv.size[1] % 2),
                         (", dilated", lambda c: max(c.conv.dilation) > 1),
                         (" with a NaN or inf input", lambda c: bool(c.specials)))],
    *[(f"grad_input {route} with 64-bit offsets", lambda c, route=route: c.grad_input == route and c.conv.wide_index)
      for route in ("direct", "default")],
    *[(f"grad_weight on {f} with 64-bit offsets", lambda c, f=f: c.conv.wide_index
       and (c.grad_weight_family or _default_grad_weight_family(c.conv)) == f)
      for f in ("depthwise", "depthwise_gemm", "igemm", "igemm_rows")],
    ("hardswish at its kinks", lambda c: c.at_kinks and c.conv.activation == "hardswish"),
    ("relu6 at its kinks", lambda c: c.at_kinks and c.conv.activation == "relu6"),
    *[(f"a {v} input through the backward", lambda c, v=v: any(str(s) == str(v) for _, s in c.specials))
      for v in SPECIALS],
]


@pytest.mark.parametrize("what, condition", GRADIENT_DOMAIN, ids=[d[0] for d in GRADIENT_DOMAIN])
def test_the_gradient_fuzz_reaches_its_domain(what, condition, drawn_problems):
    assert any(condition(case) for case in drawn_problems["gradients"]), f"the gradient fuzz never draws {what}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("api", ("conv2d", "conv1d"))
def test_every_family_runs_when_forced(family, api, nan_filled_outputs):
    """The simplest problem the strategy draws for ``family`` runs that family (check_forward's spy) and
    matches torch: forcing works for every family, in both APIs."""
    problem = find(conv_problems(api=api, families=(family,), specials=False), lambda p: True,
                   settings=settings(max_examples=50, database=None))
    assert problem.family == family
    check_forward(problem)
