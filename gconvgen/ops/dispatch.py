"""How a call reaches an op: the checks every op shares, the direct call where nothing could tell the op
from its implementation (``call``), and the key of a warm call (``warm_key``), under which the launcher
keeps the launch a call ran (runtime/launch.py ``remember``)."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import knobs
from ..memo import memoized
from ..ir import ConvSpec, conv_output_size
from ..runtime import launch, warm
from ..runtime.device import DTYPE_NAMES, allows_tf32


def activation_layout(x: torch.Tensor) -> str:
    """Memory order of an NCHW-indexed activation: 'nhwc' (channels contiguous), 'nchw' or 'strided'.
    A dimension of size 1 has no meaningful stride, so it counts as contiguous."""
    channels_unit = x.stride(1) == 1 or x.shape[1] == 1
    width_unit = x.stride(3) == 1 or x.shape[3] == 1
    if channels_unit and (not width_unit or _channels_last_contiguous(x)):
        return "nhwc"
    return "nchw" if width_unit else "strided"


def _channels_last_contiguous(x: torch.Tensor) -> bool:
    """``x.is_contiguous(memory_format=torch.channels_last)``, which a tensor seen inside torch.vmap cannot
    answer; there the batching rule runs the op on the physical tensor, so its layout is decided there."""
    return not torch._C._functorch.is_batchedtensor(x) and x.is_contiguous(memory_format=torch.channels_last)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last in gives channels_last out, as F.conv2d does."""
    return torch.channels_last if activation_layout(x) == "nhwc" and not x.is_contiguous() else torch.contiguous_format


@memoized(4096)
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


@memoized()
def _say_fallback_once(reason: str) -> None:
    warnings.warn(f"gconvgen: {reason}; running the exact aten fallback instead of the generated kernel "
                  f"(set TRITON_INTERPRET=1 to run the kernel on CPU, GCONVGEN_FALLBACK=error to refuse)",
                  stacklevel=3)


def fallback(reason: str) -> None:
    if knobs.fallback_mode() == "error":
        raise RuntimeError(f"gconvgen: {reason} and GCONVGEN_FALLBACK=error forbids the aten fallback")
    _say_fallback_once(reason)


def allocate_output(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> torch.Tensor:
    out_height = conv_output_size(x.shape[2], weight.shape[2], stride[0], dilation[0], padding[0], padding[1])
    out_width = conv_output_size(x.shape[3], weight.shape[3], stride[1], dilation[1], padding[2], padding[3])
    shape = (x.shape[0], weight.shape[0], out_height, out_width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))



def call(op: Callable[..., torch.Tensor], implementation: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``op(*args)``, or its ``implementation(*args)`` directly where nothing could tell the two apart: plain
    tensors (or parameters) that need no gradient, outside torch.compile and any dispatch mode. The
    dispatcher's Python overhead, tens of microseconds per call, would otherwise outweigh small layers."""
    if unobserved([arg for arg in args if isinstance(arg, torch.Tensor)]):
        return implementation(*args)
    return op(*args)


def unobserved(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether calling an op's implementation directly is indistinguishable from calling the op. Under a
    torch.func transform the tensors look plain (their type is torch.Tensor) but are functorch's wrappers,
    which only the dispatcher can unwrap; inside torch.autograd.forward_ad.dual_level, a tensor may carry a
    tangent that only the op's autograd kernel carries forward. None entries (absent optional tensors) count
    as plain."""
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad)) for t in tensors)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def warm_key(tensors: Sequence[Optional[torch.Tensor]], *hyperparameters) -> Optional[tuple]:
    """The key under which a call's launch is remembered: the signature of each tensor (shape, strides,
    dtype, device; the first is never None), the call's other arguments (the first naming the op), every
    knob, and TF32; None when an argument is not plain (the call then takes the whole path)."""
    if not _plain(hyperparameters):
        return None
    anchor = tensors[0]
    return (*[None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors], hyperparameters,
            knobs.fingerprint(), anchor.is_cuda and anchor.dtype is torch.float32 and allows_tf32(anchor.device))


def _plain(values: tuple) -> bool:
    """Whether every value is None, a str, an int or a tuple of ints (not a bool or float), so that equal keys
    mean equal arguments: 1.0 == 1 and True == 1 in a dict, yet the checks refuse them. A list of ints (what
    the dispatcher hands an op for int[]) is refused too: the ops' keys turn theirs into tuples first."""
    return all(value is None or type(value) in (int, str)
               or (type(value) is tuple and all(type(item) is int for item in value)) for value in values)


def op_arguments(*values) -> tuple:
    """An op's non-tensor arguments for ``warm_key``: the lists the dispatcher passes for int[] as tuples."""
    return tuple(tuple(value) if type(value) is list else value for value in values)



def warm_or_cold(key: Optional[tuple], operands: dict[str, Optional[torch.Tensor]],
                 cold: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The launch remembered under ``key`` run on ``operands`` (by name; ``launch.Warm``); else ``cold()``, the
    whole path, whose one launch is remembered under ``key`` for the next call."""
    hit = warm.recorded(key)
    if hit is not None:
        return hit(**operands)
    with warm.recording() as launched:
        result = cold()
    launch.remember(key, launched, result)
    return result
