"""The differential fuzz: hypothesis draws whole conv problems and checks every generated kernel against
torch in float64. It owns correctness; the other test files pin named cases.

What it covers, each property against torch.nn.functional.conv2d / conv1d in float64 on the same inputs
(rounded to the dtype first), with every output element checked written (outputs start as NaN):

- test_conv2d_forward / test_conv1d_forward: every forward kernel family the planner offers for a problem
  (``plan(spec).families``: igemm, depthwise, depthwise_gemm, depthwise1d) is FORCED through the choice
  provider (runtime/choices.py), with its default config or a small tile config drawn from its tuning space
  (so a case spans several tiles and halos cross program boundaries), or the planner's untuned default;
  a spy asserts that the forced family is the one that ran. Fused epilogues (every activation, with and
  without a residual), NaN and +-inf inputs (positions compared exactly with torch), uneven groups under
  channel_policy='pad', fp32 / fp16 / bf16, NCHW / channels_last / data_format='NHWC' ('NLC' for conv1d),
  strided views of every kind (a storage offset, padded rows, a width step, sliced channels, stride-0
  broadcasts, each with NaN in the memory between the view's elements), outputs and inputs of 1 x 1,
  widths of 1, odd widths, strides 1-3, dilation 1-2, asymmetric, 'same' and causal padding.
- test_gradients: grad_input (the default, which for stride-1 depthwise may run the forward kernel of the
  transposed conv, plan.grad_input_as_forward; and forced direct with a non-DEFAULT choice, which bypasses
  it), grad_weight (default or a small tile config) and grad_bias, through autograd against torch's float64
  autograd, fused activations included (and pre-activations exactly at their kinks).
- test_decode_step: gconvgen.causal_conv1d_update against a float64 loop written here.
- test_the_fuzz_reaches_its_domain / test_every_family_runs_when_forced: the strategies really reach
  every family, kind and edge they claim (a family is never silently skipped).

Profiles (tests/conftest.py): "ci", the default, small enough for the whole file to run in about two
minutes on two CPU cores; "long", 20 times the examples, to run before landing a kernel change:

    pytest tests/test_fuzz.py --hypothesis-profile=long

Reproducing a failure: hypothesis prints the falsifying example as a constructor call (a ``ConvProblem``:
paste it into an ``@example`` or call ``check_forward`` on it) and a ``@reproduce_failure(...)`` blob
(print_blob); failures are also saved in .hypothesis/examples and replayed first on the next run, and
``--hypothesis-seed N`` repeats a run's generation. Tensor values come from the drawn ``seed`` alone.

Every wrong result known when this file was written is an ``@example`` on its test below.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, currently_in_test_context, event, example, find, given, note, settings
from hypothesis import strategies as st

import gconvgen
from conftest import TOLERANCES, spy_on_kernels
from gconvgen import knobs
from gconvgen.lowering import DEFAULT, KERNEL, Choice, KernelConfig, lower
from gconvgen.plan import grad_input_as_forward, plan
from gconvgen.runtime import choices
from gconvgen.runtime.ops import spec_for_call

FAMILIES = ("igemm", "depthwise", "depthwise_gemm", "depthwise1d")
ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# memory of the activations: NCHW; channels_last memory through the NCHW-indexed API; data_format NHWC / NLC
LAYOUTS = ("nchw", "channels_last", "nhwc")
# how the input view is cut from its memory (make_view): each breaks an assumption a kernel may make
VIEWS = ("dense", "storage_offset", "padded_rows", "width_step", "channel_slice", "batch_broadcast",
         "width_broadcast")
WEIGHT_MEMORY = ("oihw", "ohwi", "hwio")  # contiguous OIHW, channels_last OHWI, Keras HWIO
SPECIALS = (float("nan"), float("inf"), float("-inf"))

# Small tile configs per (kernel kind, family): the interpreter space's shapes shrunk so that the tiny maps
# below still span several tiles. A config the lowering refuses for a problem is assumed away.
SMALL_TILES = {
    ("forward", "igemm"): dict(block_m=(16, 32), block_n=(16, 32), block_k=(16, 32), num_warps=(1, 4)),
    ("forward", "depthwise"): dict(block_m=(4, 8, 16, 32), block_n=(1, 2, 4, 8), block_k=(0,), num_warps=(1, 4)),
    ("forward", "depthwise_gemm"): dict(block_m=(16,), block_n=(1, 2, 4), block_k=(16,), num_warps=(1, 4)),
    ("forward", "depthwise1d"): dict(block_m=(8, 16), block_n=(8, 16), block_k=(0,), num_warps=(1, 2)),
    ("grad_input", "igemm"): dict(block_m=(16, 32), block_n=(16,), block_k=(16, 32), num_warps=(1, 4)),
    ("grad_input", "depthwise"): dict(block_m=(4, 16, 32), block_n=(1, 2, 8), block_k=(0,), num_warps=(1, 4)),
    ("grad_weight", "igemm"): dict(block_m=(16,), block_n=(16, 32), block_k=(16, 32), num_warps=(1, 4)),
    ("grad_weight", "depthwise"): dict(block_m=(1, 4, 16), block_n=(1, 2, 8), block_k=(0,), num_warps=(1, 4)),
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
    ``specials`` are (flat index into the input's values, NaN or +-inf) put into a second run."""

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
    activation: str = "none"
    residual: bool = False
    residual_view: str = "dense"
    family: Optional[str] = None
    config: Optional[KernelConfig] = None
    specials: tuple = ()
    seed: int = 0


