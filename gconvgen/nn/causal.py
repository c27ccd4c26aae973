"""A drop-in for Dao-AILab causal-conv1d (Mamba, Jamba and vLLM call it): switch with one import line,

    from gconvgen.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states

Same arguments, same results, same reference semantics as that package's ``causal_conv1d_ref`` and
``causal_conv1d_update_ref``: x is [batch, dim, seqlen] (any strides: its channel-last views included), the
weight is (dim, width), the computation runs in the weight's precision (float32 weights with float16 or
bfloat16 x: x is read as float32 and the output rounded once to x's dtype), and ``activation`` is None,
"silu" or "swish".

What runs where:
- ``causal_conv1d_fn`` is gconvgen.conv1d's generated depthwise kernel with the causal padding and the fused
  SiLU, one pass over whole rows, forward and backward (deterministic: no atomics). The outputs whose window
  reaches past what that pass saw are computed again and written over it (causal_depthwise): with
  ``initial_states`` the first width - 1 outputs, from the states and the first inputs; with ``seq_idx``
  (several sequences packed in one row) the outputs with a tap reaching into another sequence, that tap
  masked, and 0 where seq_idx is negative (padding), as causal-conv1d's kernel does; with ``seq_idx`` the
  SiLU then runs as a torch op (one pass over the output). Neither x nor the output is copied for them;
  ``final_states`` are the last width - 1 inputs. When the weight's dtype differs from x's, x is cast to it
  first (one copy). Finding the rewritten outputs syncs with the host once; under torch.compile and
  torch.func transforms (vmap, jacfwd), which cannot, the conv runs as torch ops (states placed before x,
  or one masked pass over x per tap). When the weight needs its gradient, a second sync asks whether the
  whole-row pass read an inf or NaN for an output it rewrote (padding, a sequence's first width - 1): its
  weight gradient would multiply it by that output's zero gradient (0 x inf = NaN), so that call runs as
  the masked torch ops instead, whose masked taps have no gradient.
- ``causal_conv1d_update`` (decode: one or several new tokens per sequence from a rolling or circular
  state, a state pool indexed per request with -1 for a padded slot) and ``causal_conv1d_varlen_states`` are
  a few hundred kilobytes of gathers and length-``width`` dot products per step, written with torch ops.

What causal-conv1d does not accept either (an activation other than silu/swish, ``seq_idx`` together with
``initial_states`` or ``return_final_states``) raises ValueError with the reason, as does any shape,
dtype or device mismatch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..ir import check
from .conv2d import conv2d

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class UnsupportedActivation(ValueError, NotImplementedError):
    """An activation the causal conv does not fuse: a ValueError, as gconvgen's input errors are, and the
    NotImplementedError causal-conv1d raises for it, so a caller's handler of either catches it."""


def _silu_or_none(activation: object) -> Optional[str]:
    check(activation in (None, "silu", "swish"),
          f"activation={activation!r} is not supported; use None, 'silu' or 'swish' (silu's other name)",
          UnsupportedActivation)
    return None if activation is None else "silu"


