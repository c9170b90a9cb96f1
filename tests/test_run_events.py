"""The run event log: one fsynced JSON line per logging step and evaluation, readable after SIGKILL; SIGTERM stops
cleanly with a resumable checkpoint; ``training_log.json`` holds the same step values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from finetune_sdk.training.checkpoints import checkpoints_dir, latest_checkpoint
from finetune_sdk.training.run_events import EventLog, events_path, read_events, read_events_from, run_area


def test_event_log_appends_lines_and_reads_past_a_torn_one(tmp_path):
    out = tmp_path / "out"
    with EventLog(out, fresh=True) as log:
        log.append({"event": "log", "step": 1, "loss": 2.0, "bad": float("nan")})
        log.append({"event": "log", "step": 2, "loss": 1.5})
    path = events_path(out)
    assert path == tmp_path / "out.run" / "events.jsonl" and run_area(out) == tmp_path / "out.run"
    with open(path, "ab") as handle:
        handle.write(b'{"event": "log", "step": 3, "lo')  # a write cut by a crash
    events, offset = read_events_from(path)
    assert [e["step"] for e in events] == [1, 2] and events[0]["bad"] is None and "time" in events[0]
    assert offset == len(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))
    with EventLog(out, fresh=False) as log:  # a resume appends after ending the torn line
        log.append({"event": "log", "step": 3, "loss": 1.0})
    assert [e["step"] for e in read_events(path)] == [1, 2, 3]
    assert read_events(path, offset) == [read_events(path)[-1]]
    with EventLog(out, fresh=True) as log:  # a fresh run into the same folder starts a new log
        log.append({"event": "start"})
    assert [e["event"] for e in read_events(path)] == ["start"]
    assert read_events(tmp_path / "missing.jsonl") == []


@pytest.fixture
def run_cli(tiny_models, tmp_path):
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            for a in range(6) for b in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))

    def start(out, steps, *extra):
        cmd = [sys.executable, "-m", "finetune_sdk", "train", "--model", str(tiny_models("llama")), "--data",
               str(data), "--formatter", "chatml", "--max-steps", str(steps), "--logging-steps", "1",
               "--per-device-train-batch-size", "2", "--learning-rate", "0.01", "-o", str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("FINETUNE_SDK_CRASH_AT_STEP", None)
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    start.evals = evals
    return start


def wait_for_logs(out, count, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(e["event"] == "log" for e in read_events(events_path(out))) >= count:
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} log events after {timeout} s")


@pytest.mark.slow
def test_a_finished_run_logs_every_step_and_training_log_json_has_the_same_values(run_cli, tmp_path):
    out = tmp_path / "done"
    process = run_cli(out, 6, "--eval-data", str(run_cli.evals), "--eval-steps", "3")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    events = read_events(events_path(out))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    start = events[0]
    assert start["max_steps"] == 6 and start["technique"] == "lora" and start["device"].startswith(("cpu", "cuda"))
    assert "float32" in start["precision"] or "bfloat16" in start["precision"]
    logs = [e for e in events if e["event"] == "log"]
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5, 6]
    for event in logs:
        assert event["loss"] > 0 and event["tokens_per_second"] > 0 and event["learning_rate"] >= 0
        assert "grad_norm" in event and event["time"] >= start["time"]
    assert [e["step"] for e in events if e["event"] == "eval"] == [3, 6]
    history = json.loads((out / "training_log.json").read_text())
    assert [(h["step"], h["loss"]) for h in history if "loss" in h] == [(e["step"], e["loss"]) for e in logs]
    assert [h["eval_loss"] for h in history if "eval_loss" in h] == \
        [e["eval_loss"] for e in events if e["event"] == "eval"]
    end = events[-1]
    assert end["metrics"]["train_steps"] == 6 and end["peak_memory"] > 10 * 2**20


@pytest.mark.slow
def test_a_sigkilled_run_leaves_a_readable_log_up_to_its_last_step(run_cli, tmp_path):
    out = tmp_path / "killed"
    process = run_cli(out, 500)
    wait_for_logs(out, 4, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    lines = events_path(out).read_bytes().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is whole JSON: fsync per line, one write each
    steps = [e["step"] for e in parsed if e["event"] == "log"]
    assert len(steps) >= 4 and steps == list(range(1, len(steps) + 1))
    assert parsed[0]["event"] == "start" and parsed[-1]["event"] == "log"


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_resume_continues_the_same_log(run_cli, tmp_path):
    out = tmp_path / "stopped"
    process = run_cli(out, 12)
    wait_for_logs(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "resume" in err and "Traceback" not in err
    events = read_events(events_path(out))
    stopped = events[-1]
    assert stopped["event"] == "stopped" and not out.exists()
    checkpoint = latest_checkpoint(checkpoints_dir(out))
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{stopped['step']}"
    assert stopped["checkpoint"] == str(checkpoint)

    resumed = run_cli(out, 12, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    events = read_events(events_path(out))
    assert [e["event"] for e in events].count("start") == 2 and events[-1]["event"] == "end"
    second = [e for e in events if e["event"] == "start"][1]
    assert second["resumed_from"] == str(checkpoint)
    steps = [e["step"] for e in events if e["event"] == "log"]
    assert steps[-1] == 12 and sorted(set(steps)) == list(range(1, 13))
    assert (out / "adapter_model.safetensors").is_file() and not checkpoints_dir(out).exists()


def test_the_objectives_own_metrics_and_evaluations_become_events(tmp_path):
    from types import SimpleNamespace

    from finetune_sdk.training.callbacks import EventLogCallback

    out = tmp_path / "dpo"
    state = SimpleNamespace(global_step=0, max_steps=4, epoch=0.0, num_input_tokens_seen=0)
    with EventLog(out, fresh=True) as log:
        callback = EventLogCallback(log, {"objective": "dpo"}, tokens_per_step=100.0)
        callback.on_train_begin(None, state, None)
        state.global_step, state.epoch = 2, 0.5
        callback.on_log(None, state, None, logs={"loss": 0.69, "rewards/margins": 0.25, "rewards/accuracies": 0.5,
                                                 "learning_rate": 1e-4, "grad_norm": 0.3})
        callback.on_log(None, state, None, logs={"eval_loss": 0.6, "eval_reward_margin": 0.4})
        callback.on_log(None, state, None, logs={"train_runtime": 1.0, "train_loss": 0.7})  # the summary: skipped
    start, step, evaluation = read_events(events_path(out))
    assert start["event"] == "start" and start["objective"] == "dpo" and start["max_steps"] == 4
    assert step["event"] == "log" and step["rewards/margins"] == 0.25 and step["rewards/accuracies"] == 0.5
    assert step["tokens_per_second"] > 0 and step["epoch"] == 0.5  # 2 steps x 100 tokens over the elapsed time
    assert evaluation == {**evaluation, "event": "eval", "step": 2, "eval_loss": 0.6, "eval_reward_margin": 0.4}
