"""``Trainer``: fine-tune a pretrained model with a technique, a quantizer and a formatter, in one call."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetune_sdk.data import Rows, load_rows
from finetune_sdk.errors import ConfigError, DataError
from finetune_sdk.formatter import CLASSIFICATION, Formatter
from finetune_sdk.log import ensure_handler
from finetune_sdk.manifest import FORMAT_VERSION, library_versions, scrub
from finetune_sdk.models import ModelSource, resolve_source
from finetune_sdk.options import TRAINING_OPTIONS, option_table, resolve_options
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.result import FitResult

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
        if self.formatter is not None and self.formatter.task != self.technique.task:
            raise ConfigError(
                f"formatter {formatter!r} makes {self.formatter.task} data but technique {technique!r} trains "
                f"{self.technique.task}; pick a matching formatter")
        specs = option_table([TRAINING_OPTIONS, self.technique.options,
                              self.quantizer.options if self.quantizer else ()])
        self.options = resolve_options(options, specs)
        if self.options["learning_rate"] is None:
            self.options["learning_rate"] = self.technique.default_learning_rate
        self._check_precision()
        self.source, self._given_model, self._tokenizer = _model_source(model, tokenizer, self.options["revision"])
        self.output_dir = Path(output_dir) if output_dir else _default_output_dir(self.source, technique)
        self.progress = progress
        self.publish_as = publish_as
        if publish_as is not None:
            from finetune_sdk.registry.refs import validate_name

            validate_name(publish_as)
        self.registry = registry
        self.published: list[Any] = []
        self._session: Any = None
        self.logger = ensure_handler()

    # -- public API ----------------------------------------------------------------------------------------
    def fit(self, train_data: Any, eval_data: Any = None) -> FitResult:
        """Train on ``train_data`` (path, list of dicts or ``datasets.Dataset``) and save the result.

        Returns a :class:`FitResult`; the result folder appears atomically when training has finished.
        """
        from finetune_sdk.training import run_training

        train_rows = load_rows(train_data, name="train_data")
        eval_rows = load_rows(eval_data, name="eval_data") if eval_data is not None else None
        tokenizer = self._load_tokenizer()
        formatter = self._pick_formatter(train_rows, tokenizer)
        if self.technique.task == CLASSIFICATION:
            self.options["labels"] = self._labels(train_rows, formatter)
        result = run_training(self, train_rows, eval_rows, formatter, tokenizer)
        if self.publish_as:
            parent = self.published[-1].ref if self.published else None
            result.publish(self.publish_as, registry=self.registry, parent=parent)
            self.published.append(result.version)
            self.logger.info("published %s", result.version.ref)
        return result

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
                labels = self.options["labels"] or [str(i) for i in range(self.options["num_labels"] or 2)]
                model = self.technique.prepare(model, {**self.options, "labels": labels}, tokenizer)
            formatter = self.formatter or self._default_generation_formatter(tokenizer)
            self._session = FineTunedModel(model, tokenizer, task=self.technique.task, formatter=formatter,
                                           options=self.options, labels=getattr(model, "labels", None))
        return self._session

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

    def manifest(self, formatter: Formatter, train_rows: Rows, eval_rows: Rows | None,
                 metrics: dict[str, Any]) -> dict[str, Any]:
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
            "quantizer": self.quantizer.name if self.quantizer else None,
            "formatter": formatter.name,
            "options": scrub(self.options),
            "dtype": str(dtype).removeprefix("torch."),
            "base_model": base,
            "dataset": {"fingerprint": train_rows.fingerprint, "rows": len(train_rows), "source": train_rows.source,
                        "eval_fingerprint": eval_rows.fingerprint if eval_rows else None},
            "labels": self.options.get("labels") if self.technique.task == CLASSIFICATION else None,
            "metrics": metrics,
            "libraries": library_versions(),
        }


def detect_formatter(columns: list[str], tokenizer: Any, task: str, host: Any) -> str:
    """Pick a formatter from a dataset's columns.

    ``messages`` or ``prompt``+``completion`` -> ``chat-template`` when the tokenizer has a chat template, else
    ``chatml``; ``instruction``+``output`` -> ``alpaca``; ``text``+``label`` -> ``classification``; ``text`` ->
    ``text``; otherwise the first plugin formatter that accepts the columns.
    """
    cols = set(columns)
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
    """A scratch folder next to ``output_dir`` for checkpoints while training."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.work-", dir=output_dir.parent))

