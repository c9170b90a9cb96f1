"""The registry page's data: adapters, versions, aliases, tags and lineage, through the registry's public API
(:class:`finetune_sdk.registry.Registry`: ``list``, ``versions``, ``alias``, ``verify``). Nothing of a Hub login is
read or returned: a version's ``source`` is shown only as the Hub repository or folder it came from.

Example:
    >>> overview(Path("/tmp/empty-registry"))["adapters"]  # doctest: +SKIP
    []
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_sdk.errors import IntegrityError


def _version(v: Any) -> dict[str, Any]:
    m = v.manifest or {}
    metrics = m.get("metrics") or {}
    return {"ref": v.ref, "name": v.name, "version": v.version, "created": v.created, "description": v.description,
            "parent": v.parent, "aliases": list(v.aliases), "tags": list(v.tags), "source": v.source,
            "technique": m.get("technique"), "objective": m.get("objective"), "formatter": m.get("formatter"),
            "base_model": (m.get("base_model") or {}).get("id") if isinstance(m.get("base_model"), dict)
            else m.get("base_model"),
            "stage": m.get("stage"), "federated": m.get("federated"),
            "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
            "files": len(v.files)}


def _run_key(metrics: Any) -> tuple[Any, ...] | None:
    if not isinstance(metrics, dict) or metrics.get("train_runtime") is None:
        return None
    return (metrics.get("train_runtime"), metrics.get("train_loss"), metrics.get("train_steps"))


def runs_by_result(runs: Any) -> dict[tuple[Any, ...], str]:
    """Finished runs of a :class:`~finetune_sdk.studio.runs.RunsFolder` by their result's (runtime, loss, steps):
    a published version whose manifest has the same metrics came from that run."""
    found = {}
    for name in runs.names() if runs is not None else []:
        events = runs.events(name)
        if events and events[-1].get("event") == "end" and (key := _run_key(events[-1].get("metrics"))):
            found[key] = name
    return found


def overview(home: Path, runs: Any = None) -> dict[str, Any]:
    """Every adapter with its versions (oldest first) and the lineage edges ``[parent ref, child ref]``; with
    ``runs`` (a RunsFolder), each version names the run it came from (``run``) when that run is in the folder."""
    from finetune_sdk.registry import Registry

    registry = Registry(home)
    adapters, edges = [], []
    behind = runs_by_result(runs)
    for entry in registry.list():
        versions = [{**_version(v), "run": behind.get(_run_key((v.manifest or {}).get("metrics")) or ())}
                    for v in registry.versions(entry["name"])]
        adapters.append({**entry, "versions": versions})
        edges += [[v["parent"], v["ref"]] for v in versions if v["parent"]]
    return {"home": str(registry.home), "adapters": adapters, "edges": edges}


def set_alias(home: Path, ref: str, alias: str) -> dict[str, Any]:
    """``Registry.alias(ref, alias)``; returns the version the alias now points at."""
    from finetune_sdk.registry import Registry

    return _version(Registry(home).alias(ref, alias))


def verify(home: Path, ref: str) -> dict[str, Any]:
    """``Registry.verify(ref)``: ``{"ok": true}`` when every stored file matches its sha256, else the bad file."""
    from finetune_sdk.registry import Registry

    try:
        version = Registry(home).verify(ref)
    except IntegrityError as exc:
        return {"ref": ref, "ok": False, "error": str(exc)}
    return {"ref": version.ref, "ok": True, "files": len(version.files)}
