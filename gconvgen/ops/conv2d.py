"""The torch custom op ``gconvgen::conv2d``: the one door from torch into a compiled kernel.

CUDA tensors run the Triton kernel. CPU tensors run the same kernel through Triton's interpreter when
TRITON_INTERPRET=1; otherwise the exact aten form of the same plan, said once (or refused when
GCONVGEN_FALLBACK=error). Meta tensors get the output's shape and nothing else.

The op works under torch.func: ``register_autograd`` gives it (and the gradient ops) an autograd kernel
that torch.func.grad, vjp and jacrev accept, and the batching rule below runs it under torch.vmap.
"""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad
from torch.autograd.function import _SingleLevelFunction
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..memo import memoized
from .. import knobs
from ..ir import ConvSpec, conv_output_size
from ..compiler.lowering import ATEN
from ..compiler.plan import planned
from ..runtime import launch
from ..runtime.choices import choice_for
from ..runtime.fallback import aten_conv2d

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def activation_layout(x: torch.Tensor) -> str:
    """Memory order of an NCHW-indexed activation: 'nhwc' (channels contiguous), 'nchw' or 'strided'.
    A dimension of size 1 has no meaningful stride, so it counts as contiguous."""
    channels_unit = x.stride(1) == 1 or x.shape[1] == 1
    width_unit = x.stride(3) == 1 or x.shape[3] == 1
    if channels_unit and (not width_unit or _channels_last_contiguous(x)):
        return "nhwc"
    return "nchw" if width_unit else "strided"


def _channels_last_contiguous(x: torch.Tensor) -> bool:
    """``x.is_contiguous(memory_format=torch.channels_last)``, which a tensor seen inside torch.vmap cannot
    answer; there the batching rule runs the op on the physical tensor, so its layout is decided there."""
    return not torch._C._functorch.is_batchedtensor(x) and x.is_contiguous(memory_format=torch.channels_last)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last in gives channels_last out, as F.conv2d does."""
    return torch.channels_last if activation_layout(x) == "nhwc" and not x.is_contiguous() else torch.contiguous_format


@memoized(4096)
def spec_of(in_channels: int, out_channels: int, groups: int, kernel_size: tuple[int, int],
            stride: tuple[int, int], padding: tuple[int, int, int, int], dilation: tuple[int, int],
            bias: bool, dtype: str, layout: str, channel_policy: str) -> ConvSpec:
    """ConvSpec construction memoised on its fields: built on every call, validated once."""
    return ConvSpec(in_channels, out_channels, groups, kernel_size, stride, padding, dilation, bias, dtype,
                    layout, channel_policy)


def spec_for_call(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> ConvSpec:
    """The spec of a call on NCHW-indexed x and OIHW weight: channels, kernel, dtype and x's memory layout."""
    return spec_of(x.shape[1], weight.shape[0], groups, (weight.shape[2], weight.shape[3]), tuple(stride),
                   tuple(padding), tuple(dilation), bias is not None, DTYPE_NAMES[x.dtype], activation_layout(x),
                   channel_policy)


@memoized()
def _say_fallback_once(reason: str) -> None:
    warnings.warn(f"gconvgen: {reason}; running the exact aten fallback instead of the generated kernel "
                  f"(set TRITON_INTERPRET=1 to run the kernel on CPU, GCONVGEN_FALLBACK=error to refuse)",
                  stacklevel=3)


def _fallback(reason: str) -> None:
    if knobs.fallback_mode() == "error":
        raise RuntimeError(f"gconvgen: {reason} and GCONVGEN_FALLBACK=error forbids the aten fallback")
    _say_fallback_once(reason)


