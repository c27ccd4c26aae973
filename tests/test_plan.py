"""The planner: divisibility errors with their fix, channel-padding passes, lowering to masks, budget; and
lowering: every KernelDesc field written by a named pass, the uri, the index width, `gconvgen plan --graph`."""
from __future__ import annotations

import dataclasses
import importlib
import re

import networkx as nx
import pytest
import torch
from click.testing import CliRunner

import gconvgen
from gconvgen import ConvSpec, knobs, plan, suggest_groups
from gconvgen.compiler import codegen, lowering
from gconvgen.tools.cli import main
from gconvgen.compiler.lowering import (
    DEFAULT, INT32_MAX, KernelConfig, KernelDesc, PixelSpace, lower, needs_wide_index)
from gconvgen.runtime import launch

plan_module = importlib.import_module("gconvgen.compiler.plan")
P = pytest.param


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
    assert conv_plan.channel_masks == (True, True)
    explained = conv_plan.explain()
    for fragment in ("logical graph:", "lowered graph:", "PadInputChannels", "11 -> 12", "SliceOutputChannels",
                     "15 -> 13", "mask_input_channels=True", "padding overhead: +"):
        assert fragment in explained


def test_divisible_pad_plan_equals_strict_plan():
    padded, strict = plan(spec(12, 24, 3)), plan(spec(12, 24, 3, policy="strict"))
    assert list(padded.lowered.nodes) == list(strict.lowered.nodes)
    assert padded.channel_masks == strict.channel_masks == (False, False)
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
    assert plan(spec(8, 16, 8, policy="strict")).family == "depthwise1d"  # multiplier 2, NCHW: row by row
    assert plan(spec(7, 13, 7)).families[1] == "depthwise"                # uneven outputs, one input per group
    assert plan(spec(12, 12, 3, policy="strict")).family == "igemm_rows"  # 3 x 3 windows slide down the rows
    grouped = plan(spec(12, 12, 3))
    assert grouped.families == ("igemm_rows", "igemm") and grouped.backward_family == "igemm"
    assert plan(ConvSpec(12, 12, 3, (1, 3))).families == ("igemm", "igemm_rows")  # one-row windows: flat tiles
    assert plan(ConvSpec(192, 192, 3, (3, 3))).families == ("igemm_rows", "igemm")  # 64 a group: weights held
    assert plan(ConvSpec(384, 384, 3, (3, 3))).families == ("igemm", "igemm_rows")  # 128 a group: re-read


def test_depthwise_offers_both_forward_families_and_wide_windows_default_to_tensor_cores():
    # 25 taps reaching 8 rows: memory-bound on CUDA cores, and more open rows than the band slides with
    narrow = plan(ConvSpec(8, 8, 8, (5, 5), dilation=(2, 2), dtype="bfloat16", layout="nhwc"))
    wide = plan(ConvSpec(8, 8, 8, (7, 7), dtype="bfloat16", layout="nhwc"))    # 49 taps: CUDA-core bound
    # a few rows: the band slides down them, each input row read once (sliding_rows)
    sliding = plan(ConvSpec(8, 8, 8, (3, 3), (2, 2), dtype="float16", layout="nchw"))
    assert plan(ConvSpec(8, 8, 8, (7, 7), dtype="float32", layout="nhwc")).family == "depthwise"  # no faster dot
    assert plan(ConvSpec(8, 8, 8, (3, 3), dtype="float32", layout="nhwc")).family == "depthwise"
    # the dense kernel is offered to every depthwise conv, never the plan's default (a small map claims it)
    assert narrow.families == ("depthwise", "depthwise_gemm", "depthwise_dense")
    assert wide.families == ("depthwise_gemm", "depthwise", "depthwise_dense")
    assert sliding.families[0] == "depthwise_gemm"
    assert narrow.backward_family == wide.backward_family == sliding.backward_family == "depthwise"
    chosen = plan(ConvSpec(8, 8, 8, (5, 5)), family="depthwise_gemm")  # as a tuning result picks it
    assert chosen.family == "depthwise_gemm" and "family=depthwise_gemm" in chosen.explain()
    with pytest.raises(ValueError, match=r"family='igemm' cannot compute .*; use one of \('depthwise1d', 'depthwise', "):
        plan(ConvSpec(8, 8, 8, (5, 5)), family="igemm")


