"""The kernel cache is not trusted: each test plants what an attacker or a broken set-up would leave in it
(a forged module, a module returning scaled outputs, a planted .pyc, a read-only or impossible cache
folder, a write that fails half-way) and checks that the kernel gconvgen renders is what runs, and that
the cache folder ends up as it should.

Running as root, file modes stop nothing, so ``read_only`` also refuses writes under the folder by
monkeypatching os.open / os.mkdir / os.replace, which is what a non-root user meets from the kernel.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import py_compile
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gconvgen
from gconvgen import ConvSpec, knobs, memo
from gconvgen.compiler.lowering import DEFAULT, PixelSpace, lowered_for
from gconvgen.runtime import cache, launch

OLD_CHECKSUM_PREFIX = "# gconvgen-checksum: "  # the line a forger recomputes; it used to be all the check


def clear_memos() -> None:
    """Forget the loaded kernels, so the next call goes to the cache again."""
    memo.reset()


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh cache directory (not yet created) for this test, with empty in-process memos."""
    folder = tmp_path / "cache"
    clear_memos()
    with knobs.scoped(CACHE_DIR=folder):
        yield folder
    clear_memos()


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes ``folder`` and everything in it unwritable (restored after the test).
    Where modes stop nothing (root), writes under the folder are refused as the kernel would refuse them."""
    folders: list[Path] = []
    os_open, os_mkdir, os_replace = os.open, os.mkdir, os.replace

    def refuse_under_folders(path) -> None:
        if any(Path(os.path.abspath(path)).is_relative_to(folder) for folder in folders):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse_under_folders(path)
        return os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        refuse_under_folders(path)
        return os_mkdir(path, *args, **kwargs)

    def guarded_replace(source, target, *args, **kwargs):
        refuse_under_folders(target)
        return os_replace(source, target, *args, **kwargs)

    def make_read_only(folder: Path) -> None:
        folders.append(folder.resolve())
        for path in [*folder.rglob("*"), folder]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        if os.geteuid() == 0:
            monkeypatch.setattr(os, "open", guarded_open)
            monkeypatch.setattr(os, "mkdir", guarded_mkdir)
            monkeypatch.setattr(os, "replace", guarded_replace)

    yield make_read_only
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def loaded_files(monkeypatch):
    """The files that the modules loaded during the test say they come from (their ``__file__``)."""
    files: list[Path] = []
    load_module = cache.load_module

    def recording(*args, **kwargs):
        module = load_module(*args, **kwargs)
        files.append(Path(module.__file__))
        return module

    monkeypatch.setattr(cache, "load_module", recording)
    return files


def small_conv():
    """A grouped conv small enough for the interpreter: (gconvgen's result, the float64 reference)."""
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    return gconvgen.conv2d(x, weight, groups=2), F.conv2d(x.double(), weight.double(), groups=2)


def assert_conv_correct() -> None:
    actual, expected = small_conv()
    torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-4)


def cached_module(cache_dir: Path) -> Path:
    """Fill the cache with small_conv's kernel and return its file (the only module a fresh cache holds)."""
    assert_conv_correct()
    [path] = (cache_dir / "kernels").glob("*/*.py")
    clear_memos()
    return path


def forge(path: Path, body: str) -> None:
    """Write ``body`` with a checksum line recomputed for it, as an attacker who read the old format would."""
    path.write_text(f"{body}{OLD_CHECKSUM_PREFIX}{hashlib.sha256(body.encode()).hexdigest()}\n")


