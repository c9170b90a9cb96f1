"""The manifest written beside every result: what was trained, how, on what, with which libraries."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune_sdk.errors import FinetuneError, json_problem

MANIFEST_NAME = "finetune_manifest.json"
FORMAT_VERSION = 1
LIBRARIES = ("finetune-sdk", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
SECRET_KEYS = ("token", "hub_token", "hf_token", "api_key", "password")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def scrub(options: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a credential: manifests are shared, tokens never are. A Python function
    given as an option (GRPO's ``reward_funcs``) is recorded by its ``module.qualname``."""
    return {k: _recordable(v) for k, v in options.items() if not any(s in k.lower() for s in SECRET_KEYS)}


def _recordable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_recordable(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', None) or '?'}.{getattr(value, '__qualname__', type(value).__name__)}"
    return value


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and check a result's manifest; a missing one or a newer format is a clear error."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FinetuneError(f"{directory}: no {MANIFEST_NAME}; is this a finetune_sdk result folder?")
    from finetune_sdk.data.textfiles import read_text

    try:
        manifest = json.loads(read_text(path, error=FinetuneError))
    except json.JSONDecodeError as exc:
        raise FinetuneError(f"{path} line {exc.lineno}: malformed manifest ({json_problem(exc)})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("options", {}), dict):
        raise FinetuneError(f"{path}: malformed manifest (expected a JSON object with an 'options' object)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FinetuneError(
            f"{path}: manifest format version {version!r} is newer than this finetune-sdk reads "
            f"({FORMAT_VERSION}); upgrade finetune-sdk")
    return manifest


def plugin_records(host: Any, used: list[tuple[str, str | None]]) -> list[dict[str, str]]:
    """Where each plugin a result was produced with comes from: ``kind``, ``name``, ``plugin``, ``distribution``
    and ``version`` for each (kind, name) in ``used`` (None names and repeats are skipped)."""
    records, seen = [], set()
    for kind, name in used:
        if not name or (kind, name) in seen:
            continue
        seen.add((kind, name))
        try:
            reg = host.registration(kind, name)
        except FinetuneError:  # not (or no longer) registered: nothing to trace it to
            continue
        records.append({"kind": kind, "name": name, "plugin": reg.plugin, "distribution": reg.distribution,
                        "version": reg.version})
    return records
