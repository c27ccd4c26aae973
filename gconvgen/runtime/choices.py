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
from ..lowering import DEFAULT, Choice

# provider(spec, kind, device, batch, height, width) -> Choice; kind is forward, grad_input or grad_weight
Provider = Callable[[ConvSpec, str, torch.device, int, int, int], Choice]
_provider: Optional[Provider] = None


def set_provider(provider: Optional[Provider]) -> Optional[Provider]:
    """Install ``provider`` (None: defaults only); returns the one it replaces."""
    global _provider
    previous, _provider = _provider, provider
    return previous


def choice_for(spec: ConvSpec, kind: str, device: torch.device, batch: int, height: int, width: int) -> Choice:
    """The installed provider's choice for kernel ``kind`` of ``spec`` at this input size, else DEFAULT."""
    if _provider is None or batch == 0:
        return DEFAULT
    return _provider(spec, kind, device, batch, height, width)
