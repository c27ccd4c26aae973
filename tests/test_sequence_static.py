"""Static figures of the sequence suite's forward kernels (tuning/suites/sequence.json: Mamba's causal k4 and
causal depthwise conv1d of widths 2 to 256), compiled for sm_90 with Triton's real compiler on this CPU
machine as a launch would specialise them (gconvgen.tools.inspection). Not timings: what the issue on
sequence models asks of the kernels' shape, read from the compiler's own output."""
from __future__ import annotations

import textwrap

from gconvgen.compiler.families.depthwise_gemm import STRIP_WINDOW
from test_sm90_compile import compiled_rows

SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.compiler.families.depthwise_gemm import band_steps, strip_rows
    from gconvgen.tools.inspection import inspect_problem
    rows = []
    for layer in suites.load_suite("sequence").layers:
        for layout in ("nchw", "nhwc"):
            problem = layer.problem("bfloat16", layout)
            row = inspect_problem(problem)
            rows.append({"id": layer.id, "layout": layout, "family": row.family, "taps": layer.kernel,
                         "strips": strip_rows(problem.spec, "forward"),
                         "band_steps": band_steps(problem.spec, int(row.config.split()[2][1:]), 0)
                         if row.family == "depthwise_gemm" else 0,
                         "bias": layer.bias, "spill": row.figures.spill_bytes,
                         "loads": {str(k): v for k, v in row.figures.global_load_widths.items()},
                         "tensor_core": row.figures.tensor_core, "bytes": row.requested_over_ideal_bytes,
                         "flops": row.issued_over_useful_flops})
    print(json.dumps(rows))
""")


def test_sequence_suite_forward_kernels_at_memory_speed_shape():
    rows = compiled_rows(SCRIPT)
    assert len(rows) == 18
    for row in rows:
        assert row["spill"] == 0, row
        if row["id"] == "mamba-k4-prompt1":
            # one token: the tile's 8 positions read the one there is and no halo (a masked lane requests
            # nothing; counted whole, 3.5x), the weight most of the bytes; too short for vectors
            assert row["bytes"] <= 1.05, row
            continue
        if row["family"] == "depthwise1d":
            # one read of x (its halo in whole 16-byte vectors), one write of y: within 1.2x of the ideal
            assert row["bytes"] <= 1.2, row
            # the only 16-bit loads are a tap's weight and the bias, one each; x's main tile and halo are vectors
            assert row["loads"].get("16", 0) <= row["taps"] + row["bias"], row
            assert row["loads"].get("128", 0) >= 2, row
        else:  # widths past 4: strips of the length on tensor cores, a few wasted FLOPs a tap
            assert row["family"] == "depthwise_gemm" and row["taps"] > 4, row
            assert row["tensor_core"] in ("wgmma", "mma.sync"), row
            assert row["flops"] <= 4.0, row
            if row["layout"] == "nhwc" and row["taps"] >= 64:
                # each band step's weight segment (8 channels' rows of 64 or more taps) starts on an even tap
                # (the templates' segment_lead), so loads 32 bits or more at a time: the bias is the one 16-bit load
                # (7, 11 and 19 of them at k64, k128 and k256 when the segment started on an odd tap)
                assert row["loads"].get("16", 0) <= row["bias"], row
            if row["taps"] <= STRIP_WINDOW:
                # one row's strips: the input loaded once (main and halo tiles), plus each band step's weight
                # segment
                assert row["strips"], row
                assert row["bytes"] <= 1.2, row
            elif row["taps"] <= 2 * STRIP_WINDOW:
                # one row's strips on the wide tile (the main tile's strips and as many again), of which the
                # strips the band steps read are loaded once, plus each band step's weight segment; the flat tiles
                # of each band step loaded its own tile read 5.2x the ideal bytes at k256 in channels_last, the
                # whole wide tile 1.8x. Past 1.2x in channels_last (1.3x): 32 strips a program, each band step's
                # segment of 8 channels' weights beside them (64 strips spilled)
                assert row["strips"], row
                assert row["bytes"] <= (1.2 if row["layout"] == "nchw" else 1.35), row
            else:
                # flat tiles: each band step loads its own input tile, so x is read once a step (and y written
                # once) over the ideal's one read and one write, plus the weight segments
                assert not row["strips"], row
                assert row["bytes"] <= 1.1 * (row["band_steps"] + 1) / 2, row


GRAD_WEIGHT_SCRIPT = textwrap.dedent("""
    import json
    from gconvgen.autotune import suites
    from gconvgen.tools.inspection import inspect_problem
    rows = []
    for layer in suites.load_suite("sequence").layers:
        if layer.size == 1:  # the one-token prompt: the direct kernel, nothing to tile
            continue
        row = inspect_problem(layer.problem("bfloat16", "nhwc").backward("grad_weight"))
        rows.append({"id": layer.id, "taps": layer.kernel, "family": row.family, "config": row.config,
                     "spill": row.figures.spill_bytes, "bytes": row.requested_over_ideal_bytes,
                     "percent": row.model.percent_of_floor})
    print(json.dumps(rows))
