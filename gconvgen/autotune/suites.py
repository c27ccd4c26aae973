"""Layer suites: real model layers to tune and benchmark, read from tuning/suites/<name>.json or any file.

A suite names its layers (id, model, source, channels, groups, kernel, stride, padding, batch, size), its
dtype and its layouts. A layer may carry a ``later`` note saying why it is kept but not run yet. 1-D layers
(``"dims": 1``) run as 2-D problems of height 1, as gconvgen.conv1d runs them: kernel (1, k), input
(1, size), padding (0, 0, left, right); ``"causal": true`` pads (kernel - 1) * dilation on the left only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..ir import LAYOUTS, ConvSpec, check, fail
from ..resources import data_dir
from .space import Problem

SUITE_SCHEMA_VERSION = 1
_REQUIRED = ("id", "in_channels", "out_channels", "groups", "kernel", "batch", "size")
_OPTIONAL = {"model": "", "source": "", "layer": "", "stride": 1, "padding": 0, "dilation": 1, "bias": False,
             "dims": 2, "causal": False, "later": ""}


@dataclass(frozen=True)
class Layer:
    """One real layer: square kernel, stride, symmetric padding and input size, as model sources give them.

    A 1-D layer (dims=1) has a kernel, stride, padding and length (``size``) along its one dimension. A
    causal one (``causal``, 1-D only) keeps the model's nn.Conv1d padding of (kernel - 1) * dilation on the
    left and none on the right: the first ``size`` outputs of the model's conv, exactly (what Mamba keeps)."""

    id: str
    in_channels: int
    out_channels: int
    groups: int
    kernel: int
    batch: int
    size: int
    model: str = ""
    source: str = ""
    layer: str = ""
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    bias: bool = False
    dims: int = 2
    causal: bool = False  # 1-D: all padding on the left, the output as long as the input (at stride 1)
    later: str = ""   # why this layer is kept for later; empty when it runs now

    def spec(self, dtype: str, layout: str) -> ConvSpec:
        """The layer's ConvSpec in ``dtype`` and activation ``layout`` (a 1-D layer's is the height-1 2-D one)."""
        pad = self.padding
        if self.dims == 1:
            left, right = (pad, 0) if self.causal else (pad, pad)
            return ConvSpec(self.in_channels, self.out_channels, self.groups, (1, self.kernel), (1, self.stride),
                            (0, 0, left, right), (1, self.dilation), self.bias, dtype, layout)
        return ConvSpec(self.in_channels, self.out_channels, self.groups, (self.kernel, self.kernel),
                        (self.stride, self.stride), (pad, pad, pad, pad), (self.dilation, self.dilation), self.bias,
                        dtype, layout)

    def problem(self, dtype: str, layout: str) -> Problem:
        """The layer at its batch and input size (1 x size for a 1-D layer)."""
        return Problem(self.spec(dtype, layout), self.batch, 1 if self.dims == 1 else self.size, self.size)


@dataclass(frozen=True)
class Suite:
    """A named list of layers with the dtype and layouts they are measured in."""

    name: str
    about: str
    dtype: str
    layouts: tuple[str, ...]
    layers: tuple[Layer, ...]

    @property
    def runnable(self) -> tuple[Layer, ...]:
        """The layers gconvgen runs now (those without a ``later`` note)."""
        return tuple(layer for layer in self.layers if not layer.later)

    @property
    def deferred(self) -> tuple[Layer, ...]:
        """The layers kept for later, with their ``later`` note."""
        return tuple(layer for layer in self.layers if layer.later)

    def select(self, layer_ids: tuple[str, ...]) -> "Suite":
        """This suite restricted to ``layer_ids`` (all when empty); raises ValueError naming unknown ids."""
        if not layer_ids:
            return self
        known = [layer.id for layer in self.layers]
        unknown = [layer_id for layer_id in layer_ids if layer_id not in known]
        if unknown:
            fail(f"layer={unknown[0]!r} is not in suite {self.name!r}; its layers: {', '.join(known)}")
        return Suite(self.name, self.about, self.dtype, self.layouts,
                     tuple(layer for layer in self.layers if layer.id in layer_ids))


def suite_names() -> list[str]:
    """The suites shipped in tuning/suites/."""
    return sorted(path.stem for path in (data_dir("tuning") / "suites").glob("*.json"))


def suite_path(name_or_file: str) -> Path:
    """A shipped suite's file by name, or the path of a suite file; raises FileNotFoundError saying which exist."""
    shipped = data_dir("tuning") / "suites" / f"{name_or_file}.json"
    if shipped.is_file():
        return shipped
    path = Path(name_or_file).expanduser()
    check(path.is_file(), f"suite={name_or_file!r} is neither a shipped suite ({', '.join(suite_names())}) nor a "
                          f"suite file; pass one of those names or the path of a JSON suite", FileNotFoundError)
    return path


def _layer(raw: object, where: str) -> Layer:
    check(isinstance(raw, dict), f"{where} must be an object, got {raw!r}")
    missing = [name for name in _REQUIRED if name not in raw]
    check(not missing, f"{where} lacks {', '.join(missing)}; every layer needs {', '.join(_REQUIRED)}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        fail(f"{where} has unknown field {unknown[0]!r}; known: {', '.join([*_REQUIRED, *_OPTIONAL])}")
    values = {**_OPTIONAL, **raw}
    for name in ("in_channels", "out_channels", "groups", "kernel", "batch", "size", "stride", "dilation", "dims"):
        check(isinstance(values[name], int) and not isinstance(values[name], bool) and values[name] >= 1,
              f"{where}: {name}={values[name]!r} must be an int >= 1")
    check(isinstance(values["padding"], int) and values["padding"] >= 0,
          f"{where}: padding={values['padding']!r} must be an int >= 0")
    check(values["dims"] in (1, 2), f"{where}: dims={values['dims']!r} must be 1 or 2")
    check(isinstance(values["causal"], bool), f"{where}: causal={values['causal']!r} must be true or false")
    if values["causal"]:
        check(values["dims"] == 1, f"{where}: causal=true needs dims=1 (a causal conv is 1-D)")
        left = (values["kernel"] - 1) * values["dilation"]
        check(values["padding"] == left,
              f"{where}: a causal layer's padding={values['padding']} must be (kernel - 1) * dilation = {left}, "
              f"the model's nn.Conv1d padding, all of it on the left")
    return Layer(**values)


def load_suite(name_or_file: str) -> Suite:
    """Read a suite by shipped name ('headline', 'secondary', 'offsuite', 'sequence', 'smoke') or from a JSON file.

    Raises FileNotFoundError for an unknown name, ValueError for a malformed file (naming the field).
    """
    path = suite_path(name_or_file)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"suite file {path} is not valid JSON: {error}") from None
    check(isinstance(data, dict) and data.get("schema_version") == SUITE_SCHEMA_VERSION,
          f"suite file {path}: schema_version must be {SUITE_SCHEMA_VERSION}")
    layouts = tuple(data.get("layouts", ("nchw", "nhwc")))
    check(all(layout in LAYOUTS for layout in layouts),
          f"suite file {path}: layouts={list(layouts)} must be from {LAYOUTS}")
    layers = tuple(_layer(raw, f"{path} layer #{index}") for index, raw in enumerate(data.get("layers", [])))
    ids = [layer.id for layer in layers]
    check(len(set(ids)) == len(ids),
          f"suite file {path}: layer ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return Suite(data.get("suite", path.stem), data.get("about", ""), data.get("dtype", "bfloat16"), layouts, layers)
