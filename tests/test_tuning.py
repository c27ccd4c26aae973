"""The tuner, the search spaces, the suites and the runtime's use of tuning results, on Triton's interpreter."""
from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

import gconvgen
from gconvgen import knobs
from gconvgen.autotune import choice, suites, tuner
from gconvgen.autotune.database import ATEN, DB_SCHEMA_VERSION, choice_of, database, kernel_record, key_of
from gconvgen.compiler.plan import grad_input_offers
from gconvgen.autotune.space import DeviceFacts, Problem, load_space
from gconvgen.ir import ConvSpec
from gconvgen.compiler.lowering import KernelConfig, default_config
from gconvgen.ops import backward, conv2d as ops
from gconvgen.runtime import launch
from gconvgen.ops.dispatch import activation_layout
from conftest import assert_close, reference_conv2d, spy_on_kernels

P = pytest.param

CPU = torch.device("cpu")
H200 = DeviceFacts("NVIDIA H200 sm_90", multiprocessors=132, shared_memory_bytes=232448, l2_bytes=60 << 20)


def _problem(in_channels, out_channels, groups, kernel, stride, padding, batch, size, *, dtype="float32",
             layout="nchw", bias=False, policy="strict"):
    spec = ConvSpec(in_channels, out_channels, groups, (kernel, kernel), (stride, stride), (padding,) * 4,
                    bias=bias, dtype=dtype, layout=layout, channel_policy=policy)
    return Problem(spec, batch, size, size)


# ---------------------------------------------------------------------------------------------- the tuner


def test_tuner_rejects_wrong_candidates_and_drops_failing_ones():
    problem = _problem(16, 16, 4, 3, 1, 1, 2, 8, layout="nhwc")  # grouped, 4 channels per group, channels_last

    def zeros(x, weight, bias, out):  # the fastest candidate of all, and wrong
        return out.zero_()

    def one_element_off(x, weight, bias, out):  # the real kernel with one output nudged by 0.05
        launch.forward(problem.spec, x, weight, bias, out)
        out[1, 5, 2, 3] += 0.05
        return out

    result = tuner.tune(problem, CPU, extra_runners=[("zeros", zeros), ("one-element-off", one_element_off)],
                        extra_configs=[KernelConfig(block_m=48, block_n=16, block_k=16)])  # BLOCK_M not a power of 2
    status = {trial.name: trial for trial in result.trials}
    assert status["zeros"].status == "wrong" and status["zeros"].time_ms is None
    assert status["one-element-off"].status == "wrong", status["one-element-off"]
    # on an 8 x 8 map igemm_rows does not suit the launch (IgemmRows.suits), so the untuned call runs the flat
    # igemm: the tuner's "default" and its extra configs are the flat igemm's
    assert status["igemm m48 n16 k16 w4 s2"].status == "failed", status["igemm m48 n16 k16 w4 s2"]
    assert status[ATEN].status == "ok" and status["default"].status == "ok"
    correct = [trial for trial in result.trials if trial.status == "ok"]
    assert len(correct) >= 3 and all(trial.time_ms > 0 for trial in correct)
    assert result.winner.name not in ("zeros", "one-element-off")
    assert result.winner.time_ms == min(trial.time_ms for trial in correct if trial.name in (ATEN,) or trial.config)
    record = result.record()
    assert record["rejected"] == 2 and record["failed"] == 1 and "cpu-interpreter" in record["timer"]
    assert "best_kernel" in record  # kept even when aten wins, for the bench