""")


def test_channels_last_conv1d_weight_gradients_read_x_fewer_times_over():
    """The banded grad-weight of the sequence suite's layers in channels_last, no spill. Up to PIECES_WINDOW
    columns 4 channels of 32-column strips: a strip of 32 grad_out columns reads its band of 32 + the window's
    input columns (the halo tile a power of two), so x is read (32 + halo) / 32 times and grad_out once. Wider
    windows in pieces (strip_pieces): a step's 32 strips of 16 columns read their input strips once, with the
    pieces' reach past them, within 1.3x the ideal bytes (the flat tile's 16-column strips read k256's x 17 times:
    8.95x, 11.2% of the floor), and the modelled share of the floor is what the bytes, FLOPs and instructions allow
    (Mamba's k4 66.7%, k64 32.3%, k128 20.0% at 16-column strips; k64 50.0%, k128 33.4% at 32)."""
    from gconvgen.compiler.families.depthwise_gemm import PIECES_WINDOW
    rows = compiled_rows(GRAD_WEIGHT_SCRIPT)
    assert len(rows) == 8
    for row in rows:
        assert row["family"] == "depthwise_gemm" and row["spill"] == 0, row
        if row["taps"] > PIECES_WINDOW:
            assert row["config"].split()[0] == "m32" and row["config"].split()[2] == "k16", row
            assert row["bytes"] <= 1.3, row
            continue
        assert row["config"].split()[1:3] == ["n4", "k32"], row
        halo = max(16, 1 << (row["taps"] - 1).bit_length())  # the band past a strip, in a power-of-two tile
        assert row["bytes"] <= 1.05 * (1 + (32 + halo) / 32) / 2, row
    percent = {row["id"]: row["percent"] for row in rows}
    assert percent["mamba-k4"] >= 75 and percent["causal-k64"] >= 90, percent
    assert percent["causal-k128"] >= 55 and percent["causal-k256"] >= 50, percent


def test_a_tile_counts_the_positions_its_bounds_mask_reads():
    """The tile models' in_bounds: a masked lane requests nothing, so a tile past either end of [0, limit)
    counts only what lies inside (a one-token prompt's 8-position tile reads one position, its front halo none)."""
    from gconvgen.compiler.tiles import in_bounds
    assert in_bounds(range(0, 16, 8), 0, 8, 10) == 8 + 2
    assert in_bounds(range(0, 16, 8), -4, 4, 10) == 0 + 4  # front halos: [-4, 0) and [4, 8)
    assert in_bounds(range(-255, 2048 - 255, 1024), 0, 1280, 2048) == 1025 + 1279  # causal k256's wide tiles
    assert in_bounds([0], 0, 8, 1) == 1 and in_bounds([0], -4, 4, 1) == 0
