"""Benchmark scores of registry versions (and of their base model), kept in the registry's index.

A version's own files never change; its scores are added later (``finetune bench name@3``), one row per task,
metric, filter, number of shots and limit, in the same SQLite index as the versions (each write is one
transaction: a score is stored whole or not at all). The base model's scores, measured beside a version with the
same settings, are stored under the adapter's name as version ``0`` so the comparison table has its baseline.

A row is a dict: ``task``, ``task_version``, ``num_fewshot``, ``limit``, ``metric``, ``filter``, ``value``,
``stderr`` (``None`` when lm-eval gives none), ``lm_eval_version``, ``seed``, ``date`` (UTC, ISO 8601),
``adapter_sha256`` (``None`` for the base) and ``model`` (the reference that was scored).
"""

from __future__ import annotations

import json
import math
from typing import Any

from finetune_sdk.errors import RegistryError

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    name TEXT NOT NULL, version INTEGER NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL, filter TEXT NOT NULL,
    num_fewshot INTEGER NOT NULL, row_limit TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (name, version, task, metric, filter, num_fewshot, row_limit))
"""
#: The version number base-model scores are stored under.
BASE_VERSION = 0
FIELDS = ("task", "task_version", "num_fewshot", "limit", "metric", "filter", "value", "stderr", "lm_eval_version",
          "seed", "date")


def _has_table(db: Any) -> bool:
    return bool(db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'scores'").fetchone())


def store(registry: Any, ref: str, rows: list[dict[str, Any]], *, base: bool = False) -> None:
    """Store score rows for the version ``ref`` (or, with ``base=True``, for its adapter's base model), replacing
    rows of the same task, metric, filter, shots and limit. Raises :class:`RegistryError` for a row missing a field.
    """
    version = registry.resolve(ref)
    for row in rows:
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise RegistryError(f"score row for {row.get('task')!r} lacks {', '.join(missing)}")
    number = BASE_VERSION if base else version.version
    with registry.index.write() as db:
        db.execute(SCHEMA.strip())
        for row in rows:
            db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (version.name, number, row["task"], row["metric"], row["filter"], int(row["num_fewshot"]),
                        json.dumps(row["limit"]), json.dumps(row, sort_keys=True, default=str)))


def scores(registry: Any, ref: str) -> list[dict[str, Any]]:
    """The stored scores of the version ``ref``, ordered by task and metric (empty when none)."""
    version = registry.resolve(ref)
    return _rows(registry, version.name, version.version)


def _rows(registry: Any, name: str, number: int | None = None) -> list[dict[str, Any]]:
    with registry.index.read() as db:
        if not _has_table(db):
            return []
        sql = "SELECT version, record FROM scores WHERE name = ?" + (" AND version = ?" if number is not None else "")
        found = db.execute(sql + " ORDER BY task, metric, filter, num_fewshot, row_limit, version",
                           (name,) + ((number,) if number is not None else ())).fetchall()
    return [{**json.loads(r["record"]), "version": r["version"]} for r in found]


def forget(db: Any, name: str, version: int) -> None:
    """Drop the score rows of a deleted version (inside the delete's transaction)."""
    if _has_table(db):
        db.execute("DELETE FROM scores WHERE name = ? AND version = ?", (name, version))


def comparison(registry: Any, name: str) -> list[dict[str, Any]]:
    """The scores table of adapter ``name``: one row per version (and ``base``) per task setting.

    Each row: ``task``, ``metric``, ``filter``, ``num_fewshot``, ``limit``, ``model`` (``"base"`` or ``name@N``),
    ``value``, ``stderr``, ``vs_base`` (the difference to the base's value; ``None`` for the base or with no base
    score), ``significant`` (``|vs_base| > 2 * sqrt(stderr**2 + base_stderr**2)``, the usual two-standard-error
    test for the difference of two independent means; ``None`` where a standard error is missing).
    Raises :class:`RegistryError` for an unknown adapter, or a version (``quill@2``) given for its adapter's name.

    Example:
        >>> comparison(Registry(), "quill")[1]["significant"]  # doctest: +SKIP
        True
    """
    if isinstance(name, str) and "@" in name and not name.startswith("hf://"):  # a version given for its adapter
        adapter = name.split("@", 1)[0]
        raise RegistryError(f"{name!r} is a version; the scores table is per adapter, every version and the base: "
                            f"give its name ({adapter!r}, e.g. finetune registry scores {adapter}); one version's "
                            f"scores: finetune registry show {name}")
    registry.versions(name)  # an unknown name is one line naming the adapters there are
    table: list[dict[str, Any]] = []
    groups: dict[tuple, dict[int, dict[str, Any]]] = {}
    for row in _rows(registry, name):
        key = (row["task"], row["metric"], row["filter"], row["num_fewshot"], json.dumps(row["limit"]))
        groups.setdefault(key, {})[row["version"]] = row
    for (task, metric, filt, shots, _), by_version in groups.items():
        base = by_version.get(BASE_VERSION)
        for number in sorted(by_version):
            row = by_version[number]
            diff = significant = None
            if base is not None and number != BASE_VERSION:
                diff = row["value"] - base["value"]
                if row.get("stderr") is not None and base.get("stderr") is not None:
                    significant = abs(diff) > 2 * math.sqrt(row["stderr"] ** 2 + base["stderr"] ** 2)
            table.append({"task": task, "metric": metric, "filter": filt, "num_fewshot": shots, "limit": row["limit"],
                          "model": "base" if number == BASE_VERSION else f"{name}@{number}", "value": row["value"],
                          "stderr": row.get("stderr"), "vs_base": diff, "significant": significant})
    return table


def model_index(name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Hub model card's ``model-index`` entries for a version's score rows (one result per task)."""
    results = []
    for task in sorted({r["task"] for r in rows}):
        metrics = [{"type": r["metric"], "value": r["value"], "name": f"{r['metric']} ({r['num_fewshot']}-shot)"
                    + (f", stderr {r['stderr']:.4g}" if r.get("stderr") is not None else "")}
                   for r in rows if r["task"] == task]
        results.append({"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task},
                        "metrics": metrics, "source": {"name": "lm-evaluation-harness via finetune bench",
                                                       "url": "https://github.com/EleutherAI/lm-evaluation-harness"}})
    if not results:
        return []
    return [{"name": name, "results": results}]

