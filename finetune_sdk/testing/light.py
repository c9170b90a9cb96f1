"""Which heavy libraries a module imports when it is imported, read from the source (nothing is imported).

``finetune --help`` and ``finetune plugins`` import every plugin module, so a plugin module must import torch,
transformers, peft... only inside the functions that need them. The contract suite checks this with
:func:`heavy_imports`.

Example:
    >>> heavy_imports("finetune_sdk.plugin_api")
    []
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

#: Libraries that take seconds to import or pull in a GPU runtime.
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "trl", "flwr", "gguf", "accelerate", "datasets")


def _source(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec else None
    return Path(origin) if origin and origin.endswith(".py") else None


def _top_level_imports(path: Path, module: str) -> list[str]:
    """Modules imported when ``module`` is imported: not inside functions, not under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base]) if base else ".".join(parts)
                found.append(base)
                found.extend(f"{base}.{alias.name}" for alias in node.names
                             if _source(f"{base}.{alias.name}") is not None)
            elif isinstance(node, ast.If):
                test = node.test
                if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") and not (
                        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def heavy_imports(module: str) -> list[str]:
    """``"a.b imports torch"`` for each heavy library ``module`` (or a module of its own package or of the SDK
    that it imports) imports at import time; ``[]`` when importing it stays light."""
    own = {module.split(".")[0], "finetune_sdk"}
    seen: set[str] = set()
    todo, heavy = [module], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _source(name)
        if path is None:
            continue
        for imported in _top_level_imports(path, name):
            if imported.split(".")[0] in HEAVY:
                heavy.append(f"{name} imports {imported}")
            elif imported.split(".")[0] in own:
                todo.append(imported)
    return sorted(set(heavy))
