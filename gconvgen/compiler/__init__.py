"""The compiler: one conv from its spec to Triton source.

plan (checks, pass graph) -> families (what each kernel family accepts, its tiles and grid) -> lowering
(a KernelDesc: every value a template reads) -> codegen (Jinja -> Triton source). Nothing here runs a kernel.
"""
