"""Every builtin technique with each compatible quantizer trains a tiny model of each family; results reload."""

from __future__ import annotations

import json

import pytest
import torch

import finetune_sdk
from finetune_sdk import Trainer

GENERATIVE = [
    ("lora", "none"), ("lora", "nf4"), ("lora", "int8"), ("qlora", "nf4"), ("full", "none"),
]
FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]
LEARNING_RATES = {"full": 3e-3, "lora": 3e-2, "qlora": 1e-2}


def quick(family, technique, quantizer):
    return family == "llama" and quantizer in ("none", "nf4") and technique in ("lora", "qlora")


CASES = [pytest.param(f, t, q, marks=() if quick(f, t, q) else pytest.mark.slow, id=f"{f}-{t}-{q}")
         for f in FAMILIES for t, q in GENERATIVE]


@pytest.mark.parametrize("family,technique,quantizer", CASES)
def test_generative_technique_trains_each_family(tiny_models, tmp_path, qa_rows, family, technique, quantizer):
    trainer = Trainer(tiny_models(family), technique=technique, quantizer=quantizer, formatter="chatml",
                      output_dir=tmp_path / "out", num_train_epochs=4, per_device_train_batch_size=4,
                      learning_rate=LEARNING_RATES[technique], progress=False)
    before = trainer.evaluate(qa_rows)["eval_loss"]
    result = trainer.fit(qa_rows, eval_data=qa_rows[:4])
    after = trainer.evaluate(qa_rows)["eval_loss"]
    assert after < before * 0.95, (before, after)
    metrics = result.metrics
    for key in ("train_loss", "eval_loss", "train_runtime", "train_tokens_per_second", "trainable_parameters",
                "total_parameters"):
        assert key in metrics, key
    assert metrics["train_tokens_per_second"] > 0
    if technique == "full":
        assert metrics["trainable_parameters"] == metrics["total_parameters"]
        assert (result.output_dir / "config.json").is_file() and (result.output_dir / "model.safetensors").is_file()
    else:
        assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
        assert (result.output_dir / "adapter_config.json").is_file()
        assert (result.output_dir / "adapter_model.safetensors").is_file()
    manifest = json.loads((result.output_dir / "finetune_manifest.json").read_text())
    assert manifest["technique"] == technique
    assert manifest["quantizer"] == (None if quantizer == "none" else quantizer)
    assert manifest["formatter"] == "chatml"
    assert manifest["dataset"]["fingerprint"].startswith("sha256:")
    assert manifest["base_model"]["id"] == str(tiny_models(family))
    assert manifest["libraries"]["torch"] and manifest["libraries"]["transformers"]
    assert (result.output_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("technique,quantizer", [("lora", "none"), ("qlora", "nf4"), ("full", "none")])
def test_reload_gives_identical_outputs(tiny_models, tmp_path, qa_rows, technique, quantizer):
    trainer = Trainer(tiny_models("llama"), technique=technique, quantizer=quantizer, formatter="chatml",
                      output_dir=tmp_path / "out", num_train_epochs=2, learning_rate=LEARNING_RATES[technique],
                      progress=False)
    result = trainer.fit(qa_rows)
    prompts = ["what is 1 plus 2?", "what is 3 plus 3?"]
    expected = trainer.generate(prompts, max_new_tokens=12)
    loaded = finetune_sdk.load(result.output_dir)
    assert loaded.generate(prompts, max_new_tokens=12) == expected
    ids = torch.tensor([loaded.prompt_ids(prompts[0])])
    with torch.no_grad():
        assert torch.equal(trainer.current_model().model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    if technique == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules()), "qlora reloads in 4-bit"
        unquantized = finetune_sdk.load(result.output_dir, quantized=False)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in unquantized.model.modules())


