"""``Trainer``: the facade of fine-tuning. It checks the request before any model loads (:mod:`.training.request`),
then runs plan -> run -> save: :mod:`.training.planning` makes a frozen :class:`~.training.plan.TrainingPlan`,
:mod:`.training.engine` trains it with its objective, :func:`.training.saving.save_run` writes the result folder.
Nothing else reads or writes its private attributes. See docs/architecture.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_sdk.advice.advisor import check_run_memory
from finetune_sdk.data.rows import Rows, load_rows
from finetune_sdk.formatter import CLASSIFICATION, Formatter
from finetune_sdk.log import ensure_handler
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.speed.precision import Feed, Precision, choose_precision, estimate_options, plan_feed
from finetune_sdk.training.plan import RunSpec, TrainingPlan
from finetune_sdk.training.planning import Planner, detect_formatter, formatter_fits, reward_rows, validate_task_name
from finetune_sdk.training.request import (check_output_dir, check_precision, check_publish_name, default_output_dir,
                                           model_source, option_specs, resolve_plugins, resolve_run_options)
from finetune_sdk.training.result import FitResult
from finetune_sdk.training.stage_runs import fit_stages, fit_with_options
from finetune_sdk.training.stages_and_tasks import is_stage_list, is_task_list

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel

#: Older names of functions that moved to :mod:`finetune_sdk.training.planning`.
compatible = formatter_fits
__all__ = ["Trainer", "compatible", "detect_formatter", "reward_rows", "validate_task_name"]


class Trainer:
    """Fine-tune ``model`` with a technique plugin; everything is checked before any model is loaded.

    Args:
        model: a local Hugging Face model folder, a Hub id, a ``.gguf`` file, or a loaded transformers model
            (pass its ``tokenizer=``, or give ``(model, tokenizer)``).
        technique: ``"lora"``, ``"qlora"``, ``"full"``, ``"classifier"``, ``"reward-model"`` or a plugin's.
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
        self.host = get_plugin_host()
        self.technique, self.quantizer, self.formatter = resolve_plugins(self.host, technique, quantizer, formatter)
        self.options = resolve_run_options(self.host, self.technique, options, self.option_specs())
        #: The names of the options the caller gave (the rest are defaults).
        self.given_options = frozenset(options)
        if self.options["learning_rate"] is None:
            self.options["learning_rate"] = self.technique.default_learning_rate
        check_precision(self.options)
        self.source, self.given_model, self._tokenizer = model_source(model, tokenizer, self.options["revision"])
        self.output_dir = Path(output_dir) if output_dir else default_output_dir(self.source, technique)
        if output_dir is not None:
            check_output_dir(self.source, self.output_dir, probe=False)
        self.progress = progress
        self.publish_as = publish_as
        check_publish_name(publish_as)
        self.registry = registry
        self.published: list[Any] = []
        self._current_model: LoadedModel | None = None
        self._precision: Precision | None = None
        self._feed: Feed | None = None  # what a step feeds the hardware, once fit has planned
        self._log_history: list[dict[str, Any]] = []
        self.logger = ensure_handler()

    # -- public API ----------------------------------------------------------------------------------------
    def fit(self, train_data: Any, eval_data: Any = None, *, resume: bool = False, objective: str | None = None,
            **options: Any) -> FitResult:
        """Train and save the result; returns a :class:`FitResult`. The result folder appears atomically.

        ``train_data``: a path (.jsonl, .json, .csv, .parquet), a list of dicts, a ``datasets.Dataset``, a list of
        ``Stage`` (sequential: each saved to ``output_dir/stage-<i>``) or of ``Task`` (multi-task mixture). Pairs
        train with DPO unless ``objective=`` names another (``"orpo"``, ``"simpo"``...); ``objective`` and
        ``options`` given here apply to this fit only. A checkpoint every ``save_steps`` steps (500; 0: none) in
        ``<output_dir>.checkpoints/``; ``resume=True`` continues from the newest complete one.

        Example:
            >>> from finetune_sdk.testing.tiny import save_tiny_model
            >>> import pathlib, tempfile; tmp = pathlib.Path(tempfile.mkdtemp())
            >>> rows = [{"prompt": "2+2?", "completion": "4"}] * 4
            >>> result = Trainer(save_tiny_model(tmp / "m"), formatter="chatml", output_dir=tmp / "out",
            ...                  max_steps=2, progress=False).fit(rows)
            >>> (result.output_dir / "adapter_model.safetensors").is_file(), result.metrics["train_steps"]
            (True, 2)
        """
        if objective is not None or options:
            return fit_with_options(self, train_data, eval_data, resume, {"objective": objective, **options})
        if is_stage_list(train_data):
            return fit_stages(self, list(train_data), resume)
        return self.fit_stage(train_data, eval_data, resume=resume)

    def fit_stage(self, train_data: Any, eval_data: Any = None, *, resume: bool = False,
                  state_path: Path | None = None) -> FitResult:
        """One dataset (or list of ``Task``) through plan -> run -> save, as :meth:`fit`; with ``state_path`` (a stage
        of ``fit([Stage, ...])``) the trainable weights it ends with are also kept there, for resume."""
        from finetune_sdk.log import known_dependency_warnings
        from finetune_sdk.training.saving import save_run

        with known_dependency_warnings():  # the first import of transformers' Trainer imports PEFT and bitsandbytes
            from finetune_sdk.training.engine import run_training
        check_output_dir(self.source, self.output_dir, (train_data, eval_data))
        if not is_task_list(train_data):  # bad files are named before any tokenizer or model loads
            train_data = load_rows(train_data, name="train_data")
            eval_data = load_rows(eval_data, name="eval_data") if eval_data is not None else None
        tokenizer = self.load_tokenizer()
        planner = Planner(self.host, self.technique.task, self.options, strict=state_path is None)
        plan = planner.plan(train_data, eval_data, tokenizer, self.formatter)
        self._adopt(plan)
        estimated = None
        if self.given_model is None:  # stop before the model loads if it can't fit; once loaded: only estimate
            estimate = check_run_memory(self.source.path or self.source.id, self.technique, self.quantizer,
                                        {**plan.options, "dtype": estimate_options(self.options, self.precision)["dtype"]},
                                        plan.train.examples, plan.objective, self._current_model is None)
            estimated = getattr(estimate, "total", None)
        run = self.run_spec(plan.options, resume=resume, state_path=state_path, estimated_memory=estimated)
        trained = run_training(run, plan, self.current_model(), tokenizer)
        result = save_run(run, plan, trained, tokenizer)
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

        ``clients`` is ``{name: data}``; returns a :class:`FitResult` whose folder is an ordinary result. Arguments,
        errors and an example: :func:`finetune_sdk.federated.api.fit_federated`; the guide: docs/federated.md.
        """
        from finetune_sdk.federated.api import fit_federated

        return fit_federated(self, clients, rounds=rounds, strategy=strategy, resume=resume, **settings)

    def compare(self, eval_data: Any, prompts: Any = None, *, max_new_tokens: int = 64,
                report_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Base model vs the current (fine-tuned) model on ``eval_data`` and side-by-side generations.

        Returns the report (metrics of both, generations, loss curves); with ``report_dir`` also writes
        ``comparison.json`` and a self-contained ``comparison.html`` there.
        """
        from finetune_sdk.evaluation.compare import compare_models

        rows, current = load_rows(eval_data, name="eval_data"), self.current_model()
        current.formatter = self._pick_formatter(rows, current.tokenizer)
        info = {"technique": self.technique.name, "base_model": self.source.id, "output_dir": str(self.output_dir)}
        return compare_models(current, self.base_model, rows, prompts, max_new_tokens=max_new_tokens,
                              log_history=self.log_history, info=info, report_dir=report_dir)

    def generate(self, prompts: Any, **kwargs: Any) -> Any:
        """Generate answers with the current model (the base before :meth:`fit`, the fine-tuned one after).

        Each prompt is wrapped as the formatter wraps training prompts; ``raw=True`` sends it as is.
        """
        return self.current_model().generate(prompts, **kwargs)

    def predict(self, texts: Any, **kwargs: Any) -> Any:
        """Labels from the classifier, rewards from a reward model (before :meth:`fit` the head is untrained)."""
        return self.current_model().predict(texts, **kwargs)

    def evaluate(self, data: Any, **kwargs: Any) -> dict[str, float]:
        """Loss (and perplexity, or accuracy and macro-F1 for the classifier) of the current model on ``data``."""
        rows = load_rows(data, name="eval_data")
        if self._current_model is None and self.technique.task == CLASSIFICATION and not self.options["labels"]:
            from finetune_sdk.training.planning import labels_for

            formatter = self._pick_formatter(rows, self.load_tokenizer())
            self.options["labels"] = labels_for(rows, formatter, self.options)
        current = self.current_model()
        self._pick_formatter(rows, current.tokenizer)  # the data's columns decide, as in fit()
        return current.evaluate(rows, **kwargs)

    # -- model, tokenizer and precision ----------------------------------------------------------------------
    def current_model(self) -> LoadedModel:
        """The model ``generate``/``predict``/``evaluate`` use (:class:`~finetune_sdk.models.inference.LoadedModel`):
        the base (loaded on first use; a classifier's head untrained) before :meth:`fit`, the trained model after."""
        if self._current_model is None:
            from finetune_sdk.models.loading import open_base

            self._current_model = open_base(self.source, self.technique, self.quantizer, self.formatter, self.options,
                                            self.host, tokenizer=self.load_tokenizer(), model=self.given_model,
                                            dtype=self.precision.torch_dtype())
        return self._current_model

    def base_model(self) -> LoadedModel:
        """The untrained starting point, loaded fresh: a new ``Trainer`` with the model, plugins and options the caller
        gave (what :meth:`compare` scores when no adapter can be disabled)."""
        base = Trainer(self.given_model if self.given_model is not None else self.source.id,
                       technique=self.technique.name, quantizer=self.quantizer.name if self.quantizer else "none",
                       formatter=self.formatter.name if self.formatter else None, tokenizer=self._tokenizer,
                       progress=False, **{k: v for k, v in self.options.items() if k in self.given_options})
        return base.current_model()

    def use_result(self, result: FitResult, log_history: list[dict[str, Any]]) -> None:
        """Make ``result`` (a saved result) the current model that ``generate``/``evaluate``/``compare`` use, and
        ``log_history`` the training log (a federated run's rounds)."""
        self._log_history = list(log_history)
        self._current_model = result.load()

    @property
    def precision(self) -> Precision:
        """The precision of this Trainer's run: what ``dtype`` (default ``auto``) resolves to for its plugins, a
        model passed in loaded keeping its own dtype; once :meth:`fit` has planned, ``auto`` weighs what a step
        feeds; once the model is loaded, the precision it was loaded in (through later stages too)."""
        if self._precision is None or self._current_model is None:
            self._precision = choose_precision(self.options, self.technique, self.quantizer, self.given_model,
                                               self._feed)
        return self._precision

    def load_tokenizer(self) -> Any:
        """The tokenizer given, or the model's (loaded once)."""
        if self._tokenizer is None:
            from finetune_sdk.models.sources import load_tokenizer

            self._tokenizer = load_tokenizer(self.source, trust_remote_code=self.options["trust_remote_code"])
        return self._tokenizer

    @property
    def log_history(self) -> list[dict[str, Any]]:
        """The training log of the last ``fit`` (empty before)."""
        return list(self._log_history)

    def option_specs(self) -> dict[str, Any]:
        """The options this Trainer takes (training, technique and quantizer ones) by name."""
        return option_specs(self.technique, self.quantizer)

    # -- plan -> run -> save ---------------------------------------------------------------------------------
    def run_spec(self, options: dict[str, Any], **run: Any) -> RunSpec:
        """The :class:`~finetune_sdk.training.plan.RunSpec` of a run with ``options`` (a plan's); ``run`` sets
        ``resume``, ``state_path``, ``estimated_memory``."""
        return RunSpec(self.technique, self.quantizer, options, self.output_dir, self.source, self.host,
                       self.progress, self.logger, self.precision, **run)

    def manifest(self, plan: TrainingPlan, metrics: dict[str, Any]) -> dict[str, Any]:
        """A finished run's manifest (no credentials); ``plan`` has ``objective``, ``formatter_name``, ``dataset``."""
        from finetune_sdk.training.saving import build_manifest

        return build_manifest(self.run_spec(self.options), plan, metrics, self.current_model().model)

    def _adopt(self, plan: TrainingPlan) -> None:
        """What a plan settles for this Trainer: its formatter and labels, and what a step feeds (precision)."""
        self.formatter = plan.formatter
        if plan.labels is not None:
            self.options["labels"] = plan.labels
        if self._current_model is not None and plan.current_model_formatter is not None:
            self._current_model.formatter = plan.current_model_formatter
        self._feed = plan_feed(plan.train, self.options, self.source.path or self.source.id)

    def _pick_formatter(self, rows: Rows, tokenizer: Any) -> Formatter:
        if self.formatter is None:
            self.formatter = Planner(self.host, self.technique.task, self.options).pick_formatter(rows, tokenizer)
            if self._current_model is not None:
                self._current_model.formatter = self.formatter
        return self.formatter
