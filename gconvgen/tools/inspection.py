"""``gconvgen inspect``: what the sm_90 compiler emits for the kernels the runtime would launch, on a CPU.

For one problem (a layer at an input size, one kernel kind) it lowers the kernel exactly as a launch would
(the tuning record's choice or the default, the launch's own argument values, from meta tensors), compiles
it for sm_90 with Triton's run-time specialisation (tools/sass.py), and reports the compiler's figures
beside two figures of the tiling: global bytes the programs request over the layer's ideal bytes, and
tensor-core FLOPs issued over useful FLOPs. Static figures are not timings.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .. import knobs
from ..autotune.database import database, key_of
from ..autotune.space import Problem, config_name
from ..ir import check
from ..compiler.lowering import DEFAULT, ELEMENT_BYTES, H200_SMS, KernelDesc, family
from ..runtime import launch
from . import sass
from ..runtime.device import TORCH_DTYPES

INSPECT_TARGET = "cuda sm_90 inspect"
DEFAULT_TUNED_TARGET = "NVIDIA H200 sm_90"  # whose tuning records decide the config, when there are any


@dataclass(frozen=True)
class Inspection:
    """One kernel's static figures: the compiler's (sass.KernelFigures) and the tiling's."""

    problem: str
    kind: str
    family: str
    config: str
    uri: str
    figures: sass.KernelFigures
    programs: int
    waves: float                       # programs / SMs (one program per SM at a time assumed)
    requested_over_ideal_bytes: Optional[float]
    issued_over_useful_flops: Optional[float]

    def as_dict(self) -> dict:
        """JSON-ready."""
        row = asdict(self)
        row["figures"] = {k: ({str(key): v for key, v in value.items()} if isinstance(value, dict) else value)
                          for k, value in asdict(self.figures).items()}
        return row


def _meta_tensors(problem: Problem) -> dict[str, torch.Tensor]:
    """Meta tensors of ``problem`` in its layout, strided as the runtime's own would be."""
    spec = problem.spec
    dtype = TORCH_DTYPES[spec.dtype]
    memory_format = torch.channels_last if spec.layout == "nhwc" else torch.contiguous_format
    width = problem.width * (2 if spec.layout == "strided" else 1)
    x = torch.empty(problem.batch, spec.in_channels, problem.height, width, dtype=dtype, device="meta",
                    memory_format=memory_format)
    x = x[..., ::2] if spec.layout == "strided" else x
    out_shape = (problem.batch, spec.out_channels, *problem.output_size)
    return {
        "x": x,
        "weight": torch.empty(spec.weight_shape, dtype=dtype, device="meta", memory_format=memory_format),
        "bias": torch.empty(spec.out_channels, dtype=dtype, device="meta") if spec.bias else None,
        "out": torch.empty(out_shape, dtype=dtype, device="meta", memory_format=memory_format),
        "grad_x": torch.empty(x.shape, dtype=dtype, device="meta", memory_format=memory_format),
        "grad_w": torch.empty(spec.weight_shape, dtype=dtype, device="meta"),
    }


def prepared_launch(problem: Problem, tuned_target: str = DEFAULT_TUNED_TARGET) -> launch.Launch:
    """The launch the runtime would prepare for ``problem`` on an H200: the tuning record under
    ``tuned_target`` (nearest batch size) when there is one, else the default; its splits fill 132 SMs."""
    choice = database().choice(key_of(problem, tuned_target, False))
    choice = DEFAULT if choice.kind == "aten" else choice
    t = _meta_tensors(problem)
    spec = problem.spec
    if problem.kind == "forward":
        return launch.prepare_forward(spec, t["x"], t["weight"], t["bias"], t["out"], choice, INSPECT_TARGET)
    if problem.kind == "grad_input":
        return launch.prepare_grad_input(spec, t["out"], t["weight"], t["grad_x"], choice, INSPECT_TARGET)
    first = launch.prepare_grad_weight(spec, t["x"], t["out"], t["grad_w"], choice, 1, INSPECT_TARGET)
    pixels = problem.output_pixels
    tiles = math.prod(first.grid[:-1])
    splits, _ = launch.split_pixels(pixels, first.desc.reduction_block, tiles, 4 * H200_SMS)
    return launch.prepare_grad_weight(spec, t["x"], t["out"], t["grad_w"], choice, splits, INSPECT_TARGET)


