"""The 1-D API: functional ``conv1d`` and the ``GroupedConv1d`` module.

A 1-D conv is the 2-D one with height 1, so it travels the same rooms (ConvSpec, plan, lowered kernel,
custom op, autograd) with no code of its own past this file: the input [N, C, L] is viewed as
[N, C, 1, L], the weight [C_out, ci, k] as [C_out, ci, 1, k] (a (1, k) window, so every kernel loops over
the length), and padding (left, right) becomes (0, 0, left, right). Only views are made, never copies;
gradients come from gconvgen::conv2d's autograd formula.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import knobs
from .causal import _check_tensor as check_shape, causal_depthwise
from .conv2d import (
    _check_same, _check_tensor, _ints, _is_int, broadcast_residual, checked_activation, clip_output_channels,
    conv2d, sharing_parameters)
from ..ir import CHANNEL_POLICIES, ConvSpec, check, conv_output_size
from ..compiler.plan import planned

# every accepted spelling -> the layout it means: Keras/TF "channels_first"/"channels_last", TF's NCW/NWC
DATA_FORMATS_1D = {"NCL": "NCL", "NLC": "NLC", "channels_first": "NCL", "channels_last": "NLC",
                   "NCW": "NCL", "NWC": "NLC"}
PADDING_MODES_1D = ("valid", "same", "causal")
IntOrSingle = Union[int, Sequence[int]]
Padding1d = Union[str, int, Sequence[int]]


def resolve_padding_1d(padding: Padding1d, length: int, kernel_size: int, stride: int,
                       dilation: int) -> tuple[int, int]:
    """Padding of a 1-D conv as (left, right).

    'valid' is none; 'same' follows TensorFlow at any stride (output length ceil(L / stride), the odd sample
    of padding on the right); 'causal' is Keras's: (kernel_size - 1) * dilation on the left only, so output
    t sees inputs up to t * stride and the output length is ceil(L / stride). Words are case-insensitive
    ('SAME', 'VALID'). An int (or a 1-tuple) pads both sides; a pair is (left, right).
    Raises ValueError / TypeError naming ``padding``.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        check(mode in PADDING_MODES_1D, f"padding={padding!r} is not a padding mode; use 'same', 'valid', "
                                        f"'causal', an int or (left, right)")
        if mode == "valid":
            return (0, 0)
        if mode == "causal":
            return ((kernel_size - 1) * dilation, 0)
        out_length = -(-length // stride)  # ceil(L / stride), in integers so symbolic lengths stay exact
        total = max((out_length - 1) * stride + dilation * (kernel_size - 1) + 1 - length, 0)
        return (total // 2, total - total // 2)
    left, right = _ints("padding", padding, 2, 0)
    return (left, right)


def _data_format(data_format: object) -> str:
    check(isinstance(data_format, str) and data_format in DATA_FORMATS_1D,
          f"data_format={data_format!r} is not a 1-D data format; use 'NCL' (also 'channels_first', 'NCW') or "
          f"'NLC' (also 'channels_last', 'NWC')")
    return DATA_FORMATS_1D[data_format]


# ---------------------------------------------------------------------------------------------- functional


def conv1d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: IntOrSingle = 1,
           padding: Padding1d = 0, dilation: IntOrSingle = 1, groups: int = 1, *, channel_policy: str = "strict",
           data_format: str = "NCL", activation: Optional[str] = None,
           residual: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None,
           initial_states: Optional[torch.Tensor] = None,
           return_final_states: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Grouped 1-D convolution; the same results as ``torch.nn.functional.conv1d`` for all it accepts.

    Fused into the same kernel, as gconvgen.conv2d fuses them: ``activation(conv + bias + residual)`` with
    ``activation`` one of "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish" (None: none) and
    ``residual`` a tensor of the output's shape in the input's data format ([N, C_out, L_out], or
    [N, L_out, C_out] for NLC; unbatched without N), or of its rank with 1 where it broadcasts ([1, C_out, 1]).

    Beyond it: ``padding='causal'`` (Keras's: (k - 1) * dilation on the left, output length ceil(L / stride)),
    ``padding='same'`` at any stride (TensorFlow's rule), two-sided padding ``(left, right)``,
    ``channel_policy='pad'`` for channel counts the groups do not divide (as gconvgen.conv2d), and
    ``data_format='NLC'`` (or 'channels_last') with a Keras weight [k, in_channels/groups, out_channels],
    returning [N, L_out, C_out], without copies. Unbatched input [C, L] ([L, C] for NLC) gives unbatched output.

    Sequence models (Mamba's causal depthwise conv, as causal-conv1d computes it; see gconvgen.causal_conv1d):
    a float32 (float64) weight and bias with float16 / bfloat16 input compute in the weight's precision (the
    input is cast to it, one copy) and return the input's dtype; ``activation="swish"`` is silu. For a causal
    depthwise conv (padding='causal', stride 1, dilation 1, groups = channels = out_channels): ``seq_idx``
    [N, L] (integers) packs several sequences in a row (a tap never reads another sequence; outputs of a
    negative seq_idx are 0); ``initial_states`` ([N, C, k - 1], or [N, k - 1, C] for NLC) are the inputs before
    the first; ``return_final_states=True`` returns (out, the last k - 1 inputs in the same layout).

    It runs as gconvgen.conv2d on height-1 views (see the module docstring), so training, torch.compile
    and tuning are the 2-D ones. Returns [N, C_out, L_out] (or [N, L_out, C_out] for NLC). Raises TypeError /
    ValueError naming the argument for anything it cannot compute.
    """
    if isinstance(activation, str) and activation == "swish":  # silu's other name (causal-conv1d, Keras)
        activation = "silu"
    if seq_idx is not None or initial_states is not None or return_final_states is not False:
        return _causal_with_states(input, weight, bias, stride, padding, dilation, groups, channel_policy,
                                   data_format, activation, residual, seq_idx, initial_states, return_final_states)
    if _wider_weight(input, weight):
        wide = weight.dtype
        out = conv1d(input.to(wide), weight, bias.to(wide) if isinstance(bias, torch.Tensor) else bias, stride, padding, dilation, groups, channel_policy=channel_policy,
                     data_format=data_format, activation=activation,
                     residual=None if not isinstance(residual, torch.Tensor) else residual.to(wide))
        return out.to(input.dtype)
    layout = _data_format(data_format)
    check(channel_policy in CHANNEL_POLICIES,
          f"channel_policy={channel_policy!r} is not a policy; use 'strict' or 'pad'")
    nlc = layout == "NLC"
    _check_tensor("input", input, (2, 3), "[N, L, C] or [L, C]" if nlc else "[N, C, L] or [C, L]")
    weight_layout = ("[k, in_channels/groups, out_channels] (Keras)" if nlc
                     else "[out_channels, in_channels/groups, k]")
    _check_tensor("weight", weight, (3,), weight_layout)
    _check_same("weight", weight, input)
    check(_is_int(groups), f"groups={groups!r} must be an int", TypeError)
    groups = operator.index(groups)
    check(groups >= 1, f"groups={groups} must be >= 1")
    unbatched = input.dim() == 2
    length, in_channels = (input.shape[-2], input.shape[-1]) if nlc else (input.shape[-1], input.shape[-2])
    kernel_size, weight_in = (weight.shape[0], weight.shape[1]) if nlc else (weight.shape[2], weight.shape[1])
    per_group = math.ceil(in_channels / groups) if channel_policy == "pad" else in_channels / groups
    check(groups <= in_channels,
          f"groups={groups} exceeds the input's {in_channels} channels; use groups <= {in_channels}")
    check(weight_in == per_group or (channel_policy == "strict" and in_channels % groups),
          f"weight has {weight_in} input channels per group but in_channels={in_channels} with groups={groups} "
          f"and channel_policy={channel_policy!r} needs {per_group:g}; the weight must be {weight_layout}")
    (stride_l,) = _ints("stride", stride, 1, 1)
    (dilation_l,) = _ints("dilation", dilation, 1, 1)
    left, right = resolve_padding_1d(padding, length, kernel_size, stride_l, dilation_l)
    span = dilation_l * (kernel_size - 1) + 1
    check(length + left + right >= span,
          f"weight's kernel_size={kernel_size} with dilation={dilation_l} spans {span} samples but the padded "
          f"input length is {length + left + right} ({length} + padding {left}+{right}); use a smaller kernel or "
          f"more padding")

    x = input.unsqueeze(0) if unbatched else input
    height = 1 if nlc else 2  # where the height-1 dimension goes in the 2-D views
    if residual is not None:  # checked here, so that errors show its 1-D shape, not the 2-D view's
        check(isinstance(residual, torch.Tensor),
              f"residual must be a torch.Tensor or None, got {type(residual).__name__}", TypeError)
        out_channels = weight.shape[2] if nlc else weight.shape[0]
        out_length = conv_output_size(length, kernel_size, stride_l, dilation_l, left, right)
        shape = (x.shape[0], out_length, out_channels) if nlc else (x.shape[0], out_channels, out_length)
        per_channel = [1, 1, out_channels] if nlc else [1, out_channels, 1]
        residual = broadcast_residual(residual, shape[1:] if unbatched else shape,
                                      per_channel[1:] if unbatched else per_channel)
        residual = (residual.unsqueeze(0) if unbatched else residual).unsqueeze(height)
    if nlc:  # NHWC with height 1: [N, 1, L, C] and the HWIO weight [1, k, ci, C_out]
        out = conv2d(x.unsqueeze(1), weight.unsqueeze(0), bias, (1, stride_l), (0, 0, left, right), (1, dilation_l),
                     groups, channel_policy=channel_policy, data_format="NHWC", activation=activation,
                     residual=residual).squeeze(1)
    else:  # NCHW with height 1: [N, C, 1, L] and the OIHW weight [C_out, ci, 1, k]
        out = conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, stride_l), (0, 0, left, right), (1, dilation_l),
                     groups, channel_policy=channel_policy, activation=activation, residual=residual).squeeze(2)
    return out.squeeze(0) if unbatched else out


def _wider_weight(input: object, weight: object) -> bool:
    """A float32 / float64 weight with float16 / bfloat16 input (Mamba keeps its conv weight in float32)."""
    return (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)
            and input.dtype in (torch.float16, torch.bfloat16) and weight.dtype in (torch.float32, torch.float64))


def _causal_with_states(input, weight, bias, stride, padding, dilation, groups, channel_policy, data_format,
                        activation, residual, seq_idx, initial_states, return_final_states):
    """conv1d with seq_idx, initial_states or return_final_states: a causal depthwise conv, computed by
    nn/causal.py's causal_depthwise on NCL views."""
    nlc = _data_format(data_format) == "NLC"
    what = "seq_idx, initial_states and return_final_states"
    check(isinstance(return_final_states, bool),
          f"return_final_states={return_final_states!r} must be True or False", TypeError)
    check(isinstance(padding, str) and padding.lower() == "causal",
          f"{what} need padding='causal' (a causal conv carries states), got padding={padding!r}")
    check(stride in (1, (1,), [1]) and dilation in (1, (1,), [1]),
          f"{what} need stride=1 and dilation=1, got stride={stride!r}, dilation={dilation!r}")
    check(channel_policy == "strict", f"{what} need channel_policy='strict', got {channel_policy!r}")
    check(activation in (None, "silu"), f"{what} take activation=None or 'silu' (or 'swish'), got {activation!r}")
    _check_tensor("input", input, (3,), "[N, L, C]" if nlc else "[N, C, L]")
    x = input.transpose(1, 2) if nlc else input  # [N, C, L]
    batch, channels, length = x.shape
    check(isinstance(groups, int) and groups == channels,
          f"{what} need a depthwise conv (groups = channels = {channels}), got groups={groups!r}")
    check_shape("weight", weight, (None, 1, channels) if nlc else (channels, 1, None),
                f"[k, 1, {channels}] (Keras)" if nlc else f"[{channels}, 1, k]: one filter per channel")
    taps = weight[:, 0, :].T if nlc else weight[:, 0, :]  # (C, k)
    if not _wider_weight(input, weight):
        _check_same("weight", weight, input)
    width = taps.shape[1]
    if bias is not None:
        check_shape("bias", bias, (channels,), f"[{channels}]")
    if residual is not None:
        check_shape("residual", residual, tuple(input.shape), f"the output's shape {list(input.shape)}")
        residual = residual.transpose(1, 2) if nlc else residual
    if initial_states is not None:
        check(seq_idx is None, "seq_idx cannot be combined with initial_states: each packed sequence starts from zeros")
        check_shape("initial_states", initial_states, (batch, width - 1, channels) if nlc else (batch, channels, width - 1),
                    f"[{batch}, {width - 1}, {channels}]" if nlc else f"[{batch}, {channels}, {width - 1}]")
        initial_states = initial_states.transpose(1, 2) if nlc else initial_states
    if seq_idx is not None:
        check(not return_final_states, "seq_idx cannot be combined with return_final_states: a packed row holds "
                                       "several sequences; run each on its own to carry states")
        check_shape("seq_idx", seq_idx, (batch, length), f"[{batch}, {length}]", floating=False)
        check(not seq_idx.is_floating_point() and seq_idx.dtype != torch.bool,
              f"seq_idx.dtype={seq_idx.dtype} must be an integer type (torch.int32)", TypeError)
    out, final_states = causal_depthwise(x, taps, bias, seq_idx=seq_idx, initial_states=initial_states,
                                         activation=activation, residual=residual)
    if nlc:
        out, final_states = out.transpose(1, 2), final_states.transpose(1, 2)
    return (out, final_states) if return_final_states else out


# ---------------------------------------------------------------------------------------------- the module


def _module_padding(padding: Padding1d) -> Union[str, tuple[int, ...]]:
    """Padding as the module keeps it: a lower-case word, (p,) as nn.Conv1d keeps an int, or (left, right)."""
    if isinstance(padding, str):
        resolve_padding_1d(padding, 1, 1, 1, 1)  # refuses an unknown word now, not at the first call
        return padding.lower()
    left, right = _ints("padding", padding, 2, 0)
    return (left,) if left == right else (left, right)


class GroupedConv1d(nn.Conv1d):
    """``nn.Conv1d`` run by gconvgen, with the same constructor plus ``channel_policy`` and ``activation``.

    Its state dict has nn.Conv1d's keys and shapes (under ``channel_policy='pad'`` the weight is
    [out_channels, ceil(in_channels/groups), k]). Padding may also be 'causal', 'same' at any stride or
    (left, right). Only ``padding_mode='zeros'`` is supported. ``activation`` (e.g. "relu", "silu") is fused
    into the kernel, and ``forward(input, residual)`` adds a residual [N, C_out, L_out] before it:
    ``activation(conv + bias + residual)``.
    """

    activation = None  # what modules saved before activation existed read

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrSingle, stride: IntOrSingle = 1,
                 padding: Padding1d = 0, dilation: IntOrSingle = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, channel_policy: str = "strict",
                 activation: Optional[str] = None):
        check(padding_mode == "zeros",
              f"padding_mode={padding_mode!r} is not supported by gconvgen; use 'zeros' or keep nn.Conv1d")
        checked_activation(activation)  # refuses an unknown activation now
        (kernel,) = _ints("kernel_size", kernel_size, 1, 1)
        (stride_l,) = _ints("stride", stride, 1, 1)
        (dilation_l,) = _ints("dilation", dilation, 1, 1)
        spec = ConvSpec(in_channels, out_channels, groups, (1, kernel), (1, stride_l), dilation=(1, dilation_l),
                        channel_policy=channel_policy)
        planned(spec, knobs.padding_budget())  # refuses uneven channels under 'strict', with the fix
        padding = _module_padding(padding)
        # nn.Conv1d refuses uneven channels, 'causal' and 'same' at stride > 1: build it on even sizes and no
        # padding, then set the real ones
        padded_in = spec.in_channels_per_group * groups
        padded_out = spec.out_channels_per_group * groups
        super().__init__(padded_in, padded_out, kernel, stride_l, 0, dilation_l, groups, bias, padding_mode, device,
                         dtype)
        self.in_channels, self.out_channels, self.padding = in_channels, out_channels, padding
        self.channel_policy = channel_policy
        self.activation = activation
        clip_output_channels(self, out_channels)

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, *, channel_policy: str = "strict",
                  activation: Optional[str] = None) -> "GroupedConv1d":
        """A GroupedConv1d sharing ``conv``'s parameters (same tensors, device and dtype), with ``activation``
        fused after it."""
        return sharing_parameters(cls, nn.Conv1d, conv, channel_policy, activation)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """gconvgen.conv1d with this module's weight, bias, hyperparameters and activation (plus ``residual``,
        of the output's shape)."""
        return conv1d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                      channel_policy=self.channel_policy, activation=self.activation, residual=residual)

    def extra_repr(self) -> str:
        activation = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + f", channel_policy={self.channel_policy!r}" + activation
