"""gconvgen.causal_conv1d, the drop-in for Dao-AILab causal-conv1d: its cases that gconvgen's own conv1d does
not take (initial and final states, packed sequences with seq_idx and padding, float32 weights with
half-precision x, multi-token, circular-buffer and state-pool decode, varlen states), against references
written here in float64 from that package's definitions (causal_conv1d_ref, causal_conv1d_update_ref,
causal_conv1d_varlen_states_ref, and its tests' per-sequence reference for seq_idx), with its tolerances."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gconvgen
from gconvgen.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states

P = pytest.param
# causal-conv1d's own tolerances, per x dtype
TOLERANCES = {torch.float32: (3e-4, 1e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (1e-2, 5e-2)}


def reference_fn(x, weight, bias=None, initial_states=None, silu=False):
    """causal_conv1d_ref in float64: (out, final states)."""
    width = weight.shape[1]
    x64 = x.double()
    if initial_states is None:
        padded = F.pad(x64, (width - 1, 0))
    else:
        padded = torch.cat([initial_states.double(), x64], dim=-1)
    out = F.conv1d(padded, weight.double().unsqueeze(1), None if bias is None else bias.double(),
                   groups=x.shape[1])
    out = F.silu(out) if silu else out
    return out, padded[..., padded.shape[-1] - (width - 1):]


def channel_last(batch, dim, seqlen, dtype):
    """x as causal-conv1d's tests make it channel-last: a transposed view of [batch, seqlen, dim + 8] sliced."""
    return torch.randn(batch, seqlen, dim + 8, dtype=dtype)[..., 4:4 + dim].transpose(1, 2)


def assert_close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width, seqlen, bias, silu", [
    P(4, 33, True, True, id="w4-L33-bias-silu"),
    P(2, 1, False, False, id="w2-L1"),                 # one token
    P(3, 2, True, False, id="w3-L2-bias"),             # shorter than the window
])
def test_initial_and_final_states_with_float32_weights(width, seqlen, bias, silu, dtype):
    batch, dim = 2, 16
    x = channel_last(batch, dim, seqlen, dtype).requires_grad_()
    weight = torch.randn(dim, width, requires_grad=True)  # float32, as Mamba keeps it
    bias_t = torch.randn(dim, requires_grad=True) if bias else None
    initial = torch.randn(batch, dim, width - 1, dtype=dtype, requires_grad=True)
    out, final = causal_conv1d_fn(x, weight, bias_t, initial_states=initial, return_final_states=True,
                                  activation="swish" if silu else None)
    x64, weight64, initial64 = (t.detach().double().requires_grad_() for t in (x, weight, initial))
    bias64 = None if bias_t is None else bias_t.detach().double().requires_grad_()
    expected, expected_final = reference_fn(x64, weight64, bias64, initial64, silu)
    assert_close(out, expected, dtype)
    assert final.dtype == dtype and torch.equal(final.double(), expected_final.detach())
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    assert_close(x.grad, x64.grad, dtype)
    assert_close(initial.grad, initial64.grad, dtype)
    assert weight.grad.dtype == torch.float32
    scale = weight64.grad.abs().max().item()
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=0, atol=TOLERANCES[dtype][1] * max(scale, 1))


def test_final_states_out_is_written_and_returned():
    x, weight = torch.randn(2, 8, 5), torch.randn(8, 4)
    into = torch.full((2, 6, 8), float("nan")).transpose(1, 2)[..., :3]  # a strided view
    out, final = causal_conv1d_fn(x, weight, return_final_states=True, final_states_out=into)
    assert final is into and torch.equal(into, x[..., -3:])
    torch.testing.assert_close(out.double(), reference_fn(x, weight)[0], rtol=3e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width, chunked", [(2, False), (4, False), (4, True)])
def test_packed_sequences_with_padding_match_each_sequence_alone(width, chunked, dtype, monkeypatch):
    """seq_idx packs sequences in a row (-1: padding, whose outputs are 0); the reference runs each alone.
    ``chunked``: the outputs reading another sequence are computed again one at a time."""
    dim = 8
    if chunked:
        monkeypatch.setattr(gconvgen.nn.causal, "_WINDOW_ELEMENTS", width * dim)
    seqlens = [[3, 1, 6], [1, 1, 1, 5], [10]]
    padding = [2, 4, 0]
    seqlen = 12
    x = channel_last(3, dim, seqlen, dtype).requires_grad_()
    weight, bias = torch.randn(dim, width, requires_grad=True), torch.randn(dim, requires_grad=True)
    seq_idx = torch.full((3, seqlen), -1, dtype=torch.int32)
    counter = 0
    for row, lengths in enumerate(seqlens):
        start = 0
        for length in lengths:
            seq_idx[row, start:start + length] = counter
            counter, start = counter + 1, start + length
    out = causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation="silu")
    x64 = x.detach().double().requires_grad_()
    weight64, bias64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    expected = torch.zeros(3, dim, seqlen, dtype=torch.float64)
    pieces = []
    for row, lengths in enumerate(seqlens):
        start = 0
        for length in lengths:
            piece = reference_fn(x64[row:row + 1, :, start:start + length], weight64, bias64, silu=True)[0]
            pieces.append((row, start, length, piece))
            start += length
    for row, start, length, piece in pieces:
        expected[row:row + 1, :, start:start + length] = piece
    assert_close(out, expected, dtype)
    for row, pad in enumerate(padding):
        if pad:
            assert torch.equal(out[row, :, seqlen - pad:], torch.zeros(dim, pad, dtype=dtype))
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    assert_close(x.grad, x64.grad, dtype)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-2, atol=5e-2)


