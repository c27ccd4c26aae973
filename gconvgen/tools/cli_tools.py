"""The gconvgen command line, second half: ``gconvgen plan`` (a layer's passes, descriptions and source),
``gconvgen cache`` (show, export or clear the kernel cache and the tuning database) and ``gconvgen inspect`` (static sm_90 figures): commands that cli.py adds to ``main``
(``COMMANDS``); like cli.py it imports nothing heavy until a command runs."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import click
import tqdm

from .. import knobs
from .cli_help import PLAN_FLAGS, HelpGroup, output_path, selected_suite, sizes, with_flags, write_output
from ..ir import CHANNEL_POLICIES, DTYPES, LAYOUTS

_ONE_OR_TWO = "an int or H x W, e.g. 3 or 3x5"
_GRAPH_FORMATS = "the pass graphs are written as Graphviz DOT (.dot, .gv) or networkx node-link JSON (.json)"


@click.command()
@click.option("--in-channels", type=int, required=True, help="Input channels C_in.")
@click.option("--out-channels", type=int, required=True, help="Output channels C_out.")
@click.option("--groups", type=int, required=True, help="Groups.")
@click.option("--kernel", "kernel", default="3", show_default=True, callback=sizes((1, 2), _ONE_OR_TWO),
              help="Kernel size: 3 or 3x5.")
@click.option("--stride", default="1", show_default=True, callback=sizes((1, 2), _ONE_OR_TWO),
              help="Stride: 2 or 2x1.")
@click.option("--padding", default="0", show_default=True,
              callback=sizes((1, 2, 4), "an int, H x W (1x2), top,bottom,left,right (1,1,2,2), same or valid",
                             words=("same", "valid")),
              help="Padding: 1, 1x2 (h x w), top,bottom,left,right, 'same' or 'valid' (any case).")
@click.option("--dilation", default="1", show_default=True, callback=sizes((1, 2), _ONE_OR_TWO),
              help="Dilation: 2 or 2x1.")
@click.option("--input-size", default="56", show_default=True, callback=sizes((1, 2), _ONE_OR_TWO),
              help="Input H x W ('same' padding depends on it).")
@click.option("--bias/--no-bias", default=False, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False), default="bfloat16", show_default=True)
@click.option("--layout", type=click.Choice(LAYOUTS, case_sensitive=False), default="nhwc", show_default=True)
@click.option("--channel-policy", type=click.Choice(CHANNEL_POLICIES, case_sensitive=False), default="strict",
              show_default=True)
@click.option("--padding-budget", type=float, default=None, help="Max extra work from channel padding (0.5 = 50%).")
@click.option("--family", default=None,
              help="Print this forward kernel family's kernel (one the plan offers). Default: the planner's choice.")
@click.option("--interpret", is_flag=True, help="Print the variant rendered for Triton's interpreter.")
@click.option("--kind", type=click.Choice(("forward", "grad_input", "grad_weight", "grad_bias")), default="forward",
              show_default=True, help="Which kernel's source to print.")
@click.option("--graph", "graph_path", type=click.Path(dir_okay=False), default=None,
              callback=output_path((".dot", ".gv", ".json"), _GRAPH_FORMATS),
              help="Also write the pass graphs to this file: Graphviz DOT (.dot, .gv) or networkx node-link JSON "
                   "(.json).")
@click.option("--source/--no-source", default=True, show_default=True, help="Print the generated kernel source.")
def plan(in_channels, out_channels, groups, kernel, stride, padding, dilation, input_size, bias, dtype, layout,
         channel_policy, padding_budget, family, interpret, kind, graph_path, source) -> None:
    """Explain the plan for one layer: its pass graphs, the lowered description of each kernel (forward,
    grad-input, grad-weight, grad-bias), and the Triton source of one of them."""
    from dataclasses import replace

    import networkx as nx

    from ..compiler import codegen
    from ..nn.conv2d import resolve_padding
    from ..ir import ConvSpec
    from ..compiler.lowering import Choice, lower
    from ..compiler.plan import grad_input_as_forward, grad_input_offers, plan as plan_spec

    try:
        kernel_hw, stride_hw, dilation_hw, size_hw = (_expand(v) for v in (kernel, stride, dilation, input_size))
        pad = padding[0] if isinstance(padding, tuple) and len(padding) == 1 else padding
        spec = ConvSpec(in_channels, out_channels, groups, kernel_hw, stride_hw,
                        resolve_padding(pad, size_hw, kernel_hw, stride_hw, dilation_hw), dilation_hw, bias, dtype,
                        layout, channel_policy)
        conv_plan = plan_spec(spec, padding_budget=padding_budget, family=family)
    except (ValueError, TypeError) as error:
        raise click.UsageError(with_flags(str(error), PLAN_FLAGS)) from None
    click.echo(conv_plan.explain())
    descs = {}
    budget = knobs.padding_budget() if padding_budget is None else padding_budget
    backward_spec = replace(spec, bias=False)
    transposed = grad_input_as_forward(backward_spec, budget)
    offers = ", ".join(f"{name} ({'transposed forward' if is_transposed else 'direct'})"
                       for name, is_transposed in grad_input_offers(backward_spec, budget))
    click.echo(f"grad_input kernels offered (untuned runs the first, a transposed forward the first that claims or "
               f"suits the launch's map; tuning times each): {offers}")
    click.echo("grad_weight kernels offered (untuned runs the first that suits the launch's shape; tuning times each): "
               + ", ".join(plan_spec(backward_spec, padding_budget=padding_budget).grad_weight_families))
    for each in ("forward", "grad_input", "grad_weight", "grad_bias"):
        if each == "forward":
            planned_for, lowered_kind, choice = conv_plan, "forward", Choice("default", None, family)
        elif each == "grad_input" and transposed is not None:
            click.echo(f"grad_input runs as the forward kernel of the transposed conv {transposed} (weight transposed and flipped):")
            planned_for, lowered_kind, choice = plan_spec(transposed, padding_budget=padding_budget), "forward", Choice("default")
        else:
            planned_for = None if each == "grad_bias" else plan_spec(backward_spec, padding_budget=padding_budget)
            lowered_kind, choice = each, Choice("default")
        descs[each] = lower(planned_for, lowered_kind, dtype=dtype, choice=choice, interpret=interpret,
                            allow_tf32=False)
        click.echo(descs[each].explain())
    if graph_path:
        text = (conv_plan.to_dot() if not graph_path.lower().endswith(".json")
                else json.dumps({name: nx.node_link_data(graph, edges="edges") for name, graph
                                 in (("logical", conv_plan.logical), ("lowered", conv_plan.lowered))}, indent=1))
        write_output(graph_path, text, "pass graphs written to {path}")
    click.echo(f"kernel: {descs[kind].uri}")
    if source:
        click.echo("\n" + codegen.render(descs[kind]))


def _expand(values: tuple[int, ...]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


# ---------------------------------------------------------------------------------------------- cache


@click.group(cls=HelpGroup)
def cache() -> None:
    """Show or clear gconvgen's cache: rendered kernels and the tuning database."""


