"""Search spaces: which configs are worth timing for one problem.

The values live in ``tuning/spaces/<family>.json`` (data, not code): tile sizes and launch settings per
target ('gpu' or 'interpreter') and a list of named pruning rules with their parameters. This module turns
a space and a problem into candidate KernelConfigs: stage one is every tile with the space's first launch
setting, stage two the fastest tiles with every launch setting; both go through the same rules.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import triton

from .. import knobs
from ..compiler.families import family_of_space, kernel_spec
from ..ir import ConvSpec, check
from ..compiler.lowering import KERNEL, Choice, KernelConfig, PixelSpace, lowered, packed_channels
from ..memo import memoized
from ..resources import data_dir
from ..runtime.device import device_target

KINDS = ("forward", "grad_input", "grad_weight")  # the kernels that are tuned (grad_bias is a plain reduction)

SPACE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """One layer at one input size, and which of its kernels: what a tuning result is for. ``spec`` fixes
    the kernel, the batch and the (forward input's) spatial size fix the grid and the timings. A backward
    kernel's spec has no bias (the bias gradient has a kernel of its own): make one with ``backward``."""

    spec: ConvSpec
    batch: int
    height: int
    width: int
    kind: str = "forward"  # or the backward kernel: 'grad_input', 'grad_weight'

    def __post_init__(self) -> None:
        check(self.kind in KINDS, f"kind={self.kind!r} is not a kernel kind; use one of {KINDS}")
        check(self.kind == "forward" or not self.spec.bias,
              f"a {self.kind} problem's spec has bias=False (the bias gradient has a kernel of its own); "
              f"use Problem.backward({self.kind!r})")
        for name in ("batch", "height", "width"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name}={value!r} must be an int >= 1", ValueError)
        out_height, out_width = self.output_size
        check(out_height >= 1 and out_width >= 1,
              f"a {self.height}x{self.width} input is smaller than the {self.spec.kernel_size} kernel with padding "
              f"{self.spec.padding}; use a larger height/width")

    def backward(self, kind: str) -> "Problem":
        """The same layer's backward kernel ``kind`` ('grad_input' or 'grad_weight') as the backward ops run
        it: without bias, and reading activations in the layout they arrive in. grad_input reads the output
        gradient, which the op makes dense (channels_last for nhwc, else NCHW); grad_weight reads x as it is."""
        check(kind in ("grad_input", "grad_weight"), f"kind={kind!r} must be 'grad_input' or 'grad_weight'")
        layout = self.spec.layout
        if kind == "grad_input" and layout != "nhwc":
            layout = "nchw"
        return Problem(replace(self.spec, bias=False, layout=layout), self.batch, self.height, self.width, kind)

    @property
    def output_size(self) -> tuple[int, int]:
        """(out_height, out_width)."""
        return self.spec.output_size(self.height, self.width)

    @property
    def pixel_space(self) -> PixelSpace:
        """The pixels this problem's kernel tiles (PixelSpace.of its kind)."""
        return PixelSpace.of(self.kind, self.batch, self.height, self.width, *self.output_size)

    @property
    def output_pixels(self) -> int:
        """batch * out_height * out_width: the M side of every kernel's grid."""
        out_height, out_width = self.output_size
        return self.batch * out_height * out_width

    def describe(self) -> str:
        """A short readable description, e.g. 'N=64 128->128 @56x56 g32 k3x3 s1 bfloat16 nhwc'
        ('grad_weight N=64 ...' for a backward kernel)."""
        spec = self.spec
        kind = "" if self.kind == "forward" else f"{self.kind} "
        return (f"{kind}N={self.batch} {spec.in_channels}->{spec.out_channels} @{self.height}x{self.width} g{spec.groups} "
                f"k{spec.kernel_size[0]}x{spec.kernel_size[1]} s{spec.stride[0]} {spec.dtype} {spec.layout}")


@dataclass(frozen=True)
class DeviceFacts:
    """What pruning needs to know about the device: multiprocessor count, shared memory per block, L2.
    Zero means unknown (the interpreter); rules then use the space's default."""

    target: str
    multiprocessors: int = 0
    shared_memory_bytes: int = 0
    l2_bytes: int = 0

    @property
    def kind(self) -> str:
        """The space target: 'interpreter' or 'gpu'."""
        return "interpreter" if self.target == "interpreter" else "gpu"


def device_facts(device: torch.device) -> DeviceFacts:
    """The facts of ``device`` (CPU means Triton's interpreter)."""
    device = torch.device(device)
    if device.type == "cpu":
        return DeviceFacts("interpreter")
    props = torch.cuda.get_device_properties(device)
    return DeviceFacts(device_target(device), props.multi_processor_count,
                       getattr(props, "shared_memory_per_block_optin", 0), getattr(props, "L2_cache_size", 0))


def config_name(config: KernelConfig, family: str | None) -> str:
    """A short readable name, e.g. 'igemm m128 n16 k32 w4 s3' (no family: 'm128 n16 k32 w4 s3')."""
    name = f"m{config.block_m} n{config.block_n} k{config.block_k} w{config.num_warps} s{config.num_stages}"
    return name if family is None else f"{family} {name}"


# ---------------------------------------------------------------------------------------------- pruning rules
# Each rule takes (configs, problem, facts, family, params) and returns the configs it keeps.

Rule = Callable[[list[KernelConfig], Problem, DeviceFacts, str, dict], list[KernelConfig]]

# The sizes a tile side can be held to (the `extent` of a tile_within rule), read off a problem.
EXTENTS: dict[str, Callable[[Problem], int]] = {
    "in_channels": lambda p: p.spec.in_channels,
    "out_channels": lambda p: p.spec.out_channels,
    "in_channels_per_group": lambda p: p.spec.in_channels_per_group,
    "out_channels_per_group": lambda p: p.spec.out_channels_per_group,
    "input_pixels": lambda p: p.batch * p.height * p.width,
    "output_pixels": lambda p: p.output_pixels,
    "output_width": lambda p: p.output_size[1],
    # the banded kernel's tile rows: strips of 16 output columns (its narrowest) of every output row
    "output_strips": lambda p: p.batch * p.output_size[0] * -(-p.output_size[1] // 16),
    # ... and of its strided grad-input: strips of 16 input columns of every group of stride_h input rows
    "input_width": lambda p: p.width,
    # the dense depthwise kernel's tile sides: samples, one image's output pixels, one image's input pixels
    "batch": lambda p: p.batch,
    "output_map": lambda p: p.output_size[0] * p.output_size[1],
    "input_map": lambda p: p.height * p.width,
    "input_strips": lambda p: p.batch * -(-p.height // p.spec.stride[0]) * -(-p.width // 16),
    # in_channels_per_group x taps: the forward's reduction, and the columns of a grad-weight tile
    "weight_columns": lambda p: p.spec.in_channels_per_group * p.spec.kernel_size[0] * p.spec.kernel_size[1],
    # out_channels_per_group x taps: the reduction of grad-input
    "transposed_reduction": lambda p: p.spec.out_channels_per_group * p.spec.kernel_size[0] * p.spec.kernel_size[1],
}


def _within(configs: list[KernelConfig], axis: str, extent: int, minimum: int) -> list[KernelConfig]:
    """Configs whose ``axis`` tile covers ``extent`` (rounded up to a power of two, at least ``minimum``)
    without a wasted power of two; when every tile is larger, the smallest one stays."""
    limit = max(minimum, triton.next_power_of_2(extent), min((getattr(c, axis) for c in configs), default=0))
    return [c for c in configs if getattr(c, axis) <= limit]


def tile_within(configs, problem, facts, family, params):
    """Drop ``axis`` tiles longer than the problem's ``extent`` (one of EXTENTS) needs."""
    return _within(configs, params["axis"], EXTENTS[params["extent"]](problem), params.get("min", 1))


def _kernel_spec(problem, space: str) -> ConvSpec:
    """The conv the kernel of search space ``space`` computes for the problem (families.kernel_spec)."""
    return kernel_spec(problem.spec, family_of_space(space).name, problem.kind)


def tile_elements(configs, problem, facts, family, params):
    """Keep tiles of min <= outputs <= max: BLOCK_M * BLOCK_N, times BLOCK_K columns for depthwise_gemm, times
    the padded taps for depthwise grad-weight (its step gathers a [BLOCK_M, taps, BLOCK_N] window), times the
    channels a program takes for depthwise_dense (Family.tile_depth)."""
    low, high = params.get("min", 0), params.get("max", float("inf"))
    owner, spec = family_of_space(family), _kernel_spec(problem, family)
    return [c for c in configs if low <= c.block_m * c.block_n * owner.tile_depth(c, spec, problem.kind) <= high]


def tile_fits_layout(configs, problem, facts, family, params):
    """channels_last: channel tiles of at least nhwc_min_block_n; NCHW: pixel tiles of at least nchw_min_block_m
    (the layout of the conv the kernel computes: a staged one's is channels_last)."""
    spec = _kernel_spec(problem, family)
    if spec.layout == "nhwc":
        least = min(params["nhwc_min_block_n"], triton.next_power_of_2(spec.out_channels))
        return [c for c in configs if c.block_n >= least]
    if spec.layout == "nchw":
        return [c for c in configs if c.block_m >= params["nchw_min_block_m"]]
    return configs


def group_packing(configs, problem, facts, family, params):
    """Drop igemm tiles that pack more than max_groups narrow groups into one program (each packed group
    multiplies the block-diagonal tile's wasted products), unless tl.dot's 16 channels need more."""
    spec = problem.spec
    most = max(params["max_groups"], 16 // packed_channels(spec, problem.kind))
    return [c for c in configs if family_of_space(family).groups_per_program(spec, c, problem.kind) <= most]


def shared_memory_fits(configs, problem, facts, family, params):
    """Drop configs whose pipelined operand tiles exceed the device's shared memory (else default_bytes):
    num_stages x (BLOCK_M x BLOCK_K + BLOCK_K x BLOCK_N) elements for an implicit GEMM, num_stages x
    the channels in flight x (BLOCK_M x BLOCK_K + BLOCK_K x BLOCK_K) for depthwise_gemm's input tile and band
    (tiles.band_operand_bytes)."""
    limit = facts.shared_memory_bytes or params["default_bytes"]
    owner, spec = family_of_space(family), _kernel_spec(problem, family)
    return [c for c in configs if owner.operand_bytes(c, spec) <= limit]


def accumulators_fit(configs, problem, facts, family, params):
    """Drop configs whose accumulators need more than max_registers registers a thread
    (Family.accumulator_registers: the banded grad-weight's one kernel row at the least, which no pass
    can split further)."""
    owner, spec = family_of_space(family), _kernel_spec(problem, family)
    return [c for c in configs
            if owner.accumulator_registers(c, spec, problem.kind) <= params["max_registers"] * 32 * c.num_warps]


def channels_per_warp(configs, problem, facts, family, params):
    """Keep tiles whose channel tile gives every warp at least ``min`` channels (block_n >= min x num_warps)."""
    return [c for c in configs if c.block_n >= params["min"] * c.num_warps]


def fills_the_gpu(configs, problem, facts, family, params):
    """Keep grids of at least waves x multiprocessors programs; when none is, the grids with the most."""
    def programs(config: KernelConfig) -> int:
        desc = lowered(problem.spec, problem.kind, problem.spec.dtype, Choice(KERNEL, config, family), False, False,
                       False, problem.pixel_space, knobs.padding_budget())
        return math.prod(desc.grid(problem.pixel_space))

    wanted = (facts.multiprocessors or params["default_multiprocessors"]) * params.get("waves", 1)
    full = [c for c in configs if programs(c) >= wanted]
    if full or not configs:
        return full
    most = max(programs(c) for c in configs)
    return [c for c in configs if programs(c) == most]


def lowers(configs, problem, facts, family, params):
    """Keep the configs the family's lowering takes for the problem (it raises ValueError for the others, e.g. the
    dense grad-weight's tiles that would hold too much or are neither square of 8 nor 16 a side)."""
    def takes(config: KernelConfig) -> bool:
        try:
            lowered(problem.spec, problem.kind, problem.spec.dtype,
                    Choice(KERNEL, config, family_of_space(family).name), False, False, False, problem.pixel_space,
                    knobs.padding_budget())
        except ValueError:
            return False
        return True

    return [c for c in configs if takes(c)]


RULES: dict[str, Rule] = {rule.__name__: rule for rule in (
    tile_within, group_packing, tile_elements, tile_fits_layout, shared_memory_fits, fills_the_gpu, channels_per_warp,
    accumulators_fit, lowers,
)}


# ---------------------------------------------------------------------------------------------- spaces


@dataclass(frozen=True)
class SearchSpace:
    """One family's space on one target kind, as read from tuning/spaces/<family>.json."""

    family: str
    kind: str
    tiles: tuple[tuple[str, tuple[int, ...]], ...]
    launch: tuple[tuple[str, tuple[int, ...]], ...]
    first_launch: tuple[tuple[str, int], ...]
    finalists: int
    rules: tuple[tuple[str, tuple[tuple[str, object], ...]], ...]

    def prune(self, configs: list[KernelConfig], problem: Problem, facts: DeviceFacts) -> list[KernelConfig]:
        """The configs every rule of this space keeps, in their original order, without repeats.
        A rule that would leave no config at all is skipped for this problem (a tiny layer breaks most)."""
        kept = list(dict.fromkeys(configs))
        for name, params in self.rules:
            kept = RULES[name](kept, problem, facts, self.family, dict(params)) or kept
        return kept

    def stage_one(self, problem: Problem, facts: DeviceFacts) -> list[KernelConfig]:
        """Every tile with the first launch setting, pruned."""
        names = [name for name, _ in self.tiles]
        configs = [KernelConfig(**dict(zip(names, values)), **dict(self.first_launch))
                   for values in itertools.product(*(values for _, values in self.tiles))]
        return self.prune(configs, problem, facts)

    def stage_two(self, finalists: list[KernelConfig], problem: Problem, facts: DeviceFacts) -> list[KernelConfig]:
        """Every launch setting for each finalist tile, pruned (shared memory depends on num_stages)."""
        names = [name for name, _ in self.launch]
        configs = [KernelConfig(config.block_m, config.block_n, config.block_k, **dict(zip(names, values)))
                   for config in finalists
                   for values in itertools.product(*(values for _, values in self.launch))]
        return self.prune(configs, problem, facts)


def _frozen_axes(axes: dict, where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    for name, values in axes.items():
        check(name in KernelConfig.__dataclass_fields__ and isinstance(values, list) and values
              and all(isinstance(v, int) for v in values),
              f"{where}: axis {name!r}={values!r} must name a KernelConfig field and list ints")
    return tuple((name, tuple(values)) for name, values in axes.items())


@memoized()
def load_space(family: str, kind: str) -> SearchSpace:
    """The search space of ``family`` ('igemm', 'depthwise' or 'depthwise_gemm') for ``kind`` ('gpu' or 'interpreter').

    Raises FileNotFoundError when the file is missing, ValueError when it is malformed (naming the field).
    """
    path = data_dir("tuning") / "spaces" / f"{family}.json"
    check(path.is_file(), f"no search space for kernel family {family!r}: {path} is missing", FileNotFoundError)
    data = json.loads(path.read_text())
    check(data.get("schema_version") == SPACE_SCHEMA_VERSION,
          f"{path}: schema_version={data.get('schema_version')!r}, this gconvgen reads {SPACE_SCHEMA_VERSION}")
    check(kind in data.get("targets", {}), f"{path}: no targets.{kind} section; add one")
    target = data["targets"][kind]
    rules = []
    for rule in data.get("pruning", []):
        check(rule.get("rule") in RULES, f"{path}: unknown pruning rule {rule.get('rule')!r}; known: {sorted(RULES)}")
        check(rule["rule"] != "tile_within" or (rule.get("extent") in EXTENTS
                                                and rule.get("axis") in ("block_m", "block_n", "block_k")),
              f"{path}: tile_within needs axis (block_m, block_n or block_k) and extent (one of {sorted(EXTENTS)}); "
              f"got {rule}")
        if kind in rule.get("targets", ("gpu", "interpreter")):
            params = tuple((k, v) for k, v in rule.items() if k not in ("rule", "targets", "why"))
            rules.append((rule["rule"], params))
    return SearchSpace(
        family=family, kind=kind,
        tiles=_frozen_axes(target["tiles"], f"{path} targets.{kind}.tiles"),
        launch=_frozen_axes(target["launch"], f"{path} targets.{kind}.launch"),
        first_launch=tuple(target["first_launch"].items()),
        finalists=int(target["finalists"]),
        rules=tuple(rules),
    )