# ---------------------------------------------------------------------------------------------- forged files
def test_forged_module_with_recomputed_checksum_is_not_executed_and_is_rewritten(cache_dir, tmp_path):
    path = cached_module(cache_dir)
    rendered = path.read_text()
    marker = tmp_path / "forged-module-ran"
    forge(path, f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n{rendered}")
    assert_conv_correct()
    assert not marker.exists()
    assert path.read_text() == rendered


def scaling_forgery(rendered: str, kernel_name: str) -> str:
    """The real module, with its kernel wrapped so that every launch scales the output (argument 3) by 1.5."""
    return rendered + (
        f"\n_real = {kernel_name}\n\n\n"
        "class _Scaled:\n"
        "    def __getitem__(self, grid):\n"
        "        def launch(*args, **kwargs):\n"
        "            _real[grid](*args, **kwargs)\n"
        "            args[3].mul_(1.5)\n"
        "        return launch\n\n\n"
        f"{kernel_name} = _Scaled()\n")


def test_module_returning_scaled_outputs_is_not_used(cache_dir):
    path = cached_module(cache_dir)
    rendered = path.read_text()
    forge(path, scaling_forgery(rendered, "gconvgen_" + path.stem))
    assert_conv_correct()
    assert path.read_text() == rendered


def test_planted_pycache_is_not_executed(cache_dir, tmp_path):
    path = cached_module(cache_dir)
    marker = tmp_path / "planted-pyc-ran"
    planted_source = tmp_path / "planted.py"
    planted_source.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    # an unchecked-hash .pyc is used by Python's importer whatever the .py beside it says
    py_compile.compile(str(planted_source), cfile=importlib.util.cache_from_source(str(path)),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    assert_conv_correct()
    assert not marker.exists()
    # control: importing the file, as gconvgen used to, runs the planted bytecode (so this test can fail)
    spec = importlib.util.spec_from_file_location("planted_control", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.exists()


def test_file_changed_after_loading_is_never_read(cache_dir):
    """Triton's interpreter reads a kernel's source again on its first launch, after loading. A file changed
    in between must not reach it: what runs is the text verified when the module was loaded."""
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    spec = ConvSpec(4, 4, 2, (3, 3))
    desc = lowered_for(spec, "forward", "float32", DEFAULT, True, False, False, PixelSpace(1 * 3, 3))
    launch.kernel_of(desc, "interpreter")  # loaded
    [path] = (cache_dir / "kernels").glob("*/*.py")
    rendered = path.read_text()
    store = "acc.to(out_ptr.dtype.element_ty)"
    assert rendered.count(store) == 1
    path.write_text(rendered.replace(store, "(acc * 1.5).to(out_ptr.dtype.element_ty)"))  # same lines, scaled
    out = launch.forward(spec, x, weight, None, torch.empty(1, 4, 3, 3))
    torch.testing.assert_close(out.double(), F.conv2d(x.double(), weight.double(), groups=2), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- read-only caches
def test_read_only_cache_prefilled_with_correct_files_is_used(cache_dir, read_only, loaded_files):
    path = cached_module(cache_dir)
    read_only(cache_dir)
    loaded_files.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache.KernelCacheWarning)
        assert_conv_correct()
    assert loaded_files == [path]


def test_read_only_cache_with_forged_file_warns_and_runs_the_rendered_kernel(cache_dir, read_only, loaded_files):
    path = cached_module(cache_dir)
    rendered = path.read_text()
    forge(path, scaling_forgery(rendered, "gconvgen_" + path.stem))
    forged = path.read_text()
    read_only(cache_dir)
    loaded_files.clear()
    with pytest.warns(cache.KernelCacheWarning, match="GCONVGEN_CACHE_DIR") as caught:
        assert_conv_correct()
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert path.read_text() == forged  # it could not be rewritten ...
    [loaded] = loaded_files
    assert loaded != path and loaded.read_text() == rendered  # ... so the kernel ran from a private copy
    assert stat.S_IMODE(loaded.parent.parent.stat().st_mode) == 0o700


# ---------------------------------------------------------------------------------------------- unusable folders
@pytest.mark.parametrize("problem", ["cache path is a file", "read-only empty folder"])
def test_unusable_cache_folder_warns_once_and_runs(cache_dir, read_only, problem):
    if problem == "cache path is a file":
        cache_dir.write_text("not a folder")
    else:
        cache_dir.mkdir()
        read_only(cache_dir)
    with pytest.warns(cache.KernelCacheWarning, match="GCONVGEN_CACHE_DIR") as caught:
        assert_conv_correct()
        x, weight = torch.randn(1, 6, 5, 5), torch.randn(6, 2, 3, 3)  # a second kernel: no second warning
        torch.testing.assert_close(gconvgen.conv2d(x, weight, groups=3).double(),
                                   F.conv2d(x.double(), weight.double(), groups=3), atol=1e-4, rtol=1e-4)
    assert len(caught) == 1 and str(cache_dir) in str(caught[0].message)
    assert len(launch._KERNELS) == 2
    if problem == "cache path is a file":
        assert cache_dir.read_text() == "not a folder"
    else:
        assert list(cache_dir.iterdir()) == []


def test_failed_write_leaves_no_temporary_file(cache_dir, monkeypatch):
    def fail(source, target):
        raise OSError(errno.EIO, "simulated failure", str(target))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated failure"):
        cache.write_atomic(cache_dir / "tuning" / "db.json", "{}")
    with pytest.warns(cache.KernelCacheWarning, match="GCONVGEN_CACHE_DIR"):
        assert_conv_correct()  # the private copy cannot be written either: the kernel runs from memory alone
    assert [path for path in cache_dir.rglob("*") if path.is_file()] == []
    assert list(Path(cache._private_root().name).rglob("*.tmp")) == []


def test_cache_folders_are_created_private(cache_dir):
    path = cached_module(cache_dir)
    for folder in (cache_dir, cache_dir / "kernels", path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


# ---------------------------------------------------------------------------------------------- GPU compiler
GPU_COMPILE_SCRIPT = textwrap.dedent("""
    import importlib.util
    import json
    import sys
    from gconvgen import ConvSpec
    from gconvgen.autotune.space import Problem
    from gconvgen.tools.inspection import INSPECT_TARGET, prepared_launch
    from gconvgen.runtime import cache, launch
    from gconvgen.tools import sass
    target = INSPECT_TARGET
    prepared = prepared_launch(Problem(ConvSpec(12, 12, 3, (3, 3), padding=(1, 1, 1, 1), dtype="float16"), 2, 8, 8))
    desc = prepared.desc
    kernel = launch.kernel_of(desc, target)
    meta = desc.meta
    arguments = {name: sass.Pointer("float16") if hasattr(value, "dtype") else value
                 for name, value in prepared.arguments().items()}
    constexprs = {name: meta[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_BLOCK")}

    def compile_kernel_for_gpu(fn):
        return sass.compile_like_launch(fn, arguments, constexprs, num_warps=meta["num_warps"],
                                        num_stages=meta["num_stages"])

    path = cache.kernel_dir(target) / f"{desc.uri}.py"
    rendered = path.read_text()
    store = "acc.to(out_ptr.dtype.element_ty)"
    assert rendered.count(store) == 1
    forged = rendered.replace(store, "(acc * 1.5).to(out_ptr.dtype.element_ty)")
    path.write_text(forged)  # after loading, before compiling: same lines, output scaled
    loaded_ttir = compile_kernel_for_gpu(kernel).asm["ttir"]
    control = path.with_name("control.py")  # the forged text imported as a file: the scale must show
    control.write_text(forged)
    spec = importlib.util.spec_from_file_location("control", control)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    control_ttir = compile_kernel_for_gpu(getattr(module, desc.kernel_name)).asm["ttir"]
    print("RESULTS" + json.dumps({"loaded": loaded_ttir, "control": control_ttir}))
""")


def test_gpu_compiler_builds_the_verified_text(tmp_path):
    """Triton's real compiler (sm_90, ahead of time, TRITON_INTERPRET unset) compiles the text verified when
    the module was loaded, not a file changed since; the control proves the change would show in the TTIR."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["GCONVGEN_CACHE_DIR"] = str(tmp_path / "gconvgen")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # compile for real, not from Triton's cache
    run = subprocess.run([sys.executable, "-c", GPU_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    ttir = json.loads(run.stdout.split("RESULTS", 1)[1])
    scale = "1.500000e+00"
    assert scale in ttir["control"] and scale not in ttir["loaded"]
