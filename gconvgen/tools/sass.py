"""What the sm_90 compiler emits for a kernel, measured on a machine without a GPU.

compile_like_launch compiles a @triton.jit kernel exactly as Triton's launcher would specialise it for given
argument values (ints equal to 1 become constants, ints divisible by 16 and 16-byte aligned pointers get the
divisibility hint, large ints are i64), by running Triton's own binder rather than a copy of its rules.
figures() and sass() read the cubin with the cuobjdump that ships in Triton's wheel: registers, spills,
shared memory, tensor-core instructions, load widths, asynchronous copies, the innermost loop's length and the
multiply-adds a warp issues. occupancy() says how many programs of such a kernel fit one sm_90 SM at once.

Works on Triton 3.6 and 3.9; everything here runs on the CPU (Triton's compiler needs no driver).
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import triton
from triton import knobs as triton_knobs
from triton._utils import type_canonicalisation_dict
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit

from ..ir import check

# Torch allocations start on 256-byte boundaries; any multiple of 16 earns Triton's alignment hint.
ALIGNED_ADDRESS = 256
UNALIGNED_ADDRESS = ALIGNED_ADDRESS + 4


@dataclass(frozen=True)
class Pointer:
    """A tensor argument as Triton's launcher sees it: the element dtype ("fp32", "fp16", "bf16", "fp64",
    "i64", ... or torch's names "float32", "bfloat16", ...) and whether its address is 16-byte aligned
    (torch's allocations are; a view sliced at an odd offset may not be)."""

    dtype: str
    aligned: bool = True

    def data_ptr(self) -> int:
        """The address Triton's specialisation reads: only its alignment matters."""
        return ALIGNED_ADDRESS if self.aligned else UNALIGNED_ADDRESS


def compile_like_launch(kernel, arguments: dict[str, object], constexprs: dict[str, object], *, num_warps: int,
                        num_stages: int, capability: int = 90):
    """Compile ``kernel`` for NVIDIA compute capability ``capability`` as a launch with these arguments would.

    ``kernel`` is a @triton.jit function, loaded with TRITON_INTERPRET unset. ``arguments`` maps every
    non-constexpr parameter to a Pointer or to the int (float, bool) value it has at launch; ``constexprs``
    maps the constexpr parameters (those with defaults may be left out). Specialisation is Triton's own:
    the binder that JITFunction.run builds (triton.runtime.jit.create_function_from_signature, which calls
    native_specialize_impl) and JITFunction._pack_args, the same on Triton 3.6 and 3.9, so an int equal to
    1 becomes a constant, one divisible by 16 and an aligned pointer get tt.divisibility=16, and an int
    beyond 32 bits is i64.

    Returns Triton's CompiledKernel (``asm`` holds ttir, ttgir, llir, ptx and cubin). Raises TypeError for
    an interpreted kernel, ValueError for a missing or unknown argument, and Triton's compilation error if
    the kernel is rejected.
    """
    check(isinstance(kernel, jit.JITFunction),
          f"compile_like_launch needs a @triton.jit function compiled for a GPU, not {type(kernel).__name__}: "
          "load the kernel with TRITON_INTERPRET unset", TypeError)
    _check_arguments(kernel, arguments, constexprs)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    # the option keywords JITFunction.run adds before binding (fpsan_homomorphic_casts exists from 3.9 on)
    options = {"num_warps": num_warps, "num_stages": num_stages,
               "debug": kernel.debug or triton_knobs.runtime.debug}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(triton_knobs.compilation, name):
            options[name] = getattr(triton_knobs.compilation, name)
    launch_keywords = {**arguments, **constexprs, **options}
    bound_args, specialization, bound_options = binder(**launch_keywords)
    parsed_options, signature, constants, attrs = kernel._pack_args(backend, launch_keywords, bound_args,
                                                                    specialization, bound_options)
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=target,
                          options=parsed_options.__dict__)


