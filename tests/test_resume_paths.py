"""Issue 11, kind 3: resume=True is never silently ignored: stages, multi-task, DPO and the classifier resume, and a
resumed run's metrics describe the whole run."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from finetune_sdk import Stage, Task, Trainer
from finetune_sdk.training.checkpoints import checkpoints_dir
from finetune_sdk.errors import ConfigError

SFT = [{"instruction": f"what is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
       for a in range(3) for b in range(3)]
CHAT = [{"prompt": f"what is {a} times {b}?", "completion": f"{a} times {b} is {a * b}."}
        for a in range(3) for b in range(3)]
PAIRS = [{"prompt": f"what is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.", "rejected": "no idea."}
         for a in range(3) for b in range(3)]
CLS = [{"text": f"the {w} is here", "label": c}
       for w, c in [("red", "colour"), ("cat", "animal"), ("blue", "colour"), ("dog", "animal"),
                    ("fish", "animal"), ("green", "colour"), ("bird", "animal"), ("yellow", "colour")]]


class Crash(Exception):
    """Stands for a SIGKILL: the run stops mid-way, its checkpoints stay on disk."""


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at(n)``: the next training run stops after step n (like FINETUNE_SDK_CRASH_AT_STEP, in-process)."""
    import finetune_sdk.training.engine as training

    class CrashAtStep(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise Crash(f"crashed after step {self.step}")

    def arm(step):
        monkeypatch.setenv("FINETUNE_SDK_CRASH_AT_STEP", str(step))
        monkeypatch.setattr(training, "CrashAtStep", CrashAtStep)

    def disarm():
        monkeypatch.delenv("FINETUNE_SDK_CRASH_AT_STEP", raising=False)

    arm.disarm = disarm
    return arm


def trainer(model, out, **options):
    options = {"num_train_epochs": 2, "per_device_train_batch_size": 2, "save_steps": 2, "logging_steps": 1,
               "learning_rate": 1e-2, "seed": 3, "progress": False, **options}
    return Trainer(model, output_dir=out, **options)


def trained(result):
    path = result.output_dir
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = trained(a), trained(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol), (key, (wa[key] - wb[key]).abs().max())


def test_two_stages_resumed_after_a_crash_in_stage_2_skip_stage_1_and_publish_nothing_twice(
        tiny_models, tmp_path, crash_at, caplog):
    from finetune_sdk.registry import Registry

    caplog.set_level("INFO", logger="finetune_sdk")
    stages = [Stage(SFT, formatter="alpaca", max_steps=3), Stage(CHAT, formatter="chatml")]
    reference = trainer(tiny_models("llama"), tmp_path / "ref").fit(stages)
    out, registry = tmp_path / "run", Registry(tmp_path / "registry")
    crash_at(5)  # stage 1 stops at step 3; stage 2 (10 steps) crashes after step 5, checkpoints 2 and 4 on disk
    with pytest.raises(Crash):
        trainer(tiny_models("llama"), out, publish_as="bot", registry=registry).fit(stages)
    crash_at.disarm()
    assert [v.ref for v in registry.versions("bot")] == ["bot@1"]  # stage 1 published, stage 2 not finished
    stage_1 = (out / "stage-1" / "adapter_model.safetensors").stat().st_mtime_ns
    resumed = trainer(tiny_models("llama"), out, publish_as="bot", registry=registry).fit(stages, resume=True)
    assert "stage 1 of 2: finished in" in caplog.text and "skipped (resume)" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert (out / "stage-1" / "adapter_model.safetensors").stat().st_mtime_ns == stage_1  # not trained again
    assert_same_weights(reference, resumed)
    assert resumed.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-4)
    versions = registry.versions("bot")
    assert [(v.ref, v.parent) for v in versions] == [("bot@1", None), ("bot@2", "bot@1")]  # nothing twice
    assert [r.version.ref for r in resumed.stages] == ["bot@1", "bot@2"]
    assert not checkpoints_dir(out).exists() and not checkpoints_dir(out / "stage-2").exists()


