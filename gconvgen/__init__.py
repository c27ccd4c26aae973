"""gconvgen: a code-generating compiler for grouped and depthwise convolutions.

One conv travels api -> ir (ConvSpec) -> plan (networkx pass graph) -> codegen (Jinja -> Triton)
-> runtime (disk cache, launch, torch custom op, and its backward ops for training).
``gconvgen.convert(model)`` switches a model's grouped convs over; ``import gconvgen.compile`` registers
the torch.compile backend "gconvgen" where the package's entry point is not installed.
"""
from .api import CompiledLayer, GroupedConv2d, compile_layer, conv2d, resolve_padding
from .codegen import gconvgen_version
from .conversion import ConversionReport, convert
from .ir import ConvSpec
from .plan import Plan, padding_overhead, plan, suggest_groups
from .runtime import backward as _backward  # noqa: F401  (registers gconvgen::conv2d's autograd formula)

__version__ = gconvgen_version()

__all__ = [
    "CompiledLayer", "ConversionReport", "ConvSpec", "GroupedConv2d", "Plan", "compile_layer", "conv2d", "convert",
    "padding_overhead", "plan", "resolve_padding", "suggest_groups",
]