def _check_arguments(kernel, arguments: dict[str, object], constexprs: dict[str, object]) -> None:
    """Name what is missing, unknown or mistyped before Triton's binder fails with a bare TypeError."""
    runtime_names = [param.name for param in kernel.params if not param.is_constexpr]
    constexpr_names = [param.name for param in kernel.params if param.is_constexpr]
    missing = [name for name in runtime_names if name not in arguments]
    check(not missing, f"{kernel.__name__}: no launch value for {missing}")
    unknown = sorted(set(arguments) - set(runtime_names))
    check(not unknown, f"{kernel.__name__}: {unknown} are not runtime parameters (constexprs: {constexpr_names})")
    unknown = sorted(set(constexprs) - set(constexpr_names))
    check(not unknown, f"{kernel.__name__}: {unknown} are not constexpr parameters (runtime: {runtime_names})")
    missing = [param.name for param in kernel.params
               if param.is_constexpr and param.name not in constexprs and not param.has_default]
    check(not missing, f"{kernel.__name__}: no value for constexpr {missing}")
    for name, value in arguments.items():
        check(isinstance(value, (Pointer, int, float)),
              f"{kernel.__name__}: {name}={value!r} must be a Pointer or a number", TypeError)
        check(not isinstance(value, Pointer) or value.dtype in type_canonicalisation_dict,
              f"{kernel.__name__}: {name} points to unknown dtype {getattr(value, 'dtype', '')!r}")


@dataclass(frozen=True)
class KernelFigures:
    """What the compiler emitted for one kernel. Widths are in bits; counts are static SASS instructions.

    registers, stack_bytes: per thread, from the cubin. spill_bytes: spill stores + spill loads as ptxas
    reports them. shared_memory_bytes: the dynamic shared memory the launch requests (Triton's
    metadata.shared; sm_90 reserves 1 KiB more per block). tensor_core: "wgmma" (HGMMA and kin), "mma.sync"
    (HMMA, DMMA, IMMA) or "none". async_copies: "cp.async" (LDGSTS), "tma" (UTMALDG), "tma_store"
    (UTMASTG); cp_async_widths: bits -> count of the LDGSTS instructions. The innermost loop is the largest
    loop that holds no other (inner_loop_instructions is 0 for straight-line code); loops counts every
    backward branch's loop. sass_instructions counts the whole listing, body_instructions the same without
    the padding after the last EXIT (what a warp can run). products and inner_loop_products: multiply-adds
    one warp issues in the whole listing and in one pass of the innermost loop (multiply_adds).
    """

    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_memory_bytes: int
    num_warps: int
    num_stages: int
    tensor_core: str
    global_load_widths: dict
    async_copies: dict
    inner_loop_instructions: int
    global_store_widths: dict
    shared_store_widths: dict
    shared_load_widths: dict
    ldmatrix: int
    inner_loop_imad_hi: int
    loops: int
    sass_instructions: int
    cp_async_widths: dict
    body_instructions: int
    products: int
    inner_loop_products: int


