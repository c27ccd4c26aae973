"""Shared test set-up: every test runs the generated kernels through Triton's interpreter on CPU tensors,
with a private cache directory and fallbacks forbidden, so a passing test proves a kernel ran.

``pytest --device cuda tests/test_forward.py tests/test_op.py tests/test_backward.py tests/test_training.py`` runs the
same differential tests on a GPU with Triton's real compiler instead (tensors made with torch's default
device, which the session sets to CUDA; TF32 off so fp32 is compared at fp32).
"""
from __future__ import annotations

import os
import random
import sys


def _requested_device(argv: list[str]) -> str:
    for index, arg in enumerate(argv):
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
        if arg == "--device" and index + 1 < len(argv):
            return argv[index + 1]
    return "cpu"


# Triton decides when triton.language is imported whether its functions run in the interpreter,
# so the switch must be on before anything imports triton.
if _requested_device(sys.argv) == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gconvgen import knobs  # noqa: E402

# dtype, atol, rtol travel together. Tolerances are against a float64 reference on inputs rounded to dtype.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@pytest.fixture(scope="session", autouse=True)
def interpreter_and_private_cache(request, tmp_path_factory):
    cache = tmp_path_factory.mktemp("gconvgen-cache")
    if request.config.getoption("--device") == "cuda":
        torch.set_default_device("cuda")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        with knobs.scoped(FALLBACK="error", CACHE_DIR=cache):
            yield
        return
    with knobs.scoped(INTERPRET=1, FALLBACK="error", CACHE_DIR=cache):
        yield


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None, help="seed for the random inputs (default: fresh each run)")
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="cpu: Triton's interpreter on CPU tensors (default); cuda: real Triton on the GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: about CPU behaviour (the interpreter, the aten fallback); "
                                       "skipped under --device cuda")
    if config.getoption("--seed") is None:
        config.option.seed = random.SystemRandom().randrange(2**31)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cuda":
        skip = pytest.mark.skip(reason="about CPU behaviour; this run is on the GPU")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)


def _seed_line(config) -> str:
    return f"gconvgen random inputs: --seed {config.getoption('--seed')} (pass it to reproduce)"


