"""The tuning database: which config (or aten) won for each key, persisted as versioned JSON.

The user's database is ``<cache_dir>/tuning/tuning-db-v<schema>.json``; databases shipped in
``tuning/databases/*.json`` are read as defaults under it. Writes take a file lock, re-read the file, merge
and replace it atomically, so concurrent tuners lose nothing. A file that cannot be read is reported and
set aside (renamed), never a crash. Lookups are served from memory after the first read.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import filelock
import triton

from ..memo import memoized
from ..compiler import codegen
from .. import knobs
from ..compiler.lowering import ATEN, DEFAULT, FAMILIES, KERNEL, TEMPLATES, Choice, KernelConfig, check_config
from ..compiler.plan import grad_input_offers, planned
from ..resources import data_dir
from ..runtime import warm
from ..runtime.cache import make_private_dirs, write_atomic
from .space import Problem

DB_SCHEMA_VERSION = 2
MAX_DATABASE_BYTES = 64 * 1024 * 1024  # a larger file is not a tuning database: it is not read


@memoized(4096)
def key_of(problem: Problem, target: str, allow_tf32: bool) -> str:
    """The one key a tuning result is stored under, built from the problem's fields. A result is invalid
    when any of these changes:

    - the device: ``target`` is the GPU's name and compute capability (or 'interpreter');
    - which kernel: the forward conv, or the backward kernel grad_input / grad_weight;
    - the Triton version, and the template sources of every kernel tuning compared (what the planner offers
      for that kernel: plan.families, plan.grad_input_offers, plan.grad_weight_families): they decide the
      generated code, and which kernel wins;
    - the dtype, and for float32 whether TF32 is allowed (a different tl.dot);
    - the conv (``ConvSpec.name``: channels, groups, kernel, stride, padding, dilation, layout, dtype, bias),
      the batch size and the input's height and width, and the channel policy.

    It reads like ``NVIDIA H200 sm_90|triton 3.6.0|t=...|forward_ci128_..._nhwc_bfloat16|n64_h56_w56|strict``.
    The batch size alone is soft: an untuned key runs the record of the same layer at the nearest tuned
    batch size (TuningDatabase.lookup_nearest).
    """
    spec, kind = problem.spec, problem.kind
    budget = knobs.padding_budget()
    conv_plan = planned(spec, budget)
    if kind == "forward":
        offered = [("forward", family) for family in conv_plan.families]
    elif kind == "grad_input":
        offered = [("forward" if transposed else kind, family) for family, transposed in grad_input_offers(spec, budget)]
    else:
        offered = [(kind, family) for family in conv_plan.grad_weight_families]
    templates = tuple(TEMPLATES[each] for each in offered)
    tf32 = ["tf32"] if allow_tf32 and spec.dtype == "float32" else []
    parts = [target, f"triton {triton.__version__}", f"t={codegen.templates_hash(templates)[:12]}",
             "_".join([kind, spec.name, *tf32]), f"n{problem.batch}_h{problem.height}_w{problem.width}",
             spec.channel_policy]
    return "|".join(parts)


def _without_batch(key: str) -> tuple[str, int]:
    """(the key with its batch size left out, the batch size): keys of one layer at other batch sizes share
    the first. A key not of key_of's form gives (key, 0)."""
    parts = key.split("|")
    batch, _, sizes = parts[4].partition("_") if len(parts) == 6 else ("", "", "")
    found = re.fullmatch(r"n([0-9]+)", batch)
    if not found or int(found[1]) == 0:
        return key, 0
    return "|".join([*parts[:4], sizes, *parts[5:]]), int(found[1])


def choice_of(record: dict, family: Optional[str] = None) -> Choice:
    """The Choice a database record asks for; raises ValueError for a malformed record, or one whose config
    is not legal for its kernel family (``family``: the family the record is for when it names none, e.g.
    a backward kernel's; the record is checked against it)."""
    if not isinstance(record, dict):
        raise ValueError(f"record {record!r} is not an object")
    if record.get("choice") == ATEN:
        return Choice(ATEN)
    if record.get("choice") != KERNEL:
        raise ValueError(f"record's choice={record.get('choice')!r}; expected {KERNEL!r} or {ATEN!r}")
    named = record.get("family")
    if named is not None and named not in FAMILIES:
        raise ValueError(f"record's family={named!r} is not a kernel family; known: {list(FAMILIES)}")
    config = record.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"record's config {config!r} is not an object")
    try:
        config = KernelConfig(**config)
    except TypeError as error:
        raise ValueError(f"record's config {record.get('config')!r} is not a KernelConfig: {error}") from None
    if named or family:
        check_config(config, named or family)
    transposed = record.get("transposed", False)
    if not isinstance(transposed, bool) or (transposed and named is None):
        raise ValueError(f"record's transposed={transposed!r} must be true (with a family) or false")
    return Choice(KERNEL, config, named, transposed)


