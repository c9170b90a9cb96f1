"""The studio's export, compare, federated and benchmark views: the SDK's own functions, their results as JSON.

* :func:`export_gguf`: :func:`finetune_sdk.exporting.export` (the quantizations of
  :data:`finetune_sdk.exporting.quantization.QUANTIZATIONS`), returning the files and the Ollama command.
* :func:`compare`: what ``finetune eval --compare-base --report-dir`` does (:func:`finetune_sdk.evaluation.compare.compare_models`
  with the result's training log), the report's metrics, side-by-side answers and, for the page, the loss chart of
  :func:`finetune_sdk.evaluation.report.loss_chart_svg` (served as an image, never inlined).
* :func:`federated_rounds`: the per-round history a federated run records in its manifest (``federated.history``,
  :mod:`finetune_sdk.federated.rounds`): clients sampled and answered, each client's and the global held-out loss,
  bytes sent against the adapter's size, and the privacy budget spent through each round (epsilon, delta; from
  the run's RDP accountant, :func:`finetune_sdk.federated.privacy.spent_so_far`) when differential privacy is on.
* :func:`scoreboard`: ``Registry.score_table`` (:func:`finetune_sdk.registry.scores.comparison`): each version's and
  the base's benchmark scores with their standard errors and the difference to the base.

Example:
    >>> federated_rounds({"federated": {"history": []}})["rounds"]
    []
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError


def quantizations() -> list[str]:
    """The GGUF quantizations the SDK writes, in its order (``q8_0`` first as the default)."""
    from finetune_sdk.exporting.quantization import QUANTIZATIONS

    names = list(QUANTIZATIONS)
    return ["q8_0", *[n for n in names if n != "q8_0"]]


def export_gguf(ref: str, out: Path, quantization: str, registry: Any) -> dict[str, Any]:
    """``finetune export REF --quantization Q --out OUT``; returns the files written and the Ollama command."""
    from finetune_sdk.exporting import export

    done = export(ref, out, quantization=quantization, registry=registry)
    files = {kind: str(path) for kind, path in (done.files or {done.quantization: done.gguf_path}).items()}
    return {"files": files, "modelfile": str(done.modelfile_path), "ollama_command": done.ollama_command,
            "chat_format": done.chat_format, "quantization": done.quantization}


def compare(ref: str, data: Path, prompts: list[str], report_dir: Path | None, *, max_new_tokens: int = 64,
            trust_remote_code: bool = False) -> dict[str, Any]:
    """The base-vs-tuned report of the result ``ref`` on the held-out rows ``data`` (``finetune eval
    --compare-base``), written to ``report_dir`` (``comparison.json``/``.html``) when given."""
    from finetune_sdk.evaluation.compare import compare_models
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.models.loading import is_result, load_base, open_model, result_folder
    from finetune_sdk.training.manifest import read_manifest
    from finetune_sdk.training.output_paths import check_report_dir

    if not is_result(ref):
        raise ConfigError(f"compare needs a fine-tuned result or registry version, and {ref} is a base model")
    if report_dir is not None:
        check_report_dir(report_dir, "report folder")
    rows = load_rows(data, name="eval_data")
    folder = result_folder(ref)
    manifest = read_manifest(folder)
    history_file = folder / "training_log.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    model = open_model(ref, None, trust_remote_code)
    info = {"technique": manifest["technique"], "base_model": manifest["base_model"]["id"], "output_dir": str(folder),
            "model": ref}
    return compare_models(model, lambda: load_base(folder, trust_remote_code=trust_remote_code), rows, prompts,
                          max_new_tokens=max_new_tokens, log_history=history, info=info, report_dir=report_dir)


def loss_chart(report: dict[str, Any]) -> str:
    """The report's loss chart (SVG text, numbers and fixed labels only: :func:`finetune_sdk.evaluation.report.loss_chart_svg`)."""
    from finetune_sdk.evaluation.report import loss_chart_svg

    svg = loss_chart_svg(report.get("log_history") or [])
    if not svg:
        svg = ('<svg width="480" height="40"><text x="8" y="24" font-family="sans-serif" font-size="13">no training '
               'loss was logged for this result</text></svg>')
    return svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)  # a file of its own needs it