def test_packed_sequences_keep_inf_inside_their_sequence():
    x, weight = torch.randn(1, 4, 6), torch.randn(4, 3)
    x[0, 1, 2] = float("inf")
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    out = causal_conv1d_fn(x, weight, seq_idx=seq_idx)
    assert torch.isfinite(out[..., 3:]).all()
    assert not torch.isfinite(out[0, 1, 2])


@pytest.mark.parametrize("bad, match", [
    P(dict(activation="relu"), "activation", id="activation"),
    P(dict(seq_idx=torch.zeros(2, 5, dtype=torch.int32), return_final_states=True), "seq_idx", id="seq-idx-states"),
    P(dict(seq_idx=torch.zeros(2, 5)), "integer", id="seq-idx-float"),
    P(dict(initial_states=torch.zeros(2, 8, 2)), "initial_states", id="initial-states-shape"),
    P(dict(final_states_out=torch.zeros(2, 8, 3)), "return_final_states", id="out-without-flag"),
])
def test_bad_arguments_name_themselves(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        causal_conv1d_fn(torch.randn(2, 8, 5), torch.randn(8, 4), **bad)


# ---------------------------------------------------------------------------------------------- decode


def reference_update(x, conv_state, weight, bias, silu, cache_seqlens=None):
    """causal_conv1d_update_ref in float64; updates conv_state (float64 copy returned) and returns out."""
    state = conv_state.double().clone()
    x64 = x.double()
    batch, dim, seqlen = x64.shape
    width, state_len = weight.shape[1], state.shape[-1]
    if cache_seqlens is None:
        window = torch.cat([state, x64], dim=-1)
        state = window[..., -state_len:]
    else:
        history = torch.remainder(torch.arange(-(width - 1), 0)[None, :] + cache_seqlens[:, None].long(), state_len)
        window = torch.cat([state.gather(2, history[:, None, :].expand(-1, dim, -1)), x64], dim=-1)
        for b in range(batch):
            for t in range(seqlen):
                state[b, :, (int(cache_seqlens[b]) + t) % state_len] = x64[b, :, t]
    out = F.conv1d(window, weight.double().unsqueeze(1), None if bias is None else bias.double(), groups=dim)
    out = out[..., -seqlen:]
    return (F.silu(out) if silu else out), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width, seqlen, extra_state, circular", [
    P(4, 1, 0, False, id="w4-one-token"),
    P(3, 4, 2, False, id="w3-four-tokens-longer-state"),   # speculative decoding: several tokens
    P(4, 5, 3, True, id="w4-five-tokens-circular"),
    P(2, 9, 0, True, id="w2-more-tokens-than-state-circular"),
])
def test_update(width, seqlen, extra_state, circular, dtype):
    batch, dim = 3, 16
    x = channel_last(batch, dim, seqlen, dtype)
    conv_state = torch.randn(batch, width - 1 + extra_state, dim, dtype=dtype).transpose(1, 2)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    cache_seqlens = torch.randint(0, 20, (batch,), dtype=torch.int32) if circular else None
    expected, expected_state = reference_update(x, conv_state, weight, bias, True, cache_seqlens)
    out = causal_conv1d_update(x, conv_state, weight, bias, "silu", cache_seqlens=cache_seqlens)
    assert_close(out, expected, dtype)
    assert torch.equal(conv_state.double(), expected_state)


