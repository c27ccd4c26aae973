"""The memo of warm calls: what a call launched, kept under a key of everything that decided it.

An op runs its whole path inside ``recording()``, which collects every launch ``launch.run`` makes
(``note``); ``launch.remember`` keeps the one it made (``keep``) and the next call with that key runs it again
(``recorded``). Keys are the ops' (gconvgen/ops/dispatch.py ``warm_key``); what is kept is a
``launch.Warm``, which holds no tensor of the call that made it.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

from ..memo import registered

_LIMIT = 4096
_KEPT: dict[tuple, object] = {}
_recordings = threading.local()  # the list a ``recording`` block collects launches into, per thread
_enabled = True


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect the launches run inside the block (on this thread) into the list it yields; an enclosing
    block receives them too."""
    outer = getattr(_recordings, "launches", None)
    _recordings.launches = launched = []
    try:
        yield launched
    finally:
        _recordings.launches = outer
        if outer is not None:
            outer.extend(launched)


def is_recording() -> bool:
    return getattr(_recordings, "launches", None) is not None


def note(launched: object) -> None:
    """Add a launch just run to the innermost recording on this thread, if any."""
    launches = getattr(_recordings, "launches", None)
    if launches is not None:
        launches.append(launched)


def enabled() -> bool:
    """Whether calls may be remembered now (not inside ``cold_calls``)."""
    return _enabled


def keep(key: tuple, warm: object) -> None:
    if len(_KEPT) >= _LIMIT:
        _KEPT.clear()
    _KEPT[key] = warm


def recorded(key: Optional[tuple]):
    """What is kept under ``key`` (a ``launch.Warm``), or None."""
    return None if key is None else _KEPT.get(key)


@registered
def forget() -> None:
    """Forget every remembered launch: what decided them may have changed (a tuning record, a choice override)."""
    _KEPT.clear()


@contextlib.contextmanager
def cold_calls() -> Iterator[None]:
    """Inside the block every call takes the whole path (checks, plan, choice, lowering) and nothing is
    remembered: for a choice override that must see every call."""
    global _enabled
    previous, _enabled = _enabled, False
    forget()
    try:
        yield
    finally:
        _enabled = previous
        forget()
