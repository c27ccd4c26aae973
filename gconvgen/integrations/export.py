"""torch.export and AOTInductor through gconvgen's own Triton kernels, so that an exported or AOT-compiled
model runs them without gconvgen's Python.

``gconvgen::conv2d`` and ``gconvgen::conv2d_act`` are opaque custom ops: export keeps a call to them, and
an AOTInductor package made from that graph needs gconvgen at load time ("Could not find schema for
gconvgen::conv2d"). Here the same two convs are ``torch.library.triton_op``\\ s whose bodies allocate the
output with torch ops and launch the generated kernel through ``torch.library.wrap_triton``:

    gconvgen::conv2d_traced       the arguments of gconvgen::conv2d
    gconvgen::conv2d_act_traced   the arguments of gconvgen::conv2d_act (fused activation and residual)

Inside ``traced_convs()`` every call of the opaque ops that torch sees (every traced call: torch.export,
make_fx; eager calls on plain tensors keep gconvgen's direct path, with the same results) goes to its
traced twin::

    ep = gconvgen.integrations.export.export(model, (x,))   # = with traced_convs(): torch.export.export(...)
    torch.export.save(ep, "model.pt2")                      # loads where gconvgen is imported
    package = torch._inductor.aoti_compile_and_package(ep)  # the kernels compiled in: loads without gconvgen
    inline_kernels(ep)                                      # the kernels as graph nodes, to read or transform

torch.export keeps a triton_op as a call (PyTorch's choice: a serialisable, backend-neutral program), so
``ep`` holds ``gconvgen::conv2d_traced`` calls; AOTInductor and ``inline_kernels`` decompose each into its
torch ops and a ``triton_kernel_wrapper_functional`` kernel node. torch.export.save cannot write such
kernel nodes (torch's serializer needs a GPU-compiled kernel for them and cannot read them back), so save
the exported program, and ship the AOTInductor package where gconvgen is absent.

A call of ``ep`` chooses its kernel as gconvgen::conv2d does, where it runs; ``inline_kernels`` and
AOTInductor fix the kernel, config and grid chosen when they trace (the tuning database of that machine,
for its GPU). Shapes are static: ``dynamic_shapes`` is refused.

On CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), ``@triton.jit`` makes an
``InterpretedFunction``, which ``wrap_triton`` cannot trace: torch 2.13 hands it back untouched (it would
then run on fake tensors while tracing), torch before pytorch#185597 (2.11 included) refuses it. Such a
kernel is traced as a ``JITFunction`` made from the same Python function that launches through the
interpreter (``_InterpretedKernel``), so export, ``inline_kernels`` and running either program in this
process work on CPU too (AOTInductor needs a GPU). CPU tensors without the interpreter trace the aten form,
as gconvgen::conv2d runs it (said once, refused under GCONVGEN_FALLBACK=error).

Gradients: both ops have gconvgen::conv2d's and conv2d_act's autograd formulas (through gconvgen's gradient
ops), so a model trained inside ``traced_convs()`` still trains; export itself is for inference.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from torch._higher_order_ops import triton_kernel_wrap
from torch._prims_common import clone_preserve_strides
from torch.overrides import TorchFunctionMode
from triton.runtime.jit import JITFunction

from .. import knobs
from ..ir import ACTIVATIONS, CHANNEL_POLICIES, check
from ..memo import registered
from ..compiler.lowering import ATEN
from ..runtime import launch
from ..runtime.device import device_target
from ..autotune.choice import choice_for
from ..ops import backward as conv2d_formulas, fused as fused_formulas
from ..ops.fused import aten_conv2d_act
from ..ops.dispatch import allocate_output, fallback, output_memory_format, spec_for_call

CONV2D = "gconvgen::conv2d_traced"
CONV2D_ACT = "gconvgen::conv2d_act_traced"


# ---------------------------------------------------------------------------------------------- the kernel


class _InterpretedKernel(JITFunction):
    """A JITFunction of an interpreted kernel's Python function (what ``wrap_triton`` and torch's kernel
    nodes accept) whose launches run that ``InterpretedFunction`` in Triton's interpreter. It is never
    compiled; without a GPU driver torch cannot analyse which arguments it writes and takes every tensor
    argument as written, so a trace passes it copies (_copied_operands)."""

    def __init__(self, interpreted: Any) -> None:
        super().__init__(interpreted.fn)
        self.interpreted = interpreted

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)


_TRACEABLE: dict[Any, _InterpretedKernel] = {}  # InterpretedFunction -> its traceable twin
registered(_TRACEABLE.clear)


def _traceable(kernel: Any) -> Any:
    """``kernel`` as ``wrap_triton`` takes it: a JITFunction as it is, an interpreted kernel as its twin."""
    if isinstance(kernel, JITFunction):
        return kernel
    twin = _TRACEABLE.get(kernel)
    if twin is None:
        twin = _TRACEABLE[kernel] = _InterpretedKernel(kernel)
    return twin


# ---------------------------------------------------------------------------------------------- the ops


def _check_call(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], channel_policy: str, activation: str) -> None:
    """What the traced ops check themselves (gconvgen.conv2d has checked the rest before routing a call
    here): ranks, argument lengths, names, and static shapes."""
    for name, tensor in (("x", x), ("weight", weight), ("residual", residual)):
        if tensor is None:
            continue
        check(tensor.dim() == 4, f"{name} has shape {tuple(tensor.shape)}; expected 4-D "
                                 + ("[out_channels, in_channels/groups, kh, kw]" if name == "weight"
                                    else "[N, C, H, W]"))
        check(all(type(size) is int for size in (*tensor.shape, *tensor.stride())),
              f"{name} has symbolic sizes {tuple(tensor.shape)}: gconvgen's traced convs fix their kernel, config "
              f"and grid when traced, so export with static shapes (no dynamic_shapes for this input)")
    for name, value, length in (("stride", stride, 2), ("padding", padding, 4), ("dilation", dilation, 2)):
        check(len(value) == length, f"{name}={list(value)!r} must hold {length} ints"
                                    + (" (top, bottom, left, right)" if name == "padding" else ""))
    check(channel_policy in CHANNEL_POLICIES,
          f"channel_policy={channel_policy!r} is not a policy; use one of {CHANNEL_POLICIES}")
    check(activation in ACTIVATIONS, f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
          stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str,
          activation: str) -> torch.Tensor:
    """``activation(conv2d(x, weight) + bias + residual)``: the body of both traced ops, made of torch ops and
    one ``wrap_triton`` launch (or of aten ops where gconvgen::conv2d runs aten)."""
    _check_call(x, weight, residual, stride, padding, dilation, channel_policy, activation)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    spec = spec_for_call(x, weight, bias, stride, padding, dilation, groups, channel_policy)
    if x.device.type == "cpu" and not knobs.interpret():
        fallback("CPU tensors and TRITON_INTERPRET is not set")
        return aten_conv2d_act(spec, x, weight, bias, residual, activation).contiguous(memory_format=output_memory_format(x))
    out = allocate_output(x, weight, stride, padding, dilation)
    if out.numel() == 0 or x.is_meta:  # an empty batch, or meta tensors: nothing to launch
        return out
    choice = choice_for(spec, "forward", x.device, x.shape[0], x.shape[2], x.shape[3])
    if choice.kind == ATEN:  # tuning found aten faster for this layer: the graph gets the aten conv
        return out.copy_(aten_conv2d_act(spec, x, weight, bias, residual, activation))
    target = device_target(x.device)
    tracing = torch._subclasses.fake_tensor.is_fake(x)
    prepared = launch.prepare_forward(spec, x, weight, bias, out, choice, target, activation, residual)
    kernel = _traceable(launch.kernel_of(prepared.desc, target))
    values = prepared.values
    if tracing and isinstance(kernel, _InterpretedKernel):
        values = _copied_operands(values, out)
    torch.library.wrap_triton(kernel)[prepared.grid](*values, **prepared.desc.meta)
    return out


def _copied_operands(values: tuple, out: torch.Tensor) -> tuple:
    """``values`` with each tensor but ``out`` a copy (same strides; one copy per tensor): torch cannot analyse
    an interpreted kernel, takes every tensor it is given as written, and a traced graph would then write
    its inputs and parameters (see _InterpretedKernel)."""
    copies: dict[int, torch.Tensor] = {}
    for value in values:
        if isinstance(value, torch.Tensor) and value is not out and id(value) not in copies:
            copies[id(value)] = clone_preserve_strides(value)
    return tuple(copies.get(id(value), value) if isinstance(value, torch.Tensor) else value for value in values)


@torch.library.triton_op(CONV2D, mutates_args=())
def conv2d_traced(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """gconvgen::conv2d as a triton_op: the same arguments (NCHW-indexed x [N, C_in, H, W], weight
    [C_out, ci, kh, kw], four-sided padding) and the same result, its kernel visible to export and Inductor."""
    return _conv(x, weight, bias, None, stride, padding, dilation, groups, channel_policy, "none")


@torch.library.triton_op(CONV2D_ACT, mutates_args=())
def conv2d_act_traced(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int, channel_policy: str, activation: str) -> torch.Tensor:
    """gconvgen::conv2d_act as a triton_op: ``activation(conv2d(x, weight) + bias + residual)``, residual
    [N, C_out, OH, OW] (any strides) or None."""
    return _conv(x, weight, bias, residual, stride, padding, dilation, groups, channel_policy, activation)


# the opaque ops' formulas: the inputs are the same, and so are the gradients (through gconvgen's grad ops)
conv2d_traced.register_autograd(conv2d_formulas._backward, setup_context=conv2d_formulas._setup_context)
conv2d_act_traced.register_autograd(fused_formulas._backward, setup_context=fused_formulas._setup_context)


# ---------------------------------------------------------------------------------------------- routing


def _routes() -> dict[Any, Any]:
    """Each opaque op (overload and packet) -> its traced twin."""
    ops = torch.ops.gconvgen
    return {ops.conv2d.default: conv2d_traced, ops.conv2d: conv2d_traced,
            ops.conv2d_act.default: conv2d_act_traced, ops.conv2d_act: conv2d_act_traced}


class _TracedConvs(TorchFunctionMode):
    """Calls of gconvgen::conv2d / conv2d_act go to their traced twins; everything else runs as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.routes = _routes()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.routes.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def traced_convs() -> Iterator[None]:
    """Inside the block, gconvgen's convs (GroupedConv2d / GroupedConv1d modules, gconvgen.conv2d and
    conv1d calls, gconvgen::conv2d and conv2d_act called directly) trace as gconvgen::conv2d_traced and
    conv2d_act_traced, whose Triton kernels export and AOTInductor see. Wrap ``torch.export.export`` in it
    (``export`` below does). Eager calls on plain tensors keep gconvgen's direct path (same results)."""
    with _TracedConvs():
        yield


