"""The classifier trains its head on cached backbone features: same head as running the backbone every epoch."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.models.classifier_model import ClassifierModel
from finetune_sdk.data.encoding import Encoded
from finetune_sdk.training.feature_cache import compute_features
from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

ROWS = [{"text": f"the {w} is {c}", "label": "warm" if c in ("red", "yellow") else "cold"}
        for w in ("cat", "dog", "bird", "fish") for c in ("red", "blue", "yellow", "green")]


def train(model_dir, out, **options):
    return Trainer(model_dir, technique="classifier", output_dir=out, num_train_epochs=5, learning_rate=3e-2,
                   per_device_train_batch_size=4, progress=False, seed=0, **options).fit(ROWS, eval_data=ROWS[:6])


def test_cached_features_train_the_same_head_and_are_reused(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_SDK_CACHE", str(tmp_path / "cache"))  # other tests may have cached these rows
    for family in ("llama", "bert"):
        cached = train(tiny_models(family), tmp_path / f"{family}-cached")
        direct = train(tiny_models(family), tmp_path / f"{family}-direct", cache_features=False)
        a = load_file(str(cached.output_dir / "classifier_head.safetensors"))
        b = load_file(str(direct.output_dir / "classifier_head.safetensors"))
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5), (family, key, (a[key] - b[key]).abs().max())
        for metric in ("eval_loss", "accuracy", "macro_f1"):  # cached: from the eval features, no backbone run
            assert abs(cached.metrics[metric] - direct.metrics[metric]) < 1e-5, metric
        reloaded = finetune_sdk.load(cached.output_dir).evaluate(ROWS[:6])
        assert abs(reloaded["eval_loss"] - cached.metrics["eval_loss"]) < 1e-5
        assert cached.metrics["features_cached"] is False and "feature_seconds" not in direct.metrics
        again = train(tiny_models(family), tmp_path / f"{family}-again")
        assert again.metrics["features_cached"] is True  # same model, pooling and data: read from disk


def test_features_batched_by_length_come_back_in_order():
    tok = tiny_tokenizer()
    model = ClassifierModel(tiny_model("llama", tok).model, num_labels=2, pooling="mean",
                            pad_token_id=tok.pad_token_id)
    examples = [{"input_ids": list(range(5, 5 + n)), "labels": 0} for n in (9, 2, 14, 5, 3, 11, 7)]
    batched = compute_features(model, Encoded(examples=examples), tok.pad_token_id, batch_size=3)
    one_by_one = compute_features(model, Encoded(examples=examples), tok.pad_token_id, batch_size=1)
    assert batched.shape == (7, model.head.in_features)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
