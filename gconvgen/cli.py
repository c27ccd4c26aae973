"""The gconvgen command line.

    gconvgen plan   explain a layer's plan and print its generated kernel
    gconvgen tune   tune a suite's layers and write the tuning database
    gconvgen bench  time gconvgen against F.conv2d and the roofline floor, layer by layer
    gconvgen cache  show or clear the kernel cache and the tuning database

Help and usage errors import neither torch nor Triton: each command imports what it runs when it runs, so
``gconvgen --help`` answers at once.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click
import tqdm

from . import knobs
from .cli_help import PLAN_FLAGS, SUITE_FLAGS, HelpGroup, with_flags
from .ir import CHANNEL_POLICIES, DTYPES, LAYOUTS

if TYPE_CHECKING:
    import torch

    from .autotune import suites
    from .autotune.space import Problem


def _pair(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.replace("x", ",").split(","))


def _print_version(context: click.Context, _: click.Parameter, value: bool) -> None:
    """--version, without importing the package's torch side (click's version_option would resolve it now)."""
    if value and not context.resilient_parsing:
        from .codegen import gconvgen_version

        click.echo(f"gconvgen, version {gconvgen_version()}")
        context.exit()


@click.group(cls=HelpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
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
@click.option("--family", default=None,
              help="Print this forward kernel family's kernel (one the plan offers). Default: the planner's choice.")
@click.option("--interpret", is_flag=True, help="Print the variant rendered for Triton's interpreter.")
@click.option("--kind", type=click.Choice(("forward", "grad_input", "grad_weight", "grad_bias")), default="forward",
              show_default=True, help="Which kernel's source to print.")
@click.option("--graph", "graph_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the pass graphs to this file: Graphviz DOT (.dot) or networkx node-link JSON (.json).")
@click.option("--source/--no-source", default=True, show_default=True, help="Print the generated kernel source.")
def plan(in_channels, out_channels, groups, kernel, stride, padding, dilation, input_size, bias, dtype, layout,
         channel_policy, padding_budget, family, interpret, kind, graph_path, source) -> None:
    """Explain the plan for one layer: its pass graphs, the lowered description of each kernel (forward,
    grad-input, grad-weight, grad-bias), and the Triton source of one of them."""
    from dataclasses import replace

    import networkx as nx

    from . import codegen
    from .api import resolve_padding
    from .ir import ConvSpec
    from .lowering import Choice, lower
    from .plan import plan as plan_spec

    try:
        kernel_hw, stride_hw, dilation_hw, size_hw = (_expand(_pair(v)) for v in (kernel, stride, dilation, input_size))
        pad = padding if padding in ("same", "valid") else _pair(padding)
        pad = pad[0] if isinstance(pad, tuple) and len(pad) == 1 else pad
        spec = ConvSpec(in_channels, out_channels, groups, kernel_hw, stride_hw,
                        resolve_padding(pad, size_hw, kernel_hw, stride_hw, dilation_hw), dilation_hw, bias, dtype,
                        layout, channel_policy)
        conv_plan = plan_spec(spec, padding_budget=padding_budget, family=family)
    except (ValueError, TypeError) as error:
        raise click.UsageError(with_flags(str(error), PLAN_FLAGS)) from None
    click.echo(conv_plan.explain())
    descs = {}
    for each in ("forward", "grad_input", "grad_weight", "grad_bias"):
        backward_spec = conv_plan if each == "forward" else plan_spec(replace(spec, bias=False),
                                                                      padding_budget=padding_budget)
        descs[each] = lower(None if each == "grad_bias" else backward_spec, each, dtype=dtype,
                            choice=Choice("default", None, family), interpret=interpret, allow_tf32=False)
        click.echo(descs[each].explain())
    if graph_path:
        text = (conv_plan.to_dot() if not graph_path.endswith(".json")
                else json.dumps({name: nx.node_link_data(graph, edges="edges") for name, graph
                                 in (("logical", conv_plan.logical), ("lowered", conv_plan.lowered))}, indent=1))
        Path(graph_path).write_text(text)
        click.echo(f"pass graphs written to {graph_path}")
    click.echo(f"kernel: {descs[kind].uri}")
    if source:
        click.echo("\n" + codegen.render(descs[kind]))


def _expand(values: tuple[int, ...]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


# ---------------------------------------------------------------------------------------------- tune / bench


def _device(name: str | None) -> torch.device:
    """--device, defaulting to CUDA when present; a CUDA request without a GPU is a usage error."""
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise click.UsageError(f"--device {name!r} is not a device; use cuda or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError(f"--device {name} asked for a GPU but torch sees none; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise click.UsageError(f"--device {name} is not supported; use cuda or cpu")
    return device


def _problems(suite_name: str | None, layer_ids: tuple[str, ...], dtype: str | None, layout: str,
              device: torch.device) -> tuple[suites.Suite, list[tuple[str, suites.Layer, Problem]]]:
    """The suite's (label, layer, problem) list; on CPU a shipped GPU suite is replaced by the smoke suite."""
    from .autotune import suites
    from .plan import planned

    if device.type == "cpu" and suite_name not in (None, "smoke") and suite_name in suites.suite_names():
        click.echo(f"no GPU: suite {suite_name!r} would take hours in Triton's interpreter; running the "
                   f"'smoke' suite instead (use a CUDA machine for {suite_name!r})", err=True)
        suite_name, layer_ids = "smoke", ()
    name = suite_name or ("headline" if device.type == "cuda" else "smoke")
    try:
        suite = suites.load_suite(name).select(layer_ids)
        layouts = suite.layouts if layout == "both" else (layout,)
        problems = [(f"{layer.id} {lay}", layer, layer.problem(dtype or suite.dtype, lay))
                    for layer in suite.runnable for lay in layouts]
        for _, _, problem in problems:
            planned(problem.spec, knobs.padding_budget())  # a layer gconvgen refuses is named now, not mid-run
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise click.UsageError(with_flags(str(error), SUITE_FLAGS)) from None
    for layer in suite.deferred:
        click.echo(f"kept for later: {layer.id} ({layer.later})", err=True)
    return suite, problems


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[None]:
    """Run the command's body on ``device``: on CPU through Triton's interpreter, saying plainly what CPU
    timings are worth.

    Triton decides when triton.language is imported whether its library functions run in the interpreter.
    Where Triton is not imported yet (the CLI imports it only now), TRITON_INTERPRET=1 is set for the body;
    where something imported it already, the command restarts itself once with it set.
    """
    if device.type != "cpu" or knobs.interpret():
        _cpu_note(device)
        yield
        return
    if "triton" in sys.modules:
        click.echo("CPU: restarting with TRITON_INTERPRET=1 (Triton reads it at import)", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with knobs.scoped(INTERPRET=1):
            os.execv(sys.executable, [sys.executable, "-m", "gconvgen.cli", *sys.argv[1:]])
    with knobs.scoped(INTERPRET=1):
        _cpu_note(device)
        yield


def _cpu_note(device: torch.device) -> None:
    """On CPU, say what the timings are worth (bench.py imports Triton: call it with the interpreter on)."""
    if device.type == "cpu":
        from .bench import CPU_NOTE

        click.echo(f"NOTE: {CPU_NOTE}", err=True)


def _tune_all(problems: list[tuple[str, suites.Layer, Problem]], device: torch.device, force: bool) -> list[dict]:
    """Tune every problem not in the database yet (all with ``force``), recording each as it finishes.

    Ctrl-C stops after recording what finished; the CLI then exits with status 130.
    """
    from .autotune import tuner
    from .autotune.database import database, key_of
    from .autotune.space import device_facts
    from .runtime.device import allows_tf32

    facts = device_facts(device)
    db = database()
    todo = [(label, problem) for label, _, problem in problems
            if force or db.lookup(key_of(problem, facts.target, allows_tf32(device))) is None]
    for label, _, _ in problems:
        if all(label != done for done, _ in todo):
            click.echo(f"{label}: already tuned (use --force to tune again)", err=True)
    estimates = [tuner.planned_trials(problem, facts) for _, problem in todo]
    results = []
    with tqdm.tqdm(total=sum(estimates), unit="trial", desc="tuning", dynamic_ncols=True) as bar:
        try:
            for (label, problem), estimate in zip(todo, estimates):
                bar.set_postfix_str(label)
                try:
                    result = tuner.tune(problem, device, on_trial=lambda trial: bar.update(1))
                    record = result.record()
                except (RuntimeError, ValueError, OSError) as error:  # one layer's failure does not stop the rest
                    bar.write(f"{label}: not tuned: {error}")
                    continue
                db.record({result.key: record})
                bar.total += len(result.trials) - estimate
                bar.refresh()
                results.append({"layer": label, **record})
                bar.write(f"{label}: {_winner_text(record)}")
        except KeyboardInterrupt:
            bar.close()
            click.echo(f"\ninterrupted: kept the {len(results)} layer(s) tuned so far in {db.path}", err=True)
            raise SystemExit(130) from None
    return results


def _winner_text(record: dict) -> str:
    from .autotune.database import choice_of
    from .autotune.space import config_name

    choice = choice_of(record)
    won = "aten" if choice.config is None else f"kernel {config_name(choice.config, choice.family)}"
    return (f"{won} {record['time_ms']:.4f} ms (aten {record['aten_ms']:.4f} ms); {record['trials']} trials, "
            f"{record['rejected']} wrong, {record['failed']} failed")


_suite_options = [
    click.option("--suite", default=None, metavar="NAME|FILE",
                 help="A shipped suite (headline, secondary, smoke) or a suite JSON file. "
                      "Default: headline on a GPU, smoke on CPU."),
    click.option("--layer", "layer_ids", multiple=True, metavar="ID", help="Only this layer id (repeatable)."),
    click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Default: the suite's dtype."),
    click.option("--layout", type=click.Choice(["nchw", "nhwc", "both"]), default="both", show_default=True,
                 help="Activation layout (nhwc = channels_last)."),
    click.option("--device", default=None, help="cuda or cpu (Triton's interpreter). Default: cuda when present."),
    click.option("--force", is_flag=True, help="Tune layers again even when the database has them."),
]


def _with_suite_options(command):
    for option in reversed(_suite_options):
        command = option(command)
    return command


def _with_backward(problems: list[tuple[str, suites.Layer, Problem]]) -> list[tuple[str, suites.Layer, Problem]]:
    """Each layer's forward problem followed by its grad-input and grad-weight problems."""
    return [entry for label, layer, problem in problems
            for entry in [(label, layer, problem)] + [(f"{label} {kind}", layer, problem.backward(kind))
                                                     for kind in ("grad_input", "grad_weight")]]


_backward_tuning_option = click.option(
    "--backward", is_flag=True,
    help="Also tune the backward kernels (grad-input, grad-weight) against aten's convolution_backward.")


@main.command()
@_with_suite_options
@_backward_tuning_option
def tune(suite, layer_ids, dtype, layout, device, force, backward) -> None:
    """Tune a suite's layers and write the winners to the tuning database.

    Every candidate is checked against a float64 reference before its time counts; PyTorch's own conv (or
    its convolution_backward) is always a candidate, so a tuned kernel is never slower than aten's.
    Ctrl-C keeps what was tuned.
    """
    device = _device(device)
    with _on(device):
        _, problems = _problems(suite, layer_ids, dtype, layout, device)
        _tune_all(_with_backward(problems) if backward else problems, device, force)
        from .autotune.database import database  # imports Triton: only inside _on

        click.echo(f"tuning database: {database().path}")


@main.command()
@_with_suite_options
@click.option("--tune", "tune_first", is_flag=True, help="Tune untuned layers first (one call tunes and benchmarks).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Write the table as markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Plot speedup and % of floor per layer (needs the 'plot' extra: matplotlib).")
@click.option("--backward", is_flag=True,
              help="Also time forward + backward (grads of input, weight, bias) against PyTorch eager "
                   "(with --tune, the backward kernels are tuned too).")
@click.option("--block", type=click.Choice(("conv", "bn-act")), default="conv", show_default=True,
              help="bn-act: time each layer's conv -> BatchNorm (eval) -> activation block fused by gconvgen "
                   "against PyTorch eager and torch.compile of the same block, with bytes moved.")
@click.option("--activation", type=click.Choice(("relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish")),
              default="relu", show_default=True, help="The block's activation (with --block bn-act).")
@click.option("--no-compile", "skip_compile", is_flag=True, help="With --block bn-act: skip torch.compile.")
def bench(suite, layer_ids, dtype, layout, device, force, tune_first, json_path, markdown_path, plot_path,
          backward, block, activation, skip_compile) -> None:
    """Time gconvgen against F.conv2d (cudnn.benchmark on, same layout and dtype) and the roofline floor.

    The floor is max(bytes / copy bandwidth, flops / matmul rate), both ceilings measured in this run.
    On CPU it runs the smoke suite through Triton's interpreter: those timings say nothing about GPU speed.
    """
    _check_plotting(plot_path)  # before the run, not after it
    device = _device(device)
    with _on(device):
        suite_info, problems = _problems(suite, layer_ids, dtype, layout, device)
        if block == "bn-act":
            _bench_blocks(problems, activation, device, not skip_compile, json_path)
            return
        if tune_first or force:
            _tune_all(_with_backward(problems) if backward else problems, device, force)
        data, all_correct = _bench_all(suite_info, problems, device)
        if backward:
            from . import bench_backward

            timings = _time_backward(problems, device)
            click.echo("\nforward + backward, gconvgen against PyTorch eager:\n" + bench_backward.format_table(timings))
            data["backward"] = [{"id": label, "gconvgen_ms": t.gconvgen_ms, "torch_ms": t.torch_ms,
                                 "speedup": t.speedup, "resolved": t.resolved}
                                for (label, _, _), t in zip(problems, timings)]
    _write_reports(data, json_path, markdown_path, plot_path)
    if not all_correct:
        raise click.ClickException("some layers failed or gave wrong results (check column): see above")


def _bench_blocks(problems, activation: str, device: torch.device, compile_block: bool,
                  json_path: str | None) -> None:
    """--block bn-act: every layer's conv -> BN -> activation block, fused against eager and torch.compile."""
    from dataclasses import asdict

    from .autotune import measure
    from .bench_block import bench_block, format_block_table

    timer = measure.timer_for(device, warmup_ms=25, rep_ms=100)
    rows = [bench_block(label.split()[0], problem, activation, device, timer, compile_block)
            for label, _, problem in tqdm.tqdm(problems, desc="conv-bn-act blocks", unit="layer", dynamic_ncols=True)]
    click.echo(format_block_table(rows, device.type == "cpu"))
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")
        click.echo(f"wrote {json_path}")
    if not all(row.correct for row in rows):
        raise click.ClickException("some fused blocks gave wrong results (ok column): see above")


def _check_plotting(plot_path: str | None) -> None:
    """--plot needs matplotlib: say so at once rather than after the whole benchmark."""
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError(f"--plot {plot_path} needs matplotlib, which is not installed; run "
                               f"pip install 'gconvgen[plot]' (or pip install matplotlib), or drop --plot")


def _bench_all(suite_info: suites.Suite, problems: list[tuple[str, suites.Layer, Problem]],
               device: torch.device) -> tuple[dict, bool]:
    """Measure the ceilings, then check and time every problem; print the table. Returns the report and
    whether every layer ran and was correct."""
    from . import bench as benchmark
    from .autotune import measure

    timer = measure.timer_for(device, warmup_ms=25, rep_ms=100)
    click.echo("measuring the copy bandwidth and matmul rate ...", err=True)
    ceilings = benchmark.measure_ceilings(device, timer)
    rows, failed = [], []
    try:
        for label, layer, problem in tqdm.tqdm(problems, desc="benchmarking", unit="layer", dynamic_ncols=True):
            try:
                rows.append(benchmark.bench_layer(layer, problem, device, timer, ceilings))
            except (RuntimeError, ValueError) as error:  # e.g. out of memory: report it, measure the rest
                failed.append({"id": label, "why": f"{type(error).__name__}: {error}"})
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: reporting the {len(rows)} layer(s) measured so far", err=True)
    skipped = [{"id": layer.id, "why": layer.later} for layer in suite_info.deferred]
    data = benchmark.report(suite_info.name, rows, ceilings, timer, device, skipped, failed)
    click.echo(benchmark.format_table(data))
    return data, not failed and all(row.correct for row in rows)


def _write_reports(data: dict, json_path: str | None, markdown_path: str | None, plot_path: str | None) -> None:
    """Write the JSON, markdown and plot asked for."""
    from . import bench as benchmark

    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=1) + "\n")
        click.echo(f"wrote {json_path}")
    if markdown_path:
        Path(markdown_path).write_text(benchmark.format_table(data, markdown=True))
        click.echo(f"wrote {markdown_path}")
    if plot_path:
        try:
            benchmark.plot(data, plot_path)
        except RuntimeError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"wrote {plot_path}")


