"""When not to fine-tune: the base model scored zero-shot and few-shot on the user's held-out rows.

``advise(model, eval_data=..., data=...)`` and ``finetune advise MODEL --eval HELD_OUT [--data TRAIN]`` load the base
model, put ``k`` training rows in each prompt (in the model's chat format: earlier user/assistant turns of the
conversation, then the question, as ``finetune bench`` renders lm-eval's few-shot examples), and measure on the held-out rows the
answer's loss (mean negative log-likelihood per answer token, nats) and exact match (greedy answer against the
reference, case, punctuation and spacing ignored), within a time budget it states. The verdict, with the numbers:

* **prompt it** when few-shot (or zero-shot) exact match reaches :data:`PROMPTING_ENOUGH`: fine-tuning can add
  little; keep the examples in the prompt (or retrieve them per request when they change);
* **too little data** when there are fewer than :data:`MIN_TRAINING_ROWS` training rows: fine-tuning on so few
  rarely beats the examples in the prompt; collect more, or prompt with them (retrieval when facts keep changing);
* **fine-tune** otherwise: prompting falls short and there is data to learn from.
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

from finetune_sdk.errors import ConfigError

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel

#: Exact match from which prompting counts as doing the job (fraction of held-out rows).
PROMPTING_ENOUGH = 0.8
#: Training rows below which fine-tuning rarely pays against few-shot prompting (LIMA and the PEFT papers train on
#: ~1,000; a few hundred already move small models on narrow tasks).
MIN_TRAINING_ROWS = 100


@dataclass
class PromptingScores:
    """The base model's scores on the held-out rows, per number of examples in the prompt.

    Attributes:
        shots: numbers of examples tried (``[0, k]``).
        loss: mean answer loss per shot count (nats per answer token).
        exact_match: fraction of rows answered exactly, per shot count.
        rows_scored, rows_held_out: rows measured (within the budget) and rows given.
        training_rows: rows available for fine-tuning (``None`` when not given).
        seconds, budget_s: time taken and the budget.
        verdict: ``"prompt"``, ``"too-little-data"`` or ``"fine-tune"``; ``advice``: the sentences saying so.
    """

    shots: list[int]
    loss: dict[int, float]
    exact_match: dict[int, float]
    rows_scored: int
    rows_held_out: int
    training_rows: int | None
    seconds: float
    budget_s: float
    verdict: str = ""
    advice: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"shots": self.shots, "loss": self.loss, "exact_match": self.exact_match,
                "rows_scored": self.rows_scored, "rows_held_out": self.rows_held_out,
                "training_rows": self.training_rows, "seconds": round(self.seconds, 2), "budget_s": self.budget_s,
                "verdict": self.verdict, "advice": self.advice}


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: how exact match compares answers (as lm-eval's
    ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``)."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def _pairs(data: Any, name: str) -> list[tuple[str, str]]:
    from finetune_sdk.data.rows import load_rows

    rows = load_rows(data, name)
    out = []
    for row, where in zip(rows.rows, rows.where):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ConfigError(f"{where}: the advice scores prompt/completion rows; this row has "
                              f"{', '.join(sorted(row)) or 'no columns'}")
        out.append((row["prompt"], row["completion"]))
    return out


def check_settings(shots: Any, budget_s: Any) -> None:
    """``shots`` must be a whole number >= 1 and ``budget_s`` a number of seconds > 0 (raises :class:`ConfigError`)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ConfigError(f"shots is {shots!r}; few-shot prompting needs a whole number of at least 1 example")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ConfigError(f"eval_budget_s is {budget_s!r}; give the seconds the scoring may take (more than 0)")


def check_rows(held_out: Any, data: Any = None) -> None:
    """Read the held-out and training rows once so a bad file is one line before any model loads."""
    _pairs(held_out, "eval_data")
    if data is not None:
        _pairs(data, "data")


def answer_loss(loaded: LoadedModel, prompt: str, answer: str, examples: list[tuple[str, str]] | None = None) -> float:
    """Mean negative log-likelihood (nats per token) of ``answer`` after the formatted ``prompt`` (with
    ``examples`` as earlier turns in the model's chat format: :meth:`LoadedModel.prompt_ids`)."""
    import torch

    prompt_ids = loaded.prompt_ids(prompt, examples=examples or ())
    answer_ids = loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        logits = loaded.model(input_ids=ids.to(device)).logits.float().cpu()
    start = len(prompt_ids)
    targets = ids[0, start:]
    log_probs = torch.log_softmax(logits[0, start - 1:-1], dim=-1)
    return float(-log_probs.gather(1, targets[:, None]).mean())