def pytest_report_header(config):
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed again at the end, where ``-q`` (which hides the header) shows it too."""
    terminalreporter.write_line(_seed_line(config))


@pytest.fixture(autouse=True)
def seed(request):
    """Fresh random inputs each run; the seed is in the report header and the summary to reproduce a failure."""
    torch.manual_seed(request.config.getoption("--seed"))
    yield


@pytest.fixture
def own_tuning_database(tmp_path):
    """A cache directory of this test's own: tuning in it writes records (on CPU, aten wins them) that would
    otherwise decide what later tests run."""
    from gconvgen import memo

    with knobs.scoped(CACHE_DIR=tmp_path / "gconvgen-cache"):
        yield
    memo.reset()


@pytest.fixture
def nan_filled_outputs():
    """torch.empty fills floats with NaN while deterministic algorithms are on, so any output element a
    kernel fails to write survives as NaN and assert_close catches it."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def reference_conv2d(x, weight, bias, stride, padding, dilation, groups):
    """torch.nn.functional.conv2d in float64 with four-sided padding (top, bottom, left, right), on contiguous
    copies (torch's float64 CPU backward refuses some channels_last operands)."""
    top, bottom, left, right = padding
    x64 = F.pad(x.double(), (left, right, top, bottom)).contiguous()
    return F.conv2d(x64, weight.double().contiguous(), None if bias is None else bias.double(), stride, 0,
                    dilation, groups)


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "some output elements were not written (NaN sentinel survived)"
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def depthwise_grad_weight_runs(family, channels, multiplier, batch, size, kernel, stride, padding, dilation, config,
                               dtype, layout, *, specials=(), splits=3):
    """The depthwise weight gradient of fresh random x and grad_out by ``family``'s kernel with ``config`` (run
    twice, each into a NaN-filled tensor, the batch's reduction in ``splits``), and torch's in float64. ``specials``:
    (flat index, value) pairs put into x."""
    from gconvgen.compiler.lowering import KERNEL, Choice
    from gconvgen.ir import ConvSpec
    from gconvgen.runtime import launch

    generator = torch.Generator().manual_seed(hash((channels, batch, size, kernel, stride)) % 2**31)
    out_channels = channels * multiplier
    x = torch.randn(batch, channels, *size, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    for index, value in specials:
        x.view(-1)[index] = value
    padded = F.pad(x.double(), (padding[2], padding[3], padding[0], padding[1]))
    out_size = F.conv2d(padded, torch.zeros(out_channels, 1, *kernel, dtype=torch.float64), None, stride, 0,
                        dilation, channels).shape
    grad_out = torch.randn(out_size, generator=generator, dtype=torch.float64).to(DTYPES[dtype])
    if layout == "nhwc":
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    expected = torch.nn.grad.conv2d_weight(padded, (out_channels, 1, *kernel), grad_out.double(), stride, 0, dilation,
                                           channels)
    spec = ConvSpec(channels, out_channels, channels, kernel, stride, padding, dilation, False, dtype, layout)
    runs = []
    for _ in range(2):
        grad_w = torch.full((out_channels, 1, *kernel), float("nan"), dtype=DTYPES[dtype])
        launch.grad_weight(spec, x, grad_out, grad_w, Choice(KERNEL, config, family), splits=splits)
        runs.append(grad_w)
    return runs, expected


def assert_same_every_run_and_close(runs, expected, dtype):
    """Two runs bitwise equal, every element written, within the dtype's tolerance of the largest magnitude."""
    assert torch.equal(runs[0], runs[1]), "two runs differ"
    assert not runs[0].isnan().any(), "an element was not written"
    scale = expected.abs().max().item() + 1.0
    tolerance = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert (runs[0].double() - expected).abs().max().item() <= tolerance * scale


def spy_on_kernels(monkeypatch, entry=lambda desc: desc) -> list:
    """``entry(desc)`` for every kernel loaded for a launch from now on (launch.kernel_of, replays included),
    where it is not None: what a test asserts ran."""
    from gconvgen.runtime import launch

    seen: list = []
    kernel_of = launch.kernel_of

    def spy(desc, target):
        recorded = entry(desc)
        if recorded is not None:
            seen.append(recorded)
        return kernel_of(desc, target)

    monkeypatch.setattr(launch, "kernel_of", spy)
    return seen


def forward_family(desc):
    """A forward kernel's family, else None (spy_on_kernels' entry for tests of the forward family)."""
    return desc.family if desc.kind == "forward" else None


# ---------------------------------------------------------------------------------------------- hypothesis
# Profiles of the differential fuzz (tests/test_fuzz.py). "ci", the default, keeps the whole file to about a
# minute on two idle CPU cores (two when busy); "long" draws 20 times the examples, for a kernel change
# before it lands:
#     pytest tests/test_fuzz.py --hypothesis-profile=long
# No deadline: the interpreter runs a kernel in tens of milliseconds to seconds, first calls also render it.
# Failing examples are kept in the repository's .hypothesis/ (git-ignored) and replayed first next run.
# Health checks off: too_slow (drawing a problem plans and lowers it to check its config) and
# function_scoped_fixture (the fixture the fuzz uses, nan_filled_outputs, holds no per-example state).
try:
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase
except ImportError:  # hypothesis comes with the test extras; without it only test_fuzz.py cannot run
    pass
else:
    _FUZZ_EXAMPLES = 40
    settings.register_profile(
        "ci", max_examples=_FUZZ_EXAMPLES, deadline=None, print_blob=True,
        database=DirectoryBasedExampleDatabase(
            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".hypothesis", "examples")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=20 * _FUZZ_EXAMPLES)
    settings.load_profile("ci")
