"""The templates ship inside the wheel: build it, install it into a fresh venv outside the checkout, and
render and plan a kernel from the installed package."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import gconvgen
    from gconvgen import ConvSpec, codegen, plan
    from gconvgen.resources import data_dir
    package = Path(gconvgen.__file__).parent
    assert sys.prefix in str(package), f"gconvgen imported from {package}, not the venv"
    assert data_dir("templates") == package / "templates", data_dir("templates")
    assert (data_dir("tuning")).is_dir()
    source = codegen.render(plan(ConvSpec(12, 11, 3, (3, 3), channel_policy="pad")), interpret=False, allow_tf32=False)
    assert "@triton.jit" in source and "lowered SliceOutputChannels" in source
    print("rendered from", data_dir("templates"))
""")


def test_wheel_ships_templates_and_renders_outside_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("gconvgen-*.whl")
    venv = tmp_path / "venv"
    # system site-packages supplies torch and triton; the wheel itself goes into the venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    run = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(venv) in run.stdout