@dataclass(frozen=True)
class GradientProblem:
    """A forward problem trained through: ``grad_input`` "default" (the planner's, maybe the transposed
    forward) or "direct" (a non-DEFAULT choice: the grad-input kernel, with ``grad_input_config`` or its
    default); ``grad_weight_config`` None is the default grad-weight. ``at_kinks``: the input and residual are
    zeros, so each pre-activation is its bias exactly (drawn at the activations' kinks: -3, 0, 3, 6)."""

    conv: ConvProblem
    grad_input: str = "default"
    grad_input_config: Optional[KernelConfig] = None
    grad_weight_config: Optional[KernelConfig] = None
    at_kinks: bool = False


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
    n, c, h, w = shape
    return (c * h * w, h * w, w, 1) if layout == "nchw" else (h * w * c, 1, w * c, c)


def make_view(values: torch.Tensor, shape: tuple[int, ...], layout: str, view: str,
              device: str = "cpu") -> torch.Tensor:
    """An NCHW-indexed [N, C, H, W] view ``view`` of memory in ``layout``, holding ``values`` (of the view's
    shape; of its base's for the broadcasts: [1, C, H, W] or [N, C, H, 1]). Memory the view does not cover is
    NaN, so a kernel that reads past the view's elements shows in its output. ``device`` 'meta' gives the
    view's shape and strides only (``values`` None), to plan it."""
    n, c, h, w = shape
    fmt = _memory_format(layout)
    dtype = torch.float32 if values is None else values.dtype

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


def make_weight(values: Optional[torch.Tensor], shape: tuple[int, ...], memory: str, device: str = "cpu"):
    """An OIHW-indexed weight in ``memory``: contiguous OIHW, channels_last (OHWI) or a Keras HWIO buffer."""
    if memory == "hwio":
        o, i, kh, kw = shape
        buffer = torch.empty((kh, kw, i, o), device=device, dtype=torch.float32 if values is None else values.dtype)
        weight = buffer.permute(3, 2, 0, 1)
    else:
        weight = torch.empty(shape, device=device, dtype=torch.float32 if values is None else values.dtype,
                             memory_format=_memory_format("nchw" if memory == "oihw" else "channels_last"))
    if values is not None:
        weight.copy_(values)
    return weight


@dataclass
class Tensors:
    """A problem's tensors, NCHW-indexed (x and residual possibly views), and their values' float64 copies."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]


def make_tensors(problem: ConvProblem, specials: tuple = (), zeros: bool = False,
                 bias_values: Optional[tuple] = None) -> Tensors:
    """The problem's tensors from its seed (the same values every call), with ``specials`` put into x."""
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
    if problem.residual:
        residual_values = torch.randn(_view_base_shape(out_shape, problem.residual_view), generator=generator)
        if zeros:
            residual_values.zero_()
        residual = make_view(residual_values.to(dtype), out_shape, "nchw" if problem.layout == "nchw" else "nhwc",
                             problem.residual_view)
    return Tensors(make_view(values.to(dtype), shape, problem.layout, problem.view),
                   make_weight(weight.to(dtype), weight_shape(problem), problem.weight_memory),
                   None if bias is None else bias.to(dtype), residual)


