"""The filesystem rules in one place: atomic writes (a file or folder appears whole or not at all), the SDK's cache
root and file hashing. Every file the SDK writes goes through :func:`atomic_path` or :func:`staged_directory`, except
the ratings files ``finetune feedback`` appends to one fsynced row at a time (:mod:`finetune_sdk.feedback.ratings_file`)."""

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


def shareable_tree(root: Path) -> None:
    """Give ``root`` and every folder and file under it the permissions of a normal ``mkdir``/``open`` (0777/0666
    less the umask; a file its owner may execute keeps execute bits).

    Writers that stage through temporary files create them 0600 and keep that mode: safetensors 0.8's
    ``save_file`` (so PEFT's and transformers' ``save_pretrained``) and ``tempfile``. A result, export, merge,
    checkpoint or registry checkout is for sharing, so every entry gets the umask's permissions before it is
    renamed into place.
    """
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for folder, folders, files in os.walk(root):
        for name in folders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


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
    written), nothing is renamed and the temporary file is gone. A full disk or a permission error (also one
    reported by safetensors' writer) is a one-line :class:`~finetune_sdk.errors.FinetuneError`.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("whole")
        >>> target.read_text(), [p.name for p in target.parent.iterdir()]
        ('whole', ['a.txt'])
    """
    from finetune_sdk.training.output_paths import user_os_error

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise user_os_error(exc, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            shareable(tmp)
            os.replace(tmp, path)
    except Exception as exc:  # a full disk (also inside safetensors' writer) is one line; nothing is left
        written = tmp.stat().st_size if tmp.is_file() else None
        tmp.unlink(missing_ok=True)
        error = user_os_error(exc, path, written)
        if error is exc:
            raise
        raise error from None
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
    be an earlier result of this SDK or an empty folder (see :mod:`finetune_sdk.training.output_paths`), else a
    :class:`~finetune_sdk.errors.ConfigError` is raised and nothing is touched. Disk-full and permission errors
    (``OSError``, or safetensors' ``SafetensorError`` wrapping one) become one-line
    :class:`~finetune_sdk.errors.FinetuneError` s naming the folder, the space free there and what the save had
    written (:func:`finetune_sdk.training.output_paths.user_os_error`).
    """
    from finetune_sdk.training.output_paths import (check_output_path, folder_bytes, log_replacement, scratch_dir,
                                           user_os_error)

    final = Path(final)
    if replace_only_results:
        check_output_path(final)
    staging = scratch_dir(final, "staging")
    try:
        yield staging
        shareable_tree(staging)
        old = None
        if final.exists():
            if replace_only_results and check_output_path(final):
                log_replacement(final)
            old = scratch_dir(final, "old")
            os.rename(final, old / final.name)
        os.rename(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:  # a full disk (also inside safetensors' writer), permissions: one line
        error = user_os_error(exc, final, folder_bytes(staging))
        if error is exc:
            raise
        raise error from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
