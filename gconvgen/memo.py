"""One reset for every memo: each cache in gconvgen registers itself here, so a test (or a process that
changes what a memo's answers depend on: the cache directory, a patched planner) calls ``reset()`` once
instead of reaching for each ``cache_clear``. Nothing here holds state of its own but the list of clears.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

Function = TypeVar("Function", bound=Callable)
_CLEARS: list[Callable[[], object]] = []


def memoized(maxsize: Optional[int] = None) -> Callable[[Function], Function]:
    """``functools.lru_cache(maxsize)`` (unbounded for None), registered with ``reset``."""
    def decorate(function: Function) -> Function:
        cached = functools.lru_cache(maxsize=maxsize)(function)
        _CLEARS.append(cached.cache_clear)
        return cached  # type: ignore[return-value]
    return decorate


def registered(clear: Callable[[], object]) -> Callable[[], object]:
    """Register ``clear`` (a memo dict's ``clear``, or a function that empties a memo) with ``reset``."""
    _CLEARS.append(clear)
    return clear


def reset() -> None:
    """Empty every registered memo: the next call plans, lowers, loads and looks up everything again."""
    for clear in _CLEARS:
        clear()