def spec_of(problem: ConvProblem):
    """The ConvSpec gconvgen makes of the problem's call (spec_for_call on its views, built on 'meta')."""
    shape = (problem.batch, problem.in_channels, *problem.size)
    x = make_view(None, shape, problem.layout, problem.view, device="meta")
    weight = make_weight(None, weight_shape(problem), problem.weight_memory, device="meta")
    bias = torch.empty(problem.out_channels, device="meta") if problem.bias else None
    stride, dilation = problem.stride, problem.dilation
    return spec_for_call(x, weight, bias, stride, sides_of(problem), dilation, problem.groups, problem.policy)


def call_gconvgen(problem: ConvProblem, t: Tensors) -> torch.Tensor:
    """gconvgen.conv2d or conv1d on the problem's tensors, through the API in the problem's data format;
    returns the output NCHW-indexed ([N, C_out, OH, OW]; conv1d's with OH = 1)."""
    nhwc = problem.layout == "nhwc"
    kwargs = dict(channel_policy=problem.policy, activation=None if problem.activation == "none" else problem.activation)
    to_api = (lambda a: a.permute(0, 2, 3, 1)) if nhwc else (lambda a: a)
    x, residual = to_api(t.x), None if t.residual is None else to_api(t.residual)
    weight = t.weight.permute(2, 3, 1, 0) if nhwc else t.weight  # HWIO for NHWC
    if problem.api == "conv1d":  # drop the height-1 dimension: [N, C, L] / [N, L, C], weight [C_out, ci, k] / [k, ci, C_out]
        x, weight = x.squeeze(1 if nhwc else 2), weight.squeeze(0 if nhwc else 2)
        residual = None if residual is None else residual.squeeze(1 if nhwc else 2)
        out = gconvgen.conv1d(x, weight, t.bias, problem.stride[1], problem.padding, problem.dilation[1],
                              problem.groups, data_format="NLC" if nhwc else "NCL", residual=residual, **kwargs)
        out = out.unsqueeze(1 if nhwc else 2)
    else:
        out = gconvgen.conv2d(x, weight, t.bias, problem.stride, problem.padding, problem.dilation, problem.groups,
                              data_format="NHWC" if nhwc else "NCHW", residual=residual, **kwargs)
    return out.permute(0, 3, 1, 2) if nhwc else out


# ---------------------------------------------------------------------------------------------- references


def activation_reference(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """torch's own activations: what the fused epilogue must equal, NaN and inf included."""
    functions = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
                 "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "hardswish": F.hardswish}
    return functions[activation](pre)


def reference_conv(x, weight, bias, stride, sides, dilation, groups):
    """F.conv2d in float64 (differentiable) under the channel_policy='pad' definition, which is F.conv2d's
    own where the groups divide the channels: group g reads input channels [g*ci, (g+1)*ci) of the input
    zero-padded to groups * ci channels and writes outputs [g*co, (g+1)*co) clipped to C_out. Written as one
    grouped conv, so a NaN or inf reaches only the outputs of its own group (as in torch)."""
    in_channels, out_channels = x.shape[1], weight.shape[0]
    ci, co = math.ceil(in_channels / groups), math.ceil(out_channels / groups)
    top, bottom, left, right = sides
    x64 = F.pad(x.double(), (left, right, top, bottom, 0, ci * groups - in_channels))
    weight64 = F.pad(weight.double(), (0, 0, 0, 0, 0, 0, 0, co * groups - out_channels))
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
                   exact_nonfinite: bool = True, what: str = "output") -> None:
    """``actual`` (in ``dtype``) against the float64 ``expected``: NaN exactly where torch has NaN and the same
    infinities where torch has them (``exact_nonfinite``), the finite rest within tolerance.

    With ``exact_nonfinite`` False (the known limit of the banded depthwise kernel and packed igemm groups,
    README: they multiply the zeros of their band or block-diagonal weight tile with neighbouring inputs, so an
    inf or NaN input can make neighbouring outputs NaN where torch keeps them finite): NaN is still required
    where torch has NaN and a non-finite value where torch has an infinity, but an output NaN where torch's is
    finite is allowed, and only outputs finite in both are compared."""
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
    atol, rtol = tolerances(dtype, reduction)
    torch.testing.assert_close(actual[compared], expected[compared], atol=atol, rtol=rtol,
                               msg=lambda message: f"{what}: {message}")