def test_tuner_drops_a_correct_candidate_that_spills():
    """On a GPU a kernel candidate's compiled kernel says whether it spills (Triton's n_spills, read after its
    check launch); a spilling one is dropped as failed, with the reason, before it is timed."""
    from types import SimpleNamespace
    from gconvgen.autotune.measure import Workload, timer_for
    problem = _problem(16, 16, 4, 3, 1, 1, 2, 8)
    workload = Workload.create(problem, CPU, DeviceFacts("interpreter"), False, seed=0)
    runner = tuner.kernel_runner(problem, "igemm", default_config(problem.spec, "igemm", "forward", interpret=True))
    kept = tuner._try(workload, timer_for(CPU), tuner.Trial("kept", runner.config, ""), runner)
    assert kept.status == "ok" and runner.compiled is None  # the interpreter compiles nothing
    runner.compiled = SimpleNamespace(n_spills=38)  # what a GPU launch of a spilling config leaves
    dropped = tuner._try(workload, timer_for(CPU), tuner.Trial("spilling", runner.config, ""), runner)
    assert dropped.status == "failed" and dropped.time_ms is None and "38 words" in dropped.detail, dropped


def test_every_kernel_candidate_is_a_power_of_two_tile_within_the_layer():
    """Pruning keeps power-of-two tiles no wider than the layer needs."""
    problem = _problem(16, 16, 2, 3, 2, 1, 2, 9, dtype="float16")  # stride 2, odd size, 8 channels per group
    result = tuner.tune(problem, CPU)
    kernels = [trial for trial in result.trials if trial.config is not None]
    assert kernels and all(trial.status == "ok" for trial in result.trials), result.trials
    for trial in kernels:
        if trial.name.endswith("default"):  # each family's default config is a candidate, never pruned
            continue
        blocks = (trial.config.block_m, trial.config.block_n, trial.config.block_k)
        assert all(block & (block - 1) == 0 for block in blocks), trial.config  # powers of two
        assert trial.config.block_n <= 16 and trial.config.block_k <= 64 and trial.config.block_m <= 64


def test_gpu_space_prunes_by_channels_shared_memory_and_occupancy():
    layer = suites.load_suite("headline").select(("resnext50-l1",)).layers[0]
    problem = layer.problem("bfloat16", "nhwc")  # 4 channels per group: only 16-wide channel tiles make sense
    space = load_space("igemm", "gpu")
    first = space.stage_one(problem, H200)
    assert first and {config.block_n for config in first} == {16}
    assert all(config.block_k <= 64 for config in first)  # reduction is 4 * 3 * 3 = 36
    small_gpu = dataclasses.replace(H200, shared_memory_bytes=48 * 1024)
    roomy, cramped = space.stage_two(first, problem, H200), space.stage_two(first, problem, small_gpu)
    assert 0 < len(cramped) < len(roomy)
    assert all(c.num_stages * (c.block_m * c.block_k + c.block_k * c.block_n) * 2 <= 48 * 1024 for c in cramped)
    tiny = _problem(32, 32, 2, 3, 1, 1, 1, 4, dtype="bfloat16")  # 16 pixels: no tile fills 132 SMs
    survivors = space.stage_one(tiny, H200)
    smallest = min(dict(space.tiles)["block_m"])
    assert survivors and all(c.block_m == smallest and c.block_n == 16 for c in survivors)  # the smallest tile stays


def test_depthwise_gpu_space_fits_tiles_to_the_layout():
    layer = suites.load_suite("headline").select(("mbv2-dw3",)).layers[0]
    space = load_space("depthwise", "gpu")
    nchw = space.stage_one(layer.problem("bfloat16", "nchw"), H200)
    nhwc = space.stage_one(layer.problem("bfloat16", "nhwc"), H200)
    assert all(c.block_m >= 64 for c in nchw) and any(c.block_n <= 4 for c in nchw)  # long pixel tiles
    assert all(c.block_n >= 8 for c in nhwc) and any(c.block_n >= 64 for c in nhwc)   # wide channel tiles
    assert all(1024 <= c.block_m * c.block_n <= 4096 for c in nchw + nhwc)


