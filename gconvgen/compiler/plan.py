"""The planner: a flat pipeline of named passes over a networkx DAG.

The logical graph says what is computed (input -> [PadInputChannels] -> GroupedConv ->
[SliceOutputChannels] -> output); the lowered graph says what runs: the padding passes folded into the
conv kernel as channel masks, so no padded tensor is ever materialised.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import networkx as nx

from .. import knobs
from .families import backward_family, family, forward_families, grad_input_families, grad_weight_families
from ..ir import ConvSpec, check, fail
from ..memo import memoized

CONV = "conv"


def suggest_groups(in_channels: int, out_channels: int, near: int) -> list[int]:
    """Group counts that divide both channel counts, closest to ``near`` first (ties: the smaller first)."""
    check(in_channels >= 1 and out_channels >= 1, f"channel counts must be >= 1, got {in_channels}, {out_channels}")
    common = [g for g in range(1, min(in_channels, out_channels) + 1) if in_channels % g == 0 and out_channels % g == 0]
    return sorted(common, key=lambda g: (abs(g - near), g))


def _real_channels(total: int, per_group: int, group: int) -> int:
    """How many of group ``group``'s ``per_group`` padded channels exist in a tensor of ``total`` channels."""
    return max(0, min(total - group * per_group, per_group))


def padding_overhead(spec: ConvSpec) -> float:
    """Extra multiply-adds that channel padding costs, as a fraction of the useful ones (0.0 when divisible)."""
    in_per_group, out_per_group = spec.in_channels_per_group, spec.out_channels_per_group
    useful = sum(_real_channels(spec.in_channels, in_per_group, g) * _real_channels(spec.out_channels, out_per_group, g)
                 for g in range(spec.groups))
    return spec.groups * in_per_group * out_per_group / useful - 1.0 if useful else float("inf")


# ---------------------------------------------------------------------------------------------- the passes
# Each pass takes (graph, spec, budget) and edits the graph in place.


def check_divisibility(graph: nx.DiGraph, spec: ConvSpec, budget: float) -> None:
    """Strict: refuse channel counts the groups do not divide, saying which groups would and how to pad."""
    counts = (("in_channels", spec.in_channels), ("out_channels", spec.out_channels))
    uneven = [f"{name}={count}" for name, count in counts if count % spec.groups]
    if not uneven or spec.channel_policy == "pad":
        return
    near = ", ".join(map(str, suggest_groups(spec.in_channels, spec.out_channels, spec.groups)[:4]))
    in_per_group, out_per_group = spec.in_channels_per_group, spec.out_channels_per_group
    resize = []
    if spec.in_channels % spec.groups:
        resize.append(f"{spec.in_channels} -> {in_per_group * spec.groups} input channels")
    if spec.out_channels % spec.groups:
        resize.append(f"{spec.out_channels} -> {out_per_group * spec.groups} output channels")
    verb = "is" if len(uneven) == 1 else "are"
    fail(f"{' and '.join(uneven)} {verb} not divisible by groups={spec.groups}; groups that divide both "
         f"{spec.in_channels} and {spec.out_channels}: {near}; pass channel_policy='pad' to pad "
         f"{' and '.join(resize)} (+{padding_overhead(spec):.1%} work)")


def insert_channel_padding(graph: nx.DiGraph, spec: ConvSpec, budget: float) -> None:
    """Pad policy: surround the conv with PadInputChannels / SliceOutputChannels where channels are uneven."""
    in_per_group, out_per_group = spec.in_channels_per_group, spec.out_channels_per_group
    near = suggest_groups(spec.in_channels, spec.out_channels, spec.groups)[:4]
    for group in range(spec.groups):
        check(_real_channels(spec.in_channels, in_per_group, group) > 0,
              f"in_channels={spec.in_channels} with groups={spec.groups} pads each group to {in_per_group} "
              f"channels and leaves group {group} with no input channels; use groups <= "
              f"{-(-spec.in_channels // in_per_group)} or one of {near}")
        check(_real_channels(spec.out_channels, out_per_group, group) > 0,
              f"out_channels={spec.out_channels} with groups={spec.groups} gives each group {out_per_group} "
              f"outputs and leaves group {group} with none; use groups <= "
              f"{-(-spec.out_channels // out_per_group)} or one of {near}")
    if spec.in_channels % spec.groups:
        _insert_before(graph, CONV, "pad_input_channels", op="PadInputChannels",
                       channels=f"{spec.in_channels} -> {in_per_group * spec.groups}")
    if spec.out_channels % spec.groups:
        _insert_after(graph, CONV, "slice_output_channels", op="SliceOutputChannels",
                      channels=f"{out_per_group * spec.groups} -> {spec.out_channels}")