# ---------------------------------------------------------------------------------------------- forcing, spying


@contextlib.contextmanager
def forced_choices(forward: Choice = DEFAULT, grad_input: Choice = DEFAULT, grad_weight: Choice = DEFAULT):
    """Install a choice provider (what a tuning record would give) for the three tuned kinds; restore the
    previous provider afterwards."""
    table = {"forward": forward, "grad_input": grad_input, "grad_weight": grad_weight}
    previous = choices.set_provider(lambda spec, kind, *_: table.get(kind, DEFAULT))
    try:
        yield
    finally:
        choices.set_provider(previous)


@contextlib.contextmanager
def kernels_launched():
    """The KernelDesc of every kernel loaded for a launch inside the block (conftest.spy_on_kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        yield spy_on_kernels(patch)


def forward_choice(problem: ConvProblem) -> Choice:
    return DEFAULT if problem.family is None else Choice(KERNEL, problem.config, problem.family)


def tolerates_nonfinite_spread(desc) -> bool:
    """The README's known limit: the banded kernel and packed narrow igemm groups (several groups in one
    program's block-diagonal weight tile) may spread an inf or NaN input to neighbouring outputs as NaN."""
    return desc.family == "depthwise_gemm" or (desc.family == "igemm" and desc.groups_per_program > 1)


# ---------------------------------------------------------------------------------------------- strategies


def _sides(draw, reach: int, beyond: bool) -> int:
    """A padding side: 0 up to the window's reach (one past it where the family allows)."""
    return draw(st.integers(0, reach + (1 if beyond else 0)))


@st.composite
def small_configs(draw, kind: str, family: str) -> Optional[KernelConfig]:
    """None (the family's default config) or a small tile config of the (kind, family) space."""
    if draw(st.integers(0, 2)) == 0:
        return None
    tiles = SMALL_TILES[kind, family]
    return KernelConfig(*(draw(st.sampled_from(tiles[side])) for side in ("block_m", "block_n", "block_k")),
                        num_warps=draw(st.sampled_from(tiles["num_warps"])), num_stages=draw(st.sampled_from((1, 2))))


def legal(spec, kind: str, family: Optional[str], config: Optional[KernelConfig]) -> bool:
    """The lowering's own check of a (family, config) for this conv: it raises ValueError for what it refuses."""
    try:
        lower(plan(spec), kind, choice=Choice(KERNEL, config, family), interpret=True, allow_tf32=False)
    except ValueError:
        return False
    return True


