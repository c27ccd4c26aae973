"""The gconvgen command line.

    gconvgen plan   explain a layer's plan and print its generated kernel
    gconvgen tune   tune a suite's layers, or a model's (--model), and write the tuning database
    gconvgen bench  time gconvgen against F.conv2d, layer by layer, of a suite or a model (--model)
    gconvgen cache  show or clear the kernel cache and the tuning database

Help and usage errors import neither torch nor Triton: each command imports what it runs when it runs, so
``gconvgen --help`` answers at once.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click
import tqdm
from click.core import ParameterSource

from .. import knobs
from .cli_help import SUITE_FLAGS, HelpGroup, output_path, selected_suite, with_flags, write_output
from . import cli_model, cli_tools
from ..ir import ACTIVATIONS, DTYPES

if TYPE_CHECKING:
    import torch

    from ..autotune import suites
    from ..autotune.space import Problem


def _print_version(context: click.Context, _: click.Parameter, value: bool) -> None:
    """--version, without importing the package's torch side (click's version_option would resolve it now)."""
    if value and not context.resilient_parsing:
        from ..compiler.codegen import gconvgen_version

        click.echo(f"gconvgen, version {gconvgen_version()}")
        context.exit()


@click.group(cls=HelpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
def main() -> None:
    """gconvgen: a code-generating compiler for grouped and depthwise convolutions."""


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
    """The suite's (label, layer, problem) list. On CPU a shipped GPU suite is replaced by the smoke suite,
    and refused with the reason where --layer picked some of its layers."""
    from ..autotune import suites
    from ..compiler.plan import planned

    name = suite_name or ("headline" if device.type == "cuda" else "smoke")
    suite = selected_suite(name, layer_ids)  # unknown names are refused (with suggestions) on any device
    if device.type == "cpu" and name != "smoke" and name in suites.suite_names():
        smoke = selected_suite("smoke", ())
        if layer_ids:
            raise click.UsageError(f"--layer {layer_ids[0]}: suite {name!r} holds GPU-sized layers that would take "
                                   f"hours in Triton's interpreter on this CPU; run it on a CUDA machine, or use "
                                   f"--suite smoke (layers {', '.join(layer.id for layer in smoke.layers)}) or a "
                                   f"suite file of small layers")
        click.echo(f"no GPU: suite {name!r} would take hours in Triton's interpreter; running the "
                   f"'smoke' suite instead (use a CUDA machine for {name!r})", err=True)
        suite = smoke
    try:
        layouts = suite.layouts if layout == "both" else (layout,)
        problems = [(f"{layer.id} {lay}", layer, layer.problem(dtype or suite.dtype, lay))
                    for layer in suite.runnable for lay in layouts]
        for _, _, problem in problems:
            planned(problem.spec, knobs.padding_budget())  # a layer gconvgen refuses is named now, not mid-run
    except (ValueError, TypeError) as error:
        raise click.UsageError(with_flags(str(error), SUITE_FLAGS)) from None
    for layer in suite.deferred:
        click.echo(f"kept for later: {layer.id} ({layer.later})", err=True)
    return suite, problems


@contextlib.contextmanager
def _on(device: torch.device, note: bool = True) -> Iterator[None]:
    """Run the command's body on ``device``: on CPU through Triton's interpreter, saying plainly (once, unless
    ``note`` is False because the command's own summary says it) what CPU timings are worth.

    Triton decides when triton.language is imported whether its library functions run in the interpreter.
    Where Triton is not imported yet (the CLI imports it only now), TRITON_INTERPRET=1 is set for the body;
    where something imported it already, the command restarts itself once with it set.
    """
    if device.type != "cpu" or knobs.interpret():
        if note:
            _cpu_note(device)
        yield
        return
    if "triton" in sys.modules:
        click.echo("CPU: restarting with TRITON_INTERPRET=1 (Triton reads it at import)", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with knobs.scoped(INTERPRET=1):
            os.execv(sys.executable, [sys.executable, "-m", "gconvgen", *sys.argv[1:]])
    with knobs.scoped(INTERPRET=1):
        if note:
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
    from ..autotune import tuner
    from ..autotune.database import database, key_of
    from ..autotune.space import device_facts
    from ..runtime.device import allows_tf32

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
    from ..autotune.database import choice_of
    from ..autotune.space import config_name

    choice = choice_of(record)
    won = "aten" if choice.config is None else f"kernel {config_name(choice.config, choice.family)}"
    return (f"{won} {record['time_ms']:.4f} ms (aten {record['aten_ms']:.4f} ms); {record['trials']} trials, "
            f"{record['rejected']} wrong, {record['failed']} failed")


_suite_options = [
    click.option("--suite", default=None, metavar="NAME|FILE",
                 help="A shipped suite (headline, secondary, offsuite, sequence, smoke) or a suite JSON file. "
                      "Default: headline on a GPU, smoke on CPU."),
    click.option("--layer", "layer_ids", multiple=True, metavar="ID",
                 help="Only this layer id (repeatable); with tune --model, a module name of the model."),
    click.option("--dtype", type=click.Choice(DTYPES, case_sensitive=False), default=None,
                 help="Default: the suite's dtype (with --model: the model's own)."),
    click.option("--layout", type=click.Choice(["nchw", "nhwc", "both"], case_sensitive=False), default="both",
                 show_default=True,
                 help="Activation layout (nhwc = channels_last). With --model the default is nchw, as PyTorch runs "
                      "a model; nhwc puts the model and inputs in channels_last."),
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
@cli_model.with_model_options
@click.pass_context
def tune(context, suite, layer_ids, dtype, layout, device, force, backward, model, input_shapes,
         max_minutes) -> None:
    """Tune a suite's layers, or your model's grouped convs (--model), and write the winners to the tuning
    database.

    Every candidate is checked against a float64 reference before its time counts; PyTorch's own conv (or
    its convolution_backward) is always a candidate, so the database never picks a kernel slower than aten's
    (the call's own overhead comes on top: see gconvgen bench). With --model, one forward (and backward with
    --backward) of the model is recorded, each distinct conv is tuned, and a per-layer summary is printed;
    on CPU the time is estimated first. Ctrl-C keeps what was tuned.
    """
    cli_model.check_model_flags(context, model, input_shapes, suite, {"--max-minutes": max_minutes is not None})
    device = _device(device)
    if model is not None:
        with _on(device, note=False):  # the summary says what CPU timings are worth
            cli_model.tune_model(model, input_shapes, dtype, cli_model.layouts_of(context, layout), device, force,
                                 backward, max_minutes, layer_ids)
        return
    with _on(device):
        _, problems = _problems(suite, layer_ids, dtype, layout, device)
        _tune_all(_with_backward(problems) if backward else problems, device, force)
        from ..autotune.database import database

        click.echo(f"tuning database: {database().path}")


@main.command()
@_with_suite_options
@click.option("--tune", "tune_first", is_flag=True, help="Tune untuned layers first (one call tunes and benchmarks).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), callback=output_path(),
              help="Write the full report as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), callback=output_path(),
              help="Write the table as markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=output_path(),
              help="Plot speedup and % of floor per layer (needs the 'plot' extra: matplotlib).")
@click.option("--backward", is_flag=True,
              help="Also time forward + backward (grads of input, weight, bias) against PyTorch eager "
                   "(with --tune, the backward kernels are tuned too).")
@click.option("--block", type=click.Choice(("conv", "bn-act"), case_sensitive=False), default="conv",
              show_default=True,
              help="bn-act: time each layer's conv -> BatchNorm (eval) -> activation block fused by gconvgen "
                   "against PyTorch eager and torch.compile of the same block, with bytes moved (forward only; "
                   "--tune, --json and --markdown apply, --backward and --plot do not).")
@click.option("--activation", type=click.Choice(ACTIVATIONS[1:], case_sensitive=False),
              default="relu", show_default=True, help="The block's activation (with --block bn-act only).")
@click.option("--no-compile", "skip_compile", is_flag=True,
              help="With --block bn-act or --model: skip torch.compile.")
@click.option("--verbose", "-v", is_flag=True, help="Add the model terms: the kernel alone, the roofline floor.")
@cli_model.with_model_options
@click.pass_context
def bench(context, suite, layer_ids, dtype, layout, device, force, tune_first, json_path, markdown_path, plot_path,
          backward, block, activation, skip_compile, verbose, model, input_shapes, max_minutes) -> None:
    """Time gconvgen against F.conv2d (cudnn.benchmark on, same layout and dtype) and the roofline floor.

    A suite's layers, or your model's (--model). With --model: which kernel each grouped conv ran (family, tiles, tuned or default) and its time against
    F.conv2d and torch.compile, then the whole model's forward and training step, eager against converted.
    On CPU the kernels run in Triton's interpreter: those timings say nothing about GPU speed.
    """
    cli_model.check_model_flags(context, model, input_shapes, suite, {"--max-minutes": max_minutes is not None})
    if model is not None:
        cli_model.check_bench_flags(context, block, backward, plot_path, layer_ids, tune_first or force)
    else:
        _check_block_flags(context, block, backward, plot_path)  # before the run, not after it
    _check_plotting(plot_path)
    device = _device(device)
    if model is not None:
        with _on(device):
            cli_model.bench_model(model, input_shapes, dtype, cli_model.layouts_of(context, layout), device,
                                  tune_first, force, backward, not skip_compile, max_minutes, verbose, json_path,
                                  markdown_path)
        return
    with _on(device):
        suite_info, problems = _problems(suite, layer_ids, dtype, layout, device)
        if block == "bn-act":
            if tune_first or force:  # the fused conv runs the forward kernel the tuning database chooses
                _tune_all(problems, device, force)
            _bench_blocks(problems, activation, device, not skip_compile, json_path, markdown_path)
            return
        if tune_first or force:
            _tune_all(_with_backward(problems) if backward else problems, device, force)
        data, all_correct = _bench_all(suite_info, problems, device, verbose)
        if backward:
            from . import bench_backward

            timings = _time_backward(problems, device)
            click.echo("\nforward + backward, gconvgen against PyTorch eager:\n" + bench_backward.format_table(timings))
            data["backward"] = [{"id": label, "gconvgen_ms": t.gconvgen_ms, "torch_ms": t.torch_ms,
                                 "speedup": t.speedup, "resolved": t.resolved}
                                for (label, _, _), t in zip(problems, timings)]
    _write_reports(data, json_path, markdown_path, plot_path, verbose)
    if not all_correct:
        raise click.ClickException("some layers failed or gave wrong results (check column): see above")


def _check_block_flags(context: click.Context, block: str, backward: bool, plot_path: str | None) -> None:
    """Refuse, with the reason, the flags that would do nothing with this --block."""
    if block == "bn-act":
        if backward:
            raise click.UsageError("--backward: --block bn-act times the forward block only (its BatchNorm is "
                                   "folded, as in eval mode); drop --backward, or drop --block bn-act to time "
                                   "the convs' forward + backward")
        if plot_path:
            raise click.UsageError(f"--plot {plot_path}: --block bn-act draws no plot; drop --plot and use --json "
                                   f"or --markdown, or drop --block bn-act to plot the convs")
        return
    for name, flag in (("activation", "--activation"), ("skip_compile", "--no-compile")):
        if context.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            raise click.UsageError(f"{flag} applies to --block bn-act only (the conv table runs no activation "
                                   f"and no torch.compile); add --block bn-act or drop {flag}"
                                   + (" (or time a model's layers against torch.compile with --model)"
                                      if flag == "--no-compile" else ""))


def _bench_blocks(problems, activation: str, device: torch.device, compile_block: bool,
                  json_path: str | None, markdown_path: str | None) -> None:
    """--block bn-act: every layer's conv -> BN -> activation block, fused against eager and torch.compile."""
    from dataclasses import asdict

    from ..autotune import measure
    from .bench_block import bench_block, format_block_table

    timer = measure.timer_for(device, warmup_ms=25, rep_ms=100)
    rows = [bench_block(label.split()[0], problem, activation, device, timer, compile_block)
            for label, _, problem in tqdm.tqdm(problems, desc="conv-bn-act blocks", unit="layer", dynamic_ncols=True)]
    click.echo(format_block_table(rows, device.type == "cpu"))
    write_output(json_path, json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    write_output(markdown_path, format_block_table(rows, device.type == "cpu", markdown=True))
    if not all(row.correct for row in rows):
        raise click.ClickException("some fused blocks gave wrong results (ok column): see above")


def _check_plotting(plot_path: str | None) -> None:
    """--plot needs matplotlib and a file type it draws: say so at once rather than after the whole benchmark."""
    if not plot_path:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError(f"--plot {plot_path} needs matplotlib, which is not installed; run "
                               f"pip install 'gconvgen[plot]' (or pip install matplotlib), or drop --plot")
    from matplotlib.backend_bases import FigureCanvasBase

    types = FigureCanvasBase.get_supported_filetypes()
    if Path(plot_path).suffix.lower().lstrip(".") not in types:
        raise click.BadParameter(f"{plot_path!r}: matplotlib draws {', '.join(f'.{t}' for t in sorted(types))}; "
                                 f"name the file with one of those extensions, e.g. bench.png", param_hint="'--plot'")


def _bench_all(suite_info: suites.Suite, problems: list[tuple[str, suites.Layer, Problem]],
               device: torch.device, verbose: bool = False) -> tuple[dict, bool]:
    """Measure the ceilings, then check and time every problem; print the table. Returns the report and
    whether every layer ran and was correct."""
    from . import bench as benchmark
    from ..autotune import measure

    timer = measure.timer_for(device, warmup_ms=25, rep_ms=100)
    click.echo("measuring the copy bandwidth and matmul rate ...", err=True)
    ceilings = benchmark.measure_ceilings(device, timer)
    rows, failed = [], []
    try:
        for label, layer, problem in tqdm.tqdm(problems, desc="benchmarking", unit="layer", dynamic_ncols=True):
            try:
                rows.append(benchmark.bench_layer(layer.id, layer.model, problem, device, timer, ceilings))
            except (RuntimeError, ValueError) as error:  # e.g. out of memory: report it, measure the rest
                failed.append({"id": label, "why": f"{type(error).__name__}: {error}"})
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: reporting the {len(rows)} layer(s) measured so far", err=True)
    skipped = [{"id": layer.id, "why": layer.later} for layer in suite_info.deferred]
    data = benchmark.report(suite_info.name, rows, ceilings, timer, device, skipped, failed)
    click.echo(benchmark.format_table(data, verbose=verbose, note=False))  # _on said it, before the work
    return data, not failed and all(row.correct for row in rows)


def _write_reports(data: dict, json_path: str | None, markdown_path: str | None, plot_path: str | None,
                   verbose: bool = False) -> None:
    """Write the JSON, markdown and plot asked for."""
    from . import bench as benchmark

    write_output(json_path, json.dumps(data, indent=1) + "\n")
    write_output(markdown_path, benchmark.format_table(data, markdown=True, verbose=verbose))
    if plot_path:
        try:
            benchmark.plot(data, plot_path)
        except (RuntimeError, OSError) as error:
            raise click.ClickException(f"could not write {plot_path}: {error}") from None
        click.echo(f"wrote {plot_path}")


def _time_backward(problems, device: torch.device) -> list:
    """Forward + backward of each problem; on the CPU a few interpreter runs, on a GPU do_bench for 100 ms."""
    from . import bench_backward

    repeats = 100 if device.type == "cuda" else 2
    return [bench_backward.time_forward_backward(problem.spec, problem.batch, problem.height, problem.width,
                                                 device=device, repeats=repeats)
            for _, _, problem in tqdm.tqdm(problems, desc="forward + backward", unit="layer", dynamic_ncols=True)]


for _command in cli_tools.COMMANDS:  # plan, cache and inspect live in cli_tools.py
    main.add_command(_command)
