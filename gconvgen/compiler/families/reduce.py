"""The bias-gradient reduction (templates/grad_bias.py.jinja): grad_output summed over batch and space."""
from __future__ import annotations

from typing import Optional

from ...ir import ConvSpec
from ..tiles import KernelConfig, PixelSpace, cdiv
from .base import Family


class Reduce(Family):
    name = "reduce"
    templates = {"grad_bias": "grad_bias.py.jinja"}
    limits = {"block_m": (1, 1024), "block_n": (1, 1024), "block_k": (0, 0)}

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """(pixels a step, channels)."""
        return KernelConfig(256 if interpret else 64, 64 if interpret else 32, 0, num_stages=1 if interpret else 2)

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        return (cdiv(channels, config.block_n), splits)
