"""The planner: divisibility errors with their fix, channel-padding passes, lowering to masks, budget."""
from __future__ import annotations

import importlib

import networkx as nx
import pytest

import gconvgen
from gconvgen import ConvSpec, knobs, plan, suggest_groups

plan_module = importlib.import_module("gconvgen.plan")  # the module; gconvgen.plan is the function


def spec(in_channels, out_channels, groups, policy="pad", **kwargs):
    return ConvSpec(in_channels, out_channels, groups, (3, 3), channel_policy=policy, **kwargs)


def test_strict_error_names_count_near_groups_and_padding_fix():
    with pytest.raises(ValueError) as raised:
        plan(spec(11, 6, 3, policy="strict"))
    assert str(raised.value) == ("in_channels=11 is not divisible by groups=3; groups that divide both 11 and 6: 1; "
                                 "pass channel_policy='pad' to pad 11 -> 12 input channels (+9.1% work)")


def test_strict_error_names_both_uneven_counts():
    with pytest.raises(ValueError, match=r"in_channels=10 and out_channels=14 are not divisible by groups=4;.*"
                                         r"10 -> 12 input channels and 14 -> 16 output channels"):
        plan(spec(10, 14, 4, policy="strict"))


def test_suggest_groups_closest_first():
    assert suggest_groups(11, 6, 3) == [1]
    assert suggest_groups(12, 18, 4) == [3, 2, 6, 1]  # common divisors 1, 2, 3, 6 by distance to 4, ties smaller first
    assert suggest_groups(64, 64, 64)[0] == 64


def test_pad_inserts_passes_and_lowering_turns_them_into_masks():
    conv_plan = plan(spec(11, 13, 3))
    logical = list(nx.topological_sort(conv_plan.logical))
    assert logical == ["input", "pad_input_channels", "conv", "slice_output_channels", "output"]
    assert list(nx.topological_sort(conv_plan.lowered)) == ["input", "conv", "output"]
    assert conv_plan.kernel["mask_input_channels"] and conv_plan.kernel["mask_output_channels"]
    explained = conv_plan.explain()
    for fragment in ("logical graph:", "lowered graph:", "PadInputChannels", "11 -> 12", "SliceOutputChannels",
                     "15 -> 13", "mask_input_channels=True", "padding overhead: +"):
        assert fragment in explained


def test_divisible_pad_plan_equals_strict_plan():
    padded, strict = plan(spec(12, 24, 3)), plan(spec(12, 24, 3, policy="strict"))
    assert list(padded.lowered.nodes) == list(strict.lowered.nodes)
    assert not padded.kernel["mask_input_channels"] and not padded.kernel["mask_output_channels"]
    assert padded.padding_overhead == 0.0


def test_overhead_counts_useful_multiply_adds():
    # C_in=12, C_out=11, groups=3: groups read 4, 4, 4 inputs and write 4, 4, 3 outputs: 48 of 44 useful
    assert gconvgen.padding_overhead(spec(12, 11, 3)) == pytest.approx(48 / 44 - 1)


def test_budget_refuses_then_accepts_when_raised():
    wasteful = spec(3, 3, 2)  # groups of (2 in, 2 out) and (1 in, 1 out): 8 multiply-adds for 5 useful
    with pytest.raises(ValueError, match=r"\+60.0% work, over the padding budget of 50%"):
        plan(wasteful)
    assert plan(wasteful, padding_budget=0.75).padding_overhead == pytest.approx(0.6)
    with knobs.scoped(PADDING_BUDGET=1.0):
        plan(wasteful)


def test_group_without_input_channels_is_refused():
    with pytest.raises(ValueError, match="leaves group 3 with no input channels"):
        plan(ConvSpec(5, 8, 4, (3, 3), channel_policy="pad"))  # groups read 2, 2, 1 and 0 channels


def test_kernel_family():
    assert plan(spec(8, 16, 8, policy="strict")).family == "depthwise"   # multiplier 2
    assert plan(spec(7, 13, 7)).family == "depthwise"                    # uneven outputs, one input per group
    assert plan(spec(12, 12, 3, policy="strict")).family == "igemm"
    grouped = plan(spec(12, 12, 3))
    assert grouped.families == ("igemm",) and grouped.backward_family == "igemm"


def test_depthwise_offers_both_forward_families_and_wide_windows_default_to_tensor_cores():
    narrow = plan(ConvSpec(8, 8, 8, (5, 5), dtype="bfloat16"))  # 25 taps: memory-bound on CUDA cores
    wide = plan(ConvSpec(8, 8, 8, (7, 7), dtype="bfloat16"))    # 49 taps: CUDA-core bound
    assert plan(ConvSpec(8, 8, 8, (7, 7), dtype="float32")).family == "depthwise"  # no faster dot in fp32
    assert narrow.families == ("depthwise", "depthwise_gemm")
    assert wide.families == ("depthwise_gemm", "depthwise")
    assert narrow.backward_family == wide.backward_family == "depthwise"
    chosen = plan(ConvSpec(8, 8, 8, (5, 5)), family="depthwise_gemm")  # as a tuning result picks it
    assert chosen.family == "depthwise_gemm" and "family=depthwise_gemm" in chosen.explain()
    with pytest.raises(ValueError, match=r"family='igemm' cannot compute .*; use one of \('depthwise', 'depthwise_gemm'\)"):
        plan(ConvSpec(8, 8, 8, (5, 5)), family="igemm")


def test_debug_verifier_catches_a_broken_pass(monkeypatch):
    def add_cycle(graph, conv_spec, budget):
        graph.add_edge("output", "input")

    monkeypatch.setattr(plan_module, "LOGICAL_PIPELINE", plan_module.LOGICAL_PIPELINE + [("add_cycle", add_cycle)])
    plan(spec(12, 12, 3))  # without the knob nothing checks
    with knobs.scoped(DEBUG_PLAN=1), pytest.raises(RuntimeError, match="cycle after pass 'add_cycle'"):
        plan(spec(12, 12, 3))
