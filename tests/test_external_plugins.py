"""The example plugin distributions in examples/plugins, pip-installed and found through their entry points.

``finetune-sdk-dora`` (technique ``dora``, a loss CSV observer, ``finetune dora-info``),
``finetune-sdk-sharegpt`` (formatter ``sharegpt``), ``finetune-sdk-ipo`` (objective ``ipo``, passing the SDK's
``ObjectiveContract`` unchanged) and ``finetune-sdk-earlystop`` (an observer that stops training) are installed with pip into a temporary folder, which is put on
``sys.path`` (and ``PYTHONPATH`` for subprocesses), exactly as a user's ``pip install`` would make them visible.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

# Imported now, while the suite's autoload switch is off, so the process-wide CLI group never gets the plugins'
# commands added to it by these tests (plugin commands are added once, when finetune_sdk.cli.main is imported).
from finetune_sdk.cli.main import cli
from finetune_sdk.plugin_manager import get_plugin_host, reset_plugins

EXAMPLES = Path(__file__).parents[1] / "examples" / "plugins"
DISTRIBUTIONS = {"dora": "finetune-sdk-dora", "sharegpt": "finetune-sdk-sharegpt", "ipo": "finetune-sdk-ipo",
                 "earlystop": "finetune-sdk-earlystop"}
MODULES = ("finetune_sdk_dora", "finetune_sdk_sharegpt", "finetune_sdk_ipo", "finetune_sdk_earlystop")
VERSION = "0.1.0"
ONLY_THESE = ",".join(DISTRIBUTIONS)  # other finetune_sdk entry points in the environment stay out of the way

ROWS = [{"conversations": [{"from": "system", "value": "answer in one sentence."},
                           {"from": "human", "value": f"what is {w}?"},
                           {"from": "gpt", "value": f"{w} is a {c}."}]}
        for w, c in [("red", "colour"), ("cat", "animal"), ("blue", "colour"), ("dog", "animal"),
                     ("fish", "animal"), ("green", "colour"), ("bird", "animal"), ("yellow", "colour")]]
ROWS[0]["conversations"] += [{"from": "user", "value": "and green?"}, {"from": "assistant", "value": "a colour."}]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Both distributions pip-installed (from copies, so builds leave nothing in the repo) into a target folder."""
    root = tmp_path_factory.mktemp("external-plugins")
    sources = []
    for dist in DISTRIBUTIONS.values():
        shutil.copytree(EXAMPLES / dist, root / "src" / dist,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
        sources.append(str(root / "src" / dist))
    target = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
         "--no-index", "--no-deps", "--no-build-isolation", "--target", str(target), *sources],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    for dist in DISTRIBUTIONS.values():
        assert (target / f"{dist.replace('-', '_')}-{VERSION}.dist-info" / "entry_points.txt").is_file()
    return {"target": target, "src": root / "src"}


@pytest.fixture(scope="module")
def plugin_suites(installed):
    """Each plugin's own tests, run by pytest in a subprocess against the installed distributions.

    They start as soon as the plugins are installed and run while the other tests of this module do (the
    last test collects them), which keeps this module's wall time down.
    """
    env = subprocess_env(installed)
    # run from outside the source folders, so the tests import the installed modules, not the sources
    runs = {dist: subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    str(installed["src"] / dist / "tests")],
                                   cwd=installed["src"].parent, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            for dist in DISTRIBUTIONS.values()}
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.communicate()


