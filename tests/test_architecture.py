"""The rules between the SDK's parts (docs/architecture.md), checked on the import graph of the source tree.

Every rule reads all three kinds of import: those run when a module is imported, those inside functions (the lazy
ones that load heavy libraries), and those under ``if TYPE_CHECKING:``. A cycle through a lazy import is still a
cycle: the two modules can't be understood, moved or tested apart.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it ships as (pyproject's package-dir mapping).
FOLDERS = {"finetune_sdk": "finetune_sdk", "plugins": "finetune_sdk.plugins", "registry": "finetune_sdk.registry"}
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "flwr", "trl", "gguf", "accelerate", "datasets",
         "safetensors", "numpy")
#: Modules over ~400 lines must say why at their top (a line starting with "Over 400 lines:").
MAX_LINES = 400
#: The facade: the package's own ``__init__`` (``finetune_sdk.Trainer``...) and ``trainer``.
FACADE = ("finetune_sdk", "finetune_sdk.trainer")
#: What every part may use: the flat helper modules, and the two shared services that live in ``training/`` (the
#: result's manifest and where results may be written: the run writes them, every reader checks them).
CORE = frozenset({"finetune_sdk.errors", "finetune_sdk.log", "finetune_sdk.fsutil", "finetune_sdk.network",
                  "finetune_sdk.progress", "finetune_sdk.training.manifest", "finetune_sdk.training.output_paths"})
#: What a plugin author imports: the plugin API module, the hook specs and the base classes it re-exports.
PLUGIN_API = frozenset({"finetune_sdk.plugin_api", "finetune_sdk.hookspecs", "finetune_sdk.markers", "finetune_sdk.formatter",
                        "finetune_sdk.quantizer", "finetune_sdk.technique", "finetune_sdk.options"})
#: Where docs/architecture.md keeps the layering table the layering test reads.
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@cache
def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@cache
def imports(module: str, top_level_only: bool = False) -> frozenset[str]:
    """Every name ``module`` imports (``a.b`` for ``from a import b`` when ``a.b`` is a module), inside functions and
    under ``TYPE_CHECKING`` too. With ``top_level_only``: only those run when the module is imported."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return source_imports(path.read_text(encoding="utf-8"), package, modules(), top_level_only)


def source_imports(text: str, package: str, known: Iterable[str] = (), top_level_only: bool = False) -> frozenset[str]:
    """The names the Python source ``text`` (a module of ``package``) imports; ``known``: the module names, so that
    ``from a import b`` gives ``a.b`` when that is a module, else ``a``."""
    known = frozenset(known)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if top_level_only and isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in known else base)
            visit(child)

    visit(ast.parse(text))
    return frozenset(found)


def test_imports_counts_lazy_and_type_checking_imports():
    text = ("from typing import TYPE_CHECKING\nimport a\nif TYPE_CHECKING:\n    from b import c\n"
            "def f():\n    import d\n    from . import e\n")
    known = {"p.e", "b.c"}
    assert source_imports(text, "p", known) == {"typing", "a", "b.c", "d", "p.e"}
    assert source_imports(text, "p", known, top_level_only=True) == {"typing", "a"}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(source: str, target: str) -> list[str]:
    return sorted(f"{m} imports {n}" for m in modules() if _within(m, source)
                  for n in imports(m) if _within(n, target))


def test_plugins_and_registry_never_import_the_cli():
    for part in ("finetune_sdk.plugins", "finetune_sdk.objectives", "finetune_sdk.exporting", "finetune_sdk.registry"):
        assert _violations(part, "finetune_sdk.cli") == [], part


def test_registry_never_imports_plugins():
    assert _violations("finetune_sdk.registry", "finetune_sdk.plugins") == []