def figures(compiled) -> KernelFigures:
    """Measure a CompiledKernel for an NVIDIA GPU (from compile_like_launch or triton.compile).

    Registers and stack come from the cubin itself (``cuobjdump -res-usage``: what the driver will read).
    Spills come from the ptxas log, which Triton discards, so ptxas runs again through the backend's own
    make_cubin: the same binary and flags as the compile (Triton 3.9 runs ptxas-blackwell with
    --regAllocOptLevel=2 on sm_90, 3.6 plain ptxas; a hand-written ``ptxas -v`` would drift from either). The
    log is used only if its registers and stack match the cubin's, so it describes this allocation.

    Costs one more ptxas run (as long as the compile's last step). Raises ValueError for a kernel without a
    cubin, RuntimeError if the tools fail or disagree.
    """
    check("cubin" in compiled.asm, f"{compiled.name} has no cubin: figures() needs a kernel compiled for NVIDIA")
    usage = _resource_usage(compiled.asm["cubin"])
    ptxas_log = _ptxas_log(compiled)
    check(ptxas_log["registers"] == usage["REG"] and ptxas_log["stack"] == usage["STACK"],
          f"{compiled.name}: ptxas re-run reports {ptxas_log} but the cubin holds {usage}; the compile options "
          "changed since the kernel was built", RuntimeError)
    instructions = parse_sass(sass(compiled))
    opcodes = [opcode for _, opcode, _ in instructions]
    loop = innermost_loop(instructions)
    loop_opcodes = [opcode for address, opcode, _ in instructions if loop and loop[0] <= address <= loop[1]]
    return KernelFigures(
        registers=usage["REG"],
        spill_bytes=ptxas_log["spill_stores"] + ptxas_log["spill_loads"],
        stack_bytes=usage["STACK"],
        shared_memory_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        tensor_core=tensor_core(opcodes),
        global_load_widths=access_widths(opcodes, "LDG"),
        async_copies={name: sum(op.split(".")[0] == sass_name for op in opcodes)
                      for name, sass_name in ASYNC_COPIES.items()},
        inner_loop_instructions=len(loop_opcodes),
        global_store_widths=access_widths(opcodes, "STG"),
        shared_store_widths=access_widths(opcodes, "STS"),
        shared_load_widths=access_widths(opcodes, "LDS"),
        ldmatrix=sum(op.split(".")[0] == "LDSM" for op in opcodes),
        inner_loop_imad_hi=sum(op.startswith("IMAD.HI") for op in loop_opcodes),
        loops=len(loops(instructions)),
        sass_instructions=len(opcodes),
        cp_async_widths=access_widths(opcodes, "LDGSTS"),
        body_instructions=body_length(instructions),
        products=sum(map(multiply_adds, opcodes)),
        inner_loop_products=sum(map(multiply_adds, loop_opcodes)),
    )


def sass(compiled) -> str:
    """The SASS of a CompiledKernel for an NVIDIA GPU: ``cuobjdump -sass`` (from Triton's wheel) on its cubin."""
    check("cubin" in compiled.asm, f"{compiled.name} has no cubin: sass() needs a kernel compiled for NVIDIA")
    return _cuobjdump("-sass", compiled.asm["cubin"])


def tool_path(name: str) -> Path:
    """A CUDA tool shipped inside Triton's wheel (ptxas, cuobjdump, nvdisasm); never a system CUDA."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    check(path.is_file(), f"Triton's wheel has no {path}", RuntimeError)
    return path


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.TemporaryDirectory(prefix="gconvgen-sass-") as folder:
        cubin_path = Path(folder) / "kernel.cubin"
        cubin_path.write_bytes(cubin)
        run = subprocess.run([str(tool_path("cuobjdump")), flag, str(cubin_path)], capture_output=True, text=True)
    check(run.returncode == 0, f"cuobjdump {flag} failed: {run.stderr.strip()}", RuntimeError)
    return run.stdout


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """The kernel's line of ``cuobjdump -res-usage``: {"REG": ..., "STACK": ..., "SHARED": ..., "LOCAL": ...}."""
    report = _cuobjdump("-res-usage", cubin)
    match = re.search(r"Function [^:\n]+:\s*\n\s*(REG:\d+.*)", report)
    check(match is not None, f"cuobjdump -res-usage printed no function:\n{report}", RuntimeError)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", match.group(1))}


def _ptxas_log(compiled) -> dict[str, int]:
    """Run the backend's make_cubin on the kernel's PTX with Triton's ptxas-log knob on, and read the log."""
    backend = make_backend(compiled.metadata.target)
    # make_cubin reads the compile options by attribute; the metadata carries all of them
    options = types.SimpleNamespace(**compiled.metadata._asdict())
    printed = io.StringIO()
    with triton_knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
        triton_knobs.nvidia.dump_ptxas_log = True
        backend.make_cubin(compiled.asm["ptx"], {}, options, compiled.metadata.target.arch)
    log = printed.getvalue()
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    check(frame is not None and registers is not None, f"ptxas printed no resource report:\n{log}", RuntimeError)
    stack, spill_stores, spill_loads = (int(value) for value in frame.groups())
    return {"registers": int(registers.group(1)), "stack": stack, "spill_stores": spill_stores,
            "spill_loads": spill_loads}


