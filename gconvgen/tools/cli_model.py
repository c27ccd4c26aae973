"""``gconvgen tune --model`` and ``gconvgen bench --model``: a user's model on the command line.

``--model module:factory`` names an importable module (or a file, ``path/to/file.py``) and a callable in it
that returns an ``nn.Module`` (an nn.Module there is taken as it is); ``--input 1x3x224x224`` (repeatable,
one per positional argument) gives the shapes of random example inputs. The model and inputs are put on
``--device``, in ``--dtype`` (default: the model's own) and ``--layout`` (nhwc: channels_last), then handed
to ``gconvgen.tune`` / ``gconvgen.report``. Like the rest of the CLI this imports torch only when a command
runs; every bad value is a one-line click error naming the flag.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click

from .cli_help import did_you_mean, shape, with_flags, write_output

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_FLAGS = {"max_minutes": "--max-minutes", "backward": "--backward", "force": "--force"}
MODEL_FORMS = "module:factory, e.g. mypackage.models:make_model or path/to/models.py:make_model"


MODEL_OPTIONS = [
    click.option("--model", default=None, metavar="MODULE:FACTORY",
                 help="Your model instead of a suite: an importable module (or path/to/file.py) and a function in "
                      "it returning the nn.Module, e.g. mypackage.models:make_model. Every grouped conv one "
                      "forward runs is taken."),
    click.option("--input", "input_shapes", multiple=True, callback=shape, metavar="SHAPE",
                 help="With --model: the shape of its input, e.g. 1x3x224x224 (repeat it for each input)."),
    click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="With --model on CPU: refuse work estimated to take longer in Triton's interpreter "
                      "(default 10)."),
]


def with_model_options(command):
    """``command`` with the --model, --input and --max-minutes options."""
    for option in reversed(MODEL_OPTIONS):
        command = option(command)
    return command


def load_model(text: str) -> "nn.Module":
    """The nn.Module that ``text`` (module:factory) names; click.BadParameter for --model saying what is
    wrong: not of that form, no such module or file, no such name in it, a factory that fails or returns
    something else."""
    from torch import nn

    module_name, colon, factory_name = text.rpartition(":")
    if not colon or not module_name or not factory_name:
        raise _bad(f"{text!r} is not {MODEL_FORMS}")
    module = _import(module_name)
    factory = getattr(module, factory_name, None)
    if factory is None:
        names = [name for name in vars(module) if not name.startswith("_") and callable(getattr(module, name))]
        raise _bad(f"{module_name} has no {factory_name!r} (a function or class in it that returns the "
                   f"nn.Module){did_you_mean(factory_name, names)}")
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise _bad(f"{text}: {factory_name} is a {type(factory).__name__}, not a callable returning an nn.Module")
    try:
        model = factory()
    except Exception as error:  # the user's code: say what it raised, in one line
        raise _bad(f"{text}() raised {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise _bad(f"{text}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _import(module_name: str):
    """The module ``module_name``: a file path (ending in .py or naming a file), else an importable name,
    looked up from the current folder too, as ``python -m`` does."""
    path = Path(module_name).expanduser()
    if module_name.endswith(".py") or path.is_file():
        if not path.is_file():
            raise _bad(f"the file {module_name!r} does not exist; give {MODEL_FORMS}")
        sys.path.insert(0, str(path.resolve().parent))  # so the file imports its neighbours
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        loader = spec.loader.exec_module
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module, loader = None, None
    try:
        if loader is not None:
            loader(module)
            return module
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise _bad(f"no module named {error.name!r} (looked in {os.getcwd()} and the installed packages); give "
                       f"{MODEL_FORMS}") from None
        raise _bad(f"importing {module_name} failed: {type(error).__name__}: {_first_line(error)}") from None
    except Exception as error:  # the user's module raised while importing
        raise _bad(f"importing {module_name} failed: {type(error).__name__}: {_first_line(error)}") from None


def _bad(message: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint="'--model'")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def model_and_inputs(text: str, shapes: tuple[tuple[int, ...], ...], dtype: Optional[str], layout: str,
                     device: "torch.device") -> tuple["nn.Module", tuple]:
    """The model ``text`` names and random inputs of ``shapes``, on ``device``, in ``dtype`` (None: the
    model's) and ``layout`` (nhwc: channels_last, which needs 4-D inputs)."""
    import torch

    from ..runtime.device import TORCH_DTYPES

    model = load_model(text).to(device)
    if dtype is not None:
        model = model.to(TORCH_DTYPES[dtype])
    if layout == "nhwc":
        if any(len(shape) != 4 for shape in shapes):
            raise click.UsageError(f"--layout nhwc makes 4-D inputs channels_last; --input "
                                   f"{'x'.join(map(str, next(s for s in shapes if len(s) != 4)))} is not 4-D; use "
                                   f"--layout nchw")
        model = model.to(memory_format=torch.channels_last)
    parameter = next(model.parameters(), None)
    element = TORCH_DTYPES[dtype] if dtype else (parameter.dtype if parameter is not None else torch.float32)
    inputs = tuple(torch.randn(shape, device=device).to(element) for shape in shapes)
    if layout == "nhwc":
        inputs = tuple(value.contiguous(memory_format=torch.channels_last) for value in inputs)
    return model, inputs


def check_model_flags(context: click.Context, model: Optional[str], shapes: tuple, suite: Optional[str],
                      given: dict[str, bool]) -> None:
    """Refuse, before any work, the flags that do not go with --model or without it. ``given`` says which
    model-only flags (by their flag) were given."""
    if model is None:
        for flag, present in given.items():
            if present:
                raise click.UsageError(f"{flag} applies to --model only; add --model module:factory or drop {flag}")
        if shapes:
            raise click.UsageError("--input gives the shapes of a model's inputs; add --model module:factory")
        return
    if suite is not None:
        raise click.UsageError(f"--suite {suite} and --model {model}: give one (a suite's layers, or your model's)")
    if not shapes:
        raise click.UsageError(f"--model {model} needs the shape of its input: add --input, e.g. --input 1x3x224x224 "
                               f"(repeat it for a model with several inputs)")


def check_bench_flags(context: click.Context, block: str, backward: bool, plot_path: Optional[str],
                      layer_ids: tuple[str, ...], tuning: bool) -> None:
    """Refuse, with the reason, the bench flags that would do nothing with --model."""
    from click.core import ParameterSource

    if block == "bn-act":
        raise click.UsageError("--block bn-act times a suite's conv -> BN -> act blocks; with --model the model's "
                               "own blocks run: drop --block, or drop --model")
    if plot_path:
        raise click.UsageError(f"--plot {plot_path}: with --model the report is a table; use --json or --markdown, "
                               f"or drop --model to plot a suite")
    if layer_ids:
        raise click.UsageError(f"--layer {layer_ids[0]}: bench --model reports every grouped conv of the model; "
                               f"drop --layer (gconvgen tune --model --layer NAME tunes one)")
    if backward and not tuning:
        raise click.UsageError("--backward: bench --model always times the model's training step; with --tune it "
                               "also tunes the backward kernels; add --tune or drop --backward")
    if context.get_parameter_source("activation") not in (ParameterSource.DEFAULT, None):
        raise click.UsageError("--activation applies to --block bn-act only; with --model the model's own "
                               "activations run: drop --activation")


def layouts_of(context: click.Context, layout: str) -> tuple[str, ...]:
    """--layout for a model: as given ('both': each in turn); by default nchw, how PyTorch runs a model."""
    from click.core import ParameterSource

    if context.get_parameter_source("layout") in (ParameterSource.DEFAULT, None):
        return ("nchw",)
    return ("nchw", "nhwc") if layout == "both" else (layout,)


def tune_model(text: str, shapes: tuple, dtype: Optional[str], layouts: tuple[str, ...], device: "torch.device",
               force: bool, backward: bool, max_minutes: Optional[float], layers: tuple[str, ...]) -> None:
    """``gconvgen tune --model``: gconvgen.tune per layout, its summary printed; Ctrl-C exits 130."""
    from .model_calls import ModelRunError
    from .model_tuning import tune

    for layout in layouts:
        model, inputs = model_and_inputs(text, shapes, dtype, layout, device)
        click.echo(f"model {text}, input {', '.join('x'.join(map(str, s)) for s in shapes)}, {layout}", err=True)
        try:
            tune(model, inputs, backward=backward, force=force, max_minutes=max_minutes, layers=layers)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: kept the layers tuned so far in the tuning database", err=True)
            raise SystemExit(130) from None
        except (TypeError, ValueError) as error:
            raise click.UsageError(_in_flags(error)) from None
        except ModelRunError as error:  # the model's own forward refused the inputs
            raise _forward_failed(text, shapes, error) from None


def bench_model(text: str, shapes: tuple, dtype: Optional[str], layouts: tuple[str, ...], device: "torch.device",
                tune_first: bool, force: bool, backward: bool, torch_compile: bool, max_minutes: Optional[float],
                verbose: bool, json_path: Optional[str], markdown_path: Optional[str]) -> None:
    """``gconvgen bench --model``: gconvgen.report per layout (tuned first with --tune or --force); the
    tables printed, JSON and markdown written; a ClickException when an output was wrong."""
    from .model_calls import ModelRunError
    from .model_report import report
    from .model_tuning import tune

    reports = []
    for layout in layouts:
        model, inputs = model_and_inputs(text, shapes, dtype, layout, device)
        try:
            if tune_first or force:
                tune(model, inputs, backward=backward, force=force, max_minutes=max_minutes)
            reports.append(report(model, inputs, torch_compile=torch_compile, max_minutes=max_minutes))
        except (TypeError, ValueError) as error:
            raise click.UsageError(_in_flags(error)) from None
        except ModelRunError as error:
            raise _forward_failed(text, shapes, error) from None
        click.echo(reports[-1].format(verbose=verbose, note=False))
    write_output(json_path, json.dumps([item.as_dict() for item in reports], indent=1, default=str) + "\n")
    write_output(markdown_path, "\n".join(item.format(verbose=verbose, markdown=True) for item in reports))
    wrong = [layer for item in reports for layer in item.layers if not layer.bench.correct]
    if wrong or not all(step.correct for item in reports for step in item.steps):
        raise click.ClickException("some layers or the converted model gave wrong results (check column): see above")


def _forward_failed(text: str, shapes: tuple, error: Exception) -> click.ClickException:
    inputs = " ".join(f"--input {'x'.join(map(str, shape))}" for shape in shapes)
    cause = error.__cause__ or error
    return click.ClickException(f"--model {text} failed on {inputs}: {type(cause).__name__}: {_first_line(cause)}; "
                                f"check the input shapes the model expects")


def _in_flags(error: Exception) -> str:
    """An API error in the CLI's terms: max_minutes=N -> --max-minutes N, 'layers: x' -> '--layer x'."""
    return with_flags(str(error), MODEL_FLAGS).replace("layers: ", "--layer ")
