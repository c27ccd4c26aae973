"""How the command line talks: help that lists each command's whole description, the planner's and the
suites' messages in terms of the CLI's flags rather than the Python API's keywords, suites and layers chosen
by name with "did you mean" for names it does not know, and the flag values it checks before any work (sizes
like 3x5, output paths) and the outputs it then writes."""
from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import click

if TYPE_CHECKING:
    from ..autotune import suites


class HelpGroup(click.Group):
    """A command group whose command list shows each command's whole first paragraph (click's default cuts
    it at about 45 characters with '...')."""

    group_class = type  # subgroups (gconvgen cache) list their commands the same way

    def format_commands(self, context: click.Context, formatter: click.HelpFormatter) -> None:
        """Write the Commands section: each command's short_help, else its help's first paragraph, whole."""
        rows = []
        for name in self.list_commands(context):
            command = self.get_command(context, name)
            if command is not None and not command.hidden:
                summary = command.short_help or inspect.cleandoc(command.help or "").split("\n\n")[0]
                rows.append((name, " ".join(summary.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


# The planner and the suites name the Python keywords of the API (channel_policy='pad'); a CLI user needs
# the flag (--channel-policy pad). Each command translates the keywords it has a flag for.
PLAN_FLAGS = {"in_channels": "--in-channels", "out_channels": "--out-channels", "groups": "--groups",
              "kernel_size": "--kernel", "stride": "--stride", "padding": "--padding", "dilation": "--dilation",
              "dtype": "--dtype", "layout": "--layout", "channel_policy": "--channel-policy",
              "padding_budget": "--padding-budget", "family": "--family"}
SUITE_FLAGS = {"suite": "--suite", "layer": "--layer", "dtype": "--dtype", "layout": "--layout"}
_SPEC_REPR = re.compile(r"ConvSpec\((?:[^()]|\([^()]*\))*\)")  # quoted whole: it shows the spec, not flags
_KEYWORD = re.compile(r"(?<![\w.-])([a-z_]+)=('[^']*'|\([^()]*\)|\[[^\]]*\]|-?\d+(?:\.\d+)?|\.\.\.)")


def with_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each ``keyword=value`` that has a flag in ``flags`` written as ``--flag value``:
    "pass channel_policy='pad'" -> "pass --channel-policy pad", kernel_size=(3, 3) -> --kernel 3x3,
    "groups=[1, 2, 4]" -> "--groups 1, 2 or 4", "plan(spec, padding_budget=...)" -> "--padding-budget"."""
    if "padding_budget" in flags:
        message = message.replace("plan(spec, padding_budget=...)", "padding_budget=...")

    def flag(match: re.Match) -> str:
        keyword, value = match.groups()
        if keyword not in flags:
            return match.group()
        if value == "...":
            return flags[keyword]
        items = [item.strip().strip("'") for item in value.strip("()[]").split(",") if item.strip()]
        if value.startswith("("):  # (3, 3) -> 3x3; four paddings -> top,bottom,left,right
            value = ("x" if len(items) == 2 else ",").join(items)
        elif value.startswith("["):
            value = items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
        elif value.startswith("'"):
            value = value[1:-1]
        return f"{flags[keyword]} {value}"

    pieces, start = [], 0
    for spec in _SPEC_REPR.finditer(message):
        pieces += [_KEYWORD.sub(flag, message[start:spec.start()]), spec.group()]
        start = spec.end()
    return "".join(pieces + [_KEYWORD.sub(flag, message[start:])])


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """"; did you mean 'x'?" naming the closest of ``known`` to ``value`` (difflib), or '' when none is close:
    the end of a message that names ``value``."""
    close = difflib.get_close_matches(value, list(known), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""


def sizes(lengths: tuple[int, ...], forms: str,
          words: tuple[str, ...] = ()) -> Callable[[click.Context, click.Parameter, str], object]:
    """A click callback reading ``3``, ``3x5`` or ``1,1,2,2`` as a tuple of ints of one of ``lengths``
    (or one of ``words``, in any case, as that word in lower case); otherwise click.BadParameter naming the
    flag, the value and ``forms``, the forms it takes. Signs and ranges are the planner's to check."""
    def parse(context: click.Context, parameter: click.Parameter, text: str) -> object:
        if text.lower() in words:
            return text.lower()
        try:
            values = tuple(int(part) for part in text.lower().replace("x", ",").split(","))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a size; give {forms}") from None
        if len(values) not in lengths:
            raise click.BadParameter(f"{text!r} has {len(values)} values; give {forms}")
        return values
    return parse


def shape(context: click.Context, parameter: click.Parameter, texts: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """A click callback reading each ``1x3x224x224`` of a repeatable option as a tuple of ints >= 1 (a
    tensor's shape); otherwise click.BadParameter naming the value."""
    shapes = []
    for text in texts:
        try:
            sizes = tuple(int(part) for part in text.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a shape; give sizes joined by x, e.g. 1x3x224x224") from None
        if not 1 <= len(sizes) <= 5 or min(sizes) < 1:
            raise click.BadParameter(f"{text!r} must be 1 to 5 sizes, each >= 1, e.g. 1x3x224x224")
        shapes.append(sizes)
    return tuple(shapes)


def output_path(suffixes: tuple[str, ...] = (), what: str = "") -> Callable[[click.Context, click.Parameter,
                                                                              Optional[str]], Optional[str]]:
    """A click callback that refuses, before any work, an output path that cannot be written: a folder, a
    file in a folder that does not exist or is not writable, a read-only file, or (given ``suffixes``) a
    name whose extension says a format the command does not write (``what`` names the formats)."""
    def check_path(context: click.Context, parameter: click.Parameter, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        if not value.strip():
            raise click.BadParameter("an empty name is no file; give a file name, e.g. out" + (suffixes or ("",))[0])
        path = Path(value).expanduser()
        if suffixes and path.suffix.lower() not in suffixes:
            raise click.BadParameter(f"{value!r} does not end in {' or '.join(suffixes)}; {what}, so name the "
                                     f"file with one of those extensions")
        folder = path.parent
        if path.is_dir():
            raise click.BadParameter(f"{value!r} is a folder; give a file name in it, e.g. {path / 'out'}")
        if not folder.exists():
            raise click.BadParameter(f"{value!r} is in the folder {str(folder)!r}, which does not exist; create "
                                     f"it first (mkdir -p {folder}) or write elsewhere")
        if not folder.is_dir():
            raise click.BadParameter(f"{value!r} is under {str(folder)!r}, which is a file, not a folder; "
                                     f"write elsewhere")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise click.BadParameter(f"{value!r} cannot be written (no permission); choose a writable place")
        return value
    return check_path


def write_output(path: Optional[str], text: str, said: str = "wrote {path}") -> None:
    """Write ``text`` to ``path`` (checked writable when its flag was read, by output_path) and say ``said``;
    nothing without a path. A write that fails anyway (a full disk) is a one-line click error."""
    if not path:
        return
    try:
        Path(path).write_text(text)
    except OSError as error:
        raise click.ClickException(f"could not write {path}: {error.strerror or error}") from None
    click.echo(said.format(path=path))


def selected_suite(name: str, layer_ids: tuple[str, ...]) -> "suites.Suite":
    """Suite ``name`` (shipped, or a suite file) restricted to ``layer_ids``; click.UsageError naming the flag
    and the closest known names for a suite or layer id it does not know, or a malformed suite file."""
    from ..autotune import suites

    try:
        suite = suites.load_suite(name)
    except FileNotFoundError as error:
        raise click.UsageError(with_flags(str(error), SUITE_FLAGS) + did_you_mean(name, suites.suite_names())) from None
    except (ValueError, TypeError) as error:
        raise click.UsageError(with_flags(str(error), SUITE_FLAGS)) from None
    known = [layer.id for layer in suite.layers]
    for layer_id in layer_ids:
        if layer_id not in known:
            elsewhere = [other for other in suites.suite_names() if other != suite.name
                         and any(layer.id == layer_id for layer in suites.load_suite(other).layers)]
            where = f" (it is in --suite {' and '.join(elsewhere)})" if elsewhere else ""
            raise click.UsageError(f"--layer {layer_id} is not in suite {suite.name!r}{where}; its layers: "
                                   f"{', '.join(known)}{did_you_mean(layer_id, known)}")
    return suite.select(layer_ids)
