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
        if row["id"] == "mamba-k4-prompt1":  # one token: the weight is most of the bytes, nothing to tile
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
            if row["taps"] <= STRIP_WINDOW:
                # one row's strips: the input loaded once (main and halo tiles), plus each band step's weight
                # segment
                assert row["strips"], row
                assert row["bytes"] <= (1.2 if row["taps"] <= 64 else 1.5), row
            else:
                # flat tiles: each band step loads its own input tile, so x is read once a step (and y written
                # once) over the ideal's one read and one write, plus the weight segments
                assert not row["strips"], row
                assert row["bytes"] <= 1.1 * (row["band_steps"] + 1) / 2, row
