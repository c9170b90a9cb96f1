"""Issue 11, kind 7: plugins run as pluggy promises (order markers, wrappers), strict mode is one line, manifests
record every plugin's distribution."""

from __future__ import annotations

import types
import warnings

import pytest
from click.testing import CliRunner

from finetune_sdk import hookimpl
from finetune_sdk import plugin_manager as pm_module
from finetune_sdk.plugin_manager import PluginWarning


class FakeEntryPoint:
    def __init__(self, name, module, dist="finetune-sdk-fake"):
        self.name, self._module, self.dist = name, module, types.SimpleNamespace(name=dist)

    def load(self):
        if isinstance(self._module, Exception):
            raise self._module
        return self._module


def observer(name, calls, **marks):
    module = types.ModuleType(name)

    def on_train_end(context, metrics):
        calls.append(name)

    module.on_train_end = hookimpl(**marks)(on_train_end)
    return module


def test_observers_run_in_pluggys_order_tryfirst_first_trylast_last(install):
    calls: list[str] = []
    host = install(FakeEntryPoint("first", observer("first", calls, tryfirst=True)),
                   FakeEntryPoint("plain-a", observer("plain-a", calls)),
                   FakeEntryPoint("last", observer("last", calls, trylast=True)),
                   FakeEntryPoint("plain-b", observer("plain-b", calls)))
    host.notify("on_train_end", context=None, metrics={})
    assert calls == ["first", "plain-b", "plain-a", "last"]  # pluggy: markers, then last registered first
    calls.clear()
    host.pm.hook.on_train_end(context=None, metrics={})
    assert calls == ["first", "plain-b", "plain-a", "last"]  # exactly what pluggy itself does


def test_hook_wrappers_run_around_the_observers(install):
    calls: list[str] = []
    new_style, old_style = types.ModuleType("wrap-new"), types.ModuleType("wrap-old")

    def wrap_new(context, metrics):
        calls.append("new:before")
        result = yield
        calls.append("new:after")
        return result

    def wrap_old(context, metrics):
        calls.append("old:before")
        yield
        calls.append("old:after")

    new_style.on_train_end = hookimpl(wrapper=True)(wrap_new)
    old_style.on_train_end = hookimpl(hookwrapper=True)(wrap_old)
    host = install(FakeEntryPoint("obs", observer("obs", calls)), FakeEntryPoint("wrap-new", new_style),
                   FakeEntryPoint("wrap-old", old_style))
    host.notify("on_train_end", context=None, metrics={"train_loss": 1.0})
    assert calls == ["old:before", "new:before", "obs", "new:after", "old:after"]


def test_a_failing_observer_is_reported_and_the_others_still_run_in_order(install):
    calls: list[str] = []
    bad = types.ModuleType("bad")

    def explode(context, metrics):
        calls.append("bad")
        raise ValueError("observer bug")

    bad.on_train_end = hookimpl(tryfirst=True)(explode)
    host = install(FakeEntryPoint("plain", observer("plain", calls)), FakeEntryPoint("bad", bad, "finetune-sdk-bad"))
    with pytest.warns(PluginWarning, match="plugin 'bad' from finetune-sdk-bad .*on_train_end raised ValueError"):
        host.notify("on_train_end", context=None, metrics={})
    assert calls == ["bad", "plain"]


def test_strict_mode_finetune_plugins_prints_one_line_naming_the_plugin_and_exits_2(install, monkeypatch):
    import importlib

    cli_main = importlib.import_module("finetune_sdk.cli.main")

    monkeypatch.setenv("FINETUNE_SDK_STRICT_PLUGINS", "1")
    monkeypatch.setenv("FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.setattr(pm_module, "discover_entry_points",
                        lambda: [FakeEntryPoint("broken", ImportError("no module named torchx"),
                                                "finetune-sdk-broken")])
    pm_module.reset_plugins()
    cli_main._add_plugin_commands()  # what importing the CLI does: must not raise a traceback
    result = CliRunner().invoke(cli_main.cli, ["plugins"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "plugin 'broken' from finetune-sdk-broken" in lines[0]
    assert "ImportError: no module named torchx" in lines[0]


def test_strict_mode_a_failing_observer_is_an_error(install, monkeypatch):
    from finetune_sdk.errors import PluginError

    monkeypatch.setenv("FINETUNE_SDK_STRICT_PLUGINS", "1")
    bad = types.ModuleType("bad")
    bad.on_train_end = hookimpl(lambda context, metrics: 1 / 0)
    host = install(FakeEntryPoint("bad", bad, "finetune-sdk-bad"))
    with pytest.raises(PluginError, match="plugin 'bad' from finetune-sdk-bad .*ZeroDivisionError"):
        host.notify("on_train_end", context=None, metrics={})


def test_the_manifest_records_each_plugins_distribution_and_version(install, llama_dir, tmp_path, qa_rows):
    from importlib import metadata

    from finetune_sdk import Trainer
    from tests.test_plugins import NormTune, QAFormatter

    module = types.ModuleType("norm")
    module.register_techniques = hookimpl(lambda register: register(NormTune))
    module.register_formatters = hookimpl(lambda register: register(QAFormatter))
    install(FakeEntryPoint("norm", module, "finetune-sdk-norm"))
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in qa_rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Trainer(llama_dir, technique="normtune", formatter="qa", output_dir=tmp_path / "o", max_steps=1,
                         progress=False).fit(rows)
    records = {r["kind"]: r for r in result.manifest["plugins"]}
    assert records["technique"] == {"kind": "technique", "name": "normtune", "plugin": "norm",
                                    "distribution": "finetune-sdk-norm", "version": "unknown"}
    assert records["formatter"]["distribution"] == "finetune-sdk-norm" and records["formatter"]["name"] == "qa"
    lora = Trainer(llama_dir, technique="qlora", formatter="chatml", output_dir=tmp_path / "q", max_steps=1,
                   progress=False).fit(qa_rows).manifest["plugins"]
    assert [(r["kind"], r["name"]) for r in lora] == [("technique", "qlora"), ("quantizer", "nf4"),
                                                     ("formatter", "chatml")]
    assert all(r["distribution"] == "finetune-sdk" and r["version"] == metadata.version("finetune-sdk")
               for r in lora)
