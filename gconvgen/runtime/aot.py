"""Ahead-of-time compilation for a GPU that is not present: Triton's interpreter accepts kernels that the
GPU compiler rejects, so this is how a CPU machine proves a rendered kernel builds for, say, sm_90."""
from __future__ import annotations

from ..ir import check
from ..lowering import KernelDesc
from .launch import kernel_of

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def pointer_dtypes(desc: KernelDesc) -> dict[str, str]:
    """The element type of each pointer argument of ``desc``'s kernel: the conv's dtype, except a split
    reduction's partials, which are kept in the accumulator's precision."""
    accumulator = "float64" if desc.dtype == "float64" else "float32"
    return {op.pointer: accumulator if op.name == "partials" else desc.dtype for op in desc.arguments.operands}


def compile_for_gpu(desc: KernelDesc, *, capability: int = 90):
    """Render ``desc``'s kernel and compile it to a cubin for NVIDIA compute capability ``capability`` with
    its config. Every integer argument is a plain 32-bit int here (no launch-time specialisation).

    Needs TRITON_INTERPRET unset (the interpreter has no compiler). Returns Triton's CompiledKernel, whose
    ``asm`` holds ttir, ttgir, llir, ptx and cubin; raises Triton's compilation error if the kernel is rejected.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    check(not desc.interpret, "compiling for a GPU needs a description lowered with interpret=False")
    kernel = kernel_of(desc, f"cuda sm_{capability} ahead-of-time")
    check(hasattr(kernel, "arg_names"),
          "compiling for a GPU needs TRITON_INTERPRET unset: the kernel was loaded for the interpreter", RuntimeError)
    meta = desc.meta
    constexprs = {name: meta[name] for name in kernel.arg_names if name in meta}
    pointers = pointer_dtypes(desc)
    signature = {name: "constexpr" if name in constexprs else "*" + TRITON_TYPES[pointers[name]] if name in pointers
                 else "i32" for name in kernel.arg_names}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]})