def test_depthwise_tuning_times_every_family_and_records_the_winners():
    problem = _problem(8, 8, 8, 5, 1, 2, 2, 6, layout="nhwc", bias=True)  # depthwise 5x5, channels_last
    result = tuner.tune(problem, CPU)
    families = {trial.family for trial in result.trials if trial.config is not None}
    assert families == {"depthwise", "depthwise_gemm", "depthwise_dense"}
    assert all(trial.status == "ok" for trial in result.trials), [t for t in result.trials if t.status != "ok"]
    assert {"default", "depthwise_gemm default", "depthwise_dense default"} <= {trial.name for trial in result.trials}
    record = result.record()
    winner = result.winner
    assert record["choice"] == (ATEN if winner.config is None else "kernel")
    assert record["best_kernel"]["family"] in families
    if winner.config is not None:
        assert record["family"] == winner.family


@pytest.mark.parametrize("kind", ["grad_input", "grad_weight"])
def test_backward_tuning_checks_every_candidate_against_aten_backward(kind):
    forward = _problem(12, 12, 3, 3, 2, 1, 2, 7, bias=True, layout="nhwc")  # grouped, stride 2, bias
    problem = forward.backward(kind)
    assert not problem.spec.bias and problem.kind == kind

    def zeros(*arguments):  # the fastest candidate of all, and wrong
        return arguments[-1].zero_()

    result = tuner.tune(problem, CPU, extra_runners=[("zeros", zeros)])
    status = {trial.name: trial for trial in result.trials}
    assert status["zeros"].status == "wrong"
    assert status[ATEN].status == "ok" and status["default"].status == "ok", result.trials
    # grad-input: the igemm kernel (at stride 2 no transpose); grad-weight: the flat igemm and the one sliding
    # down the rows, both timed
    families = {"grad_input": {"igemm"}, "grad_weight": {"igemm", "igemm_rows"}}[kind]
    assert {trial.family for trial in result.trials if trial.config is not None} == families
    layer = result.key.split("|")[3]
    assert layer.startswith(f"{kind}_ci12_co12_g3_k3x3_s2x2_") and "igemm" not in layer  # the record names the family
    assert result.record()["choice"] == ATEN or result.record()["family"] in families
    assert result.key != key_of(forward.backward("grad_input" if kind == "grad_weight" else "grad_weight"),
                                "interpreter", False)
    with pytest.raises(ValueError, match="has bias=False .*use Problem.backward"):
        Problem(forward.spec, 2, 7, 7, kind)


def test_strided_depthwise_grad_input_tuning_times_the_direct_and_the_banded_kernel():
    """At a stride a depthwise conv has no transposed forward: grad-input tuning times the direct kernel and the
    banded one (space grad_input_depthwise_gemm) beside aten, every candidate checked against aten's backward;
    the banded GPU space keeps strips of at most 32 columns and tiles within the (row group, strip) pairs."""
    forward = _problem(8, 8, 8, 3, 2, 1, 2, 9, dtype="bfloat16", layout="nhwc")  # MobileNetV2-like dw3 at stride 2
    problem = forward.backward("grad_input")
    result = tuner.tune(problem, CPU)
    routes = {(trial.family, trial.transposed) for trial in result.trials if trial.config is not None}
    assert routes == {("depthwise", False), ("depthwise_gemm", False)}, result.trials
    assert all(trial.status == "ok" for trial in result.trials), result.trials
    layer = suites.load_suite("headline").select(("mbv2-dw3-s2",)).layers[0]
    space = load_space("grad_input_depthwise_gemm", "gpu")
    for layout in ("nhwc", "nchw"):
        configs = space.stage_one(layer.problem("bfloat16", layout).backward("grad_input"), H200)
        assert configs and all(c.block_k <= 32 for c in configs), layout


def test_banded_gpu_space_for_a_31x31_depthwise_layer():
    layer = suites.load_suite("headline").select(("replknet-dw31",)).layers[0]
    space = load_space("depthwise_gemm", "gpu")
    nhwc = space.stage_one(layer.problem("bfloat16", "nhwc"), H200)
    nchw = space.stage_one(layer.problem("bfloat16", "nchw"), H200)
    assert nhwc and nchw
    assert all(c.block_n >= 4 for c in nhwc) and {4, 8} <= {c.block_n for c in nhwc}  # 8- and 16-byte vectors
    assert all(1024 <= c.block_m * c.block_n * c.block_k <= 16384 for c in nhwc + nchw)
    assert {c.block_k for c in nchw} >= {16, 32}                       # narrow and wide strips compete


