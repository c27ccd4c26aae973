"""The templates ship inside the wheel: build it, install it into a fresh venv outside the checkout, and
plan, render and run a kernel from the installed package, with the torch of the environment running the tests.

Offline throughout: the wheel is built with this environment's hatchling (no isolated build env to
download), and installed with --no-index --no-deps. The fresh venv is made without system site-packages
(``--system-site-packages`` would give it the *base* interpreter's packages: from .venv that is the system
Python, which may have no torch); a .pth file lends it the directories this interpreter imports the
dependencies from instead.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPENDENCIES = ("torch", "triton", "jinja2", "markupsafe", "networkx", "filelock", "click", "tqdm", "numpy")

CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import gconvgen
    from gconvgen import ConvSpec, plan
    from gconvgen.compiler import codegen
    from gconvgen.compiler.lowering import lower
    from gconvgen.resources import data_dir
    package = Path(gconvgen.__file__).parent
    assert sys.prefix in str(package), f"gconvgen imported from {package}, not the venv"
    assert data_dir("templates") == package / "templates", data_dir("templates")
    assert (data_dir("tuning")).is_dir()
    desc = lower(plan(ConvSpec(12, 11, 3, (3, 3), channel_policy="pad")), "forward", interpret=False, allow_tf32=False)
    source = codegen.render(desc)
    assert "@triton.jit" in source and desc.mask_output_channels
    assert "(out_channel < 11)  # lowered channel padding" in source
    print("rendered from", data_dir("templates"))

    import torch  # the caller's torch; the kernel runs through Triton's interpreter (TRITON_INTERPRET=1)
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    out = gconvgen.conv2d(x, weight, None, stride=1, padding=1, groups=4)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, None, 1, 1, 1, 4), atol=1e-4, rtol=1e-4)
    print("torch from", torch.__file__)
""")


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    run = subprocess.run(list(command), capture_output=True, text=True, timeout=300, **kwargs)
    assert run.returncode == 0, f"{' '.join(command)}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def _dependency_dirs() -> list[str]:
    """The directories this interpreter imports gconvgen's dependencies from (.venv's site-packages, and
    the system's where .venv sees them)."""
    dirs = []
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not installed here; run bash .ci/setup.sh"
        dirs.append(str(Path(spec.origin).parent.parent))
    return list(dict.fromkeys(dirs))


def test_wheel_ships_templates_and_renders_outside_checkout(tmp_path):
    if importlib.util.find_spec("hatchling") is None:
        pytest.fail("hatchling (the build backend) is not installed, and the wheel is built offline without an "
                    "isolated build environment; run bash .ci/setup.sh, which installs it")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT))
    (wheel,) = dist.glob("gconvgen-*.whl")

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    site_packages = Path(_run(str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
                         .stdout.strip())
    (site_packages / "gconvgen-test-dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps", "-q",
         str(wheel))

    # -I: neither PYTHONPATH nor the working directory can bring the checkout's gconvgen in
    run = _run(str(python), "-I", "-c", CHECK, cwd=tmp_path)
    assert str(venv) in run.stdout
    import torch

    assert f"torch from {torch.__file__}" in run.stdout
    # the console script the wheel declares, and its help without torch
    script = _run(str(python), "-I", str(venv / "bin" / "gconvgen"), "--help", cwd=tmp_path)
    assert "Commands:" in script.stdout and "bench" in script.stdout
