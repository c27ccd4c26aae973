"""gconvgen: a code-generating compiler for grouped and depthwise convolutions.

One conv travels nn (``conv2d``: checks, layouts) -> ops (the torch custom ops) -> autotune (the choice)
-> runtime (the launcher) -> compiler (ConvSpec -> plan -> KernelDesc -> Jinja -> Triton); ARCHITECTURE.md
walks it. ``gconvgen.conv1d`` runs a 1-D conv as the 2-D one with height 1 (nn/conv1d.py), and
``causal_conv1d_update`` is its one-step decoding form (nn/decoding.py).
``gconvgen.convert(model)`` switches a model's grouped convs over, and ``gconvgen.fuse(model)`` also folds
their BatchNorms and absorbs their activations; ``import gconvgen.integrations.compile`` registers
the torch.compile backend "gconvgen" where the package's entry point is not installed.
``gconvgen.tune(model, example_inputs)`` tunes the grouped convs one forward of a model runs, and
``gconvgen.report(model, example_inputs)`` says which kernel each ran and times it against PyTorch.

``import gconvgen`` in a process without torch imports neither torch nor Triton, so ``gconvgen --help``
answers at once: the IR and the planner load now, and the names that need torch (``conv2d``,
``GroupedConv2d``, ``convert``, ...) load on first use (PEP 562), together with ``gconvgen.ops``, which
registers the ``gconvgen::`` ops and their autograd formulas. Where torch is imported already (a training
script, torch.compile loading the "gconvgen" backend) they load at once, as they cost little then: every
path to the op finds it differentiable.
"""
from __future__ import annotations

import importlib
import sys

# torch-free and cheap; imported now so that ``gconvgen.plan`` is the function, never the submodule
from .ir import ConvSpec
from .compiler.plan import Plan, padding_overhead, plan, suggest_groups

# the names that need torch, and the module each lives in
_TORCH_NAMES = {
    "CompiledLayer": "nn.layers", "GroupedConv2d": "nn.conv2d", "compile_layer": "nn.layers", "conv2d": "nn.conv2d",
    "resolve_padding": "nn.conv2d", "ConversionReport": "nn.convert", "convert": "nn.convert",
    "FusionReport": "nn.fuse", "fuse": "nn.fuse", "GroupedConv1d": "nn.conv1d", "conv1d": "nn.conv1d",
    "causal_conv1d_update": "nn.decoding", "tune": "tools.model_tuning", "report": "tools.model_report",
}

__all__ = [
    "CompiledLayer", "ConversionReport", "ConvSpec", "FusionReport", "GroupedConv2d", "Plan", "compile_layer",
    "conv2d", "convert", "fuse",
    "padding_overhead", "plan", "resolve_padding", "suggest_groups",
    "GroupedConv1d", "causal_conv1d_update", "conv1d", "report", "tune",
]


def _load_torch_names() -> None:
    """Import the torch-side API into this module, and the backward ops that give gconvgen::conv2d its
    autograd formula (a first call of conv2d can then be differentiated)."""
    importlib.import_module(".ops", __name__)
    for name, module in _TORCH_NAMES.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name: str) -> object:
    """The torch-side names and ``__version__`` on first use; any other name is looked up as a submodule
    (``gconvgen.knobs``), so attribute access behaves as it did when everything was imported eagerly.

    Raises AttributeError for a name that is neither.
    """
    if name in _TORCH_NAMES:
        _load_torch_names()
        return globals()[name]
    if name == "__version__":
        from .compiler.codegen import gconvgen_version

        globals()["__version__"] = gconvgen_version()
        return globals()["__version__"]
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise  # the submodule exists but something it imports does not
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "__version__"})


if "torch" in sys.modules:
    _load_torch_names()