def test_plugin_api_imports_nothing_heavy_even_for_typing():
    seen, todo, heavy = set(), ["finetune_sdk.plugin_api"], []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        # the plugin API module itself: no heavy import anywhere, not even under TYPE_CHECKING or in a function
        names = imports(module) if module == "finetune_sdk.plugin_api" else imports(module, top_level_only=True)
        heavy += [f"{module} imports {n}" for n in names if n.split(".")[0] in HEAVY]
        todo += [n for n in names if n in modules()]
    assert heavy == []
    assert "finetune_sdk.training.callbacks" not in seen  # the transformers bridge stays out of the plugin API


def test_plugin_api_import_loads_no_heavy_module():
    code = ("import sys, finetune_sdk.plugin_api as api; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); print(sorted(api.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded, names = out.splitlines()
    assert loaded == "[]"
    for name in ("TrainingContext", "Option", "Segment", "PluginWarning", "PluginError", "Technique", "Quantizer",
                 "Formatter", "hookimpl"):
        assert repr(name) in names


def test_hookspecs_annotate_with_the_plugin_api_types():
    assert "finetune_sdk.plugin_api" in imports("finetune_sdk.hookspecs")
    assert "finetune_sdk.training.callbacks" not in imports("finetune_sdk.hookspecs")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    return found


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    return {m: {n for n in imports(m, top_level_only) if n in modules() and n != m} for m in modules()}


def test_no_import_cycles_at_import_time():
    assert _cycles(_graph(top_level_only=True)) == []


def test_no_import_cycles_counting_lazy_and_type_checking_imports():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_package_init_never_imports_what_imports_the_package_back():
    """``from finetune_sdk.x import name`` in a module that ``x/__init__.py`` reaches runs against a half-made package
    (the name may not be there yet): a package's ``__init__`` re-exports only what sits below it."""
    back = []
    for package, path in modules().items():
        if path.name != "__init__.py":
            continue
        seen: set[str] = set()
        todo = [n for n in imports(package) if n in modules() and n != package]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            if package in imports(module):
                back.append(f"{package} reaches {module}, which imports {package}")
            todo += [n for n in imports(module) if n in modules() and n != package]
    assert sorted(back) == []


def test_no_module_imports_an_sdk_module_by_a_string():
    """``importlib.import_module("finetune_sdk...")`` or ``__import__`` would hide an edge from every rule here (the
    builtin plugins are loaded by name as entry points are: their list is data, not a literal in the call)."""
    found = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and node.args[0].value.startswith("finetune_sdk") \
                    and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                         or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))):
                found.append(f"{module}: {node.args[0].value}")
    assert found == []


def test_long_modules_say_why_at_their_top():
    long = [f"{m} ({n} lines)" for m, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES * 1.1
            and "Over 400 lines:" not in path.read_text(encoding="utf-8")[:2000]]
    assert long == []


def test_trainer_is_a_thin_facade():
    assert len(modules()["finetune_sdk.trainer"].read_text(encoding="utf-8").splitlines()) <= 300


