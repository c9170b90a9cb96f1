"""Artifacts of a version: files made from it after publishing (a GGUF export), kept beside its own files.

A version's own files never change; artifacts are attached to it later, stored in the same content-addressed blob
store, listed by :meth:`Registry.artifacts`, pushed to the Hub with the version under ``artifacts/`` (and listed in
its model card), and pulled back with their hashes checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune_sdk.errors import RegistryError
from finetune_sdk.registry.locks import publishing
from finetune_sdk.registry.refs import validate_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    name TEXT NOT NULL, version INTEGER NOT NULL, file TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    kind TEXT NOT NULL, metadata TEXT NOT NULL, PRIMARY KEY (name, version, file));
"""
#: Where artifacts sit in a pushed Hub repo.
HUB_FOLDER = "artifacts"


def _ensure_table(registry: Any) -> None:
    with registry.index.write() as db:
        db.execute(SCHEMA.strip().rstrip(";"))


def attach(registry: Any, ref: str, path: str | os.PathLike[str], *, kind: str = "gguf",
           metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store the file ``path`` as an artifact of the version ``ref`` (replacing one of the same file name).

    Returns the artifact's record: ``file``, ``sha256``, ``size``, ``kind``, ``metadata``.
    """
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"{path}: no such file to attach")
    file = validate_name(path.name, "artifact file name")
    version = registry.resolve(ref)
    _ensure_table(registry)
    with publishing(registry.home):  # garbage collection waits until the blob's row is in
        sha, size = registry.blobs.put(path)
        record = {"file": file, "sha256": sha, "size": size, "kind": kind, "metadata": dict(metadata or {})}
        with registry.index.write() as db:
            db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (version.name, version.version, file, sha, size, kind,
                        json.dumps(record["metadata"], sort_keys=True)))
    return record


def artifacts(registry: Any, ref: str) -> dict[str, dict[str, Any]]:
    """The artifacts of the version ``ref``, by file name."""
    version = registry.resolve(ref)
    _ensure_table(registry)
    with registry.index.read() as db:
        rows = db.execute("SELECT * FROM artifacts WHERE name = ? AND version = ? ORDER BY file",
                          (version.name, version.version)).fetchall()
    return {row["file"]: {"file": row["file"], "sha256": row["sha256"], "size": row["size"], "kind": row["kind"],
                          "metadata": json.loads(row["metadata"])} for row in rows}


def artifact_path(registry: Any, ref: str, file: str) -> Path:
    """A checked copy of one artifact, under the registry's ``checkouts/NAME/N.artifacts/`` folder.

    Every call re-hashes the stored artifact and the copy it serves (see :meth:`Registry.path`): a changed byte in
    either is an :class:`~finetune_sdk.errors.IntegrityError` or a fresh copy.
    """
    version = registry.resolve(ref)
    found = artifacts(registry, version.ref)
    if file not in found:
        raise RegistryError(f"{version.ref} has no artifact {file!r}; artifacts: {', '.join(found) or 'none'}")
    target = registry.home / "checkouts" / version.name / f"{version.version}.artifacts" / file
    sha, label = found[file]["sha256"], f"{version.ref}: {file}"
    registry.blobs.verify(sha, label)  # a corrupt stored artifact is refused even while its copy is intact
    if not registry.blobs.holds(target, sha, found[file]["size"]):
        registry.blobs.copy_to(sha, target, label)
    return target


def used_blobs(db: Any) -> set[str]:
    """Hashes referenced by artifacts (for garbage collection); empty before the table exists."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'artifacts'").fetchone():
        return set()
    return {row[0] for row in db.execute("SELECT sha256 FROM artifacts")}


def forget(db: Any, name: str, version: int) -> None:
    """Drop the artifact rows of a deleted version (inside the delete's transaction)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'artifacts'").fetchone():
        db.execute("DELETE FROM artifacts WHERE name = ? AND version = ?", (name, version))
