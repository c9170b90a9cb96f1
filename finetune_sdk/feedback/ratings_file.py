"""The ratings files ``finetune feedback`` writes: JSON Lines appended one whole row at a time, each row flushed and
fsynced as soon as the person answers, recognised again (and resumed) on the next session.

Three row shapes, the columns the formatters read (no conversion before training):

========================  =======================================  ==========================
rows                      columns                                  trains with
========================  =======================================  ==========================
:data:`KTO_ROWS`          ``prompt``, ``completion``, ``label``     ``formatter="kto"``
:data:`PREFERENCE_ROWS`   ``prompt``, ``chosen``, ``rejected``      ``formatter="preference"``
:data:`SFT_ROWS`          ``prompt``, ``completion``                ``formatter="chatml"``...
========================  =======================================  ==========================

Every row may also carry the optional fields of :data:`RECORD_FIELDS` that trace a rating (who, when, which model,
how it sampled: :mod:`finetune_sdk.feedback.rating_record`); the formatters ignore them. A preference row may carry
``"preference": "tie"`` or ``"both_bad"``: the rater saw both answers and preferred neither; ``chosen``/``rejected``
then hold answer 1 and answer 2 as shown, and the preference formatter skips the row (with a counted note) instead
of training on it.

Why our own writer rather than a library's: the guarantees are about single appends (one ``write`` of one line,
then ``fsync``) and about what may be cut from a file after a crash, which no JSON Lines library promises.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_sdk.data.pairs import UNRANKED  # the preference values of a pair ranked neither way
from finetune_sdk.errors import ConfigError, FinetuneError

logger = logging.getLogger("finetune_sdk")


#: Optional fields any row may carry, and their JSON types: who rated, when (ISO-8601 UTC), the model that answered
#: (``ref``, ``version``, ``manifest_sha256``) and its sampling settings.
RECORD_FIELDS: dict[str, type] = {"rater": str, "rated_at": str, "model": dict, "sampling": dict}


@dataclass(frozen=True)
class RowShape:
    """One kind of ratings row: its required columns (``prompt`` first, as written) and the type of each, plus the
    optional ``extra`` columns it may carry beside :data:`RECORD_FIELDS` (column -> allowed values)."""

    name: str
    columns: tuple[str, ...]
    types: tuple[type, ...]
    formatter: str
    use_hint: str
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def matches(self, row: Any) -> bool:
        if not isinstance(row, dict) or not set(self.columns) <= set(row):
            return False
        if not all(type(row[c]) is t for c, t in zip(self.columns, self.types)):
            return False
        allowed = dict(self.extra)
        for column in set(row) - set(self.columns):
            if column in RECORD_FIELDS:
                if type(row[column]) is not RECORD_FIELDS[column]:
                    return False
            elif column not in allowed or row[column] not in allowed[column]:
                return False
        return True

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.columns)})"


KTO_ROWS = RowShape("thumbs ratings", ("prompt", "completion", "label"), (str, str, bool), "kto",
                    "use it with mode thumbs")
PREFERENCE_ROWS = RowShape("preference pairs", ("prompt", "chosen", "rejected"), (str, str, str), "preference",
                           "use it with mode pairwise", (("preference", UNRANKED),))
SFT_ROWS = RowShape("edited answers", ("prompt", "completion"), (str, str), "chatml",
                    "use it as the edited-answers file (sft_out)")
SHAPES = (KTO_ROWS, PREFERENCE_ROWS, SFT_ROWS)
#: How every row this module writes begins; a torn last line is recognised as ours by it.
ROW_START = b'{"prompt": "'


def encode_row(row: dict[str, Any]) -> bytes:
    """One row as the bytes appended: compact-spaced JSON, UTF-8, ``prompt`` first, one ``\\n`` at the end (newlines
    inside answers are escaped, so a row is always one line).

    Example:
        >>> encode_row({"prompt": "Hi\\nthere", "completion": "Hello", "label": True})
        b'{"prompt": "Hi\\\\nthere", "completion": "Hello", "label": true}\\n'
    """
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class Contents:
    """What a ratings file holds: how many rows per prompt, where its whole rows end, and a torn tail if any."""

    prompts: Counter[str]
    rows: int
    whole_bytes: int
    torn_bytes: int = 0
    missing_newline: bool = False


def read_ratings(path: Path, shape: RowShape) -> Contents:
    """Check that ``path`` is a ratings file of ``shape`` (or empty) and count its rows per prompt.

    The last line may be torn (a crash during an append, power loss): a final piece with no newline that isn't a
    whole JSON row and starts as every row this module writes (``{"prompt": "``), after lines that are all rows of
    ``shape``. Its byte count comes back in ``torn_bytes`` for :class:`RatingsAppender` to cut. A whole row with
    no newline after it is kept (``missing_newline``).

    Raises:
        ConfigError: the file holds anything else: another shape of rows (names the mode that writes them), other
        JSON, text that is not UTF-8, a broken line before the last. The file is never changed.
    """
    data = path.read_bytes()
    whole, _, tail = data.rpartition(b"\n")
    prompts: Counter[str] = Counter()
    lines = whole.split(b"\n") if whole else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        prompts[_row(line, path, number, shape)["prompt"]] += 1
    contents = Contents(prompts, sum(prompts.values()), len(data) - len(tail))
    if not tail.strip():
        return contents
    number = len(lines) + 1
    try:
        json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        if not (tail.startswith(ROW_START) and is_cut_short(tail)):
            raise _foreign(path, number, shape, "ends with a line that is not a JSON row") from None
        contents.torn_bytes = len(tail)
        return contents
    prompts[_row(tail, path, number, shape)["prompt"]] += 1
    contents.rows += 1
    contents.whole_bytes = len(data)
    contents.missing_newline = True
    return contents


def is_cut_short(text: bytes) -> bool:
    """True when ``text`` is the start of a JSON value cut off (the end of the input is what is wrong with it), as a
    crash during a write leaves it; False for complete JSON or JSON broken somewhere before its end.

    Example:
        >>> row = encode_row({"prompt": "café", "completion": "ok", "label": False})
        >>> all(is_cut_short(row[:n]) for n in range(1, len(row) - 1))
        True
        >>> is_cut_short(b'{"prompt": "a", "completion": }'), is_cut_short(row.strip())
        (False, False)
    """
    for cut in range(4):  # the write may have stopped inside a multi-byte character
        try:
            decoded = text[:len(text) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    try:
        json.loads(decoded)
    except json.JSONDecodeError as exc:
        rest = decoded[exc.pos:]  # a cut literal (``fal``) is reported where the literal starts
        return (exc.pos >= len(decoded.rstrip()) or exc.msg.startswith("Unterminated string")
                or any(word.startswith(rest) for word in ("true", "false", "null")))
    return False


def _row(line: bytes, path: Path, number: int, shape: RowShape) -> dict[str, Any]:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _foreign(path, number, shape, "is not UTF-8 text") from None
    except json.JSONDecodeError:
        raise _foreign(path, number, shape, "is not a JSON row") from None
    if shape.matches(row):
        return row
    other = next((s for s in SHAPES if s.matches(row)), None)
    if other is not None:
        raise ConfigError(f"{path} holds {other.describe()}, not {shape.describe()}: "
                          f"{other.use_hint}, or give another file (this one is left as it is)")
    raise _foreign(path, number, shape, f"is not one of the {shape.name} finetune feedback writes")


def _foreign(path: Path, number: int, shape: RowShape, why: str) -> ConfigError:
    return ConfigError(f"{path} line {number} {why} ({', '.join(shape.columns)}); it is left as it is: give "
                       "another output file")


def check_output_file(path: Path, what: str) -> None:
    """The checks that need no reading: a folder that exists, a path that is not a folder."""
    if not path.parent.is_dir():
        raise ConfigError(f"{what} {path}: folder {path.parent} does not exist; create it or choose another path")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{what} {path} is a folder or special file, not a ratings file; give a .jsonl path")


class RatingsAppender:
    """Appends rows of one shape to a ratings file: each row one ``write`` then ``fsync``, so a crash loses at most
    the row being written, and a later session cuts that torn row (and nothing else) before appending.

    The file is locked (``flock``, where the system has it) for the session, so two sessions never interleave rows;
    with ``wait_seconds`` a second writer waits that long for the lock instead of being refused (the studio opens
    the file for each rating, so pages rating at once take turns).
    A file this appender created and left empty is removed on :meth:`close`.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ratings.jsonl"
        >>> with RatingsAppender(path, KTO_ROWS) as ratings:
        ...     ratings.append({"prompt": "Hi", "completion": "Hello", "label": True})
        >>> RatingsAppender(path, KTO_ROWS).open().prompts
        Counter({'Hi': 1})
    """

    def __init__(self, path: str | Path, shape: RowShape, what: str = "output file", *,
                 wait_seconds: float = 0.0) -> None:
        self.path = Path(path)
        self.wait_seconds = wait_seconds  # > 0: wait up to this long for another writer's lock (the studio)
        self.shape = shape
        self.what = what
        self.fd: int | None = None
        self.created = False
        self.appended = 0
        self.contents = Contents(Counter(), 0, 0)

    def open(self) -> Contents:
        """Check and lock the file (creating it when missing), cut a torn last row; returns what it held."""
        check_output_file(self.path, self.what)
        self.created = not self.path.exists()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ConfigError(f"{self.what} {self.path}: can't open it ({exc.strerror})") from None
        try:
            self._lock()
            contents = self.contents = read_ratings(self.path, self.shape)
            if contents.torn_bytes:
                os.ftruncate(self.fd, contents.whole_bytes)
                os.fsync(self.fd)
                logger.warning("%s: cut an unfinished last row (%d bytes) left by an interrupted session",
                               self.path, contents.torn_bytes)
            elif contents.missing_newline:
                self._write(b"\n")
            if self.created:
                _fsync_folder(self.path.parent)
        except BaseException:
            self.close()
            raise
        return contents

    def append(self, row: dict[str, Any]) -> None:
        """Append ``row`` (checked against the shape) as one line, then flush it to disk."""
        if not self.shape.matches(row):
            raise ConfigError(f"not a row of {self.shape.describe()}: {row!r}")
        if self.fd is None:
            self.open()
        self._write(encode_row(row))
        self.appended += 1

    def _write(self, data: bytes) -> None:
        assert self.fd is not None
        start = os.fstat(self.fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(self.fd, data[written:])
            os.fsync(self.fd)
        except OSError as exc:  # disk full or gone: take back the part of the line that made it, say so once
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass
            raise FinetuneError(f"{self.path}: can't append the rating ({exc.strerror}); the rows before it are "
                                "kept") from None

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one session per file is the user's to keep
            return
        import time

        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            raise ConfigError(f"{self.path} is being written by another finetune feedback session; finish that "
                              "one first") from None

    def close(self) -> None:
        if self.fd is None:
            return
        empty = os.fstat(self.fd).st_size == 0
        os.close(self.fd)
        self.fd = None
        if self.created and empty:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RatingsAppender:
        if self.fd is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_folder(folder: Path) -> None:
    """Make a new file's name durable too (POSIX); a no-op where folders can't be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
