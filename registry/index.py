"""The SQLite index of adapters, versions, aliases, tags and pulled remotes."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune_sdk.errors import FinetuneError, RegistryError

SCHEMA_VERSION = 1
#: An SQLite I/O error with less than this free beside the index is a full disk.
FULL_BELOW = 1 << 20
#: SQLite errors of the machine, not of the SDK's SQL: a write's error of these kinds is one line.
ENVIRONMENT_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CORRUPT",
                      "SQLITE_NOTADB", "SQLITE_READONLY", "SQLITE_CANTOPEN")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY, created TEXT NOT NULL, next_version INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES adapters(name), version INTEGER NOT NULL, created TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', manifest TEXT NOT NULL, files TEXT NOT NULL, parent TEXT,
    source TEXT, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, alias));
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL, version INTEGER NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (name, version, tag));
CREATE TABLE IF NOT EXISTS remotes (
    endpoint TEXT NOT NULL, repo_id TEXT NOT NULL, revision TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, commit_sha TEXT, PRIMARY KEY (endpoint, repo_id, revision));
"""


class Index:
    """A thin wrapper over one SQLite file; every write is one ``BEGIN IMMEDIATE`` transaction.

    Reading never creates anything: while the file does not exist, reads see an empty index (in memory) and only
    the first write creates the file (and its folder).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise RegistryError(f"registry index {self.path} is a folder; move it aside")
        if self.path.exists():
            self._open_schema(self.connect)

    def _open_schema(self, connect) -> None:  # type: ignore[no-untyped-def]
        db = None
        try:
            db = connect()
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'versions'").fetchone():
                # one transaction: a process racing this one sees every table or none
                db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nINSERT OR IGNORE INTO meta VALUES ('schema_version', "
                                 f"'{SCHEMA_VERSION}');\nCOMMIT;")
            db.execute("SELECT name, version, files FROM versions LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise self.error(exc) from None
        finally:
            if db is not None:
                db.close()

    def error(self, exc: sqlite3.DatabaseError) -> FinetuneError:
        """SQLite's error as one line: a full disk (``SQLITE_FULL``, or an I/O error with under 1 MiB free: SQLite
        grows the WAL's shared-memory file even to read) is the disk-full error, another I/O error names the disk,
        and only the rest (``SQLITE_CORRUPT``, not a database...) calls the index damaged."""
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            try:
                full = name.startswith("SQLITE_FULL") or shutil.disk_usage(self.path.parent).free < FULL_BELOW
            except OSError:
                full = name.startswith("SQLITE_FULL")
            if full:
                from finetune_sdk.training.output_paths import user_os_error

                return user_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), self.path)
            return RegistryError(f"can't use the registry index {self.path}: {exc} ({name}); nothing was changed: "
                                 "check the disk holding it")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return RegistryError(f"registry index {self.path} is busy ({exc}): another process held it for over 60 s; "
                                 "nothing was changed: try again")
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
            return RegistryError(f"can't write the registry index {self.path} ({exc}); nothing was changed: point "
                                 "FINETUNE_SDK_REGISTRY (or --home) at a writable folder")
        return RegistryError(f"registry index {self.path} is damaged ({exc}); move it aside (the blobs stay) or "
                             "restore it from a backup")

    def create(self) -> None:
        """Create the index file (and the registry home) when missing: the first write does this. Also when the
        file exists: another process's first write may have made it without its tables yet."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"can't create the registry home {self.path.parent} ({exc.strerror or exc}); point "
                                "FINETUNE_SDK_REGISTRY (or --home) at a writable folder") from None
        self._open_schema(self.connect)

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A serialised write transaction: committed whole on success, rolled back on any error or crash."""
        self.create()
        try:
            db = self.connect()
        except sqlite3.DatabaseError as exc:
            raise self.error(exc) from None
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not (getattr(exc, "sqlite_errorname", "") or "").startswith(ENVIRONMENT_ERRORS):
                raise  # a constraint or SQL error is the SDK's bug: its traceback stays
            raise self.error(exc) from None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection to read with; an empty in-memory index while the file does not exist (nothing is created)."""
        if self.path.exists():
            try:
                db = self.connect()
            except sqlite3.DatabaseError as exc:
                raise self.error(exc) from None
        else:
            db = sqlite3.connect(":memory:", isolation_level=None)
            db.row_factory = sqlite3.Row
            db.executescript(SCHEMA)
        try:
            yield db
        finally:
            db.close()
