"""Codegen: a plan becomes Triton source through one Jinja environment (uri / gen).

``kernel_uri`` names a kernel readably and deterministically; ``render`` turns every decision into a
template constant and renders it. One plan renders three kernels from the same constants: the forward
conv and, for training, its grad-input and grad-weight; the bias gradient has one kernel per dtype.
Loading and caching the result is the runtime's job.
"""
from __future__ import annotations

import functools
import hashlib
from importlib import metadata

import jinja2

from .ir import DTYPES, check
from .plan import Plan
from .resources import data_dir

TEMPLATE_SCHEMA_VERSION = 1
TEMPLATES = {"igemm": "grouped_igemm.py.jinja", "depthwise": "depthwise_direct.py.jinja",
             "depthwise_gemm": "depthwise_gemm.py.jinja"}
# backward kernels: (kind, the plan's backward family) -> template
GRAD_TEMPLATES = {
    ("grad_input", "igemm"): "grouped_igemm_grad_input.py.jinja",
    ("grad_input", "depthwise"): "depthwise_grad_input.py.jinja",
    ("grad_weight", "igemm"): "grouped_igemm_grad_weight.py.jinja",
    ("grad_weight", "depthwise"): "depthwise_grad_weight.py.jinja",
}
GRAD_BIAS_TEMPLATE = "grad_bias.py.jinja"
KINDS = ("forward", "grad_input", "grad_weight")


@functools.cache
def gconvgen_version() -> str:
    """The installed package's version, or '0+source' for a checkout that is not installed."""
    try:
        return metadata.version("gconvgen")
    except metadata.PackageNotFoundError:
        return "0+source"


@functools.cache
def environment() -> jinja2.Environment:
    """The one Jinja environment: undefined names are errors, never empty strings."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(data_dir("templates")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@functools.cache
def templates_hash() -> str:
    """Hash of every template source and the schema version: part of every cache path."""
    digest = hashlib.sha256(str(TEMPLATE_SCHEMA_VERSION).encode())
    for path in sorted(data_dir("templates").glob("*.py.jinja")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def kernel_uri(plan: Plan, *, interpret: bool, allow_tf32: bool, kind: str = "forward") -> str:
    """A readable name that is unique for what the rendered source depends on: the spec, the lowered
    masks, the interpreter variant and, for float32, TF32 (``tf32``) or exact (no suffix) dot products.

    e.g. ``igemm_ci4_co4_g32_k3x3_s1x1_d1x1_p1111_nhwc_bfloat16_bias``; a backward kernel starts with its
    kind, e.g. ``grad_weight_depthwise_ci96_...``.
    """
    check(kind in KINDS, f"kind={kind!r} is not a kernel kind; use one of {KINDS}")
    spec, kernel = plan.spec, plan.kernel
    parts = [kernel["family"]] if kind == "forward" else [kind, kernel["backward_family"]]
    parts += [
        f"ci{spec.in_channels}", f"co{spec.out_channels}", f"g{spec.groups}",
        "k{}x{}".format(*spec.kernel_size), "s{}x{}".format(*spec.stride),
        "d{}x{}".format(*spec.dilation), "p" + "_".join(map(str, spec.padding)),
        spec.layout, spec.dtype,
    ]
    parts += [flag for flag, on in (("bias", spec.bias), ("maskin", kernel.get("mask_input_channels")),
                                    ("maskout", kernel.get("mask_output_channels")),
                                    ("tf32", _uses_tf32(spec.dtype, allow_tf32)), ("interp", interpret)) if on]
    return "_".join(parts)


def render(plan: Plan, *, interpret: bool, allow_tf32: bool, kind: str = "forward") -> str:
    """Render the Triton module for ``plan``: its forward kernel, or the backward kernel ``kind``
    ('grad_input' or 'grad_weight'). ``interpret`` selects the interpreter-safe variant."""
    spec, kernel = plan.spec, plan.kernel
    check(kind in KINDS, f"kind={kind!r} is not a kernel kind; use one of {KINDS}")
    name = TEMPLATES[kernel["family"]] if kind == "forward" else GRAD_TEMPLATES[kind, kernel["backward_family"]]
    kernel_taps = spec.kernel_size[0] * spec.kernel_size[1]
    return environment().get_template(name).render(
        version=gconvgen_version(),
        spec=spec,
        kernel_name=kernel_name(plan, interpret=interpret, allow_tf32=allow_tf32, kind=kind),
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        groups=spec.groups,
        in_channels_per_group=spec.in_channels_per_group,
        out_channels_per_group=spec.out_channels_per_group,
        kernel_size=spec.kernel_size,
        kernel_taps=kernel_taps,
        # forward and grad-weight reduce over (input channel of the group, tap); grad-input over (output channel, tap)
        reduction_size=spec.in_channels_per_group * kernel_taps,
        transposed_reduction_size=spec.out_channels_per_group * kernel_taps,
        stride=spec.stride,
        dilation=spec.dilation,
        window_width=(spec.kernel_size[1] - 1) * spec.dilation[1] + 1,  # input columns one output column reads
        padding_top=spec.padding[0],
        padding_left=spec.padding[2],
        has_bias=spec.bias,
        mask_input_channels=kernel.get("mask_input_channels", False),
        mask_output_channels=kernel.get("mask_output_channels", False),
        x_channels_contiguous=spec.layout == "nhwc",
        x_width_contiguous=spec.layout == "nchw",
        channel_innermost=spec.layout == "nhwc",
        accumulator=_accumulator(spec.dtype),
        # bf16 tl.dot is wrong under Triton's interpreter; the GPU path keeps bf16 tensor-core operands
        dot_in_float32=interpret and spec.dtype == "bfloat16",
        # fp32 follows torch's cuDNN setting so results match F.conv2d's precision; fp64 is always exact
        input_precision="tf32" if _uses_tf32(spec.dtype, allow_tf32) else "ieee",
    )


def kernel_name(plan: Plan, *, interpret: bool, allow_tf32: bool, kind: str = "forward") -> str:
    """The Triton function's name in the rendered module: ``gconvgen_`` + its uri."""
    return "gconvgen_" + kernel_uri(plan, interpret=interpret, allow_tf32=allow_tf32, kind=kind)


def _uses_tf32(dtype: str, allow_tf32: bool) -> bool:
    """float32 dot products run on TF32 tensor cores when torch's cuDNN setting allows it (as F.conv2d
    does); half types are unaffected and float64 is always exact."""
    return dtype == "float32" and allow_tf32


# ---------------------------------------------------------------------------------------------- grad-bias
# The bias gradient is a per-channel sum of the output gradient: it depends on the dtype alone, so every
# conv of one dtype shares one kernel.


def grad_bias_uri(dtype: str, *, interpret: bool) -> str:
    """e.g. ``grad_bias_bfloat16``, ``grad_bias_float64_interp``."""
    check(dtype in DTYPES, f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    return f"grad_bias_{dtype}" + ("_interp" if interpret else "")


def render_grad_bias(dtype: str, *, interpret: bool) -> str:
    """Render the Triton module of the bias-gradient kernel for ``dtype``."""
    return environment().get_template(GRAD_BIAS_TEMPLATE).render(
        version=gconvgen_version(),
        dtype=dtype,
        kernel_name="gconvgen_" + grad_bias_uri(dtype, interpret=interpret),
        accumulator=_accumulator(dtype),
    )


def _accumulator(dtype: str) -> str:
    """float64 sums in float64 (what gradcheck needs); every other dtype sums in float32."""
    return "tl.float64" if dtype == "float64" else "tl.float32"
