"""Every setting gconvgen reads from the environment, in one place.

Each knob is read when asked for (not at import), typed, and documented here. Tests scope a change
with ``knobs.scoped(FALLBACK="error")`` instead of touching ``os.environ``.

    GCONVGEN_CACHE_DIR       where rendered kernels and tuning results live
                             (else $XDG_CACHE_HOME/gconvgen, else ~/.cache/gconvgen); folders gconvgen
                             creates there are 0700. Kernel files are a readable copy, never trusted: what
                             runs is always rendered again. A folder that cannot be written (read-only, or a
                             file) is warned about once and kernels run from a private temporary folder
    GCONVGEN_FALLBACK        "warn" (default): CPU tensors without TRITON_INTERPRET run an exact aten
                             fallback and say so once; "error": every fallback raises instead
    GCONVGEN_PADDING_BUDGET  extra work channel padding may add before a plan is refused (default 0.5)
    GCONVGEN_DEBUG_PLAN      "1": verify the pass graph after every planner pass
    GCONVGEN_AUTOTUNE        "1": tune an untuned layer on its first call (never otherwise)
    TRITON_INTERPRET         Triton's own switch: "1" runs kernels on CPU tensors through the interpreter;
                             Triton reads it when it is imported, so set it before importing gconvgen
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass(frozen=True)
class _Knob:
    env: str
    default: str
    parse: Callable[[str], object]
    doc: str

    def get(self) -> object:
        raw = os.environ.get(self.env) or self.default
        return _parse(self, raw) if raw else self.parse(raw)  # an empty value may depend on other variables


@functools.lru_cache(maxsize=256)
def _parse(knob: _Knob, raw: str) -> object:
    """Parsed once per distinct value: knobs are read on every call, so reading one costs a dict lookup."""
    return knob.parse(raw)


def _flag(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _fallback_mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in ("warn", "error"):
        raise ValueError(f"GCONVGEN_FALLBACK={raw!r} is not a fallback mode; use 'warn' or 'error'")
    return mode


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"GCONVGEN_PADDING_BUDGET={raw!r} is not a number; use e.g. 0.5 for 50% extra work") from None
    if value < 0:
        raise ValueError(f"GCONVGEN_PADDING_BUDGET={raw!r} is negative; use a fraction >= 0, e.g. 0.5")
    return value


def _cache_dir(raw: str) -> Path:
    """GCONVGEN_CACHE_DIR, else $XDG_CACHE_HOME/gconvgen, else ~/.cache/gconvgen."""
    return _cache_dir_from(raw, os.environ.get("XDG_CACHE_HOME", ""), os.environ.get("HOME", ""))


@functools.lru_cache(maxsize=64)
def _cache_dir_from(raw: str, xdg: str, home: str) -> Path:
    if raw:
        return Path(raw).expanduser()
    return (Path(xdg) if xdg else Path(home or Path.home()) / ".cache") / "gconvgen"


_KNOBS = {
    "CACHE_DIR": _Knob("GCONVGEN_CACHE_DIR", "", _cache_dir,
                       "cache directory for rendered kernels and tuning results"),
    "FALLBACK": _Knob("GCONVGEN_FALLBACK", "warn", _fallback_mode, "'warn' or 'error' on an aten fallback"),
    "PADDING_BUDGET": _Knob("GCONVGEN_PADDING_BUDGET", "0.5", _fraction, "max extra work from channel padding"),
    "DEBUG_PLAN": _Knob("GCONVGEN_DEBUG_PLAN", "0", _flag, "verify the pass graph after every pass"),
    "AUTOTUNE": _Knob("GCONVGEN_AUTOTUNE", "0", _flag, "tune untuned layers on first call"),
    "INTERPRET": _Knob("TRITON_INTERPRET", "0", _flag, "Triton's interpreter for CPU tensors"),
}


# what a warm call's memo depends on: every knob, and what the cache directory falls back to
_FINGERPRINTED = tuple(knob.env for knob in _KNOBS.values()) + ("XDG_CACHE_HOME", "HOME")
_ENCODED = tuple(map(os.environ.encodekey, _FINGERPRINTED))


def fingerprint() -> tuple:
    """The raw values of every knob (and of what the cache directory falls back to), for memo keys: equal
    fingerprints mean equal knobs. It reads the environment's own mapping (``os.environ._data``, which
    ``os.environ``'s writes update) because ``os.environ.get`` costs a microsecond a variable."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # an os.environ replaced by a plain mapping
        return tuple(map(os.environ.get, _FINGERPRINTED))
    return tuple(map(data.get, _ENCODED))


def cache_dir() -> Path:
    """Where rendered kernels and tuning results live (GCONVGEN_CACHE_DIR, XDG_CACHE_HOME, ~/.cache)."""
    return _KNOBS["CACHE_DIR"].get()


def fallback_mode() -> str:
    """'warn' or 'error': what an aten fallback does (GCONVGEN_FALLBACK)."""
    return _KNOBS["FALLBACK"].get()


def padding_budget() -> float:
    """Extra work channel padding may cost, as a fraction (GCONVGEN_PADDING_BUDGET)."""
    return _KNOBS["PADDING_BUDGET"].get()


def debug_plan() -> bool:
    """Whether the planner verifies its graph after every pass (GCONVGEN_DEBUG_PLAN)."""
    return _KNOBS["DEBUG_PLAN"].get()


def autotune_on_first_call() -> bool:
    """Whether an untuned layer is tuned on its first call (GCONVGEN_AUTOTUNE)."""
    return _KNOBS["AUTOTUNE"].get()


def interpret() -> bool:
    """Whether CPU tensors run the kernels through Triton's interpreter (TRITON_INTERPRET)."""
    return _KNOBS["INTERPRET"].get()


@contextlib.contextmanager
def scoped(**settings: object) -> Iterator[None]:
    """Temporarily set knobs by name, e.g. ``scoped(FALLBACK="error", CACHE_DIR=tmp_path)``."""
    saved = {}
    try:
        for name, value in settings.items():
            if name not in _KNOBS:
                raise KeyError(f"unknown knob {name!r}; known: {sorted(_KNOBS)}")
            env = _KNOBS[name].env
            saved[env] = os.environ.get(env)
            os.environ[env] = str(value)
        yield
    finally:
        for env, old in saved.items():
            if old is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = old
