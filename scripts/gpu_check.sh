#!/usr/bin/env bash
# The one GPU check, for one call of at most 9 minutes on one H200, from a checkout that is not installed:
#   1. versions (GPU, driver, torch, Triton, cuDNN);
#   2. the GPU test subset on real Triton (bf16 included): forward, epilogues, backward, warm-call replays;
#      then the host time per warm call (scripts/host_overhead.py) with real and stubbed launches;
#   2c. torch.export of a small model through gconvgen's Triton kernels (gconvgen.integrations.export), an
#      AOTInductor package of it, loaded and run in a Python that cannot import gconvgen;
#   3. a short tune of the headline suite in channels_last (each layer's record is written as it finishes,
#      so a tune cut short by its time limit keeps what it tuned);
#   4. the headline suite forward in NCHW and channels_last against F.conv2d, and forward + backward in
#      channels_last against PyTorch eager; then forward + backward of the secondary suite's small maps
#      (RepLKNet's dw27 on 14 x 14, ConvNeXt's dw7 on 7 x 7: the dense kernels) in both layouts, and of two
#      NCHW grouped layers (ResNeXt's l1, RegNetY-1.6GF's stage 3: read in place, then again staged channels_last
#      with one copy of grad_output for both backward kernels, the way wider groups run), and of the sequence
#      suite's causal k128 and k256 in both layouts;
#   5. `gconvgen inspect` of the same kernels (static sm_90 figures, run on the CPU cores meanwhile),
#      so static figures and measured times sit side by side.
# Writes at most 10 files to OUT_DIR (limits on a GPU: 120 + 30 + 90 + 45 + 90 + 40 + 35 + 2 x 25 + 20 s). Every step has
# its own time limit; a failed step does not stop the rest.
#
#   scripts/gpu_check.sh [OUT_DIR]            (OUT_DIR defaults to $OUT, else ./gconvgen-gpu-check)
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh /tmp/dry   a dry run of every step on the CPU (smoke suite,
#                                                        Triton's interpreter): checks the script, times nothing
#   scripts/gpu_check.sh --which-python       say which Python it would run, and exit
# Python: $PYTHON when set; else the repository's .venv (the README's set-up) when it exists and imports
# torch; else the system python3 (a GPU machine has torch there, and a .venv is not carried to it).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"; python_origin="\$PYTHON"
elif [ -x "$root/.venv/bin/python" ] && "$root/.venv/bin/python" -c "import torch" > /dev/null 2>&1; then
    python="$root/.venv/bin/python"; python_origin="the repository's .venv, which imports torch"
else
    python="python3"; python_origin="the system python3: no .venv here that imports torch"
fi
if [ "${1:-}" = --which-python ]; then
    echo "python: $python ($python_origin)"
    exit 0
fi
out="$(mkdir -p "${1:-${OUT:-gconvgen-gpu-check}}" && cd "${1:-${OUT:-gconvgen-gpu-check}}" && pwd)"
device="${GPU_CHECK_DEVICE:-cuda}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export GCONVGEN_CACHE_DIR="${GCONVGEN_CACHE_DIR:-$(mktemp -d)/gconvgen}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # Triton 3.9's default, said aloud
if [ "$device" = cuda ]; then
    suite=headline; tests_limit=120; tune_limit=45; bench_limit=90; backward_limit=40; small_maps_limit=35
    small_maps=(--suite secondary --layer replknet-dw27 --layer convnext-dw7-768)
    nchw_grouped=(--suite headline --layer resnext50-l1 --layer regnety1.6gf-s3); nchw_grouped_limit=25
    long_windows=(--suite sequence --layer causal-k128 --layer causal-k256); long_windows_limit=20
    test_args=(--device cuda)
else
    suite=smoke; tests_limit=600; tune_limit=300; bench_limit=300; backward_limit=300; small_maps_limit=300
    small_maps=(--suite smoke)
    nchw_grouped=(--suite smoke); nchw_grouped_limit=300
    long_windows=(--suite smoke --layer smoke-causal1d); long_windows_limit=300
    test_args=(-k "grouped or depthwise and not fuzz")
fi
cd "$root" || exit 1
started=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" | tee -a "$out/versions.txt" >&2; }
status=0

# 1. versions
"$python" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cudnn', \
torch.backends.cudnn.version(), '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    > "$out/versions.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$out/versions.txt" 2>&1 || true
date -u '+%Y-%m-%dT%H:%M:%SZ' >> "$out/versions.txt"
say "python: $python ($python_origin)"

# 5. (in the background) static sm_90 figures: a compiler's work on the CPU cores, with the interpreter off
(env -u TRITON_INTERPRET timeout 420 "$python" -m gconvgen inspect --suite "$suite" --kind forward \
    --kind grad_input --kind grad_weight > "$out/inspect.txt" 2>&1) &
inspecting=$!

# 2. tests on the device
say "tests"
timeout "$tests_limit" "$python" -m pytest -q -p no:cacheprovider -x "${test_args[@]}" \
    tests/test_forward.py tests/test_epilogue.py tests/test_backward.py tests/test_warm_calls.py \
    > "$out/gpu-tests.log" 2>&1 || status=1
tail -n 3 "$out/gpu-tests.log" | tee -a "$out/versions.txt"

# 2b. host time per warm call, real launches and stubbed, beside F.conv2d's
say "host overhead"
timeout 30 "$python" scripts/host_overhead.py --device "$device" --calls 1000 > "$out/host-overhead.txt" 2>&1 || status=1
cat "$out/host-overhead.txt" >&2

# 2c. (export) torch.export through gconvgen's Triton kernels, then AOTInductor: a small model (depthwise,
# grouped at stride 2, fused silu + residual) exported with gconvgen.integrations.export, its kernels inlined
# as graph nodes, compiled into an AOTInductor package, and that package loaded and run in a fresh Python
# that cannot import gconvgen; each against F.conv2d in float64 on fresh inputs. On the CPU dry run the
# export runs through the interpreter and AOTInductor is skipped (it compiles the kernels for a GPU).
say "export + AOTInductor"
export_limit=$([ "$device" = cuda ] && echo 90 || echo 300)
export_work="$(mktemp -d)"
cat > "$export_work/export_check.py" <<'EOF'
import os
import sys

mode, device, work = sys.argv[1:4]
if device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
import torch
import torch._inductor
import torch.nn.functional as F

torch.backends.cudnn.allow_tf32 = False  # the kernels are lowered at export: exact fp32 against float64
torch.set_default_device(device)
# odd maps over 1024 pixels: strides Inductor's stride padding would change if it could (the kernels take them
# as numbers traced at export)
SIZE = (2, 8, 37, 37)


def reference(x, w):
    """The model below in float64 through F.conv2d (padding 'same' at stride 2 on odd maps pads one a side)."""
    x, w = x.double(), {name: tensor.double() for name, tensor in w.items()}
    y = F.relu(F.conv2d(x, w["depthwise.weight"], w["depthwise.bias"], padding=1, groups=8))
    y = F.conv2d(y, w["grouped.weight"], stride=2, padding=1, groups=2)
    return F.silu(F.conv2d(y, w["fused.weight"], w["fused.bias"], padding=1, groups=8) + y)


def compared(name, out, x, w):
    expected = reference(x, w)
    ok = out.shape == expected.shape and torch.allclose(out.double(), expected, atol=1e-4, rtol=1e-4)
    error = (out.double() - expected).abs().max().item() if out.shape == expected.shape else float("nan")
    print(f"{name}: max |error| {error:.2e} against F.conv2d in float64: {'ok' if ok else 'FAILED'}", flush=True)
    return ok


if mode == "export":
    from torch import nn
    import gconvgen
    from gconvgen.integrations.export import export, inline_kernels

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.grouped = gconvgen.GroupedConv2d(8, 8, 3, stride=2, padding="same", groups=2, bias=False)
            self.fused = gconvgen.GroupedConv2d(8, 8, 3, padding=1, groups=8, activation="silu")

        def forward(self, x):
            y = self.grouped(torch.relu(self.depthwise(x)))
            return self.fused(y, y)

    model = gconvgen.convert(Block()).eval()
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    program = export(model, (torch.randn(SIZE),))
    inlined = inline_kernels(program)
    called = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    left = [str(node.target) for node in inlined.graph.nodes if str(node.target).startswith("gconvgen.")]
    kernels = [node for node in inlined.graph.nodes if "triton_kernel_wrapper" in str(node.target)]
    print(f"exported: {sum(c.startswith('gconvgen.') and '_traced' in c for c in called)} traced gconvgen calls, "
          f"{sum(c in ('gconvgen.conv2d.default', 'gconvgen.conv2d_act.default') for c in called)} opaque ones; "
          f"inlined: {len(kernels)} Triton kernel nodes, {len(left)} gconvgen calls left", flush=True)
    x = torch.randn(SIZE) + 0.5
    ok = bool(kernels) and not left  # 3 kernel nodes, unless a tuning record runs a layer on aten
    ok &= compared("exported program", program.module()(x), x, weights)
    ok &= compared("inlined program", inlined.module()(x), x, weights)
    torch.save({name: tensor.cpu() for name, tensor in weights.items()}, os.path.join(work, "weights.pt"))
    if device == "cuda":
        package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(work, "block.pt2"))
        print(f"AOTInductor package: {package} ({os.path.getsize(package)} bytes)", flush=True)
    else:
        print("AOTInductor: skipped on the CPU (it compiles the kernels for a GPU)", flush=True)
    sys.exit(0 if ok else 1)