# SASS opcodes of the tensor-core instruction families: warpgroup (sm_90 wgmma) and warp-level (mma.sync)
WGMMA_OPCODES = ("HGMMA", "IGMMA", "QGMMA", "BGMMA")
MMA_SYNC_OPCODES = ("HMMA", "IMMA", "DMMA", "BMMA")
ASYNC_COPIES = {"cp.async": "LDGSTS", "tma": "UTMALDG", "tma_store": "UTMASTG"}
# width modifiers of a memory access; an access without one moves 32 bits
WIDTH_MODIFIERS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every instruction in cuobjdump's SASS listing."""
    return [(int(match.group(1), 16), match.group(2), match.group(3).strip())
            for match in map(INSTRUCTION.match, text.splitlines()) if match]


def tensor_core(opcodes: list[str]) -> str:
    """"wgmma" if only warpgroup MMAs are emitted, "mma.sync" if only warp MMAs are, "wgmma+mma.sync" if both
    are (a kernel with dots of both shapes), else "none"."""
    names = {opcode.split(".")[0] for opcode in opcodes}
    units = [unit for unit, unit_opcodes in (("wgmma", WGMMA_OPCODES), ("mma.sync", MMA_SYNC_OPCODES))
             if names & set(unit_opcodes)]
    return "+".join(units) or "none"


def access_widths(opcodes: list[str], name: str) -> dict[int, int]:
    """bits -> count of the ``name`` instructions (LDG, STG, LDS, STS, LDGSTS), e.g. LDG.E.128 is 128 bits."""
    widths = Counter()
    for opcode in opcodes:
        base, *modifiers = opcode.split(".")
        if base == name:
            widths[next((WIDTH_MODIFIERS[m] for m in modifiers if m in WIDTH_MODIFIERS), 32)] += 1
    return dict(sorted(widths.items()))


def loops(instructions: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) address of every loop: each backward branch closes one. The branch to itself that
    follows EXIT is padding, not a loop."""
    found = []
    for address, opcode, operands in instructions:
        target = _branch_target(opcode, operands)
        if target is not None and target < address:
            found.append((target, address))
    return found


def _branch_target(opcode: str, operands: str) -> int | None:
    """A BRA's target address (its last operand: BRA 0x130, BRA.DIV UR4, 0x130); None for anything else."""
    target = re.search(r"(0x[0-9a-f]+)\W*$", operands)
    return int(target.group(1), 16) if opcode.split(".")[0] == "BRA" and target else None


def innermost_loop(instructions: list[tuple[int, str, str]]) -> tuple[int, int] | None:
    """The largest loop that contains no other, or None for straight-line code."""
    all_loops = loops(instructions)
    innermost = [outer for outer in all_loops
                 if not any(inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1] for inner in all_loops)]
    return max(innermost, key=lambda span: span[1] - span[0], default=None)


def body_length(instructions: list[tuple[int, str, str]]) -> int:
    """Instructions a warp can run: the listing without the padding after the last EXIT (the branch to itself
    and the NOPs that align the end of the function)."""
    end = len(instructions)
    while end and (instructions[end - 1][1] == "NOP"
                   or _branch_target(*instructions[end - 1][1:]) == instructions[end - 1][0]):
        end -= 1
    return end


# multiply-adds one warp's issue of an instruction performs, by opcode: fp32 and fp64 FMA and multiply on the
# CUDA cores, one a lane (HFMA2.MMA is left out: ptxas uses it as a move); tensor-core shapes are read from the
# opcode: HMMA.16816 is m16 n8 k16 for the warp, HGMMA.64x64x16 is 64 x 64 x 16 for its warpgroup of 4 warps
LANE_PRODUCTS = {"FFMA": 32, "FMUL": 32, "DFMA": 32, "DMUL": 32}
WARP_MMA_SHAPE = re.compile(r"^(?:HMMA|DMMA)\.(16|8)(8)(\d+)\b")
WARPGROUP_MMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\b")