def inspect_problem(problem: Problem, tuned_target: str = DEFAULT_TUNED_TARGET) -> Inspection:
    """Compile ``problem``'s kernel for sm_90 as it would launch and report its figures.

    Needs TRITON_INTERPRET unset (the interpreter has no compiler); raises RuntimeError otherwise."""
    check(not knobs.interpret(), "gconvgen inspect compiles for sm_90 and needs TRITON_INTERPRET unset", RuntimeError)
    prepared = prepared_launch(problem, tuned_target)
    desc = prepared.desc
    kernel = launch.kernel_of(desc, INSPECT_TARGET)
    arguments = {name: sass.Pointer(str(value.dtype).removeprefix("torch.")) if isinstance(value, torch.Tensor)
                 else value for name, value in prepared.arguments().items()}
    meta = desc.meta
    constexprs = {name: meta[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_BLOCK")}
    with warnings.catch_warnings():  # Triton 3.9 warns once that its FP-fusion default will change; the
        # default (fusion on) is what the runtime's launches compile with, so the figures stay those
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset", category=UserWarning)
        compiled = sass.compile_like_launch(kernel, arguments, constexprs, num_warps=meta["num_warps"],
                                            num_stages=meta["num_stages"])
    programs = math.prod(prepared.grid)
    requested, issued = tiling_figures(desc, problem, prepared.grid, prepared.arguments())
    return Inspection(problem.describe(), problem.kind, desc.family, config_name(desc.config, None), desc.uri,
                      sass.figures(compiled), programs, programs / H200_SMS, requested, issued)


def ideal_bytes_and_flops(problem: Problem) -> tuple[int, int]:
    """The layer's ideal bytes (each operand once: BENCHMARK_LAYERS.md's formula, per kernel) and useful FLOPs."""
    spec = problem.spec
    element = ELEMENT_BYTES[spec.dtype]
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    x = problem.batch * spec.in_channels * problem.height * problem.width
    out = problem.output_pixels * spec.out_channels
    weight = spec.out_channels * spec.in_channels_per_group * taps
    return element * (x + out + weight), 2 * out * spec.in_channels_per_group * taps


def tiling_figures(desc: KernelDesc, problem: Problem, grid: tuple[int, ...],
                   arguments: dict) -> tuple[Optional[float], Optional[float]]:
    """(global bytes the programs request / ideal bytes, tensor-core FLOPs issued / useful FLOPs) of the
    tiling, counting every operand tile each program loads (L2 may serve repeats: this bounds traffic
    from above) and a staged activation's copy; each family models its own operand tiles (Family.requested).
    None where the family's model is not written (the direct depthwise grad-input kernel)."""
    spec = problem.spec
    ideal_bytes, useful_flops = ideal_bytes_and_flops(problem)
    element = ELEMENT_BYTES[spec.dtype]
    programs = math.prod(grid)
    taps = spec.kernel_size[0] * spec.kernel_size[1]
    written = {"forward": problem.output_pixels * spec.out_channels,
               "grad_input": problem.batch * spec.in_channels * problem.height * problem.width,
               "grad_weight": grid[-1] * spec.out_channels * spec.in_channels_per_group * taps}[desc.kind]
    writes = written * element
    if desc.stage_channels_last:  # the runtime's channels_last copies of the activations read: once in, once out
        x = problem.batch * spec.in_channels * problem.height * problem.width
        grad_out = problem.output_pixels * spec.out_channels
        writes += 2 * {"forward": x, "grad_input": grad_out, "grad_weight": x + grad_out}[desc.kind] * element
    modelled = family(desc.family).requested(desc, problem, programs, arguments)
    if modelled is None:
        return None, None
    requested, issued_flops = modelled
    return (requested + writes) / ideal_bytes, None if issued_flops is None else issued_flops / useful_flops