def kernel_record(config: KernelConfig, family: Optional[str] = None, transposed: bool = False) -> dict:
    """The choice part of a record for a winning kernel config of ``family`` (None: the planner's default);
    ``transposed``: a grad-input computed by that family's forward kernel of the transposed conv."""
    record = {"choice": KERNEL, "config": asdict(config)}
    record = record if family is None else {**record, "family": family}
    return {**record, "transposed": True} if transposed else record


def shipped_database_paths() -> list[Path]:
    """Databases shipped with gconvgen (tuning/databases/*.json), read as defaults."""
    return sorted((data_dir("tuning") / "databases").glob("*.json"))


def _parse(text: str) -> dict:
    """The entries of a database file's text; raises ValueError saying what is wrong with it."""
    if len(text) > MAX_DATABASE_BYTES:
        raise ValueError(f"{len(text)} bytes, over the {MAX_DATABASE_BYTES} a tuning database may have")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError("nested too deeply to be a tuning database") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError("not a gconvgen tuning database (no 'entries' object)")
    if data.get("schema_version") != DB_SCHEMA_VERSION:
        raise ValueError(f"schema_version={data.get('schema_version')!r}, this gconvgen reads {DB_SCHEMA_VERSION}")
    bad = [key for key, record in data["entries"].items() if not isinstance(record, dict)]
    if bad:
        raise ValueError(f"entry {bad[0]!r} is not an object")
    return data["entries"]


def _serialise(entries: dict) -> str:
    body = {"schema_version": DB_SCHEMA_VERSION, "gconvgen": codegen.gconvgen_version(), "entries": entries}
    return json.dumps(body, indent=1, sort_keys=True) + "\n"


