"""Reading the user's text files (data, configs, prompts): UTF-8 with or without a BOM, errors naming the line."""

from __future__ import annotations

import codecs
from pathlib import Path

from finetune_sdk.errors import DataError, FinetuneError


def read_text(path: str | Path, error: type[FinetuneError] = DataError) -> str:
    """The text of ``path`` decoded as UTF-8; a leading BOM (as Excel writes it) is dropped.

    Raises:
        ``error`` (:class:`~finetune_sdk.errors.DataError` by default): a missing or unreadable file, or bytes
        that are not UTF-8, naming the file, line and column.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
        >>> _ = path.write_bytes(b'\\xef\\xbb\\xbf{"text": "ok"}\\n{"text": "caf\\xe9"}\\n')
        >>> read_text(path)
        Traceback (most recent call last):
        finetune_sdk.errors.DataError: .../rows.jsonl line 2: not valid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise error(f"{path}: can't read it ({exc.strerror or type(exc).__name__})") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); save the "
                    "file as UTF-8") from None
