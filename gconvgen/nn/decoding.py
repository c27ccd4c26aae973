"""Decoding with a causal depthwise conv (Mamba's): new time steps per sequence, from a rolling state.

This is plain torch, not a generated kernel: a step is one dot product of length k per channel (k = 4 in
Mamba), a few hundred kilobytes moved for a whole batch, so there is nothing for a kernel to tile and
torch's elementwise ops already run it at memory speed.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir import check
from .causal import causal_conv1d_update as update
from ..runtime.device import DTYPE_NAMES


def _check_tensor(name: str, value: object, shape: tuple[int, ...], meaning: str) -> None:
    check(isinstance(value, torch.Tensor), f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    check(tuple(value.shape) == shape, f"{name} has shape {tuple(value.shape)}; expected {list(shape)} ({meaning})")


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, activation: Optional[str] = None,
                         cache_seqlens: Optional[torch.Tensor] = None,
                         conv_state_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoding steps of a causal depthwise conv1d, updating ``conv_state`` in place.

    ``x`` [B, C] is the new input of each sequence ([B, C, T]: T new tokens, e.g. speculative decoding);
    ``conv_state`` [B, C, S] holds each channel's last S >= k - 1 inputs, oldest first (zeros before the
    sequence starts); ``weight`` is [C, 1, k] (nn.Conv1d's depthwise weight) or [C, k], in x's dtype or a
    wider one (a float32 weight with half-precision x computes in float32); ``bias`` is [C] or None. Returns
    out [B, C] ([B, C, T]),
        out[b, c] = act(sum_j weight[c, j] * window[b, c, j] + bias[c]),  window = the state followed by x,
    and shifts ``conv_state`` left by T with x appended. Stepping through a sequence from a zero state
    gives exactly gconvgen.conv1d(sequence, weight, bias, padding='causal', groups=C) (F.conv1d with k - 1
    zeros on the left), one column per step. ``activation``: None, "silu" or "swish" (Mamba's).
    ``cache_seqlens`` [B] makes the state a circular buffer written at cache_seqlens % S;
    ``conv_state_indices`` [B] picks each sequence's row of a larger state pool, -1 for a padded slot (its
    output is 0, no state changes): vLLM's continuous batching. gconvgen.causal_conv1d.causal_conv1d_update
    is the same step with causal-conv1d's argument order.

    Implemented with torch ops, not a generated kernel: it is one dot product of length k per channel.
    Half-precision inputs are summed in float32 and rounded once, as the conv kernels do.
    Raises TypeError / ValueError naming the argument for mismatched shapes, dtypes or devices.
    """

    check(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    check(x.dim() in (2, 3), f"x has shape {tuple(x.shape)}; expected [batch, channels] (one time step per "
                             f"sequence) or [batch, channels, tokens]")
    check(x.dtype in DTYPE_NAMES, f"x.dtype={x.dtype} is not supported; use torch.float32, torch.float16, "
                                  f"torch.bfloat16 or torch.float64", TypeError)
    batch, channels = x.shape[:2]
    check(channels >= 1, f"x has shape {tuple(x.shape)}, 0 channels, so the step has nothing to compute; skip the "
                         f"call, or give x [batch, channels] with channels >= 1")
    check(isinstance(weight, torch.Tensor), f"weight must be a torch.Tensor, got {type(weight).__name__}", TypeError)
    check((weight.dim() == 3 and weight.shape[1] == 1 and weight.shape[0] == channels)
          or (weight.dim() == 2 and weight.shape[0] == channels),
          f"weight has shape {tuple(weight.shape)}; expected [{channels}, 1, k] or [{channels}, k] (one depthwise "
          f"filter per channel of x)")
    kernel_size = weight.shape[-1]
    check(kernel_size >= 1, f"weight has shape {tuple(weight.shape)}; its kernel size k (the last dimension) must "
                            f"be >= 1")
    taps = weight.reshape(channels, kernel_size)  # [C, k], a view
    check(isinstance(conv_state, torch.Tensor) and conv_state.dim() == 3
          and conv_state.shape[1] == channels and conv_state.shape[2] >= kernel_size - 1,
          f"conv_state has shape {tuple(getattr(conv_state, 'shape', ()))}; expected [{batch}, {channels}, "
          f"{kernel_size - 1}] (batch, channels, the last k - 1 inputs oldest first; a longer state is fine)")
    if bias is not None:
        _check_tensor("bias", bias, (channels,), "one value per channel")
    wider = x.dtype in (torch.float16, torch.bfloat16) and weight.dtype in (torch.float32, torch.float64)
    for name, tensor in (("conv_state", conv_state), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            check(tensor.dtype == x.dtype or (wider and name != "conv_state" and tensor.dtype == weight.dtype),
                  f"{name}.dtype={tensor.dtype} does not match x.dtype={x.dtype}; cast it with .to({x.dtype})",
                  TypeError)
            check(tensor.device == x.device,
                  f"{name} is on {tensor.device} but x is on {x.device}; move it with .to('{x.device}')")
    return update(x, conv_state, taps, bias, activation, cache_seqlens=cache_seqlens,
                  conv_state_indices=conv_state_indices)