def _adapter_bytes(folder: Path | None) -> int | None:
    if folder is None or not folder.is_dir():
        return None
    found = [p.stat().st_size for p in folder.glob("*.safetensors")]
    return sum(found) if found else None


def federated_rounds(manifest: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    """Per round of a federated result (its manifest; ``folder``: the result, for the adapter's size on disk):
    ``round``, ``sampled``, ``answered``, ``dropped``, ``clients`` (name -> ``train_loss``, ``eval_loss``,
    ``global_eval_loss`` of the round's global model, ``bytes_sent``, ``bytes_received``), ``global_eval_loss``,
    ``bytes_from_clients``, ``bytes_to_clients``, ``privacy`` (the budget spent through the round: ``epsilon``,
    ``delta``, ``releases``; ``None`` when differential privacy is off or the run predates per-round accounting);
    plus ``adapter_bytes`` and ``privacy`` (the run's settings and final ``epsilon``, ``delta``; ``None`` when
    differential privacy is off)."""
    federated = manifest.get("federated") or {}
    rounds = []
    for entry in federated.get("history") or []:
        global_eval = entry.get("global_eval") or {}
        per_client = global_eval.get("per_client") or {}
        clients = {name: {"train_loss": c.get("train_loss"), "eval_loss": c.get("eval_loss"),
                          "global_eval_loss": per_client.get(name), "bytes_sent": c.get("bytes_sent"),
                          "bytes_received": c.get("bytes_received"), "examples": c.get("examples")}
                   for name, c in sorted((entry.get("clients") or {}).items())}
        answered = len(clients)
        rounds.append({"round": entry.get("round"), "sampled": answered + len(entry.get("dropped") or []),
                       "answered": answered, "dropped": list(entry.get("dropped") or []), "clients": clients,
                       "global_eval_loss": global_eval.get("eval_loss"),
                       "bytes_from_clients": entry.get("bytes_from_clients"),
                       "bytes_to_clients": entry.get("bytes_to_clients"), "seconds": entry.get("seconds"),
                       "privacy": entry.get("privacy")})
    return {"rounds": rounds, "strategy": federated.get("strategy"), "adapter_bytes": _adapter_bytes(folder),
            "trainable_parameters": (manifest.get("metrics") or {}).get("trainable_parameters"),
            "privacy": federated.get("privacy"), "secure_aggregation": federated.get("secure_aggregation")}


def federated_results(registry: Any, runs: Path) -> list[dict[str, Any]]:
    """Every federated result: registry versions whose manifest has a ``federated`` record (the last of each
    adapter: it holds the whole history) and result folders in the runs folder."""
    from finetune_sdk.training.manifest import MANIFEST_NAME

    found = []
    for entry in registry.list():
        versions = [v for v in registry.versions(entry["name"]) if (v.manifest or {}).get("federated")]
        if versions:
            last = versions[-1]
            found.append({"ref": last.ref, **federated_rounds(last.manifest, registry.path(last.ref))})
    for manifest_path in sorted(runs.glob(f"*/{MANIFEST_NAME}")):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("federated"):
            found.append({"ref": str(manifest_path.parent), **federated_rounds(manifest, manifest_path.parent)})
    return found


def scoreboard(registry: Any) -> list[dict[str, Any]]:
    """Per adapter with stored benchmark scores: its ``Registry.score_table`` rows (``model`` base or name@N,
    ``task``, ``metric``, ``value``, ``stderr``, ``vs_base``, ``significant``)."""
    boards = []
    for entry in registry.list():
        table = registry.score_table(entry["name"])
        if table:
            boards.append({"name": entry["name"], "rows": table})
    return boards