def check_padding_budget(graph: nx.DiGraph, spec: ConvSpec, budget: float) -> None:
    """Refuse plans whose padding wastes more work than the budget allows."""
    overhead = padding_overhead(spec)
    graph.nodes[CONV]["padding_overhead"] = overhead
    check(overhead <= budget,
          f"channel padding for in_channels={spec.in_channels}, out_channels={spec.out_channels}, "
          f"groups={spec.groups} costs +{overhead:.1%} work, over the padding budget of {budget:.0%}; use one of "
          f"groups={suggest_groups(spec.in_channels, spec.out_channels, spec.groups)[:4]}, or raise the budget "
          f"(plan(spec, padding_budget=...) or GCONVGEN_PADDING_BUDGET)")


def select_kernel_family(graph: nx.DiGraph, spec: ConvSpec, budget: float) -> None:
    """Choose the forward kernels worth timing and the one to run untuned; backward kernels follow the spec.

    Each family declares the convs it computes and its rank among those that do (compiler/families: Family.rank):
    wider than one input channel per group, an implicit GEMM on tensor cores (igemm); depthwise, a direct
    kernel of fp32 FMAs (depthwise), or a banded matrix product on tensor cores (depthwise_gemm, the default
    for wide half-precision windows), or for short windows along the width a kernel that reads each input
    row's window once (depthwise1d, the default for height-1 windows and NCHW 2-D windows unless the banded
    form is). The tuner times every family offered. The grad-input kernel is the backward family's (or a
    forward kernel of the transposed conv); the grad-weight kernel is any family's that declares one
    (Family.grad_weight_rank: the banded one on tensor cores first in half precision, the direct one else).
    """
    conv = graph.nodes[CONV]
    families = forward_families(spec)
    conv.update(family=families[0], families=families, backward_family=backward_family(spec),
                grad_input_families=grad_input_families(spec), grad_weight_families=grad_weight_families(spec))


def lower_padding_to_masks(graph: nx.DiGraph, spec: ConvSpec, budget: float) -> None:
    """Fold PadInputChannels / SliceOutputChannels into the conv as load / store masks: nothing is copied."""
    conv = graph.nodes[CONV]
    conv["mask_input_channels"] = graph.has_node("pad_input_channels")
    conv["mask_output_channels"] = graph.has_node("slice_output_channels")
    for node in ("pad_input_channels", "slice_output_channels"):
        if graph.has_node(node):
            _remove_passthrough(graph, node)


