"""What the runtime needs to know about a device: which compiled target it is, whether float32 convs may
use TF32 there, how many programs fill it, and how to launch on it."""
from __future__ import annotations

import contextlib

import torch

from ..memo import memoized
from .. import knobs
from ..ir import check

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _index_scalars_of_any_shape() -> None:
    """Let the interpreter of Triton before 3.9 take a kernel's scalars as Python ints under numpy 2.4 and later.
    Its scalars are one-element arrays, which its ``tensor.__index__`` (``range`` bounds, e.g. a split
    reduction's ``range(first, end, BLOCK)``) passes to ``int()``: numpy 2.4 refuses arrays of one or more
    dimensions there. Triton 3.9 squeezes them first; this gives the older interpreters the same, once a
    process, by wrapping the function that patches ``tl.tensor`` for an interpreted run."""
    import triton
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if patch_tensor is None or version >= (3, 9) or getattr(patch_tensor, "squeezes_scalars", False):
        return

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_scalars = True
    interpreter._patch_lang_tensor = patched


@memoized()
def device_target(device: torch.device) -> str:
    """What a compiled kernel is specific to: 'interpreter', or the GPU's name and capability."""
    if device.type == "cpu":
        import triton
        import triton.language as tl
        check(knobs.interpret(), "gconvgen runs its kernels on CPU tensors only through Triton's interpreter: set "
                                 "TRITON_INTERPRET=1 before importing gconvgen (without it, gconvgen.conv2d runs "
                                 "the aten fallback)", RuntimeError)
        check(not isinstance(tl.zeros, triton.JITFunction),
              "TRITON_INTERPRET=1 was set after Triton was imported, so Triton's own functions cannot run in its "
              "interpreter; set TRITON_INTERPRET=1 before importing gconvgen or triton", RuntimeError)
        _index_scalars_of_any_shape()
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def allows_tf32(device: torch.device) -> bool:
    """Whether float32 convs on ``device`` may use TF32, as torch decides it for its own (cuDNN) convs.

    torch >= 2.9 says it with ``fp32_precision`` ('tf32', 'ieee' or 'none' = ask the next level):
    ``torch.backends.cudnn.conv``, then ``torch.backends.cudnn``, then ``torch.backends``. Older torch has
    only ``torch.backends.cudnn.allow_tf32``, whose getter newer torch refuses once the new settings are
    used. Never TF32 off CUDA.
    """
    if device.type != "cuda":
        return False
    cudnn = torch.backends.cudnn
    for owner in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        precision = getattr(owner, "fp32_precision", None)
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:  # the new settings are mixed in a way the old getter refuses: exact is the safe side
        return False


@memoized()
def target_programs(device: torch.device) -> int:
    """Programs a split reduction aims for: a few waves of the GPU's SMs; one under the interpreter, where
    every program costs milliseconds."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (a no-op on the CPU, and when it
    already is)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
