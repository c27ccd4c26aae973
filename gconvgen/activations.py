"""The fused activations, one table row each: everything gconvgen knows about an activation lives here.

A row gives the activation's torch reference (what the kernels' epilogue must equal, NaN and inf included),
its Triton expression over the fp32 (fp64) accumulator ``acc``, the gradient of its input from the output's
(torch's own backward ops, so kinks, NaN and half-precision rounding are eager's, and double backward and
forward-mode AD work through them; hardswish's is NaN at a NaN input, where torch's own kernel gives NaN or
not by the element's place), whether that gradient needs only the output (nothing else is kept for the backward),
the nn modules that compute it and the functions a traced graph calls it by.

The Triton expressions propagate NaN as torch does: a NaN stays NaN (``tl.maximum`` would drop it on a GPU,
so clamps are written with ``tl.where`` on comparisons, which are false for NaN), and +-inf give what
torch's float64 CPU kernels give: relu6(inf) = 6, silu(-inf) = gelu(-inf) = hardswish(-inf) = NaN
(-inf x 0), gelu(inf) = inf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ir

aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """One fused activation (see the module docstring)."""

    name: str
    reference: Callable[[torch.Tensor], torch.Tensor]                # torch's activation of the pre-activation
    gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (grad of output, saved) -> grad of input
    from_output: bool                                                # gradient reads the output, else the input
    triton: str                                                      # expression of the accumulator ``acc``
    modules: tuple[tuple[type, dict], ...]                           # (nn module type, attributes it must have)
    functions: tuple                                                 # call targets in a traced graph


def _targets(*names: str) -> tuple:
    """The aten overloads ``names`` that exist in this torch (relu6 has none in some versions)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        if hasattr(aten, packet):
            found.append(getattr(getattr(aten, packet), overload or "default"))
    return tuple(found)


def _silu_gradient(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """torch's own rule for silu's gradient: aten.silu_backward, bit for bit eager's, where nothing will
    differentiate the gradient (grad mode off, plain tensors); else aten's formula written out in its float32
    (float64) arithmetic rounded once, which is differentiable where aten.silu_backward is not (it has no
    forward-mode derivative, so a Hessian through it would fail). torch's silu decides by grad mode alone;
    the formula is also taken under torch.func transforms and for dual tensors, which need it whatever
    the grad mode."""
    if not (torch.is_grad_enabled() or _traced(grad) or _traced(pre)):
        return aten.silu_backward(grad, pre)
    compute = torch.promote_types(grad.dtype, torch.float32)
    pre_wide = pre.to(compute)
    sigmoid = torch.sigmoid(pre_wide)
    return (grad.to(compute) * sigmoid * (1 + pre_wide * (1 - sigmoid))).to(grad.dtype)


def _traced(tensor: torch.Tensor) -> bool:
    """Whether a derivative of ``tensor`` may be taken although grad mode is off: a torch.func transform's
    wrapper, or a forward-mode dual tensor."""
    return (torch._C._functorch.is_functorch_wrapped_tensor(tensor)
            or torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None)


def _hardswish_gradient(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """aten.hardswish_backward, NaN where the pre-activation is NaN. For a NaN input torch's own kernel
    returns NaN or passes the gradient through depending on the element's place and dtype (float64's
    vectorised loop gives NaN; its scalar tail, float32's loops and CUDA's kernel pass the gradient); here a
    NaN pre-activation always gives a NaN gradient, as it does in every other activation's gradient."""
    return torch.where(torch.isnan(pre), pre.to(grad.dtype), aten.hardswish_backward(grad, pre))


_ROWS = (
    Activation("relu", F.relu, lambda grad, out: aten.threshold_backward(grad, out, 0), True,
               "tl.where(acc < 0.0, 0.0, acc)",
               ((nn.ReLU, {}),), (F.relu, F.relu_, torch.relu, torch.relu_, *_targets("relu", "relu_"))),
    Activation("relu6", F.relu6, lambda grad, out: aten.hardtanh_backward(grad, out, 0.0, 6.0), True,
               "tl.where(acc < 0.0, 0.0, tl.where(acc > 6.0, 6.0, acc))",
               ((nn.ReLU6, {}),), (F.relu6, *_targets("relu6"))),
    Activation("silu", F.silu, lambda grad, pre: _silu_gradient(grad, pre), False,
               "acc / (1.0 + tl.exp(-acc))",
               ((nn.SiLU, {}),), (F.silu, *_targets("silu", "silu_"))),
    Activation("gelu", F.gelu, lambda grad, pre: aten.gelu_backward(grad, pre, approximate="none"), False,
               "0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))",
               ((nn.GELU, {"approximate": "none"}),), (F.gelu, torch._C._nn.gelu, *_targets("gelu"))),
    # 0.5 x (1 + tanh(z)) = x sigmoid(2z), z = sqrt(2 / pi) (x + 0.044715 x^3)
    Activation("gelu_tanh", lambda pre: F.gelu(pre, approximate="tanh"),
               lambda grad, pre: aten.gelu_backward(grad, pre, approximate="tanh"), False,
               "acc / (1.0 + tl.exp(-1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)))",
               ((nn.GELU, {"approximate": "tanh"}),), ()),
    Activation("hardswish", F.hardswish, _hardswish_gradient, False,
               "acc * tl.where(acc + 3.0 < 0.0, 0.0, tl.where(acc + 3.0 > 6.0, 6.0, acc + 3.0)) / 6.0",
               ((nn.Hardswish, {}),), (F.hardswish, *_targets("hardswish", "hardswish_"))),
)
ACTIVATIONS: dict[str, Activation] = {row.name: row for row in _ROWS}
NAMES = ("none", *ACTIVATIONS)  # what an ``activation=`` argument takes (None is "none")
if NAMES != ir.ACTIVATIONS:  # the torch-free list the CLI offers
    raise RuntimeError(f"gconvgen.ir.ACTIVATIONS {ir.ACTIVATIONS} must name the table's rows {NAMES}")


def apply(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """torch's own ``activation`` of ``pre`` ("none": ``pre`` itself)."""
    return pre if activation == "none" else ACTIVATIONS[activation].reference(pre)


def needs_pre_activation(activation: str) -> bool:
    """Whether the gradient of ``activation`` needs its input (recomputed in the backward), not its output."""
    return activation != "none" and not ACTIVATIONS[activation].from_output


def gradient(grad: torch.Tensor, activation: str, *, pre: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of the pre-activation from ``grad`` of the output: torch's own backward of
    ``activation``, at ``out`` (relu, relu6) or ``pre`` (the others). Differentiable."""
    if activation == "none":
        return grad
    row = ACTIVATIONS[activation]
    return row.gradient(grad, out if row.from_output else pre)


def triton_expression(activation: str) -> str:
    """The Triton expression of ``activation`` over the accumulator ``acc`` ("acc" for none)."""
    return "acc" if activation == "none" else ACTIVATIONS[activation].triton


def of_module(module: nn.Module) -> Optional[str]:
    """The activation an nn module computes, or None for any other module (subclasses with their own
    forward included: only the exact types listed count)."""
    for row in _ROWS:
        for kind, attributes in row.modules:
            if type(module) is kind and all(getattr(module, name, None) == value
                                            for name, value in attributes.items()):
                return row.name
    return None


def of_function(target: object) -> Optional[str]:
    """The activation a traced graph's call target computes (gelu: "gelu"; its ``approximate`` argument is
    the caller's to read), or None."""
    for row in _ROWS:
        if target in row.functions:
            return row.name
    return None
