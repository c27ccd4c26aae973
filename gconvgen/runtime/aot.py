"""Ahead-of-time compilation for a GPU that is not present: Triton's interpreter accepts kernels that the
GPU compiler rejects, so this is how a CPU machine proves a rendered kernel builds for, say, sm_90."""
from __future__ import annotations

from ..ir import check
from ..plan import Plan
from .kernels import CompiledConv, KernelConfig, default_config

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def compile_for_gpu(conv_plan: Plan, config: KernelConfig | None = None, *, capability: int = 90):
    """Compile ``conv_plan``'s kernel to a cubin for NVIDIA compute capability ``capability``.

    Needs TRITON_INTERPRET unset (the interpreter has no compiler). Returns Triton's CompiledKernel, whose
    ``asm`` holds ttir, ttgir, llir, ptx and cubin; raises Triton's compilation error if the kernel is rejected.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = CompiledConv(conv_plan, f"cuda sm_{capability} ahead-of-time", allow_tf32=True, config=config)
    check(hasattr(compiled.kernel, "arg_names"),
          "compile_for_gpu needs TRITON_INTERPRET unset: the kernel was loaded for the interpreter", RuntimeError)
    config = config or default_config(conv_plan.spec, conv_plan.family, interpret=False)
    meta = config.meta(conv_plan.family)
    pointer = "*" + TRITON_TYPES[conv_plan.spec.dtype]
    signature = {name: ("constexpr" if name in meta else pointer if name.endswith("_ptr") else "i32")
                 for name in compiled.kernel.arg_names}
    constexprs = {name: meta[name] for name in compiled.kernel.arg_names if name in meta}
    source = ASTSource(fn=compiled.kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
