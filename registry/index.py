"""The SQLite index of adapters, versions, aliases, tags and pulled remotes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune_sdk.errors import RegistryError

SCHEMA_VERSION = 1
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
    """A thin wrapper over one SQLite file; every write is one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise RegistryError(f"registry index {self.path} is a folder; move it aside")
        db = None
        try:
            db = self.connect()
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("SELECT name, version, files FROM versions LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry index {self.path} is damaged ({exc}); move it aside (the blobs stay) or "
                                "restore it from a backup") from None
        finally:
            if db is not None:
                db.close()

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
        db = self.connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        db = self.connect()
        try:
            yield db
        finally:
            db.close()
