"""Dao-AILab/causal-conv1d's tests/test_causal_conv1d.py, ported to gconvgen (the cases it can express).

Semantics are that suite's (causal_conv1d_ref / causal_conv1d_update_ref in causal_conv1d_interface.py),
with the references written here in float64 and never computed by gconvgen:

* causal_conv1d_fn(x, weight, bias, activation) -> gconvgen.conv1d(x, weight[:, None], bias,
  padding="causal", groups=dim, activation="silu" | None): F.conv1d with width - 1 zeros on the left, one
  filter per channel, optional bias, optional SiLU; output length = seqlen.
* causal_conv1d_update(x, conv_state, weight, bias, activation) -> gconvgen.causal_conv1d_update(x, conv_state,
  weight, bias), one token a call: the output is the valid conv of (conv_state followed by the token), the state
  shifts left by one with the token written last. gconvgen leaves the activation to the caller, so the silu cases
  apply F.silu to its output, and the suite's multi-token calls (seqlen 4, 5) are fed one token a call and
  compared, stacked, with the reference's single multi-token update (outputs and final state).

Ported, as in the suite: x sliced along channels out of a wider tensor (``x_full[:, off:off + dim]``), channel_last
as the [B, dim, L] transposed view of a [B, L, C_full] tensor sliced along C (plus gconvgen's own spelling of it,
data_format="NLC" on the same storage with the Keras weight [width, 1, dim], in the sweep), widths 2-4, bias or
not, silu or not, float32/float16/bfloat16 x; forward, then dx, dweight and dbias from g = randn_like(out); for the
update, the output, and conv_state (a transposed, channel-last view, updated in place) ending equal to the
reference's bit for bit, as the suite asserts.

Subsetted, to keep Triton's interpreter on CPU well under a minute for the whole file: batch 2 and dim 64 (96 =
64 + 32 in a quarter of the sweep below seqlen 2048, standing for the suite's 4096 + 32, "dim not divisible by
64") instead of dim 64 and 4128; channel slices of 16 + dim + 8 instead of 4096 + dim + 64. Of the suite's product
seqlen x width x bias x silu x dtype x layout (x its state flags), test_causal_conv1d runs the product width x bias
x silu x dtype at seqlen 130 (past a 128 tile) with its two layouts taking turns (so every three of the five flags
meet in all combinations), and a sweep of all 18 of its seqlens (1 ... 4096) x the three dtypes, with width, bias,
silu and layout rotating so every seqlen meets every dtype and every layout. test_causal_conv1d_update (plain torch
in gconvgen, so cheap) runs the suite's full product width x seqlen x bias x silu x dtype, at batch 8 (not 64) and
one of its dims, 2048 + 16.

Weights and bias are in x's dtype here (the suite's are float32), so the suite's float32 weight tolerances (1e-3)
cannot apply to half-precision dweight / dbias.

Tolerances: plain ones, conftest.TOLERANCES[dtype] (atol, rtol) against the float64 reference on the same rounded
inputs. Elementwise for out and dx. dweight and dbias are sums over batch * seqlen products of either sign, so their
rounding error scales with the size of the terms, not with a (possibly cancelled) element: there rtol is applied to
the gradient's largest magnitude, max|err| <= atol + rtol * max|ref| (in float32 that is 1e-4 relative, tighter
than the suite's 1e-3). Triton's interpreter casts float32 to bfloat16 by truncation, not round-to-nearest, so
bfloat16 errors here are up to one ulp; the tolerances leave room for it.

Ported elsewhere: the cases gconvgen.conv1d's own spelling cannot express (initial and final states, float32
weights (dim, width) with half x, seq_idx packing with padding, multi-token, longer and circular-buffer states,
state pools with padded slots, varlen states) run through the drop-in module gconvgen.causal_conv1d in
tests/test_causal_conv1d_dropin.py. Not ported: test_causal_conv1d_race_condition and the three
test_causal_conv1d_bwd_deterministic_* / default_mode tests, CUDA-only stress and determinism checks (10000
repeats, CAUSAL_CONV1D_DETERMINISTIC); the interpreter runs programs one after another, so a race cannot show here
and such a test could not fail. test_unsupported_arguments_are_refused checks that conv1d refuses a (dim, width)
weight (the drop-in's shape) with an error rather than wrong numbers.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gconvgen
from conftest import TOLERANCES

P = pytest.param

BATCH = 2
BEFORE, AFTER = 16, 8  # channels around the slice: x = x_full[:, BEFORE:BEFORE + dim] (the suite: 4096 and 64)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = tuple(DTYPE_IDS)
# "ncl": the suite's channel_last=False; "channel_last": its channel_last=True, the [B, dim, L] transposed view of
# a [B, L, C] tensor passed as is; "nlc": the same [B, L, C] storage given to gconvgen as data_format="NLC"
LAYOUTS = ("ncl", "channel_last", "nlc")
SEQLENS = (1, 2, 8, 16, 32, 64, 128, 129, 130, 151, 256, 372, 512, 784, 1024, 1134, 2048, 4096)  # the suite's


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The float64 references are small; on a loaded 2-core machine torch's second intra-op thread stalls them
    for seconds (a 2064-group F.conv1d: 10 ms on one thread, up to 9 s on two), so this module runs torch on one
    thread. The kernels run in Triton's interpreter either way."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- references


def reference_causal_conv1d(x, weight, bias, silu):
    """causal_conv1d_ref's semantics in float64: width - 1 zeros on the left, a depthwise conv with the (dim, width)
    filters, bias, then SiLU. Differentiable, for the gradient references."""
    width = weight.shape[1]
    out = F.conv1d(F.pad(x.double(), (width - 1, 0)), weight.double().unsqueeze(1),
                   None if bias is None else bias.double(), groups=weight.shape[0])
    return F.silu(out) if silu else out


def reference_update(x, conv_state, weight, bias, silu):
    """causal_conv1d_update_ref without cache_seqlens, in float64: x [B, dim, seqlen] new tokens, conv_state
    [B, dim, state_len]. Returns (out [B, dim, seqlen], the state after the update): the valid conv of the state
    followed by the tokens (its last seqlen outputs), and the last state_len columns of that concatenation."""
    window = torch.cat([conv_state.double(), x.double()], dim=-1)
    out = F.conv1d(window, weight.double().unsqueeze(1), None if bias is None else bias.double(),
                   groups=weight.shape[0])[..., -x.shape[-1]:]
    return (F.silu(out) if silu else out), window[..., -conv_state.shape[-1]:]


def mismatch(name, actual, expected, dtype, reduction=False):
    """None when actual (any dtype) is within conftest.TOLERANCES[dtype] of the float64 expected, else a line with
    the max error. reduction: rtol scales expected's largest magnitude instead of each element (see the module
    docstring)."""
    if actual is None or tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {None if actual is None else tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if not torch.isfinite(actual).all():
        return f"{name}: {(~torch.isfinite(actual)).sum().item()} non-finite elements (NaN sentinel survived?)"
    atol, rtol = TOLERANCES[dtype]
    error = (actual.double() - expected).abs()
    bound = atol + rtol * (expected.abs().max() if reduction else expected.abs())
    bad = error > bound
    if bad.any():
        return (f"{name}: {bad.sum().item()}/{bad.numel()} elements past atol={atol} rtol={rtol}"
                f"{' x max|ref|' if reduction else ''}, max error {error.max().item():.4g} "
                f"(max|ref| {expected.abs().max().item():.4g})")
    return None


# ---------------------------------------------------------------------------------------------- forward + backward


def conv_case(seqlen, width, has_bias, silu, dtype, layout, dim=64):
    name = (f"L{seqlen}-w{width}-{'bias' if has_bias else 'nobias'}-{'silu' if silu else 'noact'}-"
            f"{DTYPE_IDS[dtype]}-{layout}{'' if dim == 64 else f'-dim{dim}'}")
    return P(seqlen, width, has_bias, silu, dtype, layout, dim, id=name)


# the product width x bias x silu x dtype at one seqlen past a 128 tile; the suite's two layouts take turns by the
# parity of the other flags, so every three of the five flags still meet in all combinations
FLAG_PRODUCT = [conv_case(130, width, has_bias, silu, dtype, ("ncl", "channel_last")[(width + has_bias + silu + j) % 2])
                for width in (2, 3, 4) for has_bias in (False, True) for silu in (False, True)
                for j, dtype in enumerate(DTYPES)]
# every seqlen of the suite x the three dtypes; layout, width, bias, silu and dim (96 below seqlen 2048) rotate
SEQLEN_SWEEP = [conv_case(seqlen, (2, 3, 4)[(i + 2 * j) % 3], (i + j) % 2 == 0, (i // 2 + j) % 2 == 1, dtype,
                          LAYOUTS[(i + j) % 3], 96 if (i + j) % 4 == 3 and seqlen < 2048 else 64)
                for i, seqlen in enumerate(SEQLENS) for j, dtype in enumerate(DTYPES)]


@pytest.mark.parametrize("seqlen, width, has_bias, silu, dtype, layout, dim", FLAG_PRODUCT + SEQLEN_SWEEP)
def test_causal_conv1d(seqlen, width, has_bias, silu, dtype, layout, dim, nan_filled_outputs):
    """The suite's test_causal_conv1d without initial or final states: out, then dx, dweight and dbias of
    (out * g).sum(), each against causal_conv1d_ref's semantics in float64 autograd."""
    channels = BEFORE + dim + AFTER
    if layout == "ncl":
        x_full = torch.randn(BATCH, channels, seqlen, dtype=dtype)
        x = x_full[:, BEFORE:BEFORE + dim, :]
    else:  # [B, L, C] storage sliced along C; the suite's x is its [B, dim, L] transposed view
        x_full = torch.randn(BATCH, seqlen, channels, dtype=dtype)
        x = x_full[:, :, BEFORE:BEFORE + dim].transpose(1, 2)
    x.requires_grad_()
    weight = torch.randn(dim, width, dtype=dtype, requires_grad=True)  # the suite's (dim, width) weight
    bias = torch.randn(dim, dtype=dtype, requires_grad=True) if has_bias else None
    activation = "silu" if silu else None

    if layout == "nlc":  # [B, L, dim] in and out, the Keras weight [width, 1, dim]: views of the same leaves
        out = gconvgen.conv1d(x.transpose(1, 2), weight.t().unsqueeze(1), bias, padding="causal", groups=dim,
                              activation=activation, data_format="NLC").transpose(1, 2)
    else:
        out = gconvgen.conv1d(x, weight.unsqueeze(1), bias, padding="causal", groups=dim, activation=activation)
    assert out.dtype == dtype
    g = torch.randn_like(out)
    leaves = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(out, leaves, g)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out_ref = reference_causal_conv1d(leaves64[0], leaves64[1], leaves64[2] if has_bias else None, silu)
    grads_ref = torch.autograd.grad(out_ref, leaves64, g.double())

    problems = [mismatch("out", out.detach(), out_ref.detach(), dtype),
                mismatch("dx", grads[0], grads_ref[0], dtype),
                mismatch("dweight", grads[1], grads_ref[1], dtype, reduction=True)]
    if has_bias:
        problems.append(mismatch("dbias", grads[2], grads_ref[2], dtype, reduction=True))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- decoding update