@pytest.mark.parametrize("one_token", [True, False], ids=["one-token", "three-tokens"])
def test_update_of_a_state_pool_with_padded_slots(one_token):
    """conv_state_indices picks each request's row of a pool; -1 is a padded slot: out 0, no state written."""
    batch, dim, width, pool = 6, 8, 4, 20
    x = torch.randn(batch, dim) if one_token else torch.randn(batch, dim, 3)
    conv_state = torch.randn(pool, dim, width - 1)
    original = conv_state.clone()
    indices = torch.tensor([7, -1, 0, 19, -1, 3], dtype=torch.int32)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    out = causal_conv1d_update(x, conv_state, weight, bias, "silu", conv_state_indices=indices)
    x3 = x.unsqueeze(-1) if one_token else x
    expected_pool = original.double().clone()
    for b, row in enumerate(indices.tolist()):
        got = out[b] if not one_token else out[b].unsqueeze(-1)
        if row < 0:
            assert torch.equal(got, torch.zeros_like(got))
            continue
        expected, state = reference_update(x3[b:b + 1], original[row:row + 1], weight, bias, True)
        torch.testing.assert_close(got.double(), expected[0], rtol=3e-4, atol=1e-3)
        expected_pool[row] = state[0]
    assert torch.equal(conv_state.double(), expected_pool)


def test_update_refuses_a_pool_index_out_of_range():
    with pytest.raises(ValueError, match="conv_state_indices"):
        causal_conv1d_update(torch.randn(2, 4), torch.randn(3, 4, 3), torch.randn(4, 4),
                             conv_state_indices=torch.tensor([0, 3], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------- varlen states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_states(dtype):
    dim, state_len = 8, 5
    seqlens = [3, 9, 1, 5]
    cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(int(cu_seqlens[-1]), dim, dtype=dtype)
    states = causal_conv1d_varlen_states(x, cu_seqlens, state_len)
    expected = torch.zeros(len(seqlens), state_len, dim, dtype=dtype).transpose(1, 2)
    for i in range(len(seqlens)):
        end = int(cu_seqlens[i + 1])
        start = max(int(cu_seqlens[i]), end - state_len)
        expected[i, :, state_len - (end - start):] = x[start:end].T
    assert states.shape == (len(seqlens), dim, state_len) and torch.equal(states, expected)


# ---------------------------------------------------------------------------------------------- gconvgen.conv1d


@pytest.mark.parametrize("data_format", ["NCL", "NLC"])
def test_conv1d_carries_states_with_a_fused_residual(data_format):
    """gconvgen.conv1d's own spelling: [C, 1, k] (or Keras [k, 1, C]) weights, states in the input's layout,
    a residual added before the silu (swish), float32 weights with bfloat16 input."""
    batch, channels, length, width = 2, 8, 7, 4
    nlc = data_format == "NLC"
    x_ncl = torch.randn(batch, channels, length, dtype=torch.bfloat16)
    weight = torch.randn(channels, width, requires_grad=True)
    bias, residual_ncl = torch.randn(channels), torch.randn(batch, channels, length, dtype=torch.bfloat16)
    initial_ncl = torch.randn(batch, channels, width - 1, dtype=torch.bfloat16)

    def layout(t):
        return t.transpose(1, 2) if nlc else t

    conv_weight = weight.T.unsqueeze(1) if nlc else weight.unsqueeze(1)
    out, final = gconvgen.conv1d(layout(x_ncl), conv_weight, bias, padding="causal", groups=channels,
                                 data_format=data_format, activation="swish", residual=layout(residual_ncl),
                                 initial_states=layout(initial_ncl), return_final_states=True)
    padded = torch.cat([initial_ncl.double(), x_ncl.double()], dim=-1)
    expected = F.silu(F.conv1d(padded, weight.detach().double().unsqueeze(1), bias.double(), groups=channels)
                      + residual_ncl.double())
    assert out.dtype == torch.bfloat16
    assert_close(layout(out), expected, torch.bfloat16)
    assert torch.equal(layout(final), padded[..., -(width - 1):].to(torch.bfloat16))
    out.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def test_conv1d_with_seq_idx_matches_the_drop_in():
    x, weight = torch.randn(2, 8, 9), torch.randn(8, 1, 3)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1], [2, 2, 2, 2, 2, 2, 2, 2, 2]], dtype=torch.int32)
    out = gconvgen.conv1d(x, weight, padding="causal", groups=8, seq_idx=seq_idx)
    expected = causal_conv1d_fn(x, weight[:, 0], seq_idx=seq_idx)
    torch.testing.assert_close(out, expected)
    alone = reference_fn(x[:1, :, 3:7], weight[:, 0])[0]
    torch.testing.assert_close(out[:1, :, 3:7].double(), alone, rtol=3e-4, atol=1e-3)


