"""Every template variant compiles for a Hopper GPU (sm_90) with Triton's real compiler, on this CPU
machine, with its default config, into a kernel whose shared memory fits an SM: the interpreter accepts
kernels that the GPU compiler rejects (e.g. tl.dot tiles under 16)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# family-shaping spec arguments: in, out, groups, kernel, stride, padding, dilation, bias, policy
VARIANTS = [
    (12, 12, 3, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True, "strict"),    # grouped igemm, ci = 4
    (12, 11, 3, (3, 3), (2, 2), (0, 1, 0, 1), (1, 1), False, "pad"),      # uneven outputs -> output mask
    (11, 12, 3, (5, 5), (1, 1), (2, 2, 2, 2), (2, 2), True, "pad"),       # uneven inputs -> input mask, dilation
    (128, 128, 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, "strict"),  # ResNeXt layer1
    (64, 64, 64, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), True, "strict"),   # depthwise k7 with bias
    (32, 64, 32, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False, "strict"),  # depthwise multiplier 2, stride 2
    (7, 13, 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, "pad"),       # depthwise, uneven outputs
    (128, 128, 128, (31, 31), (1, 1), (15, 15, 15, 15), (1, 1), False, "strict"),  # RepLKNet depthwise k31
    (16, 16, 16, (5, 5), (2, 1), (2, 2, 2, 2), (1, 2), True, "strict"),   # depthwise, stride 2 x dilation 2
]

SCRIPT = textwrap.dedent("""
    import itertools
    import json
    import sys
    from gconvgen import ConvSpec, plan
    from gconvgen.runtime.aot import compile_for_gpu
    results = []
    layouts = ["nchw", "nhwc", "strided"]
    # every variant in every dtype; the layouts rotate so each (variant, layout) and (dtype, layout) pair appears
    for (index, args), (turn, dtype) in itertools.product(enumerate(json.loads(sys.argv[1])),
                                                          enumerate(["float32", "float16", "bfloat16", "float64"])):
        layout = layouts[(index + turn) % 3]
        in_c, out_c, groups, kernel, stride, padding, dilation, bias, policy = args
        spec = ConvSpec(in_c, out_c, groups, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), bias,
                        dtype, layout, policy)
        for family in plan(spec).families:  # every forward family the tuner may pick
            try:
                compiled = compile_for_gpu(plan(spec, family=family), capability=90)
                built = "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
                # a launch needs its shared memory to fit the SM's (Hopper: 227 KiB), or it fails OutOfResources
                fits = compiled.metadata.shared <= 232448
                results.append([str(spec), family, built and fits, "" if fits else f"shared {compiled.metadata.shared} B"])
            except Exception as error:  # report every failure, not only the first
                results.append([str(spec), family, False, f"{type(error).__name__}: {error}"[:2000]])
    # negative control: an fp16 tl.dot with K under 16 must be rejected, or this test could not fail
    from gconvgen.runtime.kernels import KernelConfig
    try:
        compile_for_gpu(plan(ConvSpec(12, 12, 3, (3, 3), dtype="float16")), KernelConfig(64, 16, 8), capability=90)
        control = "compiled"
    except Exception as error:
        control = f"rejected: {type(error).__name__}"
    print("RESULTS" + json.dumps({"variants": results, "control": control}))
""")


def test_every_template_variant_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GCONVGEN_CACHE_DIR"] = str(tmp_path / "gconvgen")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # compile for real, not from Triton's cache
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(VARIANTS)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.split("RESULTS", 1)[1])
    assert report["control"].startswith("rejected"), f"an fp16 tl.dot with K = 8 was {report['control']}"
    results = report["variants"]
    depthwise = sum(groups == in_channels for in_channels, _, groups, *_ in VARIANTS)
    assert len(results) == (len(VARIANTS) + depthwise) * 4  # depthwise variants compile in two families
    assert {family for _, family, _, _ in results} == {"igemm", "depthwise", "depthwise_gemm"}
    failures = [(spec, error) for spec, _, ok, error in results if not ok]
    assert not failures, "\n\n".join(f"{spec}\n  {error}" for spec, error in failures)