def _reachable(module: str) -> set[str]:
    """Every SDK module ``module`` imports, directly or through others (all three kinds of import)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in imports(current):
            if name in modules() and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def _sees_the_facade(package: str) -> list[str]:
    return sorted(f"{m} reaches {f}" for m in modules() if _within(m, package) for f in FACADE
                  if f in _reachable(m))


def test_objectives_never_import_the_facade():
    assert [v for v in _violations("finetune_sdk.objectives", "finetune_sdk.trainer")] == []
    assert [f"{m} imports finetune_sdk" for m in modules() if _within(m, "finetune_sdk.objectives")
            if "finetune_sdk" in imports(m)] == []


def test_loaders_never_import_the_facade_nor_build_a_trainer():
    direct = [f"{m} imports {n}" for m in modules() if _within(m, "finetune_sdk.models") for n in imports(m)
              if n in FACADE]
    assert direct == []
    assert _sees_the_facade("finetune_sdk.models") == []


def test_the_run_engine_planner_and_saving_never_see_the_trainer():
    """Not imported, not even through another module (a lazy import in between included)."""
    seen = [f"{module} reaches {facade}" for module in (
        "finetune_sdk.training.engine", "finetune_sdk.training.planning", "finetune_sdk.training.saving",
        "finetune_sdk.training.feature_cache", "finetune_sdk.objectives") for facade in FACADE
        if facade in _reachable(module)]
    assert seen == []


def _private_imports(module: str) -> list[str]:
    """``module: from other import _name`` for every private name ``module`` takes from another SDK module."""
    tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
    return [f"{module}: from {node.module} import {alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune_sdk")
            and node.module != module for alias in node.names if alias.name.startswith("_")]


def test_the_studio_uses_only_public_names_of_other_modules():
    found = [line for m in modules() if _within(m, "finetune_sdk.studio") for line in _private_imports(m)]
    assert found == []


def part(module: str) -> str:
    """The part of the layering table (docs/architecture.md, "Layers") ``module`` belongs to: ``core``,
    ``plugin API``, ``plugin host``, ``facade``, else its subpackage (``data``, ``training``, ``registry``...).

    >>> part("finetune_sdk.training.engine"), part("finetune_sdk.progress"), part("finetune_sdk.trainer")
    ('training', 'core', 'facade')
    """
    if module in CORE:
        return "core"
    if module in PLUGIN_API:
        return "plugin API"
    if module == "finetune_sdk.plugin_manager":
        return "plugin host"
    if module in FACADE:
        return "facade"
    if module == "finetune_sdk.__main__":
        return "cli"
    return module.split(".")[1]


def layering_table(text: str | None = None) -> dict[str, frozenset[str]]:
    """docs/architecture.md's layering table: part -> the other parts its modules may import (the names in backticks
    of its third column, notes in parentheses left out; ``nothing``: none)."""
    text = ARCHITECTURE.read_text(encoding="utf-8") if text is None else text
    section = text.split("### Layers", 1)[1].split("\n#", 1)[0]
    table: dict[str, frozenset[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not line.lstrip().startswith("|") or cells[0] == "part" or set(cells[0]) <= {"-"}:
            continue
        allowed = re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cells[2]))  # (notes) name no part
        table[cells[0].strip("`")] = frozenset(allowed)
    return table


def test_the_layering_table_reads_parts_and_what_they_may_import():
    text = ("### Layers\n\n| part | holds | may import |\n| --- | --- | --- |\n"
            "| `data` | rows | `core`, `plugin API` (`formatter`) |\n| `core` | errors | nothing |\n\n"
            "## Next\n| `x` | y | `z` |\n")
    assert layering_table(text) == {"data": frozenset({"core", "plugin API"}), "core": frozenset()}


def test_the_layering_table_names_every_part_once():
    table = layering_table()
    parts = {part(m) for m in modules()}
    assert sorted(parts - set(table)) == [], "parts missing from docs/architecture.md's layering table"
    assert sorted(set(table) - parts) == [], "parts in the layering table that no module belongs to"
    assert sorted(n for allowed in table.values() for n in allowed if n not in table) == []


def test_each_part_imports_only_what_the_layering_table_allows():
    """Every import, lazy and ``TYPE_CHECKING`` ones included, goes to the module's own part or one its row names."""
    table = layering_table()
    found = sorted(f"{m} ({part(m)}) imports {n} ({part(n)})" for m in modules() for n in imports(m)
                   if n in modules() and part(n) != part(m) and part(n) not in table.get(part(m), frozenset()))
    assert found == []


def test_the_low_parts_stay_below_training():
    """The table itself keeps these: rows, speed-ups and advice know nothing of the run, the loaders or the
    objectives (data), or of the run (speed, advice); the registry knows no plugins and no CLI."""
    table = layering_table()
    assert not table["data"] & {"training", "models", "objectives", "facade"}
    assert not table["speed"] & {"training", "facade"}
    assert not table["advice"] & {"training", "facade"}
    assert not table["registry"] & {"plugins", "cli", "facade"}
    assert not table["plugins"] & {"cli"}
    for row in ("models", "objectives", "training"):
        assert "facade" not in table[row], row
