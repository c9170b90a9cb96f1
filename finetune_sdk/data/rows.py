"""Reading training data: JSONL, JSON, CSV, Parquet files, lists of dicts and ``datasets.Dataset``.

Rows keep where they came from (file and line) so every later error can point at them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_sdk.errors import DataError, json_problem
from finetune_sdk.data.textfiles import read_text

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Rows:
    """Loaded rows, where each one came from, and a fingerprint of the content.

    Example:
        >>> rows = load_rows([{"text": "hello"}])
        >>> rows.where[0], len(rows)
        ('data[0]', 1)
    """

    rows: list[dict[str, Any]]
    where: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        """Columns present in the first row."""
        return sorted(self.rows[0]) if self.rows else []

    @property
    def fingerprint(self) -> str:
        """sha256 of the rows' canonical JSON: same data, same fingerprint."""
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
            digest.update(b"\n")
        return "sha256:" + digest.hexdigest()


def load_rows(data: Any, name: str = "data") -> Rows:
    """Load ``data`` (a path, a list of dicts or a ``datasets.Dataset``) into :class:`Rows`.

    An empty dataset, a missing file, an unsupported suffix or a malformed line is a :class:`DataError`.
    """
    if isinstance(data, Rows):
        return data
    if isinstance(data, (str, Path)):
        rows = _read_file(Path(data))
    elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        rows = Rows(list(data.to_list()), [f"{name}[{i}]" for i in range(len(data))], name)
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise DataError(f"{name}[{i}]: each row must be a dict of columns, got {type(row).__name__}")
        rows = Rows([dict(r) for r in data], [f"{name}[{i}]" for i in range(len(data))], name)
    else:
        raise DataError(
            f"{name}: expected a file path ({', '.join(SUFFIXES)}), a list of dicts or a datasets.Dataset, "
            f"got {type(data).__name__}")
    if not rows.rows:
        raise DataError(f"{rows.source}: the dataset is empty; give at least one row")
    return rows


def _read_file(path: Path) -> Rows:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a {', '.join(SUFFIXES)} file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        try:
            rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
        except csv.Error as exc:
            raise DataError(f"{path}: malformed CSV ({exc})") from None
        return Rows(rows, [f"{path} line {i + 2}" for i in range(len(rows))], str(path))
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(SUFFIXES)}")


def _read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    return Rows(rows, [f"{path} row {i + 1}" for i in range(len(rows))], str(path))


def _read_jsonl(path: Path) -> Rows:
    rows, where = [], []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: malformed JSON ({json_problem(exc)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{path} line {number}")
    return Rows(rows, where, str(path))


def _read_json(path: Path) -> Rows:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: malformed JSON ({json_problem(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(row).__name__}")
    return Rows(data, [f"{path} item {i}" for i in range(len(data))], str(path))
