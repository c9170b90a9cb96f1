"""The rules between the SDK's parts (docs/architecture.md), checked on the import graph of the source tree."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it ships as (pyproject's package-dir mapping).
FOLDERS = {"finetune_sdk": "finetune_sdk", "plugins": "finetune_sdk.plugins", "registry": "finetune_sdk.registry"}
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "flwr", "trl", "gguf", "accelerate", "datasets",
         "safetensors", "numpy")
#: Modules over ~400 lines must say why at their top (a line starting with "Over 400 lines:").
MAX_LINES = 400


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
    """Every name ``module`` imports (``a.b`` for ``from a import b`` when ``a.b`` is a module). With
    ``top_level_only``: only those run when the module is imported (not in functions, not under TYPE_CHECKING)."""
    path = modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
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
                    found.add(full if full in modules() else base)
            visit(child)

    visit(tree)
    return frozenset(found)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(source: str, target: str) -> list[str]:
    return sorted(f"{m} imports {n}" for m in modules() if _within(m, source)
                  for n in imports(m) if _within(n, target))


def test_plugins_and_registry_never_import_the_cli():
    assert _violations("finetune_sdk.plugins", "finetune_sdk.cli") == []
    assert _violations("finetune_sdk.registry", "finetune_sdk.cli") == []


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


def test_no_import_cycles_at_import_time():
    graph = {m: {n for n in imports(m, top_level_only=True) if n in modules() and n != m} for m in modules()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
def test_long_modules_say_why_at_their_top():
    long = [f"{m} ({n} lines)" for m, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES * 1.1
            and "Over 400 lines:" not in path.read_text(encoding="utf-8")[:2000]]
    assert long == []


def test_trainer_is_a_thin_facade():
    assert len(modules()["finetune_sdk.trainer"].read_text(encoding="utf-8").splitlines()) <= 300


def test_the_run_engine_never_sees_the_trainer():
    for module in ("finetune_sdk.training.engine", "finetune_sdk.training.planning", "finetune_sdk.objectives",
                   "finetune_sdk.training.feature_cache", "finetune_sdk.training.saving"):
        assert "finetune_sdk.trainer" not in imports(module), module


def _private_imports(module: str) -> list[str]:
    """``module: from other import _name`` for every private name ``module`` takes from another SDK module."""
    tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
    return [f"{module}: from {node.module} import {alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune_sdk")
            and node.module != module for alias in node.names if alias.name.startswith("_")]


def test_the_studio_uses_only_public_names_of_other_modules():
    found = [line for m in modules() if _within(m, "finetune_sdk.studio") for line in _private_imports(m)]
    assert found == []

