"""Issue 11, kind 2: DPO's reference is the policy as it stands when DPO starts (every technique).

The issue's input: a DPO stage with ``learning_rate=0`` after an SFT stage, a policy that never moves."""

from __future__ import annotations

import math

import pytest

from finetune_sdk import Stage, Trainer

SFT = [{"instruction": f"what is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
       for a in range(4) for b in range(4)]
PAIRS = [{"prompt": f"what is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": f"I do not know {a} {b}."} for a in range(3) for b in range(3)]
HELD_OUT = [{"prompt": f"what is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
             "rejected": f"no idea {a}."} for a, b in [(4, 1), (5, 2), (1, 5)]]


@pytest.mark.parametrize("technique", ["lora", "full", pytest.param("qlora", marks=pytest.mark.slow)])
def test_dpo_after_sft_with_a_policy_that_never_moves_has_margin_zero_and_loss_log2(tiny_models, tmp_path,
                                                                                    technique):
    # one SFT epoch (4 steps) moves the policy far from the base (checked below); the DPO stage at learning rate 0
    # needs no second epoch: its reference must equal the policy on every step, and 2 steps x 4 pairs show it
    trainer = Trainer(tiny_models("llama"), technique=technique, output_dir=tmp_path / "run", progress=False,
                      learning_rate=2e-2 if technique != "full" else 3e-3, num_train_epochs=1, save_steps=0,
                      **({"target_modules": "all-linear"} if technique != "full" else {}))
    result = trainer.fit([Stage(SFT, formatter="alpaca"),
                          Stage(PAIRS, formatter="preference", eval_data=HELD_OUT, learning_rate=0, max_steps=2)])
    sft, dpo = result.stages
    assert sft.metrics["train_loss"] > 0 and dpo.manifest["objective"] == "dpo"
    assert dpo.metrics["train_steps"] == 2
    assert dpo.metrics["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # held-out pairs, evaluated after training
    assert dpo.metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo.metrics["reward_accuracy"] == 0.0 and dpo.metrics["logp_margin"] != 0.0
