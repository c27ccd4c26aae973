"""gconvgen: a code-generating compiler for grouped and depthwise convolutions.

One conv travels api -> ir (ConvSpec) -> plan (networkx pass graph) -> codegen (Jinja -> Triton)
-> runtime (disk cache, launch, torch custom op, and its backward ops for training).
``gconvgen.conv1d`` runs a 1-D conv as the 2-D one with height 1 (api1d.py), and
``causal_conv1d_update`` is its one-step decoding form (decoding.py).
``gconvgen.convert(model)`` switches a model's grouped convs over; ``import gconvgen.compile`` registers
the torch.compile backend "gconvgen" where the package's entry point is not installed.
"""
from .api import CompiledLayer, GroupedConv2d, compile_layer, conv2d, resolve_padding
from .api1d import GroupedConv1d, conv1d
from .codegen import gconvgen_version
from .conversion import ConversionReport, convert
from .decoding import causal_conv1d_update
from .ir import ConvSpec
from .plan import Plan, padding_overhead, plan, suggest_groups
from .runtime import backward as _backward  # noqa: F401  (registers gconvgen::conv2d's autograd formula)

__version__ = gconvgen_version()

__all__ = [
    "CompiledLayer", "ConversionReport", "ConvSpec", "GroupedConv2d", "Plan", "compile_layer", "conv2d", "convert",
    "padding_overhead", "plan", "resolve_padding", "suggest_groups",
    "GroupedConv1d", "causal_conv1d_update", "conv1d",
]