def test_debug_verifier_catches_a_broken_pass(monkeypatch):
    def add_cycle(graph, conv_spec, budget):
        graph.add_edge("output", "input")

    monkeypatch.setattr(plan_module, "LOGICAL_PIPELINE", plan_module.LOGICAL_PIPELINE + [("add_cycle", add_cycle)])
    plan(spec(12, 12, 3))  # without the knob nothing checks
    with knobs.scoped(DEBUG_PLAN=1), pytest.raises(RuntimeError, match="cycle after pass 'add_cycle'"):
        plan(spec(12, 12, 3))


# ---------------------------------------------------------------------------------------------- lowering

# what the lowering tests lower: (spec or None for grad_bias, kind, dtype)
LOWER_CASES = [
    P(ConvSpec(11, 13, 3, (3, 3), padding=(1, 1, 1, 1), channel_policy="pad"), "forward", None,
      id="igemm-pad-masks"),                                                  # C_in, C_out % groups != 0
    P(ConvSpec(8, 16, 8, (3, 3), layout="nhwc", dtype="bfloat16"), "grad_weight", None,
      id="depthwise-multiplier-2-grad-weight"),
    P(None, "grad_bias", "float64", id="grad-bias"),                          # no spec: the dtype only
]


def _lower(spec_or_none, kind, dtype, **options):
    conv_plan = None if spec_or_none is None else plan(spec_or_none)
    return lower(conv_plan, kind, dtype=dtype, interpret=True, allow_tf32=False, **options)


def _fields_written_by_each_pass(monkeypatch, spec_or_none, kind, dtype):
    """{pass name: the KernelDesc fields it writes}, seen by wrapping every pass of LOWERING_PIPELINE."""
    written = {}

    def recording(name, run_pass):
        def run(fields, ctx):
            before = set(fields)
            run_pass(fields, ctx)
            written[name] = set(fields) - before
        return run

    with monkeypatch.context() as patch:
        patch.setattr(lowering, "LOWERING_PIPELINE",
                      [(name, recording(name, run_pass)) for name, run_pass in lowering.LOWERING_PIPELINE])
        _lower(spec_or_none, kind, dtype)
    return written


@pytest.mark.parametrize("spec_or_none, kind, dtype", LOWER_CASES)
def test_every_desc_field_is_written_by_a_named_pass(monkeypatch, spec_or_none, kind, dtype):
    """No field has a default: each one (but the kind lower() starts from) comes from exactly one pass."""
    assert all(field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
               for field in dataclasses.fields(KernelDesc)), "a KernelDesc field has a default"
    written = _fields_written_by_each_pass(monkeypatch, spec_or_none, kind, dtype)
    assert list(written) == [name for name, _ in lowering.LOWERING_PIPELINE]
    assert all(written.values()), {name: fields for name, fields in written.items() if not fields}
    every = [field for fields in written.values() for field in fields]
    assert sorted(every) == sorted({field.name for field in dataclasses.fields(KernelDesc)} - {"kind"})


@pytest.mark.parametrize("removed", [name for name, _ in lowering.LOWERING_PIPELINE])
def test_lowering_without_any_one_pass_is_an_error(monkeypatch, removed):
    """A missing field is an error, never a default: the dataclass refuses the description (TypeError), or a
    later pass that reads the missing field stops at it (KeyError); either names a field the pass writes."""
    for case in LOWER_CASES:
        spec_or_none, kind, dtype = case.values
        written = _fields_written_by_each_pass(monkeypatch, spec_or_none, kind, dtype)[removed]
        with monkeypatch.context() as patch:
            patch.setattr(lowering, "LOWERING_PIPELINE",
                          [(name, run_pass) for name, run_pass in lowering.LOWERING_PIPELINE if name != removed])
            with pytest.raises((TypeError, KeyError)) as raised:
                _lower(spec_or_none, kind, dtype)
        assert any(f"'{field}'" in str(raised.value) for field in written), (case.id, written, raised.value)
    _lower(*LOWER_CASES[0].values)  # and the whole pipeline is back


def _source_body(desc):
    """The rendered source with the kernel's name (which carries the uri) taken out."""
    return codegen.render(desc).replace(desc.kernel_name, "KERNEL")


