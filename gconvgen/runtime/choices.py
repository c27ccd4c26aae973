"""Where the runtime gets its tuning choice: a provider that the layer above installs.

The runtime runs what it is told: a kernel config of a family, aten, or the planner's default. It never
reads the tuner. ``gconvgen.autotune.choice`` installs the tuning database's lookup (and first-call tuning
under GCONVGEN_AUTOTUNE=1) as the provider when it is imported, which ``import gconvgen`` does; without
one every call runs the default.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ir import ConvSpec
from ..compiler.lowering import DEFAULT, Choice

# provider(spec, kind, device, batch, height, width) -> Choice; kind is forward, grad_input or grad_weight
Provider = Callable[[ConvSpec, str, torch.device, int, int, int], Choice]
_provider: Optional[Provider] = None
_generation = 0  # advances whenever a choice may change: memos of past choices compare it


def set_provider(provider: Optional[Provider]) -> Optional[Provider]:
    """Install ``provider`` (None: defaults only); returns the one it replaces."""
    global _provider
    previous, _provider = _provider, provider
    changed()
    return previous


def changed() -> None:
    """Say that the provider's answers may have changed (a tuning record written or removed)."""
    global _generation
    _generation += 1


def generation() -> int:
    """A number that differs whenever a choice given before may differ now."""
    return _generation


def choice_for(spec: ConvSpec, kind: str, device: torch.device, batch: int, height: int, width: int) -> Choice:
    """The installed provider's choice for kernel ``kind`` of ``spec`` at this input size, else DEFAULT."""
    if _provider is None or batch == 0:
        return DEFAULT
    return _provider(spec, kind, device, batch, height, width)
