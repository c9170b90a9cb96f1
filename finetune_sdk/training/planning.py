"""Planning: rows in, an encoded :class:`TrainingPlan` out, without touching a model.

Everything that decides what a run trains on lives here: the formatter picked from the columns, the classifier's
labels, preference pairs turned into reward rows, the multi-task mixture, the objective (see
:mod:`finetune_sdk.objectives`) and the encoding. The run engine (:mod:`finetune_sdk.training.engine`) takes the plan.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any, TYPE_CHECKING

from finetune_sdk.data.rows import Rows, load_rows
from finetune_sdk.data.encoding import Encoded
from finetune_sdk.errors import ConfigError, DataError
from finetune_sdk.formatter import CAUSAL_LM, CLASSIFICATION, KTO, PREFERENCE, PROMPT, REWARD, Formatter
from finetune_sdk.objectives import objective_for, run_options
from finetune_sdk.training.plan import EvalSet, TrainingPlan
from finetune_sdk.training.stages_and_tasks import Task, is_task_list, mix, mixing_probabilities

if TYPE_CHECKING:
    from finetune_sdk.plugin_manager import PluginHost

logger = logging.getLogger("finetune_sdk")


class Planner:
    """Builds :class:`TrainingPlan` s for one technique and its options (the options are not changed)."""

    def __init__(self, host: PluginHost, technique_task: str, options: Mapping[str, Any], *, strict: bool = True) -> None:
        self.host = host
        self.task = technique_task
        self.options = options
        #: False in a stage of fit([Stage, ...]): options of other objectives are left out, not refused.
        self.strict = strict

    def pick_formatter(self, rows: Rows, tokenizer: Any) -> Formatter:
        """The formatter the columns of ``rows`` call for (logged, since the user did not name one)."""
        name = detect_formatter(rows.columns, tokenizer, self.task, self.host)
        logger.info("formatter: %r, picked from the columns %s of %s", name, ", ".join(rows.columns), rows.source)
        return self.host.create("formatter", name)

    def plan(self, train_data: Any, eval_data: Any, tokenizer: Any, formatter: Formatter | None) -> TrainingPlan:
        """The plan for one dataset (and an optional held-out one), or for a list of :class:`Task` (mixed; see
        :meth:`plan_tasks`); ``formatter=None`` picks one from the columns."""
        if is_task_list(train_data):
            return self.plan_tasks(list(train_data), tokenizer)
        train_rows = load_rows(train_data, name="train_data")
        eval_rows = load_rows(eval_data, name="eval_data") if eval_data is not None else None
        picked = formatter or self.pick_formatter(train_rows, tokenizer)
        used = picked
        if self.task == REWARD and picked.task != PREFERENCE:
            raise DataError(f"{train_rows.source}: a reward model trains on preference pairs (columns prompt, "
                            f"chosen, rejected), but formatter {picked.name!r} reads {picked.task} rows; give "
                            "pairs with formatter='preference'")
        if self.task == CLASSIFICATION and picked.task == PREFERENCE:  # pointwise: each answer classified alone
            logger.info("classifier on preference pairs: chosen and rejected answers are classified one by one; "
                        "technique 'reward-model' trains a pairwise (Bradley-Terry) reward model instead")
            train_rows, used = reward_rows(train_rows, picked), self.host.create("formatter", "classification")
            eval_rows = reward_rows(eval_rows, picked) if eval_rows is not None else None
        labels = labels_for(train_rows, used, self.options) if self.task == CLASSIFICATION else None
        options = {**self.options, "labels": labels} if labels is not None else self.options
        objective = objective_for(used.task, self.task, options.get("objective"), self.host)
        options = run_options(objective, options, self.host, strict=self.strict)  # its own resolved
        objective.check_options(options, self.host)
        objective.check_rows(train_rows)
        train = objective.encode(train_rows, used, tokenizer, options)
        objective.check_encoded(train, options, train_rows.source)
        evals = {"": EvalSet(eval_rows, used, objective.encode(eval_rows, used, tokenizer, options))} \
            if eval_rows else {}
        dataset = {"fingerprint": train_rows.fingerprint, "rows": len(train_rows), "source": train_rows.source,
                   "eval_fingerprint": eval_rows.fingerprint if eval_rows else None}
        current_model_formatter = used if used.task not in (PREFERENCE, KTO) else \
            (picked if formatter is None else None)
        return TrainingPlan(train, used.name, objective.name, evals, dataset, formatter=picked,
                            current_model_formatter=current_model_formatter, labels=labels, options=options)

    def plan_tasks(self, tasks: list[Task], tokenizer: Any) -> TrainingPlan:
        """The plan for multi-task training: each task encoded, then mixed by ``task_mixing``."""
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}")
        encoded, formatters, fingerprints, evals, options = {}, {}, {}, {}, dict(self.options)
        for task in tasks:
            validate_task_name(task.name)
            rows = load_rows(task.data, name=f"task {task.name}")
            formatter = self.host.create("formatter", task.formatter) if task.formatter else self.host.create(
                "formatter", detect_formatter(rows.columns, tokenizer, self.task, self.host))
            if formatter.task != self.task:
                raise ConfigError(f"task {task.name!r}: formatter {formatter.name!r} makes {formatter.task} data; "
                                  "multi-task mixing takes supervised or text formatters")
            objective = objective_for(formatter.task, self.task, self.options.get("objective"), self.host)
            options = run_options(objective, self.options, self.host, strict=self.strict)
            objective.check_rows(rows)
            encoded[task.name] = objective.encode(rows, formatter, tokenizer, options)
            formatters[task.name], fingerprints[task.name] = formatter, rows.fingerprint
            if task.eval_data is not None:
                eval_rows = load_rows(task.eval_data, name=f"task {task.name} eval_data")
                evals[task.name] = EvalSet(eval_rows, formatter,
                                           objective.encode(eval_rows, formatter, tokenizer, options))
        sizes = {name: len(e.examples) for name, e in encoded.items()}
        probabilities = mixing_probabilities(sizes, {t.name: t.weight for t in tasks}, self.options["task_mixing"],
                                             self.options["mixing_temperature"])
        mixture, counts = mix({n: e.examples for n, e in encoded.items()}, probabilities, sum(sizes.values()),
                              self.options["seed"])
        logger.info("multi-task mixture (%s): %s", self.options["task_mixing"],
                    ", ".join(f"{n} p={probabilities[n]:.3f} ({counts[n]} examples)" for n in names))
        train = Encoded(examples=mixture, tokens=sum(len(e["input_ids"]) for e in mixture),
                        dropped=sum(e.dropped for e in encoded.values()))
        first = formatters[names[0]]
        fingerprint = hashlib.sha256("".join(fingerprints[n] for n in names).encode()).hexdigest()
        dataset = {"fingerprint": "sha256:" + fingerprint, "rows": len(mixture), "source": "multi-task",
                   "tasks": {n: {"fingerprint": fingerprints[n], "rows": sizes[n], "formatter": formatters[n].name,
                                 "probability": probabilities[n], "sampled": counts[n]} for n in names}}
        extra = {"task_examples": counts, "task_probabilities": probabilities}
        return TrainingPlan(train, first.name, objective.name, evals, dataset, extra, formatter=first,
                            current_model_formatter=first, options=options)


def labels_for(rows: Rows, formatter: Formatter, options: Mapping[str, Any]) -> list[str]:
    """The classifier's labels: the ``labels`` option, ``num_labels`` numbered ones, or those the rows use, in the
    order of :func:`finetune_sdk.data.labels.label_order` (integer and integer-looking labels numerically, the same from
    every file format; others sorted)."""
    from finetune_sdk.data.labels import label_order

    if options["labels"]:
        return [str(label) for label in options["labels"]]
    if options["num_labels"]:
        return [str(i) for i in range(options["num_labels"])]
    found = []
    for row, where in zip(rows.rows, rows.where):
        formatter.validate(row, where)
        found.append(formatter.text_and_label(row)[1])
    return label_order(found)


def formatter_fits(formatter_task: str, technique_task: str) -> bool:
    """A formatter's data fits a technique: same task, preference pairs (DPO for generative techniques, a
    pairwise reward model for ``reward-model``, pointwise chosen/rejected rows for the classifier), KTO rows
    (generative techniques) or prompts for a generative technique (GRPO)."""
    return formatter_task in (technique_task, PREFERENCE) or (formatter_task in (KTO, PROMPT) and
                                                              technique_task == CAUSAL_LM)


def reward_rows(rows: Rows, formatter: Formatter) -> Rows:
    """Preference pairs as classifier rows: prompt + chosen -> "chosen", prompt + rejected -> "rejected" (the
    classifier's pointwise view of pairs; the ``reward-model`` technique compares the two answers instead). Tie and
    both-bad pairs are skipped (:func:`finetune_sdk.data.pairs.ranked_pairs`)."""
    from finetune_sdk.data.pairs import ranked_pairs

    rows = ranked_pairs(rows)
    out, where = [], []
    for row, place in zip(rows.rows, rows.where):
        formatter.validate(row, place)
        out += [{"text": f"{row['prompt']}\n{row['chosen']}", "label": "chosen"},
                {"text": f"{row['prompt']}\n{row['rejected']}", "label": "rejected"}]
        where += [place + " (chosen)", place + " (rejected)"]
    return Rows(out, where, rows.source)


def validate_task_name(name: str) -> None:
    """A task name is used in metric names and folders: the registry's name rules apply."""
    from finetune_sdk.registry.refs import validate_name

    validate_name(name, "task name")


def detect_formatter(columns: list[str], tokenizer: Any, task: str, host: PluginHost) -> str:
    """Pick a formatter from a dataset's columns.

    ``prompt``+``chosen``+``rejected`` -> ``preference``; ``prompt``+``completion``+``label`` -> ``kto`` (generative
    techniques); ``messages`` or ``prompt``+``completion`` ->
    ``chat-template`` when the tokenizer has a chat template, else ``chatml``; ``prompt`` without an answer column
    -> ``prompt`` (GRPO); ``instruction``+``output`` ->
    ``alpaca``; ``text``+``label`` -> ``classification``; ``text`` -> ``text``; otherwise the first plugin formatter
    that accepts the columns.
    """
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "preference"
    if task == CAUSAL_LM and {"prompt", "completion", "label"} <= cols:
        return "kto"
    if task == CLASSIFICATION:
        if {"text", "label"} <= cols:
            return "classification"
    elif "messages" in cols or {"prompt", "completion"} <= cols:
        return "chat-template" if getattr(tokenizer, "chat_template", None) else "chatml"
    elif "prompt" in cols and not cols & {"completion", "label", "text", "output"}:
        return "prompt"
    elif {"instruction", "output"} <= cols:
        return "alpaca"
    elif "text" in cols:
        return "text"
    for name in host.names("formatter"):
        formatter = host.create("formatter", name)
        if formatter.task == task and formatter.accepts(columns):
            return name
    raise DataError(
        f"can't tell which formatter fits the columns {', '.join(columns) or '(none)'}; pass formatter= (one of "
        f"{', '.join(host.names('formatter'))}) or rename the columns")
