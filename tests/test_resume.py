"""Checkpoints are atomic and safetensors-only; a SIGKILLed run resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune_sdk.training.checkpoints import checkpoints_dir, latest_checkpoint


@pytest.fixture(scope="module")
def job(tiny_models, tmp_path_factory):
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            for a in range(6) for b in range(6)]
    data = tmp_path_factory.mktemp("resume-data") / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--model", str(tiny_models("llama")), "--data", str(data), "--formatter", "chatml",
            "--max-steps", "24", "--save-steps", "5", "--per-device-train-batch-size", "4", "--learning-rate", "0.01",
            "--seed", "3", "--logging-steps", "4"]  # LoRA dropout 0.05 stays on: RNG states must be restored

    def run(out, crash_at=None, resume=False):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("FINETUNE_SDK_CRASH_AT_STEP", None)
        if crash_at:
            env["FINETUNE_SDK_CRASH_AT_STEP"] = str(crash_at)
        cmd = [sys.executable, "-m", "finetune_sdk", *args, "-o", str(out)] + (["--resume"] if resume else [])
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    return run


def weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), (key, (a[key] - b[key]).abs().max())


@pytest.fixture(scope="module")
def interrupted(job, tmp_path_factory):
    """The uninterrupted run and the same run SIGKILLed at step 13, each run once for this module's tests.

    Each test resumes its own copy of the killed run's folders (checkpoints verify by their own sha256 record and
    hold no absolute path), so a resume in one test never sees another's."""
    import types

    root = tmp_path_factory.mktemp("interrupted")
    (root / "reference").mkdir()
    (root / "killed").mkdir()
    return types.SimpleNamespace(reference=job(root / "reference" / "run"), reference_out=root / "reference" / "run",
                                 crashed=job(root / "killed" / "run", crash_at=13), killed=root / "killed")


def copy_of_killed(interrupted, tmp_path):
    """A fresh copy of the killed run's folders; the output folder the resume writes to in it."""
    import shutil

    shutil.copytree(interrupted.killed, tmp_path / "killed")
    return tmp_path / "killed" / "run"


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_weights(job, interrupted, tmp_path):
    assert interrupted.reference.returncode == 0, interrupted.reference.stderr[-2000:]
    assert not checkpoints_dir(interrupted.reference_out).exists()  # cleaned up after success

    assert interrupted.crashed.returncode == -signal.SIGKILL
    out = copy_of_killed(interrupted, tmp_path)
    assert not out.exists()  # no half result
    saved = sorted(p.name for p in checkpoints_dir(out).iterdir() if not p.name.startswith("."))
    assert saved == ["checkpoint-10", "checkpoint-5"]
    for path in checkpoints_dir(out).rglob("*"):
        assert path.suffix in ("", ".safetensors", ".json"), f"non-safetensors/JSON file in a checkpoint: {path}"
    resumed = job(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-10" in resumed.stderr
    assert_same(weights(interrupted.reference_out), weights(out))


@pytest.mark.slow
def test_damaged_and_partial_checkpoints_are_skipped_with_a_warning(job, interrupted, tmp_path):
    assert interrupted.crashed.returncode == -signal.SIGKILL
    out = copy_of_killed(interrupted, tmp_path)
    root = checkpoints_dir(out)
    newest = root / "checkpoint-10" / "trainable.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(bytes(data))
    (root / "checkpoint-12").mkdir()  # a partial one, with no checkpoint.json
    (root / "checkpoint-12" / "trainable.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(root).name == "checkpoint-5"
    resumed = job(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint" in resumed.stderr and "trainable.safetensors damaged" in resumed.stderr
    assert "checkpoint-5" in resumed.stderr
    assert_same(weights(interrupted.reference_out), weights(out))


def test_resume_without_checkpoints_starts_fresh(tiny_models, tmp_path, qa_rows, caplog):
    from finetune_sdk import Trainer

    caplog.set_level("INFO", logger="finetune_sdk")
    import logging

    logging.getLogger("finetune_sdk").propagate = True
    result = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "o", max_steps=2,
                     progress=False).fit(qa_rows, resume=True)
    assert result.metrics["train_steps"] == 2
    assert "no complete checkpoint" in caplog.text
