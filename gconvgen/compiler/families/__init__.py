"""The kernel families: one module each holds everything about a family, and this registry is the only place
that names them. A family declares its templates per kernel kind, the convs it computes (its domain: the
planner offers it, the tuner times it and the fuzz forces it there), its tile limits and default tiles, its
grid, the layout decisions the lowering asks it for, and the figures ``gconvgen inspect`` models.

Adding a family is one module (a ``Family`` subclass), its templates, and a line in ``FAMILIES`` below.
The functions here dispatch to the family by name for the rooms that hold a name (a tuning record, a
KernelDesc): no other module compares family names.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from ...ir import ConvSpec, check
from ..tiles import DEFAULT_WAVES, H200_SMS, MAX_STAGES, NUM_WARPS, KernelConfig, PixelSpace
from .base import Family
from .depthwise import Depthwise
from .depthwise1d import Depthwise1d
from .depthwise_dense import DepthwiseDense
from .depthwise_gemm import DepthwiseGemm
from .igemm import Igemm
from .igemm_rows import IgemmRows
from .reduce import Reduce

# registry order breaks ties between families the planner ranks alike
FAMILIES: dict[str, Family] = {family.name: family for family in (
    Igemm(), IgemmRows(), Depthwise(), DepthwiseGemm(), Depthwise1d(), DepthwiseDense(), Reduce())}


def family(name: str) -> Family:
    """The family called ``name``; ValueError naming the families for any other name."""
    check(name in FAMILIES, f"family={name!r} is not a kernel family; use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_space(space: str) -> Family:
    """The family a search space tunes: tuning/spaces/<family>.json (forward) or <kind>_<family>.json."""
    for name in sorted(FAMILIES, key=len, reverse=True):
        if space == name or space.endswith("_" + name):
            return FAMILIES[name]
    return family(space)  # raises, naming the families


def forward_families(spec: ConvSpec) -> tuple[str, ...]:
    """The families whose forward kernel computes ``spec``, the planner's default first (Family.rank)."""
    ranked = [(rank, index, name) for index, (name, candidate) in enumerate(FAMILIES.items())
              if (rank := candidate.rank(spec)) is not None]
    return tuple(name for _, _, name in sorted(ranked))


def grad_input_families(spec: ConvSpec) -> tuple[str, ...]:
    """The families whose grad-input kernel computes ``spec``, the default first (Family.grad_input_rank)."""
    ranked = [(rank, index, name) for index, (name, candidate) in enumerate(FAMILIES.items())
              if (rank := candidate.grad_input_rank(spec)) is not None and "grad_input" in candidate.templates]
    return tuple(name for _, _, name in sorted(ranked))


def grad_weight_families(spec: ConvSpec) -> tuple[str, ...]:
    """The families whose grad-weight kernel computes ``spec``, the default first (Family.grad_weight_rank)."""
    ranked = [(rank, index, name) for index, (name, candidate) in enumerate(FAMILIES.items())
              if (rank := candidate.grad_weight_rank(spec)) is not None and "grad_weight" in candidate.templates]
    return tuple(name for _, _, name in sorted(ranked))


def suiting_first(names: tuple[str, ...], spec: ConvSpec, kind: str, pixels: PixelSpace) -> tuple[str, ...]:
    """``names`` in their order, those whose family claims a launch of kernel ``kind`` over ``pixels`` first
    (Family.claims), then those it suits (Family.suits): the first is the one an untuned launch takes."""
    def order(name: str) -> tuple[bool, bool]:
        owner = family(name)
        return not owner.claims(spec, kind, pixels), not owner.suits(spec, kind, pixels)
    return tuple(sorted(names, key=order))


def backward_family(spec: ConvSpec) -> str:
    """The family whose gradient kernels compute ``spec``'s input and weight gradients."""
    return next(name for name, candidate in FAMILIES.items() if candidate.computes_backward(spec))


def check_config(config: KernelConfig, family_name: str) -> None:
    """Raise ValueError unless ``config`` is legal for the family: every tile side a power of two within the
    family's limits (block_k 0 where the family has no reduction tile), num_warps one of NUM_WARPS and
    1 <= num_stages <= MAX_STAGES. A tuning record is checked with this before it is used."""
    check(isinstance(config, KernelConfig), f"config={config!r} must be a KernelConfig", TypeError)
    limits = family(family_name).limits
    for name, (low, high) in limits.items():
        value = getattr(config, name)
        power_of_two = value > 0 and value & (value - 1) == 0
        check(low <= value <= high and (power_of_two or value == low == 0),
              f"{name}={value} is not legal for the {family_name} family; use a power of two in [{low}, {high}]"
              if high else f"{name}={value} is not legal for the {family_name} family; it has no such tile, use 0")
    check(config.num_warps in NUM_WARPS, f"num_warps={config.num_warps} must be one of {NUM_WARPS}")
    check(1 <= config.num_stages <= MAX_STAGES, f"num_stages={config.num_stages} must be in [1, {MAX_STAGES}]")


