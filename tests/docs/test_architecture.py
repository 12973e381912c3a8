"""docs/architecture.md stays true: what it names exists, it describes every package and
top-level module, and the imports keep to its layers."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

from tests import REPO_ROOT

REPO = REPO_ROOT
PACKAGE = REPO / "edge_agent"
DOC = REPO / "docs" / "architecture.md"
TEXT = DOC.read_text(encoding="utf-8")
CODE = set(re.findall(r"`([^`\s]+)`", TEXT))
PATHS = sorted(c for c in CODE if re.fullmatch(r"[\w/.*]+(\.py|/)", c))


def _matches(token: str) -> list[Path]:
    """The files or folders a path in the doc names: from the repository or from edge_agent/."""
    for base in (REPO, PACKAGE):
        found = sorted(base.glob(token.rstrip("/"))) if "*" in token else [base / token]
        found = [f for f in found if f.is_dir() == token.endswith("/") and f.exists()]
        if found:
            return found
    return []


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("token", PATHS)
def test_every_path_named_exists(token: str) -> None:
    assert _matches(token), f"docs/architecture.md names `{token}`, which does not exist"


def test_every_linked_doc_exists() -> None:
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", TEXT):
        assert (DOC.parent / link).is_file(), f"docs/architecture.md links {link}, which is gone"


def test_every_package_and_top_level_module_is_described() -> None:
    described = {f for token in PATHS for f in _matches(token)}
    headings = set(re.findall(r"^### `edge_agent/(\w+)/`$", TEXT, re.M))
    for path in sorted(PACKAGE.rglob("__init__.py")):
        package = path.parent
        if package == PACKAGE:
            continue
        assert package in described, f"{package.relative_to(REPO)}/ is not in the doc"
        if package.parent == PACKAGE:
            assert package.name in headings, f"edge_agent/{package.name}/ has no section"
    for module in sorted(PACKAGE.glob("*.py")):
        assert module in described, f"{module.relative_to(REPO)} is not in the doc"


def _layers() -> dict[str, int]:
    rows = re.findall(r"^\| (\d) [^|]+\| (.+) \|$", TEXT, re.M)
    assert rows, "the layer table is gone"
    return {name: int(layer) for layer, names in rows for name in re.findall(r"`([\w.*]+)`", names)}


LAYERS = _layers()


def _layer(module: str) -> tuple[str, int]:
    """The layer of a module: its own row, else its package's (longest name first)."""
    name = module.removeprefix("edge_agent.") if module != "edge_agent" else module
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        for pattern, layer in LAYERS.items():  # `cli*`: cli, cli_tag and any cli_<name>
            if fnmatch.fnmatchcase(key, pattern):
                return pattern, layer
    raise AssertionError(f"{module} has no layer in docs/architecture.md")


def _imports(module: str, path: Path) -> list[tuple[str, str]]:
    """(module imported, name) for every import of edge_agent code, at any depth (lazy too)."""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            parts = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                # ``from . import registry`` imports a module, ``from .x import y`` a name.
                sub = f"{target}.{alias.name}"
                found.append((sub, "") if sub in MODULES else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(t, n) for t, n in found if t == "edge_agent" or t.startswith("edge_agent.")]


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_no_module_imports_from_a_layer_above() -> None:
    wrong = []
    for module, path in MODULES.items():
        own, layer = _layer(module)
        for target, _ in _imports(module, path):
            theirs, above = _layer(target)
            if above > layer:
                wrong.append(
                    f"{module} ({own}, layer {layer}) imports {target} ({theirs}, {above})"
                )
            elif layer == above == 1 and _top(module) != _top(target):
                wrong.append(f"{module} imports {target}: tags and their format are independent")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_imported_across_packages() -> None:
    wrong = []
    for module, path in MODULES.items():
        for target, name in _imports(module, path):
            private = name.startswith("_") and not name.startswith("__")
            if private and _top(module) != _top(target):
                wrong.append(f"{module} imports {target}.{name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    """No module reaches itself through imports of any kind: lazy ones and type-only ones too,
    so a newcomer can read the package bottom-up."""
    graph = {
        m: {t for t, _ in _imports(m, p) if t in MODULES and t != m} for m, p in MODULES.items()
    }
    cycles = []
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycles.append(" -> ".join([*trail[trail.index(module) :], module]))
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "\n".join(cycles)