def _check_tensor(name: str, value: object, shape: tuple, meaning: str, floating: bool = True) -> None:
    check(isinstance(value, torch.Tensor), f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    check(value.dim() == len(shape) and all(want is None or got == want for got, want in zip(value.shape, shape)),
          f"{name} has shape {tuple(value.shape)}; expected {meaning}")
    if floating:
        check(value.dtype in _FLOATS, f"{name}.dtype={value.dtype} is not supported; use float32, float16, "
                                      f"bfloat16 or float64", TypeError)


def _check_device(x: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor is not None:
            check(tensor.device == x.device,
                  f"{name} is on {tensor.device} but x is on {x.device}; move it with .to('{x.device}')")


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The weight's precision, as causal_conv1d_ref computes (x.to(weight.dtype)); never below x's."""
    return torch.promote_types(x.dtype, weight.dtype)


def _checked_weight(weight: object, dim: int) -> int:
    _check_tensor("weight", weight, (dim, None), f"(dim, width) = ({dim}, width): one filter per channel of x")
    width = weight.shape[1]
    check(width >= 1, f"weight has shape {tuple(weight.shape)}; its width must be >= 1")
    return width


# ---------------------------------------------------------------------------------------------- prefill


def causal_conv1d_fn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     seq_idx: Optional[torch.Tensor] = None, initial_states: Optional[torch.Tensor] = None,
                     return_final_states: bool = False, final_states_out: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The causal depthwise conv of x [batch, dim, seqlen] with weight (dim, width) and bias (dim,):
    out[b, d, t] = act(bias[d] + sum_j weight[d, j] * x[b, d, t - (width - 1) + j]), x zero before t = 0
    (or ``initial_states`` [batch, dim, width - 1] there). With ``seq_idx`` [batch, seqlen] (integers), a tap
    reads x only within the output's own sequence (same seq_idx), and outputs whose seq_idx is negative
    are 0. ``return_final_states``: also return the last width - 1 inputs [batch, dim, width - 1] (zeros
    before the start), written into ``final_states_out`` when given. Returns out [batch, dim, seqlen] in x's
    dtype, or (out, final_states). Differentiable in x, weight, bias and initial_states."""
    act = _silu_or_none(activation)
    _check_tensor("x", x, (None, None, None), "(batch, dim, seqlen)")
    batch, dim, seqlen = x.shape
    width = _checked_weight(weight, dim)
    if bias is not None:
        _check_tensor("bias", bias, (dim,), f"(dim,) = ({dim},)")
    _check_device(x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                  final_states_out=final_states_out)
    if seq_idx is not None:
        check(initial_states is None and not return_final_states,
              "seq_idx cannot be combined with initial_states or return_final_states (neither can causal-conv1d's): "
              "a packed row holds several sequences, each starting from zeros; run each sequence on its own to "
              "carry states")
        _check_tensor("seq_idx", seq_idx, (batch, seqlen), f"(batch, seqlen) = ({batch}, {seqlen})", floating=False)
        check(not seq_idx.is_floating_point() and not seq_idx.is_complex() and seq_idx.dtype != torch.bool,
              f"seq_idx.dtype={seq_idx.dtype} must be an integer type (torch.int32)", TypeError)
    if initial_states is not None:
        _check_tensor("initial_states", initial_states, (batch, dim, width - 1),
                      f"(batch, dim, width - 1) = ({batch}, {dim}, {width - 1})")
    check(isinstance(return_final_states, bool),
          f"return_final_states={return_final_states!r} must be True or False", TypeError)
    if final_states_out is not None:
        check(return_final_states, "final_states_out is given but return_final_states=False; pass "
                                   "return_final_states=True to have it written")
        _check_tensor("final_states_out", final_states_out, (batch, dim, width - 1),
                      f"(batch, dim, width - 1) = ({batch}, {dim}, {width - 1})")

    out, final_states = causal_depthwise(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
                                         activation=act)
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states_out.copy_(final_states)
        return out, final_states_out
    return out, final_states


def causal_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     seq_idx: Optional[torch.Tensor] = None, initial_states: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None,
                     residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_fn's computation on checked arguments (x [batch, dim, seqlen], weight (dim, width)),
    with ``activation`` None or "silu" and a ``residual`` [batch, dim, seqlen] added before it: (out in x's
    dtype, the final states [batch, dim, width - 1] in x's dtype). Computed in the weight's precision.

    The generated kernel runs the causal conv over whole rows (zeros before t = 0), once. Only outputs whose
    window reaches past what the kernel saw are computed again and written over it: the first width - 1
    with ``initial_states`` (from those states and the first inputs), the outputs reading another packed
    sequence with ``seq_idx`` (their taps into it masked); padded positions (negative seq_idx) are set to 0.
    So neither x nor the output is copied for them (x is cast once where the weight is wider). With
    ``seq_idx`` the activation is applied after the rewrite, so that the backward never differentiates it
    where the kernel read another sequence (an inf there would make silu's derivative NaN).
    Finding the rewritten outputs syncs with the host; under torch.compile and torch.func transforms
    (vmap, jacfwd), where it cannot, the conv runs as torch ops instead (_dense_causal)."""
    width, seqlen = weight.shape[1], x.shape[-1]
    compute = _compute_dtype(x, weight)
    x_in = x.to(compute)
    weight_in = weight.to(compute)
    bias_in = None if bias is None else bias.to(compute)
    residual_in = None if residual is None else residual.to(compute)
    states_in = None if initial_states is None else initial_states.to(compute)
    head = min(width - 1, seqlen)
    history = x_in[..., seqlen - head:]
    before = states_in if states_in is not None else x_in.new_zeros(*x.shape[:2], width - 1)
    final_states = torch.cat([before, history], dim=-1)[..., head:].to(x.dtype)  # the last width - 1 inputs
    if x.numel() == 0:
        return x.new_zeros(x.shape), final_states
    if _transformed(x, weight, bias, residual, seq_idx, initial_states):
        out = _dense_causal(x_in, weight_in, bias_in, seq_idx, states_in, activation, residual_in)
        return out.to(x.dtype), final_states
    fused = activation if seq_idx is None else None
    out = _causal_conv(x_in, weight_in, bias_in, fused, residual_in, left=width - 1)
    if states_in is not None and head:
        # outputs t < width - 1 read the states: the unpadded conv of (states, their first inputs)
        window = torch.cat([states_in, x_in[..., :head]], dim=-1)
        out[..., :head] = _causal_conv(window, weight_in, bias_in, fused,
                                       None if residual_in is None else residual_in[..., :head], left=0)
    if seq_idx is not None:
        weight_gradient = torch.is_grad_enabled() and weight_in.requires_grad
        rewritten_nonfinite = _rewrite_packed(out, x_in, weight_in, bias_in, seq_idx, residual_in, weight_gradient)
        if weight_gradient and rewritten_nonfinite.item():
            # the kernel's weight gradient would be NaN where it read an inf or NaN for a rewritten output (its
            # zero gradient times that input): the masked torch ops take no such product
            out = _dense_causal(x_in, weight_in, bias_in, seq_idx, None, activation, residual_in)
            return out.to(x.dtype), final_states
        out = out if activation is None else F.silu(out)
    return out.to(x.dtype), final_states


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str],
                 residual: Optional[torch.Tensor], left: int) -> torch.Tensor:
    """act(conv + bias + residual) of x [N, C, L] by weight (C, k), ``left`` zeros before x, as gconvgen.conv1d
    runs it: the 2-D conv with height 1 on views [N, C, 1, L] and weight [C, 1, 1, k]."""
    return conv2d(x.unsqueeze(2), weight[:, None, None, :], bias, padding=(0, 0, left, 0), groups=x.shape[1],
                  activation=activation, residual=None if residual is None else residual.unsqueeze(2)).squeeze(2)


def _transformed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the call is traced by torch.compile or runs under a torch.func transform (its tensors wrapped),
    where the rewrite's host sync and in-place writes cannot run."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return torch.compiler.is_compiling() or any(t is not None and wrapped(t) for t in tensors)


def _dense_causal(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  seq_idx: Optional[torch.Tensor], initial_states: Optional[torch.Tensor], activation: Optional[str],
                  residual: Optional[torch.Tensor]) -> torch.Tensor:
    """causal_depthwise's output as torch ops without a host sync or an in-place write (torch.compile, vmap):
    the states placed before x (a copy), or, with seq_idx, one masked pass over x per tap in the accumulator's
    precision (float32, float64 for float64)."""
    width, seqlen = weight.shape[1], x.shape[-1]
    if seq_idx is None:
        history = x if initial_states is None else torch.cat([initial_states, x], dim=-1)
        return _causal_conv(history, weight, bias, activation, residual, left=0 if initial_states is not None
                            else width - 1)
    accumulator = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_wide, weight_wide = x.to(accumulator), weight.to(accumulator)
    out = x_wide.new_zeros(x.shape) if bias is None else bias.to(accumulator)[None, :, None].expand(x.shape).clone()
    position = torch.arange(seqlen, device=x.device)
    for back in range(width):  # tap width - 1 - back reads x[t - back]: zeros before the row, as conv's padding
        read = F.pad(x_wide, (back, 0))[..., :seqlen]
        # [batch, seqlen]: the tap reads before the row or its output's own sequence, and that output is not padding
        own = ((position < back) | (seq_idx == F.pad(seq_idx, (back, 0))[:, :seqlen])) & (seq_idx >= 0)
        out = out + _masked_product(own[:, None, :], read, weight_wide[:, width - 1 - back, None])
    if residual is not None:
        out = out + residual.to(accumulator)
    if activation is not None:
        out = F.silu(out)
    return torch.where((seq_idx >= 0)[:, None, :], out, 0.0).to(x.dtype)


def _masked_product(keep: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x * weight where ``keep``, else 0, with no inf or NaN of a masked element in the value or in either
    gradient: where, not *, since inf x 0 is NaN; and masked before the product as well as after it, since the
    product's backward multiplies the gradient 0 by the masked element."""
    return torch.where(keep, torch.where(keep, x, 0.0) * weight, 0.0)


# outputs of a packed row computed again a chunk at a time: at most this many window elements in float32
_WINDOW_ELEMENTS = 1 << 24


def _rewrite_packed(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    seq_idx: torch.Tensor, residual: Optional[torch.Tensor], find_nonfinite: bool) -> torch.Tensor:
    """Writes over ``out`` (the whole rows' causal conv + bias + residual, before any activation) the outputs of
    a packed row that differ from it (see causal_conv1d_fn): those of a tap reading another sequence (seq_idx
    differs), computed again with that tap masked, and 0 where seq_idx is negative. In a row of a few sequences
    they are a few width - 1 outputs after each start, found on seq_idx alone ([batch, seqlen] integers,
    width - 1 comparisons; one host sync). Windows accumulate in float32 (float64 for float64).
    With ``find_nonfinite``, returns (on the device, unsynced) whether the whole-row kernel read an inf or NaN
    for an output rewritten here: its weight gradient multiplies it by that output's zero gradient
    (0 x inf = NaN); without (no weight gradient wanted), False unlooked."""
    width, seqlen = weight.shape[1], x.shape[-1]
    crossing = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    for back in range(1, min(width, seqlen)):  # output t's tap width - 1 - back reads x[t - back]
        crossing[:, back:] |= seq_idx[:, back:] != seq_idx[:, :seqlen - back]
    padded = seq_idx < 0
    rows, times = (crossing | padded).nonzero(as_tuple=True)
    accumulator = torch.float64 if x.dtype == torch.float64 else torch.float32
    back = torch.arange(width, device=x.device)
    taps = weight.to(accumulator).flip(1).T  # [width, dim]: row `back` multiplies x[t - back]
    by_position = out.transpose(1, 2)  # [batch, seqlen, dim]: written through two index tensors, no slice between
    chunk = max(1, _WINDOW_ELEMENTS // (width * x.shape[1]))
    rewritten_nonfinite = torch.zeros((), dtype=torch.bool, device=x.device)
    for first in range(0, rows.numel(), chunk):
        row, time = rows[first:first + chunk], times[first:first + chunk]
        source = time[:, None] - back[None, :]  # [outputs, width]
        before = source < 0  # zeros before the row, as the kernel's padding (a NaN gradient times 0 is NaN)
        same = seq_idx[row[:, None], source.clamp(min=0)] == seq_idx[row, time][:, None]
        own = (before | same) & ~padded[row, time][:, None]
        window = x[row[:, None], :, source.clamp(min=0)].to(accumulator)  # [outputs, width, dim]
        window = torch.where(before[..., None], 0.0, window)
        value = _masked_product(own[..., None], window, taps).sum(1)
        if find_nonfinite:  # the whole-row kernel read these for outputs whose gradient it is given as 0
            rewritten_nonfinite |= (~before[..., None] & ~torch.isfinite(window)).any()
        if bias is not None:
            value = value + bias.to(accumulator)
        if residual is not None:
            value = value + residual[row, :, time].to(accumulator)
        value = torch.where(padded[row, time][:, None], 0.0, value)
        by_position[row, time] = value.to(out.dtype)
    return rewritten_nonfinite


# ---------------------------------------------------------------------------------------------- decode


def _checked_update(x: object, conv_state: object, weight: object) -> tuple[torch.Tensor, int]:
    """A decode step's x as [batch, dim, seqlen] (a one-token [batch, dim] x unsqueezed) and the weight's width,
    checked with conv_state [rows, dim, state_len >= width - 1]."""
    check(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    check(x.dim() in (2, 3), f"x has shape {tuple(x.shape)}; expected (batch, dim) or (batch, dim, seqlen)")
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    _check_tensor("x", x3, (None, None, None), "(batch, dim) or (batch, dim, seqlen)")
    dim = x3.shape[1]
    width = _checked_weight(weight, dim)
    _check_tensor("conv_state", conv_state, (None, dim, None), f"(batch, dim, state_len) with dim = {dim}")
    state_len = conv_state.shape[-1]
    check(state_len >= width - 1, f"conv_state has state_len={state_len}; it must hold at least width - 1 = "
                                  f"{width - 1} inputs")
    return x3, width


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                         cache_seqlens: Optional[torch.Tensor] = None,
                         conv_state_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode ``seqlen`` new tokens x [batch, dim] or [batch, dim, seqlen] per sequence from its state, in
    place: ``conv_state`` [batch or pool, dim, state_len] (state_len >= width - 1) holds each sequence's
    last inputs, oldest first; with ``cache_seqlens`` [batch] it is a circular buffer whose next write goes
    to cache_seqlens % state_len; with ``conv_state_indices`` [batch] (integers) sequence b's state is row
    conv_state_indices[b] of the pool, and -1 marks a padded slot: its output is 0 and no state changes.
    Returns out in x's shape and dtype: act(bias + the causal conv of the state followed by x), computed
    in the weight's precision (float32 at least) and rounded once."""
    act = _silu_or_none(activation)
    x3, width = _checked_update(x, conv_state, weight)
    batch, dim, seqlen = x3.shape
    one_token = x.dim() == 2
    state_len = conv_state.shape[-1]
    check(conv_state.dtype == x.dtype, f"conv_state.dtype={conv_state.dtype} does not match x.dtype={x.dtype}; "
                                       f"the state holds past inputs: cast it with .to({x.dtype})", TypeError)
    if bias is not None:
        _check_tensor("bias", bias, (dim,), f"(dim,) = ({dim},)")
    _check_device(x, conv_state=conv_state, weight=weight, bias=bias, cache_seqlens=cache_seqlens,
                  conv_state_indices=conv_state_indices)
    for name, index in (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices)):
        if index is not None:
            _check_tensor(name, index, (batch,), f"(batch,) = ({batch},)", floating=False)
            check(not index.is_floating_point() and index.dtype != torch.bool,
                  f"{name}.dtype={index.dtype} must be an integer type (torch.int32)", TypeError)
    if conv_state_indices is None:
        check(conv_state.shape[0] == batch, f"conv_state has {conv_state.shape[0]} rows for x's batch of {batch}; "
                                            f"pass conv_state_indices to pick rows of a larger state pool")
        rows = torch.arange(batch, device=x.device)
        active = torch.ones(batch, dtype=torch.bool, device=x.device)
    else:
        rows = conv_state_indices.long()
        active = rows >= 0
        check(bool((rows < conv_state.shape[0]).all()) and bool((rows >= -1).all()),
              f"conv_state_indices must be in [-1, {conv_state.shape[0]}) (-1: a padded slot), got "
              f"{conv_state_indices.tolist()}")
    rows = rows[active]
    x_active = x3[active]
    state = conv_state[rows]  # [active, dim, state_len], a copy
    compute = torch.promote_types(_compute_dtype(x, weight), torch.float32)
    if cache_seqlens is None or state_len == 0:  # (a width-1 filter keeps no state: nothing to write)
        window = torch.cat([state, x_active], dim=-1)
        new_state = window[..., window.shape[-1] - state_len:]
    else:
        start = cache_seqlens.long()[active]
        history = torch.remainder(torch.arange(-(width - 1), 0, device=x.device)[None, :] + start[:, None], state_len)
        window = torch.cat([state.gather(2, history[:, None, :].expand(-1, dim, -1)), x_active], dim=-1)
        written = torch.remainder(torch.arange(seqlen, device=x.device)[None, :] + start[:, None], state_len)
        new_state = state.scatter(2, written[:, None, :].expand(-1, dim, -1), x_active)
        if seqlen > state_len:  # scatter_'s order among repeated positions is unspecified: keep the last
            new_state = new_state.scatter(2, written[:, None, -state_len:].expand(-1, dim, -1),
                                          x_active[..., -state_len:])
    out_active = F.conv1d(window.to(compute), weight.to(compute).unsqueeze(1),
                          None if bias is None else bias.to(compute), groups=dim)[..., -seqlen:]
    if act is not None:
        out_active = F.silu(out_active)
    conv_state[rows] = new_state
    out = x3.new_zeros(x3.shape)
    out[active] = out_active.to(x.dtype)
    return out.squeeze(-1) if one_token else out


# ---------------------------------------------------------------------------------------------- varlen states


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """The final states of packed variable-length sequences: x [total_tokens, dim] holds sequence i at
    rows [cu_seqlens[i], cu_seqlens[i + 1]) (cu_seqlens sorted, from 0). Returns states
    [batch, dim, state_len]: each sequence's last state_len inputs, oldest first, zeros before its start
    (a channel-last view, as causal-conv1d returns). Forward only."""
    _check_tensor("x", x, (None, None), "(total_tokens, dim)")
    _check_tensor("cu_seqlens", cu_seqlens, (None,), "(batch + 1,)", floating=False)
    check(cu_seqlens.shape[0] >= 1, "cu_seqlens must hold at least one offset (0)")
    check(isinstance(state_len, int) and not isinstance(state_len, bool) and state_len >= 0,
          f"state_len={state_len!r} must be an int >= 0", TypeError)
    _check_device(x, cu_seqlens=cu_seqlens)
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    positions = ends[:, None] - state_len + torch.arange(state_len, device=x.device)[None, :]  # [batch, state_len]
    inside = positions >= starts[:, None]
    gathered = x[positions.clamp(min=0, max=max(x.shape[0] - 1, 0))] if x.shape[0] else x.new_zeros(
        (*positions.shape, x.shape[1]))
    states = torch.where(inside[..., None], gathered, 0.0).to(x.dtype)  # [batch, state_len, dim]
    return states.transpose(1, 2)