def _cache_dir_origin() -> str:
    """Where knobs.cache_dir() came from: GCONVGEN_CACHE_DIR, or the default it falls back to.

    The knob is read once more with GCONVGEN_CACHE_DIR scoped empty (the knobs module is the one place
    that reads the environment); a different answer means the variable chose the directory.
    """
    chosen = knobs.cache_dir()
    with knobs.scoped(CACHE_DIR=""):
        fallback = knobs.cache_dir()
    if chosen != fallback:
        return "from GCONVGEN_CACHE_DIR"
    if fallback == Path.home() / ".cache" / "gconvgen":
        return "the default, ~/.cache/gconvgen; set GCONVGEN_CACHE_DIR to move it"
    return "the default under $XDG_CACHE_HOME; set GCONVGEN_CACHE_DIR to move it"


@cache.command()
def info() -> None:
    """Where the cache is, how many kernels and tuning records it holds, and the shipped databases."""
    from ..autotune.database import database
    from ..runtime import cache as kernel_cache

    root = kernel_cache.kernels_root()
    modules = list(root.glob("*/*.py")) if root.is_dir() else []
    described = database().describe()
    click.echo(f"cache directory: {knobs.cache_dir()}  ({_cache_dir_origin()})")
    click.echo(f"kernels: {len(modules)} rendered modules in {len({m.parent for m in modules})} build(s), "
               f"{sum(m.stat().st_size for m in modules) / 1024:.1f} KiB under {root}")
    click.echo(f"tuning database: {described['path']}: {described['records']} records "
               f"({described['aten_records']} where aten won), {described['bytes'] / 1024:.1f} KiB")
    for path, count in described["shipped"].items():
        click.echo(f"shipped database: {path}: {count} records")
    if not described["shipped"]:
        click.echo("shipped databases: none for any device yet (tuning/databases/)")