def test_the_tuners_default_is_what_an_untuned_call_runs_on_a_small_map():
    """ConvNeXt's dw7 on a 7 x 7 map in bfloat16 at batch 8: the dense kernel claims the untuned forward, and at
    stride 1 the input gradient's transposed forward, so the tuner times it first (its "default"), then the
    plan's other offers."""
    problem = _problem(16, 16, 16, 7, 1, 3, 8, 7, dtype="bfloat16", layout="nhwc")
    forward = tuner._search_spaces(problem)
    assert forward[0][:2] == ("depthwise_dense", "depthwise_dense")
    assert {family for family, *_ in forward} == {"depthwise_dense", "depthwise_gemm", "depthwise"}
    grad_input = tuner._search_spaces(problem.backward("grad_input"))
    assert grad_input[0][0] == "depthwise_dense" and grad_input[0][3]  # the transposed forward
    assert ("depthwise", "grad_input_depthwise") in {(family, space) for family, space, *_ in grad_input}
    large = _problem(16, 16, 16, 7, 1, 3, 8, 56, dtype="bfloat16", layout="nhwc")
    assert tuner._search_spaces(large)[0][0] == "depthwise_gemm"


def test_dense_gpu_space_for_a_small_map():
    """RepLKNet's dw27 on 14 x 14 at batch 64: the dense space keeps tiles of at most the batch's samples and an
    image's 196 pixels (256 rounded up), their accumulators within 16384 (8 channels a program in channels_last)."""
    layer = suites.load_suite("secondary").select(("replknet-dw27",)).layers[0]
    space = load_space("depthwise_dense", "gpu")
    for layout, channels in (("nhwc", 8), ("nchw", 1)):
        configs = space.stage_one(layer.problem("bfloat16", layout), H200)
        assert configs and all(c.block_m <= 64 and c.block_n <= 256 and c.block_k <= 64 for c in configs), layout
        assert all(1024 <= channels * c.block_m * c.block_n <= 16384 for c in configs), layout
        assert {c.block_n for c in configs} >= {32, 64}, layout


# ---------------------------------------------------------------------------------------------- the runtime


def _inputs(problem):
    spec = problem.spec
    x = torch.randn(problem.batch, spec.in_channels, problem.height, problem.width)
    if spec.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(spec.weight_shape)
    bias = torch.randn(spec.out_channels) if spec.bias else None
    return x, weight, bias


def _run_op(problem, x, weight, bias):
    spec = problem.spec
    out = gconvgen.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
    assert_close(out, reference_conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups),
                 torch.float32)
    return out


def _spy_on_launch(monkeypatch, kind="forward"):
    """The config of the tuning choice of every ``kind`` launch from now on (None: the default config)."""
    configs = []
    real = getattr(launch, kind)

    def spy(*args, **kwargs):
        call = inspect.signature(real).bind(*args, **kwargs)
        call.apply_defaults()
        configs.append(call.arguments["choice"].config)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, kind, spy)
    return configs


def _spy_on_kernels(monkeypatch):
    """The (kind, family, config) of every kernel loaded for a launch from now on."""
    return spy_on_kernels(monkeypatch, lambda desc: (desc.kind, desc.family, desc.config))


def test_op_runs_the_recorded_config_then_aten_where_aten_won(monkeypatch):
    problem = _problem(16, 16, 16, 3, 1, 1, 2, 7, bias=True, layout="nhwc")  # depthwise with bias, odd size
    x, weight, bias = _inputs(problem)
    key = key_of(problem, "interpreter", allow_tf32=False)
    launches = _spy_on_launch(monkeypatch)

    _run_op(problem, x, weight, bias)  # untuned: the heuristic default, at once
    assert launches == [None]

    tuned = KernelConfig(block_m=64, block_n=8, block_k=0, num_warps=4, num_stages=1)
    database().record({key: {**kernel_record(tuned), "time_ms": 1.0}})
    _run_op(problem, x, weight, bias)
    assert launches[-1] == tuned

    aten_calls = []
    monkeypatch.setattr(ops, "aten_conv2d", lambda *args: aten_calls.append(1) or tuner.aten_conv2d(*args))
    database().record({key: {"choice": ATEN, "time_ms": 1.0}})
    out = _run_op(problem, x, weight, bias)
    assert aten_calls == [1] and len(launches) == 2 and activation_layout(out) == "nhwc"


