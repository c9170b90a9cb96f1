"""Issue 22, kind 2: gradient accumulation gives the bigger batch's losses and weights for every objective.

Batch ``k*b`` and batch ``b`` with ``gradient_accumulation_steps=k`` on the same rows train alike (float32,
dropout off, same seed): every batch-level statistic (a mean's normaliser, KTO's KL reference point, GRPO's sampled
groups, their advantages and the loss's normaliser) is the optimizer step's. The contract
(:class:`finetune_sdk.testing.ObjectiveContract`) runs over every registered objective."""

from __future__ import annotations

import pytest
import torch

from finetune_sdk import Trainer
from finetune_sdk.objectives import registered_objectives
from finetune_sdk.testing.objective_contract import BUILTIN_CASES, ObjectiveContract, assert_same_training

#: test_kto's rows: 16 desirable then 16 undesirable answers to "what is a plus b?".
KTO_TRAIN = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}.", "label": True}
             for a in range(4) for b in range(4)] + \
            [{"prompt": f"what is {a} plus {b}?", "completion": f"I do not know {a} {b}.", "label": False}
             for a in range(4) for b in range(4)]
KTO_SETTINGS = dict(technique="lora", formatter="kto", learning_rate=2e-2, target_modules="all-linear", r=16,
                    lora_dropout=0.0, beta=0.5, dtype="float32", logging_steps=1, save_steps=0, progress=False,
                    seed=0)


def test_every_registered_objective_has_a_contract_case():
    assert set(registered_objectives()) == {name.split("/")[0] for name in BUILTIN_CASES}


@pytest.mark.parametrize("case", sorted(BUILTIN_CASES))
def test_accumulation_equals_the_bigger_batch_for_every_objective(case, tiny_models, tmp_path):
    contract = type("Contract", (ObjectiveContract,), {"name": case})()
    contract.test_accumulation_equals_bigger_batch(tiny_models("llama"), tmp_path)


#: Every registered objective (not the variants): the rest of the contract. Resume and reference-after-SFT train
#: several runs each: slow, except for the objectives without another test of resuming (orpo, simpo).
OBJECTIVE_NAMES = sorted({name.split("/")[0] for name in BUILTIN_CASES})
QUICK_RESUME = ("orpo", "simpo")


def contract_for(name):
    return type("Contract", (ObjectiveContract,), {"name": name})()


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK_RESUME else pytest.mark.slow)
                                  for n in OBJECTIVE_NAMES])
def test_resume_ends_with_the_uninterrupted_weights_for_every_objective(name, tiny_models, tmp_path, monkeypatch):
    contract_for(name).test_resume_ends_with_the_uninterrupted_weights(tiny_models("llama"), tmp_path, monkeypatch)


@pytest.mark.parametrize("name", ["dpo", pytest.param("kto", marks=pytest.mark.slow)])
def test_reference_after_sft_is_the_sft_result_for_objectives_with_a_reference(name, tiny_models, tmp_path):
    contract_for(name).test_reference_after_sft_is_the_sft_result(tiny_models("llama"), tmp_path)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_bad_input_is_one_line_for_every_objective(name, tiny_models, tmp_path, monkeypatch):
    contract_for(name).test_bad_input_is_one_line_before_loading(tiny_models("llama"), tmp_path, monkeypatch)


@pytest.mark.parametrize("batch, accumulation", [(1, 4), (2, 2)])
def test_kto_reference_point_is_the_steps_not_the_micro_batchs(tiny_models, tmp_path, batch, accumulation):
    """The issue's input: KTO at batch 4 against 1 x 4 and 2 x 2 on the same rows. Before the fix the KL reference
    point was clamped per micro-batch (mean of max(0, .) instead of max(0, mean)): kto_kl and the losses parted
    from the step where z0 left 0, and the adapters ended percents apart."""
    bigger = Trainer(tiny_models("llama"), output_dir=tmp_path / "big", per_device_train_batch_size=4,
                     max_steps=8, **KTO_SETTINGS).fit(KTO_TRAIN)
    accumulated = Trainer(tiny_models("llama"), output_dir=tmp_path / "acc", per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accumulation, max_steps=8, **KTO_SETTINGS).fit(KTO_TRAIN)
    assert sum(entry["kto_kl"] > 0.01 for entry in bigger.log_history if "kto_kl" in entry) >= 2  # z0 left 0
    # AdamW (the default) and z0 a small difference of large summed log-probs (~ -40 nats): float32 rounding
    # reaches 1e-4 relative after a few steps; the fault this catches was 15-20% (adapters) and 30% (losses)
    seen = assert_same_training(bigger, accumulated, rtol=2e-3, atol=1e-5)
    print(f"KTO {batch} x {accumulation}: largest relative difference {seen['logs']:.2e} in the logs, "
          f"{seen['weights']:.2e} in the weights")


def test_kto_reference_point_clamps_the_mean_over_the_step():
    from finetune_sdk.objectives.kto_training import kl_reference_point, kto_loss

    # two micro-batches: one with mismatched log-ratios of +2, one with -2: the step's z0 is max(0, 0) = 0
    assert float(kl_reference_point(torch.tensor([2.0, -2.0]))) == 0.0
    zero, desirable = torch.zeros(2), torch.tensor([True, False])
    _, _, kl = kto_loss(zero, zero, torch.tensor([3.0, 1.0]), zero, desirable, 0.1)
    assert float(kl) == 2.0


def test_a_steps_groups_are_cut_into_micro_batches_without_straddling():
    from finetune_sdk.objectives.grpo_training import SampledGroup, ScoredGroup
    from finetune_sdk.objectives.grpo_loss import group_advantages, split_rows

    rewards = torch.arange(12, dtype=torch.float32) % 5
    advantages, std = group_advantages(rewards, 4)
    ids = torch.arange(12).unsqueeze(1)
    scored = ScoredGroup(SampledGroup(ids, torch.ones_like(ids), ids + 100, torch.ones_like(ids),
                                      [str(i) for i in range(12)]), rewards.unsqueeze(1), rewards, advantages, std,
                         ["r"])
    first, second = split_rows(scored, [8, 4], 4)
    assert first.group.texts == [str(i) for i in range(8)] and second.group.texts == ["8", "9", "10", "11"]
    assert torch.equal(torch.cat([first.advantages, second.advantages]), advantages)
    assert torch.equal(first.group_std, std[:2]) and torch.equal(second.group_std, std[2:])
    assert second.group.completion_ids.tolist() == [[108], [109], [110], [111]]


def test_grpo_samples_and_scores_a_whole_optimizer_step_at_once(tiny_models, tmp_path):
    """TRL's generation batch: the reward functions see every completion of a step at once (b x k x G), so the
    groups, their advantages and the logged statistics are those of the bigger batch."""
    calls = []

    def length_reward(prompts, completions, **columns):
        calls.append(list(prompts))
        return [len(c) / 10 for c in completions]

    rows = [{"prompt": f"name a colour like {w}"} for w in ("red", "blue", "green", "cyan", "pink")]
    Trainer(tiny_models("llama"), technique="lora", formatter="prompt", output_dir=tmp_path / "o",
            reward_funcs=[length_reward], num_generations=2, max_completion_length=3, max_length=48,
            per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1, save_steps=0,
            progress=False).fit(rows)
    assert [len(prompts) for prompts in calls] == [8, 2]  # steps of 4 + 1 prompts, 2 completions each
    for prompts in calls:
        assert all(prompts[i] == prompts[i + 1] for i in range(0, len(prompts), 2))  # a group sits together
