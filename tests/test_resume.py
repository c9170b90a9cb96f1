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

from finetune_sdk.checkpoints import checkpoints_dir, latest_checkpoint


@pytest.fixture
def job(tiny_models, tmp_path):
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            for a in range(6) for b in range(6)]
    data = tmp_path / "train.jsonl"
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


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_weights(job, tmp_path):
    reference = job(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert not checkpoints_dir(tmp_path / "reference").exists()  # cleaned up after success

    out = tmp_path / "crashed"
    crashed = job(out, crash_at=13)
    assert crashed.returncode == -signal.SIGKILL
    assert not out.exists()  # no half result
    saved = sorted(p.name for p in checkpoints_dir(out).iterdir() if not p.name.startswith("."))
    assert saved == ["checkpoint-10", "checkpoint-5"]
    for path in checkpoints_dir(out).rglob("*"):
        assert path.suffix in ("", ".safetensors", ".json"), f"non-safetensors/JSON file in a checkpoint: {path}"
    resumed = job(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-10" in resumed.stderr
    assert_same(weights(tmp_path / "reference"), weights(out))


@pytest.mark.slow
def test_damaged_and_partial_checkpoints_are_skipped_with_a_warning(job, tmp_path):
    reference = job(tmp_path / "reference")
    out = tmp_path / "crashed"
    assert job(out, crash_at=13).returncode == -signal.SIGKILL
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
    assert_same(weights(tmp_path / "reference"), weights(out))


def test_resume_without_checkpoints_starts_fresh(tiny_models, tmp_path, qa_rows, caplog):
    from finetune_sdk import Trainer

    caplog.set_level("INFO", logger="finetune_sdk")
    import logging

    logging.getLogger("finetune_sdk").propagate = True
    result = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "o", max_steps=2,
                     progress=False).fit(qa_rows, resume=True)
    assert result.metrics["train_steps"] == 2
    assert "no complete checkpoint" in caplog.text