def kernel_spec(spec: ConvSpec, family_name: str, kind: str) -> ConvSpec:
    """The conv that family ``family_name``'s kernel ``kind`` computes for ``spec``: spec itself, or where the family
    stages the activation and computes the channels_last conv of the copy (Family.computes_staged_as_channels_last),
    spec in channels_last (its output written through the launch's strides)."""
    owner = family(family_name)
    if owner.stages_channels_last(spec, kind) and owner.computes_staged_as_channels_last():
        return replace(spec, layout="nhwc")
    return spec


def default_config(spec: Optional[ConvSpec], family_name: str, kind: str, *, interpret: bool,
                   pixels: Optional[PixelSpace] = None) -> KernelConfig:
    """A sound config chosen at once from the spec (the family's ``default_config``) and, when given, the
    launch's ``pixels``; tuning finds better ones. Under the interpreter each program costs milliseconds, so
    blocks are large and grids small. On a GPU, a forward or grad-input tile chosen from the spec shrinks
    until its grid over ``pixels`` fills the device (filled); the reductions (grad-weight, grad-bias) split
    their pixels to fill it instead (runtime/launch.py split_pixels)."""
    owner = family(family_name)
    config = owner.default_config(spec, kind, interpret=interpret)
    if interpret or pixels is None:
        return config
    config = owner.fitted(config, spec, kind, pixels)
    if kind not in ("forward", "grad_input"):
        return config
    return filled(config, spec, family_name, kind, pixels)


def filled(config: KernelConfig, spec: ConvSpec, family_name: str, kind: str, pixels: PixelSpace) -> KernelConfig:
    """``config`` with its pixel tile (block_m: pixels, positions, or the banded family's rows) halved, then
    its channel tile (block_n), while its grid over ``pixels`` has fewer than DEFAULT_WAVES x H200_SMS
    programs and the halved tile keeps the family's floor (Family.keeps_floor); where even the floor has
    fewer, the floor. The family refits a halved tile (Family.refit): packed igemm groups pack fewer, so the
    grid grows either way."""
    owner = family(family_name)
    wanted = DEFAULT_WAVES * H200_SMS
    for side in ("block_m", "block_n"):
        while programs_of(config, spec, family_name, kind, pixels) < wanted:
            smaller = owner.refit(replace(config, **{side: getattr(config, side) // 2}), spec, kind)
            if not keeps_floor(smaller, spec, family_name):
                break
            config = smaller
    return config


def keeps_floor(config: KernelConfig, spec: ConvSpec, family_name: str) -> bool:
    """Whether a shrunk default tile is still sane: within the family's limits and its own floor."""
    owner = family(family_name)
    within = all(getattr(config, side) >= low for side, (low, _) in owner.limits.items())
    return within and owner.keeps_floor(config, spec)


def groups_per_program(spec: ConvSpec, family_name: str, config: KernelConfig, kind: str) -> int:
    """How many consecutive groups one program computes (packed narrow igemm groups; 1 elsewhere)."""
    return family(family_name).groups_per_program(spec, config, kind)


def grid_of(kind: str, family_name: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int,
            pixels: PixelSpace, *, splits: int = 1, channels: int = 0) -> tuple[int, ...]:
    """The launch grid of a kernel tiling ``pixels`` with ``config`` and ``packed`` groups a program
    (``splits`` pixel ranges for the reductions, grad_weight and grad_bias; grad_bias, which has no spec,
    reduces ``channels`` channels)."""
    return family(family_name).grid(kind, spec, config, packed, pixels, splits=splits, channels=channels)


def programs_of(config: KernelConfig, spec: ConvSpec, family_name: str, kind: str, pixels: PixelSpace) -> int:
    """The programs of ``config``'s grid over ``pixels`` (grid_of, with the groups it packs)."""
    return math.prod(grid_of(kind, family_name, spec, config, groups_per_program(spec, family_name, config, kind),
                             pixels))


TEMPLATES = {(kind, name): template for name, owner in FAMILIES.items() for kind, template in owner.templates.items()}
GRAD_BIAS_FAMILY = next(name for kind, name in TEMPLATES if kind == "grad_bias")  # the bias gradient's reduction