@pytest.fixture
def plugins_on(installed, plugin_suites, monkeypatch):
    """The installed plugins visible to this process, with entry-point autoloading on."""
    monkeypatch.syspath_prepend(str(installed["target"]))
    importlib.invalidate_caches()  # importlib.metadata caches directory listings
    monkeypatch.setenv("FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.setenv("FINETUNE_SDK_PLUGINS", ONLY_THESE)
    monkeypatch.delenv("FINETUNE_SDK_LOSS_CSV", raising=False)
    reset_plugins()
    yield installed
    reset_plugins()
    for name in list(sys.modules):
        if name.split(".")[0] in MODULES:
            del sys.modules[name]
    importlib.invalidate_caches()


def subprocess_env(installed, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FINETUNE_SDK_LOSS_CSV", None)
    env.update(PYTHONPATH=os.pathsep.join([str(installed["target"]), *filter(None, [env.get("PYTHONPATH")])]),
               FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD="0", FINETUNE_SDK_PLUGINS=ONLY_THESE, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def test_finetune_plugins_lists_them_with_distribution_and_version(plugins_on):
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    by_plugin = {p["name"]: p for p in report["plugins"]}
    for entry_point, dist in DISTRIBUTIONS.items():
        info = by_plugin[entry_point]
        assert (info["distribution"], info["version"], info["builtin"], info["error"]) == (dist, VERSION, False, None)
    assert set(by_plugin["dora"]["hooks"]) == {"register_techniques", "on_log", "register_commands"}
    assert by_plugin["sharegpt"]["hooks"] == ["register_formatters"]
    dora = next(t for t in report["techniques"] if t["name"] == "dora")
    assert (dora["plugin"], dora["distribution"], dora["version"]) == ("dora", "finetune-sdk-dora", VERSION)
    assert "DoRA" in dora["description"]
    sharegpt = next(f for f in report["formatters"] if f["name"] == "sharegpt")
    assert (sharegpt["plugin"], sharegpt["distribution"], sharegpt["version"]) == \
        ("sharegpt", "finetune-sdk-sharegpt", VERSION)
    assert "lora" in {t["name"] for t in report["techniques"]}  # the builtins are still there
    ipo = next(o for o in report["objectives"] if o["name"] == "ipo")
    assert (ipo["distribution"], ipo["options"]) == ("finetune-sdk-ipo", ["beta"])
    assert by_plugin["ipo"]["hooks"] == ["register_objectives"] and by_plugin["earlystop"]["hooks"] == ["on_evaluate"]


def test_trainer_fits_sharegpt_rows_with_dora_and_the_csv_observer_logs(plugins_on, tiny_models, tmp_path,
                                                                          monkeypatch):
    from finetune_sdk import Trainer
    from finetune_sdk.trainer import detect_formatter

    loss_csv = tmp_path / "loss.csv"
    monkeypatch.setenv("FINETUNE_SDK_LOSS_CSV", str(loss_csv))
    trainer = Trainer(tiny_models("llama"), technique="dora", formatter="sharegpt", output_dir=tmp_path / "out",
                      num_train_epochs=3, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1,
                      seed=0, progress=False)
    before = trainer.evaluate(ROWS)["eval_loss"]
    result = trainer.fit(ROWS)
    after = trainer.evaluate(ROWS)["eval_loss"]
    assert after < before, f"loss did not fall: {before:.4f} -> {after:.4f}"
    assert (result.manifest["technique"], result.manifest["formatter"]) == ("dora", "sharegpt")
    assert json.loads((result.output_dir / "adapter_config.json").read_text())["use_dora"] is True
    assert isinstance(trainer.generate("what is red?", max_new_tokens=4), str)

    with loss_csv.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "epoch"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, result.metrics["train_steps"] + 1))
    assert all(float(r[1]) > 0 for r in rows[1:]) and float(rows[-1][2]) == pytest.approx(3.0)

    host = get_plugin_host()  # a `conversations` column is enough to pick the plugin's formatter
    assert detect_formatter(["conversations"], trainer.current_model().tokenizer, "causal-lm", host) == "sharegpt"


def test_cli_trains_with_plugin_technique_and_formatter_and_runs_plugin_command(installed, tiny_models, tmp_path):
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "out"
    env = subprocess_env(installed, FINETUNE_SDK_LOSS_CSV=str(tmp_path / "loss.csv"))
    train = subprocess.Popen(
        [sys.executable, "-m", "finetune_sdk", "train", "--model", str(tiny_models("llama")), "--data", str(data),
         "--technique", "dora", "--formatter", "sharegpt", "--output-dir", str(out), "--max-steps", "2",
         "--logging-steps", "1", "--r", "4", "--per-device-train-batch-size", "4"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    info = subprocess.run([sys.executable, "-m", "finetune_sdk", "dora-info"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stdout + info.stderr
    assert info.stdout.startswith("dora: DoRA") and "--lora-alpha" in info.stdout and " 16 " in info.stdout
    output, _ = train.communicate(timeout=180)
    assert train.returncode == 0, output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    manifest = json.loads((out / "finetune_manifest.json").read_text())
    assert (manifest["technique"], manifest["formatter"]) == ("dora", "sharegpt")
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 3  # header + 2 steps


def test_each_plugins_own_test_suite_passes(plugin_suites):
    for dist, run in plugin_suites.items():
        output, _ = run.communicate(timeout=240)
        assert run.returncode == 0, f"{dist}:\n{output}"
        assert " passed" in output and "skipped" not in output, output
