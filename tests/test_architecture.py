"""The package's shape, checked from its source: gconvgen's imports form no cycle and never reach up a room,
and no module outside the family registry branches on a family's name."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from gconvgen.compiler.families import FAMILIES

PACKAGE = Path(__file__).resolve().parent.parent / "gconvgen"
# each room may import its own modules and the rooms before it, never one after it
ROOMS = ("core", "compiler", "runtime", "autotune", "ops", "nn", "integrations", "tools", "front")
CORE = {"ir", "knobs", "memo", "activations", "resources", "testing"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    """A module's room: its subpackage, 'core' for the shared vocabulary, 'front' for the public facade (the
    causal_conv1d drop-in's package too)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ROOMS:
        return parts[1]
    return "core" if len(parts) == 2 and parts[1] in CORE else "front"


def import_graph() -> nx.DiGraph:
    """module -> every gconvgen module it imports, at the top or inside a function (both load it)."""
    graph = nx.DiGraph()
    for module, path in MODULES.items():
        graph.add_node(module)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                           for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph.add_edges_from((module, target) for target in targets if target in MODULES and target != module)
    return graph


def test_imports_form_no_cycle():
    graph = import_graph()
    assert graph.number_of_edges() > 100  # the walk found the imports
    assert list(nx.simple_cycles(graph)) == []


def test_no_room_imports_a_room_above_it():
    upward = [(source, target) for source, target in import_graph().edges
              if ROOMS.index(room(target)) > ROOMS.index(room(source))]
    assert upward == []
    assert room("gconvgen.compiler.families.igemm") == "compiler" and room("gconvgen.ir") == "core"
    assert room("gconvgen.causal_conv1d") == "front" and room("gconvgen") == "front"
    assert room("gconvgen.causal_conv1d.causal_conv1d_interface") == "front"


def test_no_family_name_outside_the_registry():
    """A family's name appears as a string only in its own module and the registry (docstrings aside)."""
    found = []
    for module, path in MODULES.items():
        if module.startswith("gconvgen.compiler.families"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found += [(module, node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in FAMILIES and id(node) not in docstrings]
    assert len(FAMILIES) >= 5 and found == []
