"""lm-eval's own ``lm_eval`` command accepts ``--model finetune-sdk``: the startup hook the wheel and editable
installs put in site-packages (build_hooks.py, finetune_sdk/evaluation/lm_eval_hook.py) registers the backend lazily when lm-eval
loads its registry, importing nothing at interpreter start."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_hook_is_installed_and_imports_nothing_at_start():
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / "finetune_sdk_lm_eval.pth"
    assert pth.is_file(), "the lm-eval startup hook is not installed here: reinstall (make setup / pip install -e .)"
    assert pth.read_text() == "import _finetune_sdk_lm_eval_hook; _finetune_sdk_lm_eval_hook.install()\n"
    assert (site / "_finetune_sdk_lm_eval_hook.py").read_text() == \
        (ROOT / "finetune_sdk" / "evaluation" / "lm_eval_hook.py").read_text()
    state = json.loads(run_python(
        "import json, sys; print(json.dumps({'hook': '_finetune_sdk_lm_eval_hook' in sys.modules, "
        "'heavy': sorted(m for m in ('torch', 'lm_eval', 'finetune_sdk', 'transformers', 'typing') "
        "if m in sys.modules), 'finders': [getattr(f, '__name__', '') for f in sys.meta_path]}))"))
    assert state["hook"] and state["heavy"] == []
    assert state["finders"][0] == "LmEvalRegistryFinder"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                          timeout=60, check=True)
    [line] = [line for line in done.stderr.splitlines() if line.endswith("_finetune_sdk_lm_eval_hook")]
    cumulative_us = int(line.split("|")[1])
    assert cumulative_us < 5_000, line  # measured ~100-300 us here; torch alone takes seconds


def test_lm_eval_registry_gets_the_backend_as_a_lazy_placeholder():
    out = json.loads(run_python(
        "import json, sys\n"
        "from lm_eval.api.registry import model_registry\n"
        "before = model_registry._objs['finetune-sdk']\n"
        "loaded_before = 'finetune_sdk.evaluation.lm_eval_backend' in sys.modules\n"
        "cls = model_registry.get('finetune-sdk')\n"
        "print(json.dumps({'placeholder': before, 'loaded_before': loaded_before, 'cls': cls.__name__, "
        "'after': model_registry._objs['finetune-sdk'] is cls}))"))
    assert out == {"placeholder": "finetune_sdk.evaluation.lm_eval_backend:FinetuneSDKLM", "loaded_before": False,
                   "cls": "FinetuneSDKLM", "after": True}


def test_hook_registers_once_and_leaves_a_backend_already_registered(monkeypatch):
    import types

    from finetune_sdk.evaluation import lm_eval_hook

    calls = []

    class Registry:
        def __init__(self, names):
            self.names = names

        def __contains__(self, name):
            return name in self.names

        def register(self, name, target):
            calls.append((name, target))

    lm_eval_hook.register(types.SimpleNamespace(model_registry=Registry(set())))
    lm_eval_hook.register(types.SimpleNamespace(model_registry=Registry({"finetune-sdk"})))
    lm_eval_hook.register(types.SimpleNamespace())  # no registry: ignored, never raises
    assert calls == [("finetune-sdk", "finetune_sdk.evaluation.lm_eval_backend:FinetuneSDKLM")]
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, "lm_eval.api.registry", raising=False)  # not loaded yet: a finder waits
    lm_eval_hook.uninstall()
    lm_eval_hook.install()
    lm_eval_hook.install()
    assert sys.meta_path.count(lm_eval_hook.LmEvalRegistryFinder) == 1
    assert lm_eval_hook.LmEvalRegistryFinder.find_spec("json") is None
    lm_eval_hook.uninstall()
    monkeypatch.setitem(sys.modules, "lm_eval.api.registry", types.SimpleNamespace(model_registry=Registry(set())))
    lm_eval_hook.install()  # already loaded: registered at once, no finder
    assert lm_eval_hook.LmEvalRegistryFinder not in sys.meta_path and len(calls) == 2


@pytest.mark.slow
def test_the_wheel_carries_the_hook(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel offline (no build isolation) needs setuptools")
    import shutil

    source = tmp_path / "source"  # a copy: pip builds in the source tree (build/, *.egg-info) and must not touch ROOT
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("finetune_sdk-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "finetune_sdk_lm_eval.pth" in names and "_finetune_sdk_lm_eval_hook.py" in names
    assert "build_hooks.py" not in names
    unpacked = tmp_path / "site"  # the wheel's files as pip lays them out; site.addsitedir runs its .pth as site.py does
    zipfile.ZipFile(wheel).extractall(unpacked)
    state = subprocess.run([sys.executable, "-S", "-c", "import site, sys; site.addsitedir(sys.argv[1]); "
                            "print([getattr(f, '__name__', '') for f in sys.meta_path][0], 'torch' in sys.modules)",
                            str(unpacked)], capture_output=True, text=True, timeout=60, check=True)
    assert state.stdout.split() == ["LmEvalRegistryFinder", "False"], state.stderr
