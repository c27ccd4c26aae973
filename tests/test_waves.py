"""Default configs fill the device: off the interpreter, a forward or grad-input default shrinks its tiles
(pixels first, then channels, by halves) until its grid has two waves of an H200's 132 SMs, and never below
the family's floor (tiles.filled, tiles.keeps_floor). Lowering only: nothing is rendered or run."""
from __future__ import annotations

import dataclasses
import math

import pytest

from gconvgen.ir import ConvSpec
from gconvgen.compiler.lowering import Choice, PixelSpace, check_config, default_config, lower
from gconvgen.compiler.plan import plan
from gconvgen.compiler.families import programs_of
from gconvgen.compiler.tiles import DEFAULT_WAVES, H200_SMS

P = pytest.param
TWO_WAVES = DEFAULT_WAVES * H200_SMS


def _depthwise(channels, kernel, layout, dtype="bfloat16"):
    pad = kernel // 2
    return ConvSpec(channels, channels, channels, (kernel, kernel), padding=(pad, pad, pad, pad), dtype=dtype,
                    layout=layout)


def _grouped(channels, groups, layout, stride=1):
    return ConvSpec(channels, channels, groups, (3, 3), (stride, stride), (1, 1, 1, 1), dtype="bfloat16",
                    layout=layout)


def _causal(channels, kernel, layout):
    return ConvSpec(channels, channels, channels, (1, kernel), padding=(0, 0, kernel - 1, 0), dtype="bfloat16",
                    layout=layout)


# kind, spec, (batch, height, width) of the input, family, the floor's (block_m, block_n) where even it has
# fewer than two waves (None: two waves are reached)
CASES = [
    P("forward", _grouped(128, 32, "nhwc"), (64, 56, 56), "igemm", None, id="resnext50-l1-n64"),  # large: as is
    P("forward", _grouped(512, 32, "nchw"), (1, 14, 14), "igemm", None, id="resnext50-l3-n1-nchw"),
    P("grad_input", _grouped(896, 16, "nhwc"), (1, 14, 14), "igemm", None, id="regnety8gf-s3-n1"),
    P("forward", _grouped(256, 32, "nhwc", stride=2), (1, 56, 56), "igemm", None, id="resnext50-l2-s2-n1"),
    P("forward", _grouped(64, 4, "nhwc"), (1, 4, 4), "igemm", (16, 16), id="tiny-igemm-floor"),
    P("forward", _depthwise(144, 3, "nhwc"), (1, 56, 56), "depthwise", None, id="mbv2-dw3-n1"),
    P("forward", _depthwise(240, 5, "nhwc"), (1, 28, 28), "depthwise", None, id="effb0-dw5-n1-row-tiles"),  # a program a row
    P("grad_input", _depthwise(240, 5, "nchw"), (1, 28, 28), "depthwise", None, id="effb0-dw5-n1-nchw"),
    P("forward", _depthwise(240, 5, "nhwc", "float32"), (1, 28, 28), "depthwise", None,
      id="effb0-dw5-n1-fp32"),                                                  # 4-float vectors: a floor of 8 x 64
    P("forward", _depthwise(96, 7, "nhwc"), (1, 56, 56), "depthwise_gemm", (16, 8), id="convnext-dw7-n1-floor"),
    P("forward", _depthwise(96, 7, "nchw"), (1, 56, 56), "depthwise_gemm", (16, 1),
      id="convnext-dw7-n1-nchw"),                                               # sliding down the rows: 96 programs
    P("forward", _depthwise(96, 7, "nhwc", "float32"), (1, 56, 56), "depthwise_gemm", None,
      id="convnext-dw7-n1-fp32"),                                               # strips of 16: two waves at 16 x 4
    P("forward", _depthwise(768, 7, "nhwc"), (64, 7, 7), "depthwise_gemm", None, id="convnext-dw7-768-n64"),
    P("forward", _causal(5120, 4, "nhwc"), (1, 1, 64), "depthwise1d", None, id="mamba-n1-l64"),
    P("forward", _causal(8, 4, "nchw"), (1, 1, 16), "depthwise1d", (8, 8), id="tiny-depthwise1d-floor"),
]


def _lowered(kind, spec, size, family, pixels):
    """The description of ``family``'s default (a forward family the planner offers), and the pixels it tiles."""
    batch, height, width = size
    space = PixelSpace.of(kind, batch, height, width, *spec.output_size(height, width))
    desc = lower(plan(spec), kind, choice=Choice("default", None, family), interpret=False, allow_tf32=False,
                 pixels=space if pixels else None)
    return desc, space


@pytest.mark.parametrize("kind, spec, size, family, floor", CASES)
def test_default_grid_fills_two_waves_or_keeps_the_floor(kind, spec, size, family, floor):
    desc, pixels = _lowered(kind, spec, size, family, pixels=True)
    config, programs = desc.config, math.prod(desc.grid(pixels))
    assert desc.family == family
    check_config(config, family)
    if floor is None:
        assert programs >= TWO_WAVES, (config, programs)
    else:
        assert programs < TWO_WAVES and (config.block_m, config.block_n) == floor, (config, programs)
    if family in ("igemm", "depthwise_gemm"):
        assert config.block_m >= 16 and (family == "depthwise_gemm" or config.block_n >= 16)  # tl.dot sides
    if spec.layout == "nhwc" and family != "igemm":
        assert config.block_n * {"bfloat16": 2, "float32": 4}[spec.dtype] >= 16  # whole 16-byte channel vectors


@pytest.mark.parametrize("kind, spec, size, family, floor", CASES)
def test_a_tile_shrinks_only_until_two_waves(kind, spec, size, family, floor):
    """The spec's own default where it already fills two waves; otherwise each halving was needed: the tile
    with its last halved side doubled back has fewer than two waves."""
    desc, pixels = _lowered(kind, spec, size, family, pixels=True)
    unshrunk, _ = _lowered(kind, spec, size, family, pixels=False)
    if math.prod(unshrunk.grid(pixels)) >= TWO_WAVES:
        assert desc.config == unshrunk.config
        return
    config = desc.config
    if config == unshrunk.config:  # the spec's default is its own floor
        assert floor is not None
        return
    side = "block_n" if config.block_n < unshrunk.config.block_n else "block_m"
    doubled = dataclasses.replace(config, **{side: 2 * getattr(config, side)})
    assert programs_of(doubled, spec, family, kind, pixels) < TWO_WAVES, (config, side)


def test_reductions_and_the_interpreter_keep_their_defaults():
    """grad-weight splits its pixels to fill the device (launch.split_pixels), and under the interpreter each
    program costs milliseconds: neither default reads the pixels."""
    spec = _depthwise(96, 7, "nhwc")
    tiny = PixelSpace(1, 7)
    for family, kind, interpret in (("depthwise", "grad_weight", False), ("depthwise_gemm", "forward", True),
                                    ("igemm", "forward", True)):
        assert (default_config(spec, family, kind, interpret=interpret, pixels=tiny)
                == default_config(spec, family, kind, interpret=interpret))
    assert default_config(None, "reduce", "grad_bias", interpret=False, pixels=tiny) == default_config(
        None, "reduce", "grad_bias", interpret=False)