@st.composite
def conv_problems(draw, api: str = "conv2d", families: tuple = FAMILIES + (None,), specials: bool = True,
                  dtypes: tuple = tuple(DTYPES)) -> ConvProblem:
    """A coherent problem for one forward family (None: the planner's default): channels the family computes,
    a geometry at the edges the lowering branches on, a layout and view, a dtype, an epilogue, special values,
    and a tile config the lowering accepts. Shrinks toward one image, few channels, 1 x 1 outputs, NCHW."""
    family = draw(st.sampled_from(families))
    depthwise = family in ("depthwise", "depthwise_gemm", "depthwise1d") or (family is None and draw(st.booleans()))
    policy = draw(st.sampled_from(("strict", "pad")))
    if depthwise:  # groups = in_channels; a channel multiplier, or uneven outputs under 'pad'
        channels = draw(st.integers(1, 16))
        per_group = draw(st.integers(1, 2))
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
    layout = draw(st.sampled_from(LAYOUTS))
    # up to 5, and 7 (from 7 x 7 in half precision the banded kernel is the default)
    sides = st.integers(1, 5) | st.just(7)
    kernel_h = 1 if one_d or (short_window and layout != "nchw") else draw(sides)
    kernel_w = draw(sides)
    stride_h = 1 if one_d else draw(st.integers(1, 3))
    stride_w = draw(st.sampled_from((1, 2)) if short_window else st.integers(1, 3))
    dilation = (1 if one_d else draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    reach_h, reach_w = (kernel_h - 1) * dilation[0], (kernel_w - 1) * dilation[1]
    long_rows = draw(st.booleans())  # rows longer than a banded strip (16) or a depthwise1d tile
    max_h, max_w = (1 if one_d else 2 if long_rows else 9), (20 if long_rows else 9)
    mode = draw(st.sampled_from(("sides", "same", "causal", "valid") if one_d else ("sides", "same")))
    if mode == "same":
        size = (1 if one_d else draw(st.integers(1, max_h)), draw(st.integers(1, max_w)))
        padding = "same"
    else:
        if one_d:
            left, right = ((reach_w, 0) if mode == "causal" else (0, 0) if mode == "valid"
                           else (_sides(draw, reach_w, not short_window), _sides(draw, reach_w, not short_window)))
            top = bottom = 0
            padding = mode if mode in ("causal", "valid") else (left, right)
        else:
            top, bottom = _sides(draw, reach_h, True), _sides(draw, reach_h, True)
            left, right = _sides(draw, reach_w, not short_window), _sides(draw, reach_w, not short_window)
            padding = (top, bottom, left, right)
        # the least input the window fits in: outputs of 1 shrink to here
        least_h, least_w = max(1, reach_h + 1 - top - bottom), max(1, reach_w + 1 - left - right)
        size = (1 if one_d else draw(st.integers(least_h, max(least_h, max_h))),
                draw(st.integers(least_w, max(least_w, max_w))))
    batch = draw(st.sampled_from((1, 2, 3)))
    activation = draw(st.sampled_from(ACTIVATIONS))
    problem = ConvProblem(
        api=api, batch=batch, in_channels=in_channels, out_channels=out_channels, groups=groups, size=size,
        kernel=(kernel_h, kernel_w), stride=(stride_h, stride_w), padding=padding, dilation=dilation, policy=policy,
        layout=layout, view=draw(st.sampled_from(VIEWS)), weight_memory=draw(st.sampled_from(WEIGHT_MEMORY)),
        dtype=draw(st.sampled_from(dtypes)), bias=draw(st.booleans()), activation=activation,
        residual=draw(st.booleans()), residual_view=draw(st.sampled_from(("dense", "width_step", "batch_broadcast"))),
        specials=tuple(draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=3)))
        if specials else (),
        seed=draw(st.integers(0, 2**31 - 1)))
    try:
        spec = spec_of(problem)
        offered = plan(spec).families
    except ValueError:  # e.g. channel padding over the budget
        assume(False)
    assume(family is None or family in offered)
    if family is not None:
        config = draw(small_configs("forward", family))
        assume(legal(spec, "forward", family, config))
        problem = dataclasses.replace(problem, family=family, config=config)
    return problem


@st.composite
def gradient_problems(draw) -> GradientProblem:
    """A forward problem (no special values) and the backward's choices: grad-input default or direct,
    small tile configs for the direct grad-input and for grad-weight, and at times every pre-activation at
    an activation's kink."""
    problem = draw(conv_problems(specials=False))
    spec = spec_of(problem)
    backward = plan(spec).backward_family
    bias_free = dataclasses.replace(spec, bias=False)
    direct = draw(st.sampled_from(("default", "direct")))
    grad_input_config = draw(small_configs("grad_input", backward)) if direct == "direct" else None
    grad_weight_config = draw(small_configs("grad_weight", backward))
    assume(direct == "default" or legal(bias_free, "grad_input", None, grad_input_config))
    assume(legal(bias_free, "grad_weight", None, grad_weight_config))
    at_kinks = draw(st.integers(0, 5)) == 0
    if at_kinks:
        problem = dataclasses.replace(problem, bias=True)
    return GradientProblem(problem, direct, grad_input_config, grad_weight_config, at_kinks)


# ---------------------------------------------------------------------------------------------- the checks


def check_forward(problem: ConvProblem) -> None:
    """Run ``problem`` through gconvgen's API with its family forced (or the default), assert that family ran
    and every output element matches torch; then again with its special values in the input."""
    note_in_test(f"spec: {spec_of(problem)}")
    family = problem.family or plan(spec_of(problem)).family
    event_in_test(f"family {family}{'' if problem.family else ' (default)'}")
    reduction = weight_shape(problem)[1] * problem.kernel[0] * problem.kernel[1]
    dtype = DTYPES[problem.dtype]
    runs = [()] + ([problem.specials] if problem.specials else [])
    for specials in runs:
        t = make_tensors(problem, specials)
        expected = reference_output(problem, t.x, t.weight, t.bias, t.residual)
        with forced_choices(forward=forward_choice(problem)), kernels_launched() as launched:
            out = call_gconvgen(problem, t)
        assert out.dtype == dtype
        ran = [desc for desc in launched if desc.kind == "forward"]
        assert [desc.family for desc in ran] == [family], f"forced {family}, ran {[d.family for d in ran]}"
        if not specials:  # finite inputs: outputs were NaN before the launch, so NaN here is an unwritten element
            assert_matches(out, expected, dtype, reduction, what="output")
        else:  # NaN / inf inputs: the run above proved every element written
            exact = not tolerates_nonfinite_spread(ran[0])
            assert_matches(out, expected, dtype, reduction, exact_nonfinite=exact, what="output with NaN/inf input")


