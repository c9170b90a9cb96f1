"""Every bad input is a one-line error (exit 2 in the CLI) with nothing written (issue 10, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.errors import ConfigError, DataError, FinetuneError, ModelNotFoundError
from finetune_sdk.options import Option, resolve_options
from tests.safety_helpers import assert_refused, forbid_model_loading, invoke, scratch_left, snapshot, write_jsonl


@pytest.fixture
def data(tmp_path, qa_rows):
    return write_jsonl(tmp_path / "train.jsonl", qa_rows)


@pytest.mark.parametrize("options,message", [
    ({"r": 0}, "option 'r' must be at least 1, got 0; LoRA rank"),
    ({"per_device_train_batch_size": 0}, "option 'per_device_train_batch_size' must be at least 1, got 0"),
    ({"gradient_accumulation_steps": 0}, "option 'gradient_accumulation_steps' must be at least 1, got 0"),
    ({"lora_dropout": 2}, "option 'lora_dropout' must be less than 1, got 2.0"),
    ({"lora_dropout": -0.1}, "option 'lora_dropout' must be at least 0, got -0.1"),
    ({"learning_rate": float("nan")}, "option 'learning_rate' must be a finite number, got nan"),
    ({"learning_rate": "inf"}, "option 'learning_rate' must be a finite number, got inf"),
    ({"learning_rate": -1e-4}, "option 'learning_rate' must be at least 0, got -0.0001"),
    ({"seed": -1}, "option 'seed' must be at least 0, got -1"),
    ({"num_train_epochs": -1}, "option 'num_train_epochs' must be greater than 0, got -1.0"),
    ({"num_train_epochs": 0}, "option 'num_train_epochs' must be greater than 0, got 0.0"),
    ({"max_length": 0}, "option 'max_length' must be at least 2, got 0"),
    ({"max_steps": -5}, "option 'max_steps' must be at least -1, got -5"),
    ({"logging_steps": 0}, "option 'logging_steps' must be at least 1"),
    ({"save_steps": -1}, "option 'save_steps' must be at least 0"),
    ({"warmup_steps": -3}, "option 'warmup_steps' must be at least 0"),
    ({"weight_decay": -0.1}, "option 'weight_decay' must be at least 0"),
    ({"objective": "dpo", "beta": 0}, "option 'beta' must be greater than 0"),
    ({"simpo_gamma": -1}, "option 'simpo_gamma' must be at least 0"),
    ({"objective": "sft", "beta": 0.5}, "option 'beta' is an option of objective"),
    ({"target_modules": []}, "option 'target_modules' must have at least 1 items"),
])
def test_option_values_out_of_range(llama_dir, tmp_path, monkeypatch, options, message):
    forbid_model_loading(monkeypatch)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(llama_dir, output_dir=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--r", "0"], "option 'r' must be at least 1, got 0"),
    (["--learning-rate", "nan"], "option 'learning_rate' must be a finite number"),
    (["--num-train-epochs", "-1"], "option 'num_train_epochs' must be greater than 0"),
    (["--seed", "-1"], "option 'seed' must be at least 0"),
    (["--technique", "classifier", "--num-labels", "1"], "option 'num_labels' must be at least 2"),
    (["--technique", "qlora", "--lora-dropout", "1"], "option 'lora_dropout' must be less than 1"),
])
def test_cli_option_ranges_exit_2_before_loading(llama_dir, data, tmp_path, monkeypatch, flags, message):
    forbid_model_loading(monkeypatch)
    out = tmp_path / "out"
    assert_refused(invoke(["train", "-m", llama_dir, "--data", data, "-o", out, *flags]), message)
    assert not out.exists() and scratch_left(tmp_path) == []


def test_cli_counts_out_of_range(llama_dir, data, tmp_path):
    for args in (["train", "-m", llama_dir, "--data", data, "--nproc", "0"],
                 ["generate", llama_dir, "hi", "--max-new-tokens", "-1"]):
        result = invoke(args)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "is not in the range x>=1" in result.output, result.output


def test_plugin_options_get_the_same_checks():
    specs = {"rank": Option("rank", int, 4, "rank of my adapter", minimum=1, maximum=256),
             "ratio": Option("ratio", float, 0.5, "a fraction", exclusive_minimum=0, exclusive_maximum=1)}
    assert resolve_options({"rank": "8"}, specs)["rank"] == 8
    with pytest.raises(ConfigError, match="option 'rank' must be at most 256, got 300; rank of my adapter"):
        resolve_options({"rank": 300}, specs)
    with pytest.raises(ConfigError, match="option 'ratio' must be less than 1, got 1.0"):
        resolve_options({"ratio": 1}, specs)
    assert specs["ratio"].range_text() == "0 < x < 1" and specs["rank"].range_text() == "1 <= x <= 256"
    help_text = invoke(["train", "--help"]).output
    assert "[x >= 1]" in help_text  # the range shows in --help


def test_generate_max_new_tokens_in_python(llama_dir):
    model = Trainer(llama_dir, progress=False).current_model()
    with pytest.raises(ConfigError, match="max_new_tokens must be a whole number of at least 1, got -1"):
        model.generate("hi", max_new_tokens=-1)


def test_target_modules_that_match_nothing_name_the_models_layers(llama_dir, data, tmp_path):
    trainer = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", max_steps=1, progress=False,
                      target_modules="q_proj,qkv_proj")
    with pytest.raises(ConfigError, match=r"option 'target_modules': 'qkv_proj' match no module of "
                                          r"LlamaForCausalLM; its linear layers are down_proj, gate_proj, k_proj, "
                                          r"o_proj, q_proj, up_proj, v_proj"):
        trainer.fit(data)
    assert not (tmp_path / "out").exists() and scratch_left(tmp_path) == []


INVALID_UTF8 = {
    "jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
    "csv": b"prompt,completion\na,b\ncaf\xe9,b\n",
    "json": b'[{"prompt": "a", "completion": "b"},\n {"prompt": "caf\xe9", "completion": "b"}]',
}


@pytest.mark.parametrize("suffix", sorted(INVALID_UTF8))
def test_invalid_utf8_data_names_file_and_line(llama_dir, tmp_path, monkeypatch, suffix):
    path = tmp_path / f"train.{suffix}"
    path.write_bytes(INVALID_UTF8[suffix])
    forbid_model_loading(monkeypatch)
    with pytest.raises(DataError, match=rf"{path} line \d: not valid UTF-8 \(byte 0xe9 at column \d+\); save the "
                                        "file as UTF-8"):
        Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", progress=False).fit(path)
    line = assert_refused(invoke(["train", "-m", llama_dir, "--data", path, "-f", "chatml", "-o", tmp_path / "o"]),
                          f"{path} line ", "not valid UTF-8")
    assert ("line 3" if suffix == "csv" else "line 2") in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_invalid_utf8_config_and_prompt_files(llama_dir, data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"r: 4\nsystem_prompt: caf\xe9\n")
    assert_refused(invoke(["train", "-m", llama_dir, "--data", data, "--config", config]),
                   f"{config} line 2: not valid UTF-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"hello\n\xff\xfe\n")
    assert_refused(invoke(["generate", llama_dir, "--file", prompts]), f"{prompts} line 2: not valid UTF-8")


def test_a_utf8_bom_is_accepted(tmp_path):
    from finetune_sdk.data.rows import load_rows

    bom = b"\xef\xbb\xbf"
    (tmp_path / "excel.csv").write_bytes(bom + "prompt,completion\ncafé,b\n".encode())
    (tmp_path / "bom.jsonl").write_bytes(bom + b'{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "bom.json").write_bytes(bom + b'[{"prompt": "a", "completion": "b"}]')
    assert load_rows(tmp_path / "excel.csv").rows == [{"prompt": "café", "completion": "b"}]
    assert load_rows(tmp_path / "bom.jsonl").rows == [{"prompt": "a", "completion": "b"}]
    assert load_rows(tmp_path / "bom.json").rows == [{"prompt": "a", "completion": "b"}]


def test_a_parquet_that_is_not_parquet_and_an_unreadable_file(tmp_path, monkeypatch):
    from finetune_sdk.data.rows import load_rows

    fake = tmp_path / "train.parquet"
    fake.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=rf"{fake}: not a readable Parquet file \("):
        load_rows(fake)
    locked = tmp_path / "locked.jsonl"
    locked.write_text('{"text": "a"}\n')
    real = Path.read_bytes

    def denied(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads any file: simulate what users see
    with pytest.raises(DataError, match=rf"{locked}: can't read it \(Permission denied\)"):
        load_rows(locked)


def truncate(path: Path, keep: int = -100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_base_model_is_named_before_loading(llama_dir, tmp_path, monkeypatch):
    base = Path(shutil.copytree(llama_dir, tmp_path / "model"))
    truncate(base / "model.safetensors")
    forbid_model_loading(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=rf"{base / 'model.safetensors'} is truncated or corrupt"):
        Trainer(base)
    (base / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelNotFoundError, match="is not a valid safetensors file"):
        Trainer(base)


@pytest.fixture(scope="module")
def lora_result(tmp_path_factory, tiny_models):
    rows = [{"prompt": f"what is {i}?", "completion": f"{i}."} for i in range(8)]
    out = tmp_path_factory.mktemp("lora") / "run"
    return Trainer(tiny_models("llama"), formatter="chatml", output_dir=out, max_steps=1, progress=False).fit(rows)


def test_a_truncated_adapter_is_named(lora_result, tmp_path):
    result = Path(shutil.copytree(lora_result.output_dir, tmp_path / "run"))
    truncate(result / "adapter_model.safetensors")
    with pytest.raises(FinetuneError, match=rf"{result / 'adapter_model.safetensors'} is truncated or corrupt"):
        finetune_sdk.load(result)
    assert_refused(invoke(["generate", result, "hi"]), "adapter_model.safetensors is truncated or corrupt")


@pytest.fixture(scope="module")
def classifier_result(tmp_path_factory, tiny_models):
    rows = [{"text": f"red {i}", "label": "colour"} for i in range(4)] + \
           [{"text": f"cat {i}", "label": "animal"} for i in range(4)]
    out = tmp_path_factory.mktemp("clf") / "run"
    return Trainer(tiny_models("llama"), technique="classifier", output_dir=out, max_steps=2,
                   progress=False).fit(rows)


def test_a_classifier_head_of_the_wrong_shape_is_refused(classifier_result, tmp_path):
    import torch
    from safetensors.torch import save_file

    result = Path(shutil.copytree(classifier_result.output_dir, tmp_path / "run"))
    save_file({"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}, str(result / "classifier_head.safetensors"))
    with pytest.raises(FinetuneError, match=r"classifier_head.safetensors: head has shapes .*\(3, 64\).* but 2 "
                                            r"labels on a backbone of hidden size 64 need"):
        finetune_sdk.load(result)
    assert_refused(invoke(["predict", result, "red"]), "head has shapes")


def test_a_damaged_feature_cache_is_rebuilt_with_a_warning(tiny_models, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FINETUNE_SDK_CACHE", str(tmp_path / "cache"))
    rows = [{"text": f"red {i}", "label": "colour"} for i in range(4)] + \
           [{"text": f"cat {i}", "label": "animal"} for i in range(4)]

    def train(out):
        return Trainer(tiny_models("llama"), technique="classifier", output_dir=tmp_path / out, max_steps=2,
                       progress=False).fit(rows)

    first = train("a")
    cached = list((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(cached) == 1 and first.metrics["features_cached"] is False
    truncate(cached[0], 40)
    caplog.set_level("WARNING", logger="finetune_sdk")
    second = train("b")
    assert "is damaged" in caplog.text and "computing the features again" in caplog.text
    assert second.metrics["features_cached"] is False
    assert train("c").metrics["features_cached"] is True  # the rebuilt cache is whole again


def test_a_single_class_is_refused(llama_dir, tmp_path):
    rows = [{"text": f"red {i}", "label": "colour"} for i in range(6)]
    with pytest.raises(DataError, match=r"train_data: every example has the label 'colour'; a classifier needs "
                                        r"examples of at least two classes"):
        Trainer(llama_dir, technique="classifier", output_dir=tmp_path / "out", progress=False).fit(rows)
    with pytest.raises(DataError, match="every example has the label 'colour'"):
        Trainer(llama_dir, technique="classifier", output_dir=tmp_path / "out", progress=False,
                labels="colour,animal").fit(rows)
    assert not (tmp_path / "out").exists()


def test_preference_pairs_with_the_same_answers(llama_dir, tmp_path, caplog):
    same = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "yes"} for i in range(3)]
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    with pytest.raises(DataError, match=r"train_data: 3 of 4 pairs have the same chosen and rejected answer; DPO "
                                        "learns nothing"):
        Trainer(llama_dir, output_dir=tmp_path / "out", progress=False, max_steps=1).fit(same + good[:1])
    assert not (tmp_path / "out").exists()
    caplog.set_level("WARNING", logger="finetune_sdk")
    Trainer(llama_dir, output_dir=tmp_path / "ok", progress=False, max_steps=1).fit(same[:1] + good)
    assert "train_data: 1 of 6 pairs have the same chosen and rejected answer" in caplog.text


def test_rows_with_empty_answers(llama_dir, tmp_path, caplog):
    empty = [{"prompt": f"q{i}", "completion": "  "} for i in range(3)]
    good = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "train.jsonl", empty + good[:2])
    with pytest.raises(DataError, match=rf"{path}: 3 of 5 rows have an empty answer; the model would learn to "
                                        "answer nothing"):
        Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", progress=False).fit(path)
    messages = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}]
    caplog.set_level("WARNING", logger="finetune_sdk")
    Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "ok", progress=False, max_steps=1).fit(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3 + messages)
    assert "train_data: 1 of 4 rows have an empty answer" in caplog.text
    assert not (tmp_path / "out").exists()


def test_resume_after_changing_the_rank_names_the_option(llama_dir, data, tmp_path, monkeypatch):
    import finetune_sdk.training.checkpoints as training
    from finetune_sdk.training.checkpoints import checkpoints_dir

    out = tmp_path / "run"
    # keep the checkpoints a finished run removes, as an interrupted run leaves them
    monkeypatch.setattr(training, "remove_checkpoints", lambda root: None)
    Trainer(llama_dir, formatter="chatml", output_dir=out, max_steps=2, save_steps=1, r=8, progress=False).fit(data)
    shutil.rmtree(out)
    before = snapshot(checkpoints_dir(out))
    assert "checkpoint-2/trainable.safetensors" in before
    line = assert_refused(invoke(["train", "-m", llama_dir, "--data", data, "-f", "chatml", "-o", out, "--max-steps",
                                  "3", "--save-steps", "1", "--r", "4", "--resume"]),
                          "can't resume from", "options changed since: r was 8, now 4",
                          "resume with the options of the interrupted run")
    assert "size mismatch" not in line
    assert snapshot(checkpoints_dir(out)) == before and not out.exists() and scratch_left(tmp_path) == []


def test_a_config_files_unknown_key_names_the_file(llama_dir, data, tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.001\n")
    forbid_model_loading(monkeypatch)
    assert_refused(invoke(["train", "-m", llama_dir, "--data", data, "--config", config]),
                   f"{config}: unknown key 'learning_rat' (did you mean 'learning_rate'")
    config.write_text("options:\n  r: 0\n")
    assert_refused(invoke(["train", "-m", llama_dir, "--data", data, "--config", config]),
                   "option 'r' must be at least 1")
