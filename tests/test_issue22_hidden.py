"""Issue 22, other inputs of the same kinds: bad input refused before a model loads in one line (kind 8), a registry
checkout holding files the version doesn't have is never served (kind 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_sdk.registry import Registry
from tests.safety_helpers import assert_refused, forbid_model_loading, invoke, write_jsonl


def fake_result(folder: Path, formatter: str = "alpaca", task: str = "causal-lm") -> Path:
    """A result folder with a manifest (enough for every refusal that comes before loading)."""
    folder.mkdir(parents=True)
    (folder / "finetune_manifest.json").write_text(json.dumps(
        {"format_version": 1, "technique": "lora", "task": task, "formatter": formatter, "options": {},
         "base_model": {"id": "nowhere", "kind": "local", "path": "nowhere"}}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 10)
    return folder


@pytest.fixture
def inputs(tmp_path):
    result = fake_result(tmp_path / "run")
    write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "a", "output": "b"}])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    (tmp_path / "torn.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "cut\n')
    return tmp_path, result


def bad_inputs(folder: Path, result: Path) -> list[tuple[list[object], str]]:
    return [
        (["eval", result, folder / "missing.jsonl"], "missing.jsonl: no such file"),
        (["eval", result, folder / "torn.jsonl"], "torn.jsonl line 2: malformed JSON"),
        (["eval", result, folder / "pairs.jsonl"], "pairs.jsonl line 1: formatter 'alpaca' needs columns"),
        (["eval", result, folder / "qa.jsonl", "--formatter", "chatml"], "formatter 'chatml' needs columns"),
        (["eval", result, folder / "qa.jsonl", "--formatter", "nosuch"], "unknown formatter 'nosuch'"),
        (["eval", result, folder / "qa.jsonl", "--compare-base", "--prompts", folder / "missing.txt"],
         "prompt file"),
        (["generate", result, "hi", "--formatter", "nosuch"], "unknown formatter 'nosuch'"),
        (["predict", result, "hi"], "predict() is for the classifier and reward-model techniques"),
    ]


def test_bad_input_to_eval_generate_predict_is_refused_before_a_model_loads(inputs, monkeypatch):
    folder, result = inputs
    forbid_model_loading(monkeypatch)
    for args, fragment in bad_inputs(folder, result):
        assert_refused(invoke(args), fragment)


def test_generate_on_a_classifier_result_is_refused_before_a_model_loads(tmp_path, monkeypatch):
    forbid_model_loading(monkeypatch)
    result = fake_result(tmp_path / "clf", formatter="classification", task="classification")
    assert_refused(invoke(["generate", result, "hi"]), "generate() is for generative techniques")


@pytest.mark.slow
def test_those_refusals_print_exactly_one_line_in_a_real_offline_process(inputs, tiny_models, tmp_path):
    """Loading a model logs 'loading base ...' lines: a refusal that comes after it is three lines, not one."""
    folder, _ = inputs
    from finetune_sdk import Trainer

    real = Trainer(tiny_models("llama"), technique="lora", formatter="alpaca", output_dir=tmp_path / "real",
                   max_steps=1, progress=False).fit(str(folder / "qa.jsonl")).output_dir
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, fragment in bad_inputs(folder, Path(real))[:3] + bad_inputs(folder, Path(real))[-2:]:
        run = subprocess.run([sys.executable, "-m", "finetune_sdk", *map(str, args)], capture_output=True,
                             text=True, env=env, timeout=120)
        lines = (run.stdout + run.stderr).splitlines()
        assert run.returncode == 2 and len(lines) == 1 and fragment in lines[0], (args, lines)


def test_a_file_planted_in_a_checkout_is_never_served(tmp_path):
    """A special_tokens_map.json (or any file) added beside a version's files would change what loads: the
    checkout is rebuilt with exactly the version's files."""
    registry = Registry(tmp_path / "registry")
    version = registry.publish(fake_result(tmp_path / "result"), "bot")
    checkout = registry.path("bot@1")
    (checkout / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<s>"}))
    (checkout / "sub").mkdir()
    (checkout / "sub" / "added_tokens.json").write_text("{}")
    served = registry.path("bot@1")
    assert sorted(p.relative_to(served).as_posix() for p in served.rglob("*")) == sorted(version.files)


def test_a_checkout_missing_a_file_is_rebuilt(tmp_path):
    registry = Registry(tmp_path / "registry")
    version = registry.publish(fake_result(tmp_path / "result"), "bot")
    (registry.path("bot@1") / "finetune_manifest.json").unlink()
    assert sorted(p.name for p in registry.path("bot@1").iterdir()) == sorted(version.files)


def test_a_planted_special_tokens_map_does_not_change_the_loaded_tokenizer(lora_run, tmp_path):
    import finetune_sdk

    registry = Registry(tmp_path / "registry")
    registry.publish(lora_run, "bot")
    checkout = registry.path("bot@1")
    (checkout / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<s>"}))
    (checkout / "added_tokens.json").write_text(json.dumps({"zzzq": 400}))
    bot = finetune_sdk.load("bot@1", registry=registry)
    assert bot.tokenizer.eos_token == "</s>" and len(bot.tokenizer) == 400


def test_a_comparison_within_float_tolerance_is_a_tie_not_better_or_worse():
    """Kind 5 in comparison reports: base and fine-tuned losses 1 float32 ulp apart (an adapter whose B is still 0,
    run through PEFT's path) get no ✓/✗ and no better/worse colour; a real change still does."""
    import numpy as np

    from finetune_sdk.evaluation.report import _change, _metrics_html, better

    base = 5.977672958374024
    noisy = float(np.nextafter(np.float32(base), np.float32(10)))
    for metric in ("eval_loss", "perplexity", "accuracy"):
        assert better(metric, base, noisy) is False and better(metric, noisy, base) is False
        text, improved = _change(metric, base, noisy)
        assert improved is None and "✓" not in text and "✗" not in text, text
    assert _change("eval_loss", 5.9777, 5.5)[1] is True and _change("accuracy", 0.5, 0.4)[1] is False
    html = _metrics_html({"eval_loss": base}, {"eval_loss": noisy})
    assert 'class="num better"' not in html and 'class="num worse"' not in html, html


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory):
    from finetune_sdk import Trainer

    folder = tmp_path_factory.mktemp("lora-run")
    write_jsonl(folder / "qa.jsonl", [{"instruction": "a", "output": "b"}] * 2)
    return Trainer(tiny_models("llama"), technique="lora", formatter="alpaca", output_dir=folder / "run",
                   max_steps=1, progress=False).fit(str(folder / "qa.jsonl")).output_dir


def test_numpys_short_write_is_a_full_disk():
    """numpy's ``ndarray.tofile`` (the GGUF writer's) reports a full disk as ``OSError("25600 requested and 13784
    written")`` with no errno: seen on a full 64 KiB tmpfs as a raw traceback and exit 1."""
    import errno

    from finetune_sdk.training.output_paths import os_error_of

    assert os_error_of(OSError("25600 requested and 13784 written")).errno == errno.ENOSPC
    assert os_error_of(OSError("something else")).errno is None


def test_a_full_disk_while_the_gguf_tensors_are_written_is_one_line(lora_run, tmp_path, monkeypatch):
    import gguf

    def short_write(self, *args, **kwargs):
        raise OSError("25600 requested and 13784 written")  # what ndarray.tofile raises on a full disk

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    line = assert_refused(invoke(["export", lora_run, "--out", tmp_path / "gguf", "-q", "f32"]),
                          f"can't write {tmp_path / 'gguf'}: No space left on device (the disk holding")
    assert "requested" not in line and not (tmp_path / "gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def sqlite_error(message: str, name: str) -> Exception:
    import sqlite3

    error = sqlite3.OperationalError(message)
    error.sqlite_errorname = name
    return error


@pytest.mark.parametrize("message, name", [("database or disk is full", "SQLITE_FULL"),
                                           ("disk I/O error", "SQLITE_IOERR_SHMSIZE")])
def test_a_full_disk_under_the_registry_index_is_not_called_damage(tmp_path, monkeypatch, message, name):
    """On a full 256 KiB tmpfs every registry command (list, tag, alias, publish) said the index 'is damaged ...;
    move it aside', advice that would throw away every version; the index was intact. A full disk is the disk-full
    line; a damaged file is still called damaged."""
    import shutil
    from collections import namedtuple

    import finetune_sdk.registry.index as index_module

    registry = Registry(tmp_path / "registry")
    registry.publish(fake_result(tmp_path / "result"), "bot")
    real_connect = index_module.Index.connect

    def failing_connect(self):
        raise sqlite_error(message, name)

    monkeypatch.setattr(index_module.Index, "connect", failing_connect)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(1 << 20, 1 << 20, 0))
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(registry.home))
    for args in (["registry", "list"], ["registry", "tag", "bot@1", "x"], ["registry", "alias", "bot@1", "prod"]):
        line = assert_refused(invoke(args), f"can't write {registry.home / 'index.db'}: No space left on device")
        assert "damaged" not in line and "move it aside" not in line
    monkeypatch.setattr(index_module.Index, "connect", real_connect)
    assert [v.version for v in Registry(registry.home).versions("bot")] == [1]


