"""The layout's promises: packages import only packages below them, with no cycles, and the merge
methods a config accepts are exactly the registered ones."""

import ast
from pathlib import Path
from typing import get_args

from safepatching.config.settings import MergeMethodName
from safepatching.method.merge_methods import MERGE_METHODS

PACKAGE = Path(__file__).parents[1] / "src" / "safepatching"
# Bottom to top: a package may import only those listed before it.
FLOORS = ["errors", "config", "storage", "data", "models", "method", "patchfile", "evaluation", "report",
          "experiments", "cli"]  # fmt: skip


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "safepatching" and len(parts) > 1 else None


def imported_packages() -> dict[str, set[str]]:
    """For each package, the other safepatching packages its modules import (at any depth of the code)."""
    graph: dict[str, set[str]] = {name: set() for name in FLOORS}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        source = relative.parts[0].removesuffix(".py")
        if source not in graph:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                package = package_of(target)
                if package and package != source and package in graph:
                    graph[source].add(package)
    return graph


def test_packages_import_only_packages_below_them():
    graph = imported_packages()
    for package, imports in graph.items():
        upward = {other for other in imports if FLOORS.index(other) >= FLOORS.index(package)}
        assert not upward, f"{package} imports {upward}, which are not below it"


def test_the_import_graph_has_at_most_eight_floors_from_the_cli_down():
    graph = imported_packages()

    def depth(package: str) -> int:
        return 1 + max((depth(other) for other in graph[package]), default=0)

    assert depth("cli") <= 8
    assert graph["method"] and "evaluation" not in graph["method"]  # the test sees real edges


def test_every_package_says_what_lives_there():
    for package in FLOORS[1:]:
        init = PACKAGE / package / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{package} has no docstring"


def test_the_config_accepts_exactly_the_registered_merge_methods():
    assert set(get_args(MergeMethodName)) == set(MERGE_METHODS)
