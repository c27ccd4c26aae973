"""gconvgen inspect's occupancy and modelled time (gconvgen.tools.sass.occupancy, gconvgen.tools.inspection
model_kernel), checked against figures worked out by hand; and the new figures end to end on one kernel of the
offsuite suite, compiled for sm_90 in a subprocess (conftest.py turns Triton's interpreter on here)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from gconvgen.autotune.space import Problem
from gconvgen.compiler.lowering import KERNEL, Choice, KernelConfig, lower
from gconvgen.compiler.plan import plan
from gconvgen.ir import ConvSpec
from gconvgen.tools import inspection
from gconvgen.tools.sass import KernelFigures, Occupancy, occupancy

from test_sm90_compile import _compiler_env

ROOT = Path(__file__).resolve().parent.parent

# (registers a thread, warps, shared memory bytes) -> (programs per SM, limiter); worked by hand below each
OCCUPANCY_CASES = [
    ((168, 8, 0), (1, "registers")),      # 168 x 32 = 5376 a warp: 3 warps a quarter, 12 an SM: one 8-warp block
    ((64, 4, 0), (8, "registers")),       # 2048 a warp: 8 a quarter, 32 an SM: 8 blocks (warps allow 16)
    ((255, 4, 0), (2, "registers")),      # 8160 rounds up to 8192: 2 a quarter, 8 an SM: 2 blocks
    ((200, 1, 0), (8, "registers")),      # 6400 a warp: 2 a quarter, 8 an SM (64K / 6400 = 10 would ignore quarters)
    ((32, 4, 0), (16, "warps")),          # registers allow 16 too: a tie names the SM's own cap
    ((32, 1, 0), (32, "blocks")),         # 64 one-warp blocks by registers and warps; 32 blocks an SM
    ((64, 4, 100 * 1024), (2, "shared_memory")),     # (102400 + 1024) fits 233472 twice
    ((64, 4, 227 * 1024), (1, "shared_memory")),     # the largest block: 227 KiB + 1 KiB reserved = 228 KiB
    ((64, 4, 227 * 1024 + 1), (0, "shared_memory")),  # one byte more than a block may ask for
    ((255, 32, 0), (0, "registers")),     # 8192 x 32 warps: more than a block's 64K registers
]


@pytest.mark.parametrize("resources, expected", OCCUPANCY_CASES, ids=[str(case[0]) for case in OCCUPANCY_CASES])
def test_occupancy_by_hand(resources, expected):
    fits = occupancy(*resources)
    assert (fits.programs_per_sm, fits.limiter) == expected, fits


def test_occupancy_names_every_limit():
    fits = occupancy(64, 4, 100 * 1024)
    assert (fits.by_registers, fits.by_shared_memory, fits.by_warps, fits.by_blocks) == (8, 2, 16, 32)
    assert occupancy(0, 4, 1).by_shared_memory == 233472 // 1152  # 1 + 1024 bytes round up to 9 x 128
    with pytest.raises(ValueError, match="at most 255"):
        occupancy(256, 4, 0)


# depthwise 3x3, 128 channels, batch 2, 16 x 16, padded to 16 x 16 out; bf16
PROBLEM = Problem(ConvSpec(128, 128, 128, (3, 3), padding=(1, 1, 1, 1), dtype="bfloat16"), 2, 16, 16)
IDEAL_BYTES = 2 * (2 * 128 * 256 + 2 * 128 * 256 + 128 * 9)  # x, out, weight once: 264448
USEFUL_FLOPS = 2 * 2 * 128 * 256 * 9                          # 1179648


def _figures(**changes) -> KernelFigures:
    """A straight-line FMA kernel of 1000 instructions on 4 warps; ``changes`` replace fields."""
    plain = KernelFigures(registers=64, spill_bytes=0, stack_bytes=0, shared_memory_bytes=0, num_warps=4,
                          num_stages=1, tensor_core="none", global_load_widths={}, async_copies={},
                          inner_loop_instructions=0, global_store_widths={}, shared_store_widths={},
                          shared_load_widths={}, ldmatrix=0, inner_loop_imad_hi=0, loops=0, sass_instructions=1010,
                          cp_async_widths={}, body_instructions=1000, products=0, inner_loop_products=0)
    return replace(plain, **changes)


def test_floor_by_hand():
    assert inspection.ideal_bytes_and_flops(PROBLEM) == (IDEAL_BYTES, USEFUL_FLOPS)
    assert inspection.floor_seconds(PROBLEM) == pytest.approx(264448 / 4.3e12)  # bytes bind: 61.5 ns vs 1.5 ns


def test_straight_line_kernel_bound_by_issue():
    # 264 programs, 4 resident an SM: the busiest SM runs 2, 8 warps on all 4 schedulers
    model = inspection.model_kernel(_figures(), Occupancy(4, "registers", 4, 228, 16, 32), PROBLEM, 264, 2.0,
                                    2.0 * USEFUL_FLOPS)
    issue = 2 * 4 * 1000 / (4 * 1.98e9)                         # 1.01 us
    assert model.issue_s == pytest.approx(issue)
    assert model.bytes_s == pytest.approx(2 * 264448 / 4.3e12)  # 0.12 us
    assert model.flops_s == pytest.approx(2 * (2 * 1179648 / 264) / (67e12 / 132))  # 0.035 us
    assert (model.bound, model.time_s, model.busiest_sm_programs, model.busy_schedulers) == ("issue", model.issue_s, 2, 4)
    assert model.percent_of_floor == pytest.approx(100 * (264448 / 4.3e12) / issue)  # 6.1%
    assert model.loop_trips == 0 and model.warp_instructions == 1000 and model.unit == "fma"


def test_loop_passes_are_work_over_work_per_pass():
    # 512 multiply-adds a warp outside the loop, 2048 a pass: a warp that must do 512 + 5 x 2048 makes 5 passes
    figures = _figures(inner_loop_instructions=100, products=512 + 2048, inner_loop_products=2048)
    flops = 2.0 * 264 * 4 * (512 + 5 * 2048)
    model = inspection.model_kernel(figures, Occupancy(4, "registers", 4, 228, 16, 32), PROBLEM, 264, 2.0, flops)
    assert model.loop_trips == pytest.approx(5)
    assert model.warp_instructions == pytest.approx(1000 - 100 + 5 * 100)
    no_products = inspection.model_kernel(_figures(inner_loop_instructions=100), Occupancy(4, "registers", 4, 228, 16, 32),
                                          PROBLEM, 264, 2.0, flops)
    assert no_products.loop_trips == 1 and any("counted once" in note for note in no_products.notes)


def test_few_programs_use_few_schedulers_and_tensor_cores():
    # 10 one-warp programs: one SM issues 1000 instructions from one scheduler, a quarter of its FMA lanes busy
    model = inspection.model_kernel(_figures(num_warps=1), Occupancy(8, "registers", 8, 228, 64, 32), PROBLEM, 10,
                                    1.0, 2.0e6)
    assert (model.busiest_sm_programs, model.busy_schedulers) == (1, 1)
    assert model.issue_s == pytest.approx(1000 / 1.98e9)
    assert model.flops_s == pytest.approx((2.0e6 / 10) / (67e12 / 132 / 4))
    # the same flops on mma.sync run at half of wgmma's matrix rate, on wgmma at the whole of it
    sync = inspection.model_kernel(_figures(tensor_core="mma.sync"), Occupancy(4, "registers", 4, 228, 16, 32),
                                   PROBLEM, 132, 1.0, 1e9)
    wgmma = inspection.model_kernel(_figures(tensor_core="wgmma"), Occupancy(4, "registers", 4, 228, 16, 32),
                                    PROBLEM, 132, 1.0, 1e9)
    assert sync.flops_s == pytest.approx(1e9 / 132 / (790e12 / 2 / 132))
    assert wgmma.flops_s == pytest.approx(1e9 / 132 / (790e12 / 132)) and wgmma.unit == "wgmma"
    # a kernel with dots on both units: all of its FLOPs at the slower one's rate (an upper bound on its time)
    mixed = inspection.model_kernel(_figures(tensor_core="wgmma+mma.sync"), Occupancy(4, "registers", 4, 228, 16, 32),
                                    PROBLEM, 132, 1.0, 1e9)
    assert mixed.flops_s == pytest.approx(sync.flops_s) and mixed.unit == "wgmma+mma.sync"


def test_a_kernel_that_fits_no_sm_and_the_cap():
    stuck = inspection.model_kernel(_figures(), Occupancy(0, "shared_memory", 8, 0, 16, 32), PROBLEM, 264, 2.0, 1e6)
    assert (stuck.bound, stuck.time_s, stuck.percent_of_floor) == ("occupancy", math.inf, 0.0)
    # fewer requested bytes than the ideal (a model gap) and a short body: the share is capped at 100%
    capped = inspection.model_kernel(_figures(body_instructions=10), Occupancy(4, "registers", 4, 228, 16, 32),
                                     PROBLEM, 132, 0.5, 1e3)
    assert capped.bound == "bytes" and capped.percent_of_floor == 100.0
    unmodelled = inspection.model_kernel(_figures(), Occupancy(4, "registers", 4, 228, 16, 32), PROBLEM, 132, None, 1e3)
    assert unmodelled.requested_bytes == IDEAL_BYTES and unmodelled.notes


def test_fma_kernels_issue_their_whole_tiles():
    spec = PROBLEM.spec
    forward = lower(plan(spec), "forward", choice=Choice(KERNEL, KernelConfig(32, 64, 0), "depthwise"),
                    interpret=False, allow_tf32=False)
    flops, notes = inspection.issued_flops(forward, PROBLEM, 32, {}, None, "none")
    assert flops == 2 * 32 * (32 * 64) * 9 and not notes  # 32 programs of 32 pixels x 64 channels, 9 taps
    backward = replace(spec, bias=False)
    grad_weight = lower(plan(backward), "grad_weight", choice=Choice(KERNEL, KernelConfig(8, 32, 0), "depthwise"),
                        interpret=False, allow_tf32=False)
    flops, _ = inspection.issued_flops(grad_weight, PROBLEM.backward("grad_weight"), 4, {"pixels_per_split": 100},
                                       None, "none")
    assert flops == 2 * 4 * 13 * (8 * 32 * 16)  # 13 steps of 8 pixels, 32 channels, 9 taps padded to 16
    for unit in ("wgmma", "none"):  # a family's modelled dot tiles, on tensor cores or (float32) on FMAs
        tiled, notes = inspection.issued_flops(forward, PROBLEM, 32, {}, 1.5, unit)
        assert tiled == 1.5 * USEFUL_FLOPS and not notes
    untiled, notes = inspection.issued_flops(forward, PROBLEM, 32, {}, None, "mma.sync")
    assert untiled == USEFUL_FLOPS and notes


def test_layer_figures_and_geometric_mean():
    def row(time_s):
        return SimpleNamespace(model=SimpleNamespace(floor_s=1e-6, time_s=time_s))

    layer = inspection.layer_model({"forward": row(2e-6), "grad_input": row(3e-6), "grad_weight": row(5e-6)})
    assert layer.forward_percent == pytest.approx(50.0)
    assert layer.forward_backward_s == pytest.approx(10e-6) and layer.forward_backward_percent == pytest.approx(30.0)
    forward_only = inspection.layer_model({"forward": row(0.5e-6)})
    assert forward_only.forward_percent == 100.0 and forward_only.forward_backward_percent is None
    assert inspection.geometric_mean([50.0, 200.0]) == pytest.approx(100.0)
    assert inspection.geometric_mean([]) is None and inspection.geometric_mean([0.0, 5.0]) == 0.0


def test_inspect_reports_the_new_figures_of_an_offsuite_kernel(tmp_path):
    report = tmp_path / "inspect.json"
    env = _compiler_env()
    env.update(GCONVGEN_CACHE_DIR=str(tmp_path / "cache"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    done = subprocess.run([sys.executable, "-m", "gconvgen", "inspect", "--suite", "offsuite", "--layer",
                           "mamba-k4-prompt1", "--layout", "nhwc", "--kind", "forward", "--json", str(report)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "modelled %floor" in done.stdout and "geomean nhwc over 1 layers" in done.stdout
    [row] = json.loads(report.read_text())
    model, fits = row["model"], row["occupancy"]
    assert model["time_s"] == max(model["bytes_s"], model["flops_s"], model["issue_s"])
    assert model["percent_of_floor"] == pytest.approx(min(100.0, 100 * model["floor_s"] / model["time_s"]))
    assert fits["programs_per_sm"] == min(fits["by_registers"], fits["by_shared_memory"], fits["by_warps"],
                                          fits["by_blocks"]) >= 1
    assert row["rounds"] == pytest.approx(row["programs"] / (132 * fits["programs_per_sm"]))
    assert model["busiest_sm_programs"] == -(-row["programs"] // 132)
    figures = row["figures"]
    assert sum(figures["cp_async_widths"].values()) == figures["async_copies"]["cp.async"]
    assert 0 < figures["body_instructions"] <= figures["sass_instructions"]
    assert row["layer_model"]["forward_percent"] == pytest.approx(model["percent_of_floor"])
    assert row["layout_geomeans"]["forward_percent"] == pytest.approx(model["percent_of_floor"])
