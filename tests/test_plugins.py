"""Every hook, third-party plugins from entry points, and fault isolation."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from finetune_sdk import hookimpl, hookspecs
from finetune_sdk import plugin_manager as pm_module
from finetune_sdk.errors import ConfigError, PluginError
from finetune_sdk.formatter import Formatter, Segment
from finetune_sdk.plugin_manager import PluginHost, PluginWarning
from finetune_sdk.plugins.quantizers.bnb import Int8Quantizer
from finetune_sdk.technique import Technique

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith(("register_", "on_")))
EXERCISED = {"register_techniques", "register_quantizers", "register_formatters", "register_commands",
             "on_train_begin", "on_log", "on_evaluate", "on_save", "on_train_end",
             "register_federated_strategies",  # exercised in test_federated.py
             "register_reward_functions",  # exercised in test_grpo.py
             "register_objectives",  # exercised in test_objectives.py and the finetune-sdk-ipo example
             "register_exporters"}  # exercised in test_exporters.py


class NormTune(Technique):
    """Trains only the normalisation weights."""

    name = "normtune"
    description = "train the RMSNorm/LayerNorm weights only"
    result_is_model = True
    default_learning_rate = 1e-2

    def prepare(self, model, options, tokenizer):
        for pname, param in model.named_parameters():
            param.requires_grad_("norm" in pname)
        return model

    def load(self, base_model, directory, options):
        return base_model


class QAFormatter(Formatter):
    name = "qa"
    description = "question/answer pairs"
    column_sets = (("question", "answer"),)
    example = {"question": "hi?", "answer": "yo"}

    def segments(self, row, tokenizer, options):
        return [Segment(f"Q: {row['question']}\nA:"), Segment(f" {row['answer']}{tokenizer.eos_token}", train=True)]

    def prompt_segments(self, prompt, tokenizer, options):
        return [Segment(f"Q: {prompt}\nA:")]


class Int8Again(Int8Quantizer):
    name = "int8-again"
    description = "int8 under another name"


def plugin_module(name, **hooks):
    module = types.ModuleType(name)
    for hook_name, func in hooks.items():
        setattr(module, hook_name, hookimpl(func))
    return module


class FakeEntryPoint:
    def __init__(self, name, load, dist="finetune-sdk-fake"):
        self.name = name
        self._load = load
        self.dist = types.SimpleNamespace(name=dist)

    def load(self):
        return self._load()


def test_every_hookspec_is_documented_and_tested():
    docs = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    for hook in HOOKS:
        assert f"`{hook}" in docs, f"hook {hook} is not documented in docs/plugins.md"
        assert getattr(hookspecs, hook).__doc__, hook
    assert set(HOOKS) == EXERCISED


def test_register_hooks_add_a_technique_a_formatter_and_a_quantizer(install, llama_dir, tmp_path):
    from finetune_sdk import Trainer

    module = plugin_module(
        "finetune_sdk_extras",
        register_techniques=lambda register: register(NormTune),
        register_formatters=lambda register: register(QAFormatter),
        register_quantizers=lambda register: register(Int8Again),
    )
    host = install(FakeEntryPoint("extras", lambda: module, "finetune-sdk-extras"))
    assert "normtune" in host.names("technique") and "qa" in host.names("formatter")
    rows = [{"question": f"what is {i}?", "answer": f"{i}"} for i in range(8)]
    trainer = Trainer(llama_dir, technique="normtune", output_dir=tmp_path / "out", num_train_epochs=3,
                      progress=False)
    before = trainer.evaluate(rows)["eval_loss"]
    result = trainer.fit(rows)
    assert result.manifest["formatter"] == "qa"  # picked from the columns among plugin formatters
    assert trainer.evaluate(rows)["eval_loss"] < before
    lora_int8 = Trainer(llama_dir, technique="lora", quantizer="int8-again", output_dir=tmp_path / "q",
                        num_train_epochs=1, progress=False).fit(rows)
    assert lora_int8.manifest["quantizer"] == "int8-again"
    info = next(p for p in host.plugins if p.name == "extras")
    assert info.distribution == "finetune-sdk-extras" and not info.error
    assert {"register_techniques", "register_formatters", "register_quantizers"} <= set(info.hooks)


def test_observer_hooks_see_training(install, llama_dir, tmp_path, qa_rows):
    from finetune_sdk import Trainer

    calls = []
    module = plugin_module(
        "observer",
        on_train_begin=lambda context: calls.append(("begin", context.technique, context.max_steps)),
        on_log=lambda context, logs: calls.append(("log", context.step, logs.get("loss"))),
        on_evaluate=lambda context, metrics: calls.append(("evaluate", metrics.get("eval_loss"))),
        on_save=lambda context, checkpoint_dir: calls.append(("save", checkpoint_dir)),
        on_train_end=lambda context, metrics: calls.append(("end", metrics["train_loss"])),
    )
    install(FakeEntryPoint("observer", lambda: module))
    Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", num_train_epochs=2, logging_steps=2,
            save_steps=4, progress=False).fit(qa_rows, eval_data=qa_rows[:4])
    kinds = [c[0] for c in calls]
    assert kinds[0] == "begin" and calls[0][1] == "lora" and calls[0][2] == 8
    assert kinds[-1] == "end" and isinstance(calls[-1][1], float)
    assert any(c[0] == "log" and c[2] is not None for c in calls)
    assert kinds.count("evaluate") == 2  # once per epoch
    assert [c[1].rsplit("-", 1)[-1] for c in calls if c[0] == "save"] == ["4", "8"]


def test_register_commands_adds_cli_commands(install):
    @click.command("hello")
    def hello():
        click.echo("hello from a plugin")

    install(FakeEntryPoint("cmds", lambda: plugin_module("cmds", register_commands=lambda cli: cli.add_command(hello))))
    group = click.Group("finetune")
    pm_module.get_plugin_host().add_commands(group)
    result = CliRunner().invoke(group, ["hello"])
    assert result.output == "hello from a plugin\n"


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_works(install):
    def broken():
        raise ImportError("No module named 'missing_dependency'")

    with pytest.warns(PluginWarning, match=r"plugin 'broken' from finetune-sdk-broken .*ImportError.*missing_dep"):
        host = install(FakeEntryPoint("broken", broken, "finetune-sdk-broken"))
    assert "lora" in host.names("technique")
    assert next(p for p in host.plugins if p.name == "broken").error


def test_a_plugin_whose_hook_raises_is_reported(install):
    def explode(register):
        raise RuntimeError("boom")

    with pytest.warns(PluginWarning, match="plugin 'exploding' .*register_techniques raised RuntimeError: boom"):
        host = install(FakeEntryPoint("exploding", lambda: plugin_module("x", register_techniques=explode)))
    assert "lora" in host.names("technique")


def test_an_unknown_hook_is_caught(install):
    module = types.ModuleType("typo")
    module.register_technique = hookimpl(lambda register: None)  # misspelled: no such hook
    with pytest.warns(PluginWarning, match="plugin 'typo' .*register_technique"):
        host = install(FakeEntryPoint("typo", lambda: module))
    assert next(p for p in host.plugins if p.name == "typo").error


def test_unsupported_plugin_api_version_is_reported(install):
    module = plugin_module("future", register_techniques=lambda register: register(NormTune))
    module.FINETUNE_SDK_PLUGIN_API = (2, 3)
    with pytest.warns(PluginWarning, match="supports plugin API 2..3"):
        host = install(FakeEntryPoint("future", lambda: module))
    assert "normtune" not in host.names("technique")


def test_strict_mode_turns_plugin_failures_into_errors(install, monkeypatch):
    monkeypatch.setenv("FINETUNE_SDK_STRICT_PLUGINS", "1")

    def broken():
        raise ImportError("nope")

    with pytest.raises(PluginError, match="plugin 'broken'"):
        install(FakeEntryPoint("broken", broken))


def test_a_name_registered_twice_is_an_error_naming_both(install):
    a = plugin_module("a", register_techniques=lambda register: register(NormTune))
    b = plugin_module("b", register_techniques=lambda register: register(NormTune))
    with pytest.warns(PluginWarning, match=r"plugin 'b' from finetune-sdk-b .*registers technique 'normtune', "
                                           r"already registered by plugin 'a' \(finetune-sdk-a"):
        host = install(FakeEntryPoint("a", lambda: a, "finetune-sdk-a"),
                       FakeEntryPoint("b", lambda: b, "finetune-sdk-b"))
    assert next(p for p in host.plugins if p.name == "b").error
    with pytest.raises(ConfigError, match=r"technique 'normtune' is registered by both plugin 'a' "
                                          r"\(finetune-sdk-a .*\) and plugin 'b' \(finetune-sdk-b"):
        host.create("technique", "normtune")


def test_a_plugin_cannot_silently_replace_a_builtin(install):
    class FakeLora(NormTune):
        name = "lora"

    with pytest.warns(PluginWarning, match="plugin 'evil' .*registers technique 'lora', already registered"):
        host = install(FakeEntryPoint("evil", lambda: plugin_module(
            "evil", register_techniques=lambda register: register(FakeLora))))
    assert "lora" in host.names("technique") and "qlora" in host.names("technique")
    with pytest.raises(ConfigError, match="technique 'lora' is registered by both plugin 'finetune_sdk.plugins"):
        host.create("technique", "lora")


def test_an_observer_that_raises_does_not_stop_training(install, llama_dir, tmp_path, qa_rows):
    from finetune_sdk import Trainer

    def bad_log(context, logs):
        raise ValueError("observer bug")

    install(FakeEntryPoint("badlog", lambda: plugin_module("badlog", on_log=bad_log)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", max_steps=2, logging_steps=1,
                         progress=False).fit(qa_rows)
    assert result.output_dir.is_dir()
    assert any("on_log raised ValueError: observer bug" in str(w.message) for w in caught)


def test_autoload_switches(monkeypatch):
    module = plugin_module("only", register_techniques=lambda register: register(NormTune))
    eps = [FakeEntryPoint("only", lambda: module), FakeEntryPoint("other", lambda: 1 / 0)]
    monkeypatch.setattr(pm_module, "discover_entry_points", lambda: eps)
    monkeypatch.setenv("FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.setenv("FINETUNE_SDK_PLUGINS", "only")
    assert "normtune" in PluginHost().names("technique")  # 'other' (which would fail) was not loaded
    monkeypatch.setenv("FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "normtune" not in PluginHost().names("technique")


def test_tracing_prints_each_hook_call_with_its_implementations(monkeypatch, capsys):
    monkeypatch.setenv("FINETUNE_SDK_TRACE_HOOKS", "1")
    host = PluginHost(autoload=False)
    host.notify("on_train_end", context=None, metrics={})
    err = capsys.readouterr().err
    assert "finetune_sdk: hook register_techniques -> finetune_sdk.plugins.techniques" in err
    assert "finetune_sdk: hook on_train_end -> no implementations" in err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["technique", "quantizer", "formatter"])
def test_scaffolded_plugin_installs_and_passes_its_own_tests(kind, tmp_path):
    import os
    import subprocess
    import sys

    from finetune_sdk.cli import cli

    result = CliRunner().invoke(cli, ["plugins", "init", f"my-{kind}", "--kind", kind, "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    root = tmp_path / f"finetune-sdk-my-{kind}"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(root)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD": "0",
           "HF_HUB_OFFLINE": "1"}
    listed = subprocess.run([sys.executable, "-m", "finetune_sdk", "plugins", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)
    report = json.loads(listed.stdout)
    entry = next(r for r in report[kind + "s"] if r["name"] == f"my-{kind}")
    assert entry["distribution"] == f"finetune-sdk-my-{kind}" and entry["version"] == "0.1.0"
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                           env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "passed" in tests.stdout
    again = CliRunner().invoke(cli, ["plugins", "init", f"my-{kind}", "--kind", kind, "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output
