"""finetune-sdk-dora passes the finetune_sdk technique contract; DoRA is really on; the observer and command work."""

from __future__ import annotations

import csv
import json
import types

import click
import pytest
from click.testing import CliRunner

from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.testing import TechniqueContract
from finetune_sdk.testing.contract import CAUSAL_ROWS
from finetune_sdk.testing.tiny import save_tiny_model


class TestDora(TechniqueContract):
    name = "dora"
    learning_rate = 1e-2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("dora-model") / "llama", "llama")


def test_registered_from_this_distribution():
    reg = get_plugin_host().registration("technique", "dora")
    assert reg.distribution == "finetune-sdk-dora" and reg.plugin == "dora"
    info = next(p for p in get_plugin_host().plugins if p.name == "dora")
    assert not info.error and {"register_techniques", "on_log", "register_commands"} <= set(info.hooks)


def test_saved_adapter_uses_dora_and_loss_csv_is_written(model_dir, tmp_path, monkeypatch):
    from finetune_sdk import Trainer

    loss_csv = tmp_path / "logs" / "loss.csv"
    monkeypatch.setenv("FINETUNE_SDK_LOSS_CSV", str(loss_csv))
    result = Trainer(model_dir, technique="dora", formatter="chatml", output_dir=tmp_path / "out", max_steps=3,
                     logging_steps=1, per_device_train_batch_size=2, r=4, progress=False).fit(CAUSAL_ROWS)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4 and config["peft_type"] == "LORA"
    assert result.manifest["technique"] == "dora"
    with loss_csv.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "epoch"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3]
    assert all(float(r[1]) > 0 for r in rows[1:])


def test_loss_csv_is_off_without_the_variable(tmp_path, monkeypatch):
    import finetune_sdk_dora

    monkeypatch.delenv("FINETUNE_SDK_LOSS_CSV", raising=False)
    monkeypatch.chdir(tmp_path)
    finetune_sdk_dora.on_log(types.SimpleNamespace(step=1, epoch=0.5), {"loss": 1.0})
    assert not list(tmp_path.iterdir())
    target = tmp_path / "loss.csv"
    monkeypatch.setenv("FINETUNE_SDK_LOSS_CSV", str(target))
    finetune_sdk_dora.on_log(types.SimpleNamespace(step=7, epoch=1.0), {"train_loss": 2.0})  # summary: skipped
    finetune_sdk_dora.on_log(types.SimpleNamespace(step=8, epoch=1.0), {"loss": 0.5, "epoch": 1.25})
    assert target.read_text().splitlines() == ["step,loss,epoch", "8,0.5,1.25"]


def test_dora_info_command():
    group = click.Group("finetune")
    get_plugin_host().add_commands(group)
    result = CliRunner().invoke(group, ["dora-info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["name"] == "dora"
    defaults = {k: v["default"] for k, v in info["options"].items()}
    assert defaults.items() >= {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": None}.items()
    text = CliRunner().invoke(group, ["dora-info"]).output
    assert "--lora-alpha" in text and "dora:" in text
