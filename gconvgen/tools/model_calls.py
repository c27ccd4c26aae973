"""Which grouped convs a user's model runs: one forward (and backward) of a converted copy, recorded layer by
layer, for ``gconvgen.tune(model)`` and ``gconvgen.report(model)``.

The copy is converted (``gconvgen.convert``) so that its grouped convs run gconvgen's ops, and run once with
a recording choice provider (``autotune.choice.overridden``): every kernel the runtime would
launch asks the provider for its tuning choice with exactly the spec, kind and input size that the tuning
database is keyed on, so what is recorded is what a later run looks up. The provider answers aten, so
recording costs what PyTorch's convs cost, never the interpreter's time. A pass-through dispatch mode keeps
every call on the op's full path (no warm call skips the provider) and sees the grouped convs that stay
as ``F.conv2d`` / ``F.conv1d`` calls (functional, in a module's own forward), which the torch.compile
backend runs with gconvgen. Forward hooks on the copy's modules name the layer of each call.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..autotune.space import Problem
from ..nn.convert import convert
from ..ir import ConvSpec, check
from ..compiler.lowering import ATEN, Choice
from ..autotune import choice
from ..ops.dispatch import spec_for_call
from ..runtime.device import DTYPE_NAMES

MODULE = "module"          # a gconvgen module of the converted model (GroupedConv2d / GroupedConv1d)
FUNCTIONAL = "functional"  # an F.conv2d / F.conv1d call, which gconvgen runs under torch.compile(backend="gconvgen")
_aten = torch.ops.aten


class ModelRunError(RuntimeError):
    """The user's model raised while gconvgen ran it on the example inputs; the model's error is chained."""


@dataclass(frozen=True)
class LayerCall:
    """One grouped conv kernel the model ran: the layer (the qualified name of the module whose forward made
    the call, '' for the model itself), the tuning Problem (forward, grad_input or grad_weight), its device
    and its route (MODULE or FUNCTIONAL)."""

    layer: str
    problem: Problem
    device: torch.device
    route: str


@dataclass
class Recording:
    """What one run of the model showed: ``calls`` in the order they ran, and ``skipped`` as (layer, why
    gconvgen does not run it) for the convs ``convert`` left to torch."""

    calls: list[LayerCall] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def problems(self) -> dict[tuple[Problem, torch.device], list[LayerCall]]:
        """Each distinct (problem, device), first seen first, with the calls that run it."""
        grouped: dict[tuple[Problem, torch.device], list[LayerCall]] = {}
        for call in self.calls:
            grouped.setdefault((call.problem, call.device), []).append(call)
        return grouped


def check_model_arguments(model: object, flags: dict, max_minutes: object) -> None:
    """The checks gconvgen.tune and gconvgen.report share: an nn.Module, True/False ``flags`` (name: value),
    and a ``max_minutes`` that is a number > 0 or None. TypeError naming the argument."""
    check(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}", TypeError)
    for name, value in flags.items():
        check(isinstance(value, bool), f"{name}={value!r} must be True or False", TypeError)
    check(max_minutes is None or (isinstance(max_minutes, (int, float)) and not isinstance(max_minutes, bool)
                                  and max_minutes > 0),
          f"max_minutes={max_minutes!r} must be a number of minutes > 0, or None for the default", TypeError)


def example_arguments(example_inputs: object) -> tuple:
    """The model's positional arguments: a tensor, or a tuple or list of arguments; raises TypeError naming
    ``example_inputs`` otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    check(isinstance(example_inputs, (tuple, list)),
          f"example_inputs={type(example_inputs).__name__} is not a tensor or a tuple of the model's positional "
          f"arguments; pass a tensor, e.g. torch.randn(1, 3, 224, 224), or a tuple (x, y)", TypeError)
    return tuple(example_inputs)


