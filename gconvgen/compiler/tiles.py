"""Tiles: the launch configuration of a kernel (KernelConfig), the pixels a launch tiles (PixelSpace) and the
device facts the default configs are written for. What tiles each family takes, and its default, is the
family's (compiler/families)."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import check

ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# What a default config's staged operands may take of an SM's shared memory (Hopper has 227 KiB): half
# of it, so two programs fit. Tuned configs are held to the device's own limit by the search space.
DEFAULT_SHARED_MEMORY_BYTES = 112 * 1024
# The device the default configs are written for: an H200's 132 SMs. A default grid aims for DEFAULT_WAVES
# waves of programs: with one wave or less, SMs sit idle while the slowest program finishes.
H200_SMS = 132
DEFAULT_WAVES = 2


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. block_m / block_n / block_k are the tile sides (what each tiles depends on
    the family and kind: see default_config); num_warps and num_stages are Triton's launch settings."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            check(type(value) is int, f"KernelConfig {name}={value!r} must be an int", TypeError)


@dataclass(frozen=True)
class PixelSpace:
    """The pixels a launch's programs tile: ``rows`` rows (batch x image rows) of ``width`` pixels, of the
    image the kernel walks: the output for the forward, grad-weight and grad-bias, the input for grad-input.
    The grid is a function of it (grid_of); so is a default config, which shrinks its tiles to fill the
    device (default_config)."""

    rows: int
    width: int
    batch: int = 1  # rows is batch x image height

    @staticmethod
    def of(kind: str, batch: int, height: int, width: int, out_height: int, out_width: int) -> "PixelSpace":
        """Kernel ``kind``'s pixels for an input of [batch, ., height, width] and an output of out_height x
        out_width."""
        if kind == "grad_input":
            return PixelSpace(batch * height, width, batch)
        return PixelSpace(batch * out_height, out_width, batch)

    @property
    def height(self) -> int:
        """The image's rows."""
        return self.rows // max(self.batch, 1)

    @property
    def pixels(self) -> int:
        """rows x width: the flattened (batch, row, column) index's range."""
        return self.rows * self.width

    def tiles(self, block: int, phases: tuple[int, int] = (1, 1)) -> int:
        """Tiles of ``block`` pixels, one phase of the stride a tile where ``phases`` (rows, columns) is not
        (1, 1) (KernelDesc.phases): each phase's pixels are every rows-th row and every columns-th column."""
        rows, columns = phases
        if rows * columns == 1:
            return cdiv(self.pixels, block)
        return rows * columns * cdiv(self.batch * cdiv(self.height, rows) * cdiv(self.width, columns), block)


NUM_WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8


def pow2_between(value: int, low: int, high: int) -> int:
    """The power of two nearest above ``value``, clamped to [low, high]: a tile side."""
    return max(low, min(high, 1 << max(0, value - 1).bit_length()))


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: tiles covering an extent."""
    return -(-a // b)


def in_bounds(starts, offset: int, length: int, limit: int) -> int:
    """The positions of [start + offset, start + offset + length) inside [0, limit), summed over ``starts``: what
    a tile at each start reads where its bounds mask stops it (a masked lane requests nothing)."""
    return sum(max(0, min(start + offset + length, limit) - max(start + offset, 0)) for start in starts)
