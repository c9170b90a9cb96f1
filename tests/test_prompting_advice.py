"""advise(..., eval_data=...): when prompting already does the job, when the data is too small, when to fine-tune."""

from __future__ import annotations

import json

import pytest

ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(4) for b in range(4)]
MANY = [{"prompt": f"name the colour number {i}", "completion": f"colour {i} is blue."} for i in range(120)]


@pytest.fixture(scope="module")
def knows_the_task(tmp_path_factory):
    """A tiny model trained (full fine-tuning) until it answers ROWS: a base that already does the task."""
    from finetune_sdk import Trainer
    from finetune_sdk.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("knows")
    base = save_tiny_model(root / "base")
    return Trainer(str(base), technique="full", formatter="chatml", output_dir=root / "out", num_train_epochs=40,
                   learning_rate=3e-3, progress=False, seed=0).fit(ROWS).output_dir


@pytest.mark.slow
def test_a_base_that_already_answers_is_told_to_prompt(knows_the_task):
    from finetune_sdk import advise

    advice = advise(str(knows_the_task), eval_data=ROWS[:8], data=ROWS, shots=2, eval_budget_s=120)
    scores = advice.prompting
    assert scores.verdict == "prompt", scores.as_dict()
    assert max(scores.exact_match.values()) >= 0.8 and scores.rows_scored == 8
    first = advice.reasons[0]
    assert first.startswith("prompting already does the job: the base model answered")
    assert f"{scores.exact_match[0]:.0%} of 8 held-out rows exactly zero-shot" in first
    assert f"(answer loss {scores.loss[0]:.3f})" in first


def test_a_base_that_cannot_is_told_to_fine_tune_or_that_the_data_is_too_small(llama_dir):
    from finetune_sdk import advise

    advice = advise(str(llama_dir), eval_data=ROWS[:3], data=MANY, shots=2, eval_budget_s=120)
    scores = advice.prompting
    assert scores.verdict == "fine-tune" and scores.exact_match == {0: 0.0, 2: 0.0}
    assert scores.loss[0] > 3 and scores.training_rows == 120
    assert advice.reasons[0].startswith("fine-tune on the 120 training rows: prompting falls short (the base model "
                                        "answered 0% of 3 held-out rows exactly zero-shot")
    small = advise(str(llama_dir), eval_data=ROWS[:3], data=ROWS[:10], shots=2, eval_budget_s=120).prompting
    assert small.verdict == "too-little-data"
    assert small.advice[0].startswith("too little data for fine-tuning to pay: 10 training rows (fewer than 100)")
    assert json.loads(json.dumps(small.as_dict()))["verdict"] == "too-little-data"


def test_the_time_budget_is_kept_and_stated(llama_dir):
    from finetune_sdk.advice.prompting import score_prompting
    from finetune_sdk.trainer import Trainer

    loaded = Trainer(str(llama_dir), formatter="chatml", progress=False).current_model()
    scores = score_prompting(loaded, ROWS[:6], shots=2, budget_s=0.001)
    assert scores.rows_scored == 1 and scores.rows_held_out == 6 and scores.training_rows is None
    assert "5 rows left out to keep it" in scores.advice[0] and "budget 0 s" in scores.advice[0]


def test_advise_eval_on_the_command_line(llama_dir, tmp_path):
    from click.testing import CliRunner

    from finetune_sdk.cli.main import cli

    held_out, train = tmp_path / "held.jsonl", tmp_path / "train.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))
    out = CliRunner().invoke(cli, ["advise", str(llama_dir), "--eval", str(held_out), "--data", str(train),
                                   "--shots", "2", "--json"])
    assert out.exit_code == 0, out.output
    advice = json.loads(out.output)
    assert advice["prompting"]["verdict"] == "too-little-data" and advice["prompting"]["rows_scored"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    out = CliRunner().invoke(cli, ["advise", str(llama_dir), "--eval", str(bad)])
    assert out.exit_code == 2 and "the advice scores prompt/completion rows" in out.output