def test_conv1d_float32_weight_with_half_input_computes_in_float32():
    x = torch.randn(2, 6, 11, dtype=torch.float16)
    weight, bias = torch.randn(6, 2, 3), torch.randn(6)
    out = gconvgen.conv1d(x, weight, bias, padding=1, groups=3)
    expected = F.conv1d(x.double(), weight.double(), bias.double(), padding=1, groups=3)
    assert out.dtype == torch.float16
    assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("bad, match", [
    P(dict(padding=1, initial_states=torch.zeros(2, 8, 3)), "causal", id="not-causal"),
    P(dict(padding="causal", groups=4, return_final_states=True), "depthwise", id="not-depthwise"),
    P(dict(padding="causal", stride=2, return_final_states=True), "stride", id="strided"),
])
def test_conv1d_states_need_a_causal_depthwise_conv(bad, match):
    weight = torch.randn(8, 2, 4) if bad.get("groups") == 4 else torch.randn(8, 1, 4)
    with pytest.raises((TypeError, ValueError), match=match):
        gconvgen.conv1d(torch.randn(2, 8, 5), weight, groups=bad.pop("groups", 8), **bad)


def _masked_reference(x, weight, seq_idx, silu):
    """causal-conv1d's seq_idx semantics in float64: a tap reads x only within its output's sequence (equal ids),
    outputs of negative ids are 0."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    columns = []
    for t in range(seqlen):
        value = torch.zeros(batch, dim, dtype=torch.float64)
        for back in range(min(width, t + 1)):
            own = ((seq_idx[:, t - back] == seq_idx[:, t]) & (seq_idx[:, t] >= 0))[:, None]
            # masked before the product and after it: no 0 x inf in the value or in either gradient
            tap = torch.where(own, x[:, :, t - back].double(), 0.0) * weight[:, width - 1 - back].double()
            value = value + torch.where(own, tap, 0.0)
        value = F.silu(value) if silu else value
        columns.append(torch.where((seq_idx[:, t] >= 0)[:, None], value, 0.0))
    return torch.stack(columns, dim=-1)


@pytest.mark.parametrize("compiled", [False, True], ids=["kernel", "torch-ops"])
def test_non_finite_inputs_of_padding_and_other_sequences_leave_a_sequences_gradients_as_torchs(compiled):
    """NaN in padded slots and inf in another sequence: the outputs of a sequence, the input gradient its
    loss sends to its own inputs, and the weight's and bias's gradients are torch's (the activation is applied
    after the rewritten outputs, so its derivative is never taken where the whole-row kernel read another
    sequence; a masked tap's input has no gradient, not 0 x inf). ``compiled``: the torch ops that
    torch.compile traces."""
    x = torch.randn(1, 2, 9)
    x[..., 7:] = float("nan")   # padding
    x[0, 1, 2] = float("inf")   # the last input of sequence 0
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1]], dtype=torch.int32)
    weight, bias = torch.randn(2, 3), torch.randn(2)
    for leaf in (x, weight, bias):
        leaf.requires_grad_()
    run = (torch.compile(causal_conv1d_fn, backend="aot_eager", fullgraph=True, dynamic=False) if compiled
           else causal_conv1d_fn)
    out = run(x, weight, bias, seq_idx=seq_idx, activation="silu")
    out[..., 3:7].sum().backward()  # a loss on sequence 1 alone
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in (x, weight, bias)]
    x64, weight64, bias64 = leaves64
    expected = _masked_reference(x64, weight64, seq_idx, silu=False) + bias64[:, None]
    expected = torch.where(seq_idx[:, None, :] >= 0, F.silu(expected), 0.0)
    expected[..., 3:7].sum().backward()
    torch.testing.assert_close(out[..., 3:].double(), expected[..., 3:].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad[..., 3:7].double(), x64.grad[..., 3:7], rtol=1e-5, atol=1e-5)
    # channel 1's weight and bias gradients are NaN in torch too: output 2 reads the inf through its own tap
    # (0 x inf, and SiLU's derivative at inf); channel 0 reads NaN only through the padded outputs' masked taps
    assert torch.isfinite(weight64.grad[0]).all() and torch.isfinite(bias64.grad[0])
    for ours, reference in ((weight.grad, weight64.grad), (bias.grad, bias64.grad)):
        torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_packed_and_initial_states_under_torch_func_and_compile():
    """vmap, jacfwd and torch.compile(fullgraph=True) cannot sync with the host nor write in place: there the
    conv runs as torch ops with the same results."""
    x, weight, bias = torch.randn(2, 3, 7), torch.randn(3, 4), torch.randn(3)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 0, -1], [2, 2, 2, 2, 3, 3, 3]], dtype=torch.int32)
    initial = torch.randn(2, 3, 3)
    packed = causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx)
    stacked = torch.stack([x, 2 * x])
    batched = torch.vmap(lambda v: causal_conv1d_fn(v, weight, bias, seq_idx=seq_idx))(stacked)
    torch.testing.assert_close(batched[0], packed)
    over_ids = torch.vmap(lambda ids: causal_conv1d_fn(x, weight, bias, seq_idx=ids))(torch.stack([seq_idx] * 2))
    torch.testing.assert_close(over_ids[1], packed)
    with_states = causal_conv1d_fn(x, weight, bias, initial_states=initial)
    over_states = torch.vmap(lambda s: causal_conv1d_fn(x, weight, bias, initial_states=s))(torch.stack([initial] * 2))
    torch.testing.assert_close(over_states[1], with_states)
    jacobian = torch.func.jacfwd(lambda v: causal_conv1d_fn(v, weight, seq_idx=seq_idx))(x)
    assert jacobian.shape == (2, 3, 7, 2, 3, 7)
    assert jacobian[0, 0, 2, 0, 0, 1] == 0 and jacobian[0, 0, 1, 0, 0, 0] == weight[0, 2]  # 2 starts sequence 1
    compiled = torch.compile(lambda v: causal_conv1d_fn(v, weight, bias, seq_idx=seq_idx), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), packed)


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 3, 0), (2, 0, 5)])
def test_empty_rows_batches_and_channels(shape):
    x = torch.randn(shape)
    weight = torch.randn(shape[1], 4)
    for kwargs in ({}, {"seq_idx": torch.zeros(shape[0], shape[2], dtype=torch.int32)},
                   {"initial_states": torch.randn(shape[0], shape[1], 3), "return_final_states": True}):
        result = causal_conv1d_fn(x, weight, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        assert out.shape == shape
        if isinstance(result, tuple):  # the last width - 1 inputs: the states when there is no input
            assert torch.equal(result[1], torch.cat([kwargs["initial_states"], x], dim=-1)[..., -3:])


# ---------------------------------------------------------------------------------------------- causal-conv1d's own module paths


def test_the_packages_module_paths_name_the_same_functions():
    """Code that imports causal-conv1d's modules (its tests do) switches by the package prefix alone."""
    import gconvgen.causal_conv1d as dropin
    from gconvgen.causal_conv1d import causal_conv1d_interface, causal_conv1d_varlen
    for name in ("causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_ref", "causal_conv1d_update_ref"):
        assert getattr(causal_conv1d_interface, name) is getattr(dropin, name)
    for name in ("causal_conv1d_varlen_states", "causal_conv1d_varlen_states_ref"):
        assert getattr(causal_conv1d_varlen, name) is getattr(dropin, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width, seqlen, states", [
    P(4, 37, True, id="w4-L37-states"), P(2, 1, False, id="w2-L1"), P(3, 2, True, id="w3-L2-states"),
    P(1, 5, True, id="w1-empty-state"),
])
def test_reference_of_the_prefill_is_its_definition(width, seqlen, states, dtype):
    """causal_conv1d_ref against the float64 definition (computing in the float32 weight's precision, its output
    and final states in x's dtype), and the kernel against causal_conv1d_ref, as causal-conv1d's tests compare."""
    from gconvgen.causal_conv1d import causal_conv1d_ref
    batch, dim = 2, 16
    x = channel_last(batch, dim, seqlen, dtype)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    initial = torch.randn(batch, dim, width - 1, dtype=dtype) if states else None
    final_out = torch.full((batch, dim, width - 1), float("nan"), dtype=dtype)
    out, final = causal_conv1d_ref(x, weight, bias, initial_states=initial, return_final_states=True,
                                   final_states_out=final_out, activation="silu")
    expected, expected_final = reference_fn(x, weight, bias, initial, silu=True)
    assert_close(out, expected, dtype)
    assert final is final_out and torch.equal(final.double(), expected_final)
    kernel_out, kernel_final = causal_conv1d_fn(x, weight, bias, initial_states=initial, return_final_states=True,
                                                activation="silu")
    assert_close(kernel_out, out.double(), dtype)
    assert torch.equal(kernel_final, final)
    assert causal_conv1d_ref(x, weight).dtype == dtype


