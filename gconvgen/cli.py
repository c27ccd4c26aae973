"""The gconvgen command line: ``gconvgen plan`` explains a layer's plan and prints its kernel."""
from __future__ import annotations

import click

from . import codegen
from .api import resolve_padding
from .ir import CHANNEL_POLICIES, DTYPES, LAYOUTS, ConvSpec
from .plan import plan as plan_spec


def _pair(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.replace("x", ",").split(","))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(codegen.gconvgen_version(), prog_name="gconvgen")
def main() -> None:
    """gconvgen: a code-generating compiler for grouped and depthwise convolutions."""


@main.command()
@click.option("--in-channels", type=int, required=True, help="Input channels C_in.")
@click.option("--out-channels", type=int, required=True, help="Output channels C_out.")
@click.option("--groups", type=int, required=True, help="Groups.")
@click.option("--kernel", "kernel", default="3", show_default=True, help="Kernel size: 3 or 3x5.")
@click.option("--stride", default="1", show_default=True, help="Stride: 2 or 2x1.")
@click.option("--padding", default="0", show_default=True,
              help="Padding: 1, 1x2 (h x w), top,bottom,left,right, 'same' or 'valid'.")
@click.option("--dilation", default="1", show_default=True, help="Dilation: 2 or 2x1.")
@click.option("--input-size", default="56", show_default=True, help="Input H x W ('same' padding depends on it).")
@click.option("--bias/--no-bias", default=False, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@click.option("--layout", type=click.Choice(LAYOUTS), default="nhwc", show_default=True)
@click.option("--channel-policy", type=click.Choice(CHANNEL_POLICIES), default="strict", show_default=True)
@click.option("--padding-budget", type=float, default=None, help="Max extra work from channel padding (0.5 = 50%).")
@click.option("--interpret", is_flag=True, help="Print the variant rendered for Triton's interpreter.")
@click.option("--source/--no-source", default=True, show_default=True, help="Print the generated kernel source.")
def plan(in_channels, out_channels, groups, kernel, stride, padding, dilation, input_size, bias, dtype, layout,
         channel_policy, padding_budget, interpret, source) -> None:
    """Explain the plan for one layer and print the Triton kernel gconvgen generates for it."""
    try:
        kernel_hw, stride_hw, dilation_hw, size_hw = (_expand(_pair(v)) for v in (kernel, stride, dilation, input_size))
        pad = padding if padding in ("same", "valid") else _pair(padding)
        pad = pad[0] if isinstance(pad, tuple) and len(pad) == 1 else pad
        spec = ConvSpec(in_channels, out_channels, groups, kernel_hw, stride_hw,
                        resolve_padding(pad, size_hw, kernel_hw, stride_hw, dilation_hw), dilation_hw, bias, dtype,
                        layout, channel_policy)
        conv_plan = plan_spec(spec, padding_budget=padding_budget)
    except (ValueError, TypeError) as error:
        raise click.UsageError(str(error)) from None
    click.echo(conv_plan.explain())
    click.echo(f"kernel: {codegen.kernel_uri(conv_plan, interpret=interpret)}")
    if source:
        click.echo("\n" + codegen.render(conv_plan, interpret=interpret, allow_tf32=False))


def _expand(values: tuple[int, ...]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


if __name__ == "__main__":
    main()
