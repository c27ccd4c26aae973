"""Decoding with a causal depthwise conv (Mamba's): one new time step per sequence, from a rolling state.

This is plain torch, not a generated kernel: a step is one dot product of length k per channel (k = 4 in
Mamba), a few hundred kilobytes moved for a whole batch, so there is nothing for a kernel to tile and
torch's elementwise ops already run it at memory speed.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ir import check
from .runtime.ops import DTYPE_NAMES


def _check_tensor(name: str, value: object, shape: tuple[int, ...], meaning: str) -> None:
    check(isinstance(value, torch.Tensor), f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    check(tuple(value.shape) == shape, f"{name} has shape {tuple(value.shape)}; expected {list(shape)} ({meaning})")


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decoding step of a causal depthwise conv1d, updating ``conv_state`` in place.

    ``x`` [B, C] is the new input of each sequence; ``conv_state`` [B, C, k - 1] holds each channel's last
    k - 1 inputs, oldest first (zeros before the sequence starts); ``weight`` is [C, 1, k] (nn.Conv1d's
    depthwise weight) or [C, k]; ``bias`` is [C] or None. Returns out [B, C],
        out[b, c] = sum_j weight[c, j] * window[b, c, j] + bias[c],  window = conv_state[b, c] followed by x[b, c],
    and shifts ``conv_state`` left by one with x appended. Stepping through a sequence from a zero state
    gives exactly gconvgen.conv1d(sequence, weight, bias, padding='causal', groups=C) (F.conv1d with k - 1
    zeros on the left), one column per step. Any activation (Mamba's SiLU) is the caller's.

    Implemented with torch ops, not a generated kernel: it is one dot product of length k per channel.
    Half-precision inputs are summed in float32 and rounded once, as the conv kernels do.
    Raises TypeError / ValueError naming the argument for mismatched shapes, dtypes or devices.
    """
    check(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    check(x.dim() == 2, f"x has shape {tuple(x.shape)}; expected [batch, channels] (one time step per sequence)")
    check(x.dtype in DTYPE_NAMES, f"x.dtype={x.dtype} is not supported; use torch.float32, torch.float16, "
                                  f"torch.bfloat16 or torch.float64", TypeError)
    batch, channels = x.shape
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
    _check_tensor("conv_state", conv_state, (batch, channels, kernel_size - 1),
                  "batch, channels, the last k - 1 inputs oldest first")
    if bias is not None:
        _check_tensor("bias", bias, (channels,), "one value per channel")
    for name, tensor in (("conv_state", conv_state), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            check(tensor.dtype == x.dtype,
                  f"{name}.dtype={tensor.dtype} does not match x.dtype={x.dtype}; cast it with .to({x.dtype})",
                  TypeError)
            check(tensor.device == x.device,
                  f"{name} is on {tensor.device} but x is on {x.device}; move it with .to('{x.device}')")

    accumulator = torch.float64 if x.dtype == torch.float64 else torch.float32
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # [B, C, k]: the last k inputs, oldest first
    out = (window.to(accumulator) * taps.to(accumulator)).sum(dim=-1)
    if bias is not None:
        out = out + bias.to(accumulator)
    conv_state.copy_(window[..., 1:])
    return out.to(x.dtype)
