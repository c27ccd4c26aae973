"""The Python API: functional ``conv2d``, the ``GroupedConv2d`` module and ``compile_layer``.

Everything a user passes is checked here and turned into a ConvSpec; the custom op then runs it.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import knobs
from ..ir import ACTIVATIONS, CHANNEL_POLICIES, ConvSpec, check, conv_output_size, fail
from ..compiler.plan import planned
from ..runtime import launch, warm
from ..ops.fused import conv2d_act
from ..ops.dispatch import spec_for_call
from ..runtime.device import DTYPE_NAMES
from ..ops.conv2d import conv2d as op_conv2d
from ..ops.dispatch import unobserved, warm_key

DATA_FORMATS = ("NCHW", "NHWC")
# the same two, as TensorFlow and Keras spell them
_DATA_FORMAT_NAMES = {"NCHW": "NCHW", "NHWC": "NHWC", "channels_first": "NCHW", "channels_last": "NHWC"}
IntOrPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]


# ---------------------------------------------------------------------------------------------- argument checks


def _is_int(value: object) -> bool:
    """Python ints and integer scalars (numpy, torch) count; bools and floats do not."""
    if isinstance(value, bool) or isinstance(value, float):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _ints(name: str, value: object, length: int, minimum: int, lengths: tuple[int, ...] = ()) -> tuple[int, ...]:
    """An int, or a sequence of one int (used for every dimension, as torch does) or of ``length`` (or one of
    ``lengths``) ints, each >= minimum, as a tuple of Python ints."""
    if type(value) is int and value >= minimum:  # the common case, checked first: this runs on every call
        return (value,) * length
    counts = lengths or (length,)
    forms = "one int" if counts == (1,) else f"an int or a tuple of {' or '.join(map(str, counts))} ints"
    items = (value,) * length if _is_int(value) else value
    check(isinstance(items, (tuple, list)), f"{name}={value!r} must be {forms}", TypeError)
    items = tuple(items) * length if len(items) == 1 else tuple(items)
    check(len(items) in counts, f"{name}={value!r} has {len(items)} values; give {forms}")
    for item in items:
        check(_is_int(item), f"{name}={value!r} must hold ints only", TypeError)
        check(operator.index(item) >= minimum, f"{name}={value!r} must be >= {minimum}"
              + (f"; use {minimum} for none" if minimum == 0 else ""))
    return tuple(operator.index(item) for item in items)


def resolve_padding(padding: Padding, size: tuple[int, int], kernel_size: tuple[int, int],
                    stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right).

    'valid' is none; 'same' follows TensorFlow at any stride: out = ceil(in / stride), the odd pixel of
    padding after. An int pads all four sides, (h, w) pads each dimension on both sides, and four ints
    are (top, bottom, left, right).
    """
    if isinstance(padding, str):
        mode = _padding_mode(padding)
        if mode == "valid":
            return (0, 0, 0, 0)
        sides = []
        for length, k, s, d in zip(size, kernel_size, stride, dilation):
            total = max((math.ceil(length / s) - 1) * s + d * (k - 1) + 1 - length, 0)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    values = _ints("padding", padding, 2, 0, lengths=(2, 4))
    return (values[0], values[0], values[1], values[1]) if len(values) == 2 else values


def _padding_mode(padding: str) -> str:
    """'same' or 'valid', in any case ('SAME' and 'VALID' are TensorFlow's spelling)."""
    mode = padding.lower()
    check(mode in ("same", "valid"), f"padding={padding!r} is not a padding mode; use 'same', 'valid', an int, "
                                     f"(pad_h, pad_w) or (top, bottom, left, right)")
    return mode


