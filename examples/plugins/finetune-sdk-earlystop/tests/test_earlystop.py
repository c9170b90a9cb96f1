"""finetune-sdk-earlystop stops a real run through the steering hook; the result is saved at the stopped step."""

from __future__ import annotations

from finetune_sdk import Trainer
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.testing.tiny import save_tiny_model


def test_registered_from_this_distribution():
    info = next(p for p in get_plugin_host().plugins if p.name == "earlystop")
    assert info.distribution == "finetune-sdk-earlystop" and "on_evaluate" in info.hooks


def test_stops_when_eval_loss_stops_improving(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_SDK_EARLY_STOPPING_PATIENCE", "1")
    rows = [{"prompt": f"what is {i}?", "completion": f"{i}."} for i in range(8)]
    held = [{"prompt": "what is 9?", "completion": "a number I never saw"}]
    # a learning rate so high the held-out loss rises after the first evaluations
    result = Trainer(save_tiny_model(tmp_path / "m"), formatter="chatml", output_dir=tmp_path / "out",
                     progress=False, learning_rate=1.0, max_steps=40, eval_steps=1, logging_steps=1, save_steps=0,
                     per_device_train_batch_size=8).fit(rows, eval_data=held)
    assert result.metrics["train_steps"] < 40
    assert (result.output_dir / "adapter_model.safetensors").is_file()