def multiply_adds(opcode: str) -> int:
    """Multiply-adds (products) of one warp's issue of ``opcode``: 32 for FFMA, FMUL, DFMA, DMUL; m x n x k
    for a warp MMA (HMMA.16816: 2048); m x n x k / 4 for a warpgroup MMA, whose 4 warps each issue it
    (HGMMA.64x64x16: 16384); 0 for anything else."""
    if opcode.split(".")[0] in LANE_PRODUCTS:
        return LANE_PRODUCTS[opcode.split(".")[0]]
    for shape, share in ((WARP_MMA_SHAPE, 1), (WARPGROUP_MMA_SHAPE, 4)):
        match = shape.match(opcode)
        if match:
            m, n, k = (int(side) for side in match.groups())
            return m * n * k // share
    return 0


# ---------------------------------------------------------------------------------------------- occupancy


@dataclass(frozen=True)
class SmLimits:
    """What one SM holds at once (CUDA C++ Programming Guide, "Technical Specifications per Compute
    Capability", 9.0: H100 and H200 alike). Registers are allocated per warp in units of register_unit,
    in each of the sub_partitions (quarters) of the register file; shared memory per block in units of
    shared_memory_unit, with reserved_shared_memory more per block for the system."""

    registers: int = 64 * 1024
    register_unit: int = 256
    sub_partitions: int = 4
    max_registers_per_thread: int = 255
    shared_memory: int = 228 * 1024
    shared_memory_per_block: int = 227 * 1024
    reserved_shared_memory: int = 1024
    shared_memory_unit: int = 128
    blocks: int = 32
    warps: int = 64


SM90 = SmLimits()
# a tie names the first: warps and blocks are the SM's own caps, which no smaller kernel would lift
OCCUPANCY_LIMITS = ("warps", "blocks", "registers", "shared_memory")


@dataclass(frozen=True)
class Occupancy:
    """Programs (blocks) of one kernel resident on one SM at once, what each resource allows, and the
    resource that allows the fewest (``limiter``; 0 programs when one block does not fit at all)."""

    programs_per_sm: int
    limiter: str
    by_registers: int
    by_shared_memory: int
    by_warps: int
    by_blocks: int


def occupancy(registers: int, num_warps: int, shared_memory_bytes: int, limits: SmLimits = SM90) -> Occupancy:
    """Programs of ``num_warps`` warps using ``registers`` a thread and ``shared_memory_bytes`` of (dynamic)
    shared memory that fit one SM, as CUDA's occupancy calculator counts them (cuda_occupancy.h,
    cudaOccMaxBlocksPerSMRegsLimit and ...SmemLimit): a warp takes registers x 32 rounded up to 256; each
    quarter of the register file holds whole warps; a block's registers, counted as if its warps were rounded
    up to a multiple of 4, must fit 64K. A block takes its shared memory + 1 KiB reserved, rounded up to
    128 bytes, of the SM's 228 KiB, and may ask for at most 227 KiB. Raises ValueError for a non-positive
    warp count or more than 255 registers a thread."""
    check(num_warps >= 1, f"num_warps={num_warps} must be >= 1")
    check(0 <= registers <= limits.max_registers_per_thread,
          f"registers={registers} is not a register count of sm_90 (at most {limits.max_registers_per_thread})")
    per_warp = -(-max(registers, 1) * 32 // limits.register_unit) * limits.register_unit
    assumed_warps = -(-num_warps // limits.sub_partitions) * limits.sub_partitions
    if per_warp * assumed_warps > limits.registers:
        by_registers = 0
    else:
        warps_per_quarter = limits.registers // limits.sub_partitions // per_warp
        by_registers = warps_per_quarter * limits.sub_partitions // num_warps
    if shared_memory_bytes > limits.shared_memory_per_block:
        by_shared_memory = 0
    else:
        unit = limits.shared_memory_unit
        per_block = -(-(shared_memory_bytes + limits.reserved_shared_memory) // unit) * unit
        by_shared_memory = limits.shared_memory // per_block
    allowed = {"warps": limits.warps // num_warps, "blocks": limits.blocks, "registers": by_registers,
               "shared_memory": by_shared_memory}
    limiter = min(OCCUPANCY_LIMITS, key=lambda name: allowed[name])  # min keeps the first of equals
    return Occupancy(allowed[limiter], limiter, by_registers, by_shared_memory, allowed["warps"], limits.blocks)