def check_gradients(case: GradientProblem) -> None:
    """Forward and backward through autograd with the case's choices; every gradient (x, weight, bias,
    residual) against torch's float64 autograd. Where grad-input is forced direct, the grad-input kernel ran;
    where it is the default, the transposed conv's forward kernel ran exactly where plan.grad_input_as_forward
    offers it for the spec the backward saw, else the grad-input kernel."""
    problem = case.conv
    dtype = DTYPES[problem.dtype]
    t = make_tensors(problem, zeros=case.at_kinks, bias_values=(-3.0, 0.0, 3.0, 6.0) if case.at_kinks else None)
    # leaves with the views' own strides (detach keeps them), so the kernels read what the forward test reads
    leaves = {name: tensor.detach().requires_grad_() for name, tensor in
              (("x", t.x), ("weight", t.weight), ("bias", t.bias), ("residual", t.residual)) if tensor is not None}
    grad_input = Choice(KERNEL, case.grad_input_config, None) if case.grad_input == "direct" else DEFAULT
    grad_weight = DEFAULT if case.grad_weight_config is None else Choice(KERNEL, case.grad_weight_config, None)
    with forced_choices(forward_choice(problem), grad_input, grad_weight), kernels_launched() as launched, \
            grad_input_launches() as prepared:
        out = call_gconvgen(problem, Tensors(leaves["x"], leaves["weight"], leaves.get("bias"),
                                             leaves.get("residual")))
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(problem.seed + 1)).to(dtype)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_output)

    leaves64 = {name: leaf.detach().double().requires_grad_() for name, leaf in leaves.items()}
    expected = reference_output(problem, leaves64["x"], leaves64["weight"], leaves64.get("bias"),
                                leaves64.get("residual"))
    wanted = torch.autograd.grad(expected, list(leaves64.values()), grad_output.double())

    kinds = [desc.kind for desc in launched]
    assert len(prepared) == 1, f"grad-input prepared {len(prepared)} times"
    (spec, choice), = prepared
    assert choice == grad_input, f"grad-input ran {choice}, the provider said {grad_input}"
    transposed = grad_input_as_forward(spec, knobs.padding_budget()) if choice == DEFAULT else None
    if transposed is None:
        assert "grad_input" in kinds, f"the grad-input kernel did not run: {kinds}"
    else:
        assert "grad_input" not in kinds and any(d.kind == "forward" and d.spec == transposed for d in launched), \
            f"the transposed forward {transposed} did not run: {[(d.kind, d.spec) for d in launched]}"
    event_in_test(f"grad_input by {'the transposed forward' if transposed else 'the grad-input kernel'}")
    assert "grad_weight" in kinds and ("bias" not in leaves or "grad_bias" in kinds), kinds

    out_pixels = out.shape[0] * out.shape[2] * out.shape[3]
    reductions = {"x": problem.out_channels // problem.groups * problem.kernel[0] * problem.kernel[1],
                  "weight": out_pixels, "bias": out_pixels, "residual": 1}
    for name, got, want in zip(leaves, grads, wanted):
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        assert torch.isfinite(got).all(), f"grad of {name}: not every element written (NaN) or not finite"
        atol, rtol = tolerances(dtype, reductions[name])
        if dtype != torch.float32 and problem.activation not in ("none", "relu", "relu6"):
            # the backward recomputes the pre-activation rounded to the dtype (as eager torch would hold it) and
            # takes the activation's gradient there: a rounding of each term, a few ulps of the largest
            atol = max(atol, 4 * torch.finfo(dtype).eps * want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                   msg=lambda message, name=name: f"grad of {name}: {message}")


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
    base = dict(api="conv2d", batch=1, bias=False, seed=1)
    base.update(fields)
    return ConvProblem(**base)


