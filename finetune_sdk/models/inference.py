"""Generation, prediction and evaluation on a model: shared by ``Trainer`` and ``finetune_sdk.load``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_sdk.speed.chunked_loss import summed_causal_lm_loss
from finetune_sdk.data.rows import load_rows
from finetune_sdk.data.encoding import Collator, encode_causal, encode_classification, encode_plain, encode_segments
from finetune_sdk.errors import ConfigError
from finetune_sdk.formatter import CLASSIFICATION, HEAD_TASKS, REWARD, Formatter, Segment, few_shot_segments
from finetune_sdk.models.sampling import chat_generation_config, only_these_settings, settings_summary
from finetune_sdk.models.scoring import require_rows, scored_rows
from finetune_sdk.models.stop_tokens import stop_token_ids


class LoadedModel:
    """A loaded model (base or fine-tuned) with its tokenizer and formatter, ready to generate, predict and
    evaluate.

    ``finetune_sdk.load(...)`` returns one holding a fine-tuned result; ``Trainer.current_model()`` returns the
    base model before ``fit`` and the fine-tuned one after. ``FineTunedModel`` is the same class under its older
    name.

    Example:
        >>> import finetune_sdk
        >>> model = finetune_sdk.load("outputs/support-bot")  # doctest: +SKIP
        >>> model.generate(["How do I reset my password?"])  # doctest: +SKIP
    """

    def __init__(self, model: Any, tokenizer: Any, *, task: str, formatter: Formatter | None,
                 options: Mapping[str, Any], labels: Sequence[str] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.formatter = formatter
        self.options = dict(options)
        self.labels = list(labels) if labels is not None else None

    # -- generation ----------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, raw: bool = False,
                   examples: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of ``prompt`` wrapped as the formatter wraps a training prompt: the prompt is plain text, a
        special-token string in it is never a control token. With ``raw=True`` (or no formatter) the text is sent
        as is, special-token strings included, for callers who write the template themselves. ``examples``
        ((question, answer) pairs) go ahead of it as earlier turns of the conversation in the formatter's format
        (:func:`finetune_sdk.formatter.few_shot_segments`), or as plain text (``question\\nanswer``, a blank line
        apart) with no formatter."""
        if examples and not raw and self.formatter is not None:
            segments = few_shot_segments(self.formatter, list(examples), prompt, self.tokenizer, self.options)
        elif examples and not raw:
            segments = [Segment("\n\n".join([*(f"{q}\n{a}" for q, a in examples), prompt]), literal=True)]
        elif raw:
            segments = [Segment(prompt)]
        elif self.formatter is None:
            segments = [Segment(prompt, literal=True)]
        else:
            segments = self.formatter.prompt_segments(prompt, self.tokenizer, self.options)
        return encode_segments(segments, self.tokenizer, None)["input_ids"]

    def stop_ids(self) -> list[int]:
        """The token ids :meth:`generate` stops at: the model's ``generation_config.eos_token_id`` (an int or a list),
        the tokenizer's EOS and the formatter's end of turn (:func:`finetune_sdk.models.stop_tokens.stop_token_ids`)."""
        return stop_token_ids(self.tokenizer, self.model, self.formatter)

    def generation_config(self, *, max_new_tokens: int = 64, do_sample: bool = False,
                          **generate_kwargs: Any) -> Any:
        """The complete ``transformers.GenerationConfig`` :meth:`generate` uses with these arguments: the model's own
        generation config (its chat defaults) under the call's settings, the SDK's stop ids and ``max_new_tokens``
        winning (:func:`finetune_sdk.models.sampling.chat_generation_config`)."""
        return chat_generation_config(self.model, stop_ids=self.stop_ids(), pad_token_id=self.tokenizer.pad_token_id,
                                      max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)[0]

    def generation_settings(self, *, max_new_tokens: int = 64, do_sample: bool = False,
                            **generate_kwargs: Any) -> dict[str, Any]:
        """The settings that shape the answers :meth:`generate` gives with these arguments, as a JSON-ready dict
        (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``..., ``stop_token_ids``; the
        sampling ones only when sampling): what a rating session records with its ratings.

        Example:
            >>> model.generation_settings(do_sample=True, temperature=0.8)["top_k"]  # doctest: +SKIP
            50
        """
        return settings_summary(self.generation_config(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                       **generate_kwargs))

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 64, raw: bool = False,
                 do_sample: bool = False, batch_size: int = 8, examples: Sequence[tuple[str, str]] = (),
                 **generate_kwargs: Any) -> Any:
        """Generate an answer per prompt; returns a list (or one string when given one string).

        Greedy by default (deterministic); pass ``do_sample=True, temperature=...`` to sample. The model's own
        ``generation_config`` (its authors' chat defaults, e.g. a ``repetition_penalty``; ``top_k``/``top_p`` when
        sampling) applies under the call's keyword arguments, as in transformers; the answer stops at the model's end
        of turn (:meth:`stop_ids`) and after ``max_new_tokens`` whatever the model's file says
        (:meth:`generation_config`, :meth:`generation_settings`). Progress (new tokens of each batch) is reported
        through :func:`finetune_sdk.progress.activity`. ``examples`` ((question, answer) pairs) go ahead of every
        prompt as earlier turns in the model's chat format (few-shot prompting; see :meth:`prompt_ids`).
        """
        from finetune_sdk.progress import activity

        self._require(generative=True)
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"generate: {name} must be a whole number of at least 1, got {value!r}")
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        batches = [prompts[start:start + batch_size] for start in range(0, len(prompts), batch_size)]
        count = f"{len(prompts)} answer{'s' * (len(prompts) != 1)}"
        answers: list[str] = []
        self.model.eval()
        with activity(f"generating {count}", total=len(batches) * max_new_tokens, unit="tokens") as step:
            for number, batch in enumerate(batches):
                kwargs = dict(generate_kwargs)
                if kwargs.get("num_beams", 1) == 1 and "streamer" not in kwargs:  # beam search takes no streamer
                    kwargs["streamer"] = _StepCounter(step, number * max_new_tokens, max_new_tokens)
                answers += self._generate_batch(batch, raw=raw, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                examples=examples, **kwargs)
                step.update((number + 1) * max_new_tokens)
        return answers[0] if single else answers

    def _generate_batch(self, prompts: list[str], *, raw: bool, max_new_tokens: int, do_sample: bool,
                        examples: Sequence[tuple[str, str]] = (), **generate_kwargs: Any) -> list[str]:
        import torch

        tok = self.tokenizer
        encoded = [self.prompt_ids(p, raw, examples) for p in prompts]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(encoded):  # left padding for generation
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        device = _device_of(self.model)
        config, other = chat_generation_config(self.model, stop_ids=self.stop_ids(), pad_token_id=tok.pad_token_id,
                                               max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
        with torch.no_grad(), only_these_settings(self.model, config):
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                      generation_config=config, **other)
        return [tok.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]

    # -- classification and rewards ------------------------------------------------------------------------
    def predict(self, texts: str | Sequence[str], *, return_scores: bool = False,
                batch_size: int = 32) -> Any:
        """Predict a label per text; with ``return_scores`` each item is ``{"label", "score", "scores"}``.

        A reward model returns its reward (a float, higher = better) per text instead, the text scored as it is
        (no template: give the whole exchange); ``return_scores`` does not apply. :meth:`score` renders
        (prompt, completion) pairs as training did.
        """
        import torch

        self._require(generative=False)
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if self.task == REWARD:
            from finetune_sdk.models.reward_model import sequence_rewards

            ids = [encode_plain(t, self.tokenizer, truncation=True, max_length=self.options["max_length"])["input_ids"]
                   for t in texts]
            rewards = sequence_rewards(self.model, ids, self.tokenizer.pad_token_id, batch_size)
            return rewards[0] if single else rewards
        collate = Collator(self.tokenizer.pad_token_id)
        results: list[Any] = []
        self.model.eval()
        for start in range(0, len(texts), batch_size):
            batch = [{"input_ids": encode_plain(t, self.tokenizer, truncation=True,
                                                max_length=self.options["max_length"])["input_ids"], "labels": 0}
                     for t in texts[start:start + batch_size]]
            inputs = collate(batch)
            with torch.no_grad():
                logits = self.model(input_ids=inputs["input_ids"].to(_device_of(self.model)),
                                    attention_mask=inputs["attention_mask"].to(_device_of(self.model))).logits
            probs = logits.float().softmax(-1).cpu()
            for p in probs:
                best = int(p.argmax())
                label = self.labels[best]
                results.append({"label": label, "score": float(p[best]),
                                "scores": dict(zip(self.labels, map(float, p)))} if return_scores else label)
        return results[0] if single else results

    def score(self, prompts: Sequence[str], completions: Sequence[str], *, batch_size: int = 32) -> list[float]:
        """Rewards of a reward model: one float per (prompt, completion), higher = better.

        Each pair is rendered as training rendered a pair's answer (the result's ``preference`` formatter: the chat
        template or ChatML) and cut to ``max_length`` tokens. This is the reward function signature of TRL's GRPO
        (``fn(prompts, completions) -> list[float]``), so a loaded reward model can serve as one.

        Batch-invariant: each distinct (prompt, completion) runs alone (one row, no padding), so its reward is
        bit-for-bit the same whatever else is scored with it (``score([p], [x])[0] == score([p, q], [x, y])[0]``);
        ``batch_size`` is accepted and not used (:mod:`finetune_sdk.models.pairwise`).

        Raises:
            ConfigError: not a reward model; ``prompts`` and ``completions`` not lists of strings of one length.

        Example:
            >>> judge = finetune_sdk.load("helpfulness-rm@production")  # doctest: +SKIP
            >>> judge.score(["2+2?", "2+2?"], ["4", "5"])  # doctest: +SKIP
            [1.93, -0.71]
        """
        from finetune_sdk.models.reward_model import completion_ids, sequence_rewards

        if self.task != REWARD:
            raise ConfigError(f"score() is for reward models (technique 'reward-model'); this model's task is "
                              f"{self.task}")
        if isinstance(prompts, str) or isinstance(completions, str):
            raise ConfigError("score: give lists, score([prompt], [completion]), not single strings")
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ConfigError(f"score: {len(prompts)} prompts but {len(completions)} completions; give one "
                              "completion per prompt")
        for name, items in (("prompts", prompts), ("completions", completions)):
            bad = next((i for i, item in enumerate(items) if not isinstance(item, str)), None)
            if bad is not None:
                raise ConfigError(f"score: {name}[{bad}] is {type(items[bad]).__name__}, not a string")
        if not hasattr(self.formatter, "pair_segments"):
            raise ConfigError("score() needs the preference formatter the reward model was trained with; this "
                              f"model has {getattr(self.formatter, 'name', None)!r}")
        ids = [completion_ids(self.formatter, p, c, self.tokenizer, self.options) for p, c in zip(prompts, completions)]
        return sequence_rewards(self.model, ids, self.tokenizer.pad_token_id, batch_size)

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, data: Any, *, batch_size: int = 8) -> dict[str, float]:
        """Loss over ``data`` (token-weighted for generative models, with perplexity; accuracy for classifiers;
        ``pairwise_accuracy``, ``reward_margin`` and ``mean_reward`` of the Bradley-Terry loss for reward models).

        The metrics include ``eval_rows_scored`` and ``eval_rows_skipped`` (rows whose answer is cut off entirely by
        ``max_length``); when no row is left to score a :class:`~finetune_sdk.errors.DataError` says so (a loss
        over nothing would read as a perfect 0.0).
        """
        import torch

        from finetune_sdk.progress import activity

        rows = load_rows(data, name="eval_data")
        formatter = self.formatter
        if formatter is None:
            raise ConfigError("evaluate() needs a formatter: pass formatter= to Trainer")
        if self.task == REWARD:
            from finetune_sdk.data.pairs import encode_preference
            from finetune_sdk.models.reward_model import evaluate_pairs

            return evaluate_pairs(self.model, encode_preference(rows, formatter, self.tokenizer, self.options),
                                  self.tokenizer.pad_token_id, batch_size, source=rows.source,
                                  center_rewards_coefficient=float(self.options.get("center_rewards_coefficient")
                                                                   or 0.0))
        if self.task == CLASSIFICATION:
            encoded = encode_classification(rows, formatter, self.tokenizer, self.options,
                                            {label: i for i, label in enumerate(self.labels or [])})
            why = "have no tokens to classify"
        else:
            encoded = encode_causal(rows, formatter, self.tokenizer, self.options, strict=False)
            why = f"have no answer tokens left after truncation to max_length={self.options['max_length']}"
        require_rows(len(encoded.examples), encoded.dropped, rows.source, why)
        counts = scored_rows(len(encoded.examples), encoded.dropped)
        collate = Collator(self.tokenizer.pad_token_id)
        device = _device_of(self.model)
        total_loss, count, classification_logits, golds = 0.0, 0, [], []
        self.model.eval()
        examples = encoded.examples
        with activity(f"evaluating on {len(examples)} examples", total=len(examples), unit="examples") as step:
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                if self.task == CLASSIFICATION:
                    with torch.no_grad():
                        logits = self.model(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits
                    classification_logits.append(logits.float().cpu())
                    golds += batch["labels"].tolist()
                else:  # chunked: the batch's full logits never exist at once (finetune_sdk.speed.chunked_loss)
                    batch_loss, batch_count = summed_causal_lm_loss(
                        self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                        use_chunked=self.options.get("chunked_loss", True) is not False)
                    total_loss += batch_loss
                    count += batch_count
                step.advance(len(chunk))
        if self.task == CLASSIFICATION:
            num_labels = len(self.labels or [])
            logits = torch.cat(classification_logits) if classification_logits else torch.empty(0, num_labels)
            return {**classification_metrics(logits, torch.tensor(golds, dtype=torch.long), num_labels), **counts}
        loss = total_loss / count
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), **counts}

    def _require(self, generative: bool) -> None:
        require_task(self.task, generative)


