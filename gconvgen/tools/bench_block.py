"""``gconvgen bench --block bn-act``: a conv -> BatchNorm (eval) -> activation block, fused by gconvgen (BN folded
into the weight and bias, the activation in the kernel's epilogue) against PyTorch eager and torch.compile
(Inductor) of the same block, same dtype and layout, with the bytes each moves against the unfused floor.

Bytes: the fused block reads the input and weight and writes the output once; eager also writes the conv's
output, reads and writes it for BatchNorm, and reads and writes it for the activation (four more passes
over the output). On CPU everything runs through Triton's interpreter: timings say nothing about GPU speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..nn.conv2d import conv2d
from ..autotune.measure import Measurement, Timer, cudnn_benchmark, random_activation
from ..autotune.space import Problem
from .bench import roofline
from .inspection import geometric_mean
from ..nn.fuse import fold_batch_norm
from ..compiler.lowering import ELEMENT_BYTES
from ..activations import apply as apply_activation
from ..runtime.device import TORCH_DTYPES


@dataclass(frozen=True)
class BlockRow:
    """One layer's block: times in ms (None where unavailable or unresolved), bytes, correctness."""

    layer: str
    layout: str
    activation: str
    gconvgen_ms: Optional[float]
    eager_ms: Optional[float]
    compiled_ms: Optional[float]
    fused_bytes: int
    eager_bytes: int
    correct: bool
    note: str

    @property
    def speedup_over_eager(self) -> Optional[float]:
        return self.eager_ms / self.gconvgen_ms if self.eager_ms and self.gconvgen_ms else None

    @property
    def speedup_over_compiled(self) -> Optional[float]:
        return self.compiled_ms / self.gconvgen_ms if self.compiled_ms and self.gconvgen_ms else None


def _ms(measured: Measurement) -> Optional[float]:
    return measured.ms if measured.resolved else None


def bench_block(layer_id: str, problem: Problem, activation: str, device: torch.device, timer: Timer,
                compile_block: bool = True) -> BlockRow:
    """Check and time one layer's conv -> BN -> activation block, fused and unfused."""
    spec = problem.spec
    generator = torch.Generator(device=device)
    generator.seed()
    dtype = TORCH_DTYPES[spec.dtype]
    x = random_activation(problem, device, generator)
    weight = torch.randn(spec.weight_shape, generator=generator, device=device).to(dtype)
    channels = spec.out_channels
    mean, gamma, beta = (torch.randn(channels, generator=generator, device=device).to(dtype) for _ in range(3))
    var = torch.rand(channels, generator=generator, device=device).add(0.5).to(dtype)
    stride, dilation, groups = spec.stride, spec.dilation, spec.groups
    top, bottom, left, right = spec.padding

    def eager(x, weight, mean=mean, var=var, gamma=gamma, beta=beta):
        out = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, None, stride, 0, dilation, groups)
        return apply_activation(F.batch_norm(out, mean, var, gamma, beta, False, 0.0, 1e-5), activation)

    folded_weight, folded_bias = fold_batch_norm(weight.float(), None, mean.float(), var.float(), gamma.float(),
                                                 beta.float(), 1e-5)
    folded_weight, folded_bias = folded_weight.to(dtype), folded_bias.to(dtype)

    def fused(x):
        return conv2d(x, folded_weight, folded_bias, stride, spec.padding, dilation, groups, activation=activation)

    expected = eager(*(tensor.double() for tensor in (x, weight, mean, var, gamma, beta)))
    got = fused(x).double()
    tolerance = {"float64": 1e-9, "float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}[spec.dtype]
    allowed = tolerance * (expected.abs() + expected.square().mean().sqrt())
    correct = bool(torch.isfinite(got).all() and ((got - expected).abs() <= allowed).all())
    note = ""
    with cudnn_benchmark():
        gconvgen_ms = _ms(timer.time(lambda: fused(x)))
        eager_ms = _ms(timer.time(lambda: eager(x, weight)))
        compiled_ms = None
        if compile_block:
            try:
                compiled = torch.compile(eager)
                compiled(x, weight)
                compiled_ms = _ms(timer.time(lambda: compiled(x, weight)))
            except Exception as error:  # no C++ compiler, an Inductor limit: report it, time the rest
                note = f"torch.compile unavailable: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    fused_bytes, _ = roofline(problem)
    output_bytes = problem.output_pixels * channels * ELEMENT_BYTES[spec.dtype]
    return BlockRow(layer_id, spec.layout, activation, gconvgen_ms, eager_ms, compiled_ms, fused_bytes,
                    fused_bytes + 4 * output_bytes, correct, note)


def format_block_table(rows: list[BlockRow], on_cpu: bool, *, markdown: bool = False) -> str:
    """The table the CLI prints (as a markdown table with ``markdown``), its geometric mean and, on CPU,
    what the timings are worth."""
    def text(value: Optional[float], suffix: str = "") -> str:
        return "-" if value is None else f"{value:.3g}{suffix}"

    headers = ["layer", "act", "gconvgen ms", "eager ms", "compile ms", "vs eager", "vs compile", "bytes fused/eager",
               "ok"]
    cells = [[f"{row.layer} {row.layout}", row.activation, text(row.gconvgen_ms), text(row.eager_ms),
              text(row.compiled_ms), text(row.speedup_over_eager, "x"), text(row.speedup_over_compiled, "x"),
              f"{row.fused_bytes / row.eager_bytes:.2f}", "yes" if row.correct else "NO"] for row in rows]
    notes = [f"{row.layer} {row.layout}: {row.note}" for row in rows if row.note]
    speedups = [row.speedup_over_eager for row in rows if row.speedup_over_eager]
    if speedups:
        notes.append(f"geomean vs eager: {geometric_mean(speedups):.3g}x")
    if on_cpu:
        notes.append("CPU run: gconvgen ran through Triton's interpreter; these timings say nothing about GPU speed.")
    if markdown:
        table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        table += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(table) + "\n\n" + "".join(f"- {note}\n" for note in notes)
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width)
                       in enumerate(zip(row, widths))) for row in [headers, *cells]]
    return "\n".join(lines + notes)


BLOCKS: dict[str, Callable] = {"bn-act": bench_block}