@settings(max_examples=budget(1.0))
@given(problem=conv_problems())
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
def test_conv2d_forward(problem, nan_filled_outputs):
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
def test_gradients(case, nan_filled_outputs):
    check_gradients(case)


@dataclass(frozen=True)
class DecodeProblem:
    """``steps`` calls of causal_conv1d_update from a zero or random (prefilled) state, which may be a view."""

    batch: int
    channels: int
    kernel: int
    steps: int
    dtype: str
    bias: bool
    weight_rank: int
    prefilled: bool
    state_view: bool
    seed: int


@st.composite
def decode_problems(draw) -> DecodeProblem:
    return DecodeProblem(draw(st.integers(1, 3)), draw(st.integers(1, 16)), draw(st.integers(1, 5)),
                         draw(st.integers(1, 6)), draw(st.sampled_from(tuple(DTYPES))), draw(st.booleans()),
                         draw(st.sampled_from((2, 3))), draw(st.booleans()), draw(st.booleans()),
                         draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=budget(1.0))
@given(case=decode_problems())
def test_decode_step(case):
    """Each step's output against a float64 sum over the window (state then the new input), and the state
    shifted by one exactly."""
    dtype = DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(case.seed)
    sequence = torch.randn(case.batch, case.channels, case.steps, generator=generator).to(dtype)
    weight = torch.randn(case.channels, 1, case.kernel, generator=generator).to(dtype)
    bias = torch.randn(case.channels, generator=generator).to(dtype) if case.bias else None
    start = torch.randn(case.batch, case.channels, case.kernel - 1, generator=generator).to(dtype)
    if not case.prefilled:
        start.zero_()
    if case.state_view:  # a view one column into a wider buffer: not contiguous
        state = torch.full((case.batch, case.channels, case.kernel), float("nan"), dtype=dtype)[..., 1:]
        state.copy_(start)
    else:
        state = start.clone()
    window64 = start.double()
    taps64 = weight.double()[:, 0]
    for step in range(case.steps):
        out = gconvgen.causal_conv1d_update(sequence[:, :, step], state, weight if case.weight_rank == 3 else weight[:, 0],
                                            bias)
        window64 = torch.cat([window64, sequence[:, :, step:step + 1].double()], dim=-1)
        expected = (window64 * taps64).sum(-1) + (0 if bias is None else bias.double())
        window64 = window64[..., 1:]
        assert out.dtype == dtype and out.shape == (case.batch, case.channels)
        assert_matches(out, expected, dtype, case.kernel, what=f"step {step}")
        assert torch.equal(state.double(), window64), f"step {step}: the state is not the last k - 1 inputs"


# ---------------------------------------------------------------------------------------------- the fuzz's domain


def _reaches(strategy, condition, what: str) -> None:
    """Some value of ``strategy`` meets ``condition`` (hypothesis.find; no kernel runs)."""
    try:
        find(strategy, condition, settings=settings(max_examples=3000, database=None))
    except Exception as error:  # NoSuchExample, Unsatisfiable
        raise AssertionError(f"the fuzz never draws {what}: {error!r}") from error


def _spec_family(problem: ConvProblem) -> str:
    return problem.family or plan(spec_of(problem)).family


