"""Model conversion: ``gconvgen.convert(model)`` swaps grouped ``nn.Conv2d`` modules for ``GroupedConv2d``
(and ``nn.Conv1d`` for ``GroupedConv1d``) in place, sharing their parameters, and says what it replaced and
what it skipped and why."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .conv2d import GroupedConv2d
from .conv1d import GroupedConv1d
from ..ir import CHANNEL_POLICIES, check
from ..runtime.device import DTYPE_NAMES

log = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]
# the torch conv -> the gconvgen module that replaces it
REPLACEMENTS = {nn.Conv2d: GroupedConv2d, nn.Conv1d: GroupedConv1d}


@dataclass
class ConversionReport:
    """What ``convert`` did: ``replaced`` as (name, description), ``skipped`` as (name, reason)."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"gconvgen.convert: replaced {len(self.replaced)} conv(s), skipped {len(self.skipped)}"]
        lines += [f"  replaced {name}: {what}" for name, what in self.replaced]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def convert(model: nn.Module, *, filter_fn: Optional[FilterFn] = None, channel_policy: str = "strict") -> nn.Module:
    """Replace ``nn.Conv2d`` modules of ``model`` by ``GroupedConv2d`` and ``nn.Conv1d`` by ``GroupedConv1d``,
    in place, and return ``model``.

    Selected are the convs with ``groups > 1``, or those for which ``filter_fn(module, name)`` is true.
    A replacement shares the conv's Parameter objects (so device, dtype, optimizer state and state-dict
    keys stay), its buffers and training flag. A conv that gconvgen cannot run as it is (a padding_mode
    other than 'zeros', a subclass with its own forward, hooks on the module, an unsupported dtype, a plan
    the planner refuses) is left in place and reported as skipped. A conv reachable under several names is
    replaced once, everywhere.

    The report is logged (logger ``gconvgen.conversion``) and kept as ``model.gconvgen_report``, a
    ConversionReport. Raises TypeError / ValueError for bad arguments.
    """
    check(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}", TypeError)
    check(filter_fn is None or callable(filter_fn),
          f"filter_fn={filter_fn!r} must be a callable (module, name) -> bool, or None", TypeError)
    check(channel_policy in CHANNEL_POLICIES,
          f"channel_policy={channel_policy!r} is not a policy; use 'strict' or 'pad'")
    report = ConversionReport()
    replacements: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, tuple(REPLACEMENTS)) or isinstance(module, tuple(REPLACEMENTS.values())):
            continue
        if not (filter_fn(module, name) if filter_fn is not None else module.groups > 1):
            continue
        if id(module) in replacements:
            report.replaced.append((name, f"{_describe(module)} (the same module as an earlier name)"))
        else:
            try:
                replacements[id(module)] = _replacement(module, name, channel_policy)
            except (TypeError, ValueError) as error:
                report.skipped.append((name, str(error)))
                continue
            report.replaced.append((name, _describe(module)))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacements[id(module)])
    model.gconvgen_report = report
    log.info("%s", report)
    return model


def _replacement(conv: nn.Conv2d | nn.Conv1d, name: str, channel_policy: str) -> GroupedConv2d | GroupedConv1d:
    """A GroupedConv2d (GroupedConv1d for an nn.Conv1d) sharing ``conv``'s parameters and buffers; raises
    ValueError / TypeError saying why ``conv`` cannot be replaced."""
    base = nn.Conv1d if isinstance(conv, nn.Conv1d) else nn.Conv2d
    grouped = REPLACEMENTS[base]
    check(name != "",
          f"the model itself is the conv and convert works in place; use {grouped.__name__}.from_conv(model)")
    check(type(conv).forward is base.forward,
          f"{type(conv).__name__} overrides nn.{base.__name__}.forward, which gconvgen cannot reproduce")
    check(not (conv._forward_pre_hooks or conv._forward_hooks or conv._backward_pre_hooks or conv._backward_hooks),
          "it has hooks registered on it, which a replacement would lose")
    check(conv.padding_mode == "zeros", f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
    check(not torch.nn.utils.parametrize.is_parametrized(conv),
          "its weight is parametrized (e.g. weight_norm) and computed on each call, which a replacement would "
          "lose; torch.compile(model, backend='gconvgen') runs it as it is, or remove the parametrization first "
          "(torch.nn.utils.parametrize.remove_parametrizations(conv, 'weight'))")
    check(conv.weight.dtype in DTYPE_NAMES,
          f"dtype {conv.weight.dtype} is not supported; use float32, float16, bfloat16 or float64", TypeError)
    module = grouped.from_conv(conv, channel_policy=channel_policy)
    for buffer_name, buffer in conv._buffers.items():
        module.register_buffer(buffer_name, buffer, persistent=buffer_name not in conv._non_persistent_buffers_set)
    for parameter_name, parameter in conv._parameters.items():
        if parameter_name not in ("weight", "bias"):
            module.register_parameter(parameter_name, parameter)
    return module


def _describe(conv: nn.Conv2d | nn.Conv1d) -> str:
    return (f"{conv.in_channels}->{conv.out_channels} k{'x'.join(map(str, conv.kernel_size))} "
            f"s{'x'.join(map(str, conv.stride))} groups={conv.groups}")