def checked_activation(activation: object) -> str:
    """The epilogue's activation name for an ``activation=`` argument: None is "none", a name of
    gconvgen.ir.ACTIVATIONS is itself; anything else ('' included) raises naming the value and the names."""
    names = ", ".join(repr(name) for name in ACTIVATIONS[1:])
    check(activation is None or isinstance(activation, str),
          f"activation={activation!r} is not supported; use None or one of {names} (None: no activation)", TypeError)
    check(activation is None or activation in ACTIVATIONS,
          f"activation={activation!r} is not supported; use None or one of {names} (None: no activation)")
    return activation or "none"


def _data_format(data_format: object) -> str:
    """'NCHW' or 'NHWC' for a data format in gconvgen's or Keras's spelling."""
    name = _DATA_FORMAT_NAMES.get(data_format) if isinstance(data_format, str) else None
    check(name is not None, f"data_format={data_format!r} is not a data format; use 'NCHW' (Keras: 'channels_first') "
                            f"or 'NHWC' (Keras: 'channels_last')")
    return name


def _check_tensor(name: str, value: object, ranks: tuple[int, ...], layout_hint: str) -> None:
    check(isinstance(value, torch.Tensor), f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    check(value.dim() in ranks, f"{name} has shape {tuple(value.shape)} ({value.dim()}-D); expected {layout_hint}")
    check(value.dtype in DTYPE_NAMES,
          f"{name}.dtype={value.dtype} is not supported; use torch.float32, torch.float16, torch.bfloat16 or "
          f"torch.float64", TypeError)


def _autocast(tensors: tuple) -> tuple:
    """``tensors`` as F.conv2d receives them under torch.autocast: conv2d is on autocast's lower-precision
    list, so float16/bfloat16/float32 tensors on the autocast device are cast to the autocast dtype
    (float64 and other devices stay). A cast is differentiable: float32 parameters get float32 gradients."""
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(tensor.to(dtype) if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                 and tensor.dtype is not torch.float64 and tensor.device.type == device_type else tensor
                 for tensor in tensors)


def _check_same(name: str, tensor: torch.Tensor, reference: torch.Tensor) -> None:
    check(tensor.dtype == reference.dtype,
          f"{name}.dtype={tensor.dtype} does not match input.dtype={reference.dtype}; cast it with .to({reference.dtype})",
          TypeError)
    check(tensor.device == reference.device,
          f"{name} is on {tensor.device} but input is on {reference.device}; move it with .to('{reference.device}')")


def _channels_fit(in_channels: int, weight_in_per_group: int, out_channels: int, groups: int,
                  channel_policy: str) -> bool:
    """Whether a weight of ``weight_in_per_group`` inputs and ``out_channels`` outputs fits ``in_channels``."""
    if not 1 <= groups <= min(in_channels, out_channels):
        return False
    if channel_policy == "pad":
        return weight_in_per_group == math.ceil(in_channels / groups)
    return in_channels % groups == 0 and out_channels % groups == 0 and weight_in_per_group == in_channels // groups


def _other_data_format_hint(input: object, weight: object, groups: object, channel_policy: str, nhwc: bool) -> str:
    """A sentence suggesting the other data_format when the tensors fit it (and so were likely meant that
    way), else ''. Only computed for a call already refused."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and input.dim() in (3, 4)
            and weight.dim() == 4 and _is_int(groups)):
        return ""
    shapes = f"input {tuple(input.shape)} and weight {tuple(weight.shape)}"
    if nhwc:
        if _channels_fit(input.shape[-3], weight.shape[1], weight.shape[0], operator.index(groups), channel_policy):
            return (f"{shapes} fit an NCHW input [N, C, H, W] with an OIHW weight [out_channels, "
                    f"in_channels/groups, kh, kw]: pass data_format='NCHW' (the default)")
    elif _channels_fit(input.shape[-1], weight.shape[2], weight.shape[3], operator.index(groups), channel_policy):
        return (f"{shapes} fit an NHWC input [N, H, W, C] with a Keras HWIO weight [kh, kw, in_channels/groups, "
                f"out_channels]: pass data_format='NHWC'")
    return ""


# ---------------------------------------------------------------------------------------------- functional


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1,
           padding: Padding = 0, dilation: IntOrPair = 1, groups: int = 1, *, channel_policy: str = "strict",
           data_format: str = "NCHW", activation: Optional[str] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped 2-D convolution; the same results as ``torch.nn.functional.conv2d`` for all it accepts.

    Fused into the same kernel (one store, computed in fp32): ``activation(conv + bias + residual)``, the
    order of cuDNN's fused conv-bias-add-activation, with ``activation`` one of "relu", "relu6", "silu",
    "gelu", "gelu_tanh", "hardswish" (None: none) and ``residual`` a tensor of the output's shape (in the
    output's data format), or of its rank with 1 where it broadcasts, as torch's ``+`` does ([1, C_out, 1, 1]:
    one value per channel), differentiable like the rest.

    Beyond it: ``padding='same'`` at any stride (TensorFlow's rule), four-sided padding
    ``(top, bottom, left, right)``, ``channel_policy='pad'`` for channel counts the groups do not divide
    (group g reads input channels [g*ci, (g+1)*ci) of the zero-padded input and writes outputs
    [g*co, (g+1)*co) clipped to out_channels, ci = ceil(C_in/groups), co = ceil(C_out/groups)), and
    ``data_format='NHWC'`` with a Keras HWIO weight [kh, kw, ci, C_out], returning NHWC, without copies.

    Under torch.autocast the tensors are cast to the autocast dtype first, as F.conv2d's are. Meta tensors
    give a meta output of the right shape; torch.vmap and torch.func's gradient transforms work.
    ``padding='SAME'/'VALID'`` and ``data_format='channels_first'/'channels_last'`` (TensorFlow's and
    Keras's spellings) are accepted.

    Returns the output [N, C_out, OH, OW] (channels_last in gives channels_last out), or [N, OH, OW, C_out]
    for NHWC. Raises TypeError / ValueError naming the argument for anything it cannot compute.
    """
    key = _warm_key(input, weight, bias, residual, stride, padding, dilation, groups, channel_policy, data_format,
                    activation)
    hit = warm.recorded(key)
    if hit is not None:  # this signature ran before: its checks passed and the launch it ran is remembered
        nhwc = _data_format(data_format) == "NHWC"
        return hit(x=_nchw_view(input, nhwc), weight=weight.permute(3, 2, 0, 1) if nhwc else weight, bias=bias,
                    residual=_nchw_view(residual, nhwc))
    data_format = _data_format(data_format)
    check(channel_policy in CHANNEL_POLICIES,
          f"channel_policy={channel_policy!r} is not a policy; use 'strict' or 'pad'")
    nhwc = data_format == "NHWC"
    _check_tensor("input", input, (3, 4), "[N, H, W, C] or [H, W, C]" if nhwc else "[N, C, H, W] or [C, H, W]")
    _check_tensor("weight", weight, (4,), "[kh, kw, in_channels/groups, out_channels] (HWIO)" if nhwc
                  else "[out_channels, in_channels/groups, kh, kw]")
    if torch._C._is_any_autocast_enabled():  # one cheap call when autocast is off
        input, weight, bias = _autocast((input, weight, bias))
    _check_same("weight", weight, input)
    unbatched = input.dim() == 3
    x = _nchw_view(input, nhwc)
    w = weight.permute(3, 2, 0, 1) if nhwc else weight  # OIHW-indexed view, no copy
    check(_is_int(groups), f"groups={groups!r} must be an int", TypeError)
    groups = operator.index(groups)
    try:
        stride_hw, padding_4, dilation_hw = _checked_geometry(x, w, bias, stride, padding, dilation, groups,
                                                              channel_policy, nhwc)
    except ValueError as error:  # tensors in the other data format break some check: say so, after the error
        hint = _other_data_format_hint(input, weight, groups, channel_policy, nhwc)
        if hint:
            raise ValueError(f"{error} (reading the tensors as {data_format}). If they are in the other data "
                             f"format: {hint}") from error
        raise
    activation = checked_activation(activation)
    with warm.recording() as launched:
        if activation == "none" and residual is None:
            out = op_conv2d(x, w, bias, stride_hw, padding_4, dilation_hw, groups, channel_policy)
        else:
            residual = _checked_residual(residual, x, w, stride_hw, padding_4, dilation_hw, unbatched, nhwc)
            out = conv2d_act(x, w, bias, residual, stride_hw, padding_4, dilation_hw, groups, channel_policy,
                             activation)
    result = out.permute(0, 2, 3, 1).contiguous() if nhwc else out
    result = result.squeeze(0) if unbatched else result
    launch.remember(key, launched, result)
    return result


def _warm_key(input: object, weight: object, bias: object, residual: object, *arguments) -> Optional[tuple]:
    """The key of a call on the caller's tensors as passed (ops.dispatch.warm_key), or None where the call
    must take the whole path: a non-tensor argument, autocast, or something that could observe the call."""
    tensors = (input, weight, bias, residual)
    if torch._C._is_any_autocast_enabled() or not unobserved(tensors):
        return None  # (unobserved is False for anything but a plain tensor or None)
    return warm_key(tensors, "gconvgen.conv2d", *arguments)


def _nchw_view(activation: Optional[torch.Tensor], nhwc: bool) -> Optional[torch.Tensor]:
    """An [N, C, H, W]-indexed view (no copy) of an activation given batched or not, in NCHW or NHWC."""
    if activation is None:
        return None
    view = activation.unsqueeze(0) if activation.dim() == 3 else activation
    return view.permute(0, 3, 1, 2) if nhwc else view


def _checked_residual(residual: Optional[torch.Tensor], x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int],
                      padding: tuple[int, int, int, int], dilation: tuple[int, int], unbatched: bool,
                      nhwc: bool) -> Optional[torch.Tensor]:
    """The residual as an NCHW-indexed view [N, C_out, OH, OW] (None stays None). It has the output's rank and
    the output's shape in the caller's data format, or 1 where it broadcasts ([1, C_out, 1, 1]: one value
    per channel), expanded as torch's ``+`` would, without a copy; raises naming it otherwise."""
    if residual is None:
        return None
    check(isinstance(residual, torch.Tensor), f"residual must be a torch.Tensor or None, got {type(residual).__name__}",
          TypeError)
    _check_same("residual", residual, x)
    out_size = (conv_output_size(x.shape[2], w.shape[2], stride[0], dilation[0], padding[0], padding[1]),
                conv_output_size(x.shape[3], w.shape[3], stride[1], dilation[1], padding[2], padding[3]))
    batch, channels = x.shape[0], w.shape[0]
    shape = (batch, *out_size, channels) if nhwc else (batch, channels, *out_size)
    shape = shape[1:] if unbatched else shape
    per_channel = [1] * len(shape)
    per_channel[-1 if nhwc else -3] = channels
    return _nchw_view(broadcast_residual(residual, shape, per_channel), nhwc)


