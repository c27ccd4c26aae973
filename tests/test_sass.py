"""gconvgen.tools.sass compiles for sm_90 as Triton's launcher specialises, on this CPU machine, and reads the
compiler's output right: the divisibility hint widens loads, tl.dot becomes a tensor-core instruction, loops
and spills are seen. The compiles run in a subprocess, since conftest.py turns Triton's interpreter on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


    @triton.jit
    def total(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        running = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            running += tl.load(src_ptr + offsets, mask=offsets < n, other=0.0)
        tl.store(dst_ptr + tl.arange(0, BLOCK), running)


    @triton.jit
    def matmul(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        square = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        tl.store(c_ptr + square, tl.dot(tl.load(a_ptr + square), tl.load(b_ptr + square)))


    @triton.jit
    def dot_product(a_ptr, b_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        running = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            running += tl.load(a_ptr + offsets) * tl.load(b_ptr + offsets)
        tl.store(dst_ptr + tl.arange(0, BLOCK), running)


    @triton.jit
    def matmul_loop(a_ptr, b_ptr, c_ptr, k, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.arange(0, BLOCK)
        steps = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            a = tl.load(a_ptr + rows[:, None] * k + start + steps[None, :])
            b = tl.load(b_ptr + (start + steps)[:, None] * BLOCK + rows[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


    @triton.jit
    def normalise(src_ptr, dst_ptr, BLOCK: tl.constexpr):
        square = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        tile = tl.load(src_ptr + square)
        tl.store(dst_ptr + square, tile / tl.sum(tile, axis=1)[:, None] + tl.sum(tile, axis=0)[None, :])
''')

# Runs in a subprocess with TRITON_INTERPRET unset: argv = [repository root, folder for kernels.py].
# gconvgen's package __init__ imports torch; sass.py does not, so the script imports it without running
# that __init__: the same script then runs in a torch-free venv with another Triton (run_checks' python).
SCRIPT = textwrap.dedent('''
    import dataclasses
    import json
    import sys
    import types
    from pathlib import Path
    root, folder = sys.argv[1:3]
    package = types.ModuleType("gconvgen")
    package.__path__ = [str(Path(root) / "gconvgen")]
    sys.modules.setdefault("gconvgen", package)
    sys.path.insert(0, folder)
    import triton
    import kernels
    from gconvgen.tools.sass import Pointer, compile_like_launch, figures

    def measure(kernel, arguments, constexprs, num_warps=4, num_stages=3):
        compiled = compile_like_launch(kernel, arguments, constexprs, num_warps=num_warps, num_stages=num_stages)
        return dataclasses.asdict(figures(compiled))

    fp32 = Pointer("fp32")
    report = {
        "triton": triton.__version__,
        "copy_n1024": measure(kernels.copy, {"src_ptr": fp32, "dst_ptr": fp32, "n": 1024}, {"BLOCK": 1024}),
        "copy_n17": measure(kernels.copy, {"src_ptr": fp32, "dst_ptr": fp32, "n": 17}, {"BLOCK": 1024}),
        "copy_unaligned": measure(kernels.copy, {"src_ptr": Pointer("fp32", aligned=False), "dst_ptr": fp32,
                                                 "n": 1024}, {"BLOCK": 1024}),
        "total": measure(kernels.total, {"src_ptr": fp32, "dst_ptr": fp32, "n": 4096}, {"BLOCK": 256}),
        "matmul_bf16": measure(kernels.matmul, {"a_ptr": Pointer("bf16"), "b_ptr": Pointer("bf16"), "c_ptr": fp32},
                               {"BLOCK": 64}),
        "dot_product": measure(kernels.dot_product, {"a_ptr": fp32, "b_ptr": fp32, "dst_ptr": fp32, "n": 4096},
                               {"BLOCK": 256}),
        "matmul_loop": measure(kernels.matmul_loop, {"a_ptr": Pointer("bf16"), "b_ptr": Pointer("bf16"),
                                                     "c_ptr": fp32, "k": 1024}, {"BLOCK": 64, "BLOCK_K": 32}),
        "normalise_1warp": measure(kernels.normalise, {"src_ptr": Pointer("fp64"), "dst_ptr": Pointer("fp64")},
                                   {"BLOCK": 64}, num_warps=1, num_stages=1),
        "signatures": {str(n): compile_like_launch(kernels.copy, {"src_ptr": fp32, "dst_ptr": fp32, "n": n},
                                                   {"BLOCK": 1024}, num_warps=4, num_stages=1).src.signature["n"]
                       for n in (1, 2**40)},
    }
    try:  # a forgotten runtime argument is named before Triton's binder fails
        compile_like_launch(kernels.copy, {"src_ptr": fp32, "dst_ptr": fp32}, {"BLOCK": 1024}, num_warps=4,
                            num_stages=1)
        report["missing_n"] = "compiled"
    except ValueError as error:
        report["missing_n"] = str(error)
    print("REPORT" + json.dumps(report))
''')


def run_checks(python: str, folder: Path) -> dict:
    """Compile the test kernels with ``python`` (any venv with Triton); returns each kernel's figures."""
    (folder / "kernels.py").write_text(KERNELS)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "triton")  # compile for real, not from Triton's cache
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([python, "-c", SCRIPT, str(root), str(folder)], env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-4000:])
    return json.loads(run.stdout.split("REPORT", 1)[1])