@pytest.mark.parametrize("width, seqlen, extra_state, circular", [
    P(4, 1, 0, False, id="w4-one-token"), P(3, 4, 2, False, id="w3-four-tokens-longer-state"),
    P(4, 5, 3, True, id="w4-five-tokens-circular"), P(2, 9, 0, True, id="w2-more-tokens-than-state-circular"),
])
def test_reference_of_the_update_is_its_definition(width, seqlen, extra_state, circular):
    """causal_conv1d_update_ref against the float64 definition, output and state, and against the kernel's
    update of its own copy of the state."""
    from gconvgen.causal_conv1d import causal_conv1d_update_ref
    batch, dim = 3, 16
    x = torch.randn(batch, dim, seqlen)
    state = torch.randn(batch, dim, width - 1 + extra_state)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    cache_seqlens = torch.randint(0, 20, (batch,), dtype=torch.int32) if circular else None
    expected, expected_state = reference_update(x, state, weight, bias, True, cache_seqlens)
    kernel_state = state.clone()
    out = causal_conv1d_update_ref(x, state, weight, bias, "silu", cache_seqlens=cache_seqlens)
    assert_close(out, expected, torch.float32)
    assert torch.equal(state.double(), expected_state)
    kernel_out = causal_conv1d_update(x, kernel_state, weight, bias, "silu", cache_seqlens=cache_seqlens)
    assert_close(kernel_out, out.double(), torch.float32)
    assert torch.equal(kernel_state, state)
    if circular:  # width 1: a circular buffer of no inputs
        empty = torch.randn(batch, dim, 0)
        assert torch.equal(causal_conv1d_update_ref(x, empty, weight[:, :1], cache_seqlens=cache_seqlens),
                           causal_conv1d_update(x, empty.clone(), weight[:, :1], cache_seqlens=cache_seqlens))
    if seqlen == 1:  # one token: [batch, dim] in, [batch, dim] out
        one = causal_conv1d_update_ref(x[..., 0], torch.randn(batch, dim, width - 1 + extra_state), weight)
        assert one.shape == (batch, dim)