def _time_backward(problems, device: torch.device) -> list:
    """Forward + backward of each problem; on the CPU a few interpreter runs, on a GPU do_bench for 100 ms."""
    from . import bench_backward

    repeats = 100 if device.type == "cuda" else 2
    return [bench_backward.time_forward_backward(problem.spec, problem.batch, problem.height, problem.width,
                                                 device=device, repeats=repeats)
            for _, _, problem in tqdm.tqdm(problems, desc="forward + backward", unit="layer", dynamic_ncols=True)]


# ---------------------------------------------------------------------------------------------- cache


@main.group()
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
    from .autotune.database import database
    from .runtime import cache as kernel_cache

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
@click.argument("path", type=click.Path(dir_okay=False))
def export(path) -> None:
    """Write this user's tuning results to PATH, e.g. to ship them in tuning/databases/<gpu>.json."""
    from .autotune.database import database

    count = database().export(Path(path))
    click.echo(f"wrote {count} tuning records to {path}")


@cache.command()
@click.option("--kernels/--no-kernels", default=True, show_default=True, help="Remove the rendered kernels.")
@click.option("--tuning/--no-tuning", default=True, show_default=True,
              help="Remove this user's tuning results (shipped databases stay).")
def clear(kernels, tuning) -> None:
    """Delete the rendered kernels and/or this user's tuning results. Do not run it while gconvgen runs."""
    from .autotune.database import database
    from .runtime import cache as kernel_cache

    if kernels:
        shutil.rmtree(kernel_cache.kernels_root(), ignore_errors=True)
        click.echo(f"removed {kernel_cache.kernels_root()}")
    if tuning:
        removed = database().clear()
        click.echo(f"removed {removed} tuning records from {database().path}")


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------- inspect


