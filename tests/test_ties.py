"""Ties are ties: a score does not depend on the batch or row a text sits in, and a margin within float tolerance is
a tie, counted on its own and never as correct (reward model, DPO's reward accuracy, comparison reports, the reward
function contract)."""

from __future__ import annotations

import pytest
import torch

from finetune_sdk.models.pairwise import TIE_RTOL, each_distinct, is_tie, pairwise_counts

PROMPTS = ["what is 2 plus 2?", "name a colour", "a", "what is the capital of the country to the north?"]
ANSWERS = ["4", "blue, like the sky on a clear day", "", "it is a very long answer " * 6]


@pytest.fixture(scope="module")
def reward_model():
    """An untrained tiny reward model (a random head on a tiny Llama) with the preference formatter."""
    import transformers

    from finetune_sdk.formatter import REWARD
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.plugin_manager import get_plugin_host
    from finetune_sdk.models.reward_model import RewardModel
    from finetune_sdk.testing.tiny import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    backbone = transformers.LlamaModel(tiny_config("llama", tokenizer))
    model = RewardModel(backbone, pooling="last", pad_token_id=tokenizer.pad_token_id)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return LoadedModel(model, tokenizer, task=REWARD, formatter=get_plugin_host().create("formatter", "preference"),
                       options={"max_length": 128})


@pytest.fixture(scope="module")
def causal_model():
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.plugin_manager import get_plugin_host
    from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return LoadedModel(tiny_model("llama", tokenizer), tokenizer, task="causal-lm",
                       formatter=get_plugin_host().create("formatter", "preference"), options={"max_length": 128})


def identical_pairs() -> list[dict[str, str]]:
    return [{"prompt": p, "chosen": a, "rejected": a} for p in PROMPTS for a in ANSWERS[:2]]


def test_tie_tolerance_and_counts_exact():
    assert TIE_RTOL == 1e-5
    assert is_tie(6e-8, 0.4, 0.4) and is_tie(-6e-8, 0.4, 0.4) and is_tie(0.0)
    assert is_tie(1e-5) and not is_tie(1.1e-5)  # below |scores| of 1 the tolerance is absolute
    assert is_tie(4.9e-4, 50.0) and not is_tie(5.1e-4, 50.0)  # relative above
    assert not is_tie(float("nan"), 1.0)
    assert pairwise_counts([0.5, 6e-8, -6e-8, -0.2, 0.0], [(1, 0.5), (0.4,), (0.4,), (0.2,), ()]) == (1, 3, 1)
    calls = []
    assert each_distinct(["a", "bb", "a"], lambda x: calls.append(x) or len(x)) == [1, 2, 1] and calls == ["a", "bb"]


def test_pairwise_metrics_count_float_noise_as_ties_never_as_correct():
    from finetune_sdk.models.reward_model import pairwise_metrics

    chosen = torch.tensor([0.41] * 8)
    rejected = chosen + torch.tensor([6e-8, -6e-8] * 4)  # the margins the batched scoring produced
    metrics = pairwise_metrics(chosen, rejected)
    assert metrics["pairwise_accuracy"] == 0.0 and metrics["pairwise_ties"] == 8
    metrics = pairwise_metrics(torch.tensor([2.0, 1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.5 + 1e-7, 1.0]))
    assert metrics["pairwise_accuracy"] == 0.25 and metrics["pairwise_ties"] == 2


def test_a_reward_does_not_depend_on_the_batch_or_row_exactly(reward_model):
    alone = [reward_model.score([p], [a])[0] for p in PROMPTS for a in ANSWERS]
    prompts = [p for p in PROMPTS for _ in ANSWERS]
    answers = ANSWERS * len(PROMPTS)
    assert reward_model.score(prompts, answers) == alone  # exactly: each text computed alone
    shuffled = list(reversed(range(len(prompts))))
    assert reward_model.score([prompts[i] for i in shuffled], [answers[i] for i in shuffled], batch_size=3) == \
        [alone[i] for i in shuffled]
    texts = ["a short text", "a much longer text " * 8]
    assert reward_model.predict(texts) == [reward_model.predict(t) for t in texts]
    assert len(set(alone)) > 1  # the rewards do differ between texts


def test_the_old_batched_scoring_moved_rewards_with_the_batch(reward_model):
    """What the fix removes: the same text in padded batches of different company got different rewards."""
    from finetune_sdk.data.encoding import Collator

    model, tok = reward_model.model, reward_model.tokenizer
    short = tok("what is 2 plus 2? 4")["input_ids"]
    long = tok("what is the capital of the country to the north? it is a very long answer " * 3)["input_ids"]
    collate = Collator(tok.pad_token_id)
    with torch.no_grad():
        batched = model.rewards(**{k: v for k, v in collate([{"input_ids": short, "labels": 0},
                                                            {"input_ids": long, "labels": 0}]).items()
                                   if k != "labels"})[0]
        single = model.rewards(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))[0]
    assert float(batched) != float(single) and is_tie(float(batched - single), float(single))