def test_dpo_stage_after_sft_resumes_with_the_sft_reference(tiny_models, tmp_path, crash_at):
    stages = [Stage(SFT, formatter="alpaca", max_steps=3),
              Stage(PAIRS, formatter="preference", eval_data=PAIRS[:3])]
    reference = trainer(tiny_models("llama"), tmp_path / "ref").fit(stages)
    out = tmp_path / "run"
    crash_at(5)
    with pytest.raises(Crash):
        trainer(tiny_models("llama"), out).fit(stages)
    crash_at.disarm()
    resumed = trainer(tiny_models("llama"), out).fit(stages, resume=True)
    assert_same_weights(reference, resumed)
    for key in ("reward_margin", "eval_loss", "train_loss"):
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("path", ["multi-task", "classifier", "dpo", "reward-model", "reward-model-lora"])
def test_every_path_resumes_to_the_uninterrupted_weights(tiny_models, tmp_path, crash_at, path):
    data = {"multi-task": [Task("a", CHAT, formatter="chatml"), Task("b", SFT, formatter="alpaca")],
            "classifier": CLS}.get(path, PAIRS)
    options = {"classifier": {"technique": "classifier", "learning_rate": 2e-2},
               "dpo": {"formatter": "preference"},
               "reward-model": {"technique": "reward-model", "formatter": "preference"},
               "reward-model-lora": {"technique": "reward-model", "formatter": "preference", "backbone": "lora"},
               }.get(path, {})
    reference = trainer(tiny_models("llama"), tmp_path / "ref", **options).fit(data)
    out = tmp_path / "run"
    crash_at(3)
    with pytest.raises(Crash):
        trainer(tiny_models("llama"), out, **options).fit(data)
    crash_at.disarm()
    assert checkpoints_dir(out).is_dir()
    resumed = trainer(tiny_models("llama"), out, **options).fit(data, resume=True)
    assert_same_weights(reference, resumed)
    assert resumed.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-4)


def test_stages_that_cannot_resume_say_so(tiny_models, tmp_path):
    stages = [Stage(SFT, formatter="alpaca", max_steps=1), Stage(CHAT, formatter="chatml", max_steps=1)]
    out = tmp_path / "run"
    trainer(tiny_models("llama"), out).fit(stages)
    # a finished run: its resume state is gone, so resuming would retrain silently; it is an error instead
    with pytest.raises(ConfigError, match="can't resume: stage 1 finished in .* but the weights it ended with"):
        trainer(tiny_models("llama"), out).fit(stages, resume=True)
    other = [Stage(CHAT, formatter="chatml", max_steps=1), stages[1]]
    (checkpoints_dir(out) / "stage-1").mkdir(parents=True)
    (checkpoints_dir(out) / "stage-1" / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="can't resume: stage 1 .* was trained on other data"):
        trainer(tiny_models("llama"), out).fit(other, resume=True)


def test_resumed_run_metrics_describe_the_whole_run(tiny_models, tmp_path, crash_at):
    reference = trainer(tiny_models("llama"), tmp_path / "ref", formatter="chatml").fit(CHAT)
    out = tmp_path / "run"
    crash_at(7)
    with pytest.raises(Crash):
        trainer(tiny_models("llama"), out, formatter="chatml").fit(CHAT)
    crash_at.disarm()
    resumed = trainer(tiny_models("llama"), out, formatter="chatml").fit(CHAT, resume=True)
    assert_same_weights(reference, resumed)
    metrics, segment = resumed.metrics, resumed.log_history[-1]
    assert metrics["train_steps"] == reference.metrics["train_steps"] == 10
    assert metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-4)
    assert segment["train_loss"] != pytest.approx(metrics["train_loss"], rel=1e-4)  # transformers': last part only
    assert metrics["train_tokens"] == reference.metrics["train_tokens"]
    assert metrics["train_runtime"] > segment["train_runtime"]  # both parts counted
    assert metrics["train_tokens_per_second"] == pytest.approx(metrics["train_tokens"] / metrics["train_runtime"])


def test_a_crash_in_the_first_stage_resumes_it(tiny_models, tmp_path, crash_at):
    stages = [Stage(SFT, formatter="alpaca", max_steps=5), Stage(CHAT, formatter="chatml", max_steps=2)]
    reference = trainer(tiny_models("llama"), tmp_path / "ref").fit(stages)
    out = tmp_path / "run"
    crash_at(3)  # stage 1 crashes after step 3: only out/stage-1.checkpoints exists
    with pytest.raises(Crash):
        trainer(tiny_models("llama"), out).fit(stages)
    crash_at.disarm()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["stage-1.checkpoints", "stage-1.run"]
    resumed = trainer(tiny_models("llama"), out).fit(stages, resume=True)
    assert_same_weights(reference, resumed)
    assert_same_weights(reference.stages[0], resumed.stages[0])
