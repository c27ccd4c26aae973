"""causal-conv1d's ``causal_conv1d.causal_conv1d_interface`` module: the prefill and decode functions (gconvgen's
kernels, gconvgen/nn/causal.py) and the package's two reference functions, written as eager torch ops that
compute in the weight's dtype, as that package's do."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..ir import check
from ..nn.causal import (_check_tensor, _checked_update, _checked_weight, _silu_or_none, causal_conv1d_fn,
                         causal_conv1d_update)

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      initial_states: Optional[torch.Tensor] = None, return_final_states: bool = False,
                      final_states_out: Optional[torch.Tensor] = None,
                      activation: Optional[str] = None) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """causal_conv1d_fn's definition: x [batch, dim, seqlen] in the weight's dtype, width - 1 zeros (or
    ``initial_states``) before it, a depthwise F.conv1d by weight (dim, width), silu if asked; out in x's dtype,
    and with ``return_final_states`` the last width - 1 inputs (initial states included) in x's dtype, copied
    into ``final_states_out`` when given."""
    act = _silu_or_none(activation)
    _check_tensor("x", x, (None, None, None), "(batch, dim, seqlen)")
    width = _checked_weight(weight, x.shape[1])
    dtype_in, (dim, seqlen) = x.dtype, x.shape[1:]
    inputs = x.to(weight.dtype)
    if initial_states is None:  # width - 1 zeros on both sides, the outputs past seqlen dropped
        out = F.conv1d(inputs, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :seqlen]
    else:
        inputs = torch.cat([initial_states.to(weight.dtype), inputs], dim=-1)
        out = F.conv1d(inputs, weight.unsqueeze(1), bias, groups=dim)
    out = (out if act is None else F.silu(out)).to(dtype_in)
    if not return_final_states:
        return out
    final_states = F.pad(inputs, (width - 1 - inputs.shape[-1], 0)).to(dtype_in)  # the last width - 1, zeros first
    if final_states_out is None:
        return out, final_states
    final_states_out.copy_(final_states)
    return out, final_states_out


def causal_conv1d_update_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                             cache_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """causal_conv1d_update's definition: x [batch, dim] (one token) or [batch, dim, seqlen] after the state
    conv_state [batch, dim, state_len] (state_len >= width - 1), in the weight's dtype; the state keeps the last
    state_len inputs (in place), or with ``cache_seqlens`` [batch] is a circular buffer whose next write is at
    cache_seqlens % state_len (of more tokens than it holds, the last ones). Returns the seqlen outputs in x's dtype, [batch, dim] for a one-token x."""
    act = _silu_or_none(activation)
    one_token = isinstance(x, torch.Tensor) and x.dim() == 2
    x, width = _checked_update(x, conv_state, weight)
    batch, dim, seqlen = x.shape
    state_len = conv_state.shape[-1]
    check(conv_state.shape[0] == batch, f"conv_state has {conv_state.shape[0]} rows for x's batch of {batch}")
    dtype_in = x.dtype
    if cache_seqlens is None:
        inputs = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
        conv_state.copy_(inputs[..., inputs.shape[-1] - state_len:])  # the last state_len inputs
    else:
        _check_tensor("cache_seqlens", cache_seqlens, (batch,), f"(batch,) = ({batch},)", floating=False)
        offsets = cache_seqlens.long()[:, None]
        history = conv_state[..., :0]  # width 1: the window reads nothing before x
        if width > 1:
            read = torch.remainder(offsets + torch.arange(1 - width, 0, device=x.device), state_len)
            history = conv_state.gather(2, read[:, None, :].expand(batch, dim, width - 1))
        inputs = torch.cat([history, x], dim=-1).to(weight.dtype)
        kept = min(seqlen, state_len)  # a token that a later one of x writes over is not written
        if kept:
            written = torch.remainder(offsets + torch.arange(seqlen - kept, seqlen, device=x.device), state_len)
            conv_state.scatter_(2, written[:, None, :].expand(batch, dim, kept),
                                x[..., seqlen - kept:].to(conv_state.dtype))
    out = F.conv1d(inputs, weight.unsqueeze(1), bias, groups=dim)[..., -seqlen:]
    out = (out if act is None else F.silu(out)).to(dtype_in)
    return out.squeeze(-1) if one_token else out