def broadcast_residual(residual: torch.Tensor, shape: tuple[int, ...], per_channel: list[int]) -> torch.Tensor:
    """``residual`` expanded (a view) to ``shape``, the output's in the caller's layout: it must have as many
    dimensions, each equal to the output's or 1. Raises ValueError naming both shapes and, as an example,
    ``per_channel``, the shape of one value per channel."""
    if residual.dim() != len(shape) or any(size not in (1, want) for size, want in zip(residual.shape, shape)):
        fail(f"residual has shape {tuple(residual.shape)}; expected the output's {list(shape)}, or 1 in any of its "
             f"{len(shape)} dimensions to broadcast along it (e.g. {per_channel} for one value per channel)")
    return residual.expand(shape)


def _checked_geometry(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], stride: IntOrPair,
                      padding: Padding, dilation: IntOrPair, groups: int, channel_policy: str,
                      nhwc: bool) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
    """conv2d's checks of channels, bias and geometry on NCHW-indexed x and OIHW-indexed w: (stride,
    four-sided padding, dilation) as ints, or ValueError / TypeError naming what does not fit."""
    check(groups >= 1, f"groups={groups} must be >= 1")
    in_channels, out_channels = x.shape[1], w.shape[0]
    check(in_channels > 0, f"input has 0 channels (shape {tuple(x.permute(0, 2, 3, 1).shape if nhwc else x.shape)}"
                           f"), so its groups have nothing to read. A conv over no channels outputs its bias alone "
                           f"(zeros without one): skip it for such inputs")
    per_group = math.ceil(in_channels / groups) if channel_policy == "pad" else in_channels / groups
    check(groups <= in_channels, f"groups={groups} exceeds the input's {in_channels} channels; use groups <= {in_channels}")
    if not (w.shape[1] == per_group or (channel_policy == "strict" and in_channels % groups)):
        fail(f"weight has {w.shape[1]} input channels per group but in_channels={in_channels} with groups={groups} "
             f"and channel_policy={channel_policy!r} needs {float(per_group):g}; the weight must be "
             + ("[kh, kw, in_channels/groups, out_channels]" if nhwc else "[out_channels, in_channels/groups, kh, kw]"))
    if bias is not None:
        check(isinstance(bias, torch.Tensor), f"bias must be a torch.Tensor or None, got {type(bias).__name__}", TypeError)
        check(bias.dim() == 1 and bias.shape[0] == out_channels,
              f"bias has shape {tuple(bias.shape)}; expected [{out_channels}] (one value per output channel)")
        _check_same("bias", bias, x)
    kernel_size = (w.shape[2], w.shape[3])
    stride_hw = _ints("stride", stride, 2, 1)
    dilation_hw = _ints("dilation", dilation, 2, 1)
    padding_4 = resolve_padding(padding, (x.shape[2], x.shape[3]), kernel_size, stride_hw, dilation_hw)
    if not torch.compiler.is_compiling():
        # Refusals surface here, with the caller on the stack. Under torch.compile the op raises the
        # same errors when it first runs, and tracing stays free of Python-side caches.
        spec = spec_for_call(x, w, bias, stride_hw, padding_4, dilation_hw, groups, channel_policy)
        planned(spec, knobs.padding_budget())     # the planner's error for a conv it refuses
        spec.output_size(x.shape[2], x.shape[3])  # a kernel that does not fit the padded input
    return stride_hw, padding_4, dilation_hw


