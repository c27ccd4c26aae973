"""The command line on the smoke suite, as a newcomer runs it on CPU (Triton's interpreter)."""
from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from gconvgen.autotune import tuner
from gconvgen.autotune.database import database
from gconvgen.cli import main

ROW_FIELDS = {"layer", "layout", "dtype", "choice", "gconvgen_ms", "kernel_ms", "aten_ms", "speedup", "floor_ms",
              "pct_of_floor", "aten_pct_of_floor", "bound", "bytes", "flops", "correct"}


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


def test_plan_explains_the_passes_and_prints_the_kernel():
    layer = ("--in-channels", "11", "--out-channels", "12", "--groups", "3")
    output = _run("plan", *layer, "--kernel", "3", "--padding", "1", "--channel-policy", "pad").output
    assert "PadInputChannels" in output and "mask_input_channels=True" in output
    assert "kernel: igemm_ci11_co12_g3_k3x3" in output and "@triton.jit" in output and "tl.dot" in output
    depthwise = ("--in-channels", "96", "--out-channels", "96", "--groups", "96")
    banded = _run("plan", *depthwise, "--kernel", "7", "--padding", "3", "--family", "depthwise").output
    assert "families=('depthwise_gemm', 'depthwise')" in banded and "kernel: depthwise_ci96" in banded
    refused = _run("plan", *depthwise, "--family", "igemm", code=2).output
    assert "family='igemm' cannot compute" in refused
    strict = _run("plan", *layer, code=2).output
    assert "in_channels=11 is not divisible by groups=3" in strict and "channel_policy='pad'" in strict


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
    assert data["ceilings"]["copy_GB_per_s"] > 0 and data["ceilings"]["matmul_TFLOP_per_s"] > 0
    assert "cpu-interpreter" in data["timer"] and data["note"]
    assert {(row["layer"], row["layout"]) for row in data["rows"]} == {
        ("smoke-grouped", "nchw"), ("smoke-grouped", "nhwc"), ("smoke-dw3", "nchw"), ("smoke-dw3", "nhwc")}
    for row in data["rows"]:
        assert ROW_FIELDS <= set(row) and row["correct"] and row["speedup"] > 0 and 0 < row["pct_of_floor"]
        assert row["speedup"] == pytest.approx(row["aten_ms"] / row["gconvgen_ms"])
    assert set(data["geomean"]) == {"nchw", "nhwc", "all"} and data["geomean"]["all"]["layers"] == 4
    assert "| layer |" in (tmp_path / "bench.md").read_text()


def test_bench_backward_times_forward_and_backward_against_torch(tmp_path):
    report = tmp_path / "bench.json"
    output = _run("bench", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nhwc", "--backward",
                  "--json", str(report)).output
    assert "forward + backward, gconvgen against PyTorch eager" in output and "geometric-mean speedup" in output
    (row,) = json.loads(report.read_text())["backward"]
    assert row["id"] == "smoke-dw3 nhwc" and row["gconvgen_ms"] > 0 and row["torch_ms"] > 0
    assert row["speedup"] == pytest.approx(row["torch_ms"] / row["gconvgen_ms"])


def test_bench_plot_draws_or_says_how_to_install_matplotlib(tmp_path):
    plot = tmp_path / "bench.png"
    args = ("bench", "--suite", "smoke", "--layer", "smoke-dw3", "--layout", "nchw", "--plot", str(plot))
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install 'gconvgen[plot]'" in _run(*args, code=1).output
    else:
        _run(*args)
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
    assert "neither a shipped suite (headline, secondary, smoke)" in _run("tune", "--suite", "nope", code=2).output
    assert "layer='nope' is not in suite 'smoke'" in _run("bench", "--layer", "nope", code=2).output
    assert "use --device cpu" in _run("bench", "--device", "cuda", code=2).output


def test_headline_on_cpu_runs_the_smoke_suite_instead(monkeypatch):
    tuned = []

    def stop(problem, device, **kwargs):
        tuned.append(problem)
        raise KeyboardInterrupt

    monkeypatch.setattr(tuner, "tune", stop)
    output = _run("tune", "--suite", "headline", "--layer", "resnext50-l1", "--force", code=130).output
    assert "running the 'smoke' suite instead" in output and tuned[0].batch * tuned[0].height ** 2 <= 256


def test_cache_info_export_and_clear(tmp_path):
    database().record({"some-key": {"choice": "aten"}})
    assert "tuning database:" in _run("cache", "info").output
    assert "tuning records to" in _run("cache", "export", str(tmp_path / "shipped.json")).output
    assert json.loads((tmp_path / "shipped.json").read_text())["entries"]["some-key"] == {"choice": "aten"}
    output = _run("cache", "clear").output
    assert "removed" in output and database().lookup("some-key") is None
    assert "0 records" in _run("cache", "info").output