def test_op_runs_the_recorded_kernel_family(monkeypatch):
    problem = _problem(8, 8, 8, 3, 1, 1, 2, 6, layout="nhwc")  # depthwise 3x3: the direct kernel is the default
    x, weight, bias = _inputs(problem)
    ran = _spy_on_kernels(monkeypatch)
    families = lambda: [family for kind, family, _ in ran if kind == "forward"]  # noqa: E731
    _run_op(problem, x, weight, bias)
    banded = KernelConfig(block_m=16, block_n=8, block_k=16, num_warps=4, num_stages=1)
    database().record({key_of(problem, "interpreter", allow_tf32=False):
                       {**kernel_record(banded, "depthwise_gemm"), "time_ms": 1.0}})
    _run_op(problem, x, weight, bias)
    assert families() == ["depthwise", "depthwise_gemm"]
    assert ran[-1][2] == banded  # with the recorded config
    igemm = KernelConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)  # legal for igemm
    database().record({key_of(problem, "interpreter", allow_tf32=False):  # a family that cannot run a depthwise conv
                       {**kernel_record(igemm, "igemm"), "time_ms": 1.0}})
    with pytest.warns(UserWarning, match="family='igemm' does not compute this conv"):
        _run_op(problem, x, weight, bias)
    assert families()[-1] == "depthwise" and ran[-1][2] == default_config(problem.spec, "depthwise", "forward",
                                                                          interpret=True)  # the planner's default


def test_backward_ops_run_the_recorded_choice(monkeypatch):
    problem = _problem(8, 8, 8, 3, 1, 1, 2, 6, layout="nhwc")  # depthwise, channels_last
    x, weight, _ = _inputs(problem)
    x.requires_grad_()
    weight.requires_grad_()
    grad_weight_calls = []
    grad_input_configs = _spy_on_launch(monkeypatch, "grad_input")
    grad_weight_configs = _spy_on_launch(monkeypatch, "grad_weight")
    real_aten = backward.aten_conv2d_backward
    monkeypatch.setattr(backward, "aten_conv2d_backward", lambda *args: grad_weight_calls.append(args[-1])
                        or real_aten(*args))
    tuned = KernelConfig(block_m=64, block_n=8, block_k=0, num_warps=4, num_stages=1)
    database().record({
        key_of(problem.backward("grad_input"), "interpreter", allow_tf32=False): {**kernel_record(tuned), "time_ms": 1.0},
        key_of(problem.backward("grad_weight"), "interpreter", allow_tf32=False): {"choice": ATEN, "time_ms": 1.0},
    })
    spec = problem.spec
    out = gconvgen.conv2d(x, weight, None, spec.stride, spec.padding, spec.dilation, spec.groups)
    grad_output = torch.randn_like(out)
    grad_x, grad_weight = torch.autograd.grad(out, (x, weight), grad_output)
    assert grad_input_configs == [tuned] and grad_weight_calls == [(False, True)] and grad_weight_configs == []
    x64, weight64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference_conv2d(x64, weight64, None, spec.stride, spec.padding, spec.dilation,
                                                    spec.groups), (x64, weight64), grad_output.double())
    assert_close(grad_x, expected[0], torch.float32)
    assert_close(grad_weight, expected[1], torch.float32)