LOGICAL_PIPELINE: list[tuple[str, Callable]] = [
    ("check_divisibility", check_divisibility),          # strict policy refuses uneven channels here
    ("insert_channel_padding", insert_channel_padding),  # pad policy: make every group the same size
    ("check_padding_budget", check_padding_budget),      # padding may not waste more than the budget
    ("select_kernel_family", select_kernel_family),      # implicit GEMM; depthwise direct or banded GEMM
]
LOWERING_PIPELINE: list[tuple[str, Callable]] = [
    ("lower_padding_to_masks", lower_padding_to_masks),  # padding becomes masks, never a padded copy
]


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True, eq=False)
class Plan:
    """A planned conv: the spec, the logical and lowered pass graphs, and what the kernel must do."""

    spec: ConvSpec
    logical: nx.DiGraph
    lowered: nx.DiGraph

    @property
    def channel_masks(self) -> tuple[bool, bool]:
        """(mask input channels, mask output channels): the padding passes lowered to masks."""
        conv = self.lowered.nodes[CONV]
        return conv["mask_input_channels"], conv["mask_output_channels"]

    @property
    def family(self) -> str:
        """The forward kernel family this plan renders: 'igemm', 'depthwise', 'depthwise_gemm' or 'depthwise1d'."""
        return self.lowered.nodes[CONV]["family"]

    @property
    def families(self) -> tuple[str, ...]:
        """Every forward kernel family that computes this conv, the planner's default first: what the tuner times."""
        return self.lowered.nodes[CONV]["families"]

    @property
    def backward_family(self) -> str:
        """The family of the backward kernels: 'igemm' or 'depthwise'."""
        return self.lowered.nodes[CONV]["backward_family"]

    @property
    def grad_input_families(self) -> tuple[str, ...]:
        """Every family whose grad-input kernel computes this conv, the default first (the backward family's,
        or the banded one's at a stride): with grad_input_offers' transposed forwards, what the tuner times."""
        return self.lowered.nodes[CONV]["grad_input_families"]

    @property
    def grad_weight_families(self) -> tuple[str, ...]:
        """Every family whose grad-weight kernel computes this conv, the default first: what the tuner times."""
        return self.lowered.nodes[CONV]["grad_weight_families"]

    @property
    def padding_overhead(self) -> float:
        """Extra multiply-adds of channel padding, as a fraction of the useful ones."""
        return self.lowered.nodes[CONV]["padding_overhead"]

    def explain(self) -> str:
        """Both graphs in execution order, with each pass's attributes and the padding overhead."""
        lines = [f"spec: {self.spec}", f"padding overhead: +{self.padding_overhead:.1%} work", "logical graph:"]
        lines += _describe(self.logical)
        lines.append("lowered graph:")
        lines += _describe(self.lowered)
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Both pass graphs in Graphviz DOT (through networkx and pydot), as two clusters."""
        combined = nx.DiGraph(name="gconvgen_plan")
        for prefix, graph in (("logical", self.logical), ("lowered", self.lowered)):
            for node, attrs in graph.nodes(data=True):
                label = "\\n".join([f"{node}: {attrs['op']}"] + [f"{k}={v}" for k, v in attrs.items() if k != "op"])
                combined.add_node(f"{prefix}_{node}", label=f'"{label}"', shape="box")
            combined.add_edges_from((f"{prefix}_{a}", f"{prefix}_{b}") for a, b in graph.edges)
        return nx.nx_pydot.to_pydot(combined).to_string()


def plan(spec: ConvSpec, *, padding_budget: float | None = None, family: str | None = None) -> Plan:
    """Plan ``spec``: run the logical pipeline, then lower it. Raises ValueError for a conv it refuses.

    ``padding_budget`` is the extra work (a fraction, default 0.5 or GCONVGEN_PADDING_BUDGET) that channel
    padding may add before the plan is refused. ``family`` picks one of the forward kernel families the
    planner found (as a tuning result does) instead of its default; a family that cannot compute the conv
    raises ValueError.
    """
    check(isinstance(spec, ConvSpec), f"spec={spec!r} must be a gconvgen.ConvSpec", TypeError)
    budget = knobs.padding_budget() if padding_budget is None else padding_budget
    check(isinstance(budget, (int, float)) and budget >= 0,
          f"padding_budget={padding_budget!r} must be a number >= 0, e.g. 0.5 for 50% extra work")
    graph = nx.DiGraph()
    nx.add_path(graph, ["input", CONV, "output"])
    graph.nodes["input"]["op"] = "Input"
    graph.nodes[CONV].update(op="GroupedConv2d", groups=spec.groups)
    graph.nodes["output"]["op"] = "Output"
    _run(LOGICAL_PIPELINE, graph, spec, budget)
    if family is not None:
        families = graph.nodes[CONV]["families"]
        check(family in families, f"family={family!r} cannot compute {spec}; use one of {families}")
        graph.nodes[CONV]["family"] = family
    lowered = graph.copy()
    _run(LOWERING_PIPELINE, lowered, spec, budget)
    return Plan(spec=spec, logical=graph, lowered=lowered)


@memoized(1024)
def planned(spec: ConvSpec, padding_budget: float, family: str | None = None) -> Plan:
    """``plan`` memoised per spec (and forward family; None is the planner's default): the API checks every
    call against it, so it must cost nothing warm."""
    return plan(spec, padding_budget=padding_budget, family=family)


@memoized(1024)
def transposed_conv(spec: ConvSpec) -> ConvSpec | None:
    """The forward conv whose output is ``spec``'s input gradient, where one exists; else None.

    At stride 1, the input gradient of a grouped conv whose groups divide its channels is the grouped conv of
    the output gradient with each group's weight transposed (its input and output channels swapped) and its
    window flipped (runtime/weights.py ``transposed``), each side's padding replaced by the window's reach
    minus it (padding past the reach would crop, not pad: no such conv). A depthwise conv with one output
    per channel is its own transpose; with a channel multiplier the transpose would be a grouped conv of one
    output a group, which the depthwise grad-input kernel serves better, so it has none here."""
    divides = spec.in_channels % spec.groups == 0 and spec.out_channels % spec.groups == 0
    multiplier = spec.is_depthwise and spec.out_channels != spec.in_channels
    if spec.stride != (1, 1) or not divides or multiplier:
        return None
    reach_h, reach_w = ((k - 1) * d for k, d in zip(spec.kernel_size, spec.dilation))
    top, bottom, left, right = spec.padding
    padding = (reach_h - top, reach_h - bottom, reach_w - left, reach_w - right)
    return None if min(padding) < 0 else dataclasses.replace(spec, in_channels=spec.out_channels,
                                                             out_channels=spec.in_channels, padding=padding,
                                                             bias=False)


@memoized(1024)
def grad_input_as_forward(spec: ConvSpec, padding_budget: float) -> ConvSpec | None:
    """The transposed conv (``transposed_conv``) where, untuned, its forward kernel serves ``spec``'s input
    gradient better than the direct grad-input kernel; else None. Worth it where that forward's default
    family is not the direct kernel, which is what the grad-input kernel is: NCHW short windows
    (depthwise1d: rows read once as vectors), half-precision wide windows (the banded kernel) and taller
    windows of narrow groups (igemm_rows: each input row read once for every kernel row); and where
    the direct family's forward beats its own grad-input kernel (Family.forward_serves_input_gradient: the
    channels_last row tiles)."""
    transposed = transposed_conv(spec)
    if transposed is None:
        return None
    transposed_plan = planned(transposed, padding_budget)
    serves = (transposed_plan.family != transposed_plan.backward_family
              or family(transposed_plan.family).forward_serves_input_gradient(transposed))
    return transposed if serves else None


@memoized(1024)
def grad_input_offers(spec: ConvSpec, padding_budget: float) -> tuple[tuple[str, bool], ...]:
    """(family, transposed) of every kernel that computes the input gradient of ``spec`` (a bias-free
    backward spec), the one an untuned call runs first: the direct grad-input kernel of the plan's backward
    family, and where the conv is its own transpose (``transposed_conv``), the forward kernel of each
    family the transposed conv's plan offers. What the tuner times and a tuning record may name."""
    direct = tuple((family, False) for family in planned(spec, padding_budget).grad_input_families)
    transposed = transposed_conv(spec)
    if transposed is None:
        return direct
    forwards = tuple((family, True) for family in planned(transposed, padding_budget).families)
    return forwards + direct if grad_input_as_forward(spec, padding_budget) is not None else direct + forwards


