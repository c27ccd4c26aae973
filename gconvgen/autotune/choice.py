"""The tuning database's choice for each call: what kernel family and config (or aten) an op runs.

An untuned key runs the heuristic default config at once. Only with GCONVGEN_AUTOTUNE=1 is an untuned key
tuned on its first call (and recorded); never silently on the hot path. A key where aten won calls aten.
The ops ask ``choice_for``; ``overridden(provider)`` answers for it inside a block (tests forcing a family,
the model recorder noting every kernel a model would run), with warm calls off there so every call asks.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Iterator, Optional

import torch

from ..memo import memoized, registered
from .. import knobs
from ..ir import ConvSpec
from ..compiler.lowering import DEFAULT, Choice, check_config
from ..compiler.plan import grad_input_offers, planned
from ..runtime import warm
from ..runtime.device import allows_tf32, device_target
from .database import database, key_of
from .space import Problem
from .tuner import tune

# provider(spec, kind, device, batch, height, width) -> Choice; kind is forward, grad_input or grad_weight
Provider = Callable[[ConvSpec, str, torch.device, int, int, int], Choice]
_log = logging.getLogger("gconvgen")
_override: Optional[Provider] = None
_failed_keys: set[str] = set()  # keys whose first-call tuning failed: not retried in this process (memo.reset)
registered(_failed_keys.clear)


@memoized(4096)
def _key(spec: ConvSpec, target: str, allow_tf32: bool, batch: int, height: int, width: int, kind: str) -> str:
    return key_of(Problem(spec, batch, height, width, kind), target, allow_tf32)


def choice_for(spec: ConvSpec, kind: str, device: torch.device, batch: int, height: int, width: int) -> Choice:
    """The database's choice for kernel ``kind`` of ``spec`` (the forward, or 'grad_input' / 'grad_weight'
    with a bias-free spec) at this input size on ``device``: a tuned config, aten, or DEFAULT.

    A warm call is a few memo lookups, no file I/O. An untuned batch size runs the record of the nearest
    tuned one; with GCONVGEN_AUTOTUNE=1 it is tuned now instead (if tuning fails the default is used and a
    warning says why). A record naming a kernel family the planner does not offer for ``spec`` is ignored
    with a warning. Inside ``overridden(provider)``, the provider's answer.
    """
    if batch == 0:
        return DEFAULT
    if _override is not None:
        return _override(spec, kind, device, batch, height, width)
    return database_choice(spec, kind, device, batch, height, width)


def database_choice(spec: ConvSpec, kind: str, device: torch.device, batch: int, height: int, width: int) -> Choice:
    """``choice_for``'s answer from the tuning database (and first-call tuning), whatever is overridden."""
    key = _key(spec, device_target(device), allows_tf32(device), batch, height, width, kind)
    db = database()
    choice = db.choice(key)
    if key not in _failed_keys and db.lookup(key) is None and knobs.autotune_on_first_call():
        problem = Problem(spec, batch, height, width, kind)
        _log.info("gconvgen: GCONVGEN_AUTOTUNE=1, tuning %s on its first call", problem.describe())
        try:
            db.record({key: tune(problem, device).record()})
        except (RuntimeError, ValueError, OSError) as error:  # no correct candidate, or an unwritable cache
            _failed_keys.add(key)
            warnings.warn(f"gconvgen: GCONVGEN_AUTOTUNE could not tune {key}: {error}; using the default config",
                          stacklevel=3)
        choice = db.choice(key)
    return _usable(key, choice, spec, kind, knobs.padding_budget()) if choice.config is not None else choice


@memoized(4096)
def _usable(key: str, choice: Choice, spec: ConvSpec, kind: str, padding_budget: float) -> Choice:
    """``choice`` when its family computes ``spec``'s kernel ``kind`` and its config is legal for that family;
    else DEFAULT, with a warning (once per key) naming what is wrong with the record."""
    conv_plan = planned(spec, padding_budget)
    if kind == "forward":
        offered = tuple((family, False) for family in conv_plan.families)
    elif kind == "grad_input":
        offered = grad_input_offers(spec, padding_budget)
    else:
        offered = tuple((family, False) for family in conv_plan.grad_weight_families)
    # a record naming no family asks for the planner's default family, or its first grad-input kernel
    family = choice.family or (conv_plan.grad_input_families[0] if kind == "grad_input" else offered[0][0])
    try:
        if (family, choice.transposed) not in offered:
            what = "the transposed conv's forward" if choice.transposed else "this conv"
            raise ValueError(f"family={family!r} does not compute {what} (it can run {list(offered)})")
        check_config(choice.config, family)
    except (TypeError, ValueError) as error:
        warnings.warn(f"gconvgen: ignoring the tuning record for {key!r}: {error}; re-tune it "
                      f"(gconvgen tune --force)", stacklevel=4)
        return DEFAULT
    return choice


@contextlib.contextmanager
def overridden(provider: Provider, every_call: bool = True) -> Iterator[None]:
    """Inside the block ``choice_for`` answers ``provider(spec, kind, device, batch, height, width)`` (batch
    >= 1). With ``every_call`` every call takes the whole path (warm.cold_calls), so the provider sees each
    kernel; without, for a provider whose answer depends on its arguments only, warm calls stay on (launches
    remembered before or after the block are forgotten either way)."""
    global _override
    previous, _override = _override, provider
    warm.forget()
    try:
        with warm.cold_calls() if every_call else contextlib.nullcontext():
            yield
    finally:
        _override = previous
        warm.forget()