@cache.command()
@click.argument("path", type=click.Path(dir_okay=False), callback=output_path())
def export(path) -> None:
    """Write this user's tuning results to PATH, e.g. to ship them in tuning/databases/<gpu>.json."""
    from ..autotune.database import database

    count = database().export(Path(path))
    click.echo(f"wrote {count} tuning records to {path}")


@cache.command()
@click.option("--kernels/--no-kernels", default=True, show_default=True, help="Remove the rendered kernels.")
@click.option("--tuning/--no-tuning", default=True, show_default=True,
              help="Remove this user's tuning results (shipped databases stay).")
def clear(kernels, tuning) -> None:
    """Delete the rendered kernels and/or this user's tuning results. Do not run it while gconvgen runs."""
    from ..autotune.database import database
    from ..runtime import cache as kernel_cache

    if kernels:
        shutil.rmtree(kernel_cache.kernels_root(), ignore_errors=True)
        click.echo(f"removed {kernel_cache.kernels_root()}")
    if tuning:
        removed = database().clear()
        click.echo(f"removed {removed} tuning records from {database().path}")


# ---------------------------------------------------------------------------------------------- inspect


@click.command()
@click.option("--suite", "suite_name", default="headline", show_default=True,
              help="A shipped suite (headline, secondary, offsuite, ...) or a suite JSON file.")
@click.option("--layer", "layer_ids", multiple=True, help="Only these layer ids (repeatable). Default: every layer.")
@click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False), default="bfloat16", show_default=True)
@click.option("--layout", type=click.Choice(("nhwc", "nchw", "both"), case_sensitive=False), default="both",
              show_default=True)
@click.option("--kind", "kinds", type=click.Choice(("forward", "grad_input", "grad_weight"), case_sensitive=False),
              multiple=True, help="Kernel kinds to compile (repeatable). Default: all three.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=output_path(),
              help="Also write the rows as JSON.")
def inspect(suite_name, layer_ids, dtype, layout, kinds, json_path) -> None:
    """Compile each layer's kernels for sm_90 on this machine, as the runtime would launch them on an H200
    (tuned or default config, run-time specialisation), and print what the compiler emitted: registers,
    spills, shared memory, programs resident per SM and what limits them, tensor-core instruction,
    global load, global store and cp.async widths, the innermost loop's and the whole body's instructions,
    programs as waves on 132 SMs and as rounds of SM slots, the tiling's requested/ideal bytes and issued/useful
    tensor-core FLOPs; then a modelled time on an H200 and the share of the roofline floor it allows, per
    kernel and per layer (forward; forward + backward), with their geometric means per layout. Static
    figures and a model, not timings. Needs TRITON_INTERPRET unset."""
    from .inspection import geometric_mean, inspect_problem, layer_model

    if knobs.interpret():
        raise click.UsageError("gconvgen inspect compiles for sm_90: run it with TRITON_INTERPRET unset")
    suite = selected_suite(suite_name, layer_ids)
    layouts = ("nhwc", "nchw") if layout == "both" else (layout,)
    kinds = kinds or ("forward", "grad_input", "grad_weight")
    todo = [(layer, lay, kind) for layer in suite.runnable for lay in layouts for kind in kinds]
    rows, inspected = [], {}
    click.echo(_INSPECT_HEADER)
    with tqdm.tqdm(todo, desc="compiling for sm_90", unit="kernel", dynamic_ncols=True) as bar:
        for layer, lay, kind in bar:
            bar.set_postfix_str(f"{layer.id} {lay} {kind}")
            forward = layer.problem(dtype, lay)
            row = inspect_problem(forward if kind == "forward" else forward.backward(kind))
            rows.append({"layer": layer.id, "layout": lay, **row.as_dict()})
            inspected.setdefault((layer.id, lay), {})[kind] = row
            bar.write(_inspection_line(f"{layer.id} {lay}", kind, row))
    click.echo("static figures of the sm_90 compiler's output (Triton " + __import__("triton").__version__ +
               ") and a model, not timings:\n" + _INSPECT_LEGEND)
    layers = {key: layer_model(by_kind) for key, by_kind in inspected.items()}
    for (layer_id, lay), modelled in layers.items():
        click.echo(_layer_line(f"{layer_id} {lay}", modelled))
    geomeans = {}
    for lay in layouts:
        of_layout = [modelled for (_, each), modelled in layers.items() if each == lay]
        geomeans[lay] = {name: geometric_mean([getattr(m, name) for m in of_layout if getattr(m, name) is not None])
                         for name in ("forward_percent", "forward_backward_percent")}
        click.echo(f"geomean {lay} over {len(of_layout)} layers, modelled upper bound of % of the floor: forward "
                   f"{_percent(geomeans[lay]['forward_percent'])}, forward+backward "
                   f"{_percent(geomeans[lay]['forward_backward_percent'])}")
    for row in rows:  # each kernel row carries its layer's figures and its layout's geomeans
        row["layer_model"] = asdict(layers[(row["layer"], row["layout"])])
        row["layout_geomeans"] = geomeans[row["layout"]]
    write_output(json_path, json.dumps(rows, indent=1) + "\n")