def _run(pipeline: list[tuple[str, Callable]], graph: nx.DiGraph, spec: ConvSpec, budget: float) -> None:
    for name, run_pass in pipeline:
        run_pass(graph, spec, budget)
        if knobs.debug_plan():
            _verify(graph, after=name)


def _verify(graph: nx.DiGraph, after: str) -> None:
    """The graph stays one path from input to output through the conv."""
    problem = None
    if not nx.is_directed_acyclic_graph(graph):
        problem = "has a cycle"
    elif not (graph.has_node("input") and graph.has_node(CONV) and graph.has_node("output")):
        problem = "lost its input, conv or output node"
    elif list(nx.topological_sort(graph)) != nx.shortest_path(graph, "input", "output"):
        problem = "is not a single path from input to output"
    if problem:
        raise RuntimeError(f"gconvgen planner bug: the pass graph {problem} after pass {after!r}")


def _insert_before(graph: nx.DiGraph, node: str, new: str, **attrs: object) -> None:
    (pred,) = graph.predecessors(node)
    graph.remove_edge(pred, node)
    graph.add_node(new, **attrs)
    nx.add_path(graph, [pred, new, node])


def _insert_after(graph: nx.DiGraph, node: str, new: str, **attrs: object) -> None:
    (succ,) = graph.successors(node)
    graph.remove_edge(node, succ)
    graph.add_node(new, **attrs)
    nx.add_path(graph, [node, new, succ])


def _remove_passthrough(graph: nx.DiGraph, node: str) -> None:
    (pred,), (succ,) = graph.predecessors(node), graph.successors(node)
    graph.remove_node(node)
    graph.add_edge(pred, succ)


def _describe(graph: nx.DiGraph) -> list[str]:
    lines = []
    for node in nx.topological_sort(graph):
        attrs = {k: v for k, v in graph.nodes[node].items() if k != "op"}
        shown = ", ".join(f"{k}={v:.1%}" if k == "padding_overhead" else f"{k}={v}" for k, v in attrs.items())
        lines.append(f"  {node:<22} {graph.nodes[node]['op']:<20} {shown}")
    return lines
