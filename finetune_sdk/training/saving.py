"""Saving a run, in one place: the step after the run engine (:func:`save_run`), the manifest, the result folder
(weights, tokenizer, log, manifest, written atomically) and the scratch folder beside it. Used by the facade after
:func:`finetune_sdk.training.engine.run_training`, and by the federated server for each round."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_sdk.formatter import CLASSIFICATION
from finetune_sdk.fsutil import staged_directory, write_json_atomic
from finetune_sdk.training.manifest import FORMAT_VERSION, MANIFEST_NAME, library_versions, scrub

if TYPE_CHECKING:
    from finetune_sdk.technique import Technique
    from finetune_sdk.training.plan import RunSpec, TrainedRun, TrainingPlan
    from finetune_sdk.training.result import FitResult

TRAINING_LOG = "training_log.json"


def save_run(run: RunSpec, plan: TrainingPlan, trained: TrainedRun, tokenizer: Any) -> FitResult:
    """Save a trained run: its manifest, a stage's trainable weights (``run.state_path``, for resume), the result
    folder in ``run.output_dir`` (appears whole or not at all); then remove the checkpoints, close the event log with
    an ``end`` event and send ``on_train_end``. Only the main process writes; every process returns the result.

    Raises:
        FinetuneError: a full disk or a folder that can't be written, as one line (recorded in the event log).
    """
    from finetune_sdk.training.checkpoints import remove_checkpoints, save_trainable_state
    from finetune_sdk.training.result import FitResult
    from finetune_sdk.training.run_events import peak_memory, record_failure

    metrics = trained.metrics
    manifest = build_manifest(run, plan, metrics, trained.model)
    if is_main_process():
        try:
            if run.state_path is not None:  # before the result: a finished stage always has its state on disk
                save_trainable_state(trained.model, run.state_path)
            save_result(run.output_dir, run.technique, trained.model, tokenizer, trained.log_history, manifest)
        except Exception as exc:  # a full disk while saving: the event log says why the run has no result
            record_failure(trained.events, metrics["train_steps"], exc)
            raise
        remove_checkpoints(trained.checkpoint_root)  # the result is complete: nothing left to resume
        if trained.events is not None:
            trained.events.append({"event": "end", "step": metrics["train_steps"], "metrics": metrics,
                                   "peak_memory": peak_memory()})
            trained.events.close()
    trained.context.step = metrics["train_steps"]
    run.host.notify("on_train_end", context=trained.context, metrics=metrics)
    run.logger.info("saved %s result to %s", run.technique.name, run.output_dir)
    return FitResult(output_dir=run.output_dir, metrics=metrics, manifest=manifest, log_history=trained.log_history)


def build_manifest(run: RunSpec, plan: TrainingPlan, metrics: dict[str, Any], model: Any) -> dict[str, Any]:
    """The manifest of a finished run (no credentials).

    ``run.state`` says how the run trained (trainable dtypes, chunked loss); ``model`` is the trained model (its
    base's commit is recorded when the source gave none).
    """
    from finetune_sdk.models.sources import commit_hash

    base = run.source.to_manifest()
    base["revision"] = base["revision"] or commit_hash(getattr(model, "base_model", model))
    precision = run.resolved_precision().to_manifest()
    if run.state.trainable_dtypes:  # what the trained parameters really are
        precision["trainable_dtype"] = ",".join(run.state.trainable_dtypes)
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "technique": run.technique.name,
        "task": run.technique.task,
        "objective": plan.objective,
        "quantizer": run.quantizer.name if run.quantizer else None,
        "formatter": plan.formatter_name,
        "options": scrub(run.options),
        "dtype": precision["dtype"],
        "precision": precision,
        "chunked_loss": run.state.chunked_loss,  # the loss computed without full logits
        "base_model": base,
        "dataset": plan.dataset,
        "labels": run.options.get("labels") if run.technique.task == CLASSIFICATION else None,
        "plugins": plugins_used(run, plan),
        "metrics": metrics,
        "libraries": library_versions(),
    }


def plugins_used(run: RunSpec, plan: TrainingPlan) -> list[dict[str, str]]:
    """The distribution and version of each plugin that produced a result: its technique, quantizer and
    formatter(s) (see :func:`finetune_sdk.training.manifest.plugin_records`)."""
    from finetune_sdk.training.manifest import plugin_records

    host = getattr(run, "host", None)
    if host is None:
        return []
    dataset = plan.dataset if isinstance(getattr(plan, "dataset", None), dict) else {}
    chosen = getattr(plan, "formatter", None)
    formatters = [plan.formatter_name, *(t.get("formatter") for t in dataset.get("tasks", {}).values()),
                  getattr(chosen, "name", None)]
    used = [("technique", run.technique.name), ("quantizer", run.quantizer.name if run.quantizer else None),
            *(("formatter", name) for name in formatters)]
    return plugin_records(host, used)


def save_result(directory: Path, technique: Technique, model: Any, tokenizer: Any, log_history: list[dict[str, Any]],
                manifest: dict[str, Any], extra_tensors: dict[str, dict[str, Any]] | None = None) -> None:
    """Write a result folder atomically: what ``technique.save`` writes, the tokenizer, ``training_log.json``, the
    manifest and ``extra_tensors`` (file name -> numpy arrays, written as safetensors); ``directory`` appears whole
    or not at all (:func:`finetune_sdk.fsutil.staged_directory`)."""
    with staged_directory(directory) as staging:
        technique.save(model, staging)
        if extra_tensors:
            from safetensors.numpy import save_file

            for name, tensors in extra_tensors.items():
                save_file(dict(tensors), str(staging / name))
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / TRAINING_LOG, log_history)
        write_json_atomic(staging / MANIFEST_NAME, manifest)


def work_dir_beside(output_dir: Path) -> Path:
    """A scratch folder next to ``output_dir`` for transformers' own files while training (removed after the run;
    one left by a killed process is removed by the next run)."""
    from finetune_sdk.training.output_paths import scratch_dir

    return scratch_dir(output_dir, "work")


def unwrap(model: Any) -> Any:
    """The model inside a DDP/FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): only it writes the result."""
    return int(os.environ.get("RANK", "0")) == 0
