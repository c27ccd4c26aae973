"""The README as a new user reads it: every ```python example runs as it stands on CPU (Triton's interpreter,
fallbacks forbidden, as conftest.py sets up), and the sections CI and users rely on are there."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch



pytestmark = pytest.mark.usefixtures("own_tuning_database")  # conftest.py


README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()


def _examples() -> list:
    """Each ```python block with the heading it sits under and its first line's number."""
    examples = []
    for match in re.finditer(r"^```python\n(.*?)^```", TEXT, flags=re.MULTILINE | re.DOTALL):
        line = TEXT.count("\n", 0, match.start()) + 2
        heading = re.findall(r"^#+ (.+)$", TEXT[: match.start()], flags=re.MULTILINE)[-1]
        name = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
        examples.append(pytest.param(match.group(1), line, id=f"{name}-line{line}"))
    return examples


EXAMPLES = _examples()


def test_the_readme_has_examples_for_each_way_in():
    code = "\n".join(example.values[0] for example in EXAMPLES)
    for spelling in ("gconvgen.convert(", "gconvgen.fuse(", 'backend="gconvgen"', "gconvgen.tune(", "gconvgen.report(",
                     "gconvgen.conv2d(", "gconvgen.conv1d(", "data_format=", "compile_layer("):
        assert spelling in code, spelling


@pytest.mark.parametrize("code, line", EXAMPLES)
def test_example_runs_as_it_stands(code, line, capsys):
    """Each example in a fresh namespace: a name it uses without defining it is a NameError."""
    torch._dynamo.reset()
    exec(compile(code, f"{README.name}, example at line {line}", "exec"), {"__name__": "__main__"})


def test_the_sections_ci_and_users_rely_on_are_there():
    two_commands = TEXT.split("## Two commands on a fresh machine")[1].split("\n## ")[0]
    assert "bash .ci/setup.sh && .venv/bin/python -m pytest -q" in two_commands  # CI reads the test command here
    assert "bash .ci/setup.sh && .venv/bin/gconvgen bench --suite smoke" in two_commands
    assert "## Testing on a CPU" in TEXT and "## Install" in TEXT and "pip install -e ." in TEXT
    assert TEXT.index("## Quickstart") < TEXT.index("## Internals")  # the user's side first
    for link in re.findall(r"\]\(([A-Z_]+\.md)\)", TEXT):
        assert (README.parent / link).is_file(), link
