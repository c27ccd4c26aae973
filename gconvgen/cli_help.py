"""How the command line talks: help that lists each command's whole description, and the planner's and
the suites' messages in terms of the CLI's flags rather than the Python API's keywords."""
from __future__ import annotations

import inspect
import re

import click


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
