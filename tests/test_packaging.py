"""Packaging: every subpackage is listed, and plugins/ and registry/ ship inside finetune_sdk."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return config["packages"], config["package-dir"]


def on_disk(package_dir: dict[str, str]) -> set[str]:
    found = set()
    for package, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            name = ".".join((package, *rel.parts)) if rel.parts else package
            if not any(name.startswith(other + ".") or name == other for other in package_dir if other != package
                       and other.startswith(package + ".")):
                found.add(name)
    return found


def test_every_subpackage_is_in_the_packaging_list():
    packages, package_dir = declared()
    missing = on_disk(package_dir) - set(packages)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    for package in packages:
        top = next(p for p in sorted(package_dir, key=len, reverse=True) if package == p or
                   package.startswith(p + "."))
        folder = ROOT / package_dir[top] / Path(*package[len(top):].strip(".").split(".") if package != top else ())
        assert (folder / "__init__.py").is_file(), f"{package} is listed but {folder} has no __init__.py"


def test_plugins_and_registry_import_under_finetune_sdk():
    import finetune_sdk.plugins
    import finetune_sdk.registry

    assert Path(finetune_sdk.plugins.__file__).parent == ROOT / "plugins"
    assert Path(finetune_sdk.registry.__file__).parent == ROOT / "registry"


def test_plugins_refuse_a_top_level_import(monkeypatch):
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("plugins", ROOT / "plugins" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="finetune_sdk.plugins"):
        spec.loader.exec_module(module)


def test_the_studios_static_files_ship_in_the_wheel():
    import fnmatch

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["finetune_sdk.studio"]
    static = [p.relative_to(ROOT / "finetune_sdk" / "studio").as_posix()
              for p in (ROOT / "finetune_sdk" / "studio" / "static").iterdir()]
    assert {"static/studio.js", "static/studio.css"} <= set(static)
    missing = [f for f in static if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"add these to [tool.setuptools.package-data] finetune_sdk.studio: {missing}"
