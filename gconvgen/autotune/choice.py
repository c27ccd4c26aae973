"""What one call runs: the tuning database's choice for its key, looked up once per process.

An untuned key runs the heuristic default config at once. Only with GCONVGEN_AUTOTUNE=1 is an untuned key
tuned on its first call (and recorded); never silently on the hot path. A key where aten won calls aten.
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Optional

import torch

from .. import knobs
from ..ir import ConvSpec
from ..runtime.fallback import aten_conv2d
from ..runtime.kernels import compiled_for, device_target, planned
from .database import ATEN, DEFAULT, Choice, database, key_of
from .space import Problem
from .tuner import allows_tf32, tune

_log = logging.getLogger("gconvgen")
_failed_keys: set[str] = set()  # keys whose first-call tuning failed: not retried in this process


@functools.lru_cache(maxsize=4096)
def _key(spec: ConvSpec, target: str, allow_tf32: bool, batch: int, height: int, width: int, kind: str) -> str:
    return key_of(Problem(spec, batch, height, width, kind), target, allow_tf32)


def choice_for(spec: ConvSpec, device: torch.device, batch: int, height: int, width: int,
               kind: str = "forward") -> Choice:
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
    if knobs.autotune_on_first_call() and key not in _failed_keys and db.lookup(key) is None:
        problem = Problem(spec, batch, height, width, kind)
        _log.info("gconvgen: GCONVGEN_AUTOTUNE=1, tuning %s on its first call", problem.describe())
        try:
            db.record({key: tune(problem, device).record()})
        except (RuntimeError, ValueError, OSError) as error:  # no correct candidate, or an unwritable cache
            _failed_keys.add(key)
            warnings.warn(f"gconvgen: GCONVGEN_AUTOTUNE could not tune {key}: {error}; using the default config",
                          stacklevel=3)
        choice = db.choice(key)
    if choice.family is not None and choice.family not in planned(spec, knobs.padding_budget()).families:
        warnings.warn(f"gconvgen: ignoring the tuning record for {key!r}: family={choice.family!r} does not "
                      f"compute this conv; re-tune it (gconvgen tune --force)", stacklevel=3)
        return DEFAULT
    return choice


def launch_chosen(spec: ConvSpec, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  out: torch.Tensor) -> torch.Tensor:
    """Run ``spec`` on NCHW-indexed x [N, C_in, H, W] and weight [C_out, ci, kh, kw] as the database says:
    the tuned (or the planner's default) kernel family and config into ``out``, or aten where aten won.
    Returns the output, in ``out``'s memory format."""
    if out.numel() == 0:  # an empty batch: nothing to choose or compute
        return out
    choice = choice_for(spec, x.device, x.shape[0], x.shape[2], x.shape[3])
    if choice.kind == ATEN:
        result = aten_conv2d(spec, x, weight, bias)
        return result if result.stride() == out.stride() else out.copy_(result)
    return compiled_for(spec, x.device, choice.family).launch(x, weight, bias, out, choice.config)
