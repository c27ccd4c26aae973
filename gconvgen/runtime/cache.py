"""The disk cache of rendered kernel modules (the 'get' of uri / gen / get).

A module lives at ``<cache_dir>/kernels/<build_key>/<uri>.py``, where the build key carries everything
that invalidates it: gconvgen's version, the templates' hash, Triton's version and the target device.
Writes are atomic (temp file + os.replace) under a file lock and re-checked after taking it; a file
whose checksum line does not match its body is rebuilt, never imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import filelock
import triton

from .. import knobs
from ..codegen import gconvgen_version, templates_hash

CHECKSUM_PREFIX = "# gconvgen-checksum: "


def build_key(target: str) -> str:
    """Directory name for one (gconvgen, templates, Triton, target) combination, readable and short."""
    what = f"gconvgen={gconvgen_version()} templates={templates_hash()} triton={triton.__version__} target={target}"
    return f"{gconvgen_version()}-triton{triton.__version__}-{hashlib.sha256(what.encode()).hexdigest()[:16]}"


def kernels_root() -> Path:
    """The folder holding every build's rendered kernel modules."""
    return knobs.cache_dir() / "kernels"


def kernel_dir(target: str) -> Path:
    """The folder of one build key's rendered modules."""
    return kernels_root() / build_key(target)


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _read_valid(path: Path) -> bool:
    """True when ``path`` holds a complete module: its last line is the checksum of everything above it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    return last.startswith(CHECKSUM_PREFIX) and last[len(CHECKSUM_PREFIX):] == _checksum(body + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def ensure_module_file(target: str, uri: str, render: Callable[[], str]) -> Path:
    """The path of a valid module file for ``uri``, rendering and writing it if missing or corrupt."""
    path = kernel_dir(target) / f"{uri}.py"
    if _read_valid(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        if not _read_valid(path):  # another process may have written it while we waited
            body = render()
            write_atomic(path, f"{body}{CHECKSUM_PREFIX}{_checksum(body)}\n")
    return path


def import_module(path: Path) -> ModuleType:
    """Import a rendered module from its file (Triton's @jit reads the source from there)."""
    name = f"gconvgen_kernels.{path.parent.name.replace('.', '_').replace('-', '_')}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