def test_an_error_inside_an_index_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    registry = Registry(tmp_path / "registry")
    registry.publish(fake_result(tmp_path / "result"), "bot")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(1 << 20, 1 << 20, 0))

    class FullDisk:
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite_error("database or disk is full", "SQLITE_FULL")
            return self.db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.db, name)

    import finetune_sdk.registry.index as index_module

    real_connect = index_module.Index.connect
    monkeypatch.setattr(index_module.Index, "connect", lambda self: FullDisk(real_connect(self)))
    from finetune_sdk.errors import FinetuneError

    with pytest.raises(FinetuneError, match="No space left on device"):
        registry.tag("bot@1", "x")


def test_a_damaged_index_is_still_called_damaged(tmp_path):
    from finetune_sdk.errors import RegistryError

    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "index.db").write_bytes(b"not a database" * 100)
    with pytest.raises(RegistryError, match="is damaged"):
        Registry(tmp_path / "registry").list()


def test_a_first_publish_racing_another_processes_first_publish_creates_the_schema(tmp_path):
    """Four processes publishing into a fresh registry home: one saw index.db already created by another (its
    connection had made the empty file) and wrote before the tables existed: ``sqlite3.OperationalError: no such
    table: adapters``, a traceback, exit 1 (1 run in 3 of the churn test here)."""
    home = tmp_path / "registry"
    registry = Registry(home)  # reads never create: no index.db yet
    home.mkdir()
    (home / "index.db").touch()  # what another process's first connect leaves before its schema is written
    assert registry.publish(fake_result(tmp_path / "result"), "bot").version == 1
    assert [v.version for v in Registry(home).versions("bot")] == [1]