@pytest.mark.parametrize("family,quantizer,pooling", [
    ("bert", "none", "auto"), ("llama", "none", "auto"), pytest.param("llama", "nf4", "mean", marks=pytest.mark.slow),
    pytest.param("gpt2", "none", "auto", marks=pytest.mark.slow),
])
def test_classifier_head_learns_on_a_frozen_backbone(tiny_models, tmp_path, family, quantizer, pooling):
    rows = [{"text": f"the {w} is {c}", "label": "warm" if c in ("red", "yellow") else "cold"}
            for w in ("cat", "dog", "bird", "fish") for c in ("red", "blue", "yellow", "green")]
    trainer = Trainer(tiny_models(family), technique="classifier", quantizer=quantizer, pooling=pooling,
                      output_dir=tmp_path / "out", num_train_epochs=30, learning_rate=3e-2, progress=False,
                      per_device_train_batch_size=8)
    before = trainer.evaluate(rows)
    backbone_before = {k: v.clone() for k, v in trainer.current_model().model.backbone.state_dict().items()}
    result = trainer.fit(rows, eval_data=rows)
    after = trainer.evaluate(rows)
    assert after["eval_loss"] < before["eval_loss"]
    assert {"accuracy", "macro_f1", "eval_loss"} <= set(result.metrics)
    for key, value in trainer.current_model().model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), f"backbone weight {key} changed"
    assert (result.output_dir / "classifier_head.safetensors").is_file()
    config = json.loads((result.output_dir / "classifier_config.json").read_text())
    assert config["labels"] == ["cold", "warm"]
    assert config["pooling"] == (("first" if family == "bert" else "last") if pooling == "auto" else pooling)
    loaded = finetune_sdk.load(result.output_dir)
    texts = [r["text"] for r in rows]
    assert loaded.predict(texts) == trainer.predict(texts)
    scores = loaded.predict(texts[0], return_scores=True)
    assert set(scores["scores"]) == {"cold", "warm"} and abs(sum(scores["scores"].values()) - 1) < 1e-5


def test_classifier_accepts_integer_labels(tiny_models, tmp_path):
    rows = [{"text": "red", "label": 0}, {"text": "blue", "label": 2}] * 4
    result = Trainer(tiny_models("llama"), technique="classifier", output_dir=tmp_path / "out",
                     num_train_epochs=1, progress=False).fit(rows)
    assert result.manifest["labels"] == ["0", "1", "2"]


def test_generate_before_fit_uses_the_base_and_after_the_tuned_model(tiny_models, tmp_path, qa_rows):
    trainer = Trainer(tiny_models("llama"), technique="lora", formatter="chatml", output_dir=tmp_path / "out",
                      num_train_epochs=10, learning_rate=1e-2, target_modules="all-linear", r=16, progress=False)
    before = trainer.generate("what is 1 plus 2?", max_new_tokens=10)
    trainer.fit(qa_rows)
    after = trainer.generate("what is 1 plus 2?", max_new_tokens=10)
    assert before != after
    assert "plus" in after  # it learnt the answers' shape
    raw = trainer.generate("what is", raw=True, max_new_tokens=3)
    assert isinstance(raw, str)


def test_current_model_is_the_base_before_fit_and_the_trained_model_after(tiny_models, tmp_path, qa_rows):
    from finetune_sdk.models.inference import FineTunedModel, LoadedModel

    trainer = Trainer(tiny_models("llama"), technique="lora", formatter="chatml", output_dir=tmp_path / "out",
                      max_steps=1, progress=False)
    base = trainer.current_model()
    assert isinstance(base, LoadedModel) and FineTunedModel is LoadedModel  # the older name still works
    assert not any("lora_" in name for name, _ in base.model.named_parameters())
    trainer.fit(qa_rows)
    assert trainer.current_model() is base  # the same loaded model, now holding the trained adapter
    assert any("lora_" in name for name, _ in base.model.named_parameters())


def test_formatter_is_picked_from_columns_and_said(tiny_models, tmp_path, caplog):
    trainer = Trainer(tiny_models("llama"), output_dir=tmp_path / "out", num_train_epochs=1, progress=False)
    caplog.set_level("INFO", logger="finetune_sdk")
    import logging

    logging.getLogger("finetune_sdk").propagate = True
    result = trainer.fit([{"instruction": "say hi", "output": "hi"}] * 4)
    assert result.manifest["formatter"] == "alpaca"
    assert "formatter: 'alpaca', picked from the columns instruction, output" in caplog.text


def test_a_loaded_model_object_with_its_tokenizer(tmp_path, qa_rows):
    from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", tok)
    result = Trainer((model, tok), technique="lora", formatter="chatml", output_dir=tmp_path / "out",
                     num_train_epochs=1, progress=False).fit(qa_rows)
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert result.manifest["base_model"]["kind"] == "object"
