"""causal-conv1d's ``causal_conv1d.causal_conv1d_varlen`` module: the final states of packed variable-length
sequences (gconvgen/nn/causal.py) and the package's reference for them, a loop over the sequences."""
from __future__ import annotations

import torch

from ..nn.causal import _check_tensor, causal_conv1d_varlen_states

__all__ = ["causal_conv1d_varlen_states", "causal_conv1d_varlen_states_ref"]


def causal_conv1d_varlen_states_ref(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """causal_conv1d_varlen_states' definition: x [total_tokens, dim] holds sequence i at rows cu_seqlens[i] ..
    cu_seqlens[i + 1] - 1; its state [dim, state_len] holds its last state_len tokens, right-aligned, zeros before
    a shorter sequence's. Returns [batch, dim, state_len], a transposed view of [batch, state_len, dim]."""
    _check_tensor("x", x, (None, None), "(total_tokens, dim)")
    _check_tensor("cu_seqlens", cu_seqlens, (None,), "(batch + 1,)", floating=False)
    states = x.new_zeros(cu_seqlens.shape[0] - 1, state_len, x.shape[1]).transpose(1, 2)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        start = max(start, end - state_len)
        if end > start:
            states[i, :, state_len - (end - start):] = x[start:end].T
    return states
