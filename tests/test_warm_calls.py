"""Warm calls rebind their tensors to the launch a first call ran (runtime/launch.py ``remember`` /
``Launch.refilled``): the same results, and nothing the whole path would refuse or decide differently is run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gconvgen
from gconvgen import knobs, memo
from gconvgen.autotune.database import database, kernel_record, key_of
from gconvgen.autotune.space import Problem
from gconvgen.compiler.lowering import KernelConfig
from gconvgen.runtime.device import device_target
from gconvgen.ops.dispatch import spec_for_call
from conftest import assert_close, spy_on_kernels


@pytest.fixture
def launched(monkeypatch):
    """The (family, config) of every forward kernel launched from now on, replays included."""
    memo.reset()
    yield spy_on_kernels(monkeypatch, lambda desc: (desc.family, desc.config) if desc.kind == "forward" else None)
    memo.reset()


@pytest.mark.parametrize("data_format, groups, weight_layout, x_layout", [
    ("NCHW", 4, "oihw", torch.channels_last),              # igemm, weight copied to hwio on every call
    ("NCHW", 4, "channels_last", torch.channels_last),     # igemm, an ohwi weight read as it is
    ("NCHW", 4, "oihw", torch.contiguous_format),          # igemm, NCHW input staged channels_last on every call
    ("NCHW", 8, "oihw", torch.channels_last),              # depthwise
    ("NHWC", 4, "hwio", torch.channels_last),              # Keras tensors
])
def test_warm_calls_match_torch_on_fresh_inputs(data_format, groups, weight_layout, x_layout, launched,
                                                nan_filled_outputs):
    """Each call gets new tensors (new addresses) of the recorded signature; a weight written in place through
    ``.data`` between calls is read anew."""
    weight = torch.randn(8, 8 // groups, 3, 3)
    if weight_layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    keras = lambda t: t.permute(0, 2, 3, 1) if data_format == "NHWC" else t  # noqa: E731
    for call in range(3):
        x = torch.randn(2, 8, 6, 5).contiguous(memory_format=x_layout)
        bias, residual = torch.randn(8), torch.randn(2, 8, 6, 5)
        given = weight.permute(2, 3, 1, 0) if data_format == "NHWC" else weight
        out = gconvgen.conv2d(keras(x), given, bias, padding=1, groups=groups, data_format=data_format,
                              activation="relu", residual=keras(residual))
        expected = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1, groups) + residual.double())
        assert_close(out, keras(expected), torch.float32)
        weight.data.mul_(-1.5)  # the version counter does not see this write
    assert len(launched) == 3 and len(set(launched)) == 1


def test_warm_banded_calls_rebuild_the_band_from_the_weight(launched, nan_filled_outputs):
    """The banded kernel reads band matrices written out from the weight per launch (runtime/weights.py): a
    replayed call writes them anew, so a write through ``.data`` between calls is seen."""
    weight = torch.randn(4, 1, 7, 7, dtype=torch.bfloat16)
    for call in range(3):
        x = torch.randn(2, 4, 6, 16, dtype=torch.bfloat16)  # 16-element rows: read as 16-byte vectors
        out = gconvgen.conv2d(x, weight, None, padding=3, groups=4)
        assert_close(out, F.conv2d(x.double(), weight.double(), None, 1, 3, 1, 4), torch.bfloat16)
        weight.data.mul_(-1.5)
    assert [family for family, _ in launched] == ["depthwise_gemm"] * 3


@pytest.mark.parametrize("bad, match", [
    ({"groups": True}, "groups=True must be an int"),
    ({"stride": 1.0}, r"stride=1.0 must be an int"),
    ({"padding": [1, 1]}, None),  # a list: not memoised, still computed
])
def test_arguments_equal_to_a_recorded_call_are_checked_anew(bad, match, launched):
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    arguments = {"stride": 1, "padding": 1, "groups": 1}
    gconvgen.conv2d(x, weight, **arguments)
    gconvgen.conv2d(x, weight, **arguments)  # replayed
    if match is None:
        assert_close(gconvgen.conv2d(x, weight, **{**arguments, **bad}), F.conv2d(x.double(), weight.double(), None, 1, 1),
                     torch.float32)
    else:
        with pytest.raises(TypeError, match=match):
            gconvgen.conv2d(x, weight, **{**arguments, **bad})


def test_a_knob_changed_between_calls_is_obeyed(launched):
    """7 channels in 2 groups pad to 8 (1/7 extra work): a budget below that refuses the replayed call too."""
    x, weight = torch.randn(1, 7, 5, 5), torch.randn(4, 4, 3, 3)
    for _ in range(2):
        gconvgen.conv2d(x, weight, groups=2, channel_policy="pad")
    with knobs.scoped(PADDING_BUDGET=0.05), pytest.raises(ValueError, match="GCONVGEN_PADDING_BUDGET"):
        gconvgen.conv2d(x, weight, groups=2, channel_policy="pad")


def test_a_tuning_record_written_between_calls_is_run(launched, tmp_path):
    x, weight = torch.randn(2, 8, 6, 6), torch.randn(8, 1, 3, 3)
    with knobs.scoped(CACHE_DIR=tmp_path):  # a private database
        gconvgen.conv2d(x, weight, padding=1, groups=8)
        gconvgen.conv2d(x, weight, padding=1, groups=8)
        spec = spec_for_call(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 8, "strict")
        banded = KernelConfig(block_m=16, block_n=8, block_k=16, num_warps=4, num_stages=1)
        database().record({key_of(Problem(spec, 2, 6, 6, "forward"), device_target(x.device), allow_tf32=False):
                           {**kernel_record(banded, "depthwise_gemm"), "time_ms": 1.0}})
        out = gconvgen.conv2d(x, weight, padding=1, groups=8)
    assert launched[-1] == ("depthwise_gemm", banded) and launched[0][0] != "depthwise_gemm"
    assert_close(out, F.conv2d(x.double(), weight.double(), None, 1, 1, 1, 8), torch.float32)


def test_calls_autograd_can_see_take_the_op(launched):
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    weight = torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        gconvgen.conv2d(x, weight, groups=2)
        gconvgen.conv2d(x, weight, groups=2)
    out = gconvgen.conv2d(x, weight, groups=2)
    assert out.grad_fn is not None
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    expected = torch.autograd.grad(F.conv2d(x64, weight.double(), groups=2).sum(), x64)[0]
    assert_close(x.grad, expected, torch.float32)


def _lowerings(monkeypatch) -> list:
    """The kind of every launch prepared (lowered) from now on: a warm call prepares none."""
    from gconvgen.runtime import launch

    prepared = []
    for kind in ("forward", "grad_input", "grad_weight", "grad_bias"):
        original = getattr(launch, f"prepare_{kind}")

        def spy(*args, _original=original, _kind=kind, **kwargs):
            prepared.append(_kind)
            return _original(*args, **kwargs)

        monkeypatch.setattr(launch, f"prepare_{kind}", spy)
    return prepared


@pytest.mark.parametrize("groups, kernel, layout", [
    (8, 3, torch.contiguous_format),   # depthwise NCHW: grad-input as the transposed forward (flipped weight)
    (2, 3, torch.channels_last),       # grouped igemm: weight copied, split grad-weight reduction
])
def test_backward_and_fused_calls_rebind_the_launch_their_first_call_ran(groups, kernel, layout, launched,
                                                                         monkeypatch, nan_filled_outputs):
    """The gradient ops and the fused op remember their launches as the conv does: a second training step on
    new tensors prepares nothing, launches the same kernels, and every gradient matches torch's."""
    weight = torch.randn(8, 8 // groups, kernel, kernel)
    prepared = _lowerings(monkeypatch)
    for step in range(2):
        x = torch.randn(2, 8, 6, 7).contiguous(memory_format=layout).requires_grad_()
        w = weight.clone().requires_grad_()
        bias, residual = torch.randn(8, requires_grad=True), torch.randn(2, 8, 6, 7)
        out = gconvgen.conv2d(x, w, bias, padding=1, groups=groups, activation="silu", residual=residual)
        grad = torch.randn_like(out)
        out.backward(grad)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
        expected = F.silu(F.conv2d(x64, w64, b64, 1, 1, 1, groups) + residual.double())
        expected.backward(grad.double())
        assert_close(out, expected, torch.float32)
        for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (bias.grad, b64.grad)):
            assert_close(got, want, torch.float32)
        if step == 0:
            first, count = list(launched), len(prepared)
    assert prepared[:count] and len(prepared) == count  # the second step lowered nothing
    assert launched[len(first):] == first  # and ran the same kernels


def test_a_remembered_launch_holds_no_tensor_of_its_call(launched):
    """Remembering a launch must not keep the first call's activations alive."""
    import gc
    import weakref

    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    gconvgen.conv2d(x, weight, padding=1, groups=4)
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None
    out = gconvgen.conv2d(torch.ones(1, 4, 5, 5), weight, padding=1, groups=4)  # warm, on other tensors
    assert_close(out, F.conv2d(torch.ones(1, 4, 5, 5).double(), weight.double(), None, 1, 1, 1, 4), torch.float32)


def test_testing_reset_forgets_remembered_launches(launched, monkeypatch):
    from gconvgen import testing

    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    prepared = _lowerings(monkeypatch)
    gconvgen.conv2d(x, weight, padding=1, groups=4)
    gconvgen.conv2d(x, weight, padding=1, groups=4)
    assert prepared == ["forward"]
    testing.reset()
    gconvgen.conv2d(x, weight, padding=1, groups=4)
    assert prepared == ["forward", "forward"]
