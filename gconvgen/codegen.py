"""Codegen: a plan becomes Triton source through one Jinja environment (uri / gen).

``kernel_uri`` names a kernel readably and deterministically; ``render`` turns every decision into a
template constant and renders it. Loading and caching the result is the runtime's job.
"""
from __future__ import annotations

import functools
import hashlib
from importlib import metadata

import jinja2

from .plan import Plan
from .resources import data_dir

TEMPLATE_SCHEMA_VERSION = 1
TEMPLATES = {"igemm": "grouped_igemm.py.jinja", "depthwise": "depthwise_direct.py.jinja"}


@functools.cache
def gconvgen_version() -> str:
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


def kernel_uri(plan: Plan, *, interpret: bool) -> str:
    """A readable name that is unique for what the rendered source depends on.

    e.g. ``igemm_ci4_co4_g32_k3x3_s1x1_d1x1_p1111_nhwc_bfloat16_bias``.
    """
    spec, kernel = plan.spec, plan.kernel
    parts = [
        kernel["family"],
        f"ci{spec.in_channels}", f"co{spec.out_channels}", f"g{spec.groups}",
        "k{}x{}".format(*spec.kernel_size), "s{}x{}".format(*spec.stride),
        "d{}x{}".format(*spec.dilation), "p" + "_".join(map(str, spec.padding)),
        spec.layout, spec.dtype,
    ]
    parts += [flag for flag, on in (("bias", spec.bias), ("maskin", kernel.get("mask_input_channels")),
                                    ("maskout", kernel.get("mask_output_channels")), ("interp", interpret)) if on]
    return "_".join(parts)


def render(plan: Plan, *, interpret: bool, allow_tf32: bool) -> str:
    """Render the Triton module for ``plan``. ``interpret`` selects the interpreter-safe variant."""
    spec, kernel = plan.spec, plan.kernel
    template = environment().get_template(TEMPLATES[kernel["family"]])
    return template.render(
        version=gconvgen_version(),
        spec=spec,
        kernel_name=kernel_name(plan, interpret=interpret),
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        in_channels_per_group=spec.in_channels_per_group,
        out_channels_per_group=spec.out_channels_per_group,
        kernel_size=spec.kernel_size,
        kernel_taps=spec.kernel_size[0] * spec.kernel_size[1],
        reduction_size=spec.in_channels_per_group * spec.kernel_size[0] * spec.kernel_size[1],
        stride=spec.stride,
        dilation=spec.dilation,
        padding_top=spec.padding[0],
        padding_left=spec.padding[2],
        has_bias=spec.bias,
        mask_input_channels=kernel.get("mask_input_channels", False),
        mask_output_channels=kernel.get("mask_output_channels", False),
        x_channels_contiguous=spec.layout == "nhwc",
        x_width_contiguous=spec.layout == "nchw",
        channel_innermost=spec.layout == "nhwc",
        # bf16 tl.dot is wrong under Triton's interpreter; the GPU path keeps bf16 tensor-core operands
        dot_in_float32=interpret and spec.dtype == "bfloat16",
        # fp32 follows torch's cuDNN setting so results match F.conv2d's precision
        input_precision="ieee" if spec.dtype == "float32" and not allow_tf32 else "tf32",
    )


def kernel_name(plan: Plan, *, interpret: bool) -> str:
    return "gconvgen_" + kernel_uri(plan, interpret=interpret)
