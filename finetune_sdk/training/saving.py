"""Saving a run, in one place: the manifest, the result folder (weights, tokenizer, log, manifest, written
atomically) and the scratch folder beside it. Used by :mod:`finetune_sdk.training.engine` and the federated server."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetune_sdk.formatter import CLASSIFICATION
from finetune_sdk.fsutil import staged_directory, write_json_atomic
from finetune_sdk.training.manifest import FORMAT_VERSION, MANIFEST_NAME, library_versions, scrub

TRAINING_LOG = "training_log.json"


def build_manifest(run: Any, plan: Any, metrics: dict[str, Any], model: Any) -> dict[str, Any]:
    """The manifest of a finished run (no credentials).

    ``run`` has ``technique``, ``quantizer``, ``options`` and ``source`` (a :class:`~finetune_sdk.training.engine.RunSpec`
    or the Trainer); ``plan`` has ``objective``, ``formatter_name`` and ``dataset``; ``model`` is the trained model
    (its base's commit is recorded when the source gave none).
    """
    from finetune_sdk.models.sources import commit_hash
    from finetune_sdk.speed.precision import run_precision

    base = run.source.to_manifest()
    base["revision"] = base["revision"] or commit_hash(getattr(model, "base_model", model))
    precision = run_precision(run).to_manifest()
    if getattr(plan, "trainable_dtypes", None):  # what the trained parameters really are
        precision["trainable_dtype"] = ",".join(plan.trainable_dtypes)
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
        "chunked_loss": bool(getattr(plan, "chunked_loss", False)),  # the loss computed without full logits
        "base_model": base,
        "dataset": plan.dataset,
        "labels": run.options.get("labels") if run.technique.task == CLASSIFICATION else None,
        "plugins": plugins_used(run, plan),
        "metrics": metrics,
        "libraries": library_versions(),
    }


def plugins_used(run: Any, plan: Any) -> list[dict[str, str]]:
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


def save_result(directory: Path, technique: Any, model: Any, tokenizer: Any, log_history: list[dict[str, Any]],
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
