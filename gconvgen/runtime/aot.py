"""Ahead-of-time compilation for a GPU that is not present: Triton's interpreter accepts kernels that the
GPU compiler rejects, so this is how a CPU machine proves a rendered kernel builds for, say, sm_90."""
from __future__ import annotations

from ..ir import check
from ..plan import Plan
from .kernels import CompiledConv, KernelConfig, launch_meta

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def compile_kernel_for_gpu(kernel, meta: dict, dtype: str, *, pointer_dtypes: dict[str, str] | None = None,
                           capability: int = 90):
    """Compile a loaded gconvgen kernel (a @triton.jit function) to a cubin for NVIDIA compute capability
    ``capability``. ``meta`` is a KernelConfig's launch keywords (its BLOCK_* constexprs, num_warps and
    num_stages); every ``*_ptr`` argument points to ``dtype`` unless ``pointer_dtypes`` names another, and
    every other argument is a 32-bit int.

    Needs TRITON_INTERPRET unset (the interpreter has no compiler). Returns Triton's CompiledKernel, whose
    ``asm`` holds ttir, ttgir, llir, ptx and cubin; raises Triton's compilation error if the kernel is rejected.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    check(hasattr(kernel, "arg_names"),
          "compiling for a GPU needs TRITON_INTERPRET unset: the kernel was loaded for the interpreter", RuntimeError)
    pointer_dtypes = pointer_dtypes or {}
    constexprs = {name: meta[name] for name in kernel.arg_names if name in meta}
    signature = {name: "constexpr" if name in constexprs
                 else "*" + TRITON_TYPES[pointer_dtypes.get(name, dtype)] if name.endswith("_ptr") else "i32"
                 for name in kernel.arg_names}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]})


def compile_for_gpu(conv_plan: Plan, config: KernelConfig | None = None, *, capability: int = 90):
    """Render ``conv_plan``'s forward kernel for a GPU and compile it with ``config`` (default: the
    heuristic GPU config); see compile_kernel_for_gpu."""
    compiled = CompiledConv(conv_plan, f"cuda sm_{capability} ahead-of-time", allow_tf32=True, config=config)
    meta = launch_meta(conv_plan.spec, conv_plan.family, compiled.config)
    return compile_kernel_for_gpu(compiled.kernel, meta, conv_plan.spec.dtype, capability=capability)
