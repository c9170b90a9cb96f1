"""A content-addressed store of files by sha256: identical files are stored once."""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune_sdk.errors import IntegrityError
from finetune_sdk.fsutil import CHUNK, atomic_path, sha256_file

__all__ = ["BlobStore", "sha256_file"]


class BlobStore:
    """Files under ``root/ab/abcdef...`` named by their sha256; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, source: Path) -> tuple[str, int]:
        """Store ``source``; return (sha256, size). The hash is of the bytes actually copied: a source that changes
        while it is stored is an :class:`IntegrityError`."""
        sha = sha256_file(source)
        target = self.path(sha)
        if target.is_file():
            return sha, target.stat().st_size
        digest, size = hashlib.sha256(), 0
        with atomic_path(target, prefix=".incoming-") as tmp:
            with open(tmp, "wb") as out, open(source, "rb") as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
            if digest.hexdigest() != sha:
                raise IntegrityError(f"{source} changed while it was being stored; publish again")
        return sha, size

    def verify(self, sha256: str, label: str) -> None:
        """Raise :class:`IntegrityError` naming ``label`` when the blob is missing or its bytes changed."""
        path = self.path(sha256)
        if not path.is_file():
            raise IntegrityError(f"{label}: stored file is missing ({path})")
        actual = sha256_file(path)
        if actual != sha256:
            raise IntegrityError(f"{label}: stored file is corrupt (sha256 {actual[:12]}..., expected {sha256[:12]}...)")

    def copy_to(self, sha256: str, target: Path, label: str) -> None:
        """Copy a blob to ``target`` atomically, hashing the bytes as they are copied (one read): a blob that is
        missing or whose bytes changed is an :class:`IntegrityError` naming ``label``, and nothing is left."""
        path = self.path(sha256)
        if not path.is_file():
            raise IntegrityError(f"{label}: stored file is missing ({path})")
        digest = hashlib.sha256()
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as out, open(path, "rb") as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise IntegrityError(f"{label}: stored file is corrupt (sha256 {digest.hexdigest()[:12]}..., "
                                     f"expected {sha256[:12]}...)")

    @staticmethod
    def holds(path: Path, sha256: str, size: int) -> bool:
        """True when the file at ``path`` is exactly the blob ``sha256`` of ``size`` bytes (re-hashed: a size or
        time check would miss a changed byte)."""
        return path.is_file() and not path.is_symlink() and path.stat().st_size == size \
            and sha256_file(path) == sha256
