"""A user's model end to end: the grouped convs one run records (model_calls), gconvgen.tune and
gconvgen.report on it, their command lines (``--model module:factory --input SHAPE``) and the compile
backend's summary line. Tiny models (a two-block depthwise model at 1x8x8x8) under Triton's interpreter."""
from __future__ import annotations

import copy
import json
import logging
import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import gconvgen
import gconvgen.integrations.compile
from gconvgen import knobs
from gconvgen.autotune import estimate, tuner
from gconvgen.autotune.database import key_of
from gconvgen.autotune.space import Problem
from gconvgen.autotune.tuner import Trial, TuningResult
from gconvgen.tools.cli import main
from gconvgen.ir import ConvSpec
from gconvgen.tools.model_calls import FUNCTIONAL, MODULE, ModelRunError, record_calls
from gconvgen.autotune import choice


pytestmark = pytest.mark.usefixtures("own_tuning_database")  # conftest.py


MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
            self.bn = nn.BatchNorm2d(channels)
            self.pw = nn.Conv2d(channels, channels, 1)

        def forward(self, x):
            return x + self.pw(torch.relu(self.bn(self.dw(x))))


    def make_model():
        return nn.Sequential(Block(8), Block(8))
''')


class Block(nn.Module):
    """depthwise 3x3 -> BN -> ReLU -> pointwise, with a skip (MobileNet's shape)."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.pw(torch.relu(self.bn(self.dw(x))))


class Functional(nn.Module):
    """A grouped F.conv2d in a module's own forward: the compile backend's to rewrite, not convert's."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 2, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1, groups=x.shape[1] // 2)


def two_blocks() -> nn.Module:
    return nn.Sequential(Block(8), Block(8))


def _fake_tune(problem, device, **kwargs):
    """The tuner's result without the interpreter's time: aten won at 0.05 ms, a kernel took 5 ms."""
    key = key_of(problem, "interpreter", False)
    return TuningResult(problem, key, "fake timer", (Trial("aten", None, "ok", 0.05),))


def test_record_names_each_layer_and_its_gradient_kernels_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), Functional(8))
    before = copy.deepcopy(model.state_dict())
    recording = record_calls(model, torch.randn(1, 3, 8, 8), backward=True)
    seen = [(call.layer, call.route, call.problem.kind) for call in recording.calls]
    assert seen == [("1.dw", MODULE, "forward"), ("2.dw", MODULE, "forward"), ("3", FUNCTIONAL, "forward"),
                    ("3", FUNCTIONAL, "grad_input"), ("3", FUNCTIONAL, "grad_weight"),   # backward runs in reverse
                    ("2.dw", MODULE, "grad_input"), ("2.dw", MODULE, "grad_weight"),
                    ("1.dw", MODULE, "grad_input"), ("1.dw", MODULE, "grad_weight")]
    assert len(recording.problems()) == 6  # the two blocks share their three problems
    assert type(model[1].dw) is nn.Conv2d  # not converted: a copy ran
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # BN stats too


def test_recorded_problems_are_the_keys_a_later_run_looks_up():
    model = two_blocks().to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    recorded = {key_of(call.problem, "interpreter", False) for call in record_calls(model, x, backward=True).calls}
    looked_up = set()

    def spy(spec, kind, device, batch, height, width):
        looked_up.add(key_of(Problem(spec, batch, height, width, kind), "interpreter", False))
        return choice.database_choice(spec, kind, device, batch, height, width)

    with choice.overridden(spy):
        gconvgen.convert(model)(x).sum().backward()
    assert looked_up == recorded and len(recorded) == 3  # nhwc forward, grad_input, grad_weight


def test_tune_tunes_each_problem_once_then_finds_it_in_the_database(capsys):
    model = two_blocks()
    outcome = gconvgen.tune(model, torch.randn(1, 8, 8, 8))  # the real tuner, in the interpreter
    assert [(row.layer, row.status) for row in outcome.rows] == [("0.dw", "tuned"), ("1.dw", "tuned")]
    printed = capsys.readouterr()
    assert "0.dw" in printed.out and "vs aten" in printed.out and "Triton's interpreter" in printed.out
    assert "estimated" in printed.err  # said before the work
    again = gconvgen.tune(model, torch.randn(1, 8, 8, 8), quiet=True)
    assert {row.status for row in again.rows} == {"already tuned"} and again.rows[0].record == outcome.rows[0].record
    assert capsys.readouterr().out == ""


def test_tune_estimates_a_real_size_layer_and_refuses_it_over_the_bound(monkeypatch):
    monkeypatch.setattr(tuner, "tune", _fake_tune)
    with pytest.raises(ValueError, match=r"would take about .* over max_minutes=10; pass max_minutes=\d+"):
        gconvgen.tune(nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.randn(1, 16, 112, 112))
    small = estimate.calibration_problem(Problem(ConvSpec(16, 16, 16, (3, 3), padding=(1, 1, 1, 1)), 8, 112, 112))
    assert small.batch == 1 and small.output_size == (16, 16)
    assert estimate.duration_text(30) == "about 30 s" and estimate.duration_text(5400) == "about 1.5 h"


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: gconvgen.tune("model", torch.randn(1)), TypeError, "model must be an nn.Module"),
    (lambda: gconvgen.tune(two_blocks(), {"x": 1}), TypeError, "example_inputs=dict is not a tensor"),
    (lambda: gconvgen.tune(two_blocks(), torch.randn(1, 8, 8, 8), backward=1), TypeError, "backward=1"),
    (lambda: gconvgen.tune(two_blocks(), torch.randn(1, 8, 8, 8), max_minutes=0), TypeError, "max_minutes=0"),
    (lambda: gconvgen.tune(two_blocks(), torch.randn(1, 8, 8, 8), layers="0.dw"), TypeError, "['0.dw']"),
    (lambda: gconvgen.tune(two_blocks(), torch.randn(1, 8, 8, 8), layers=["0.d"]), ValueError,
     "did you mean '0.dw'"),                                                    # a typo of a layer name
    (lambda: gconvgen.tune(two_blocks(), torch.randn(1, 7, 8, 8)), ModelRunError, "inputs 1x7x8x8"),
    (lambda: gconvgen.report(two_blocks(), torch.randn(1, 8, 8, 8), torch_compile="no"), TypeError,
     "torch_compile='no'"),
])
def test_api_errors_name_the_argument_and_the_fix(call, error, fragment, monkeypatch):
    monkeypatch.setattr(tuner, "tune", _fake_tune)
    with pytest.raises(error) as raised:
        call()
    assert fragment in str(raised.value)


def test_tune_on_cpu_without_the_interpreter_says_how_to_turn_it_on():
    with knobs.scoped(INTERPRET=0), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gconvgen.tune(two_blocks(), torch.randn(1, 8, 8, 8))


def test_report_says_which_kernel_ran_and_times_layers_and_the_whole_model(capsys):
    result = gconvgen.report(two_blocks(), torch.randn(1, 8, 8, 8), torch_compile=False)
    (layer,) = result.layers
    assert layer.layers == ("0.dw", "1.dw") and layer.bench.correct and layer.bench.aten_ms > 0
    assert [step.step for step in result.steps] == ["forward", "forward + backward"]
    assert all(step.correct and step.eager_ms > 0 and step.gconvgen_ms > 0 for step in result.steps)
    text = str(result)
    assert text.count("say nothing about GPU speed") == 1 and "compile ms" not in text  # said once; no n/a column
    assert "0.dw, 1.dw" in text and "kernel: what ran for the layer" in text and "floor ms" not in text
    assert "floor ms" in result.format(verbose=True)
    assert json.loads(json.dumps(result.as_dict(), default=str))["layers"][0]["layers"] == ["0.dw", "1.dw"]


def _run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    (tmp_path / "tiny_model.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "tiny_model.py"


def test_cli_tune_model_from_a_module_name_and_a_file(model_file, monkeypatch):
    monkeypatch.setattr(tuner, "tune", _fake_tune)
    output = _run("tune", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--device", "cpu", "--force")
    assert "0.dw" in output and "1.dw" in output and "tuned" in output and "tuning database:" in output
    output = _run("tune", "--model", f"{model_file}:make_model", "--input", "1x8x8x8", "--layer", "1.dw")
    assert "already tuned" in output and "0.dw" not in output.split("gconvgen.tune:")[1]


def test_cli_bench_model_prints_the_tables_and_writes_json(model_file, tmp_path):
    report = tmp_path / "report.json"
    output = _run("bench", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--device", "cpu",
                  "--no-compile", "--json", str(report))
    assert "whole model" in output and "forward + backward" in output and "vs F.conv2d" in output
    assert output.count("NOTE:") == 1 and "say nothing about GPU speed" in output  # said once
    (data,) = json.loads(report.read_text())
    assert data["layers"][0]["layers"] == ["0.dw", "1.dw"] and data["note"]


@pytest.mark.parametrize("args, fragments", [
    (["tune", "--model", "nope:make", "--input", "1x8x8x8"], ["'--model'", "no module named 'nope'"]),
    (["tune", "--model", "tiny_model:mak_model", "--input", "1x8x8x8"], ["did you mean 'make_model'"]),
    (["tune", "--model", "tiny_model", "--input", "1x8x8x8"], ["is not module:factory"]),
    (["tune", "--model", "missing.py:make", "--input", "1x8"], ["the file 'missing.py' does not exist"]),
    (["tune", "--model", "tiny_model:make_model"], ["needs the shape of its input", "--input 1x3x224x224"]),
    (["tune", "--input", "1x8"], ["--input", "add --model"]),
    (["tune", "--model", "tiny_model:make_model", "--input", "1xab"], ["'1xab' is not a shape"]),
    (["tune", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--suite", "smoke"], ["give one"]),
    (["tune", "--max-minutes", "3"], ["--max-minutes applies to --model only"]),
    (["tune", "--model", "tiny_model:make_model", "--input", "1x8x224x224"], ["about", "--max-minutes 10",
                                                                               "pass --max-minutes"]),
    (["tune", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--layer", "0.d"], ["did you mean '0.dw'"]),
    (["tune", "--model", "tiny_model:make_model", "--input", "1x7x8x8"], ["failed on --input 1x7x8x8"]),
    (["tune", "--model", "tiny_model:make_model", "--input", "1x8x8", "--layout", "nhwc"], ["is not 4-D"]),
    (["bench", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--plot", "a.png"], ["--plot a.png"]),
    (["bench", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--backward"], ["add --tune"]),
    (["bench", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--block", "bn-act"], ["drop --block"]),
    (["bench", "--model", "tiny_model:make_model", "--input", "1x8x8x8", "--layer", "0.dw"], ["drop --layer"]),
])
def test_cli_model_flags_are_refused_in_one_line(args, fragments, model_file, monkeypatch):
    monkeypatch.setattr(tuner, "tune", _fake_tune)
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    assert all(fragment in errors[0] for fragment in fragments), errors[0]


def test_compile_backend_says_what_it_rewrote_once_per_graph(capsys, caplog):
    model = two_blocks().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=gconvgen.integrations.compile.make_backend("aot_eager"))
    with caplog.at_level(logging.INFO, logger="gconvgen.integrations.compile"):
        compiled(torch.randn(1, 8, 8, 8))
        compiled(torch.randn(1, 8, 8, 8))  # no new graph: no new line
    assert capsys.readouterr().err.count("gconvgen: rewrote 2 grouped convs (2 fused: 2 BN+relu)") == 1
    assert "(0.dw) -> gconvgen.conv2d with BN+relu fused" in caplog.text
    assert "2 grouped conv(s) now run by gconvgen" in caplog.text
    logging.getLogger(gconvgen.integrations.compile.SUMMARY_LOGGER).setLevel(logging.WARNING)  # how a user silences it
    try:
        torch._dynamo.reset()
        torch.compile(model, backend=gconvgen.integrations.compile.make_backend("aot_eager"))(torch.randn(1, 8, 8, 8))
        assert "gconvgen: rewrote" not in capsys.readouterr().err
    finally:
        logging.getLogger(gconvgen.integrations.compile.SUMMARY_LOGGER).setLevel(logging.INFO)