class TuningDatabase:
    """The user's database at ``path`` over the shipped ones; one instance per path in a process."""

    def __init__(self, path: Path, shipped: Optional[list[Path]] = None):
        self.path = Path(path)
        self.shipped = shipped_database_paths() if shipped is None else list(shipped)
        self._entries: Optional[dict] = None   # shipped defaults overlaid with the user's file
        self._choices: dict[str, Choice] = {}
        self._mutex = threading.Lock()
        self.set_aside: list[Path] = []        # corrupt files this instance renamed

    # ------------------------------------------------------------------------------------------ reading
    def _read_user(self, *, locked: bool, to_write: bool = False) -> dict:
        """The user file's entries. Writers replace the file atomically, so reading needs no lock; a file that
        does not parse is read again under the lock (it may just have been replaced) and then set aside.
        A file this user may not read is skipped with a warning; ``to_write`` refuses it instead (PermissionError),
        so that a write never replaces records it could not read."""
        try:
            return _parse(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # no file, or GCONVGEN_CACHE_DIR is a file: no records
            return {}
        except PermissionError as error:  # another user's file: not ours to move; skip it
            if to_write:
                raise PermissionError(f"gconvgen: the tuning database {self.path} cannot be read ({error}), so it is "
                                      f"not rewritten; point GCONVGEN_CACHE_DIR at a folder of your own") from None
            warnings.warn(f"gconvgen: the tuning database {self.path} cannot be read ({error}); running without "
                          f"it (point GCONVGEN_CACHE_DIR at a folder of your own)", stacklevel=4)
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as error:
            if not locked:
                with self._lock():
                    return self._read_user(locked=True)
            return self._set_aside(str(error))

    def _set_aside(self, why: str) -> dict:
        """Rename the unusable user file out of the way and say so; tuning goes on from an empty database."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-pid{os.getpid()}")
        try:
            self.path.rename(aside)
        except FileNotFoundError:  # another process set it aside first
            return {}
        except OSError as error:
            warnings.warn(f"gconvgen: the tuning database {self.path} cannot be read ({why}) nor set aside "
                          f"({error}); ignoring it", stacklevel=4)
            return {}
        self.set_aside.append(aside)
        warnings.warn(f"gconvgen: the tuning database {self.path} cannot be read ({why}); it was set aside as "
                      f"{aside.name} and tuning continues from an empty database (re-run `gconvgen tune` to "
                      f"refill it)", stacklevel=4)
        return {}

    def _shipped_entries(self) -> dict:
        entries: dict = {}
        for path in self.shipped:
            try:
                entries.update(_parse(path.read_text()))
            except (OSError, UnicodeDecodeError, ValueError) as error:  # package data: report, never rename
                warnings.warn(f"gconvgen: ignoring the shipped tuning database {path}: {error}", stacklevel=3)
        return entries

    def _lock(self) -> filelock.FileLock:
        make_private_dirs(self.path.parent)
        return filelock.FileLock(str(self.path) + ".lock")

    def entries(self) -> dict:
        """Every record by key: the shipped defaults overlaid with the user's results (read once)."""
        with self._mutex:
            if self._entries is None:
                self._entries = {**self._shipped_entries(), **self._read_user(locked=False)}
            return self._entries

    def lookup(self, key: str) -> Optional[dict]:
        """The record stored under ``key``, or None when it is untuned."""
        return self.entries().get(key)

    def lookup_nearest(self, key: str) -> Optional[dict]:
        """The record of ``key``, else of the same layer tuned at the nearest batch size (a config is correct
        at any batch size, and the best one rarely changes with it), else None."""
        record = self.lookup(key)
        if record is not None:
            return record
        layer, batch = _without_batch(key)
        tuned = [(abs(math.log(other / batch)), -other, other_key) for other_key in self.entries()
                 for other_layer, other in [_without_batch(other_key)] if batch and other and other_layer == layer]
        return self.entries()[min(tuned)[2]] if tuned else None

    def choice(self, key: str) -> Choice:
        """What to run for ``key`` (see lookup_nearest), memoised: a warm lookup is one dict access, no file I/O."""
        found = self._choices.get(key)
        if found is not None:
            return found
        record = self.lookup_nearest(key)
        try:
            found = DEFAULT if record is None else choice_of(record)
        except ValueError as error:
            warnings.warn(f"gconvgen: ignoring the tuning record for {key!r}: {error}", stacklevel=2)
            found = DEFAULT
        self._choices[key] = found
        return found

    # ------------------------------------------------------------------------------------------ writing
    def record(self, new_entries: dict[str, dict]) -> None:
        """Store records by key: lock, re-read the file (another process may have added keys), merge, replace."""
        for key, record in new_entries.items():
            choice_of(record)  # refuse to write a record the runtime could not read back
        with self._lock():
            user = self._read_user(locked=True, to_write=True)
            user.update(new_entries)
            write_atomic(self.path, _serialise(user))
        with self._mutex:
            if self._entries is not None:
                self._entries.update(new_entries)
            self._choices = {}  # a new record may be the nearest batch size of other keys
        warm.forget()  # a remembered launch may run a choice this changes

    def export(self, path: Path) -> int:
        """Write the user's records to ``path`` as a database gconvgen can ship in tuning/databases/;
        returns how many records it holds."""
        user = self._read_user(locked=False)
        write_atomic(Path(path), _serialise(user))
        return len(user)

    def clear(self) -> int:
        """Delete the user's results (shipped defaults stay); returns how many records were removed."""
        with self._lock():
            removed = len(self._read_user(locked=True, to_write=True))
            self.path.unlink(missing_ok=True)
        with self._mutex:
            self._entries, self._choices = None, {}
        warm.forget()  # a remembered launch may run a choice this changes
        return removed

    def describe(self) -> dict:
        """Path, size and record counts, for ``gconvgen cache info``."""
        user = self._read_user(locked=False)
        return {
            "path": str(self.path),
            "bytes": self.path.stat().st_size if self.path.exists() else 0,
            "records": len(user),
            "aten_records": sum(1 for record in user.values() if record.get("choice") == ATEN),
            "shipped": {str(path): len(self._parse_quietly(path)) for path in self.shipped},
        }

    @staticmethod
    def _parse_quietly(path: Path) -> dict:
        try:
            return _parse(path.read_text())
        except (OSError, ValueError):
            return {}


@memoized(8)
def _database_in(cache_dir: Path) -> TuningDatabase:
    return TuningDatabase(cache_dir / "tuning" / f"tuning-db-v{DB_SCHEMA_VERSION}.json")


def database() -> TuningDatabase:
    """The process's database for the current cache directory (one instance per directory)."""
    return _database_in(knobs.cache_dir())
