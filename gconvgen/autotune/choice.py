"""The tuning database's choice for each call, installed as the runtime's choice provider.

An untuned key runs the heuristic default config at once. Only with GCONVGEN_AUTOTUNE=1 is an untuned key
tuned on its first call (and recorded); never silently on the hot path. A key where aten won calls aten.
Importing this module installs ``choice_for`` into gconvgen.runtime.choices (``import gconvgen`` does).
"""
from __future__ import annotations

import logging
import warnings

import torch

from ..memo import memoized
from .. import knobs
from ..ir import ConvSpec
from ..compiler.lowering import DEFAULT, Choice, check_config
from ..compiler.plan import planned
from ..runtime import choices
from ..runtime.device import allows_tf32, device_target
from .database import database, key_of
from .space import Problem
from .tuner import tune

_log = logging.getLogger("gconvgen")
_failed_keys: set[str] = set()  # keys whose first-call tuning failed: not retried in this process


@memoized(4096)
def _key(spec: ConvSpec, target: str, allow_tf32: bool, batch: int, height: int, width: int, kind: str) -> str:
    return key_of(Problem(spec, batch, height, width, kind), target, allow_tf32)


def choice_for(spec: ConvSpec, kind: str, device: torch.device, batch: int, height: int, width: int) -> Choice:
    """The database's choice for kernel ``kind`` of ``spec`` (the forward, or 'grad_input' / 'grad_weight'
    with a bias-free spec) at this input size on ``device``: a tuned config, aten, or DEFAULT.

    A warm call is a few memo lookups, no file I/O. An untuned batch size runs the record of the nearest
    tuned one; with GCONVGEN_AUTOTUNE=1 it is tuned now instead (if tuning fails the default is used and a
    warning says why). A record naming a kernel family the planner does not offer for ``spec`` is ignored
    with a warning.
    """
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
    offered = conv_plan.families if kind == "forward" else (conv_plan.backward_family,)
    family = choice.family or offered[0]
    try:
        if family not in offered:
            raise ValueError(f"family={family!r} does not compute this conv (it can run {list(offered)})")
        check_config(choice.config, family)
    except (TypeError, ValueError) as error:
        warnings.warn(f"gconvgen: ignoring the tuning record for {key!r}: {error}; re-tune it "
                      f"(gconvgen tune --force)", stacklevel=4)
        return DEFAULT
    return choice


choices.set_provider(choice_for)
