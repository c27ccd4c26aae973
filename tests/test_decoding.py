"""gconvgen.causal_conv1d_update, Mamba's decoding step, against the full causal conv: F.conv1d in float64
with k - 1 zeros on the left (and gconvgen.conv1d with padding='causal')."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gconvgen
from conftest import assert_close

P = pytest.param


@pytest.mark.parametrize("kernel, weight_rank, bias", [P(4, 3, True, id="mamba-k4-bias"),
                                                       P(3, 2, False, id="weight-c-k"),
                                                       P(1, 3, True, id="k1-empty-state")])
def test_decoding_steps_equal_the_full_causal_conv(kernel, weight_rank, bias):
    """Six steps from a zero state give the causal conv of the whole sequence, column by column, and leave
    the last k - 1 inputs in the state."""
    batch, channels, steps = 2, 6, 6
    sequence = torch.randn(batch, channels, steps)
    weight = torch.randn(channels, 1, kernel)
    bias_tensor = torch.randn(channels) if bias else None
    conv_state = torch.zeros(batch, channels, kernel - 1)
    step_weight = weight if weight_rank == 3 else weight[:, 0]
    outputs = [gconvgen.causal_conv1d_update(sequence[:, :, t], conv_state, step_weight, bias_tensor)
               for t in range(steps)]
    expected = F.conv1d(F.pad(sequence.double(), (kernel - 1, 0)), weight.double(),
                        None if bias_tensor is None else bias_tensor.double(), groups=channels)
    assert_close(torch.stack(outputs, dim=-1), expected, torch.float32)
    assert_close(gconvgen.conv1d(sequence, weight, bias_tensor, padding="causal", groups=channels), expected,
                 torch.float32)
    assert torch.equal(conv_state, sequence[:, :, steps - (kernel - 1):])


def test_decoding_continues_a_prefilled_sequence_in_half_precision():
    """A state taken from a prefix (as after prefill) continues it: steps 5.. of the full conv, in bf16."""
    batch, channels, kernel, steps = 2, 8, 4, 9
    sequence = torch.randn(batch, channels, steps).bfloat16()
    weight, bias = torch.randn(channels, 1, kernel).bfloat16(), torch.randn(channels).bfloat16()
    conv_state = sequence[:, :, 5 - (kernel - 1):5].clone()
    outputs = [gconvgen.causal_conv1d_update(sequence[:, :, t], conv_state, weight, bias) for t in range(5, steps)]
    expected = F.conv1d(F.pad(sequence.double(), (kernel - 1, 0)), weight.double(), bias.double(),
                        groups=channels)[:, :, 5:]
    out = torch.stack(outputs, dim=-1)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16)


def _state():
    return torch.zeros(2, 6, 3)


DECODING_CASES = [
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 6, 1, 1), _state(), torch.randn(6, 1, 4)), ValueError,
      ["x has shape (2, 6, 1, 1)", "[batch, channels]"], id="x-of-rank-4"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 6), torch.zeros(2, 6, 2), torch.randn(6, 1, 4)), ValueError,
      ["conv_state has shape (2, 6, 2)", "[2, 6, 3]"], id="state-shorter-than-k-1"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 6), _state(), torch.randn(6, 2, 4)), ValueError,
      ["weight has shape (6, 2, 4)", "[6, 1, k] or [6, k]"], id="weight-not-depthwise"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 6), _state(), torch.randn(6, 4), torch.randn(5)), ValueError,
      ["bias has shape (5,)", "[6]"], id="bias-wrong-size"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 6), _state().half(), torch.randn(6, 4)), TypeError,
      ["conv_state.dtype=torch.float16", "x.dtype=torch.float32"], id="state-dtype"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 6), _state(), torch.randn(6, 4, device="meta")),
      ValueError, ["weight is on meta", "x is on"], id="weight-device"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 6).long(), _state().long(), torch.randn(6, 4).long()),
      TypeError, ["x.dtype=torch.int64"], id="integer-x"),
]


@pytest.mark.parametrize("call, error, fragments", DECODING_CASES)
def test_decoding_rejects(call, error, fragments):
    with pytest.raises(error) as raised:
        call()
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} missing from: {raised.value}"
