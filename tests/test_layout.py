"""The house keeps its shape (docs/design.md): pipeline/'s packages import only themselves and the packages below
them, the library never imports a stage, no stage imports another, and no module comes back to itself through
its imports. Read from the source's own imports; nothing is run."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import fixtures

# Each package may import the packages of lower rank; two of one rank (models and formats, teacher and embedded)
# not each other.
RANK = {"core": 0, "models": 1, "formats": 1, "cache": 2, "data": 3, "teacher": 4, "embedded": 4, "student": 5}


def modules() -> dict[str, Path]:
    """Every module of pipeline/ and stages/ by its dotted name."""
    found = {}
    for package in ("pipeline", "stages"):
        for path in sorted((fixtures.REPO / package).rglob("*.py")):
            parts = path.relative_to(fixtures.REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of this repository that the module at `path` imports (a package's name for its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def package(module: str) -> str | None:
    """The pipeline package of a module (None for the library's root and for stages)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def test_every_package_is_ranked(graph):
    assert {package(m) for m in graph} - {None} == set(RANK)


def test_packages_import_only_themselves_and_those_below(graph):
    upward = [f"{module} -> {dependency}" for module, dependencies in graph.items() for dependency in dependencies
              if package(module) and package(dependency) and package(dependency) != package(module)
              and RANK[package(dependency)] >= RANK[package(module)]]
    assert upward == []


def test_the_library_never_imports_a_stage_and_no_stage_another(graph):
    into_stages = [f"{m} -> {d}" for m, ds in graph.items() for d in ds
                   if m.startswith("pipeline") and d.startswith("stages")]
    assert into_stages == []
    # the command line is above the stages: a stage that runs others (`moekd rounds`) goes through it
    stages = {m for m in graph if m.startswith("stages.") and m != "stages.cli"}
    assert [f"{m} -> {d}" for m in stages for d in graph[m] if d in stages] == []


def test_no_module_comes_back_to_itself(graph):
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module):] + [module])
        elif module not in done:
            for dependency in sorted(graph.get(module, ())):
                visit(dependency, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []


def test_the_cli_names_every_stage_and_only_stages(graph):
    from stages import cli

    stages = {m for m in graph if m.startswith("stages.")} - {"stages.cli"}
    assert set(cli.STAGES.values()) == stages
    for name, module in cli.STAGES.items():
        stage = importlib.import_module(module)
        assert callable(stage.run) and hasattr(stage, "Config"), name
