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
