"""Shared test set-up: every test runs the generated kernels through Triton's interpreter on CPU tensors,
with a private cache directory and fallbacks forbidden, so a passing test proves a kernel ran."""
from __future__ import annotations

import os

# Triton decides when triton.language is imported whether its functions run in the interpreter,
# so the switch must be on before anything imports triton.
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
def interpreter_and_private_cache(tmp_path_factory):
    with knobs.scoped(INTERPRET=1, FALLBACK="error", CACHE_DIR=tmp_path_factory.mktemp("gconvgen-cache")):
        yield


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def reference_conv2d(x, weight, bias, stride, padding, dilation, groups):
    """torch.nn.functional.conv2d in float64 with four-sided padding (top, bottom, left, right)."""
    top, bottom, left, right = padding
    x64 = F.pad(x.double(), (left, right, top, bottom))
    return F.conv2d(x64, weight.double(), None if bias is None else bias.double(), stride, 0, dilation, groups)


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "some output elements were not written (NaN sentinel survived)"
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)
