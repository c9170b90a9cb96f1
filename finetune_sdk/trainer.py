"""``Trainer``: fine-tune a pretrained model with a technique, a quantizer and a formatter, in one call."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetune_sdk.data import Rows, load_rows
from finetune_sdk.data_checks import check_answers, check_classes, check_pairs
from finetune_sdk.errors import ConfigError, DataError
from finetune_sdk.formatter import CLASSIFICATION, Formatter
from finetune_sdk.log import ensure_handler
from finetune_sdk.manifest import FORMAT_VERSION, library_versions, scrub
from finetune_sdk.models import ModelSource, resolve_source
from finetune_sdk.options import TRAINING_OPTIONS, option_table, resolve_options
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.result import FitResult
from finetune_sdk.workflows import Stage, Task, is_stage_list, is_task_list

NO_QUANTIZER = ("none", "")


class Trainer:
    """Fine-tune ``model`` with a technique plugin; everything is checked before any model is loaded.

    Args:
        model: a local Hugging Face model folder, a Hub id, a ``.gguf`` file, or a loaded transformers model
            (pass its ``tokenizer=``, or give ``(model, tokenizer)``).
        technique: ``"lora"``, ``"qlora"``, ``"full"``, ``"classifier"`` or a plugin's technique.
        quantizer: ``None`` for the technique's default (qlora: ``"nf4"``), ``"none"``, ``"nf4"``, ``"int8"`` or a
            plugin's quantizer.
        formatter: how rows become text (``"llama2-chat"``, ``"alpaca"``, ``"chatml"``, ``"chat-template"``,
            ``"text"``, ``"classification"``...); ``None`` picks one from the data's columns and says which.
        output_dir: where the result goes (default ``finetune-runs/<model>-<technique>-<time>``).
        publish_as: publish each result to the registry under this name; a later ``fit`` of the same Trainer
            publishes the next version with the previous one as its parent.
        registry: the :class:`~finetune_sdk.registry.Registry` to publish to (default ``Registry()``).
        **options: technique, quantizer and training options (``r``, ``lora_alpha``, ``num_train_epochs``,
            ``learning_rate``, ``max_length``...). An unknown name is an error that suggests the closest.

    Example:
        >>> from finetune_sdk import Trainer
        >>> trainer = Trainer("path/to/model", technique="qlora", formatter="llama2-chat")  # doctest: +SKIP
        >>> result = trainer.fit("train.jsonl", eval_data="eval.jsonl")  # doctest: +SKIP
        >>> trainer.generate(["What is our refund policy?"])  # doctest: +SKIP
    """

    def __init__(self, model: Any, technique: str = "lora", quantizer: str | None = None,
                 formatter: str | None = None, output_dir: str | os.PathLike[str] | None = None, *,
                 tokenizer: Any = None, progress: bool = True, publish_as: str | None = None,
                 registry: Any = None, **options: Any) -> None:
        host = get_plugin_host()
        self.host = host
        self.technique = host.create("technique", technique)
        quantizer_name = self.technique.default_quantizer if quantizer is None else quantizer
        if quantizer_name in NO_QUANTIZER:
            quantizer_name = None
        self.quantizer = host.create("quantizer", quantizer_name) if quantizer_name else None
        if not self.technique.accepts_quantizer(self.quantizer):
            raise ConfigError(_incompatible(self.technique.name, quantizer_name))
        self.formatter: Formatter | None = host.create("formatter", formatter) if formatter else None
        if self.formatter is not None and not compatible(self.formatter.task, self.technique.task):
            raise ConfigError(
                f"formatter {formatter!r} makes {self.formatter.task} data but technique {technique!r} trains "
                f"{self.technique.task}; pick a matching formatter")
        self.options = resolve_options(options, self._option_specs())
        self._option_names = set(options)
        if self.options["learning_rate"] is None:
            self.options["learning_rate"] = self.technique.default_learning_rate
        self._check_precision()
        self.source, self._given_model, self._tokenizer = _model_source(model, tokenizer, self.options["revision"])
        self.output_dir = Path(output_dir) if output_dir else _default_output_dir(self.source, technique)
        if output_dir is not None:
            self._check_output_dir(probe=False)
        self.progress = progress
        self.publish_as = publish_as
        if publish_as is not None:
            from finetune_sdk.registry.refs import validate_name

            validate_name(publish_as)
        self.registry = registry
        self.published: list[Any] = []
        self._session: Any = None
        self._log_history: list[dict[str, Any]] = []
        self.logger = ensure_handler()

    # -- public API ----------------------------------------------------------------------------------------
    def fit(self, train_data: Any, eval_data: Any = None, *, resume: bool = False) -> FitResult:
        """Train and save the result; returns a :class:`FitResult`. The result folder appears atomically.

        ``train_data`` is a path (.jsonl, .json, .csv, .parquet), a list of dicts or a ``datasets.Dataset``; or a
        list of :class:`~finetune_sdk.workflows.Stage` (sequential fine-tuning: stages train in order, continuing
        the same adapter, each saved to ``output_dir/stage-<i>``); or a list of
        :class:`~finetune_sdk.workflows.Task` (multi-task: datasets mixed by ``task_mixing``, per-task eval
        metrics). A ``preference`` formatter trains with DPO.

        Every ``save_steps`` steps (500 by default; 0 turns it off) a checkpoint is written atomically to
        ``<output_dir>.checkpoints/``; ``resume=True`` continues from the newest complete one (damaged ones are
        skipped with a warning) and ends with the weights an uninterrupted run would have.

        Example:
            >>> from finetune_sdk.testing.tiny import save_tiny_model
            >>> import tempfile, pathlib
            >>> tmp = pathlib.Path(tempfile.mkdtemp())
            >>> rows = [{"prompt": "2+2?", "completion": "4"}] * 4
            >>> result = Trainer(save_tiny_model(tmp / "m"), formatter="chatml", output_dir=tmp / "out",
            ...                  max_steps=2, progress=False).fit(rows)
            >>> (result.output_dir / "adapter_model.safetensors").is_file(), result.metrics["train_steps"]
            (True, 2)
        """
        from finetune_sdk.log import known_dependency_warnings

        with known_dependency_warnings():  # the first import of transformers' Trainer imports PEFT and bitsandbytes
            from finetune_sdk.training import run_training

        if is_stage_list(train_data):
            return self._fit_stages(list(train_data))
        self._check_output_dir(train_data, eval_data)
        if not is_task_list(train_data):  # bad files are named before any tokenizer or model loads
            train_data = load_rows(train_data, name="train_data")
            eval_data = load_rows(eval_data, name="eval_data") if eval_data is not None else None
        tokenizer = self._load_tokenizer()
        if is_task_list(train_data):
            plan = self._plan_tasks(list(train_data), tokenizer)
        else:
            plan = self._plan_single(train_data, eval_data, tokenizer)
        plan.resume = resume
        if self._session is None and self._given_model is None:
            self._check_memory(plan)
        result = run_training(self, plan, tokenizer)
        self._log_history = result.log_history
        if self.publish_as:
            parent = self.published[-1].ref if self.published else None
            result.publish(self.publish_as, registry=self.registry, parent=parent)
            self.published.append(result.version)
            self.logger.info("published %s", result.version.ref)
        return result

    def fit_federated(self, clients: Any, *, rounds: int = 3, strategy: str = "fedavg", resume: bool = False,
                      **settings: Any) -> FitResult:
        """Federated fine-tuning on Flower: each client trains on its own data, only trainable parameters travel.

        Runs a Flower SuperLink and one SuperNode per client as local processes on loopback; each client's rows
        are read only by its own process. Returns a :class:`FitResult` whose folder is an ordinary result
        (``finetune_sdk.load`` reads it), with per-round history, traffic and privacy in ``manifest["federated"]``.
        Needs ``pip install 'finetune-sdk[federated]'``; see docs/federated.md.

        Args:
            clients: ``{name: data}``, where data is a file, a list of dicts, or ``{"train": ..., "eval": ...}``
                (the eval rows give each client's held-out loss every round).
            rounds: federated rounds.
            strategy: ``"fedavg"``, ``"fedprox"`` or a plugin's strategy.
            resume: continue after the last completed round of an interrupted run with the same ``output_dir``.
            **settings: :class:`~finetune_sdk.federated.FederatedSettings` fields: ``fraction_fit``,
                ``min_fit_clients``, ``local_epochs``, ``local_steps``, ``proximal_mu``, ``round_timeout``, ``dp``,
                ``noise_multiplier``, ``clipping_norm``, ``target_delta``...

        Raises:
            ConfigError: an unknown setting, strategy or client name, or Flower not installed.
            FinetuneError: a round where fewer than ``min_fit_clients`` clients reported.

        Example:
            >>> trainer = Trainer("models/my-llama", technique="qlora", output_dir="runs/fed")  # doctest: +SKIP
            >>> result = trainer.fit_federated({"clinic-a": "a.jsonl", "clinic-b": "b.jsonl"}, rounds=5,
            ...                                strategy="fedavg", fraction_fit=1.0, local_epochs=1)  # doctest: +SKIP
            >>> result.metrics["bytes_total"], result.manifest["federated"]["history"][-1]["clients"]  # doctest: +SKIP
        """
        from finetune_sdk.federated.api import fit_federated

        return fit_federated(self, clients, rounds=rounds, strategy=strategy, resume=resume, **settings)

    def compare(self, eval_data: Any, prompts: Any = None, *, max_new_tokens: int = 64,
                report_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Base model vs the current (fine-tuned) model on ``eval_data`` and side-by-side generations.

        Returns the report (metrics of both, generations, loss curves); with ``report_dir`` also writes
        ``comparison.json`` and a self-contained ``comparison.html`` there.
        """
        from finetune_sdk.compare import compare_models

        rows = load_rows(eval_data, name="eval_data")
        session = self.session()
        self._pick_formatter(rows, session.tokenizer)
        session.formatter = self.formatter
        info = {"technique": self.technique.name, "base_model": self.source.id, "output_dir": str(self.output_dir)}
        return compare_models(session, self._base_session, rows, prompts, max_new_tokens=max_new_tokens,
                              log_history=self.log_history, info=info, report_dir=report_dir)

    def _base_session(self) -> Any:
        """The untrained starting point as a FineTunedModel (a fresh load; used when no adapter can be disabled)."""
        base = Trainer(self._given_model if self._given_model is not None else self.source.id,
                       technique=self.technique.name, quantizer=self.quantizer.name if self.quantizer else "none",
                       formatter=self.formatter.name if self.formatter else None, tokenizer=self._tokenizer,
                       progress=False, **{k: v for k, v in self.options.items() if k in self._option_names})
        return base.session()

    # -- building training plans -----------------------------------------------------------------------------
    def _plan_single(self, train_data: Any, eval_data: Any, tokenizer: Any) -> Any:
        from finetune_sdk.preference import PREFERENCE
        from finetune_sdk.training import EvalSet, TrainingPlan, encode

        train_rows = load_rows(train_data, name="train_data")
        eval_rows = load_rows(eval_data, name="eval_data") if eval_data is not None else None
        formatter = self._pick_formatter(train_rows, tokenizer)
        if self.technique.task == CLASSIFICATION and formatter.task == PREFERENCE:
            train_rows, formatter = reward_rows(train_rows, formatter), self.host.create("formatter", "classification")
            eval_rows = reward_rows(eval_rows, self.formatter) if eval_rows is not None else None
        if self.technique.task == CLASSIFICATION:
            self.options["labels"] = self._labels(train_rows, formatter)
        elif formatter.task != PREFERENCE:
            check_answers(train_rows.rows, train_rows.source)
        train = encode(self, train_rows, formatter, tokenizer)
        if self.technique.task == CLASSIFICATION:
            check_classes([ex["labels"] for ex in train.examples], self.options["labels"], train_rows.source)
        elif formatter.task == PREFERENCE:
            check_pairs(train.examples, train_rows.source)
        evals = {"": EvalSet(eval_rows, formatter, encode(self, eval_rows, formatter, tokenizer))} if eval_rows else {}
        if self._session is not None and formatter.task != PREFERENCE:
            self._session.formatter = formatter
        dataset = {"fingerprint": train_rows.fingerprint, "rows": len(train_rows), "source": train_rows.source,
                   "eval_fingerprint": eval_rows.fingerprint if eval_rows else None}
        objective = "dpo" if formatter.task == PREFERENCE and self.technique.task != CLASSIFICATION else "sft"
        return TrainingPlan(train, formatter.name, objective, evals, dataset)

    def _plan_tasks(self, tasks: list[Task], tokenizer: Any) -> Any:
        import hashlib

        from finetune_sdk.encoding import Encoded
        from finetune_sdk.training import EvalSet, TrainingPlan, encode
        from finetune_sdk.workflows import mix, mixing_probabilities

        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}")
        encoded, formatters, fingerprints, evals = {}, {}, {}, {}
        for task in tasks:
            validate_task_name(task.name)
            rows = load_rows(task.data, name=f"task {task.name}")
            formatter = self.host.create("formatter", task.formatter) if task.formatter else self.host.create(
                "formatter", detect_formatter(rows.columns, tokenizer, self.technique.task, self.host))
            if formatter.task != self.technique.task:
                raise ConfigError(f"task {task.name!r}: formatter {formatter.name!r} makes {formatter.task} data; "
                                  "multi-task mixing takes supervised or text formatters")
            check_answers(rows.rows, rows.source)
            encoded[task.name] = encode(self, rows, formatter, tokenizer)
            formatters[task.name], fingerprints[task.name] = formatter, rows.fingerprint
            if task.eval_data is not None:
                eval_rows = load_rows(task.eval_data, name=f"task {task.name} eval_data")
                evals[task.name] = EvalSet(eval_rows, formatter, encode(self, eval_rows, formatter, tokenizer))
        sizes = {name: len(e.examples) for name, e in encoded.items()}
        probabilities = mixing_probabilities(sizes, {t.name: t.weight for t in tasks}, self.options["task_mixing"],
                                             self.options["mixing_temperature"])
        mixture, counts = mix({n: e.examples for n, e in encoded.items()}, probabilities, sum(sizes.values()),
                              self.options["seed"])
        self.logger.info("multi-task mixture (%s): %s", self.options["task_mixing"],
                         ", ".join(f"{n} p={probabilities[n]:.3f} ({counts[n]} examples)" for n in names))
        train = Encoded(examples=mixture, tokens=sum(len(e["input_ids"]) for e in mixture),
                        dropped=sum(e.dropped for e in encoded.values()))
        first = formatters[names[0]]
        self.formatter = first
        if self._session is not None:
            self._session.formatter = first
        fingerprint = hashlib.sha256("".join(fingerprints[n] for n in names).encode()).hexdigest()
        dataset = {"fingerprint": "sha256:" + fingerprint, "rows": len(mixture), "source": "multi-task",
                   "tasks": {n: {"fingerprint": fingerprints[n], "rows": sizes[n], "formatter": formatters[n].name,
                                 "probability": probabilities[n], "sampled": counts[n]} for n in names}}
        extra = {"task_examples": counts, "task_probabilities": probabilities}
        return TrainingPlan(train, first.name, "sft", evals, dataset, extra)

    def _fit_stages(self, stages: list[Stage]) -> FitResult:
        from finetune_sdk.output_paths import check_stages_folder

        check_stages_folder(self.output_dir, len(stages))
        for i, stage in enumerate(stages, start=1):
            self._check_output_dir(stage.data, stage.eval_data, output_dir=self.output_dir / f"stage-{i}")
        specs = self._option_specs()
        overrides = []
        for i, stage in enumerate(stages, start=1):
            try:
                overrides.append({k: specs[k].coerce(v) for k, v in resolve_options(stage.options, specs).items()
                                  if k in stage.options})
            except ConfigError as exc:
                raise ConfigError(f"stage {i}: {exc}") from None
            if stage.formatter:
                self.host.create("formatter", stage.formatter)
        saved = (dict(self.options), self.formatter, self.output_dir)
        results: list[FitResult] = []
        try:
            for i, (stage, override) in enumerate(zip(stages, overrides), start=1):
                self.options = {**saved[0], **override}
                self.formatter = self.host.create("formatter", stage.formatter) if stage.formatter else saved[1]
                self.output_dir = saved[2] / f"stage-{i}"
                self.logger.info("stage %d of %d%s", i, len(stages), f" ({stage.name})" if stage.name else "")
                results.append(self.fit(stage.data, stage.eval_data))
        finally:
            self.options, _, self.output_dir = saved
        final = results[-1]
        final.stages = results
        return final

    def generate(self, prompts: Any, **kwargs: Any) -> Any:
        """Generate answers with the current model (the base before :meth:`fit`, the fine-tuned one after).

        Each prompt is wrapped as the formatter wraps training prompts; ``raw=True`` sends it as is.
        """
        return self.session().generate(prompts, **kwargs)

    def predict(self, texts: Any, **kwargs: Any) -> Any:
        """Predict labels with the classifier (before :meth:`fit` the head is untrained)."""
        return self.session().predict(texts, **kwargs)

    def evaluate(self, data: Any, **kwargs: Any) -> dict[str, float]:
        """Loss (and perplexity, or accuracy and macro-F1 for the classifier) of the current model on ``data``."""
        rows = load_rows(data, name="eval_data")
        if self._session is None and self.technique.task == CLASSIFICATION and not self.options["labels"]:
            self.options["labels"] = self._labels(rows, self._pick_formatter(rows, self._load_tokenizer()))
        session = self.session()
        self._pick_formatter(rows, session.tokenizer)  # the data's columns decide, as in fit()
        return session.evaluate(rows, **kwargs)

    # -- model and tokenizer -------------------------------------------------------------------------------
    def session(self) -> Any:
        """The current model as a :class:`~finetune_sdk.inference.FineTunedModel` (loads the base on first use)."""
        if self._session is None:
            from finetune_sdk.inference import FineTunedModel
            from finetune_sdk.models import load_model, resolve_dtype

            tokenizer = self._load_tokenizer()
            if self._given_model is not None:
                model = self._given_model
            else:
                quantization = self.quantizer.quantization_config(self.options) if self.quantizer else None
                model = load_model(
                    self.source, self.technique.task, dtype=resolve_dtype(self.options["dtype"], self._all_weights),
                    quantization_config=quantization, trust_remote_code=self.options["trust_remote_code"])
                if self.quantizer:
                    self.quantizer.after_load(model)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            if self.technique.task == CLASSIFICATION:
                from transformers import set_seed

                labels = self.options["labels"] or [str(i) for i in range(self.options["num_labels"] or 2)]
                set_seed(self.options["seed"])  # the new head's initialisation
                model = self.technique.prepare(model, {**self.options, "labels": labels}, tokenizer)
            formatter = self.formatter or self._default_generation_formatter(tokenizer)
            self._session = FineTunedModel(model, tokenizer, task=self.technique.task, formatter=formatter,
                                           options=self.options, labels=getattr(model, "labels", None))
        return self._session

    def _check_memory(self, plan: Any) -> None:
        """Log the training-memory estimate and stop early, with settings that would fit, when it can't fit."""
        from finetune_sdk.memory import preflight

        longest = max((len(ex.get("input_ids", ())) for ex in plan.train.examples), default=0)
        seq_len = min(self.options["max_length"], longest) if longest else self.options["max_length"]
        model = self.source.path or self.source.id
        estimate = preflight(model, self.technique.name, self.quantizer.name if self.quantizer else None,
                             self.options, seq_len=seq_len)
        if estimate is not None:
            self.logger.info("estimated training memory: %s", estimate)

    def _check_output_dir(self, *data: Any, output_dir: Path | None = None, probe: bool = True) -> None:
        """Refuse an output path that would overwrite something this SDK did not write, or an input."""
        from finetune_sdk.output_paths import check_output_path

        base = {"local": self.source.path, "gguf": self.source.id}.get(self.source.kind)
        inputs: list[tuple[str, Any]] = [("base model", base)]
        for item in data:
            for task in item if is_task_list(item) else [item]:
                for path in (getattr(task, "data", task), getattr(task, "eval_data", None)):
                    if isinstance(path, (str, os.PathLike)):
                        inputs.append(("data file", path))
        check_output_path(output_dir or self.output_dir, inputs=inputs, probe=probe)

    def _option_specs(self) -> dict[str, Any]:
        return option_table([TRAINING_OPTIONS, self.technique.options,
                             self.quantizer.options if self.quantizer else ()])

    @property
    def log_history(self) -> list[dict[str, Any]]:
        """The training log of the last ``fit`` (empty before)."""
        return list(self._log_history)

    @property
    def _all_weights(self) -> bool:
        return bool(getattr(self.technique, "result_is_model", False))

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from finetune_sdk.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.source, trust_remote_code=self.options["trust_remote_code"])
        return self._tokenizer

    def _default_generation_formatter(self, tokenizer: Any) -> Formatter | None:
        if self.technique.task != CLASSIFICATION and getattr(tokenizer, "chat_template", None):
            return self.host.create("formatter", "chat-template")
        return None

    # -- data ------------------------------------------------------------------------------------------------
    def _pick_formatter(self, rows: Rows, tokenizer: Any) -> Formatter:
        if self.formatter is not None:
            return self.formatter
        name = detect_formatter(rows.columns, tokenizer, self.technique.task, self.host)
        self.logger.info("formatter: %r, picked from the columns %s of %s", name, ", ".join(rows.columns),
                         rows.source)
        self.formatter = self.host.create("formatter", name)
        if self._session is not None:
            self._session.formatter = self.formatter
        return self.formatter

    def _labels(self, rows: Rows, formatter: Formatter) -> list[str]:
        if self.options["labels"]:
            return [str(label) for label in self.options["labels"]]
        if self.options["num_labels"]:
            return [str(i) for i in range(self.options["num_labels"])]
        found = []
        for row, where in zip(rows.rows, rows.where):
            formatter.validate(row, where)
            found.append(formatter.text_and_label(row)[1])
        if all(isinstance(label, int) for label in found):
            return [str(i) for i in range(max(found) + 1)]
        return sorted({str(label) for label in found})

    def _check_precision(self) -> None:
        if self.options["bf16"] and self.options["fp16"]:
            raise ConfigError("options bf16 and fp16 are exclusive; pick one")
        if self.options["fp16"]:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("fp16 mixed precision needs a CUDA GPU; on CPU use bf16=True or neither")

    def manifest(self, plan: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """The manifest of a finished run (no credentials)."""
        from finetune_sdk.models import commit_hash, resolve_dtype

        session = self.session()
        base = self.source.to_manifest()
        base["revision"] = base["revision"] or commit_hash(getattr(session.model, "base_model", session.model))
        dtype = resolve_dtype(self.options["dtype"], self._all_weights)
        return {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "technique": self.technique.name,
            "task": self.technique.task,
            "objective": plan.objective,
            "quantizer": self.quantizer.name if self.quantizer else None,
            "formatter": plan.formatter_name,
            "options": scrub(self.options),
            "dtype": str(dtype).removeprefix("torch."),
            "base_model": base,
            "dataset": plan.dataset,
            "labels": self.options.get("labels") if self.technique.task == CLASSIFICATION else None,
            "metrics": metrics,
            "libraries": library_versions(),
        }


def compatible(formatter_task: str, technique_task: str) -> bool:
    """A formatter's data fits a technique: same task, or preference pairs (DPO for generative techniques, a
    reward model for the classifier)."""
    return formatter_task == technique_task or formatter_task == "preference"


def reward_rows(rows: Rows, formatter: Formatter) -> Rows:
    """Preference pairs as classifier rows: prompt + chosen -> "chosen", prompt + rejected -> "rejected"."""
    out, where = [], []
    for row, place in zip(rows.rows, rows.where):
        formatter.validate(row, place)
        out += [{"text": f"{row['prompt']}\n{row['chosen']}", "label": "chosen"},
                {"text": f"{row['prompt']}\n{row['rejected']}", "label": "rejected"}]
        where += [place + " (chosen)", place + " (rejected)"]
    return Rows(out, where, rows.source)


def validate_task_name(name: str) -> None:
    from finetune_sdk.registry.refs import validate_name

    validate_name(name, "task name")


def detect_formatter(columns: list[str], tokenizer: Any, task: str, host: Any) -> str:
    """Pick a formatter from a dataset's columns.

    ``prompt``+``chosen``+``rejected`` -> ``preference``; ``messages`` or ``prompt``+``completion`` ->
    ``chat-template`` when the tokenizer has a chat template, else ``chatml``; ``instruction``+``output`` ->
    ``alpaca``; ``text``+``label`` -> ``classification``; ``text`` -> ``text``; otherwise the first plugin formatter
    that accepts the columns.
    """
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "preference"
    if task == CLASSIFICATION:
        if {"text", "label"} <= cols:
            return "classification"
    elif "messages" in cols or {"prompt", "completion"} <= cols:
        return "chat-template" if getattr(tokenizer, "chat_template", None) else "chatml"
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


def _incompatible(technique: str, quantizer: str | None) -> str:
    if technique == "full" and quantizer:
        return (f"technique 'full' can't train a {quantizer}-quantized model (quantized weights have no gradients);"
                " use 'lora' or 'qlora' on a quantized base, or drop the quantizer")
    if quantizer is None:
        return f"technique {technique!r} needs a quantized base; pass quantizer='nf4' or use technique='lora'"
    return f"technique {technique!r} can't train on a base quantized with {quantizer!r}"


def _model_source(model: Any, tokenizer: Any, revision: str | None) -> tuple[ModelSource, Any, Any]:
    if isinstance(model, (str, os.PathLike)):
        return resolve_source(model, revision), None, tokenizer
    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    if tokenizer is None:
        raise ConfigError("a model passed in already loaded needs its tokenizer: Trainer(model, tokenizer=...)")
    from finetune_sdk.models import ensure_pad_token

    name = getattr(model, "name_or_path", "") or ""
    if name and Path(name).is_dir():
        source = ModelSource("local", str(Path(name).resolve()), str(Path(name).resolve()))
    else:
        source = ModelSource("object", name or type(model).__name__)
    return source, model, ensure_pad_token(tokenizer)


def _default_output_dir(source: ModelSource, technique: str) -> Path:
    stem = Path(source.id).name.removesuffix(".gguf") or "model"
    return Path("finetune-runs") / f"{stem}-{technique}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def work_dir_beside(output_dir: Path) -> Path:
    """A scratch folder next to ``output_dir`` for transformers' own files while training (removed after the run;
    one left by a killed process is removed by the next run)."""
    from finetune_sdk.output_paths import scratch_dir

    return scratch_dir(output_dir, "work")
