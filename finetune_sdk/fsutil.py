"""The filesystem rules in one place: atomic writes (a file or folder appears whole or not at all), the SDK's cache
root and file hashing. Every file the SDK writes goes through :func:`atomic_path` or :func:`staged_directory`, except
the ratings files ``finetune feedback`` appends to one fsynced row at a time (:mod:`finetune_sdk.ratings_file`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: Path, folder: bool = False) -> None:
    """Give ``path`` the permissions a normal ``open``/``mkdir`` would: 0666 or 0777 less the umask.

    ``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders, which is right while a file is being
    written but not for a report or result users share.
    """
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


CHUNK = 1 << 20


def cache_root() -> Path:
    """``$FINETUNE_SDK_CACHE`` or ``~/.cache/finetune_sdk``: the one folder every SDK cache lives under
    (``gguf/`` converted GGUF models, ``features/`` classifier features)."""
    return Path(os.environ.get("FINETUNE_SDK_CACHE") or Path.home() / ".cache" / "finetune_sdk")


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path, prefix: str | None = None, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error it is fsynced, given
    shareable permissions and renamed onto ``path`` (readers see the old file or the new one, never half of it).

    On an error, or when the block removed the temporary file itself (``path`` already holds what it would have
    written), nothing is renamed and the temporary file is gone.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("whole")
        >>> target.read_text(), [p.name for p in target.parent.iterdir()]
        ('whole', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            shareable(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` through a temporary file, fsync and rename: readers see the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def staged_directory(final: Path, *, replace_only_results: bool = True) -> Iterator[Path]:
    """Yield a staging folder beside ``final``; on success it replaces ``final`` in one rename.

    On an exception the staging folder is removed and ``final`` is left as it was. An existing ``final`` is moved
    aside first and deleted only after the new one is in place; with ``replace_only_results`` (the default) it must
    be an earlier result of this SDK or an empty folder (see :mod:`finetune_sdk.output_paths`), else a
    :class:`~finetune_sdk.errors.ConfigError` is raised and nothing is touched. Disk-full and permission errors
    become one-line :class:`~finetune_sdk.errors.FinetuneError` s.
    """
    from finetune_sdk.output_paths import check_output_path, log_replacement, scratch_dir, user_os_error

    final = Path(final)
    if replace_only_results:
        check_output_path(final)
    staging = scratch_dir(final, "staging")
    try:
        yield staging
        shareable(staging, folder=True)
        old = None
        if final.exists():
            if replace_only_results and check_output_path(final):
                log_replacement(final)
            old = scratch_dir(final, "old")
            os.rename(final, old / final.name)
        os.rename(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise user_os_error(exc, final) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
