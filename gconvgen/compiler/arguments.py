"""The argument tables: every kernel kind's arguments, declared once.

A kernel's signature is rendered from its table (templates/_shared.jinja), the launcher builds the
argument list from it (runtime/launch.py), and the ahead-of-time compiler and ``gconvgen inspect`` type
and specialise the same list (tools/inspection.py). Adding an argument is one edit here (and its use in the
template that reads it).

Each tensor operand passes its pointer, then the sizes the kernel reads off its shape, then all of its
strides (any strides are allowed: the kernels index through them).
"""
from __future__ import annotations

from dataclasses import dataclass

CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_BLOCK")


@dataclass(frozen=True)
class Operand:
    """One tensor argument: ``name`` at the launch, ``pointer`` in the kernel, the sizes read off its shape
    as (kernel argument, dimension), and one stride argument ``stride_<prefix><dim>`` per dimension."""

    name: str
    pointer: str
    shape: str                            # the shape comment in the signature
    sizes: tuple[tuple[str, int], ...]
    stride_prefix: str
    dims: str                             # one letter per dimension, for the stride names
    role: str = "input"                   # input, output, or optional (a missing bias)

    @property
    def strides(self) -> tuple[str, ...]:
        """The kernel's stride arguments of this operand, e.g. ('stride_xn', 'stride_xc', ...)."""
        return tuple(f"stride_{self.stride_prefix}{dim}" for dim in self.dims)


@dataclass(frozen=True)
class ArgumentTable:
    """A kernel kind's arguments in order: operands' pointers, then per operand its sizes and strides, then
    the integer ``scalars``, then the tile constexprs."""

    kind: str
    operands: tuple[Operand, ...]
    scalars: tuple[tuple[str, str], ...] = ()  # (name, comment)

    @property
    def names(self) -> tuple[str, ...]:
        """Every non-constexpr argument in the kernel's order."""
        names = [operand.pointer for operand in self.operands]
        for operand in self.operands:
            names += [size for size, _ in operand.sizes] + list(operand.strides)
        return tuple(names + [name for name, _ in self.scalars])

    def pointer_of(self, name: str) -> Operand:
        """The operand whose pointer argument is ``name``."""
        return next(operand for operand in self.operands if operand.pointer == name)


_BATCH_HW = (("batch", 0), ("height", 2), ("width", 3))
_OUT_HW = (("out_height", 2), ("out_width", 3))
_X = Operand("x", "x_ptr", "input [batch, in_channels, height, width]", _BATCH_HW, "x", "nchw")
_WEIGHT = Operand("weight", "w_ptr", "weight [out_channels, in_channels_per_group, kernel_h, kernel_w]", (), "w",
                  "ochw")
_SPLITS = (("pixels", "units summed: output pixels (batch x out_height x out_width), or the banded grad-weight's "
                      "strips of BLOCK_K output columns (Family.reduction_units)"),
           ("pixels_per_split", "split s sums units [s * pixels_per_split, (s + 1) * pixels_per_split)"))

TABLES = {
    "forward": ArgumentTable("forward", (
        _X,
        _WEIGHT,
        Operand("bias", "bias_ptr", "bias [out_channels] (unused without bias)", (), "b", "o", "optional"),
        Operand("residual", "residual_ptr", "residual [batch, out_channels, out_height, out_width] added before the "
                "activation (unused without one)", (), "r", "nchw", "optional"),
        Operand("out", "out_ptr", "output [batch, out_channels, out_height, out_width], every element written",
                _OUT_HW, "o", "nchw", "output"),
    )),
    "grad_input": ArgumentTable("grad_input", (
        Operand("grad_output", "grad_out_ptr", "output gradient [batch, out_channels, out_height, out_width]",
                (("batch", 0), *_OUT_HW), "g", "nchw"),
        _WEIGHT,
        Operand("grad_input", "grad_x_ptr", "input gradient [batch, in_channels, height, width], every element written",
                (("height", 2), ("width", 3)), "x", "nchw", "output"),
    )),
    "grad_weight": ArgumentTable("grad_weight", (
        _X,
        Operand("grad_output", "grad_out_ptr", "output gradient [batch, out_channels, out_height, out_width]",
                _OUT_HW, "g", "nchw"),
        Operand("partials", "partials_ptr", "weight-gradient partials [splits, out_channels, in_channels_per_group, "
                "kernel_h, kernel_w], every element written", (), "p", "sochw", "output"),
    ), _SPLITS),
    "grad_bias": ArgumentTable("grad_bias", (
        Operand("grad_output", "grad_out_ptr", "output gradient [batch, out_channels, out_height, out_width]",
                (("batch", 0), ("out_channels", 1), *_OUT_HW), "g", "nchw"),
        Operand("partials", "partials_ptr", "bias-gradient partials [splits, out_channels], every element written",
                (), "p", "so", "output"),
    ), _SPLITS),
}


def table_for(kind: str) -> ArgumentTable:
    """The argument table of kernel ``kind`` (forward, grad_input, grad_weight or grad_bias)."""
    return TABLES[kind]
