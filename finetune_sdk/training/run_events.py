"""The run event log: what a training run did, one JSON line per event, readable while it runs and after a crash.

While ``Trainer.fit`` trains into ``output_dir`` the SDK appends to ``<output_dir>.run/events.jsonl`` (the *run
area*, beside ``<output_dir>.checkpoints/``; it exists from the first step on, while the result folder appears only
at the end, renamed from a staging folder). Each line is one JSON object written with one ``write`` and then
``fsync``-ed, so a killed process (SIGKILL, power loss) leaves every line up to its last logging step readable; a
torn last line is skipped by :func:`read_events`. Events (``event`` field):

* ``start``: ``time`` (Unix seconds), ``pid``, ``model``, ``technique``, ``formatter``, ``objective``,
  ``max_steps``, ``resumed_from`` (a checkpoint or null), ``device`` (e.g. ``cpu: Intel Xeon`` or the GPU's name),
  ``precision`` (the chosen dtypes and why), ``estimated_memory`` (bytes, the advisor's estimate, or null),
  ``options``;
* ``log``: one per logging step (``logging_steps``): ``step``, ``epoch``, ``time``, ``loss``, ``learning_rate``,
  ``grad_norm``, ``tokens_per_second`` (tokens of the steps since the previous line / seconds since) and every
  other value the objective logs (DPO/KTO ``rewards/margins``..., GRPO ``reward``, ``kl``...);
* ``eval``: one per evaluation: ``step``, ``epoch``, ``time`` and the ``eval_*`` metrics;
* ``stopped``: the run was asked to stop (SIGTERM): ``step``, ``checkpoint`` (the resumable checkpoint written);
* ``end``: ``time``, ``metrics`` (those of ``training_log.json``'s result), ``peak_memory`` (bytes: the GPU's peak
  allocation, or the process's peak resident set on CPU).

A fresh run into the same ``output_dir`` starts a new log (the old one is replaced); a resumed run appends to it.
``training_log.json`` in the result holds transformers' log history: the same ``log`` and ``eval`` values, one entry
per logging step and evaluation, plus the final summary entry.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with EventLog(folder / "out", fresh=True) as log:
    ...     log.append({"event": "log", "step": 1, "loss": 2.5})
    >>> [e["loss"] for e in read_events(events_path(folder / "out"))]
    [2.5]
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

EVENTS_NAME = "events.jsonl"
RUN_AREA_SUFFIX = ".run"


def run_area(output_dir: str | os.PathLike[str]) -> Path:
    """The run area of a run writing to ``output_dir``: ``<output_dir>.run`` (kept after the run)."""
    return Path(str(output_dir) + RUN_AREA_SUFFIX)


def events_path(output_dir: str | os.PathLike[str]) -> Path:
    """``<output_dir>.run/events.jsonl``, the run's event log."""
    return run_area(output_dir) / EVENTS_NAME


def _plain(value: Any) -> Any:
    """JSON-safe: tensors and NumPy scalars become numbers, NaN and infinities ``null``, other objects strings."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class EventLog:
    """Appends events to ``<output_dir>.run/events.jsonl``: one ``write`` of one line, then ``fsync``.

    ``fresh=True`` replaces an earlier log (a new run into the same folder); ``fresh=False`` appends (a resume).
    Each event gets ``time`` (Unix seconds) when it has none. Raises ``OSError`` when the run area can't be
    written (a full or read-only disk).
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, fresh: bool) -> None:
        self.path = events_path(output_dir)
        self.fresh = fresh
        self.fd: int | None = None

    def open(self) -> EventLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if self.fresh else 0)
        self.fd = os.open(self.path, flags, 0o644)
        if not self.fresh and os.fstat(self.fd).st_size:  # a torn line from a killed run: end it first
            with open(self.path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    os.write(self.fd, b"\n")
        return self

    def append(self, event: dict[str, Any]) -> None:
        """Write ``event`` as one line and ``fsync`` it (a few milliseconds; once per logging step)."""
        if self.fd is None:
            self.open()
        record = {"time": round(time.time(), 3), **_plain(event)}
        os.write(self.fd, (json.dumps(record, allow_nan=False) + "\n").encode())
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> EventLog:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | os.PathLike[str], start: int = 0) -> list[dict[str, Any]]:
    """The events in ``path`` from byte offset ``start`` on; a torn or unreadable line is skipped, a missing file
    is an empty list. Complete lines only: a line still being written (no newline yet) waits for the next read."""
    events, _ = read_events_from(path, start)
    return events


def read_events_from(path: str | os.PathLike[str], start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """``read_events`` and the byte offset after the last complete line (where the next read starts)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except FileNotFoundError:
        return [], start
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, start + end


def describe_device() -> str:
    """The device a run trains on, in words: ``cuda: NVIDIA H100 80GB HBM3`` or ``cpu: <processor>``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform

    return f"cpu: {name or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def peak_memory() -> int:
    """Peak memory of this process in bytes: the GPU's peak allocation when training on CUDA, else the peak
    resident set (``ru_maxrss``, KiB on Linux)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def record_failure(events: EventLog | None, step: int, exc: BaseException) -> None:
    """Append a ``failed`` event (the error's first line) to a run's event log, if it has one, and close it; a log
    that can't be written (the disk that failed the run) is left as it is: the error being raised matters more."""
    if events is None:
        return
    try:
        events.append({"event": "failed", "step": step,
                       "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
        events.close()
    except OSError:
        pass
