"""The IR: one frozen dataclass that describes one grouped 2-D convolution.

A ConvSpec is everything a kernel is specialised on. It hashes, so it is the key of every cache, and it
prints, so errors can show it. Spatial input size and batch are not part of it: one compiled kernel
serves every input size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn

# float64 accumulates in float64: it exists for gradient checks (torch.autograd.gradcheck) and references
DTYPES = ("float32", "float16", "bfloat16", "float64")
LAYOUTS = ("nchw", "nhwc", "strided")
CHANNEL_POLICIES = ("strict", "pad")
# the fused epilogue activations (their table is gconvgen/activations.py, which checks it names these)
ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish")


def check(condition: object, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds: the one way gconvgen rejects input."""
    if not condition:
        raise error(message)


def fail(message: str, error: type[Exception] = ValueError) -> NoReturn:
    """Raise ``error(message)``: check() for a branch that has already decided."""
    raise error(message)


def _check_int(name: str, value: object, minimum: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool),
          f"{name}={value!r} must be an int", TypeError)
    check(value >= minimum, f"{name}={value!r} must be >= {minimum}")


def _check_pair(name: str, value: object, minimum: int, length: int = 2) -> None:
    check(isinstance(value, tuple) and len(value) == length,
          f"{name}={value!r} must be a tuple of {length} ints", TypeError)
    for item in value:
        check(isinstance(item, int) and not isinstance(item, bool), f"{name}={value!r} must hold ints only", TypeError)
        check(item >= minimum, f"{name}={value!r} must hold ints >= {minimum}")


@dataclass(frozen=True)
class ConvSpec:
    """One grouped conv2d: ``out[n, o] = sum over the group's inputs of x * w``.

    Channel counts are the real ones. With ``channel_policy="pad"`` each group reads
    ``ceil(in_channels / groups)`` input channels of a zero-padded input and writes
    ``ceil(out_channels / groups)`` outputs clipped to ``out_channels``; the planner lowers that padding to
    masks. ``padding`` is resolved to four sides (top, bottom, left, right). ``layout`` is the memory order
    of the activations: "nchw" (W contiguous), "nhwc" (channels contiguous) or "strided" (anything else).
    """

    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = False
    dtype: str = "float32"
    layout: str = "nchw"
    channel_policy: str = "strict"

    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, 1)
        _check_int("out_channels", self.out_channels, 1)
        _check_int("groups", self.groups, 1)
        _check_pair("kernel_size", self.kernel_size, 1)
        _check_pair("stride", self.stride, 1)
        _check_pair("padding", self.padding, 0, length=4)
        _check_pair("dilation", self.dilation, 1)
        check(isinstance(self.bias, bool), f"bias={self.bias!r} must be True or False", TypeError)
        check(self.dtype in DTYPES, f"dtype={self.dtype!r} is not supported; use one of {DTYPES}")
        check(self.layout in LAYOUTS, f"layout={self.layout!r} is not a layout; use one of {LAYOUTS}")
        check(self.channel_policy in CHANNEL_POLICIES,
              f"channel_policy={self.channel_policy!r} is not a policy; use 'strict' (refuse channel counts "
              f"that groups do not divide) or 'pad' (pad each group to equal size)")
        check(self.groups <= self.in_channels and self.groups <= self.out_channels,
              f"groups={self.groups} exceeds in_channels={self.in_channels} or out_channels={self.out_channels}; "
              f"use groups <= {min(self.in_channels, self.out_channels)}")

    @property
    def in_channels_per_group(self) -> int:
        """Input channels each group reads (padded up under channel_policy='pad')."""
        return math.ceil(self.in_channels / self.groups)

    @property
    def out_channels_per_group(self) -> int:
        """Output channels each group writes before clipping to out_channels."""
        return math.ceil(self.out_channels / self.groups)

    @property
    def is_depthwise(self) -> bool:
        """Every group reads exactly one input channel (any channel multiplier)."""
        return self.groups == self.in_channels

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """The OIHW weight this spec expects."""
        return (self.out_channels, self.in_channels_per_group, *self.kernel_size)

    @property
    def name(self) -> str:
        """Its fields in a readable, identifier-safe form (the channel policy aside), e.g.
        ``ci128_co128_g32_k3x3_s1x1_d1x1_p1_1_1_1_nhwc_bfloat16_bias``: kernel names and tuning keys read it."""
        return "_".join([f"ci{self.in_channels}", f"co{self.out_channels}", f"g{self.groups}",
                         "k{}x{}".format(*self.kernel_size), "s{}x{}".format(*self.stride),
                         "d{}x{}".format(*self.dilation), "p" + "_".join(map(str, self.padding)), self.layout,
                         self.dtype, *(["bias"] if self.bias else [])])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (height, width) for an input of (height, width); raises if the kernel does not fit."""
        top, bottom, left, right = self.padding
        for name, size, before, after, k, d in (("height", height, top, bottom, self.kernel_size[0], self.dilation[0]),
                                                ("width", width, left, right, self.kernel_size[1], self.dilation[1])):
            span = d * (k - 1) + 1
            check(size + before + after >= span,
                  f"kernel_size={self.kernel_size} with dilation={self.dilation} spans {span} pixels but the padded "
                  f"input {name} is {size + before + after} ({size} + padding {before}+{after}); use a smaller "
                  f"kernel or more padding")
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return conv_output_size(height, kh, sh, dh, top, bottom), conv_output_size(width, kw, sw, dw, left, right)


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, before: int, after: int) -> int:
    """Output length of one spatial dimension (works on torch SymInts too)."""
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1
