"""Cross-process locks that keep garbage collection away from publishes in progress.

Publishing stores blobs first and records the version in the index afterwards; between the two, the blobs are
referenced by no version. Every publish (and pull, and checkout) therefore holds a *shared* lock on
``<home>/.gc.lock`` from its first blob to its index row, and garbage collection takes the *exclusive* lock: it
waits for publishes in progress and they wait for it, while publishers never wait for each other. The locks are
``flock`` locks, released by the kernel when a process dies, so a SIGKILLed publisher never blocks anyone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune_sdk.errors import RegistryError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the registry's concurrency guarantee is POSIX-only
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".gc.lock"


@contextmanager
def _flock(home: Path, mode: int) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    try:
        Path(home).mkdir(parents=True, exist_ok=True)  # only writes take locks: they create the home
        fd = os.open(Path(home) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RegistryError(f"can't create the registry home {home} ({exc.strerror or exc}); point "
                            "FINETUNE_SDK_REGISTRY (or --home) at a writable folder") from None
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def publishing(home: Path) -> Any:
    """Held while blobs are stored and until their version is in the index (shared with other publishers)."""
    return _flock(home, fcntl.LOCK_SH if fcntl else 0)


def collecting(home: Path) -> Any:
    """Held while unreferenced blobs are removed (exclusive: no publish is between its blobs and its row)."""
    return _flock(home, fcntl.LOCK_EX if fcntl else 0)