_INSPECT_HEADER = (f"{'layer':<22} {'kind':<11} {'family':<14} {'config':<20} {'regs':>4} {'spill':>5} {'smem':>6} "
                   f"{'occ':<9} {'tc':<8} {'loads (bits:n)':<22} {'stores':<11} {'async (bits:n)':<16} {'loop':>5} "
                   f"{'trips':>6} {'sass':>5} {'waves':>6} {'rounds':>6} {'bytes':>6} {'flops':>6} {'modelled us':>11} "
                   f"{'bound':<6} {'modelled %floor':>15}")
_INSPECT_LEGEND = """\
occ = programs resident on one SM and the resource that limits them; loads, stores = global loads and stores by width
(bits:count, '-': none); async = cp.async widths (+ TMA loads);
loop = the innermost loop's SASS instructions ('-': straight-line code), trips = a warp's modelled passes through it,
sass = the whole kernel's instructions; rounds = programs / (132 SMs x occ); bytes = requested/ideal; flops =
tensor-core issued/useful; modelled us = modelled time on an H200, bound = its slowest term (bytes, flops, issue);
modelled %floor = the roofline floor / modelled us, an upper bound under the model (inspection.model_kernel)"""
_LIMITERS = {"registers": "regs", "shared_memory": "smem", "warps": "warps", "blocks": "blocks"}


def _inspection_line(label: str, kind: str, row) -> str:
    """One row of inspect's table: the compiler's figures, occupancy, waves and rounds, the tiling's two
    ratios, and the model's time and share of the floor."""
    f, model = row.figures, row.model
    loads, stores = (" ".join(f"{bits}:{count}" for bits, count in sorted(widths.items())) or "-"
                     for widths in (f.global_load_widths, f.global_store_widths))
    copies = [f"{bits}:{count}" for bits, count in sorted(f.cp_async_widths.items())]
    copies += [f"{name}:{f.async_copies[name]}" for name in ("tma", "tma_store") if f.async_copies.get(name)]
    occupancy = f"{row.occupancy.programs_per_sm} {_LIMITERS[row.occupancy.limiter]}"

    def ratio(value):
        return "-" if value is None else f"{value:.1f}x"

    loop = f.inner_loop_instructions or "-"
    trips = f"{model.loop_trips:.0f}" if f.inner_loop_instructions else "-"
    return (f"{label:<22} {kind:<11} {row.family:<14} {row.config:<20} {f.registers:>4} {f.spill_bytes:>5} "
            f"{f.shared_memory_bytes:>6} {occupancy:<9} {f.tensor_core:<8} {loads:<22} {stores:<11} "
            f"{' '.join(copies) or '-':<16} {loop:>5} {trips:>6} {f.sass_instructions:>5} {row.waves:>6.1f} "
            f"{row.rounds:>6.2f} {ratio(row.requested_over_ideal_bytes):>6} {ratio(row.issued_over_useful_flops):>6} "
            f"{model.time_s * 1e6:>11.2f} {model.bound:<6} {model.percent_of_floor:>15.1f}")


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _layer_line(label: str, modelled) -> str:
    """One layer's summary: its floor, and the modelled forward and forward + backward times and shares of it
    (each only when its kernels were inspected)."""
    parts = [f"{label:<22} floor {modelled.floor_s * 1e6:.3g} us"]
    if modelled.forward_s is not None:
        parts.append(f"modelled forward {modelled.forward_s * 1e6:.3g} us ({_percent(modelled.forward_percent)} "
                     f"of the floor)")
    if modelled.forward_backward_s is not None:
        parts.append(f"forward+backward {modelled.forward_backward_s * 1e6:.3g} us "
                     f"({_percent(modelled.forward_backward_percent)} of 3 floors)")
    return "; ".join(parts)


COMMANDS = (plan, cache, inspect)  # what cli.main adds