# mode "load": a fresh process, run outside the checkout, in which gconvgen cannot be imported
if device != "cuda":
    print("AOTInductor load: skipped on the CPU (no package)")
    sys.exit(0)


class NoGconvgen:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "gconvgen":
            raise ImportError("the package must load without gconvgen")


sys.meta_path.insert(0, NoGconvgen())
runner = torch._inductor.aoti_load_package(os.path.join(work, "block.pt2"))
weights = {name: tensor.to(device) for name, tensor in torch.load(os.path.join(work, "weights.pt")).items()}
x = torch.randn(SIZE) + 0.5
ok = compared("AOTInductor package, loaded without gconvgen", runner(x), x, weights)
print(f"gconvgen imported in the loading process: {'gconvgen' in sys.modules}")
sys.exit(0 if ok and "gconvgen" not in sys.modules else 1)
EOF
{ timeout "$export_limit" "$python" "$export_work/export_check.py" export "$device" "$export_work" \
    && (cd "$export_work" && env -u PYTHONPATH timeout 45 "$python" export_check.py load "$device" "$export_work"); } \
    > "$out/export-aoti.log" 2>&1 || { status=1; say "export + AOTInductor failed (see export-aoti.log)"; }
tail -n 2 "$out/export-aoti.log" | tee -a "$out/versions.txt"

