"""Output paths never destroy anything that is not an earlier result of this SDK (issue 10, item 1)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from finetune_sdk import Trainer
from finetune_sdk.training.checkpoints import latest_checkpoint
from finetune_sdk.errors import ConfigError, FinetuneError
from tests.safety_helpers import (
    assert_refused,
    forbid_model_loading,
    invoke,
    scratch_left,
    snapshot,
    write_jsonl,
)


@pytest.fixture
def data(tmp_path, qa_rows):
    return write_jsonl(tmp_path / "train.jsonl", qa_rows)


@pytest.fixture
def base(tmp_path, llama_dir):
    """A private copy of the tiny model: a test that failed to protect it must not break the others."""
    return Path(shutil.copytree(llama_dir, tmp_path / "mymodel"))


def train_args(base, data, out, *extra):
    return ["train", "--model", base, "--data", data, "--formatter", "chatml", "-o", out, "--max-steps", "1",
            *extra]


def test_a_users_folder_is_refused_and_left_byte_equal(base, data, tmp_path, monkeypatch):
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "important.txt").write_text("my notes")
    (docs / "sub").mkdir()
    (docs / "sub" / "more.md").write_text("more")
    before = snapshot(docs)
    forbid_model_loading(monkeypatch)
    result = invoke(train_args(base, data, docs))
    assert_refused(result, f"output_dir {docs} is an existing folder that is not a finetune-sdk result",
                   "important.txt", "nothing was written")
    assert snapshot(docs) == before
    assert scratch_left(tmp_path) == []
    with pytest.raises(ConfigError, match="is an existing folder that is not a finetune-sdk result"):
        Trainer(base, output_dir=docs)  # the Python API refuses it at construction


def test_an_existing_file_is_refused(base, data, tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    forbid_model_loading(monkeypatch)
    assert_refused(invoke(train_args(base, data, notes)), f"output_dir {notes} is an existing file")
    assert notes.read_text() == "keep"
    link = tmp_path / "link"
    link.symlink_to(base, target_is_directory=True)  # a link to the base model: replacing it must not follow
    assert_refused(invoke(train_args(base, data, link)), f"output_dir {link}")
    assert link.is_symlink() and (base / "config.json").is_file()


@pytest.mark.parametrize("where,relation", [("base", "is the base model"), ("base/out", "is inside the base model"),
                                            ("parent", "contains the base model")])
def test_the_output_can_never_touch_the_base_model(base, data, tmp_path, monkeypatch, where, relation):
    out = {"base": base, "base/out": base / "out", "parent": tmp_path}[where]
    before = snapshot(base)
    forbid_model_loading(monkeypatch)
    assert_refused(invoke(train_args(base, data, out)), f"output_dir {out} {relation} {base}")
    assert snapshot(base) == before and not (base / "out").exists()


def test_the_output_can_never_be_or_hold_the_data_file(base, data, tmp_path, monkeypatch):
    before = data.read_bytes()
    forbid_model_loading(monkeypatch)
    assert_refused(invoke(train_args(base, data, data)), f"output_dir {data} is an existing file")
    earlier = tmp_path / "runs"  # an earlier result (replaceable) in which the user keeps the data
    earlier.mkdir()
    (earlier / "finetune_manifest.json").write_text('{"format_version": 1, "technique": "lora", "options": {}}')
    nested = Path(shutil.copy(data, earlier / "train.jsonl"))
    assert_refused(invoke(train_args(base, nested, earlier)), f"output_dir {earlier} contains the data file {nested}")
    assert data.read_bytes() == before and nested.read_bytes() == before


def test_current_folder_file_parent_and_unwritable_parent(base, data, tmp_path, monkeypatch):
    forbid_model_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert_refused(invoke(train_args(base, data, ".")), "output_dir . is the current folder")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_refused(invoke(train_args(base, data, afile / "out")), f"{afile} is a file, not a folder")
    # /sys refuses new folders even to root (os.access would say yes): a real probe catches it
    assert_refused(invoke(train_args(base, data, "/sys/finetune-sdk-test/out")), "can't create folders in /sys")
    assert afile.read_text() == "x" and scratch_left(tmp_path) == []


def test_an_earlier_result_is_replaced_with_a_log_line(base, data, tmp_path, caplog):
    out = tmp_path / "run"
    first = Trainer(base, formatter="chatml", output_dir=out, max_steps=1, progress=False).fit(data)
    created = first.manifest["created"]
    caplog.set_level("INFO", logger="finetune_sdk")
    second = Trainer(base, formatter="chatml", output_dir=out, max_steps=1, r=4, progress=False).fit(data)
    assert second.manifest["options"]["r"] == 4
    assert f"replacing the earlier lora result in {out} (created {created})" in caplog.text
    assert scratch_left(tmp_path) == []


def test_merge_refuses_a_users_folder_and_the_inputs(base, data, tmp_path, monkeypatch):
    result = Trainer(base, formatter="chatml", output_dir=tmp_path / "run", max_steps=1, progress=False).fit(data)
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "report.pdf").write_bytes(b"%PDF")
    import finetune_sdk.models.loading

    monkeypatch.setattr(finetune_sdk.models.loading, "load", lambda *a, **k: pytest.fail("loaded before refusing"))
    assert_refused(invoke(["merge", result.output_dir, "--out", exports]),
                   f"out {exports} is an existing folder that is not a finetune-sdk result", "report.pdf")
    assert_refused(invoke(["merge", result.output_dir, "--out", result.output_dir]), "is the result being merged")
    assert_refused(invoke(["merge", result.output_dir, "--out", base / "merged"]), "is inside the base model")
    assert snapshot(exports) == {"report.pdf": b"%PDF"}


def test_disk_full_while_saving_is_one_line_and_leaves_nothing(base, data, tmp_path, monkeypatch):
    from finetune_sdk.plugins.techniques.lora import LoraTechnique

    def full_disk(self, model, directory):
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "adapter_model.safetensors"))

    monkeypatch.setattr(LoraTechnique, "save", full_disk)
    out = tmp_path / "run"
    line = assert_refused(invoke(train_args(base, data, out)), f"can't write {out}: No space left on device",
                          "nothing was saved")
    assert "\n" not in line and not out.exists() and scratch_left(tmp_path) == []
    checkpoints = Path(str(out) + ".checkpoints")  # only complete checkpoints stay, for --resume
    assert all(p.name.startswith("checkpoint-") for p in checkpoints.iterdir())
    assert latest_checkpoint(checkpoints) is not None
    with pytest.raises(FinetuneError, match="No space left on device"):
        Trainer(base, formatter="chatml", output_dir=out, max_steps=1, progress=False).fit(data)
    assert not out.exists() and scratch_left(tmp_path) == []


def test_scratch_folders_of_a_killed_run_are_removed_by_the_next(base, data, tmp_path):
    out = tmp_path / "run"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    for kind in ("work", "staging"):
        stale = tmp_path / f".run.{kind}-{dead}-abc123"
        stale.mkdir()
        (stale / "checkpoint-1").mkdir()
    mine = tmp_path / f".run.work-{os.getppid()}-live"  # a running process's folder is left alone
    mine.mkdir()
    Trainer(base, formatter="chatml", output_dir=out, max_steps=1, progress=False).fit(data)
    assert scratch_left(tmp_path) == [mine.name]
    assert (out / "finetune_manifest.json").is_file()


def test_a_result_moved_aside_before_a_kill_is_put_back(tmp_path):
    from finetune_sdk.training.output_paths import remove_stale_scratch

    out = tmp_path / "run"
    aside = tmp_path / f".run.old-{2 ** 22 + 7}-xyz" / "run"
    aside.mkdir(parents=True)
    (aside / "finetune_manifest.json").write_text("{}")
    remove_stale_scratch(out)
    assert (out / "finetune_manifest.json").read_text() == "{}" and scratch_left(tmp_path) == []


@pytest.mark.slow
def test_a_sigkilled_run_leaves_work_folders_that_the_next_run_removes(base, data, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "FINETUNE_SDK_CRASH_AT_STEP": "2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "finetune_sdk", *map(str, train_args(base, data, out)[:-2]), "--max-steps", "4",
           "--save-steps", "1"]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert any(".run.work-" in name for name in scratch_left(tmp_path))
    Trainer(base, formatter="chatml", output_dir=out, max_steps=4, save_steps=1, progress=False).fit(data,
                                                                                                   resume=True)
    assert scratch_left(tmp_path) == [] and not Path(str(out) + ".checkpoints").exists()


def test_a_sequential_run_refuses_a_folder_with_other_files(base, data, tmp_path):
    from finetune_sdk.training.stages_and_tasks import Stage

    out = tmp_path / "stages"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"is an existing folder that is not a finetune-sdk result \(it holds "
                                          r"notes.txt\)"):
        Trainer(base, formatter="chatml", output_dir=out, max_steps=1, progress=False)
    assert snapshot(out) == {"notes.txt": b"mine"}
    runs = tmp_path / "runs"  # a sequential run's folder is replaceable, a foreign file in it is not
    trainer = Trainer(base, formatter="chatml", output_dir=runs, max_steps=1, progress=False)
    trainer.fit([Stage(data), Stage(data)])
    Trainer(base, formatter="chatml", output_dir=runs, max_steps=1, progress=False).fit([Stage(data)])
    (runs / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds notes.txt, which a sequential run did not write"):
        trainer.fit([Stage(data)])
    assert (runs / "notes.txt").read_text() == "mine"


def test_checkpoint_folder_cleanup_keeps_foreign_files(tmp_path):
    from finetune_sdk.training.checkpoints import remove_checkpoints

    root = tmp_path / "run.checkpoints"
    (root / "checkpoint-5").mkdir(parents=True)
    (root / "diary.txt").write_text("mine")
    remove_checkpoints(root)
    assert snapshot(root) == {"diary.txt": b"mine"}