def require_task(task: str | None, generative: bool) -> None:
    """A :class:`ConfigError` when ``task`` (a manifest's) can't ``generate()`` (``generative``) or ``predict()``.

    The CLI checks a result's manifest with it before its model loads.

    >>> require_task("causal-lm", generative=True)
    """
    if generative and task == REWARD:
        raise ConfigError("generate() is for generative techniques; a reward model has score() and predict()")
    if generative and task in HEAD_TASKS:
        raise ConfigError("generate() is for generative techniques; a classifier has predict()")
    if not generative and task not in HEAD_TASKS:
        raise ConfigError("predict() is for the classifier and reward-model techniques; generative models have "
                          "generate()")


def classification_metrics(logits: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """``eval_loss`` (mean cross-entropy), ``accuracy`` and ``macro_f1`` of ``[N, num_labels]`` logits.

    >>> import torch
    >>> classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]), 2)["accuracy"]
    0.5
    """
    import torch

    count = len(labels)
    require_rows(count, 0, "eval_data", "")
    logits = logits.float()
    predicted = logits.argmax(-1)
    return {"eval_loss": float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum")) / count,
            "accuracy": int((predicted == labels).sum()) / count,
            "macro_f1": macro_f1(predicted.tolist(), labels.tolist(), num_labels)}


def macro_f1(predictions: Sequence[int], golds: Sequence[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions.

    >>> macro_f1([0, 1, 1], [0, 1, 0], 2)
    0.6666666666666666
    """
    scores = []
    for label in range(num_labels):
        tp = sum(p == g == label for p, g in zip(predictions, golds))
        fp = sum(p == label != g for p, g in zip(predictions, golds))
        fn = sum(g == label != p for p, g in zip(predictions, golds))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


#: The older name of :class:`LoadedModel`.
FineTunedModel = LoadedModel


class _StepCounter:
    """A ``generate`` streamer that moves a progress step by one per decoding step (the first call is the prompt)."""

    def __init__(self, step: Any, offset: float, limit: int) -> None:
        self.step, self.offset, self.limit, self.calls = step, offset, limit, 0

    def put(self, value: Any) -> None:
        self.calls += 1
        self.step.update(self.offset + min(max(self.calls - 1, 0), self.limit))

    def end(self) -> None:
        self.step.update(self.offset + self.limit)


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device
