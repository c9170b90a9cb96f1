"""A content-addressed store of files by sha256: identical files are stored once."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from finetune_sdk.errors import IntegrityError

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class BlobStore:
    """Files under ``root/ab/abcdef...`` named by their sha256; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, source: Path) -> tuple[str, int]:
        """Store ``source``; return (sha256, size). The hash is of the bytes actually copied."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=self.root)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            target = self.path(sha)
            if target.is_file():
                os.unlink(tmp)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
            return sha, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def verify(self, sha256: str, label: str) -> None:
        """Raise :class:`IntegrityError` naming ``label`` when the blob is missing or its bytes changed."""
        path = self.path(sha256)
        if not path.is_file():
            raise IntegrityError(f"{label}: stored file is missing ({path})")
        actual = sha256_file(path)
        if actual != sha256:
            raise IntegrityError(f"{label}: stored file is corrupt (sha256 {actual[:12]}..., expected {sha256[:12]}...)")

    def copy_to(self, sha256: str, target: Path, label: str) -> None:
        """Copy a blob to ``target``, checking its hash on the way."""
        self.verify(sha256, label)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path(sha256), target)