DOMAIN = [
    *[(f"family {f} forced", "conv2d", lambda p, f=f: p.family == f) for f in FAMILIES],
    *[(f"family {f} as the default", "conv2d", lambda p, f=f: p.family is None and _spec_family(p) == f)
      for f in FAMILIES],
    *[(f"conv1d family {f} forced", "conv1d", lambda p, f=f: p.family == f) for f in FAMILIES],
    ("a small tile config", "conv2d", lambda p: p.config is not None),
    ("a 1 x 1 output", "conv2d", lambda p: output_size(p) == (1, 1)),
    ("an output of width 1 and height > 1", "conv2d", lambda p: output_size(p)[1] == 1 and output_size(p)[0] > 1),
    ("a 1 x 1 input", "conv2d", lambda p: p.size == (1, 1)),
    ("a 2 x 2 input", "conv2d", lambda p: p.size == (2, 2)),
    ("a 1 x W input", "conv2d", lambda p: p.size[0] == 1 and p.size[1] > 2),
    ("an H x 1 input", "conv2d", lambda p: p.size[1] == 1 and p.size[0] > 2),
    ("an input smaller than the window", "conv2d", lambda p: p.size[1] < (p.kernel[1] - 1) * p.dilation[1] + 1),
    ("an odd width over 16", "conv2d", lambda p: p.size[1] % 2 and p.size[1] > 16),
    ("stride 3", "conv2d", lambda p: 3 in p.stride),
    ("dilation 2 both ways", "conv2d", lambda p: p.dilation == (2, 2)),
    ("asymmetric padding", "conv2d", lambda p: not isinstance(p.padding, str) and p.padding[2] != p.padding[3]),
    ("'same' padding at stride 2", "conv2d", lambda p: p.padding == "same" and 2 in p.stride),
    *[(f"conv1d {m} padding", "conv1d", lambda p, m=m: p.padding == m) for m in ("causal", "same", "valid")],
    *[(f"layout {layout}", "conv2d", lambda p, layout=layout: p.layout == layout) for layout in LAYOUTS],
    *[(f"conv1d layout {layout}", "conv1d", lambda p, layout=layout: p.layout == layout) for layout in LAYOUTS],
    *[(f"view {view}", "conv2d", lambda p, view=view: p.view == view) for view in VIEWS],
    ("spec layout 'strided'", "conv2d", lambda p: spec_of(p).layout == "strided"),
    *[(f"dtype {dtype}", "conv2d", lambda p, dtype=dtype: p.dtype == dtype) for dtype in DTYPES],
    ("batch 1", "conv2d", lambda p: p.batch == 1),
    ("odd batch 3", "conv2d", lambda p: p.batch == 3),
    ("uneven groups under 'pad' (igemm)", "conv2d",
     lambda p: p.policy == "pad" and p.family == "igemm" and p.in_channels % p.groups and p.out_channels % p.groups),
    ("uneven depthwise outputs under 'pad'", "conv2d",
     lambda p: p.policy == "pad" and p.groups == p.in_channels and p.out_channels % p.groups),
    ("packed igemm groups", "conv2d", lambda p: p.family == "igemm" and p.groups > 1 and p.config is not None
     and p.config.block_n >= 2 * math.ceil(p.out_channels / p.groups)),
    *[(f"{a} with a residual", "conv2d", lambda p, a=a: p.activation == a and p.residual) for a in ACTIVATIONS],
    *[(f"{a} without a residual", "conv2d", lambda p, a=a: p.activation == a and not p.residual)
      for a in ACTIVATIONS],
    *[(f"a {v} input", "conv2d", lambda p, v=v: any(str(s) == str(v) for _, s in p.specials)) for v in SPECIALS],
]


@pytest.mark.parametrize("what, api, condition", DOMAIN, ids=[d[0] for d in DOMAIN])
def test_the_fuzz_reaches_its_domain(what, api, condition):
    _reaches(conv_problems(api=api), condition, what)


GRADIENT_DOMAIN = [
    ("grad_input forced direct", lambda c: c.grad_input == "direct"),
    ("grad_input direct with a small config", lambda c: c.grad_input_config is not None),
    ("grad_weight with a small config", lambda c: c.grad_weight_config is not None),
    ("the transposed grad_input by default", lambda c: c.grad_input == "default" and grad_input_as_forward(
        dataclasses.replace(spec_of(c.conv), bias=False), knobs.padding_budget()) is not None),
    *[(f"backward family {f}", lambda c, f=f: plan(spec_of(c.conv)).backward_family == f) for f in ("igemm", "depthwise")],
    ("hardswish at its kinks", lambda c: c.at_kinks and c.conv.activation == "hardswish"),
    ("relu6 at its kinks", lambda c: c.at_kinks and c.conv.activation == "relu6"),
]


@pytest.mark.parametrize("what, condition", GRADIENT_DOMAIN, ids=[d[0] for d in GRADIENT_DOMAIN])
def test_the_gradient_fuzz_reaches_its_domain(what, condition):
    _reaches(gradient_problems(), condition, what)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("api", ("conv2d", "conv1d"))
def test_every_family_runs_when_forced(family, api, nan_filled_outputs):
    """The simplest problem the strategy draws for ``family`` runs that family (check_forward's spy) and
    matches torch: forcing works for every family, in both APIs."""
    problem = find(conv_problems(api=api, families=(family,), specials=False), lambda p: True,
                   settings=settings(max_examples=50, database=None))
    assert problem.family == family
    check_forward(problem)