def score_prompting(loaded: LoadedModel, held_out: Any, data: Any = None, *, shots: int = 3, budget_s: float = 60.0,
                    seed: int = 0) -> PromptingScores:
    """Score ``loaded`` zero-shot and ``shots``-shot on ``held_out`` rows (prompt/completion), examples drawn from
    ``data`` (the training rows) or else from the other held-out rows; stops adding rows when the next one would
    pass ``budget_s`` seconds (at least one row is scored). Returns :class:`PromptingScores` with its verdict."""
    import random

    from finetune_sdk.progress import activity

    check_settings(shots, budget_s)
    rows = _pairs(held_out, "eval_data")
    train = _pairs(data, "data") if data is not None else None
    rng = random.Random(seed)
    started = time.perf_counter()
    loss: dict[int, list[float]] = {0: [], shots: []}
    match: dict[int, list[float]] = {0: [], shots: []}
    with activity(f"scoring the base model zero-shot and {shots}-shot on {len(rows)} held-out rows "
                  f"(budget {budget_s:.0f} s)", total=len(rows), unit="rows") as step:
        for index, (question, answer) in enumerate(rows):
            elapsed = time.perf_counter() - started
            if index and elapsed / index * (index + 1) > budget_s:
                break
            pool = train if train else [r for i, r in enumerate(rows) if i != index]
            examples = rng.sample(pool, min(shots, len(pool)))
            for k, shown in ((0, []), (shots, examples)):
                loss[k].append(answer_loss(loaded, question, answer, shown))
                budget = len(loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 8
                said = loaded.generate(question, max_new_tokens=budget, examples=shown).split("\n")[0]
                match[k].append(float(normalise(said) == normalise(answer)))
            step.advance()
    scored = len(loss[0])
    result = PromptingScores(shots=[0, shots], loss={k: sum(v) / scored for k, v in loss.items()},
                             exact_match={k: sum(v) / scored for k, v in match.items()}, rows_scored=scored,
                             rows_held_out=len(rows), training_rows=len(train) if train is not None else None,
                             seconds=time.perf_counter() - started, budget_s=budget_s)
    result.verdict, result.advice = verdict(result)
    return result


def verdict(scores: PromptingScores) -> tuple[str, list[str]]:
    """``("prompt" | "too-little-data" | "fine-tune", sentences with the numbers)``."""
    k = scores.shots[-1]
    best = max(scores.exact_match.values())
    measured = (f"the base model answered {scores.exact_match[0]:.0%} of {scores.rows_scored} held-out rows exactly "
                f"zero-shot (answer loss {scores.loss[0]:.3f}) and {scores.exact_match[k]:.0%} with {k} examples in "
                f"the prompt (loss {scores.loss[k]:.3f}), measured in {scores.seconds:.1f} s (budget "
                f"{scores.budget_s:.0f} s" + (f", {scores.rows_held_out - scores.rows_scored} rows left out to keep "
                                              "it" if scores.rows_scored < scores.rows_held_out else "") + ")")
    if best >= PROMPTING_ENOUGH:
        return "prompt", [f"prompting already does the job: {measured}; fine-tuning can add little here. Put "
                          f"{k if scores.exact_match[k] >= scores.exact_match[0] else 0} examples in the prompt (or "
                          "retrieve the relevant ones per request when the facts change or differ per user)"]
    if scores.training_rows is not None and scores.training_rows < MIN_TRAINING_ROWS:
        return "too-little-data", [f"too little data for fine-tuning to pay: {scores.training_rows} training rows "
                                   f"(fewer than {MIN_TRAINING_ROWS}); {measured}. Collect more rows, or put the "
                                   "rows you have in the prompt (few-shot) or behind retrieval"]
    rows = f" on the {scores.training_rows} training rows" if scores.training_rows is not None else ""
    return "fine-tune", [f"fine-tune{rows}: prompting falls short ({measured}); re-score the fine-tuned model on "
                         "the same held-out rows (finetune eval, finetune bench) to see what it adds"]