UPDATE_BATCH, UPDATE_DIM = 8, 2048 + 16  # the suite: batch 64, dim 2048, 2048 + 16, 4096


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.values())
@pytest.mark.parametrize("silu", [False, True], ids=["noact", "silu"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("seqlen", [1, 4, 5], ids=["tokens1", "tokens4", "tokens5"])
@pytest.mark.parametrize("width", [2, 3, 4], ids=["w2", "w3", "w4"])
def test_causal_conv1d_update(width, seqlen, has_bias, silu, dtype):
    """The suite's test_causal_conv1d_update without cache_seqlens, state_len = width - 1: x and conv_state are
    transposed views of [B, seqlen, dim] and [B, state_len, dim] tensors as there; seqlen tokens are fed one a
    call. The outputs match the float64 reference and the state ends equal to the reference's bit for bit."""
    x = torch.randn(UPDATE_BATCH, seqlen, UPDATE_DIM, dtype=dtype).transpose(-1, -2)
    conv_state = torch.randn(UPDATE_BATCH, width - 1, UPDATE_DIM, dtype=dtype).transpose(-1, -2)
    weight = torch.randn(UPDATE_DIM, width, dtype=dtype)
    bias = torch.randn(UPDATE_DIM, dtype=dtype) if has_bias else None
    out_ref, state_ref = reference_update(x, conv_state, weight, bias, silu)

    outputs = []
    for t in range(seqlen):
        step = gconvgen.causal_conv1d_update(x[:, :, t], conv_state, weight, bias)
        assert step.shape == (UPDATE_BATCH, UPDATE_DIM) and step.dtype == dtype
        outputs.append(F.silu(step) if silu else step)  # the activation is the caller's in gconvgen
    out = torch.stack(outputs, dim=-1)

    assert torch.equal(conv_state, state_ref.to(dtype)), "conv_state after the update differs from the reference's"
    problem = mismatch("out", out, out_ref, dtype)
    assert problem is None, problem


# ---------------------------------------------------------------------------------------------- not supported


def _x(dtype=torch.bfloat16):
    return torch.randn(2, 8, 5, dtype=dtype)


REFUSED = [
    P(lambda: gconvgen.conv1d(_x(torch.float32), torch.randn(8, 4), None, padding="causal", groups=8), ValueError,
      "weight has shape (8, 4)", id="weight-dim-width"),  # gconvgen.causal_conv1d takes (dim, width)
]


@pytest.mark.parametrize("call, error, fragment", REFUSED)
def test_unsupported_arguments_are_refused(call, error, fragment):
    """What the suite uses and gconvgen cannot compute yet raises, naming it, rather than returning numbers."""
    with pytest.raises(error) as raised:
        call()
    assert fragment in str(raised.value), f"{fragment!r} missing from: {raised.value}"
