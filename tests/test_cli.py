"""The command line on the smoke suite, as a newcomer runs it on CPU (Triton's interpreter)."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gconvgen.tools import bench
from gconvgen import knobs
from gconvgen.autotune import measure, tuner
from gconvgen.autotune.database import database
from gconvgen.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = {"layer", "layout", "dtype", "choice", "gconvgen_ms", "kernel_ms", "aten_ms", "speedup", "floor_ms",
              "pct_of_floor", "aten_pct_of_floor", "bound", "bytes", "flops", "correct", "unresolved"}


def _run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("command", [
    [],                   # the group
    ["plan"],
    ["tune"],
    ["bench"],
    ["cache"],
    ["cache", "info"],
    ["cache", "clear"],
    ["cache", "export"],
])
def test_every_command_has_help(command):
    assert "Usage:" in _run(*command, "--help").output


HELP_IMPORTS = """
import sys
from gconvgen.tools.cli import main
try:
    main(["--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "triton"))
assert not heavy, heavy[:5]
"""


def test_help_imports_neither_torch_nor_triton_and_shows_whole_descriptions():
    run = subprocess.run([sys.executable, "-c", HELP_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    output = " ".join(run.stdout.split())  # the formatter wraps long descriptions; they must not be cut
    assert "bench Time gconvgen against F.conv2d (cudnn.benchmark on, same layout and dtype) and the roofline " \
           "floor." in output and "..." not in output.split("Commands:")[1]
    assert "and the shipped databases." in " ".join(_run("cache", "--help").output.split())


def test_version_is_printed():
    assert _run("--version").output.startswith("gconvgen, version ")


def test_plan_explains_the_passes_and_prints_the_kernel():
    layer = ("--in-channels", "11", "--out-channels", "12", "--groups", "3")
    output = _run("plan", *layer, "--kernel", "3", "--padding", "1", "--channel-policy", "pad").output
    assert "PadInputChannels" in output and "mask_input_channels=True" in output
    assert "kernel: igemm_rows_ci11_co12_g3_k3x3" in output and "@triton.jit" in output and "tl.dot" in output
    depthwise = ("--in-channels", "96", "--out-channels", "96", "--groups", "96")
    banded = _run("plan", *depthwise, "--kernel", "7", "--padding", "3", "--family", "depthwise").output
    assert "families=('depthwise_gemm', 'depthwise', 'depthwise_dense')" in banded
    assert "kernel: depthwise_ci96" in banded
    refused = _run("plan", *depthwise, "--family", "igemm", code=2).output
    assert "--family igemm cannot compute ConvSpec(in_channels=96, " in refused  # the spec stays as printed


def test_errors_name_cli_flags_not_python_keywords():
    strict = _run("plan", "--in-channels", "11", "--out-channels", "12", "--groups", "3", code=2).output
    assert "--in-channels 11 is not divisible by --groups 3" in strict and "pass --channel-policy pad" in strict
    assert "=" not in strict.split("Error:")[1]
    over_budget = _run("plan", "--in-channels", "10", "--out-channels", "12", "--groups", "4", "--channel-policy",
                       "pad", "--padding-budget", "0.01", code=2).output
    assert "use one of --groups 2 or 1" in over_budget
    assert "(--padding-budget or GCONVGEN_PADDING_BUDGET)" in over_budget
    assert "=" not in over_budget.split("Error:")[1]


def test_tune_records_the_smoke_layer_and_skips_it_next_time():
    output = _run("tune", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nhwc").output
    assert "smoke-dw3 nhwc:" in output and "trials" in output and "say nothing about GPU speed" in output
    assert database().describe()["records"] >= 1
    assert "already tuned" in _run("tune", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nhwc").output


def test_tune_backward_records_both_gradient_kernels():
    before = database().describe()["records"]
    output = _run("tune", "--suite", "smoke", "--layer", "smoke-grouped-s2", "--layout", "nchw", "--backward").output
    assert all(f"smoke-grouped-s2 nchw{kind}:" in output for kind in ("", " grad_input", " grad_weight")), output
    assert database().describe()["records"] == before + 3


def test_bench_writes_a_table_and_json_with_every_field(tmp_path):
    report = tmp_path / "bench.json"
    output = _run("bench", "--suite", "smoke", "--layer", "smoke-grouped", "--layer", "smoke-dw3",
                  "--json", str(report), "--markdown", str(tmp_path / "bench.md")).output
    assert "geomean (all)" in output and "F.conv2d ms" in output and "say nothing about GPU speed" in output
    data = json.loads(report.read_text())
    assert {"schema_version", "suite", "environment", "timer", "ceilings", "rows", "geomean", "note", "deferred",
            "failed"} <= set(data) and data["failed"] == []
    for rate in ("copy_GB_per_s", "matmul_TFLOP_per_s"):  # None: unresolved on a machine busy with more
        assert data["ceilings"][rate] is None or data["ceilings"][rate] > 0
    assert "cpu-interpreter" in data["timer"] and data["note"]
    assert {(row["layer"], row["layout"]) for row in data["rows"]} == {
        ("smoke-grouped", "nchw"), ("smoke-grouped", "nhwc"), ("smoke-dw3", "nchw"), ("smoke-dw3", "nhwc")}
    for row in data["rows"]:
        assert ROW_FIELDS <= set(row) and row["correct"]
        if {"gconvgen", "F.conv2d"} & set(row["unresolved"]):  # a busy machine: no ratio rather than a wrong one
            assert row["speedup"] is None
        else:
            assert row["speedup"] == pytest.approx(row["aten_ms"] / row["gconvgen_ms"])
            assert row["pct_of_floor"] > 0 if row["floor_ms"] else row["pct_of_floor"] is None
    assert set(data["geomean"]) == {"nchw", "nhwc", "all"} and data["geomean"]["all"]["layers"] == 4
    assert "| layer |" in (tmp_path / "bench.md").read_text()
    assert "0.00x" not in output  # the interpreter is ~1000x slower than F.conv2d: three significant digits


def _coarse_clock() -> int:
    """perf_counter_ns in steps of 8 ms, like the clock that made F.conv2d read 0.05 ms or 8 ms."""
    return time.perf_counter_ns() // 8_000_000 * 8_000_000


def test_bench_reports_no_ratio_for_times_the_clock_cannot_resolve(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "timer_for", lambda device, **kwargs: measure.Timer(
        measure.CPU_TIMER_LABEL, False, clock=_coarse_clock, **kwargs))
    report = tmp_path / "bench.json"
    output = _run("bench", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nchw", "--json", str(report)).output
    (row,) = json.loads(report.read_text())["rows"]
    assert "F.conv2d" in row["unresolved"] and "clock step of 8 ms" in row["unresolved"]["F.conv2d"]
    assert row["speedup"] is None and row["aten_pct_of_floor"] is None
    table = output.split("F.conv2d ms")[1].split("unresolved: ")[0]
    assert "unresolved" in table and "n/a" in table and not re.search(r"\dx\b", table)  # no speedup printed
    assert "unresolved: smoke-dw3 nchw F.conv2d time" in output


def _simulated(call_ns: int, step_ns: int = 1):
    """A clock that a call advances by ``call_ns`` and each reading by 1 µs, read in steps of ``step_ns``."""
    now = [0]

    def clock() -> int:
        now[0] += 1_000
        return now[0] // step_ns * step_ns

    def call() -> None:
        now[0] += call_ns

    return clock, call


def test_cpu_timer_batches_fast_calls_into_samples_the_clock_resolves():
    clock, call = _simulated(call_ns=50_000)  # F.conv2d of a smoke layer: 0.05 ms
    timing = measure.Timer(measure.CPU_TIMER_LABEL, False, clock=clock).time(call)
    assert timing.resolved and timing.ms == pytest.approx(0.05, rel=0.05)
    assert timing.calls_per_sample * 0.05 >= 1 and timing.samples >= 3  # each sample lasts >= 1 ms
    clock, call = _simulated(call_ns=70_000_000)  # an interpreter run: one call a sample
    timing = measure.Timer(measure.CPU_TIMER_LABEL, False, clock=clock).time(call)
    assert timing.resolved and timing.calls_per_sample == 1 and timing.ms == pytest.approx(70, rel=0.01)


def test_cpu_timer_marks_a_call_below_a_coarse_clock_unresolved():
    clock, call = _simulated(call_ns=50_000, step_ns=8_000_000)
    timing = measure.Timer(measure.CPU_TIMER_LABEL, False, clock=clock).time(call)
    assert not timing.resolved and "clock step of 8 ms" in timing.why
    assert bench.ratio_text(None) == "n/a" and bench.ratio_text(0.00262) == "0.00262x"


def test_bench_backward_times_forward_and_backward_against_torch(tmp_path):
    report = tmp_path / "bench.json"
    output = _run("bench", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nhwc", "--backward",
                  "--json", str(report)).output
    assert "forward + backward, gconvgen against PyTorch eager" in output and "geometric-mean speedup" in output
    (row,) = json.loads(report.read_text())["backward"]
    assert row["id"] == "smoke-dw3 nhwc" and row["gconvgen_ms"] > 0 and row["torch_ms"] > 0
    if row["resolved"]:
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["gconvgen_ms"])
    else:
        assert row["speedup"] is None


def test_bench_plot_without_matplotlib_fails_before_benchmarking(tmp_path, monkeypatch):
    def no_benchmark(*args, **kwargs):
        raise AssertionError("benchmarked before saying --plot cannot work")

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # hidden: importing it raises ImportError
    monkeypatch.setattr(bench, "measure_ceilings", no_benchmark)
    monkeypatch.setattr(tuner, "tune", no_benchmark)
    output = _run("bench", "--tune", "--layer", "smoke-dw3", "--plot", str(tmp_path / "bench.png"), code=2).output
    assert "pip install 'gconvgen[plot]'" in output and "--plot" in output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_bench_plot_draws(tmp_path):
    plot = tmp_path / "bench.png"
    _run("bench", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nchw", "--plot", str(plot))
    assert plot.stat().st_size > 1000


def test_ctrl_c_keeps_what_was_tuned(monkeypatch):
    real_tune, calls = tuner.tune, []

    def tune_then_interrupt(problem, device, **kwargs):
        calls.append(problem)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_tune(problem, device, **kwargs)

    monkeypatch.setattr(tuner, "tune", tune_then_interrupt)
    output = _run("tune", "--suite", "smoke", "--layer", "smoke-grouped-s2", "--dtype", "float16", code=130).output
    assert "interrupted: kept the 1 layer(s) tuned so far" in output
    before = database().describe()["records"]
    monkeypatch.setattr(tuner, "tune", real_tune)
    assert "smoke-grouped-s2 nchw: already tuned" in _run("tune", "--suite", "smoke", "--layer", "smoke-grouped-s2",
                                                          "--layout", "nchw", "--dtype", "float16").output
    assert database().describe()["records"] == before


def test_bad_input_names_the_parameter_and_the_fix():
    assert "--suite nope is neither a shipped suite (headline, offsuite, secondary, sequence, smoke)" in _run(
        "tune", "--suite", "nope", code=2).output
    assert "--layer nope is not in suite 'smoke'" in _run("bench", "--layer", "nope", code=2).output
    assert "use --device cpu" in _run("bench", "--device", "cuda", code=2).output


def test_headline_on_cpu_runs_the_smoke_suite_instead(monkeypatch):
    tuned = []

    def stop(problem, device, **kwargs):
        tuned.append(problem)
        raise KeyboardInterrupt

    monkeypatch.setattr(tuner, "tune", stop)
    output = _run("tune", "--suite", "headline", "--force", code=130).output
    assert "running the 'smoke' suite instead" in output and tuned[0].batch * tuned[0].height ** 2 <= 256
    # a --layer of it is not dropped for the whole smoke suite: it is refused, saying why (test_cli_flags.py)


def test_cache_info_says_where_the_directory_came_from(tmp_path, monkeypatch):
    with knobs.scoped(CACHE_DIR=tmp_path / "chosen"):
        assert f"cache directory: {tmp_path / 'chosen'}  (from GCONVGEN_CACHE_DIR)" in _run("cache", "info").output
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with knobs.scoped(CACHE_DIR=""):  # as if GCONVGEN_CACHE_DIR were unset
        output = _run("cache", "info").output
    assert f"cache directory: {tmp_path / 'xdg' / 'gconvgen'}  (the default under $XDG_CACHE_HOME" in output
    assert "from GCONVGEN_CACHE_DIR" not in output


def test_cache_info_export_and_clear(tmp_path):
    database().record({"some-key": {"choice": "aten"}})
    assert "tuning database:" in _run("cache", "info").output
    assert "tuning records to" in _run("cache", "export", str(tmp_path / "shipped.json")).output
    assert json.loads((tmp_path / "shipped.json").read_text())["entries"]["some-key"] == {"choice": "aten"}
    output = _run("cache", "clear").output
    assert "removed" in output and database().lookup("some-key") is None
    assert "0 records" in _run("cache", "info").output


def test_bench_block_bn_act_checks_and_times_the_fused_block(tmp_path):
    """The conv -> BN -> activation block, fused, against eager torch: checked correct, bytes reported."""
    out = tmp_path / "block.json"
    result = _run("bench", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nhwc", "--block", "bn-act",
                 "--activation", "hardswish", "--no-compile", "--json", str(out))
    assert "smoke-dw3 nhwc" in result.output and "hardswish" in result.output
    [row] = json.loads(out.read_text())
    assert row["correct"] and row["activation"] == "hardswish" and row["fused_bytes"] < row["eager_bytes"]
