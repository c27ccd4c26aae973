"""A drop-in for Dao-AILab causal-conv1d (Mamba, Jamba and vLLM call it): switch with one import line,

    from gconvgen.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states

or, for code that imports that package's modules, the same module paths under gconvgen:

    from gconvgen.causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref
    from gconvgen.causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states

Same arguments, same results, same reference semantics as that package's ``causal_conv1d_ref``,
``causal_conv1d_update_ref`` and ``causal_conv1d_varlen_states_ref``, which are here too (eager torch ops, for
tests that compare against them). The implementation, and what runs where, is gconvgen/nn/causal.py.
"""
from .causal_conv1d_interface import (causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update,
                                      causal_conv1d_update_ref)
from .causal_conv1d_varlen import causal_conv1d_varlen_states, causal_conv1d_varlen_states_ref

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states", "causal_conv1d_ref",
           "causal_conv1d_update_ref", "causal_conv1d_varlen_states_ref"]
