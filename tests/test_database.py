"""The tuning database: one key_of, versioned JSON, corrupt files set aside, concurrent writers, shipped defaults."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gconvgen.autotune.database import (ATEN, DB_SCHEMA_VERSION, DEFAULT, TuningDatabase, kernel_record,
                                        key_of)
from gconvgen.autotune.space import Problem
from gconvgen.ir import ConvSpec
from gconvgen.compiler.lowering import FAMILIES, KernelConfig

BASE = Problem(ConvSpec(16, 16, 4, (3, 3), (1, 1), (1, 1, 1, 1), dtype="float32"), 2, 8, 8)
CONFIG = KernelConfig(block_m=64, block_n=16, block_k=16, num_warps=4, num_stages=1)
P = pytest.param


def _spec(**changes):
    return Problem(dataclasses.replace(BASE.spec, **changes), BASE.batch, BASE.height, BASE.width)


KEY_VARIANTS = [
    # (problem, target, allow_tf32)
    (BASE, "NVIDIA H200 sm_90", False),                        # device
    (BASE, "NVIDIA H100 80GB HBM3 sm_90", False),              # same capability, other GPU
    (BASE, "NVIDIA H200 sm_90", True),                         # float32 with TF32
    (_spec(dtype="bfloat16"), "interpreter", False),           # dtype
    (_spec(layout="nhwc"), "interpreter", False),              # layout
    (_spec(layout="strided"), "interpreter", False),           # strided layout
    (Problem(BASE.spec, 3, 8, 8), "interpreter", False),       # batch
    (Problem(BASE.spec, 2, 9, 8), "interpreter", False),       # height
    (Problem(BASE.spec, 2, 8, 9), "interpreter", False),       # width
    (_spec(stride=(2, 2)), "interpreter", False),              # stride
    (_spec(padding=(1, 0, 1, 1)), "interpreter", False),       # one padding side
    (_spec(dilation=(2, 2)), "interpreter", False),            # dilation
    (_spec(groups=8), "interpreter", False),                   # groups
    (_spec(groups=16), "interpreter", False),                  # depthwise family
    (_spec(bias=True), "interpreter", False),                  # bias
    (_spec(kernel_size=(5, 5), padding=(2, 2, 2, 2)), "interpreter", False),  # kernel size
    (_spec(out_channels=32), "interpreter", False),            # channel multiplier 2
    (_spec(channel_policy="pad"), "interpreter", False),       # policy, channels divisible
    (_spec(in_channels=14, channel_policy="pad"), "interpreter", False),  # policy with input-channel masks
    (Problem(BASE.spec, 2, 8, 8, "grad_input"), "interpreter", False),    # the grad-input kernel
    (Problem(BASE.spec, 2, 8, 8, "grad_weight"), "interpreter", False),   # the grad-weight kernel
]


def test_key_of_changes_with_everything_that_invalidates_a_result():
    keys = [key_of(problem, target, tf32) for problem, target, tf32 in KEY_VARIANTS]
    keys.append(key_of(BASE, "interpreter", False))
    assert len(set(keys)) == len(keys), [k for k in keys if keys.count(k) > 1]
    assert key_of(BASE, "interpreter", False) == key_of(_spec(), "interpreter", False)  # equal problems, equal keys
    assert "triton" in keys[0] and "n2_h8_w8" in keys[0]
    # tuning compares kernel families, so the key names none: the record says which family won
    assert not [key for key in keys for family in FAMILIES if family in key]


def test_an_untuned_batch_size_runs_the_nearest_tuned_one(tmp_path):
    db = TuningDatabase(tmp_path / "db.json", shipped=[])
    at = {batch: key_of(Problem(BASE.spec, batch, 8, 8), "interpreter", False) for batch in (1, 2, 3, 8, 32, 64)}
    other_layer = key_of(Problem(BASE.spec, 4, 9, 8), "interpreter", False)  # another height: never borrowed
    db.record({at[2]: kernel_record(CONFIG), at[64]: {"choice": ATEN}, other_layer: kernel_record(CONFIG),
               "not|a|key": {"choice": ATEN}})
    assert db.choice(at[1]).config == CONFIG and db.choice(at[3]).config == CONFIG  # 2 is nearest
    assert db.choice(at[8]).config == CONFIG  # 4x from 2, 8x from 64: nearness is by ratio
    assert db.choice(at[32]).kind == ATEN     # 2x from 64
    assert db.lookup(at[3]) is None  # `tune` still sees batch 3 as untuned
    assert db.choice(key_of(_spec(bias=True), "interpreter", False)) is DEFAULT  # no layer like it


def test_records_round_trip_through_versioned_json(tmp_path):
    path = tmp_path / "db.json"
    db = TuningDatabase(path, shipped=[])
    db.record({"a": {**kernel_record(CONFIG), "time_ms": 1.5}, "b": {"choice": ATEN, "time_ms": 2.0}})
    data = json.loads(path.read_text())
    assert data["schema_version"] == DB_SCHEMA_VERSION and set(data["entries"]) == {"a", "b"}
    again = TuningDatabase(path, shipped=[])
    assert again.choice("a").config == CONFIG and again.choice("b").kind == ATEN and again.choice("c") is DEFAULT
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],                                  # truncated mid-write by a crash
    lambda text: "",                                                      # empty file
    lambda text: text.replace(f'"schema_version": {DB_SCHEMA_VERSION}', '"schema_version": 99'),  # other schema
    lambda text: f'{{"schema_version": {DB_SCHEMA_VERSION}, "entries": {{"a": 3}}}}',  # a record, not an object
])
def test_a_corrupt_file_is_reported_and_set_aside(tmp_path, damage):
    path = tmp_path / "db.json"
    TuningDatabase(path, shipped=[]).record({"a": {**kernel_record(CONFIG), "time_ms": 1.0}})
    path.write_text(damage(path.read_text()))
    db = TuningDatabase(path, shipped=[])
    with pytest.warns(UserWarning, match="set aside as db.json.corrupt-"):
        assert db.choice("a") is DEFAULT
    assert not path.exists() and len(db.set_aside) == 1 and db.set_aside[0].exists()
    db.record({"b": {"choice": ATEN}})  # and tuning carries on
    assert TuningDatabase(path, shipped=[]).choice("b").kind == ATEN


@pytest.mark.parametrize("text", [
    P("[" * 100_000, id="deep-array"),
    P('{"entries": ' * 100_000, id="deep-object"),
])
def test_a_deeply_nested_file_is_set_aside_not_a_recursion_error(tmp_path, text):
    path = tmp_path / "db.json"
    path.write_text(text)
    db = TuningDatabase(path, shipped=[])
    with pytest.warns(UserWarning, match=r"\(nested too deeply to be a tuning database\); it was set aside"):
        assert db.choice("a") is DEFAULT
    assert not path.exists() and db.set_aside[0].read_text() == text
    shipped = tmp_path / "shipped.json"
    shipped.write_text(text)
    with pytest.warns(UserWarning, match="ignoring the shipped tuning database .*nested too deeply"):
        assert TuningDatabase(tmp_path / "user.json", shipped=[shipped]).choice("a") is DEFAULT
    assert shipped.read_text() == text  # package data is never renamed


def test_an_unreadable_user_file_is_skipped_not_renamed(tmp_path, monkeypatch):
    """Another user's database (the tests run as root, so the permission error is simulated): not ours to
    move; it is skipped with a warning and left where it is."""
    path = tmp_path / "db.json"
    TuningDatabase(path, shipped=[]).record({"a": kernel_record(CONFIG)})
    text = path.read_text()
    read_text = Path.read_text

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    db = TuningDatabase(path, shipped=[])
    with pytest.warns(UserWarning, match=r"tuning database .*db\.json cannot be read \(.*Permission denied.*\); "
                                         r"running without it"):
        assert db.choice("a") is DEFAULT
    assert db.set_aside == [] and not list(tmp_path.glob("db.json.corrupt-*"))
    with pytest.raises(PermissionError, match="not rewritten; point GCONVGEN_CACHE_DIR"):
        db.record({"b": kernel_record(CONFIG)})  # writing would replace records it could not read
    monkeypatch.undo()
    assert path.read_text() == text  # still there, untouched


def test_a_malformed_record_falls_back_to_the_default(tmp_path):
    path = tmp_path / "db.json"
    path.write_text(json.dumps({"schema_version": DB_SCHEMA_VERSION,
                                "entries": {"a": {"choice": "kernel", "config": {"x": 1}}}}))
    with pytest.warns(UserWarning, match="ignoring the tuning record for 'a'"):
        assert TuningDatabase(path, shipped=[]).choice("a") is DEFAULT
    with pytest.raises(ValueError, match="expected 'kernel' or 'aten'"):
        TuningDatabase(path, shipped=[]).record({"b": {"choice": "fast"}})


def test_shipped_databases_are_defaults_under_the_users(tmp_path):
    shipped = tmp_path / "NVIDIA_H200.json"
    shipped.write_text(json.dumps({"schema_version": DB_SCHEMA_VERSION,
                                   "entries": {"a": {"choice": ATEN}, "b": {"choice": ATEN}}}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    db = TuningDatabase(tmp_path / "user.json", shipped=[shipped, broken])
    db.record({"b": kernel_record(CONFIG)})
    with pytest.warns(UserWarning, match="ignoring the shipped tuning database"):
        fresh = TuningDatabase(tmp_path / "user.json", shipped=[shipped, broken])
        assert fresh.choice("a").kind == ATEN and fresh.choice("b").config == CONFIG
    assert broken.exists()  # package data is never renamed
    assert fresh.describe()["records"] == 1 and fresh.describe()["shipped"][str(shipped)] == 2
    assert fresh.clear() == 1
    with pytest.warns(UserWarning, match="ignoring the shipped tuning database"):
        assert fresh.choice("a").kind == ATEN and fresh.choice("b").kind == ATEN


WRITER = """
import sys
from pathlib import Path
from gconvgen.autotune.database import TuningDatabase, kernel_record
from gconvgen.compiler.lowering import KernelConfig
path, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
db = TuningDatabase(path, shipped=[])
for index in range(count):  # one write per key: as many chances to interleave as possible
    db.record({f"{name}-{index}": kernel_record(KernelConfig(16 * (index + 1), 16, 16))})
"""


def test_two_concurrent_writer_processes_lose_nothing(tmp_path):
    path = tmp_path / "db.json"
    checkout = str(Path(__file__).parents[1])  # the writers import this gconvgen, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")])}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, "25"], env=env,
                                stderr=subprocess.PIPE, text=True) for name in ("first", "second")]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    db = TuningDatabase(path, shipped=[])
    expected = {f"{name}-{index}" for name in ("first", "second") for index in range(25)}
    assert set(db.entries()) == expected
    assert db.choice("second-24").config == KernelConfig(16 * 25, 16, 16)