def export(model: nn.Module, args: tuple, kwargs: Optional[dict] = None,
           **options: Any) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, kwargs, **options)`` inside ``traced_convs()``: an ExportedProgram
    whose gconvgen convs are gconvgen::conv2d_traced / conv2d_act_traced calls (static shapes only).
    Feed it to ``torch._inductor.aoti_compile_and_package`` for a package that loads without gconvgen, or to
    ``inline_kernels`` to see the kernels as graph nodes. Raises TypeError naming a bad argument."""
    check(isinstance(model, nn.Module), f"model must be a torch.nn.Module, got {type(model).__name__}", TypeError)
    check(isinstance(args, tuple), f"args must be a tuple of the model's positional inputs, got "
                                   f"{type(args).__name__} (pass (x,) for one input)", TypeError)
    check(kwargs is None or isinstance(kwargs, dict),
          f"kwargs must be a dict of the model's keyword inputs or None, got {type(kwargs).__name__}", TypeError)
    check(options.get("dynamic_shapes") is None,
          "dynamic_shapes is not supported: gconvgen's traced convs fix their kernel, config and grid at export; "
          "export once per input shape", ValueError)
    with traced_convs():
        return torch.export.export(model, args, kwargs, **options)


def inline_kernels(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with each gconvgen::conv2d_traced / conv2d_act_traced call (any triton_op) replaced by
    what it traces to: its torch ops and a ``triton_kernel_wrapper_functional`` node per kernel; nothing
    else is decomposed. It runs in this process (the kernel nodes point at this process's kernels) and
    cannot be written by torch.export.save; AOTInductor makes this decomposition itself."""
    check(isinstance(program, torch.export.ExportedProgram),
          f"program must be a torch.export.ExportedProgram, got {type(program).__name__}", TypeError)
    with _quiet_kernel_analysis():
        return program.run_decompositions({}, decompose_custom_triton_ops=True)


@contextlib.contextmanager
def _quiet_kernel_analysis() -> Iterator[None]:
    """Under Triton's interpreter torch cannot analyse which arguments a kernel writes (that needs a GPU
    driver); it logs each failure with its traceback and takes every argument as written. The traced ops
    pass copies there (_copied_operands), so that failure is expected: it is filtered out (only it)."""
    def expected(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Encountered an exception in identify_accessed_tensors")

    logger = getattr(triton_kernel_wrap, "log", None)
    quiet = knobs.interpret() and isinstance(logger, logging.Logger)
    if quiet:
        logger.addFilter(expected)
    try:
        yield
    finally:
        if quiet:
            logger.removeFilter(expected)
