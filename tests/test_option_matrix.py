"""Issue 11, kind 6: every documented option works with every technique (or is refused before the model loads)."""

from __future__ import annotations

import math

import pytest

from finetune_sdk import Task, Trainer

CLS = [{"text": f"the {w} is here", "label": c}
       for w, c in [("red", "colour"), ("cat", "animal"), ("blue", "colour"), ("dog", "animal"),
                    ("fish", "animal"), ("green", "colour"), ("bird", "animal"), ("yellow", "colour")]]
CAUSAL = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
          for a in range(3) for b in range(3)]
PAIRS = [{"prompt": f"what is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.", "rejected": "no idea."}
         for a in range(2) for b in range(4)]


def run(model, tmp_path, name, rows, **options):
    options = {"save_steps": 0, **options}
    trainer = Trainer(model, output_dir=tmp_path / name, max_steps=3, logging_steps=1, progress=False, seed=0,
                      **options)
    return trainer.fit(rows)


def losses(result):
    return [e["loss"] for e in result.log_history if "loss" in e]


@pytest.mark.parametrize("cache_features", [True, False])
def test_classifier_with_gradient_checkpointing_trains_as_without(tiny_models, tmp_path, cache_features):
    options = dict(technique="classifier", learning_rate=2e-2, cache_features=cache_features)
    plain = run(tiny_models("llama"), tmp_path, "plain", CLS, **options)
    checkpointed = run(tiny_models("llama"), tmp_path, "gc", CLS, gradient_checkpointing=True, **options)
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    assert checkpointed.metrics["train_steps"] == 3


@pytest.mark.parametrize("technique,rows,options", [
    ("classifier", CLS, {"learning_rate": 2e-2}),
    ("classifier", CLS, {"learning_rate": 2e-2, "cache_features": False}),
    ("lora", PAIRS, {"formatter": "preference", "learning_rate": 1e-2}),
    ("reward-model", PAIRS, {"formatter": "preference", "learning_rate": 2e-2}),
    ("reward-model", PAIRS, {"formatter": "preference", "backbone": "lora", "lora_dropout": 0.0}),
])
def test_gradient_accumulation_means_the_same_as_a_bigger_batch(tiny_models, tmp_path, technique, rows, options):
    """Found while checking kind 6: the classifier's head and the DPO loss were not divided by the accumulation
    steps, so train_loss (and the gradient) doubled with gradient_accumulation_steps=2."""
    big = run(tiny_models("llama"), tmp_path, "big", rows, technique=technique, per_device_train_batch_size=4,
              **options)
    accumulated = run(tiny_models("llama"), tmp_path, "acc", rows, technique=technique,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, **options)
    assert accumulated.metrics["train_loss"] == pytest.approx(big.metrics["train_loss"], rel=1e-3)
    assert losses(accumulated) == pytest.approx(losses(big), rel=1e-3)


def test_an_8bit_optimizer_trains_and_checkpoints(tiny_models, tmp_path):
    """Found while checking kind 6: bitsandbytes' 8-bit optimizers keep a nested state dict the checkpoint writer
    could not store (``optim`` is documented with ``paged_adamw_8bit`` as an example)."""
    result = run(tiny_models("llama"), tmp_path, "o", CAUSAL, formatter="chatml", optim="adamw_bnb_8bit",
                 save_steps=1)
    assert result.metrics["train_steps"] == 3 and math.isfinite(result.metrics["train_loss"])


def test_multi_task_and_dpo_with_gradient_checkpointing_and_no_packing(tiny_models, tmp_path):
    tasks = [Task("a", CAUSAL, formatter="chatml", eval_data=CAUSAL[:2]),
             Task("b", [{"instruction": r["prompt"], "output": r["completion"]} for r in CAUSAL], formatter="alpaca")]
    plain = run(tiny_models("llama"), tmp_path, "mt", tasks, packing=False, group_by_length=False)
    gc = run(tiny_models("llama"), tmp_path, "mt-gc", tasks, gradient_checkpointing=True, packing=False,
             group_by_length=False)
    assert losses(gc) == pytest.approx(losses(plain), rel=1e-4) and "eval_a_loss" in gc.metrics
    dpo = run(tiny_models("llama"), tmp_path, "dpo", PAIRS, formatter="preference", gradient_checkpointing=True,
              packing=False)
    assert dpo.manifest["objective"] == "dpo" and math.isfinite(dpo.metrics["train_loss"])
