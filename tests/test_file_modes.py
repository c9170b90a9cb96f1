"""Every file of a result is shareable (issue 22, kind 7): files and folders the SDK writes get the permissions of a
plain ``open``/``mkdir`` under the process's umask (0644/0755 under 022, 0600/0700 under 077), whatever wrote them:
safetensors 0.8 writes 0600 files (PEFT's and transformers' ``save_pretrained`` through it), ``tempfile`` 0600/0700.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

UMASKS = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
QA = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."} for a in range(3)
      for b in range(3)]
PAIRS = [{"prompt": f"say {w}", "chosen": f"{w}.", "rejected": "no."} for w in ("red", "blue", "green", "cat")]
LABELLED = [{"text": "red", "label": "colour"}, {"text": "cat", "label": "animal"}] * 4


def modes_under(root: Path) -> dict[str, int]:
    """Relative path -> permission bits of ``root`` and everything under it (links are not followed)."""
    root = Path(root)
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_modes(root: Path, file_mode: int, folder_mode: int) -> int:
    """Every folder under ``root`` has ``folder_mode``, every file ``file_mode``; returns how many were checked."""
    wrong = {}
    for rel, mode in modes_under(root).items():
        path = Path(root) / rel
        want = folder_mode if path.is_dir() else file_mode
        if mode != want:
            wrong[rel] = oct(mode)
    assert not wrong, f"{root}: expected files {oct(file_mode)}, folders {oct(folder_mode)}; wrong: {wrong}"
    return len(modes_under(root))


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(previous)


def train(base: Path, out: Path, technique: str, rows, **options):
    from finetune_sdk import Trainer

    formatter = {"classifier": None, "reward-model": "preference"}.get(technique, "chatml")
    return Trainer(base, technique=technique, formatter=formatter, output_dir=out, max_steps=1, progress=False,
                   **options).fit(rows)


@pytest.mark.parametrize("mask,file_mode,folder_mode", UMASKS, ids=["umask-022", "umask-077"])
def test_lora_result_checkpoints_merge_registry_ratings_and_report_honour_the_umask(
        tiny_models, tmp_path, monkeypatch, umask, mask, file_mode, folder_mode):
    import finetune_sdk
    import finetune_sdk.training.checkpoints as checkpoints
    from finetune_sdk.feedback.session import collect_feedback
    from finetune_sdk.registry import Registry
    from finetune_sdk.evaluation.report import write_report

    base = tiny_models("llama")
    monkeypatch.setattr(checkpoints, "remove_checkpoints", lambda folder: None)  # keep them to look at
    umask(mask)
    result = train(base, tmp_path / "lora", "lora", QA, save_steps=1)
    merged = finetune_sdk.merge(result.output_dir, tmp_path / "merged")
    registry = Registry(tmp_path / "registry")
    version = registry.publish(result.output_dir, "bot")
    checkout = registry.path(version.ref)
    (tmp_path / "ratings").mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n")
    collect_feedback(str(base), prompts, tmp_path / "ratings" / "thumbs.jsonl", formatter="chatml", max_new_tokens=2,
                     ask=lambda prompt, answers: True)
    collect_feedback(str(base), prompts, tmp_path / "ratings" / "pairs.jsonl", mode="pairwise", formatter="chatml",
                     max_new_tokens=2, ask=lambda prompt, answers: 1)
    report = write_report(tmp_path / "report", {"base": {"eval_loss": 2.0}, "tuned": {"eval_loss": 1.0}})
    os.umask(0o022)

    assert modes_under(result.output_dir)["adapter_model.safetensors"] == file_mode  # the file
    assert assert_modes(result.output_dir, file_mode, folder_mode) >= 6
    checkpoints = Path(str(result.output_dir) + ".checkpoints")
    assert (checkpoints / "checkpoint-1" / "trainable.safetensors").is_file()
    assert_modes(checkpoints / "checkpoint-1", file_mode, folder_mode)
    assert (merged / "model.safetensors").is_file()
    assert_modes(merged, file_mode, folder_mode)
    assert_modes(checkout, file_mode, folder_mode)
    assert_modes(registry.home / "blobs", file_mode, folder_mode)
    assert stat.S_IMODE((registry.home / "index.db").stat().st_mode) == file_mode
    for ratings in ("thumbs.jsonl", "pairs.jsonl"):
        assert json.loads((tmp_path / "ratings" / ratings).read_text().splitlines()[0])["prompt"] == "hi"
        assert stat.S_IMODE((tmp_path / "ratings" / ratings).stat().st_mode) == file_mode
    assert assert_modes(report["json"].parent, file_mode, folder_mode) == 3


@pytest.mark.slow
@pytest.mark.parametrize("mask,file_mode,folder_mode", UMASKS, ids=["umask-022", "umask-077"])
def test_every_technique_result_and_the_export_honour_the_umask(tiny_models, tmp_path, umask, mask, file_mode,
                                                                folder_mode):
    import finetune_sdk

    base = tiny_models("llama")
    umask(mask)
    results = {technique: train(base, tmp_path / technique, technique, rows).output_dir
               for technique, rows in (("lora", QA), ("qlora", QA), ("full", QA), ("classifier", LABELLED),
                                       ("reward-model", PAIRS))}
    export = finetune_sdk.export(results["lora"], tmp_path / "gguf", quantization="f16")
    merged_full = finetune_sdk.export(results["full"], tmp_path / "gguf-full", quantization="q8_0")
    os.umask(0o022)
    for technique, folder in results.items():
        weights = sorted(p.name for p in folder.glob("*.safetensors"))
        assert weights, technique
        assert_modes(folder, file_mode, folder_mode)
    assert export.gguf_path.is_file()
    assert_modes(export.directory, file_mode, folder_mode)
    assert_modes(merged_full.directory, file_mode, folder_mode)


def test_shareable_tree_keeps_execute_bits_and_leaves_links_alone(tmp_path, umask):
    from finetune_sdk.fsutil import shareable_tree

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "w.safetensors").write_bytes(b"x")
    (tmp_path / "a" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "a" / "b" / "w.safetensors", 0o600)
    os.chmod(tmp_path / "a" / "run.sh", 0o700)
    os.chmod(tmp_path / "a" / "b", 0o700)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    (tmp_path / "a" / "link").symlink_to(outside)
    umask(0o022)
    shareable_tree(tmp_path / "a")
    assert modes_under(tmp_path / "a") == {".": 0o755, "b": 0o755, "b/w.safetensors": 0o644, "link": 0o777,
                                           "run.sh": 0o755}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # a link's target is never changed