def test_uri_changes_with_every_source_decision_and_with_no_launch_setting():
    conv_plan = plan(ConvSpec(12, 12, 3, (3, 3), padding=(1, 1, 1, 1), dtype="float32"))
    base = lower(conv_plan, "forward", interpret=False, allow_tf32=False)
    variants = {  # a description differing from base in that decision only
        "tf32": lower(conv_plan, "forward", interpret=False, allow_tf32=True),
        "i64": lower(conv_plan, "forward", interpret=False, allow_tf32=False, wide_index=True),
        "interp": lower(conv_plan, "forward", interpret=True, allow_tf32=False),
        "maskin": dataclasses.replace(base, mask_input_channels=True),
        "maskout": dataclasses.replace(base, mask_output_channels=True),
    }
    readable = "igemm_rows_ci12_co12_g3_k3x3_s1x1_d1x1_p1_1_1_1_nchw_float32_"
    assert base.uri.startswith(readable) and len(base.uri) == len(readable) + 16  # + a 64-bit hash of the fields
    uris = {base.uri} | {desc.uri for desc in variants.values()}
    assert len(uris) == len(variants) + 1 and all(uri.startswith(readable) for uri in uris)
    for flag, desc in variants.items():
        assert desc.kernel_name == f"gconvgen_{desc.uri}" and desc.uri == dataclasses.replace(desc).uri
        if flag != "interp":  # float32's interpreter variant differs in its name (its cache entry) only
            assert _source_body(desc) != _source_body(base), f"{flag} does not change the source"
    masked = lower(plan(ConvSpec(11, 13, 3, (3, 3), channel_policy="pad")), "forward", interpret=False,
                   allow_tf32=False)
    unmasked = dataclasses.replace(masked, mask_input_channels=False, mask_output_channels=False)
    assert masked.uri != unmasked.uri  # the planner's masks reach the uri
    # the tile config and group packing are launch constexprs: one module serves every config
    relaunched = dataclasses.replace(base, config=KernelConfig(16, 16, 16, num_warps=8, num_stages=4),
                                     groups_per_program=2)
    assert relaunched.uri == base.uri and codegen.render(relaunched) == codegen.render(base)
    assert relaunched.meta == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_BLOCK": 2, "num_warps": 8,
                               "num_stages": 4}


def test_banded_dot_by_layout_and_vector_rows_only_where_rows_are_aligned():
    """NCHW takes a 2-D dot a channel (wgmma on sm_90), channels_last batches it over channels; vector row
    loads (and the band shifted to an aligned column) only for a launch whose row starts are aligned."""
    spec = ConvSpec(8, 8, 8, (7, 7), padding=(3, 3, 3, 3), dtype="bfloat16")
    by_rows = lower(plan(spec), "forward", interpret=False, allow_tf32=False)
    aligned = lower(plan(spec), "forward", interpret=False, allow_tf32=False, row_alignment=8)
    batched = lower(plan(dataclasses.replace(spec, layout="nhwc")), "forward", interpret=False, allow_tf32=False,
                    row_alignment=8)
    assert (by_rows.family, by_rows.band_dot, by_rows.row_alignment, by_rows.band_shift) == ("depthwise_gemm", "rows", 1, 0)
    assert (aligned.row_alignment, aligned.band_shift) == (8, 5)  # 3 columns of padding + 5 = one 16-byte vector
    assert aligned.uri != by_rows.uri and _source_body(aligned) != _source_body(by_rows)
    assert (batched.band_dot, batched.row_alignment, batched.weight_layout) == ("channels", 1, "strided")