def _allocate_output(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> torch.Tensor:
    out_height = conv_output_size(x.shape[2], weight.shape[2], stride[0], dilation[0], padding[0], padding[1])
    out_width = conv_output_size(x.shape[3], weight.shape[3], stride[1], dilation[1], padding[2], padding[3])
    shape = (x.shape[0], weight.shape[0], out_height, out_width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def run_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """Grouped conv2d on NCHW-indexed x [N, C_in, H, W] (any strides) and weight [C_out, ci, kh, kw];
    padding is four sides (top, bottom, left, right). Inputs are validated by gconvgen.conv2d. This is the
    implementation of the custom op gconvgen::conv2d (``conv2d_op``); call ``conv2d``, which picks."""
    spec = spec_for_call(x, weight, bias, stride, padding, dilation, groups, channel_policy)
    if x.device.type == "cpu" and not knobs.interpret():
        conv_plan = planned(spec, knobs.padding_budget())
        _fallback("CPU tensors and TRITON_INTERPRET is not set")
        return aten_conv2d(conv_plan.spec, x, weight, bias).contiguous(memory_format=output_memory_format(x))
    out = _allocate_output(x, weight, stride, padding, dilation)
    if out.numel() == 0 or out.is_meta:  # an empty batch, or meta tensors (shapes only): nothing to compute
        return out
    choice = choice_for(spec, "forward", x.device, x.shape[0], x.shape[2], x.shape[3])
    if choice.kind == ATEN:  # tuning found aten faster for this layer
        result = aten_conv2d(spec, x, weight, bias)
        return result if result.stride() == out.stride() else out.copy_(result)
    return launch.forward(spec, x, weight, bias, out, choice)


conv2d_op = torch.library.custom_op("gconvgen::conv2d", run_conv2d, mutates_args=())


def call(op: Callable[..., torch.Tensor], implementation: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``op(*args)``, or its ``implementation(*args)`` directly where nothing could tell the two apart: plain
    tensors (or parameters) that need no gradient, outside torch.compile and any dispatch mode. The
    dispatcher's Python overhead, tens of microseconds per call, would otherwise outweigh small layers."""
    if unobserved([arg for arg in args if isinstance(arg, torch.Tensor)]):
        return implementation(*args)
    return op(*args)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, channel_policy: str) -> torch.Tensor:
    """gconvgen::conv2d (see ``call``): what gconvgen.conv2d runs once its arguments are checked."""
    return call(conv2d_op, run_conv2d, x, weight, bias, stride, padding, dilation, groups, channel_policy)


def unobserved(tensors: list[torch.Tensor]) -> bool:
    """Whether calling an op's implementation directly is indistinguishable from calling the op. Under a
    torch.func transform the tensors look plain (their type is torch.Tensor) but are functorch's wrappers,
    which only the dispatcher can unwrap; inside torch.autograd.forward_ad.dual_level, a tensor may carry a
    tangent that only the op's autograd kernel carries forward."""
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0):
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad) for t in tensors)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


@conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, channel_policy):
    return _allocate_output(x, weight, stride, padding, dilation)


# ---------------------------------------------------------------------------------------------- torch.func


def register_autograd(op, backward: Callable, setup_context: Callable,
                      jvp: Callable[[tuple, tuple, torch.Tensor], torch.Tensor]) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, with an autograd kernel that
    torch.func's transforms accept, and forward-mode AD: ``jvp(inputs, tangents, output)`` gives the output's
    tangent from the op's arguments and their tangents (None where an argument has none), for
    torch.autograd.forward_ad and torch.func.jvp / jacfwd / hessian.

    torch's own kernel (torch/_library/autograd.py, up to at least 2.13; pytorch#170834) wraps the formula
    in an autograd.Function whose forward takes ctx, and ``Function.apply`` refuses such a Function under
    torch.func.grad, vjp or jacrev ("must override the setup_context staticmethod"). This kernel records
    the node as an aten op's autograd kernel does, and as functorch records its own per-level nodes: a
    ``_SingleLevelFunction`` at the current level, whose forward redispatches below autograd, where
    functorch hands the call on to the next level. Eager autograd and torch.compile see the same formula.
    """
    op.register_autograd(backward, setup_context=setup_context)
    overload = op._opoverload

    def redispatch(keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def forward(*args):  # the op's arguments, then the dispatch keyset
        # apply() turned gradients off for the forward; the levels below this one (an outer torch.func
        # transform) must still record it, as they do for an aten op: turn them back on
        with torch.enable_grad(), torch.autograd.forward_ad._set_fwd_grad_enabled(True):
            return redispatch(args[-1], *args[:-1])

    forward_mode = threading.local()  # whether the node being applied has tangents to carry forward

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs[:-1], output)
        if getattr(forward_mode, "active", False):  # for jvp_of_node: a backward-only node holds nothing more
            ctx.jvp_inputs, ctx.jvp_output = inputs[:-1], output

    def jvp_of_node(ctx, *tangents):
        inputs, output = ctx.jvp_inputs, ctx.jvp_output
        del ctx.jvp_inputs, ctx.jvp_output
        tangent = jvp(inputs, tangents[:-1], output)
        return torch.zeros_like(output) if tangent is None else tangent

    def backward_of_node(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[:-1]  # the formula sees the op's arguments only
        try:
            grad_inputs = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs_input_grad
        return (*grad_inputs, None) if isinstance(grad_inputs, tuple) else (grad_inputs, None)

    # its grad_fn reads e.g. "GconvgenConv2dBackward"
    name = "Gconvgen" + "".join(word.capitalize() for word in op._name.split("_"))
    node = type(name, (_SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward_of_node), "jvp": staticmethod(jvp_of_node)})

    def apply(*args):
        forward_mode.active = _has_tangent(args)
        try:
            return node.apply(*args)
        finally:
            forward_mode.active = False

    def autograd_kernel(keyset, *args):
        if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) and not _has_tangent(args):
            return redispatch(keyset, *args)
        if torch._C._are_functorch_transforms_active():
            with enable_single_level_autograd_function():
                return apply(*args, keyset)
        return apply(*args, keyset)

    with warnings.catch_warnings():  # replacing torch's kernel is the point; the dispatcher says so once
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        op._lib.impl(op._name, autograd_kernel, "Autograd", with_keyset=True)


def _has_tangent(args: tuple) -> bool:
    """Whether a tensor in ``args`` carries a forward-mode tangent at the current level."""
    return any(isinstance(arg, torch.Tensor) and forward_ad.unpack_dual(arg).tangent is not None for arg in args)


def bilinear_tangent(apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], first: torch.Tensor,
                     second: torch.Tensor, first_tangent: Optional[torch.Tensor], second_tangent: Optional[torch.Tensor],
                     *more: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tangent of ``apply(first, second)``, an op linear in each argument: apply(first's tangent, second)
    + apply(first, second's tangent), plus the tangents ``more`` of terms added to it; None where no
    argument has a tangent."""
    present = [term for term in (None if first_tangent is None else apply(first_tangent, second),
                                 None if second_tangent is None else apply(first, second_tangent), *more)
               if term is not None]
    return functools.reduce(torch.add, present) if present else None


