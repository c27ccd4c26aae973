"""The disk cache of rendered kernel modules (the 'get' of uri / gen / get).

What runs is what this gconvgen renders, never what a file says. Anyone who can write to a cache folder
could otherwise run code in every process that reads it, and a checksum stored beside the code can be
recomputed by whoever changes the code. Rendering a module takes milliseconds and happens once per kernel
per process (launch.kernel_of's memo sits above ``load_module``), so the rendered
text is the truth and the file is a copy:

- ``<cache_dir>/kernels/<build_key>/<uri>.py`` is for people reading the generated code and for a cache
  baked read-only into an image: a file whose bytes equal the rendered text is left as it is;
- a missing or different file is rewritten atomically (temp file + ``os.replace``). Every writer writes the
  same bytes, so writers need no lock;
- when the cache cannot be written, the kernel runs from a private temporary copy and a warning names
  GCONVGEN_CACHE_DIR. A cache that cannot be written never stops a kernel from running.

The rendered text is compiled in memory and executed into a fresh module: no import system, no
``__pycache__``, no second read of the file. Triton's @jit reads a kernel's source through ``inspect``,
which reads ``linecache``; the module's lines are put there, so Triton reads the same verified text.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import linecache
import os
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import triton

from .. import knobs
from ..compiler.codegen import gconvgen_version, templates_hash


class KernelCacheWarning(UserWarning):
    """The kernel cache could not be written, or holds a file gconvgen did not render; kernels still run."""


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


def load_module(target: str, uri: str, render: Callable[[], str]) -> ModuleType:
    """Render the module of kernel ``uri`` for ``target`` (a build target, see ``build_key``), execute the
    rendered text and return the module. The cache's copy of the module is compared with that text and
    rewritten when it differs; its contents are never executed.

    The module's ``__file__`` names a file holding exactly its text: the cache's copy, or a private
    temporary copy (removed at exit) when the cache cannot be written, with a KernelCacheWarning.
    Raises what ``render`` raises, and SyntaxError if the rendered text is not Python; a file-system
    error is a warning, never an exception.
    """
    text = render()
    path = kernel_dir(target) / f"{uri}.py"
    return _execute(text, _published(path, text), _module_name(path))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one, never half of one.

    Missing folders are created with mode 0700. Raises OSError when the folder or the file cannot be
    written; the temporary file is removed first, so a failed write leaves nothing behind.
    """
    path = Path(path)
    make_private_dirs(path.parent)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(descriptor, "wb") as out:
            out.write(text.encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents with mode 0700: a cache holds code, so only its owner may
    write (or list) it. Folders that exist keep their mode. Raises OSError when one cannot be created,
    e.g. FileExistsError when a file stands where a folder should be."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            if not candidate.is_dir():  # another process may have made it between the check and mkdir
                raise


# ---------------------------------------------------------------------------------------------- the copy
_warned_caches: set[Path] = set()


def _published(path: Path, text: str) -> str:
    """Make sure a file holds exactly ``text`` and return its name: ``path`` when it already does or can be
    rewritten, else a private temporary copy (after a warning)."""
    if _holds(path, text.encode()):
        return str(path)
    try:
        write_atomic(path, text)
        return str(path)
    except OSError as error:
        copy = _private_copy(path, text)
        if os.path.lexists(path):
            warnings.warn(f"gconvgen: {path} is not the kernel this gconvgen renders for it (someone else changed "
                          f"it, or it is damaged) and cannot be replaced ({error}); running the rendered kernel "
                          f"from {copy} instead. Delete the file, or set GCONVGEN_CACHE_DIR to a folder only you "
                          f"can write.", KernelCacheWarning, stacklevel=3)
        elif knobs.cache_dir() not in _warned_caches:
            _warned_caches.add(knobs.cache_dir())
            warnings.warn(f"gconvgen: cannot write the kernel cache under {knobs.cache_dir()} ({error}); kernels "
                          f"run from a private temporary folder for this process and are rendered again in the "
                          f"next one. Set GCONVGEN_CACHE_DIR to a folder you can write, or make that one "
                          f"writable.", KernelCacheWarning, stacklevel=3)
        return copy


def _holds(path: Path, data: bytes) -> bool:
    """True when ``path`` is a regular file whose bytes are ``data``. The file is opened without following
    a link or waiting on a FIFO, and at most len(data) + 1 bytes are read: a cache folder is not trusted."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return False
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size != len(data):
            return False
        chunks, wanted = [], len(data) + 1  # one byte more than expected: a file that grew does not match
        while wanted > 0:
            chunk = os.read(descriptor, wanted)
            if not chunk:
                break
            chunks.append(chunk)
            wanted -= len(chunk)
        return b"".join(chunks) == data
    except OSError:
        return False
    finally:
        os.close(descriptor)


@functools.cache
def _private_root() -> tempfile.TemporaryDirectory:
    """This process's own folder for kernels the cache cannot hold (mode 0700, removed at exit)."""
    return tempfile.TemporaryDirectory(prefix="gconvgen-kernels-")


def _private_copy(path: Path, text: str) -> str:
    """Write ``text`` to this process's private folder and return the copy's name; when even that fails,
    a name no file has, so nothing but the lines given to linecache can be read for it."""
    try:
        copy = Path(_private_root().name) / path.parent.name / path.name
        write_atomic(copy, text)
        return str(copy)
    except OSError:
        return f"<gconvgen kernel {path.name}>"


# ---------------------------------------------------------------------------------------------- running it
class _RenderedSource:
    """The module's ``__loader__``: hands the rendered text to inspect and linecache should they ask."""

    def __init__(self, text: str):
        self.text = text

    def get_source(self, name: str) -> str:
        """The module's source: the rendered text, whatever the file now holds."""
        return self.text


def _module_name(path: Path) -> str:
    return f"gconvgen_kernels.{path.parent.name.replace('.', '_').replace('-', '_')}.{path.stem}"


def _execute(text: str, filename: str, name: str) -> ModuleType:
    """Compile ``text`` as the module ``name`` of file ``filename`` and run it in a fresh module."""
    code = compile(text, filename, "exec", dont_inherit=True)  # not this file's `from __future__` flags
    module = ModuleType(name)
    module.__file__ = filename
    module.__loader__ = _RenderedSource(text)
    # @jit reads the kernel's source through inspect.getsourcelines, and the interpreter again on a kernel's
    # first launch. mtime None makes linecache.checkcache keep these lines rather than re-read the file (only
    # linecache.clearcache() would drop them, and nothing in gconvgen or Triton calls it).
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    sys.modules[name] = module  # inspect finds a function's module (and so its lines) through sys.modules
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module

