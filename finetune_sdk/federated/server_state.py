"""The server's files: each round's global adapter as an ordinary result folder, the resume checkpoint, the status.

Layout beside ``output_dir`` (``<output_dir>.federated/``): ``round-<k>/`` (a result folder ``finetune_sdk.load``
reads), ``checkpoint/`` (``arrays.safetensors`` and ``state.json`` of the last completed round, written
atomically) and ``status.json`` (``running``, ``completed`` or ``failed`` with the error). ``output_dir`` itself
is the final global adapter, written when the run completes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.fsutil import staged_directory, write_json_atomic
from finetune_sdk.training.saving import save_result

CHECKPOINT, STATUS = "checkpoint", "status.json"
CHECKPOINT_FILES = {"arrays.safetensors", "state.json", "base_delta.safetensors"}


def write_result(trainer: Any, directory: Path, formatter: str | None, metrics: dict[str, Any],
                 federated: dict[str, Any], log_history: list[dict[str, Any]],
                 base_delta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the model's current trainable weights as a result folder (atomically); returns its manifest.

    With FedEx-LoRA's ``base_delta`` (float32 arrays keyed by base weight name) the folder also holds
    ``base_delta.safetensors``, named in the manifest's ``base_delta``, which ``finetune_sdk.load`` adds to the base
    weights before the adapter."""
    session = trainer.current_model()
    plan = SimpleNamespace(objective="sft", formatter_name=formatter,
                           dataset={"source": "federated", "clients": federated.get("clients", {}),
                                    "rows": sum(c.get("examples", 0) for c in federated.get("clients", {}).values()),
                                    "fingerprint": None})
    manifest = trainer.manifest(plan, metrics)
    manifest["federated"] = federated
    extra = {}
    if base_delta:
        from finetune_sdk.federated.fedex import BASE_DELTA_FILE

        manifest["base_delta"] = {"file": BASE_DELTA_FILE, "method": "fedex-lora", "weights": len(base_delta)}
        extra[BASE_DELTA_FILE] = base_delta
    save_result(directory, trainer.technique, session.model, session.tokenizer, log_history, manifest, extra)
    return manifest


def save_checkpoint(state_dir: Path, arrays: Any, base_delta: dict[str, Any], state: dict[str, Any]) -> None:
    """Save the global parameters, FedEx-LoRA's base delta (if any) and the run's state after a completed round;
    the old checkpoint is replaced in one rename."""
    from safetensors.numpy import save_file

    folder = state_dir / CHECKPOINT
    if folder.exists() and not {p.name for p in folder.iterdir()} <= CHECKPOINT_FILES:
        raise ConfigError(f"{folder} holds files a federated checkpoint doesn't; nothing was written: move them away "
                          "or pick another output_dir")
    # the SDK's own checkpoint folder (checked just above), not a result folder: replaced without the result check
    with staged_directory(folder, replace_only_results=False) as staging:
        save_file({name: array.numpy() for name, array in arrays.items()}, str(staging / "arrays.safetensors"))
        if base_delta:
            save_file(dict(base_delta), str(staging / "base_delta.safetensors"))
        write_json_atomic(staging / "state.json", state)


def load_checkpoint(state_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """The last completed round's parameters (an ``ArrayRecord``), state and base delta (``{}`` without
    FedEx-LoRA), or ``None`` when there is none."""
    folder = state_dir / CHECKPOINT
    if not (folder / "state.json").is_file() or not (folder / "arrays.safetensors").is_file():
        return None
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import load_file

    arrays = load_file(str(folder / "arrays.safetensors"))
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    delta_file = folder / "base_delta.safetensors"
    base_delta = load_file(str(delta_file)) if delta_file.is_file() else {}
    return ArrayRecord({name: Array(arrays[name]) for name in state["array_names"]}), state, base_delta


def write_status(state_dir: Path, token: str, state: str, **extra: Any) -> None:
    write_json_atomic(state_dir / STATUS, {"token": token, "state": state, **extra})


def read_status(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATUS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def clear_checkpoint(state_dir: Path) -> None:
    """Drop the resume checkpoint once the final result is written (nothing is left to resume)."""
    shutil.rmtree(state_dir / CHECKPOINT, ignore_errors=True)
