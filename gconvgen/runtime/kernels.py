"""Compiled kernels: configs, the in-process memo, and the launch (check -> allocate -> launch)."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch
import triton

from .. import codegen, knobs
from ..ir import ConvSpec, check
from ..plan import Plan, plan
from . import cache

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. block_n tiles output channels; for igemm, a group with fewer output channels
    than block_n shares its program with the next groups (see groups_per_program). block_m tiles output
    pixels, except for depthwise_gemm, where it tiles output rows (over batch x out_height). block_k is the
    reduction step: igemm's slice of in_channels_per_group x kh x kw; depthwise_gemm's slice of the input
    band, which is also its strip of output columns; 0 (unused) for the direct depthwise kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def meta(self, family: str) -> dict:
        """The launch keywords of a ``family`` kernel: its BLOCK_* constexprs, num_warps and num_stages."""
        blocks = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        if family in ("igemm", "depthwise_gemm"):
            blocks["BLOCK_K"] = self.block_k
        return {**blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


# What a default config's staged operands may take of an SM's shared memory (Hopper has 227 KiB): half
# of it, so two programs fit. Tuned configs are held to the device's own limit by the search space.
DEFAULT_SHARED_MEMORY_BYTES = 112 * 1024
ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def band_operand_bytes(config: KernelConfig, dtype: str) -> int:
    """Shared memory the depthwise_gemm operands of ``config`` take: num_stages x block_n channels x
    (the [block_m, block_k] input tile + the [block_k, block_k] band)."""
    tile = config.block_m * config.block_k + config.block_k * config.block_k
    return config.num_stages * config.block_n * tile * ELEMENT_BYTES[dtype]


def pow2_between(value: int, low: int, high: int) -> int:
    """The power of two nearest above ``value``, clamped to [low, high]: a tile side."""
    return max(low, min(high, triton.next_power_of_2(value)))


def default_config(spec: ConvSpec, family: str, *, interpret: bool) -> KernelConfig:
    """A sound config chosen at once from the spec; tuning finds better ones.

    Under the interpreter each program costs milliseconds, so blocks are large and grids small.
    tl.dot needs every tile side >= 16.
    """
    if family == "igemm":
        reduction = spec.in_channels_per_group * spec.kernel_size[0] * spec.kernel_size[1]
        return KernelConfig(
            block_m=256 if interpret else 128,
            block_n=pow2_between(spec.out_channels_per_group, 16, 128),
            block_k=pow2_between(reduction, 16, 64 if interpret else 32),
            num_warps=4,
            num_stages=1 if interpret else 3,
        )
    if family == "depthwise_gemm":  # accumulators: block_n x block_m x block_k
        if interpret:
            return KernelConfig(block_m=32, block_n=pow2_between(spec.out_channels, 1, 16), block_k=16, num_stages=1)
        # channels_last: channels are contiguous, enough of them for 16-byte loads; NCHW: the strip is
        wanted = 8 if spec.layout == "nhwc" else 2
        config = KernelConfig(block_m=32 if spec.layout == "nhwc" else 64,
                              block_n=pow2_between(spec.out_channels, 1, wanted), block_k=32)
        while config.block_n > 1 and band_operand_bytes(config, spec.dtype) > DEFAULT_SHARED_MEMORY_BYTES:
            config = replace(config, block_n=config.block_n // 2)  # float32 and float64 tiles are larger
        return config
    if interpret:
        return KernelConfig(block_m=256, block_n=pow2_between(spec.out_channels, 1, 64), block_k=0, num_stages=1)
    if spec.layout == "nhwc":  # channels are contiguous: wide channel tiles
        return KernelConfig(block_m=32, block_n=pow2_between(spec.out_channels, 8, 64), block_k=0)
    return KernelConfig(block_m=128, block_n=pow2_between(spec.out_channels, 1, 8), block_k=0)


def packed_channels(spec: ConvSpec, kind: str = "forward") -> int:
    """The channels per group that an igemm kernel's channel tile packs: input channels for grad-input,
    output channels for the forward and grad-weight."""
    return spec.in_channels_per_group if kind == "grad_input" else spec.out_channels_per_group


def groups_per_program(spec: ConvSpec, family: str, config: KernelConfig, kind: str = "forward") -> int:
    """How many consecutive groups one igemm program computes (its GROUP_BLOCK): as many as fill its
    channel tile (block_n for the forward and grad-input, block_m for grad-weight; see packed_channels),
    so that narrow groups (ResNeXt's 4 channels) fill a tensor-core tile and their loads cover whole runs
    of channels; 1 for a group as wide as the tile, and for the other families."""
    if family != "igemm":
        return 1
    tile = config.block_m if kind == "grad_weight" else config.block_n
    return min(spec.groups, max(1, tile // packed_channels(spec, kind)))


def launch_meta(spec: ConvSpec, family: str, config: KernelConfig, kind: str = "forward") -> dict:
    """The launch keywords of kernel ``kind``: the config's, plus igemm's GROUP_BLOCK."""
    meta = config.meta(family)
    if family == "igemm":
        meta["GROUP_BLOCK"] = groups_per_program(spec, family, config, kind)
    return meta


def launch_grid(spec: ConvSpec, family: str, config: KernelConfig, batch: int, out_height: int,
                out_width: int) -> tuple[int, ...]:
    """The launch grid of a forward kernel: igemm runs (pixel tiles, channel tiles of its packed groups,
    group blocks), depthwise (pixel tiles, channel tiles), depthwise_gemm (row tiles, column strips,
    channel tiles)."""
    pixels = batch * out_height * out_width
    if family == "igemm":
        packed = groups_per_program(spec, family, config)
        return (triton.cdiv(pixels, config.block_m),
                triton.cdiv(packed * spec.out_channels_per_group, config.block_n), triton.cdiv(spec.groups, packed))
    if family == "depthwise_gemm":
        return (triton.cdiv(batch * out_height, config.block_m), triton.cdiv(out_width, config.block_k),
                triton.cdiv(spec.out_channels, config.block_n))
    return (triton.cdiv(pixels, config.block_m), triton.cdiv(spec.out_channels, config.block_n))


@functools.cache
def device_target(device: torch.device) -> str:
    """What a compiled kernel is specific to: 'interpreter', or the GPU's name and capability."""
    if device.type == "cpu":
        import triton.language as tl
        check(knobs.interpret(), "gconvgen runs its kernels on CPU tensors only through Triton's interpreter: set "
                                 "TRITON_INTERPRET=1 before importing gconvgen (without it, gconvgen.conv2d runs "
                                 "the aten fallback)", RuntimeError)
        check(not isinstance(tl.zeros, triton.JITFunction),
              "TRITON_INTERPRET=1 was set after Triton was imported, so Triton's own functions cannot run in its "
              "interpreter; set TRITON_INTERPRET=1 before importing gconvgen or triton", RuntimeError)
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


class CompiledConv:
    """A planned, rendered and imported kernel for one spec on one target, ready to launch."""

    def __init__(self, conv_plan: Plan, target: str, *, allow_tf32: bool, config: KernelConfig | None = None):
        self.plan = conv_plan
        self.spec = conv_plan.spec
        self.family = conv_plan.family
        self.interpret = target == "interpreter"
        self.uri = codegen.kernel_uri(conv_plan, interpret=self.interpret, allow_tf32=allow_tf32)
        module = cache.load_module(
            target, self.uri, lambda: codegen.render(conv_plan, interpret=self.interpret, allow_tf32=allow_tf32))
        self.kernel = getattr(module, codegen.kernel_name(conv_plan, interpret=self.interpret, allow_tf32=allow_tf32))
        self.config = config or default_config(self.spec, self.family, interpret=self.interpret)

    def launch(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
               config: KernelConfig | None = None) -> torch.Tensor:
        """Run the kernel on NCHW-indexed views (any strides): x [N, C_in, H, W], weight [C_out, ci, kh, kw],
        out [N, C_out, OH, OW], preallocated. Returns ``out``."""
        config = config or self.config
        batch, _, height, width = x.shape
        out_height, out_width = out.shape[2], out.shape[3]
        if batch * out_height * out_width == 0:
            return out
        with on_device(x.device):
            self.kernel[launch_grid(self.spec, self.family, config, batch, out_height, out_width)](
                x, weight, bias if bias is not None else weight, out,
                batch, height, width, *x.stride(),
                *weight.stride(),
                out_height, out_width, *out.stride(),
                bias.stride(0) if bias is not None else 0,
                **launch_meta(self.spec, self.family, config),
            )
        return out


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=1024)
def planned(spec: ConvSpec, padding_budget: float, family: str | None = None) -> Plan:
    """``plan`` memoised per spec (and forward family; None is the planner's default): the API checks every
    call against it, so it must cost nothing warm."""
    return plan(spec, padding_budget=padding_budget, family=family)


@functools.lru_cache(maxsize=1024)
def compiled(spec: ConvSpec, target: str, allow_tf32: bool, padding_budget: float,
             family: str | None = None) -> CompiledConv:
    """The in-process memo: a warm call does no planning, rendering, hashing of sources or file I/O."""
    return CompiledConv(planned(spec, padding_budget, family), target, allow_tf32=allow_tf32)


def compiled_for(spec: ConvSpec, device: torch.device, family: str | None = None) -> CompiledConv:
    """The compiled forward kernel of ``family`` (default: the planner's choice) for ``spec`` on ``device``
    (CPU means Triton's interpreter)."""
    allow_tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return compiled(spec, device_target(device), allow_tf32, knobs.padding_budget(), family)
