"""The torch custom op ``gconvgen::conv2d``: the one door from torch into a compiled kernel.

CUDA tensors run the Triton kernel. CPU tensors run the same kernel through Triton's interpreter when
TRITON_INTERPRET=1; otherwise the exact aten form of the same plan, said once (or refused when
GCONVGEN_FALLBACK=error).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import knobs
from ..ir import ConvSpec, conv_output_size
from ..lowering import ATEN
from ..plan import planned
from . import launch
from .choices import choice_for
from .fallback import aten_conv2d

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def activation_layout(x: torch.Tensor) -> str:
    """Memory order of an NCHW-indexed activation: 'nhwc' (channels contiguous), 'nchw' or 'strided'.
    A dimension of size 1 has no meaningful stride, so it counts as contiguous."""
    channels_unit = x.stride(1) == 1 or x.shape[1] == 1
    width_unit = x.stride(3) == 1 or x.shape[3] == 1
    if channels_unit and (not width_unit or x.is_contiguous(memory_format=torch.channels_last)):
        return "nhwc"
    return "nchw" if width_unit else "strided"


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last in gives channels_last out, as F.conv2d does."""
    return torch.channels_last if activation_layout(x) == "nhwc" and not x.is_contiguous() else torch.contiguous_format


@functools.lru_cache(maxsize=4096)
def spec_of(in_channels: int, out_channels: int, groups: int, kernel_size: tuple[int, int],
            stride: tuple[int, int], padding: tuple[int, int, int, int], dilation: tuple[int, int],
            bias: bool, dtype: str, layout: str, channel_policy: str) -> ConvSpec:
    """ConvSpec construction memoised on its fields: built on every call, validated once."""
    return ConvSpec(in_channels, out_channels, groups, kernel_size, stride, padding, dilation, bias, dtype,
                    layout, channel_policy)


def spec_for_call(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> ConvSpec:
    """The spec of a call on NCHW-indexed x and OIHW weight: channels, kernel, dtype and x's memory layout."""
    return spec_of(x.shape[1], weight.shape[0], groups, (weight.shape[2], weight.shape[3]), tuple(stride),
                   tuple(padding), tuple(dilation), bias is not None, DTYPE_NAMES[x.dtype], activation_layout(x),
                   channel_policy)


@functools.cache
def _say_fallback_once(reason: str) -> None:
    warnings.warn(f"gconvgen: {reason}; running the exact aten fallback instead of the generated kernel "
                  f"(set TRITON_INTERPRET=1 to run the kernel on CPU, GCONVGEN_FALLBACK=error to refuse)",
                  stacklevel=3)


def _fallback(reason: str) -> None:
    if knobs.fallback_mode() == "error":
        raise RuntimeError(f"gconvgen: {reason} and GCONVGEN_FALLBACK=error forbids the aten fallback")
    _say_fallback_once(reason)


def _allocate_output(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> torch.Tensor:
    out_height = conv_output_size(x.shape[2], weight.shape[2], stride[0], dilation[0], padding[0], padding[1])
    out_width = conv_output_size(x.shape[3], weight.shape[3], stride[1], dilation[1], padding[2], padding[3])
    shape = (x.shape[0], weight.shape[0], out_height, out_width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def run_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """Grouped conv2d on NCHW-indexed x [N, C_in, H, W] (any strides) and weight [C_out, ci, kh, kw];
    padding is four sides (top, bottom, left, right). Inputs are validated by gconvgen.conv2d. This is the
    implementation of the custom op gconvgen::conv2d (``conv2d_op``); call ``conv2d``, which picks."""
    spec = spec_for_call(x, weight, bias, stride, padding, dilation, groups, channel_policy)
    if x.device.type == "cpu" and not knobs.interpret():
        conv_plan = planned(spec, knobs.padding_budget())
        _fallback("CPU tensors and TRITON_INTERPRET is not set")
        return aten_conv2d(conv_plan.spec, x, weight, bias).contiguous(memory_format=output_memory_format(x))
    out = _allocate_output(x, weight, stride, padding, dilation)
    if out.numel() == 0:  # an empty batch: nothing to choose or compute
        return out
    choice = choice_for(spec, "forward", x.device, x.shape[0], x.shape[2], x.shape[3])
    if choice.kind == ATEN:  # tuning found aten faster for this layer
        result = aten_conv2d(spec, x, weight, bias)
        return result if result.stride() == out.stride() else out.copy_(result)
    return launch.forward(spec, x, weight, bias, out, choice)


conv2d_op = torch.library.custom_op("gconvgen::conv2d", run_conv2d, mutates_args=())


def call(op: Callable[..., torch.Tensor], implementation: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``op(*args)``, or its ``implementation(*args)`` directly where nothing could tell the two apart: plain
    tensors (or parameters) that need no gradient, outside torch.compile and any dispatch mode. The
    dispatcher's Python overhead, tens of microseconds per call, would otherwise outweigh small layers."""
    if _unobserved([arg for arg in args if isinstance(arg, torch.Tensor)]):
        return implementation(*args)
    return op(*args)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """gconvgen::conv2d (see ``call``): what gconvgen.conv2d runs once its arguments are checked."""
    return call(conv2d_op, run_conv2d, x, weight, bias, stride, padding, dilation, groups, channel_policy)


def _unobserved(tensors: list[torch.Tensor]) -> bool:
    """Whether calling an op's implementation directly is indistinguishable from calling the op."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad) for t in tensors)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


@conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, channel_policy):
    return _allocate_output(x, weight, stride, padding, dilation)


from . import backward as _backward  # noqa: E402,F401  (gconvgen::conv2d's autograd formula, wherever the op is reached)