# a tuning record's config with one field changed to what no kernel of the grouped conv below can run
UNUSABLE_CONFIGS = [
    P({"block_n": 0}, "block_n=0 is not legal for the igemm_rows family", id="block-n-0"),
    P({"block_m": 0}, "block_m=0 is not legal for the igemm_rows family", id="block-m-0"),
    P({"block_k": 0}, "block_k=0 is not legal for the igemm_rows family", id="block-k-0-igemm"),  # a tl.dot needs 16
    P({"block_n": 3}, "block_n=3 is not legal for the igemm_rows family", id="block-n-3"),        # not a power of two
    P({"block_m": "64"}, "block_m='64' must be an int", id="block-m-string"),
    P({"num_warps": 3}, "num_warps=3 must be one of", id="num-warps-3"),
    P({"num_stages": 0}, r"num_stages=0 must be in \[1, 8\]", id="num-stages-0"),
]


@pytest.mark.parametrize("change, why", UNUSABLE_CONFIGS)
def test_an_unusable_record_is_ignored_with_a_warning_and_the_default_runs(change, why, tmp_path, monkeypatch,
                                                                            nan_filled_outputs):
    """A hand-edited or damaged database (record() refuses to write such records, so the file is written
    directly): the call warns, runs the default config and is correct, at the record's batch size and at
    another one that borrows the record (the nearest tuned batch size)."""
    problem = _problem(8, 16, 2, 3, 1, 1, 2, 5, bias=True)  # grouped igemm, 4 inputs and 8 outputs per group
    config = {**dataclasses.asdict(KernelConfig(64, 16, 16, num_warps=4, num_stages=1)), **change}
    default = default_config(problem.spec, "igemm", "forward", interpret=True)
    ran = _spy_on_kernels(monkeypatch)
    with knobs.scoped(CACHE_DIR=tmp_path):  # a database of its own
        path = database().path
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"schema_version": DB_SCHEMA_VERSION, "entries": {
            key_of(problem, "interpreter", allow_tf32=False): {"choice": "kernel", "config": config, "time_ms": 1.0}}}))
        for batch in (2, 3):  # 3: untuned, runs the record of batch 2
            key = key_of(dataclasses.replace(problem, batch=batch), "interpreter", allow_tf32=False)
            assert database().lookup_nearest(key)["config"] == config
            assert (database().lookup(key) is None) == (batch == 3)
            x, weight, bias = _inputs(dataclasses.replace(problem, batch=batch))
            with pytest.warns(UserWarning, match=f"ignoring the tuning record for '.*n{batch}_h5_w5.*'.*{why}"):
                _run_op(problem, x, weight, bias)
            assert ran[-1] == ("forward", "igemm", default)


def test_untuned_call_never_tunes_unless_asked(monkeypatch):
    problem = _problem(8, 16, 4, 3, 1, 0, 2, 6, layout="nhwc")  # grouped, channel multiplier 2, no padding
    x, weight, bias = _inputs(problem)
    key = key_of(problem, "interpreter", allow_tf32=False)
    calls = []
    real_tune = choice.tune
    monkeypatch.setattr(choice, "tune", lambda *args, **kwargs: calls.append(args) or real_tune(*args, **kwargs))

    _run_op(problem, x, weight, bias)
    assert calls == [] and database().lookup(key) is None

    with knobs.scoped(AUTOTUNE=1):
        out = _run_op(problem, x, weight, bias)
        _run_op(problem, x, weight, bias)  # tuned once, then served from memory
    assert len(calls) == 1 and database().lookup(key)["choice"] in ("kernel", ATEN)
    assert activation_layout(out) == "nhwc"


# ---------------------------------------------------------------------------------------------- suites


def test_suites_hold_the_benchmark_layers():
    headline = suites.load_suite("headline")
    assert len(headline.runnable) == 12 and not headline.deferred  # the 1-D layers run as height-1 problems
    assert headline.dtype == "bfloat16" and headline.layouts == ("nchw", "nhwc")
    assert len(suites.load_suite("secondary").runnable) == 5
    smoke = suites.load_suite("smoke")
    assert all(layer.batch * layer.size ** layer.dims <= 256 for layer in smoke.runnable)
    with pytest.raises(ValueError, match="layer='nope' is not in suite 'smoke'; its layers: smoke-grouped"):
        smoke.select(("nope",))
    with pytest.raises(FileNotFoundError, match="neither a shipped suite"):
        suites.load_suite("no-such-suite")


