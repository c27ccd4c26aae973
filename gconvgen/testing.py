"""For tests of code that uses gconvgen: ``reset()`` forgets every memo (plans, lowerings, loaded kernels,
remembered launches, tuning lookups), so the next call plans, lowers, loads and looks up everything again,
as after changing the cache directory or patching the planner."""
from __future__ import annotations

from .memo import reset

__all__ = ["reset"]
