"""Every CLI flag either works or is refused in one line that names the flag, the value and the fix, before
any work: flags that do nothing in a combination, sizes the planner would misread, output paths that
cannot be written, and names it does not know (with the closest ones it does)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gconvgen.tools import bench
from gconvgen import knobs
from gconvgen.autotune import tuner
from gconvgen.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
P = pytest.param
PLAN_LAYER = ("plan", "--in-channels", "8", "--out-channels", "8", "--groups", "8", "--no-source")


def _run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def _refused(*args: str) -> str:
    """The one-line error of a refused command line (click's usage error, exit status 2)."""
    output = _run(*args, code=2)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and output.rstrip().endswith(errors[0]), output
    return errors[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any benchmark or tuning fails the test: a refusal must come before the work."""
    def work(*args, **kwargs):
        raise AssertionError("the command did its work before refusing a flag")

    monkeypatch.setattr(bench, "measure_ceilings", work)
    monkeypatch.setattr(bench, "bench_layer", work)
    monkeypatch.setattr(tuner, "tune", work)


# arguments of `gconvgen bench`, fragments the one-line error must hold
REFUSED_BENCH_FLAGS = [
    P(["--block", "bn-act", "--backward"], ["--backward", "forward block only", "drop --backward"],
      id="bn-act-backward"),
    P(["--block", "bn-act", "--plot", "bench.png"], ["--plot bench.png", "draws no plot", "--markdown"],
      id="bn-act-plot"),
    P(["--activation", "silu"], ["--activation", "--block bn-act only", "add --block bn-act or drop --activation"],
      id="activation-without-block"),
    P(["--no-compile"], ["--no-compile", "--block bn-act only"], id="no-compile-without-block"),
    P(["--suite", "headline", "--layer", "resnext50-l1"], ["--layer resnext50-l1", "hours", "--suite smoke"],
      id="gpu-suite-layer-on-cpu"),                                  # was dropped for the whole smoke suite
]


@pytest.mark.parametrize("args, fragments", REFUSED_BENCH_FLAGS)
def test_bench_refuses_flags_that_would_do_nothing(args, fragments, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = _refused("bench", "--device", "cpu", *args)
    assert all(fragment in error for fragment in fragments), error


def test_bench_bn_act_tunes_and_writes_markdown(tmp_path, monkeypatch):
    """--tune and --markdown were ignored with --block bn-act; now the fused conv's layer is tuned first
    (the fused kernel reads the same tuning record) and the block table is written as markdown."""
    tuned = []
    real_tune = tuner.tune

    def counting_tune(problem, device, **kwargs):
        tuned.append(problem)
        return real_tune(problem, device, **kwargs)

    monkeypatch.setattr(tuner, "tune", counting_tune)
    markdown = tmp_path / "md.md"
    output = _run("bench", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nhwc", "--block", "bn-act",
                  "--tune", "--no-compile", "--markdown", str(markdown))
    assert [problem.spec.layout for problem in tuned] == ["nhwc"] and "trials" in output
    text = markdown.read_text()
    assert text.startswith("| layer | act |") and "| smoke-dw3 nhwc | relu |" in text and "interpreter" in text


# where the path points, the flag, fragments of the error
UNWRITABLE = [
    P("missing/out.json", "--json", ["missing", "does not exist", "mkdir -p"], id="json-in-missing-folder"),
    P("a-file/out.md", "--markdown", ["a-file", "is a file, not a folder"], id="markdown-under-a-file"),
    P(".", "--plot", ["is a directory"], id="plot-is-a-folder"),
    P("", "--json", ["an empty name is no file"], id="json-empty"),
]


@pytest.mark.parametrize("path, flag, fragments", UNWRITABLE)
def test_bench_checks_output_paths_before_the_work(path, flag, fragments, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    error = _refused("bench", "--device", "cpu", "--tune", flag, path)
    assert f"Invalid value for '{flag}'" in error and all(fragment in error for fragment in fragments), error


def test_a_folder_without_write_permission_is_refused(no_work, tmp_path, monkeypatch):
    from gconvgen.tools import cli_help

    monkeypatch.setattr(cli_help.os, "access", lambda path, mode: False)  # as a user, not root, would see it
    assert "no permission" in _refused("bench", "--device", "cpu", "--json", str(tmp_path / "x.json"))


def test_other_commands_check_their_output_paths(tmp_path):
    missing = str(tmp_path / "missing" / "x")
    assert "Invalid value for '--graph'" in _refused(*PLAN_LAYER, "--graph", missing + ".dot")
    assert "Invalid value for 'PATH'" in _refused("cache", "export", missing + ".json")
    inspect = _refused("inspect", "--suite", "smoke", "--json", missing + ".json")  # before TRITON_INTERPRET's check
    assert "Invalid value for '--json'" in inspect and "does not exist" in inspect


# plan arguments, fragments of the error
REFUSED_PLAN_FLAGS = [
    P(["--kernel", "3x5x7"], ["'--kernel'", "'3x5x7' has 3 values", "3 or 3x5"], id="three-kernel-sizes"),
    P(["--kernel", "abc"], ["'--kernel'", "'abc' is not a size"], id="kernel-not-a-number"),
    P(["--stride", "2x"], ["'--stride'", "'2x'"], id="stride-trailing-x"),
    P(["--padding", "1,1,1"], ["'--padding'", "3 values", "top,bottom,left,right"], id="three-paddings"),
    P(["--graph", "p.xyz"], ["'--graph'", "'p.xyz'", ".dot", ".json"], id="graph-extension"),  # was written as DOT
]


@pytest.mark.parametrize("args, fragments", REFUSED_PLAN_FLAGS)
def test_plan_refuses_what_it_would_misread(args, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = _refused(*PLAN_LAYER, *args)
    assert all(fragment in error for fragment in fragments), error
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_plan_takes_the_apis_spellings_and_writes_the_graph_format_asked(tmp_path):
    same = _run(*PLAN_LAYER, "--padding", "SAME", "--layout", "NHWC", "--dtype", "Float32", "--kernel", "3x5")
    assert "kernel_size=(3, 5)" in same and "padding=(1, 1, 2, 2)" in same and "layout='nhwc'" in same
    assert "dtype='float32'" in same
    graphs = tmp_path / "graphs.JSON"
    _run(*PLAN_LAYER, "--graph", str(graphs))
    assert set(json.loads(graphs.read_text())) == {"logical", "lowered"}
    _run(*PLAN_LAYER, "--graph", str(tmp_path / "graphs.gv"))
    assert (tmp_path / "graphs.gv").read_text().startswith("strict digraph")


# command, the unknown name's suggestion that the error must make
SUGGESTIONS = [
    P(["tune", "--suite", "smok"], "'smoke'", id="suite-typo"),
    P(["bench", "--suite", "hedline", "--device", "cpu"], "'headline'", id="gpu-suite-typo"),
    P(["bench", "--layer", "smoke-dw4", "--device", "cpu"], "'smoke-dw7' or 'smoke-dw3'", id="layer-typo"),
]


@pytest.mark.parametrize("args, suggested", SUGGESTIONS)
def test_unknown_suites_and_layers_suggest_the_closest(args, suggested, no_work):
    error = _refused(*args)
    assert f"did you mean {suggested}?" in error, error


def test_inspect_suggests_layers_too(monkeypatch):
    monkeypatch.setattr(knobs, "interpret", lambda: False)  # inspect refuses the interpreter before the names
    error = _refused("inspect", "--suite", "smoke", "--layer", "smoke-grouped-s3")
    assert "did you mean 'smoke-grouped-s2' or 'smoke-grouped'?" in error, error


def test_a_layer_of_another_suite_says_which(no_work):
    error = _refused("bench", "--device", "cpu", "--layer", "resnext50-l1")
    assert "not in suite 'smoke' (it is in --suite headline)" in error


def test_click_suggests_flags():
    assert "'--layout'" in _refused("bench", "--layot", "nhwc").split("Did you mean")[1]


def test_gpu_check_says_which_python_it_runs(tmp_path):
    """The README's .venv when it imports torch, else the system python3 (the GPU machine's)."""
    script = ROOT / "scripts" / "gpu_check.sh"
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    here = subprocess.run(["bash", str(script), "--which-python"], capture_output=True, text=True, env=env,
                          timeout=120)
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists():
        assert here.stdout.strip() == f"python: {venv} (the repository's .venv, which imports torch)"
    (tmp_path / "scripts").mkdir()
    shutil.copy(script, tmp_path / "scripts" / "gpu_check.sh")  # a checkout without a .venv
    bare = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh"), "--which-python"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert bare.stdout.strip() == "python: python3 (the system python3: no .venv here that imports torch)"


def test_inspect_shows_progress_and_no_fp_fusion_warning(tmp_path):
    """Compiled for sm_90 on the CPU with the interpreter off, in a subprocess (conftest turns it on here)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env.update(GCONVGEN_CACHE_DIR=str(tmp_path / "cache"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    run = subprocess.run([sys.executable, "-m", "gconvgen", "inspect", "--suite", "smoke", "--layer", "smoke-dw3",
                          "--layout", "nhwc", "--kind", "forward"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "smoke-dw3 nhwc" in run.stdout and "compiling for sm_90" in run.stderr and "1/1" in run.stderr
    header, row = run.stdout.splitlines()[0], next(line for line in run.stdout.splitlines() if "smoke-dw3" in line)
    stores = header.index("stores")  # the kernel's global stores by width, under their column
    assert re.fullmatch(r"(\d+:\d+ ?)+", row[stores:header.index("async")].strip()), row
    assert "TRITON_DEFAULT_FP_FUSION" not in run.stderr + run.stdout