def test_suite_file_errors_name_the_field(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"schema_version": 1, "layers": [{"id": "a", "in_channels": 8, "out_channels": 8, '
                    '"groups": 2, "kernel": 3, "batch": 1, "size": 0}]}')
    with pytest.raises(ValueError, match="size=0 must be an int >= 1"):
        suites.load_suite(str(path))
    path.write_text('{"schema_version": 1, "layers": [{"id": "a", "in_channels": 8}]}')
    with pytest.raises(ValueError, match="lacks out_channels, groups, kernel, batch, size"):
        suites.load_suite(str(path))


def test_grad_input_tuning_times_the_transposed_forward_and_the_op_runs_what_won(monkeypatch, tmp_path):
    """A stride-1 depthwise conv is its own transpose: grad-input tuning times every forward family of the
    transposed conv beside the direct kernel and aten, a transposed winner is recorded as such, and the
    backward op then runs that forward kernel on the flipped weight, matching torch."""
    forward = _problem(4, 4, 4, 3, 1, 1, 1, 5)  # depthwise 3x3, NCHW float32
    problem = forward.backward("grad_input")
    offers = grad_input_offers(problem.spec, knobs.padding_budget())
    assert ("depthwise", False) in offers and any(transposed for _, transposed in offers)
    result = tuner.tune(problem, CPU)
    routes = {(trial.family, trial.transposed) for trial in result.trials if trial.config is not None}
    assert routes == set(offers) and all(trial.status == "ok" for trial in result.trials), result.trials
    transposed = next(t for t in result.trials if t.transposed and t.status == "ok")
    record = {**kernel_record(transposed.config, transposed.family, True), "time_ms": 1.0}
    assert choice_of(record).transposed  # what the database hands the op
    ran = _spy_on_kernels(monkeypatch)
    with knobs.scoped(CACHE_DIR=tmp_path):
        database().record({result.key: record})
        x, weight, _ = _inputs(forward)
        x.requires_grad_()
        out = gconvgen.conv2d(x, weight, None, 1, 1, 1, 4)
        grad = torch.randn_like(out)
        (grad_x,) = torch.autograd.grad(out, x, grad)
    assert ran[-1] == ("forward", transposed.family, transposed.config)  # the grad-input ran as a forward
    x64 = x.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference_conv2d(x64, weight.double(), None, (1, 1), (1, 1, 1, 1), (1, 1), 4),
                                   x64, grad.double())[0]
    assert_close(grad_x, expected, torch.float32)


def test_a_transposed_record_for_a_conv_that_is_not_its_own_transpose_is_ignored(tmp_path):
    forward = _problem(4, 4, 4, 3, 2, 1, 1, 6)  # stride 2: no transposed forward
    problem = forward.backward("grad_input")
    # the direct kernel and, at a stride, the banded one (float32: not the default); no transposed forward
    assert grad_input_offers(problem.spec, knobs.padding_budget()) == (("depthwise", False), ("depthwise_gemm", False))
    config = default_config(forward.spec, "depthwise", "forward", interpret=True)
    with knobs.scoped(CACHE_DIR=tmp_path):
        database().record({key_of(problem, "interpreter", False): {**kernel_record(config, "depthwise", True),
                                                                     "time_ms": 1.0}})
        x, weight, _ = _inputs(forward)
        x.requires_grad_()
        out = gconvgen.conv2d(x, weight, None, 2, 1, 1, 4)
        with pytest.warns(UserWarning, match="ignoring the tuning record .*transposed"):
            (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x64 = x.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference_conv2d(x64, weight.double(), None, (2, 2), (1, 1, 1, 1), (1, 1), 4).sum(),
                                   x64)[0]
    assert_close(grad_x, expected, torch.float32)