def test_interpreted_kernel_is_refused():
    import triton
    import triton.language as tl

    from gconvgen.tools.sass import compile_like_launch

    @triton.jit
    def noop(n, BLOCK: tl.constexpr):  # loaded under conftest's TRITON_INTERPRET=1: an InterpretedFunction
        pass

    with pytest.raises(TypeError, match="TRITON_INTERPRET unset"):
        compile_like_launch(noop, {"n": 16}, {"BLOCK": 16}, num_warps=4, num_stages=1)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_checks(sys.executable, tmp_path_factory.mktemp("sass"))


def test_divisibility_hint_gives_128_bit_loads(report):
    loads = report["copy_n1024"]["global_load_widths"]
    assert loads.get("128", 0) > 0, loads  # n % 16 == 0: the mask is uniform over 4 floats


def test_no_hint_gives_narrower_loads(report):
    for case in ("copy_n17", "copy_unaligned"):  # n = 17; a pointer off 16-byte alignment
        loads = report[case]["global_load_widths"]
        assert loads and "128" not in loads, (case, loads)


def test_missing_argument_is_named(report):
    assert "no launch value for ['n']" in report["missing_n"]


def test_one_is_a_constant_and_large_ints_are_64_bit(report):
    assert report["signatures"] == {"1": "constexpr", str(2**40): "i64"}


def test_bf16_dot_uses_tensor_cores(report):
    assert report["matmul_bf16"]["tensor_core"] != "none"
    assert report["matmul_bf16"]["tensor_core"] == "wgmma"  # sm_90, 4 warps, 64 x 64 tiles


def test_loop_is_found(report):
    assert report["total"]["inner_loop_instructions"] > 0
    assert report["total"]["loops"] >= 1
    assert report["copy_n1024"]["inner_loop_instructions"] == 0  # straight-line code


def test_multiply_adds_are_read_from_the_sass(report):
    assert report["matmul_bf16"]["products"] * 4 == 64 ** 3  # HGMMA: a warpgroup's product, a quarter a warp
    assert report["matmul_loop"]["inner_loop_products"] * 4 == 64 * 64 * 32  # one BLOCK_K step a pass
    dot = report["dot_product"]  # FFMA: 256 products an iteration over 4 warps, whole iterations a pass
    assert dot["inner_loop_products"] > 0 and dot["inner_loop_products"] * 4 % 256 == 0, dot
    assert report["total"]["inner_loop_products"] == 0  # FADD only: nothing multiplied


def test_cp_async_widths_and_body(report):
    pipelined = report["matmul_loop"]  # the loop's loads pipelined through cp.async, 16 bytes each
    assert pipelined["async_copies"]["cp.async"] > 0
    assert pipelined["cp_async_widths"] == {"128": pipelined["async_copies"]["cp.async"]}
    assert report["matmul_bf16"]["cp_async_widths"] == {}  # no loop to pipeline
    for case in ("copy_n1024", "matmul_loop"):
        assert 0 < report[case]["body_instructions"] < report[case]["sass_instructions"]  # padding after EXIT


def test_spills_are_reported(report):
    normalise = report["normalise_1warp"]
    assert normalise["spill_bytes"] > 0, normalise  # a 64 x 64 fp64 tile: 256 registers a thread in one warp
    assert report["copy_n1024"]["spill_bytes"] == 0
    assert report["copy_n1024"]["registers"] > 0
    assert report["matmul_bf16"]["shared_memory_bytes"] > 0  # wgmma reads its operands from shared memory


LISTING = """
        /*0090*/              @!P0 BRA 0x5c0 ;                                /* 0x0000000400488947 */
        /*0130*/              @!P3 LDG.E.64 R6, desc[UR4][R20.64] ;           /* 0x000000041406b981 */
        /*0140*/                   LDG.E.LTC128B.128 R8, desc[UR4][R2.64] ;   /* 0x000000040208b981 */
        /*0150*/                   IMAD.HI.U32 R4, R5, 0x38e38e39, RZ ;       /* 0x38e38e3905047827 */
        /*0160*/                   LDG.E.U16 R9, desc[UR4][R4.64] ;           /* 0x000000040409e981 */
        /*0170*/              @!P1 BRA 0x130 ;                                /* 0xfffffffc00709947 */
        /*0180*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;       /* 0x000000060408723c */
        /*0190*/                   EXIT ;                                     /* 0x000000000000794d */
        /*01a0*/                   BRA 0x1a0;                                 /* 0xfffffffc00fc7947 */
        /*01b0*/                   NOP;                                       /* 0x0000000000007918 */
"""


def test_sass_listing_is_read():
    from gconvgen.tools.sass import (access_widths, body_length, innermost_loop, loops, multiply_adds, parse_sass,
                                     tensor_core)

    instructions = parse_sass(LISTING)
    opcodes = [opcode for _, opcode, _ in instructions]
    assert len(instructions) == 10
    assert body_length(instructions) == 8  # the branch to itself after EXIT and the NOP are padding
    assert sum(map(multiply_adds, opcodes)) == 16 * 8 * 16  # the one HMMA.16816
    assert access_widths(opcodes, "LDG") == {16: 1, 64: 1, 128: 1}  # LTC128B is a cache hint, not a width
    assert loops(instructions) == [(0x130, 0x170)]  # the branch to itself after EXIT is no loop
    assert innermost_loop(instructions) == (0x130, 0x170)
    assert tensor_core(opcodes) == "mma.sync"
    # a kernel with dots of both shapes (the dense grad-weight: its pairs' dot on wgmma, its diagonal dots on
    # warp MMAs) says so; the model takes its FLOPs at the slower unit's rate
    assert tensor_core([*opcodes, "HGMMA.64x16x16.F32.BF16"]) == "wgmma+mma.sync"
    assert tensor_core(["HGMMA.64x16x16.F32.BF16"]) == "wgmma"