@main.command()
@click.option("--suite", "suite_name", default="headline", show_default=True,
              help="A shipped suite (headline, secondary, smoke) or a suite JSON file.")
@click.option("--layer", "layer_ids", multiple=True, help="Only these layer ids (repeatable). Default: every layer.")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@click.option("--layout", type=click.Choice(("nhwc", "nchw", "both")), default="both", show_default=True)
@click.option("--kind", "kinds", type=click.Choice(("forward", "grad_input", "grad_weight")), multiple=True,
              help="Kernel kinds to compile (repeatable). Default: all three.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def inspect(suite_name, layer_ids, dtype, layout, kinds, json_path) -> None:
    """Compile each layer's kernels for sm_90 on this machine, as the runtime would launch them on an H200
    (tuned or default config, run-time specialisation), and print what the compiler emitted: registers,
    spills, shared memory, tensor-core instruction, global-load widths, async copies, instructions per
    inner-loop iteration, programs and waves on 132 SMs, and the tiling's requested/ideal bytes and
    issued/useful tensor-core FLOPs. Static figures, not timings. Needs TRITON_INTERPRET unset."""
    from .autotune import suites
    from .inspection import inspect_problem

    if knobs.interpret():
        raise click.UsageError("gconvgen inspect compiles for sm_90: run it with TRITON_INTERPRET unset")
    try:
        suite = suites.load_suite(suite_name).select(layer_ids)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise click.UsageError(str(error)) from None
    layouts = ("nhwc", "nchw") if layout == "both" else (layout,)
    rows = []
    header = (f"{'layer':<22} {'kind':<11} {'family':<14} {'config':<20} {'regs':>4} {'spill':>5} {'smem':>6} "
              f"{'tc':<8} {'loads (bits:n)':<22} {'async':>5} {'loop':>5} {'waves':>6} {'bytes':>6} {'flops':>6}")
    click.echo(header)
    for layer in suite.runnable:
        for lay in layouts:
            forward = layer.problem(dtype, lay)
            for kind in kinds or ("forward", "grad_input", "grad_weight"):
                problem = forward if kind == "forward" else forward.backward(kind)
                row = inspect_problem(problem)
                rows.append({"layer": layer.id, "layout": lay, **row.as_dict()})
                f = row.figures
                loads = " ".join(f"{bits}:{count}" for bits, count in sorted(f.global_load_widths.items()))
                ratio = lambda value: "-" if value is None else f"{value:.1f}x"  # noqa: E731
                click.echo(f"{layer.id + ' ' + lay:<22} {kind:<11} {row.family:<14} {row.config:<20} "
                           f"{f.registers:>4} {f.spill_bytes:>5} {f.shared_memory_bytes:>6} {f.tensor_core:<8} "
                           f"{loads:<22} {sum(f.async_copies.values()):>5} {f.inner_loop_instructions:>5} "
                           f"{row.waves:>6.1f} {ratio(row.requested_over_ideal_bytes):>6} "
                           f"{ratio(row.issued_over_useful_flops):>6}")
    click.echo("static figures of the sm_90 compiler's output (Triton " + __import__("triton").__version__ +
               "), not timings; bytes = requested/ideal, flops = tensor-core issued/useful")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
        click.echo(f"wrote {json_path}")