def converted_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its grouped convs converted (``gconvgen.convert``); ``model`` itself is
    left as it is (its BatchNorm statistics too). Raises TypeError when the model cannot be copied."""
    check(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}", TypeError)
    try:
        duplicate = copy.deepcopy(model)
    except Exception as error:  # a model holding something copy cannot copy (a lock, a file handle)
        raise TypeError(f"gconvgen runs a copy of the model, and copy.deepcopy(model) failed "
                        f"({type(error).__name__}: {error}); make the model copyable") from None
    return convert(duplicate)


def record_calls(model: nn.Module, example_inputs: object, *, backward: bool = False) -> Recording:
    """Run a converted copy of ``model`` once on ``example_inputs`` (a tensor or a tuple of positional
    arguments) and record every grouped conv kernel it runs; with ``backward``, also the gradient kernels of
    a backward pass from the sum of its outputs. ``model`` is not changed.

    Returns a Recording. Raises TypeError for bad arguments, ValueError when ``backward`` finds no output that
    needs a gradient, and ModelRunError (a RuntimeError, the model's error chained) when the model raises.
    """
    arguments = example_arguments(example_inputs)
    check(isinstance(backward, bool), f"backward={backward!r} must be True or False", TypeError)
    duplicate = converted_copy(model)
    recorder = _Recorder({module: name for name, module in duplicate.named_modules()})
    with recorder.installed(duplicate), torch.set_grad_enabled(backward):
        try:
            output = duplicate(*arguments)
        except Exception as error:  # the user's model: say so, keep its error
            shapes = ", ".join("x".join(map(str, a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__
                               for a in arguments)
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise ModelRunError(f"the model's forward raised {type(error).__name__} on inputs {shapes}: "
                                f"{first_line}") from error
        forward_calls = len(recorder.calls)
        if backward:
            _backward_from(output)
    calls = recorder.calls[:forward_calls] + _named_after_forward(recorder.calls[:forward_calls],
                                                                  recorder.calls[forward_calls:])
    return Recording(calls, list(duplicate.gconvgen_report.skipped))


def _named_after_forward(forward: list[LayerCall], backward: list[LayerCall]) -> list[LayerCall]:
    """The backward pass's calls, each named after the forward call it is a gradient (or, for an activation
    recomputed in the backward, a repeat) of. Autograd runs the layers in reverse, so among forward calls of
    one problem the last unmatched one is taken."""
    pending: dict[tuple[Problem, torch.device, str], list[str]] = {}
    for call in forward:
        for problem in (call.problem, call.problem.backward("grad_input"), call.problem.backward("grad_weight")):
            pending.setdefault((problem, call.device, call.route), []).append(call.layer)
    named = []
    for call in backward:
        layers = pending.get((call.problem, call.device, call.route))
        named.append(replace(call, layer=layers.pop()) if layers else call)
    return named


def _backward_from(output: object) -> None:
    """Backpropagate ones from every output tensor that needs a gradient; ValueError when none does."""
    tensors = [leaf for leaf in _pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    check(tensors, "backward=True, but no output of the model needs a gradient (are its parameters frozen, or "
                   "does its forward run under torch.no_grad()?); pass backward=False to record the forward only")
    torch.autograd.backward(tensors, [torch.ones_like(tensor) for tensor in tensors])


class _Recorder:
    """The recording provider, the dispatch mode and the module hooks of one run (see the module's docstring)."""

    def __init__(self, names: dict[nn.Module, str]):
        self.names = names
        self.calls: list[LayerCall] = []
        self.layers: list[str] = []  # the modules whose forward is running, innermost last

    @contextlib.contextmanager
    def installed(self, model: nn.Module) -> Iterator[None]:
        handles = []
        for module, name in self.names.items():
            handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name)))
            handles.append(module.register_forward_hook(self._leave, always_call=True))
        try:
            with choice.overridden(self.provide), _SeeEveryCall(self):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, name: str, module: nn.Module, arguments: tuple) -> None:
        self.layers.append(name)

    def _leave(self, module: nn.Module, arguments: tuple, output: object) -> None:
        self.layers.pop()

    def layer(self) -> str:
        return self.layers[-1] if self.layers else ""

    def provide(self, spec: ConvSpec, kind: str, device: torch.device, batch: int, height: int,
                width: int) -> Choice:
        """The runtime's provider while recording: note the kernel, and have aten compute it."""
        self.calls.append(LayerCall(self.layer(), Problem(spec, batch, height, width, kind), device, MODULE))
        return Choice(ATEN)

    def functional(self, problem: Optional[Problem], device: torch.device) -> None:
        if problem is not None:
            self.calls.append(LayerCall(self.layer(), problem, device, FUNCTIONAL))


class _SeeEveryCall(TorchDispatchMode):
    """Passes every op through; records grouped aten convolutions (and their gradients), which are functional
    convs: gconvgen's own ops run theirs inside the op, where this mode is not active."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.convolution.default:
            x, weight, bias, stride, padding, dilation, transposed, _, groups = args[:9]
            forward = None if transposed else _functional_problem(x, weight, bias is not None, stride, padding,
                                                                  dilation, groups)
            self.recorder.functional(forward, x.device)
        elif func is _aten.convolution_backward.default:
            _, x, weight, _, stride, padding, dilation, transposed, _, groups, mask = args[:11]
            forward = None if transposed else _functional_problem(x, weight, False, stride, padding, dilation,
                                                                  groups)
            for kind, needed in zip(("grad_input", "grad_weight"), mask):
                if forward is not None and needed:
                    self.recorder.functional(forward.backward(kind), x.device)
        return func(*args, **kwargs)


def _functional_problem(x: torch.Tensor, weight: torch.Tensor, bias: bool, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int) -> Optional[Problem]:
    """The Problem gconvgen.conv2d (conv1d: as its height-1 view) would run for a grouped aten convolution,
    or None for a conv gconvgen does not take (dense, 3-D, an unsupported dtype, a plan it refuses)."""
    if groups <= 1 or x.dim() not in (3, 4) or x.dtype not in DTYPE_NAMES:
        return None
    if x.dim() == 3:  # conv1d: [N, C, L] viewed as [N, C, 1, L], as gconvgen.conv1d views it
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
        stride, padding, dilation = (1, stride[0]), (0, 0, padding[0], padding[0]), (1, dilation[0])
    else:
        padding = (padding[0], padding[0], padding[1], padding[1])
    bias_tensor = weight.new_empty(0) if bias else None  # spec_for_call reads only whether there is one
    try:
        spec = spec_for_call(x, weight, bias_tensor, stride, padding, dilation, groups, "strict")
        return Problem(spec, x.shape[0], x.shape[2], x.shape[3])
    except (TypeError, ValueError):  # the planner's refusal: this conv stays with torch under the backend too
        return None
