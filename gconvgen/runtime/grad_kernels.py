"""Compiled backward kernels: their configs, the split of a reduction over pixels, and the launches
(check -> allocate -> launch).

Grad-input is one kernel per plan, like the forward. Grad-weight and grad-bias are reductions over batch
and space: each program sums its own range of pixels into its own slice of a partials buffer, and the
slices are added in a fixed order afterwards. Nothing is accumulated with atomics, so every run gives
the same bits, with or without ``torch.use_deterministic_algorithms(True)``.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import triton

from .. import codegen, knobs
from ..ir import ConvSpec, check
from ..plan import Plan
from . import cache
from .kernels import KernelConfig, device_target, groups_per_program, launch_meta, on_device, planned, pow2_between

# a reduction is split only while every split keeps at least this many blocks of pixels to sum
MIN_BLOCKS_PER_SPLIT = 4


def default_grad_config(kind: str, spec: ConvSpec, family: str, *, interpret: bool) -> KernelConfig:
    """A sound config for a backward kernel, chosen at once from the spec; tuning finds better ones.

    The fields keep their forward meaning where they can: block_m tiles pixels (grad-input, depthwise
    grad-weight, grad-bias) or output channels (igemm grad-weight), block_n channels or weight columns,
    block_k the reduction of an implicit GEMM. Under the interpreter blocks are large and grids small;
    tl.dot needs every tile side >= 16.
    """
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    stages = 1 if interpret else 3
    if kind == "grad_input" and family == "igemm":
        return KernelConfig(block_m=256 if interpret else 128,
                            block_n=pow2_between(spec.in_channels_per_group, 16, 128),
                            block_k=pow2_between(spec.out_channels_per_group * taps, 16, 64 if interpret else 32),
                            num_stages=stages)
    if kind == "grad_weight" and family == "igemm":
        return KernelConfig(block_m=pow2_between(spec.out_channels_per_group, 16, 64),
                            block_n=pow2_between(spec.in_channels_per_group * taps, 16, 64),
                            block_k=256 if interpret else 64, num_stages=stages)
    channels = spec.in_channels if kind == "grad_input" else spec.out_channels
    if interpret:
        return KernelConfig(block_m=256, block_n=pow2_between(channels, 1, 64), block_k=0, num_stages=1)
    if spec.layout == "nhwc":  # channels are contiguous: wide channel tiles
        return KernelConfig(block_m=32, block_n=pow2_between(channels, 8, 64), block_k=0)
    return KernelConfig(block_m=128, block_n=pow2_between(channels, 1, 8), block_k=0)


@functools.cache
def target_programs(device: torch.device) -> int:
    """Programs a split reduction aims for: a few waves of the GPU's SMs; one under the interpreter, where
    every program costs milliseconds."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def split_pixels(pixels: int, block_pixels: int, tiles: int, programs: int,
                 splits: int | None = None) -> tuple[int, int]:
    """(splits, pixels_per_split) for a reduction over ``pixels`` done by ``tiles`` programs per split.

    Without ``splits``: as many as fill ``programs`` programs, while each split keeps at least
    MIN_BLOCKS_PER_SPLIT blocks. pixels_per_split is a multiple of block_pixels, and no split is empty.
    """
    blocks = triton.cdiv(pixels, block_pixels)
    if splits is None:
        splits = min(triton.cdiv(programs, tiles), max(1, blocks // MIN_BLOCKS_PER_SPLIT))
    check(isinstance(splits, int) and splits >= 1, f"splits={splits!r} must be an int >= 1")
    pixels_per_split = triton.cdiv(blocks, min(splits, blocks)) * block_pixels
    return triton.cdiv(pixels, pixels_per_split), pixels_per_split


def _partials_for(out: torch.Tensor, splits: int) -> torch.Tensor:
    """Where the splits write: ``out`` itself for one split, else a [splits, *out.shape] buffer in the
    accumulator's precision (float64 for float64, else float32)."""
    if splits == 1:
        return out.unsqueeze(0)
    dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    return torch.empty((splits, *out.shape), dtype=dtype, device=out.device)


def _add_splits(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add the split slices into ``out`` in a fixed order (torch's sum over a dimension uses no atomics)."""
    if partials.shape[0] > 1:
        out.copy_(partials.sum(dim=0))
    return out


class _LoadedKernel:
    """One rendered, cached and imported Triton kernel."""

    def __init__(self, target: str, uri: str, render: Callable[[], str], config: KernelConfig):
        self.uri = uri
        self.interpret = target == "interpreter"
        self.kernel = getattr(cache.load_module(target, uri, render), "gconvgen_" + uri)
        self.config = config


class _PlannedGradKernel(_LoadedKernel):
    """The backward kernel ``kind`` of one plan, rendered from the plan's family of templates."""

    kind = ""

    def meta(self, config: KernelConfig) -> dict:
        """The launch keywords of ``config``: its BLOCK_* constexprs, num_warps and num_stages, plus igemm's
        GROUP_BLOCK (narrow groups packed into one program, as in the forward)."""
        return launch_meta(self.spec, self.family, config, self.kind)

    def __init__(self, conv_plan: Plan, target: str, *, allow_tf32: bool):
        interpret = target == "interpreter"
        self.spec, self.family = conv_plan.spec, conv_plan.backward_family
        super().__init__(target, codegen.kernel_uri(conv_plan, interpret=interpret, allow_tf32=allow_tf32, kind=self.kind),
                         lambda: codegen.render(conv_plan, interpret=interpret, allow_tf32=allow_tf32, kind=self.kind),
                         default_grad_config(self.kind, conv_plan.spec, self.family, interpret=interpret))


class GradInputKernel(_PlannedGradKernel):
    """The transposed grouped conv of one plan: grad_output and weight in, the input gradient out."""

    kind = "grad_input"

    def launch(self, grad_output: torch.Tensor, weight: torch.Tensor, grad_input: torch.Tensor,
               config: KernelConfig | None = None) -> torch.Tensor:
        """grad_output [N, C_out, OH, OW] and weight [C_out, ci, kh, kw] (any strides) into the preallocated
        grad_input [N, C_in, H, W]; every element of it is written. Returns ``grad_input``."""
        config = config or self.config
        batch, _, height, width = grad_input.shape
        pixels = batch * height * width
        if pixels == 0:
            return grad_input
        if self.family == "igemm":  # narrow groups are packed GROUP_BLOCK to a program, as in the forward
            packed = groups_per_program(self.spec, self.family, config, self.kind)
            grid = (triton.cdiv(pixels, config.block_m),
                    triton.cdiv(packed * self.spec.in_channels_per_group, config.block_n),
                    triton.cdiv(self.spec.groups, packed))
        else:
            grid = (triton.cdiv(pixels, config.block_m), triton.cdiv(self.spec.in_channels, config.block_n))
        with on_device(grad_output.device):
            self.kernel[grid](
                grad_output, weight, grad_input,
                batch, grad_output.shape[2], grad_output.shape[3], *grad_output.stride(),
                *weight.stride(),
                height, width, *grad_input.stride(),
                **self.meta(config),
            )
        return grad_input


class GradWeightKernel(_PlannedGradKernel):
    """The weight gradient of one plan: x and grad_output in, reduced over batch and space per group."""

    kind = "grad_weight"

    def launch(self, x: torch.Tensor, grad_output: torch.Tensor, grad_weight: torch.Tensor,
               config: KernelConfig | None = None, splits: int | None = None) -> torch.Tensor:
        """x [N, C_in, H, W] and grad_output [N, C_out, OH, OW] (any strides) into the preallocated
        grad_weight [C_out, ci, kh, kw]; every element of it is written. ``splits`` overrides how many pixel
        ranges the reduction is split into (default: enough to fill the device). Returns ``grad_weight``."""
        config = config or self.config
        batch, _, height, width = x.shape
        out_height, out_width = grad_output.shape[2], grad_output.shape[3]
        pixels = batch * out_height * out_width
        if pixels == 0:
            return grad_weight.zero_()
        spec = self.spec
        if self.family == "igemm":  # narrow groups are packed GROUP_BLOCK to a program
            packed = groups_per_program(spec, self.family, config, self.kind)
            columns = packed * spec.in_channels_per_group * spec.kernel_size[0] * spec.kernel_size[1]
            tile_grid = (triton.cdiv(packed * spec.out_channels_per_group, config.block_m)
                         * triton.cdiv(columns, config.block_n), triton.cdiv(spec.groups, packed))
            block_pixels = config.block_k
        else:
            tile_grid = (triton.cdiv(spec.out_channels, config.block_n), spec.kernel_size[0] * spec.kernel_size[1])
            block_pixels = config.block_m
        splits, pixels_per_split = split_pixels(pixels, block_pixels, tile_grid[0] * tile_grid[1],
                                                target_programs(x.device), splits)
        partials = _partials_for(grad_weight, splits)
        with on_device(grad_output.device):
            self.kernel[(*tile_grid, splits)](
                x, grad_output, partials,
                batch, height, width, *x.stride(),
                out_height, out_width, *grad_output.stride(),
                *partials.stride(), pixels_per_split,
                **self.meta(config),
            )
        return _add_splits(partials, grad_weight)


class GradBiasKernel(_LoadedKernel):
    """The bias gradient: grad_output summed over batch and space per channel, for one dtype."""

    def __init__(self, dtype: str, target: str):
        interpret = target == "interpreter"
        block_m = 256 if interpret else 64
        super().__init__(target, codegen.grad_bias_uri(dtype, interpret=interpret),
                         lambda: codegen.render_grad_bias(dtype, interpret=interpret),
                         KernelConfig(block_m=block_m, block_n=64 if interpret else 32, block_k=0,
                                      num_stages=1 if interpret else 2))

    def launch(self, grad_output: torch.Tensor, grad_bias: torch.Tensor, config: KernelConfig | None = None,
               splits: int | None = None) -> torch.Tensor:
        """grad_output [N, C_out, OH, OW] (any strides) into the preallocated grad_bias [C_out]; every element
        written. ``splits`` as for GradWeightKernel.launch. Returns ``grad_bias``."""
        config = config or self.config
        batch, channels, out_height, out_width = grad_output.shape
        pixels = batch * out_height * out_width
        if pixels == 0:
            return grad_bias.zero_()
        channel_tiles = triton.cdiv(channels, config.block_n)
        splits, pixels_per_split = split_pixels(pixels, config.block_m, channel_tiles,
                                                target_programs(grad_output.device), splits)
        partials = _partials_for(grad_bias, splits)
        with on_device(grad_output.device):
            self.kernel[(channel_tiles, splits)](
                grad_output, partials,
                batch, channels, out_height, out_width, *grad_output.stride(),
                *partials.stride(), pixels_per_split,
                **config.meta("depthwise"),  # like the depthwise kernels: pixel and channel blocks, no BLOCK_K
            )
        return _add_splits(partials, grad_bias)


@functools.lru_cache(maxsize=1024)
def grad_kernel(kind: str, spec: ConvSpec, target: str, allow_tf32: bool, padding_budget: float):
    """The in-process memo of backward kernels ('grad_input' or 'grad_weight') per spec and target."""
    kernel_class = {"grad_input": GradInputKernel, "grad_weight": GradWeightKernel}[kind]
    return kernel_class(planned(spec, padding_budget), target, allow_tf32=allow_tf32)


@functools.lru_cache(maxsize=64)
def grad_bias_kernel(dtype: str, target: str) -> GradBiasKernel:
    """The in-process memo of bias-gradient kernels: one per dtype and target."""
    return GradBiasKernel(dtype, target)


def grad_kernel_for(kind: str, spec: ConvSpec, device: torch.device):
    """The compiled backward kernel ``kind`` for ``spec`` on ``device`` (CPU means Triton's interpreter)."""
    check(kind in ("grad_input", "grad_weight"), f"kind={kind!r} must be 'grad_input' or 'grad_weight'")
    allow_tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return grad_kernel(kind, spec, device_target(device), allow_tf32, knobs.padding_budget())
