"""``compile_layer``: plan, render and load one layer's kernel ahead of its first call, as a callable."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import knobs
from .conv2d import conv2d, resolve_padding
from ..ir import ConvSpec, check, fail
from ..compiler.lowering import DEFAULT, lowered_for
from ..compiler.plan import planned
from ..runtime.device import allows_tf32, device_target
from ..runtime.launch import kernel_of
from ..ops.dispatch import spec_for_call
from ..runtime.device import DTYPE_NAMES


class CompiledLayer:
    """A callable that holds the planned and compiled kernel of one spec on one device.

    Call it as ``layer(x, weight, bias=None)``, or ``layer(x)`` when it was compiled from a module.
    """

    def __init__(self, spec: ConvSpec, device: torch.device, module: Optional[nn.Conv2d] = None):
        self.spec = spec
        self.device = device
        self.module = module
        # CPU tensors run generated kernels only through Triton's interpreter; otherwise calls take the op's
        # aten fallback (said once, or refused under GCONVGEN_FALLBACK=error)
        runs_kernel = device.type != "cpu" or knobs.interpret()
        self.kernel = None
        if runs_kernel:
            target = device_target(device)
            # ahead of the first call the input size is not known (pixels None); the module serves every config
            self.desc = lowered_for(spec, "forward", spec.dtype, DEFAULT, target == "interpreter", allows_tf32(device),
                                    False, None)
            self.kernel = kernel_of(self.desc, target)

    def __call__(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conv of ``x`` [N, C, H, W] ([N, H, W, C] for a module with data_format='NHWC') with
        ``weight``/``bias`` (or the module's); every argument is checked as gconvgen.conv2d checks it, and
        tensors that make another spec are refused."""
        if weight is None:
            check(self.module is not None, "weight is required: this layer was compiled from a spec, not a module")
            weight, bias = self.module.weight, self.module.bias
        nhwc = getattr(self.module, "data_format", "NCHW") == "NHWC"
        check(isinstance(x, torch.Tensor) and x.dim() == 4,
              f"x must be a 4-D {'[N, H, W, C]' if nhwc else '[N, C, H, W]'} tensor", TypeError)
        x = x.permute(0, 3, 1, 2) if nhwc else x  # NCHW-indexed view, as the module's forward takes it
        check(_same_device(x.device, self.device),
              f"x is on {x.device} but the layer was compiled for {self.device}; move it with .to('{self.device}')")
        if isinstance(weight, torch.Tensor) and x.dtype in DTYPE_NAMES and weight.dim() == 4:
            actual = spec_for_call(x, weight, bias, self.spec.stride, self.spec.padding, self.spec.dilation,
                                   self.spec.groups, self.spec.channel_policy)
            check(actual == self.spec, f"these tensors make {actual}, but the layer was compiled for {self.spec}; "
                                       f"call gconvgen.compile_layer again for them")
        out = conv2d(x, weight, bias, self.spec.stride, self.spec.padding, self.spec.dilation, self.spec.groups,
                     channel_policy=self.spec.channel_policy)
        return out.permute(0, 2, 3, 1) if nhwc else out


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    """``cuda`` means the current CUDA device: compare ``cuda`` and ``cuda:0`` by their index."""
    if actual.type != wanted.type:
        return False
    if actual.type != "cuda" or actual.index == wanted.index:
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (actual.index if actual.index is not None else current) == (wanted.index if wanted.index is not None
                                                                         else current)


def compile_layer(spec_or_conv: Union[ConvSpec, nn.Conv2d], *, device: Union[str, torch.device, None] = None,
                  layout: Optional[str] = None) -> CompiledLayer:
    """Plan, render and load the kernel for a ConvSpec or an nn.Conv2d now, and return it as a callable.

    ``device`` defaults to the module's device, else CUDA when present, else the CPU (Triton's interpreter).
    ``layout`` is a module's activation memory order, "nhwc" for a GroupedConv2d with data_format='NHWC'
    and "nchw" otherwise unless given. Padding given as a word ('same') is resolved per input size and
    cannot be compiled ahead; use ints.
    """
    module = None
    if isinstance(spec_or_conv, nn.Conv2d):
        module = spec_or_conv
        check(not isinstance(module.padding, str),
              f"padding={module.padding!r} depends on the input size; give the module integer padding")
        check(module.padding_mode == "zeros", f"padding_mode={module.padding_mode!r} is not supported; use 'zeros'")
        layout = layout or ("nhwc" if getattr(module, "data_format", "NCHW") == "NHWC" else "nchw")
        spec = ConvSpec(module.in_channels, module.out_channels, module.groups, tuple(module.kernel_size),
                        tuple(module.stride), resolve_padding(module.padding, (1, 1), (1, 1), (1, 1), (1, 1)),
                        tuple(module.dilation), module.bias is not None, DTYPE_NAMES[module.weight.dtype], layout,
                        getattr(module, "channel_policy", "strict"))
        device = device or module.weight.device
    elif isinstance(spec_or_conv, ConvSpec):
        spec = spec_or_conv
    else:
        fail(f"spec_or_conv must be a gconvgen.ConvSpec or an nn.Conv2d, got {type(spec_or_conv).__name__}", TypeError)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    planned(spec, knobs.padding_budget())
    return CompiledLayer(spec, device, module)