def vmap_by_loop(run: Callable[..., torch.Tensor], info, in_dims: tuple, *args) -> tuple[torch.Tensor, int]:
    """A batching rule that runs ``run`` once per index of the mapped dimension and stacks the results:
    for the cases a rule cannot fold into one call."""
    outputs = [run(*(arg if dim is None else arg.select(dim, index) for arg, dim in zip(args, in_dims)))
               for index in range(info.batch_size)]
    return torch.stack(outputs), 0


def folds_into_groups(in_channels: int, out_channels: int, groups: int, channel_policy: str) -> bool:
    """Whether B convs with different weights are one conv with B * groups groups over the B inputs laid
    side by side in channels. Not with channel_policy='pad' over channels the groups do not divide: the
    padding of one conv's last group would be read as the next conv's first channels."""
    return channel_policy == "strict" or (in_channels % groups == 0 and out_channels % groups == 0)


def batch_first(tensor: Optional[torch.Tensor], dim: Optional[int]) -> Optional[torch.Tensor]:
    """``tensor`` with its mapped dimension ``dim`` moved to the front (as it is when ``dim`` is None)."""
    return tensor if tensor is None or dim is None else tensor.movedim(dim, 0)


def channels_side_by_side(tensor: Optional[torch.Tensor], mapped: bool, batch_size: int,
                          channel_dim: int = 1) -> Optional[torch.Tensor]:
    """The leading mapped dimension of ``tensor`` folded into its channels (``channel_dim`` of one batch
    member), member b's channels at [b*C, (b+1)*C); an unmapped tensor is repeated ``batch_size`` times."""
    if tensor is None:
        return None
    if not mapped:
        return tensor.repeat(*(batch_size if index == channel_dim else 1 for index in range(tensor.dim())))
    return tensor.movedim(0, channel_dim).flatten(channel_dim, channel_dim + 1)


@conv2d_op.register_vmap
def _conv2d_vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups, channel_policy):
    """torch.vmap of gconvgen::conv2d. A mapped x alone is more batch; a mapped weight or bias makes the
    B convs one conv with B * groups groups (see folds_into_groups), else one conv per index."""
    x_dim, weight_dim, bias_dim = in_dims[:3]
    conv = (stride, padding, dilation, groups, channel_policy)
    batch_size = info.batch_size
    x, weight, bias = batch_first(x, x_dim), batch_first(weight, weight_dim), batch_first(bias, bias_dim)
    if weight_dim is None and bias_dim is None:
        out = conv2d(x.flatten(0, 1), weight, bias, *conv)
        return out.unflatten(0, (batch_size, x.shape[1])), 0
    in_channels = x.shape[-3]
    out_channels = weight.shape[-4]
    if not folds_into_groups(in_channels, out_channels, groups, channel_policy):
        dims = tuple(None if dim is None else 0 for dim in in_dims[:3])
        return vmap_by_loop(lambda *tensors: conv2d(*tensors, *conv), info, dims, x, weight, bias)
    out = conv2d(channels_side_by_side(x, x_dim is not None, batch_size),
                 channels_side_by_side(weight, weight_dim is not None, batch_size, channel_dim=0),
                 channels_side_by_side(bias, bias_dim is not None, batch_size, channel_dim=0),
                 stride, padding, dilation, groups * batch_size, channel_policy)
    return out.unflatten(1, (batch_size, out_channels)), 1


