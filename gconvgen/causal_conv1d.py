"""A drop-in for Dao-AILab causal-conv1d (Mamba, Jamba and vLLM call it): switch with one import line,

    from gconvgen.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states

Same arguments, same results, same reference semantics as that package's ``causal_conv1d_ref`` and
``causal_conv1d_update_ref``. The implementation, and what runs where, is gconvgen/nn/causal.py.
"""
from .nn.causal import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states"]
