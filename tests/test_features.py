"""The classifier trains its head on cached backbone features: same head as running the backbone every epoch."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from finetune_sdk import Trainer

ROWS = [{"text": f"the {w} is {c}", "label": "warm" if c in ("red", "yellow") else "cold"}
        for w in ("cat", "dog", "bird", "fish") for c in ("red", "blue", "yellow", "green")]


def train(model_dir, out, **options):
    return Trainer(model_dir, technique="classifier", output_dir=out, num_train_epochs=5, learning_rate=3e-2,
                   per_device_train_batch_size=4, progress=False, seed=0, **options).fit(ROWS, eval_data=ROWS[:6])


def test_cached_features_train_the_same_head_and_are_reused(tiny_models, tmp_path):
    for family in ("llama", "bert"):
        cached = train(tiny_models(family), tmp_path / f"{family}-cached")
        direct = train(tiny_models(family), tmp_path / f"{family}-direct", cache_features=False)
        a = load_file(str(cached.output_dir / "classifier_head.safetensors"))
        b = load_file(str(direct.output_dir / "classifier_head.safetensors"))
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5), (family, key, (a[key] - b[key]).abs().max())
        assert abs(cached.metrics["eval_loss"] - direct.metrics["eval_loss"]) < 1e-5
        assert cached.metrics["features_cached"] is False and "feature_seconds" not in direct.metrics
        again = train(tiny_models(family), tmp_path / f"{family}-again")
        assert again.metrics["features_cached"] is True  # same model, pooling and data: read from disk