# ---------------------------------------------------------------------------------------------- the module


def clip_output_channels(module: nn.Module, out_channels: int) -> None:
    """A grouped module built on padded channel counts (nn.Conv* refuses uneven ones) keeps the weight and
    bias rows of its real ``out_channels`` only."""
    if module.weight.shape[0] != out_channels:
        module.weight = nn.Parameter(module.weight.detach()[:out_channels].clone())
        module.bias = None if module.bias is None else nn.Parameter(module.bias.detach()[:out_channels].clone())


def sharing_parameters(cls: type, base: type, conv: nn.Module, channel_policy: str, activation: Optional[str]):
    """A ``cls`` (GroupedConv2d / GroupedConv1d) with the hyperparameters of ``conv`` (a ``base``) and sharing
    its Parameter objects (same tensors, device and dtype) and training flag."""
    check(isinstance(conv, base), f"conv must be an nn.{base.__name__}, got {type(conv).__name__}", TypeError)
    module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                 conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                 dtype=conv.weight.dtype, channel_policy=channel_policy, activation=activation)
    module.weight = conv.weight
    module.bias = conv.bias
    module.train(conv.training)
    return module


class GroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` run by gconvgen, with the same constructor plus ``channel_policy`` and ``data_format``.

    Its state dict has nn.Conv2d's keys and shapes. Under ``channel_policy='pad'`` the weight is
    [out_channels, ceil(in_channels/groups), kh, kw]. Padding may also be 'same' at any stride (or
    TensorFlow's 'SAME' / 'VALID') or four sides. ``data_format='NHWC'`` (or 'channels_last') takes and
    returns [N, H, W, C] tensors; the weight stays [out_channels, in_channels/groups, kh, kw] as
    nn.Conv2d's, so state dicts still load. Only ``padding_mode='zeros'`` is supported. ``activation``
    (e.g. "relu", "silu") is fused into the kernel, and ``forward(input, residual)`` adds a residual
    tensor before it: ``activation(conv + bias + residual)``.
    """

    data_format = "NCHW"  # what modules saved before data_format existed read
    activation = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: Padding = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, channel_policy: str = "strict",
                 data_format: str = "NCHW", activation: Optional[str] = None):
        check(padding_mode == "zeros",
              f"padding_mode={padding_mode!r} is not supported by gconvgen; use 'zeros' or keep nn.Conv2d")
        data_format = _data_format(data_format)
        checked_activation(activation)  # refuses an unknown activation now
        kernel_hw = _ints("kernel_size", kernel_size, 2, 1)
        spec = ConvSpec(in_channels, out_channels, groups, kernel_hw, _ints("stride", stride, 2, 1),
                        dilation=_ints("dilation", dilation, 2, 1), channel_policy=channel_policy)
        planned(spec, knobs.padding_budget())  # refuses uneven channels under 'strict', with the fix
        # stored as nn.Conv2d stores it (a tuple, or a lower-case word), which its extra_repr expects
        padding = _padding_mode(padding) if isinstance(padding, str) else _ints("padding", padding, 2, 0,
                                                                                  lengths=(2, 4))
        # nn.Conv2d refuses uneven channels and 'same' at stride > 1: build it on even sizes, then set the real ones
        padded_in = spec.in_channels_per_group * groups
        padded_out = spec.out_channels_per_group * groups
        super().__init__(padded_in, padded_out, kernel_hw, spec.stride, 0, spec.dilation, groups, bias,
                         padding_mode, device, dtype)
        self.in_channels, self.out_channels, self.padding = in_channels, out_channels, padding
        self.channel_policy = channel_policy
        self.data_format = data_format
        self.activation = activation
        clip_output_channels(self, out_channels)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, channel_policy: str = "strict",
                  activation: Optional[str] = None) -> "GroupedConv2d":
        """A GroupedConv2d sharing ``conv``'s parameters (same tensors, device and dtype), with ``activation``
        fused after it."""
        return sharing_parameters(cls, nn.Conv2d, conv, channel_policy, activation)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """gconvgen.conv2d with this module's weight, bias, hyperparameters and activation (plus ``residual``,
        of the output's shape); an NHWC module runs it on [N, C, H, W] views of its [N, H, W, C] input and
        returns the [N, H, W, C] view of the output."""
        if self.data_format == "NCHW":
            return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                          channel_policy=self.channel_policy, activation=self.activation, residual=residual)
        _check_tensor("input", input, (3, 4), "[N, H, W, C] or [H, W, C] (this module's data_format is 'NHWC')")
        channels_first = (2, 0, 1) if input.dim() == 3 else (0, 3, 1, 2)
        channels_last = (1, 2, 0) if input.dim() == 3 else (0, 2, 3, 1)
        residual = None if residual is None else residual.permute(channels_first)
        out = conv2d(input.permute(channels_first), self.weight, self.bias, self.stride, self.padding,
                     self.dilation, self.groups, channel_policy=self.channel_policy, activation=self.activation,
                     residual=residual)
        return out.permute(channels_last)

    def extra_repr(self) -> str:
        data_format = f", data_format={self.data_format!r}" if self.data_format != "NCHW" else ""
        activation = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + f", channel_policy={self.channel_policy!r}" + data_format + activation
