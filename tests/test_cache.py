"""The disk cache: where it lives, what its key carries (TF32 included, and torch's TF32 settings as read for it),
atomic writes, corrupt entries, and a warm call that touches neither the disk nor the planner, the lowering or the
templates. Attacks on the cache: test_cache_security.py."""
from __future__ import annotations

import builtins
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton

import gconvgen
from gconvgen import ConvSpec, knobs
from gconvgen.compiler import codegen, lowering
from gconvgen.compiler.lowering import lower
from gconvgen.runtime import cache, device, launch

plan_module = importlib.import_module("gconvgen.compiler.plan")  # the module; gconvgen.plan is the function
P = pytest.param


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("GCONVGEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert knobs.cache_dir() == tmp_path / "xdg" / "gconvgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert knobs.cache_dir() == tmp_path / "home" / ".cache" / "gconvgen"
    monkeypatch.setenv("GCONVGEN_CACHE_DIR", str(tmp_path / "explicit"))
    assert knobs.cache_dir() == tmp_path / "explicit"


def test_key_carries_version_templates_triton_and_target():
    key = cache.build_key("NVIDIA H200 sm_90")
    assert codegen.gconvgen_version() in key and triton.__version__ in key
    assert key != cache.build_key("interpreter") != cache.build_key("NVIDIA H100 sm_90")
    conv_plan = gconvgen.plan(ConvSpec(12, 12, 3, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16", layout="nhwc"))
    assert (lower(conv_plan, "forward", interpret=False, allow_tf32=True).uri
            == lower(conv_plan, "forward", interpret=False, allow_tf32=False).uri)  # TF32 does not touch half types


def test_tf32_and_exact_float32_kernels_never_share_a_cache_entry():
    conv_plan = gconvgen.plan(ConvSpec(12, 12, 3, (3, 3), dtype="float32"))
    tf32 = lower(conv_plan, "forward", interpret=False, allow_tf32=True)
    exact = lower(conv_plan, "forward", interpret=False, allow_tf32=False)
    assert tf32.uri != exact.uri and tf32.uri.split("_")[:-1] == exact.uri.split("_")[:-1]  # the hash differs
    assert 'input_precision="tf32"' in codegen.render(tf32) and 'input_precision="tf32"' not in codegen.render(exact)
    assert 'input_precision="ieee"' in codegen.render(exact)


# ---------------------------------------------------------------------------------------------- TF32
# allows_tf32 only reads torch's flags for a CUDA device, so every setting is checked on the CPU.

_FP32_PRECISION_OWNERS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.conv",
                          "mkldnn.matmul", "mkldnn.rnn")  # parents first: setting a parent rewrites its children


def _backend(path):
    owner = torch.backends
    for name in filter(None, path.split(".")):
        owner = getattr(owner, name)
    return owner


def _legacy_flag(owner):
    try:
        return owner.allow_tf32
    except RuntimeError:  # newer torch refuses the old getter under some mixes of the new settings
        return None


def _tf32_settings():
    precisions = {path: _backend(path).fp32_precision for path in _FP32_PRECISION_OWNERS
                  if hasattr(_backend(path), "fp32_precision")}
    return precisions, _legacy_flag(torch.backends.cudnn), _legacy_flag(torch.backends.cuda.matmul)


@pytest.fixture
def restored_tf32_settings():
    """Every TF32 setting of torch (the fp32_precision tree and the legacy allow_tf32 flags) as it was, after
    the test, checked. The legacy flags go back first: on torch 2.9+ they write the new settings too."""
    saved = _tf32_settings()
    yield
    precisions, cudnn_flag, matmul_flag = saved
    if cudnn_flag is not None:
        torch.backends.cudnn.allow_tf32 = cudnn_flag
    if matmul_flag is not None:
        torch.backends.cuda.matmul.allow_tf32 = matmul_flag
    for path, precision in precisions.items():
        _backend(path).fp32_precision = precision
    assert _tf32_settings() == saved, "the TF32 settings were not restored"


CUDA = torch.device("cuda")
needs_fp32_precision = pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"),
                                          reason="torch < 2.9 has no fp32_precision settings")

# settings applied in order (owner path, value; "allow_tf32" is the legacy flag), then whether a CUDA
# float32 conv may use TF32
TF32_CASES = [
    P((("cudnn.conv", "ieee"),), False, id="conv-ieee"),
    P((("cudnn.conv", "tf32"),), True, id="conv-tf32"),
    P((("cudnn", "tf32"), ("cudnn.conv", "none")), True, id="conv-none-then-cudnn-tf32"),
    P((("cudnn", "ieee"), ("cudnn.conv", "none")), False, id="conv-none-then-cudnn-ieee"),
    P((("", "tf32"), ("cudnn", "none"), ("cudnn.conv", "none")), True, id="conv-cudnn-none-then-global-tf32"),
    P((("", "ieee"), ("cudnn", "none"), ("cudnn.conv", "none")), False, id="conv-cudnn-none-then-global-ieee"),
    P((("", "none"), ("cudnn", "none"), ("cudnn.conv", "none")), False, id="all-none-exact"),  # the safe side
    P((("cudnn.allow_tf32", True),), True, id="legacy-allow-tf32"),
    P((("cudnn.allow_tf32", False),), False, id="legacy-no-tf32"),
]


@needs_fp32_precision
@pytest.mark.parametrize("settings, expected", TF32_CASES)
def test_tf32_follows_torchs_conv_precision(settings, expected, restored_tf32_settings):
    for path, value in settings:
        if path.endswith("allow_tf32"):
            _backend(path.removesuffix("allow_tf32")).allow_tf32 = value
        else:
            _backend(path).fp32_precision = value
    assert device.allows_tf32(CUDA) is expected
    assert device.allows_tf32(torch.device("cpu")) is False  # never TF32 off CUDA


def _torch_with_backends(cudnn_conv=None, cudnn=None, generic=None, allow_tf32=True):
    """A stand-in for torch whose settings are exactly these: fp32_precision per level (None: the level has no
    such setting, as before torch 2.9) and the legacy cudnn.allow_tf32."""
    def level(precision, **children):
        return SimpleNamespace(**children, **({} if precision is None else {"fp32_precision": precision}))

    conv = None if cudnn_conv is None else level(cudnn_conv)
    cudnn_level = level(cudnn, allow_tf32=allow_tf32, **({} if conv is None else {"conv": conv}))
    return SimpleNamespace(backends=level(generic, cudnn=cudnn_level))


@pytest.mark.parametrize("backends, expected", [
    P(dict(cudnn_conv="none", cudnn="none", generic="tf32", allow_tf32=False), True, id="none-falls-to-global-tf32"),
    P(dict(cudnn_conv="none", cudnn="ieee", generic="tf32", allow_tf32=True), False, id="none-falls-to-cudnn-ieee"),
    P(dict(cudnn_conv="ieee", cudnn="tf32", generic="tf32", allow_tf32=True), False, id="conv-decides-first"),
    P(dict(cudnn_conv="none", cudnn="none", generic="none", allow_tf32=True), True, id="all-none-legacy-tf32"),
    P(dict(cudnn_conv="none", cudnn="none", generic="none", allow_tf32=False), False, id="all-none-legacy-exact"),
    P(dict(allow_tf32=True), True, id="old-torch-legacy-tf32"),     # no fp32_precision anywhere
    P(dict(allow_tf32=False), False, id="old-torch-legacy-exact"),
])
def test_tf32_fallback_chain_as_written(monkeypatch, backends, expected):
    """The chain itself, on torch stand-ins: torch 2.13's getters already resolve 'none' to the parent's
    setting, which the real-torch cases above cannot tell from allows_tf32 walking the levels."""
    monkeypatch.setattr(device, "torch", _torch_with_backends(**backends))
    assert device.allows_tf32(CUDA) is expected


def test_legacy_getter_refusing_means_exact(monkeypatch):
    def refuse(self):
        raise RuntimeError("PyTorch is checking whether allow_tf32 is enabled for cuDNN without a specific operator")

    # every level says 'none' and the legacy getter refuses the mix, as torch 2.9+ may
    cudnn = type("RefusingCudnn", (SimpleNamespace,), {"allow_tf32": property(refuse)})(
        fp32_precision="none", conv=SimpleNamespace(fp32_precision="none"))
    monkeypatch.setattr(device, "torch", SimpleNamespace(backends=SimpleNamespace(fp32_precision="none", cudnn=cudnn)))
    assert device.allows_tf32(CUDA) is False


def test_rendered_module_lands_in_cache_and_warm_call_does_no_work(monkeypatch):
    x, weight = torch.randn(2, 10, 6, 6), torch.randn(10, 2, 3, 3)
    first = gconvgen.conv2d(x, weight, None, 1, 1, 1, 5)
    files = list((knobs.cache_dir() / "kernels" / cache.build_key("interpreter")).glob("igemm_ci10_co10_g5_*.py"))
    assert len(files) == 1 and files[0].read_text().startswith("# Generated by gconvgen")

    def forbidden(*args, **kwargs):
        raise AssertionError("a warm call planned, lowered, rendered or touched the disk")

    monkeypatch.setattr(plan_module, "plan", forbidden)
    monkeypatch.setattr(lowering, "lower", forbidden)
    monkeypatch.setattr(codegen, "render", forbidden)
    monkeypatch.setattr(cache, "load_module", forbidden)
    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(os, "replace", forbidden)
    monkeypatch.setattr(Path, "read_text", forbidden)
    second = gconvgen.conv2d(x, weight, None, 1, 1, 1, 5)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_corrupt_entry_is_rebuilt_not_trusted(damage):
    spec = ConvSpec(6, 6, 3, (3, 3), padding=(1, 1, 1, 1))
    x, weight = torch.randn(2, 6, 5, 5), torch.randn(6, 2, 3, 3)
    desc = launch.prepare_forward(spec, x, weight, None, torch.empty(2, 6, 5, 5)).desc  # what conv2d runs here
    launch.kernel_of(desc, "interpreter")
    path = cache.kernel_dir("interpreter") / f"{desc.uri}.py"
    text = path.read_text()
    path.write_text({"truncate": text[: len(text) // 2], "garble": text.replace("tl.dot", "tl.dotx"),
                     "empty": ""}[damage])
    launch.clear_memo()
    torch.testing.assert_close(gconvgen.conv2d(x, weight, None, 1, 1, 1, 3),
                               torch.nn.functional.conv2d(x, weight, None, 1, 1, 1, 3), atol=1e-4, rtol=1e-4)
    assert path.read_text() == text  # the call's own load rewrote the damaged copy


def test_concurrent_loaders_leave_one_complete_file(tmp_path):
    """Two processes loading the same missing kernel at once: each runs its own rendering, both write the
    same bytes atomically, and one complete file is left, with no temporary file beside it."""
    script = textwrap.dedent("""
        import warnings
        from gconvgen.runtime import cache
        warnings.simplefilter("error", cache.KernelCacheWarning)  # neither process may fall back to a private copy
        def render():
            return "VALUE = 42\\n" + "# padding to make the write take a while\\n" * 100000
        assert cache.load_module("test-target", "shared_uri", render).VALUE == 42
    """)
    env = {**os.environ, "GCONVGEN_CACHE_DIR": str(tmp_path / "cache")}
    workers = [subprocess.Popen([sys.executable, "-c", script], env=env) for _ in range(2)]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    folder = tmp_path / "cache" / "kernels"
    [path] = folder.glob("*/shared_uri.py")
    assert path.read_text().startswith("VALUE = 42\n") and len(path.read_text().splitlines()) == 100001
    assert sorted(entry.name for entry in path.parent.iterdir()) == ["shared_uri.py"]
