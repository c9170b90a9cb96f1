"""The local adapter registry: an SQLite index plus a content-addressed blob store, under one home folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetune_sdk.errors import FinetuneError, IntegrityError, RegistryError
from finetune_sdk.fsutil import staged_directory
from finetune_sdk.network import resolve_endpoint
from finetune_sdk.training.manifest import read_manifest
from finetune_sdk.registry import artifacts as artifact_rows
from finetune_sdk.registry import scores as score_rows
from finetune_sdk.registry.blobs import BlobStore
from finetune_sdk.registry.index import Index
from finetune_sdk.registry.locks import collecting, publishing
from finetune_sdk.registry.refs import Ref, inside, parse_ref, validate_name

HOME_ENV = "FINETUNE_SDK_REGISTRY"
#: Files a result folder may hold that the registry doesn't keep (PEFT's boilerplate card: push writes its own).
SKIPPED_FILES = frozenset({"README.md"})


def default_home() -> Path:
    """``$FINETUNE_SDK_REGISTRY``, else ``$XDG_CACHE_HOME/finetune_sdk/registry`` (``~/.cache/...``)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "finetune_sdk" / "registry"


def _failpoint(name: str) -> None:
    """Crash-test hooks: ``FINETUNE_SDK_REGISTRY_FAILPOINT=<name>`` SIGKILLs this process here;
    ``FINETUNE_SDK_REGISTRY_PAUSE=<name>:<seconds>`` sleeps here (to widen a race window in tests)."""
    if os.environ.get("FINETUNE_SDK_REGISTRY_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    where, _, seconds = os.environ.get("FINETUNE_SDK_REGISTRY_PAUSE", "").partition(":")
    if where == name:
        time.sleep(float(seconds or 0))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable published version of an adapter (or of any result: full model, classifier head)."""

    name: str
    version: int
    created: str
    description: str
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]]
    parent: str | None = None
    aliases: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    source: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        """What ``show`` prints: the record without the raw manifest, plus the fields users ask about."""
        m = self.manifest
        return {
            "ref": self.ref, "created": self.created, "description": self.description, "parent": self.parent,
            "aliases": self.aliases, "tags": self.tags, "technique": m.get("technique"),
            "quantizer": m.get("quantizer"), "formatter": m.get("formatter"), "base_model": m.get("base_model"),
            "dataset": m.get("dataset"), "options": m.get("options"), "metrics": m.get("metrics"),
            "libraries": m.get("libraries"), "files": self.files, "source": self.source,
        }


class LocalRegistry:
    """Versions, aliases, tags and lineage of fine-tuning results, stored under ``home`` (no network: pushing and
    pulling are :class:`finetune_sdk.registry.client.Registry`'s, the class users hold).

    Example (a fresh home lists nothing and creates nothing; the example of use is on ``Registry``):
        >>> import tempfile, pathlib
        >>> home = pathlib.Path(tempfile.mkdtemp()) / "registry"
        >>> LocalRegistry(home).list(), home.exists()
        ([], False)
    """

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        if self.home.exists() and not self.home.is_dir():
            raise RegistryError(f"registry home {self.home} is a file, not a folder; point {HOME_ENV} (or --home) "
                                "at a folder")
        # nothing is created here (reads leave no trace): the first write creates the home and its index
        self.blobs = BlobStore(self.home / "blobs")
        self.index = Index(self.home / "index.db")

    # -- publishing ------------------------------------------------------------------------------------------
    def publish(self, result_or_dir: Any, name: str, *, description: str = "", aliases: list[str] | tuple = (),
                tags: list[str] | tuple = (), parent: str | None = None) -> AdapterVersion:
        """Store a result folder (or ``FitResult``) as the next version of ``name``; atomic and concurrent-safe."""
        directory = Path(getattr(result_or_dir, "output_dir", result_or_dir))
        validate_name(name)
        for alias in aliases:
            validate_name(alias, "alias")
            if alias.isdigit() or (alias[:1] == "v" and alias[1:].isdigit()):
                raise RegistryError(f"alias {alias!r} looks like a version number; pick a word such as 'production'")
        if not directory.is_dir():
            raise RegistryError(f"{directory}: no such result folder to publish")
        manifest = read_manifest(directory)
        parent_ref = self.resolve(parent).ref if parent else None
        from finetune_sdk.progress import activity

        with publishing(self.home):  # garbage collection waits until this version's row is in
            with activity(f"publishing {directory.name} as the next version of {name}"):
                files = self._store_files(directory)
            _failpoint("after_blobs")
            return self._insert(name, None, manifest, files, description, parent_ref, list(aliases), list(tags),
                                None)

    def _store_files(self, directory: Path) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = path.relative_to(directory).as_posix()
            if rel in SKIPPED_FILES or any(part.startswith(".") for part in Path(rel).parts):
                continue
            try:
                sha, size = self.blobs.put(path)
            except OSError as exc:  # disk full, permissions: one line; the partial blob is already removed
                from finetune_sdk.training.output_paths import user_os_error

                raise user_os_error(exc, self.blobs.root) from None
            files[rel] = {"sha256": sha, "size": size}
        return files

    def _insert(self, name: str, version: int | None, manifest: dict[str, Any], files: dict[str, Any],
                description: str, parent: str | None, aliases: list[str], tags: list[str],
                source: str | None) -> AdapterVersion:
        with self.index.write() as db:
            db.execute("INSERT OR IGNORE INTO adapters (name, created) VALUES (?, ?)", (name, _now()))
            next_version = db.execute("SELECT next_version FROM adapters WHERE name = ?", (name,)).fetchone()[0]
            version = next_version if version is None else version
            db.execute("UPDATE adapters SET next_version = ? WHERE name = ?", (max(next_version, version + 1), name))
            created = _now()
            db.execute(
                "INSERT INTO versions (name, version, created, description, manifest, files, parent, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, created, description, json.dumps(manifest, sort_keys=True),
                 json.dumps(files, sort_keys=True), parent, source))
            for alias in aliases:
                db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (name, alias, version))
            for tag in tags:
                db.execute("INSERT OR IGNORE INTO tags VALUES (?, ?, ?)", (name, version, tag))
            _failpoint("during_index")
        return self.resolve(f"{name}@{version}")

    # -- reading ---------------------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        """Every adapter with its latest version, version count and aliases."""
        with self.index.read() as db:
            rows = db.execute(
                "SELECT a.name, MAX(v.version) AS latest, COUNT(v.version) AS versions, MAX(v.created) AS updated "
                "FROM adapters a JOIN versions v ON v.name = a.name GROUP BY a.name ORDER BY a.name").fetchall()
            aliases = db.execute("SELECT name, alias, version FROM aliases ORDER BY alias").fetchall()
        out = []
        for row in rows:
            out.append({"name": row["name"], "latest": row["latest"], "versions": row["versions"],
                        "updated": row["updated"],
                        "aliases": {a["alias"]: a["version"] for a in aliases if a["name"] == row["name"]}})
        return out

    def versions(self, name: str) -> list[AdapterVersion]:
        """All versions of ``name``, oldest first."""
        validate_name(name)
        with self.index.read() as db:
            numbers = [r[0] for r in db.execute(
                "SELECT version FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()]
        if not numbers:
            raise self._unknown_adapter(name)
        return [self.resolve(f"{name}@{n}") for n in numbers]

    def resolve(self, ref: str | Ref) -> AdapterVersion:
        """The version a local reference points at (``name`` means its latest version)."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.is_hub:
            version = self._remote_version(parsed)
            if version is None:
                raise RegistryError(f"{parsed} has not been pulled; run `finetune registry pull {parsed}`")
            return version
        name = parsed.name
        with self.index.read() as db:
            if parsed.alias is not None:
                row = db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?",
                                 (name, parsed.alias)).fetchone()
                if row is None:
                    known = [r[0] for r in db.execute("SELECT alias FROM aliases WHERE name = ?", (name,))]
                    if not db.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone():
                        raise self._unknown_adapter(name)
                    raise RegistryError(f"adapter {name!r} has no alias {parsed.alias!r}; aliases: "
                                        f"{', '.join(sorted(known)) or 'none'}")
                number = row[0]
            elif parsed.version is not None:
                number = parsed.version
            else:
                number = db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()[0]
                if number is None:
                    raise self._unknown_adapter(name)
            row = db.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, number)).fetchone()
            if row is None:
                existing = [r[0] for r in db.execute("SELECT version FROM versions WHERE name = ? ORDER BY version",
                                                     (name,))]
                if not existing:
                    raise self._unknown_adapter(name)
                raise RegistryError(f"adapter {name!r} has no version {number}; versions: "
                                    f"{', '.join(map(str, existing))}")
            aliases = [r[0] for r in db.execute("SELECT alias FROM aliases WHERE name = ? AND version = ? "
                                                "ORDER BY alias", (name, number))]
            tags = [r[0] for r in db.execute("SELECT tag FROM tags WHERE name = ? AND version = ? ORDER BY tag",
                                             (name, number))]
        return AdapterVersion(name=name, version=number, created=row["created"], description=row["description"],
                              manifest=json.loads(row["manifest"]), files=json.loads(row["files"]),
                              parent=row["parent"], aliases=aliases, tags=tags, source=row["source"])

    def show(self, ref: str) -> dict[str, Any]:
        """A version's record with its lineage (parent, grandparent...)."""
        version = self.resolve(ref)
        info = version.summary()
        lineage, parent = [], version.parent
        while parent:
            lineage.append(parent)
            try:
                parent = self.resolve(parent).parent
            except RegistryError:
                break
        info["lineage"] = lineage
        info["scores"] = score_rows.scores(self, version.ref)
        return info

    def diff(self, ref_a: str, ref_b: str) -> dict[str, Any]:
        """What differs between two versions: options, metrics, data fingerprint, base model, technique..."""
        a, b = self.resolve(ref_a), self.resolve(ref_b)
        out: dict[str, Any] = {"a": a.ref, "b": b.ref}
        for section in ("options", "metrics"):
            left, right = a.manifest.get(section) or {}, b.manifest.get(section) or {}
            changed = {k: [left.get(k), right.get(k)] for k in sorted(set(left) | set(right))
                       if left.get(k) != right.get(k)}
            out[section] = changed
        for key in ("technique", "quantizer", "formatter", "base_model"):
            if a.manifest.get(key) != b.manifest.get(key):
                out[key] = [a.manifest.get(key), b.manifest.get(key)]
        fa, fb = (a.manifest.get("dataset") or {}).get("fingerprint"), (b.manifest.get("dataset") or {}).get(
            "fingerprint")
        if fa != fb:
            out["dataset_fingerprint"] = [fa, fb]
        changed_files = sorted(k for k in set(a.files) | set(b.files) if a.files.get(k) != b.files.get(k))
        out["files"] = changed_files
        return out

    # -- files -----------------------------------------------------------------------------------------------
    def verify(self, ref: str) -> AdapterVersion:
        """Re-hash every stored file of a version; an :class:`IntegrityError` names the first bad file."""
        version = self.resolve(ref)
        for rel, info in version.files.items():
            self.blobs.verify(info["sha256"], f"{version.ref}: {rel}")
        return version

    def path(self, ref: str) -> Path:
        """A folder holding the version's files, checked against their hashes (what ``load`` reads).

        Every call re-hashes the stored files (as :meth:`verify`) and the checkout it serves (a size or time check
        would miss a changed byte): changed stored files are an :class:`IntegrityError` even while an earlier
        checkout is intact; a changed checkout (or one holding any other file) is rebuilt. Two sha256 passes
        (figures in docs/registry.md).
        """
        version = self.verify(ref)
        folder = self.home / "checkouts" / version.name / str(version.version)
        if folder.is_dir() and self._checkout_ok(folder, version):
            return folder
        with publishing(self.home), staged_directory(folder, replace_only_results=False) as staging:
            for rel, info in version.files.items():
                self.blobs.copy_to(info["sha256"], inside(staging, rel, version.ref), f"{version.ref}: {rel}")
        return folder

    def _checkout_ok(self, folder: Path, version: AdapterVersion) -> bool:
        # exactly the version's files: a file added beside them (a special_tokens_map.json, an added_tokens.json)
        # would change what loads, so a checkout holding anything else is rebuilt
        present = {item.relative_to(folder).as_posix() for item in folder.rglob("*")
                   if item.is_symlink() or not item.is_dir()}
        return present == set(version.files) and all(
            self.blobs.holds(folder / rel, info["sha256"], info["size"]) for rel, info in version.files.items())

    # -- changing aliases, tags, versions -------------------------------------------------------------------
    def alias(self, ref: str, alias: str) -> AdapterVersion:
        """Point ``alias`` (``production``, ``staging``...) at the version ``ref`` resolves to."""
        validate_name(alias, "alias")
        if alias.isdigit() or (alias[:1] == "v" and alias[1:].isdigit()):
            raise RegistryError(f"alias {alias!r} looks like a version number; pick a word such as 'production'")
        version = self.resolve(ref)
        with self.index.write() as db:
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (version.name, alias, version.version))
        return self.resolve(version.ref)

    def unalias(self, name: str, alias: str) -> None:
        with self.index.write() as db:
            if not db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias)).rowcount:
                raise RegistryError(f"adapter {name!r} has no alias {alias!r}")

    def tag(self, ref: str, *tags: str) -> AdapterVersion:
        """Add free-form tags to a version."""
        version = self.resolve(ref)
        with self.index.write() as db:
            for tag in tags:
                if not tag or any(ord(c) < 32 for c in tag):
                    raise RegistryError(f"tag {tag!r} is empty or has control characters")
                db.execute("INSERT OR IGNORE INTO tags VALUES (?, ?, ?)", (version.name, version.version, tag))
        return self.resolve(version.ref)

    def delete(self, ref: str, *, force: bool = False) -> AdapterVersion:
        """Delete a version; refused while an alias points at it unless ``force`` (which drops the aliases).

        Version numbers are never reused; blobs still used by other versions stay.
        """
        version = self.resolve(ref)
        if version.aliases and not force:
            raise RegistryError(f"{version.ref} is aliased as {', '.join(version.aliases)}; move the alias first "
                                "or delete with force")
        with self.index.write() as db:
            db.execute("DELETE FROM aliases WHERE name = ? AND version = ?", (version.name, version.version))
            db.execute("DELETE FROM tags WHERE name = ? AND version = ?", (version.name, version.version))
            db.execute("DELETE FROM remotes WHERE name = ? AND version = ?", (version.name, version.version))
            db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (version.name, version.version))
            artifact_rows.forget(db, version.name, version.version)
            score_rows.forget(db, version.name, version.version)
        shutil.rmtree(self.home / "checkouts" / version.name / str(version.version), ignore_errors=True)
        self.collect_garbage()
        return version

    def collect_garbage(self) -> int:
        """Remove blobs no version refers to (left by deletes or interrupted publishes); return how many."""
        if not self.home.is_dir():
            return 0
        with collecting(self.home):  # no publish is between storing its blobs and recording its version
            with self.index.read() as db:
                used = {info["sha256"] for (files,) in db.execute("SELECT files FROM versions")
                        for info in json.loads(files).values()}
                used |= artifact_rows.used_blobs(db)
            removed = 0
            if self.blobs.root.is_dir():
                for path in self.blobs.root.glob("*/*"):
                    if path.name not in used:
                        path.unlink(missing_ok=True)
                        removed += 1
                for partial in self.blobs.root.glob(".incoming-*"):  # no publish runs: these are a killed one's
                    partial.unlink(missing_ok=True)
        return removed

    # -- artifacts (files made from a version later, such as a GGUF export) ---------------------------------
    def attach(self, ref: str, path: str | os.PathLike[str], *, kind: str = "gguf",
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store a file made from version ``ref`` (a GGUF export) as its artifact; see ``registry.artifacts``."""
        return artifact_rows.attach(self, ref, path, kind=kind, metadata=metadata)

    def artifacts(self, ref: str) -> dict[str, dict[str, Any]]:
        """The artifacts of version ``ref`` by file name: sha256, size, kind and metadata (e.g. quantization)."""
        return artifact_rows.artifacts(self, ref)

    def artifact_path(self, ref: str, file: str) -> Path:
        """A hash-checked copy of one artifact of version ``ref``."""
        return artifact_rows.artifact_path(self, ref, file)

    # -- benchmark scores (finetune bench) -------------------------------------------------------------------
    def scores(self, ref: str) -> list[dict[str, Any]]:
        """The benchmark scores stored for version ``ref`` (task, metric, value, stderr...; see ``registry.scores``)."""
        return score_rows.scores(self, ref)

    def score_table(self, name: str) -> list[dict[str, Any]]:
        """Every version's scores and the base's per task, with the difference to the base and whether it exceeds
        twice the combined standard error (what ``finetune registry scores NAME`` prints); see
        :func:`finetune_sdk.registry.scores.comparison`."""
        return score_rows.comparison(self, name)

    # -- Hub references already pulled (pushing and pulling: registry.client.Registry) -----------------------
    def _remote_version(self, ref: Ref, endpoint: str | None = None) -> AdapterVersion | None:
        with self.index.read() as db:
            row = db.execute("SELECT name, version FROM remotes WHERE endpoint = ? AND repo_id = ? AND revision = ?",
                             (resolve_endpoint(endpoint), ref.repo_id, ref.revision or "main")).fetchone()
        if row is None:
            return None
        try:
            return self.resolve(f"{row['name']}@{row['version']}")
        except RegistryError:
            return None

    def _unknown_adapter(self, name: str) -> RegistryError:
        with self.index.read() as db:
            names = [r[0] for r in db.execute("SELECT DISTINCT name FROM versions")]
        from finetune_sdk.errors import closest

        return RegistryError(f"no adapter named {name!r} in the registry at {self.home}{closest(name, names)}")


__all__ = ["AdapterVersion", "FinetuneError", "IntegrityError", "LocalRegistry", "default_home"]
