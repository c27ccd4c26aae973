"""The implicit-GEMM family (templates/grouped_igemm*.py.jinja): grouped convs wider than one input channel
per group, on tensor cores. Per group: [pixels, K] x [K, out channels], K = (tap, in_channels_per_group),
reduced tap by tap; narrow groups are packed GROUP_BLOCK to a program with a block-diagonal weight tile."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from ...ir import ConvSpec
from ..tiles import ELEMENT_BYTES, KernelConfig, PixelSpace, cdiv, pow2_between
from .base import Family

DOT_SIDES = (16, 512)  # (least side of a tl.dot operand, largest side); tl.dot needs 16
# A warp's least share of an igemm accumulator: one 16x16 tensor-core tile. A shrunk tile runs fewer warps
# rather than warps that repeat each other's work.
_ACCUMULATOR_ELEMENTS_PER_WARP = 16 * 16


def packed_channels(spec: ConvSpec, kind: str) -> int:
    """The channels per group that an igemm kernel's channel tile packs: input channels for grad-input,
    output channels for the forward and grad-weight."""
    return spec.in_channels_per_group if kind == "grad_input" else spec.out_channels_per_group


def _uneven(channels: int) -> bool:
    """Groups of a channel count that is not a power of two (RegNetY's 24 and 56) leave part of every channel
    step masked, and the masked tiles' per-element indices spill at 255 registers on 4 warps in sm_90's
    allocation (RegNetY-1.6GF stage 4: 64 B forward and grad-input, 44 B grad-weight); 8 warps hold them."""
    return channels & (channels - 1) != 0


def _reduction_step(channels: int, widest: int) -> int:
    """The channels of a reduction step (at least tl.dot's 16, at most ``widest``): the widest power of two that
    pads ``channels`` to the fewest (48 channels take 3 steps of 16, not 2 of 32 with a third of them masked)."""
    steps = [1 << bits for bits in range(4, widest.bit_length())]
    return min(reversed(steps), key=lambda step: cdiv(channels, step) * step)


class Igemm(Family):
    name = "igemm"
    templates = {"forward": "grouped_igemm.py.jinja", "grad_input": "grouped_igemm_grad_input.py.jinja",
                 "grad_weight": "grouped_igemm_grad_weight.py.jinja"}
    limits = {"block_m": DOT_SIDES, "block_n": DOT_SIDES, "block_k": DOT_SIDES}

    def rank(self, spec: ConvSpec) -> Optional[int]:
        """Every conv wider than one input channel per group; the default but where igemm_rows ranks first
        (taller windows of narrow groups: it reads each input row once for every kernel row)."""
        return None if spec.is_depthwise else 1

    def computes_backward(self, spec: ConvSpec) -> bool:
        return not spec.is_depthwise

    def default_config(self, spec: Optional[ConvSpec], kind: str, *, interpret: bool) -> KernelConfig:
        """Forward (pixels, output channels, reduction); grad-input (input pixels, input channels, reduction);
        grad-weight (output channels, weight columns, pixels)."""
        if kind == "grad_weight":  # NCHW activations are staged channels_last as well
            return self._grad_weight_config(spec, interpret)
        channels = pow2_between(packed_channels(spec, kind), 16, 128)
        return self._config(spec, kind, self.default_pixels(channels, interpret), channels, interpret=interpret)

    def default_pixels(self, channels: int, interpret: bool) -> int:
        """The forward and grad-input tile's pixels at ``channels`` channels: each program reads the weight
        tile of every step, so up to 64 channels 256 pixels halve those reads (wav2vec2's positional conv, 128
        taps of 48 channels a group: 13.0% of its floor modelled at 128 pixels, 20.3% at 256; ResNeXt-101's
        strided grad-input 28.8 against 32.5% in channels_last)."""
        return 256 if interpret or channels <= 64 else 128

    def _grad_weight_config(self, spec: ConvSpec, interpret: bool) -> KernelConfig:
        """(output channels, weight columns, pixels a step): up to 64 x 64 accumulators on 4 warps; columns of
        many taps (wider than 64) up to 256 on 8 warps, so that each grad_out tile serves more of them, in steps
        of 32 pixels (wav2vec2's positional conv, 48 x 128 columns a group: 13.0% of its floor modelled at 64
        columns, 20.6% at 256)."""
        outputs = pow2_between(spec.out_channels_per_group, 16, 64)
        columns = pow2_between(spec.in_channels_per_group * self.taps(spec), 16, 64 if interpret else 256)
        wide = columns > 64
        warps = 8 if (wide or _uneven(spec.out_channels_per_group)) and not interpret else 4
        step = 256 if interpret else 32 if wide else 64
        return KernelConfig(outputs, columns, step, num_warps=warps, num_stages=1 if interpret else 3)

    def _config(self, spec: ConvSpec, kind: str, block_m: int, block_n: int, *, interpret: bool) -> KernelConfig:
        """The forward or grad-input config of tile (block_m pixels, block_n channels of the packed groups):
        the reduction runs tap by tap, a step is block_k channels of the packed groups. An NCHW activation is
        staged channels_last, but an NCHW output is stored along the width: a 128 x 64 accumulator takes 8
        warps to convert for that store without spills."""
        reduced = spec.out_channels_per_group if kind == "grad_input" else spec.in_channels_per_group
        tile = KernelConfig(block_m, block_n, 16, num_stages=1 if interpret else 3)
        packed = self.groups_per_program(spec, tile, kind)
        wide_store = spec.layout != "nhwc" and block_m * block_n >= 128 * 64 and not interpret
        # past 128 x 64 accumulators, 4 warps would hold 128 fp32 registers of them a thread
        wide = block_m * block_n > 128 * 64 and not interpret
        warps = min(8 if wide or wide_store or (_uneven(reduced) and not interpret) else 4,
                    max(1, block_m * block_n // _ACCUMULATOR_ELEMENTS_PER_WARP))
        return replace(tile, block_k=self.reduction_step(packed * reduced, interpret), num_warps=warps)

    def reduction_step(self, channels: int, interpret: bool) -> int:
        """The channels of a forward or grad-input reduction step over ``channels`` channels of the packed
        groups: on a GPU the power of two up to 32 that pads them least (_reduction_step)."""
        if interpret:  # few, large steps
            return pow2_between(channels, 16, 64)
        return _reduction_step(channels, 32)

    def reads_aligned_rows(self, spec: ConvSpec, band_dot: str, kind: str = "forward") -> bool:
        """Every igemm kernel reads channels_last pixels as vectors when the launch's pixel starts are known
        to be aligned (channel counts that are multiples of 8 but not of 16, RegNetY's 888, were loaded
        element by element), and forward and grad-input write an output that is not channels_last along
        its rows (16-byte vectors along the width, not 2-byte elements)."""
        return True

    def rounds_reads(self, channels_contiguous: bool) -> bool:
        """Only channels_last pixels (read or staged) are vectors; NCHW activations read in place
        (IgemmRows.stages_channels_last) are read element by element, their strides as they are."""
        return channels_contiguous

    def refit(self, config: KernelConfig, spec: ConvSpec, kind: str) -> KernelConfig:
        """The reduction step follows the packed groups, the warps the tile."""
        return self._config(spec, kind, config.block_m, config.block_n, interpret=False)

    def phases(self, spec: ConvSpec, kind: str) -> tuple[int, int]:
        """A strided grad-input's programs each take input pixels of one phase of the stride, their rows
        modulo stride_h (and in channels_last their columns modulo stride_w), and reduce over the taps that
        reach that phase alone (ResNeXt-50's layer2.0 3 x 3 at stride 2 in channels_last: every tap loaded
        and multiplied for every pixel, 8.9x the ideal bytes requested and 8x the useful FLOPs issued). An NCHW
        output is stored along the width: at a stride of 2 there a program takes both column phases in turn and
        interleaves them (interleaves_columns), so that its stores stay 16-byte vectors (ResNeXt-50's layer2.0 in
        NCHW: 5.0x the ideal bytes and 4.0x the useful FLOPs with whole rows a phase); at other strides a phase
        keeps whole rows."""
        if kind != "grad_input":
            return (1, 1)
        return (spec.stride[0], spec.stride[1] if spec.layout == "nhwc" or spec.stride[1] == 2 else 1)

    def interleaves_columns(self, spec: ConvSpec, kind: str) -> bool:
        """An NCHW grad-input in column phases (phases): their outputs interleave along the width."""
        return spec.layout != "nhwc" and self.phases(spec, kind)[1] > 1

    def groups_per_program(self, spec: ConvSpec, config: KernelConfig, kind: str) -> int:
        """As many consecutive groups as fill the channel tile (block_n for the forward and grad-input,
        block_m for grad-weight), so that narrow groups (ResNeXt's 4 channels) fill a tensor-core tile and
        their loads cover whole runs of channels."""
        tile = config.block_m if kind == "grad_weight" else config.block_n
        return min(spec.groups, max(1, tile // packed_channels(spec, kind)))

    def grid(self, kind: str, spec: Optional[ConvSpec], config: KernelConfig, packed: int, pixels: PixelSpace, *,
             splits: int = 1, channels: int = 0) -> tuple[int, ...]:
        if kind == "grad_weight":
            columns = packed * spec.in_channels_per_group * self.taps(spec)
            return (cdiv(packed * spec.out_channels_per_group, config.block_m) * cdiv(columns, config.block_n),
                    cdiv(spec.groups, packed), splits)
        return (self.pixel_tiles(spec, kind, config, pixels),
                cdiv(packed * packed_channels(spec, kind), config.block_n), cdiv(spec.groups, packed))

    def reduction_block(self, config: KernelConfig) -> int:
        return config.block_k

    def stages_channels_last(self, spec: ConvSpec, kind: str) -> bool:
        """Tiles are a run of channels per tap, which NCHW memory can only gather an element at a time."""
        return spec.layout != "nhwc"

    def reduction_order(self, kind: str, channels_contiguous: bool) -> str:
        if kind in ("forward", "grad_input"):
            return "tap_major"
        return "tap_channel" if channels_contiguous else "channel_tap"

    def weight_layout(self, kind: str, weight_memory: str) -> str:
        if kind in ("forward", "grad_input"):
            return "ohwi" if weight_memory == "ohwi" else "hwio"
        return "strided"

    def requested(self, desc, problem, programs: int, arguments: dict):
        spec, config = problem.spec, desc.config
        m, n, k = config.block_m, config.block_n, config.block_k
        taps, packed = self.taps(spec), desc.groups_per_program
        reduction = {"forward": packed * spec.in_channels_per_group * taps,
                     "grad_input": packed * spec.out_channels_per_group * taps,
                     "grad_weight": arguments.get("pixels_per_split", 0)}[desc.kind]
        # forward and grad-input reduce tap by tap: each tap's channels take whole steps; a phase of the stride
        # takes the taps reaching it, each tap one phase's (as many programs as any other phase's), and a program
        # of interleaved column phases each of its phases' taps
        phases = desc.phases[0] * (1 if desc.interleave_columns else desc.phases[1])
        steps = (taps * math.ceil(reduction / taps / k) / phases if desc.reduction_order == "tap_major"
                 else math.ceil(reduction / k))
        return programs * steps * (m * k + k * n) * ELEMENT_BYTES[spec.dtype], programs * steps * 2 * m * n * k