def test_cli_plan_writes_both_graphs_as_dot(tmp_path):
    path = tmp_path / "x.dot"
    result = CliRunner().invoke(main, ["plan", "--in-channels", "11", "--out-channels", "13", "--groups", "3",
                                       "--padding", "1", "--channel-policy", "pad", "--no-source", "--graph",
                                       str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"pass graphs written to {path}" in result.output
    dot = path.read_text()
    assert dot.startswith("strict digraph") and dot.rstrip().endswith("}")
    nodes = dict(re.findall(r'^(\w+) \[label="([^"]*)"', dot, re.MULTILINE))
    edges = set(re.findall(r"^(\w+) -> (\w+);", dot, re.MULTILINE))
    logical = ["logical_input", "logical_pad_input_channels", "logical_conv", "logical_slice_output_channels",
               "logical_output"]
    lowered = ["lowered_input", "lowered_conv", "lowered_output"]
    assert set(logical + lowered) <= set(nodes), sorted(nodes)
    assert not {"lowered_pad_input_channels", "lowered_slice_output_channels"} & set(nodes)  # folded into masks
    assert set(zip(logical, logical[1:])) | set(zip(lowered, lowered[1:])) == edges
    pad = nodes["logical_pad_input_channels"]
    assert "PadInputChannels" in pad and "11 -> 12" in pad
    assert "mask_input_channels=True" in nodes["lowered_conv"] and "mask_output_channels=True" in nodes["lowered_conv"]


# ---------------------------------------------------------------------------------------------- index width
# Meta tensors: shapes and strides without storage. describe() only lowers; nothing is run.


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


# kind, spec (None: grad_bias), tensors as describe() takes them, the pixels the launch tiles, 64-bit?
INDEX_CASES = [
    P("forward", ConvSpec(256, 256, 256, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16", layout="nchw"),
      lambda: (_meta(1, 256, 4096, 4096), _meta(256, 1, 3, 3), _meta(1, 256, 4096, 4096)), PixelSpace(4096, 4096),
      True, id="input-of-2^32-elements"),                    # offsets past 2^31, flat pixels far below
    P("forward", ConvSpec(1, 1, 1, (1, 1), dtype="bfloat16", layout="nchw"),
      lambda: (_meta(128, 1, 4096, 4096), _meta(1, 1, 1, 1), _meta(128, 1, 4096, 4096)),
      PixelSpace(128 * 4096, 4096), True, id="batch-x-pixels-2^31"),  # offsets fit 2^31 - 1; the flat pixel index not
    P("forward", ConvSpec(1, 1, 1, (1, 1), dtype="bfloat16", layout="nchw"),
      lambda: (_meta(128, 1, 4096, 4096), _meta(1, 1, 1, 1), _meta(128, 1, 4096, 4096)),
      PixelSpace(1, 128 * 4096 * 4096 - 1), False, id="flat-pixels-just-fit"),  # the same tensors, one pixel short
    P("forward", ConvSpec(4, 4, 2, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16", layout="nchw"),
      lambda: (torch.empty_strided((1, 4, 8, 8), (4 * 2**30, 2**30, 8, 1), dtype=torch.bfloat16, device="meta"),
               _meta(4, 2, 3, 3), _meta(1, 4, 8, 8)), PixelSpace(8, 8), True,
      id="view-with-2^30-channel-stride"),             # 256 elements, offsets past 2^31
    P("grad_bias", None, lambda: (_meta(2, 8, 3 * 2**15, 2**15), _meta(8)), PixelSpace(2 * 3 * 2**15, 2**15), True,
      id="grad-bias-of-a-huge-output"),
    P("forward", ConvSpec(8, 8, 2, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16", layout="nchw"),
      lambda: (_meta(2, 8, 16, 16), _meta(8, 4, 3, 3), _meta(2, 8, 16, 16)), PixelSpace(2 * 16, 16), False,
      id="common-shape"),
]


@pytest.fixture
def meta_device(monkeypatch):
    """describe() asks the tensors' device for its target and TF32 setting: meta tensors stand for the
    interpreter's CPU tensors here."""
    monkeypatch.setattr(launch, "device_target", lambda device: "interpreter")
    monkeypatch.setattr(launch, "allows_tf32", lambda device: False)


@pytest.mark.parametrize("kind, conv_spec, tensors, pixels, wide", INDEX_CASES)
def test_index_width_follows_the_launch(kind, conv_spec, tensors, pixels, wide, meta_device):
    dtype = "bfloat16" if conv_spec is None else None
    desc = launch.describe(conv_spec, kind, tensors(), DEFAULT, pixels, dtype=dtype)
    assert desc.wide_index is wide and desc.interpret
    source = codegen.render(desc)
    program_ids = re.findall(r"tl\.program_id\(\d\)(?:\.to\(tl\.int64\))?", source)
    assert program_ids, "the kernel reads no program id"
    if wide:
        assert all(found.endswith(".to(tl.int64)") for found in program_ids), program_ids
    else:
        assert ".to(tl.int64)" not in source


def test_wide_index_threshold_is_int32():
    assert not needs_wide_index(INT32_MAX, INT32_MAX)
    assert needs_wide_index(INT32_MAX + 1, 0) and needs_wide_index(0, INT32_MAX + 1)