# 3. a short tune, channels_last
say "tune (at most ${tune_limit}s)"
timeout "$tune_limit" "$python" -m gconvgen tune --suite "$suite" --layout nhwc --device "$device" \
    > "$out/tune.log" 2>&1
say "tune exit $? (124: its time limit; records made before it are kept)"

# 4. forward in both layouts, then forward + backward in channels_last
say "bench forward"
timeout "$bench_limit" "$python" -m gconvgen bench --suite "$suite" --layout both --device "$device" \
    --json "$out/bench-forward.json" --markdown "$out/bench-forward.md" > "$out/bench.log" 2>&1 || status=1
say "bench forward + backward, channels_last"
timeout "$backward_limit" "$python" -m gconvgen bench --suite "$suite" --layout nhwc --device "$device" \
    --backward >> "$out/bench.log" 2>&1 || status=1
say "bench forward + backward, small maps (dense kernels), both layouts"
timeout "$small_maps_limit" "$python" -m gconvgen bench "${small_maps[@]}" --layout both --device "$device" \
    --backward >> "$out/bench.log" 2>&1 || status=1
say "bench forward + backward, NCHW grouped layers: read in place, then staged channels_last"
timeout "$nchw_grouped_limit" "$python" -m gconvgen bench "${nchw_grouped[@]}" --layout nchw --device "$device" \
    --backward >> "$out/bench.log" 2>&1 || status=1
# the same layers with their NCHW activations staged as wider groups are (igemm_rows.IN_PLACE_GROUP_CHANNELS 0)
echo "== the NCHW grouped layers again, staged channels_last (IN_PLACE_GROUP_CHANNELS 0)" >> "$out/bench.log"
timeout "$nchw_grouped_limit" "$python" -c "from gconvgen.compiler.families import igemm_rows
igemm_rows.IN_PLACE_GROUP_CHANNELS = 0
from gconvgen.tools.cli import main
main(prog_name='gconvgen staged')" bench "${nchw_grouped[@]}" --layout nchw --device "$device" \
    --backward >> "$out/bench.log" 2>&1 || status=1
say "bench forward + backward, long causal windows (one row's strips at k128, the wide tile at k256; the" \
    "grad-weight in pieces), both layouts"
timeout "$long_windows_limit" "$python" -m gconvgen bench "${long_windows[@]}" --layout both --device "$device" \
    --backward >> "$out/bench.log" 2>&1 || status=1
"$python" -m gconvgen cache export "$out/tuning-db.json" >> "$out/bench.log" 2>&1 || true

say "waiting for inspect"
wait "$inspecting" || say "inspect did not finish (exit $?)"
say "done, status $status"
exit "$status"
