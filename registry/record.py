"""What a pull reads from a remote, checked before it touches the index or the disk; scratch folders for pulls.

``registry.json`` comes from a server that may be hostile: its name, version, parent, tags and file list are
validated here (names as adapter names, file paths as plain relative paths inside the folder, hashes as sha256
hex digests), so nothing it says can escape the registry's folders or leave a row that can't be deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune_sdk.errors import RegistryError, json_problem
from finetune_sdk.registry.refs import parse_ref, validate_name, validate_relative_path

SHA256 = re.compile(r"^[0-9a-f]{64}$")
SCRATCH = "tmp"


def read_record(path: Path, source: str) -> dict[str, Any]:
    """Read and validate a pulled ``registry.json``; every problem is a :class:`RegistryError` naming ``source``."""
    from finetune_sdk.data.textfiles import read_text

    if not path.is_file() or path.is_symlink():
        raise RegistryError(f"{source} has no {path.name}; it was not pushed by finetune-sdk")
    try:
        record = json.loads(read_text(path, error=RegistryError))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{source}: malformed {path.name} ({json_problem(exc, line=True)})") from None

    def bad(what: str) -> RegistryError:
        return RegistryError(f"{source}: {path.name} {what}; refusing to pull it")

    if not isinstance(record, dict):
        raise bad("is not a JSON object")
    try:
        validate_name(record.get("name"))
    except RegistryError as exc:
        raise bad(f"names the adapter badly ({exc})") from None
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"has version {version!r}; versions are whole numbers from 1")
    parent = record.get("parent")
    if parent is not None:
        try:
            if not isinstance(parent, str) or parse_ref(parent).is_hub:
                raise RegistryError("not a local name@version")
        except RegistryError as exc:
            raise bad(f"has parent {parent!r} ({exc})") from None
    tags = record.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) and t and t.isprintable() for t in tags):
        raise bad("has tags that are not printable strings")
    if not isinstance(record.get("description", ""), str):
        raise bad("has a description that is not a string")
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("lists no files")
    for rel, meta in files.items():
        try:
            validate_relative_path(rel)
        except RegistryError as exc:
            raise bad(f"lists a bad file ({exc})") from None
        if not isinstance(meta, dict) or not SHA256.match(str(meta.get("sha256", ""))) or \
                isinstance(meta.get("size"), bool) or not isinstance(meta.get("size"), int) or meta["size"] < 0:
            raise bad(f"has no valid sha256 and size for {rel!r}")
    return record


@contextmanager
def scratch(home: Path, kind: str) -> Iterator[Path]:
    """A scratch folder ``<home>/tmp/<kind>-<pid>-*``, removed afterwards whatever happens; folders left by
    processes that no longer run (a SIGKILL) are removed first."""
    from finetune_sdk.training.output_paths import process_alive

    root = Path(home) / SCRATCH
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*-*-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
