"""Codegen: a lowered kernel description becomes Triton source through one Jinja environment.

``render(desc)`` fills the description's template; the uri (``desc.uri``) names the result. The templates
only fill values and branch on them: every decision is a field of the KernelDesc (lowering.py), and the
signature comes from the kind's argument table (arguments.py). Loading and caching is the runtime's job.
"""
from __future__ import annotations

import hashlib
import math
from importlib import metadata

import jinja2

from ..memo import memoized
from ..activations import ACTIVATIONS, triton_expression
from .arguments import CONSTEXPRS
from .lowering import KernelDesc
from ..resources import data_dir

TEMPLATE_SCHEMA_VERSION = 2


@memoized()
def gconvgen_version() -> str:
    """The installed package's version, or '0+source' for a checkout that is not installed."""
    try:
        return metadata.version("gconvgen")
    except metadata.PackageNotFoundError:
        return "0+source"


@memoized()
def environment() -> jinja2.Environment:
    """The one Jinja environment: undefined names are errors, never empty strings; ``gcd`` is math.gcd (the
    period of the taps reaching a phase of the stride)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(data_dir("templates")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals["gcd"] = math.gcd
    return env


@memoized()
def templates_hash(names: tuple[str, ...] = ()) -> str:
    """Hash of the template sources ``names`` (default: every template, the shared macros included), the
    activations' Triton expressions they are filled with and the schema version: part of every cache path
    and tuning key."""
    folder = data_dir("templates")
    paths = [folder / name for name in names] if names else sorted(folder.glob("*.jinja"))
    paths += [folder / "_shared.jinja"] if names else []
    digest = hashlib.sha256(str(TEMPLATE_SCHEMA_VERSION).encode())
    digest.update(repr(sorted((row.name, row.triton) for row in ACTIVATIONS.values())).encode())
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def render(desc: KernelDesc) -> str:
    """The Triton module of ``desc``: its template filled with the description and its argument table."""
    check_renderable(desc)
    return environment().get_template(desc.template).render(
        version=gconvgen_version(), desc=desc, spec=desc.spec, kernel_name=desc.kernel_name,
        arguments=desc.arguments, constexprs=CONSTEXPRS, activation_expression=triton_expression(desc.activation),
    )


def check_renderable(desc: KernelDesc) -> None:
    """Refuse anything but a KernelDesc: templates read its fields and nothing else."""
    if not isinstance(desc, KernelDesc):
        raise TypeError(f"render takes a gconvgen KernelDesc, got {type(desc).__name__}")