def test_identical_pairs_are_all_ties_in_evaluate(reward_model):
    metrics = reward_model.evaluate(identical_pairs())
    assert metrics["pairwise_ties"] == 8 and metrics["pairwise_accuracy"] == 0.0
    assert metrics["reward_margin"] == 0.0 and metrics["eval_rows_scored"] == 8


def test_mixed_pairs_count_correct_ties_and_wrong(reward_model):
    rows = identical_pairs()[:3] + [{"prompt": "name a colour", "chosen": ANSWERS[1], "rejected": ANSWERS[3]},
                                    {"prompt": "name a colour", "chosen": ANSWERS[3], "rejected": ANSWERS[1]}]
    metrics = reward_model.evaluate(rows)
    assert metrics["pairwise_ties"] == 3 and metrics["pairwise_accuracy"] == pytest.approx(1 / 5)


def test_dpo_reward_accuracy_counts_identical_pairs_as_ties(causal_model):
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.objectives.dpo_training import evaluate_preference, precompute_reference
    from finetune_sdk.data.pairs import encode_preference

    model, tok = causal_model.model, causal_model.tokenizer
    encoded = encode_preference(load_rows(identical_pairs()), causal_model.formatter, tok, {"max_length": 128})
    precompute_reference(model, encoded, tok.pad_token_id, 8, batch_invariant=True)
    with torch.no_grad():  # the policy moves away from its reference
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    metrics = evaluate_preference(model, encoded, tok.pad_token_id, beta=0.1)
    assert metrics["reward_ties"] == 8 and metrics["reward_accuracy"] == 0.0
    assert metrics["reward_margin"] == 0.0 and metrics["logp_margin"] == 0.0
    assert metrics["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-12)


def test_comparison_report_shows_ties_without_a_better_or_worse_mark():
    from rich.console import Console

    from finetune_sdk.evaluation.report import better, metric_comparison_table

    assert not better("pairwise_ties", 8, 0) and not better("reward_ties", 0, 8)
    console = Console(record=True, width=120, color_system=None)
    console.print(metric_comparison_table({"pairwise_accuracy": 0.5, "pairwise_ties": 2},
                                          {"pairwise_accuracy": 0.75, "pairwise_ties": 0}))
    line = next(l for l in console.export_text().splitlines() if "pairwise_ties" in l)
    assert "✓" not in line and "✗" not in line


def test_the_reward_contract_refuses_a_function_whose_score_depends_on_the_batch(install):
    from tests.test_plugins import FakeEntryPoint, plugin_module

    from finetune_sdk.testing import RewardFunctionContract

    def steady(prompts, completions, **columns):
        """Length of each completion."""
        return [float(len(c)) for c in completions]

    def batch_dependent(prompts, completions, **columns):
        """Length minus a share of the batch's longest completion (as padding noise would)."""
        longest = max(len(c) for c in completions)
        return [float(len(c)) + 1e-3 * longest for c in completions]

    install(FakeEntryPoint("rewards", lambda: plugin_module(
        "finetune_sdk_rewards", register_reward_functions=lambda register: (register(steady),
                                                                             register(batch_dependent)))))

    class Steady(RewardFunctionContract):
        name = "steady"

    class BatchDependent(RewardFunctionContract):
        name = "batch_dependent"

    Steady().test_a_score_does_not_depend_on_the_batch_or_row()
    with pytest.raises(AssertionError, match="batch_dependent: .* alone but .* in a batch"):
        BatchDependent().test_a_score_does_not_depend_on_the_batch_or_row()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["frozen", "lora"])
def test_a_trained_reward_model_reports_ties_in_its_final_metrics_and_after_loading(tiny_models, tmp_path, backbone):
    import finetune_sdk
    from finetune_sdk import Trainer

    train = [{"prompt": f"q{i}", "chosen": f"yes indeed {i}", "rejected": f"no {i}"} for i in range(8)]
    held = identical_pairs()[:4] + [{"prompt": "q9", "chosen": "yes indeed 9", "rejected": "no 9"}]
    options = {"r": 4} if backbone == "lora" else {}
    result = Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", backbone=backbone,
                     max_steps=2, per_device_train_batch_size=4, save_steps=0, progress=False,
                     output_dir=tmp_path / backbone, **options).fit(train, eval_data=held)
    assert result.metrics["pairwise_ties"] == 4 and result.metrics["pairwise_accuracy"] <= 1 / 5
    again = finetune_sdk.load(tmp_path / backbone).evaluate(held)
    assert {k: again[k] for k in ("pairwise_ties", "pairwise_accuracy", "reward_margin")} == \
        {k: result.metrics[k] for k in ("pairwise_ties", "pairwise_accuracy", "reward_margin")}
