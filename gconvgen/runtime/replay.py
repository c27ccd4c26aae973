"""Warm calls replayed: a memo from everything that decides a forward launch to that launch minus its tensors.

The first call of a signature (shapes, strides, dtypes, devices, hyperparameters, knobs, the tuning
choice's generation, TF32) takes the whole path: checks, spec, plan, choice, lowering, argument table.
Every launch value but the tensors' addresses is a function of that signature, so the next call with the
same signature allocates its output, fills the tensor slots of the recorded argument list and launches.

Only calls nothing could observe take this path (no autograd, torch.compile, dispatch mode, torch.func
transform or autocast: ``replayable``); they would give the same launch through the op anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..memo import registered
from .. import knobs
from ..compiler.lowering import ATEN, KernelDesc
from . import choices, launch, weights
from .device import allows_tf32, device_target, on_device
from ..ops.conv2d import spec_for_call, unobserved

OPERANDS = ("x", "weight", "bias", "residual", "out")  # the order Replay.__call__ fills slots from
_MEMO_LIMIT = 4096
_REPLAYS: dict[tuple, "Replay"] = {}


@dataclass(frozen=True)
class Replay:
    """One forward launch with its tensors left out: ``template`` is the kernel's argument list with None
    where ``slots`` (positions into OPERANDS) put a tensor. It is called on NCHW-indexed views, as the
    launch was prepared; ``copies_weight`` and ``stages_input`` redo the launch's weight copy
    (weights.copied_for_kernel) and activation copy (launch.staged). The output is allocated as the caller gets
    it (``out_shape``, ``out_stride``); the kernel writes it through the recorded strides of its view."""

    desc: KernelDesc
    target: str
    grid: tuple[int, ...]
    meta: dict
    template: tuple
    slots: tuple[tuple[int, int], ...]
    out_shape: torch.Size
    out_stride: tuple[int, ...]
    copies_weight: bool
    stages_input: bool

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor]) -> torch.Tensor:
        out = torch.empty_strided(self.out_shape, self.out_stride, dtype=x.dtype, device=x.device)
        if self.copies_weight:  # the kernel takes the copy's address; its strides are in the template
            weight = weights.copied_for_kernel(weight, self.desc)
        if self.stages_input:
            x = x.contiguous(memory_format=torch.channels_last)
        operands = (x, weight, bias, residual, out)
        values = list(self.template)
        for position, operand in self.slots:
            values[position] = operands[operand]
        kernel = launch.kernel_of(self.desc, self.target)  # the one loader: a dict lookup once loaded
        with on_device(x.device):
            kernel[self.grid](*values, **self.meta)
        return out


def key_of(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
           *hyperparameters) -> Optional[tuple]:
    """The memo key of a call on the caller's tensors (as passed) and its other arguments, or None when the
    call must take the whole path: something could observe it, or an argument is not hashable."""
    if (torch._C._is_any_autocast_enabled() or not _plain(hyperparameters)
            or not unobserved([t for t in (x, weight, bias, residual) if t is not None])):
        return None
    return (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight.dtype, weight.device,
            _signature(bias), _signature(residual), hyperparameters, knobs.fingerprint(), choices.generation(),
            x.is_cuda and x.dtype is torch.float32 and allows_tf32(x.device))


def _plain(values: tuple) -> bool:
    """Whether every value is None, a str, an int or a tuple of ints (not a bool, float or list), so that equal
    keys mean equal arguments: 1.0 == 1 and True == 1 in a dict, yet the checks refuse them."""
    return all(value is None or type(value) in (int, str)
               or (type(value) is tuple and all(type(item) is int for item in value)) for value in values)


def _signature(tensor: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if tensor is None else (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


def lookup(key: Optional[tuple]) -> Optional[Replay]:
    return None if key is None else _REPLAYS.get(key)


def remember(key: Optional[tuple], result: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], out: torch.Tensor,
             stride: tuple[int, int], padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
             channel_policy: str, activation: str) -> None:
    """Record the launch a call just made, if it made one: x, weight, residual and out are the NCHW-indexed
    views it ran on, ``result`` what it returned, a view of ``out``'s memory. Calls that ran aten, no
    kernel, or returned a copy are not kept."""
    if (key is None or out.is_meta or out.numel() == 0 or result.data_ptr() != out.data_ptr()
            or (x.device.type == "cpu" and not knobs.interpret())):
        return
    spec = spec_for_call(x, weight, bias, stride, padding, dilation, groups, channel_policy)
    choice = choices.choice_for(spec, "forward", x.device, x.shape[0], x.shape[2], x.shape[3])
    if choice.kind == ATEN:
        return
    prepared = launch.prepare_forward(spec, x, weight, bias, out, choice, activation=activation, residual=residual)
    given = {"x": x, "weight": weight, "bias": bias, "residual": residual, "out": out}
    operands = prepared.desc.arguments.operands
    # a missing optional operand was passed a placeholder, x (see launch._arguments): any address will do
    slots = tuple((position, OPERANDS.index(op.name if given[op.name] is not None else "x"))
                  for position, op in enumerate(operands))
    template = (None,) * len(operands) + prepared.values[len(operands):]
    copies_weight = weights.needs_copy(weight, prepared.desc)
    if len(_REPLAYS) >= _MEMO_LIMIT:
        _REPLAYS.clear()
    _REPLAYS[key] = Replay(prepared.desc, device_target(x.device), prepared.grid, prepared.desc.meta, template,
                           slots, result.shape, result.stride(), copies_weight, prepared.desc.stage_channels_last)


@registered
def clear() -> None:
    """Forget every recorded launch (tests; a new cache directory)."""
    _REPLAYS.clear()