def test_reference_of_the_varlen_states_is_the_kernels():
    """causal_conv1d_varlen_states_ref and the kernel: sequences shorter and longer than the state, and an empty
    one."""
    from gconvgen.causal_conv1d import causal_conv1d_varlen_states_ref
    dim, state_len = 8, 5
    cu_seqlens = torch.tensor([0, 3, 12, 12, 13, 18], dtype=torch.int32)
    x = torch.randn(18, dim)
    states = causal_conv1d_varlen_states_ref(x, cu_seqlens, state_len)
    assert states.shape == (5, dim, state_len) and torch.equal(states[2], torch.zeros(dim, state_len))
    assert torch.equal(states[1], x[7:12].T) and torch.equal(states[0][:, 2:], x[0:3].T)
    assert torch.equal(states[0][:, :2], torch.zeros(dim, 2))
    assert torch.equal(causal_conv1d_varlen_states(x, cu_seqlens, state_len), states)


def test_references_refuse_what_the_package_refuses():
    from gconvgen.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
    with pytest.raises(ValueError, match="activation='relu'"):
        causal_conv1d_ref(torch.randn(1, 4, 3), torch.randn(4, 2), activation="relu")
    # causal-conv1d raises NotImplementedError for it: a caller's handler of either type catches it
    for call in (causal_conv1d_ref, causal_conv1d_fn):
        with pytest.raises(NotImplementedError, match="activation='gelu'"):
            call(torch.randn(1, 4, 3), torch.randn(4, 2), activation="gelu")
    with pytest.raises(ValueError, match="state_len=2; it must hold at least width - 1 = 3"):
        causal_conv1d_update_ref(torch.randn(1, 4), torch.randn(1, 4, 2), torch.randn(4, 4))
