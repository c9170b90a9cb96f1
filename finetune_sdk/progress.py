"""What the SDK is doing while a user waits: a log line per long step, or a rich spinner and bar in the CLI.

Every step that can take more than a few seconds (loading or converting a model, generating, evaluating, caching
classifier features, publishing, pulling, writing a comparison report) runs inside :func:`activity`. In the
Python API that is quiet: one ``finetune_sdk`` INFO log line when the step starts and one with its duration when
it ends. The ``finetune`` command (and the demo) call :func:`display_on` with a terminal console; steps then show as
a transient spinner, with a bar and an ETA when the amount of work is known, and leave one ``✓`` line behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("finetune_sdk")

_display: dict[str, Any] = {"console": None, "progress": None, "open": 0}
#: Without a terminal, a step with a known amount of work logs where it stands at most this often (seconds).
LOG_EVERY_SECONDS = 30.0


def display_on(console: Any) -> None:
    """Show steps as rich spinners and bars on ``console`` (a ``rich.console.Console``) when it is a terminal.

    A console that is not a terminal (a pipe, a log file, CI) keeps the plain log lines, so logs stay readable.

    Example:
        >>> from rich.console import Console
        >>> display_on(Console(stderr=True))
        >>> display_off()
    """
    _display["console"] = console if getattr(console, "is_terminal", False) else None


def display_off() -> None:
    """Back to plain log lines (the Python API's default)."""
    _display["console"] = None


def format_duration(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for an ETA or elapsed time.

    Example:
        >>> format_duration(75.4), format_duration(3725)
        ('1:15', '1:02:05')
    """
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Activity:
    """One step in progress; ``advance(n)`` moves its bar when ``total`` is known."""

    def __init__(self, description: str, total: float | None, unit: str) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0.0
        self.start = time.perf_counter()
        self.last_logged = self.start
        self._task: Any = None

    def advance(self, amount: float = 1) -> None:
        """Record ``amount`` more units of work done."""
        self.update(self.completed + amount)

    def update(self, completed: float, total: float | None = None) -> None:
        """Set the work done (and optionally the total)."""
        self.completed = completed
        if total is not None:
            self.total = total
        progress = _display["progress"]
        if progress is not None and self._task is not None:
            progress.update(self._task, completed=completed, total=self.total, detail=self.detail())
        elif self._task is None and self.total:
            now = time.perf_counter()
            if now - self.last_logged >= LOG_EVERY_SECONDS:  # a log line now and then for a long step, with its ETA
                self.last_logged = now
                logger.info("%s: %s", self.description, self.detail(now))

    def detail(self, now: float | None = None) -> str:
        """``12/40 tokens`` and the ETA, or "" when the total is unknown."""
        if not self.total:
            return ""
        done = f"{self.completed:,.0f}/{self.total:,.0f}{' ' + self.unit if self.unit else ''}"
        elapsed = (time.perf_counter() if now is None else now) - self.start
        if self.completed <= 0 or self.completed >= self.total:
            return done
        return f"{done} ETA {format_duration(elapsed / self.completed * (self.total - self.completed))}"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _rich_progress(console: Any) -> Any:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class BarWhenKnown(BarColumn):  # a step of unknown length has its spinner, not a bar that means nothing
        def render(self, task: Any) -> Any:
            return Text("") if task.total is None else super().render(task)

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarWhenKnown(bar_width=16),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console, transient=True,
                    redirect_stderr=False, redirect_stdout=False)


@contextmanager
def activity(description: str, total: float | None = None, unit: str = "") -> Iterator[Activity]:
    """Report a long step: a spinner (and a bar with ETA when ``total`` is known) or two log lines.

    Args:
        description: what is happening, in a few words (``"loading SmolLM2-135M in 4-bit nf4"``).
        total: the amount of work in ``unit`` (examples, tokens, files) when known.
        unit: what ``total`` counts, shown beside the numbers.

    Steps nest: an inner step shows below the outer one.

    Example:
        >>> with activity("counting", total=3, unit="items") as step:
        ...     for _ in range(3):
        ...         step.advance()
        >>> step.completed == 3
        True
    """
    step = Activity(description, total, unit)
    console = _display["console"]
    if console is None:
        logger.info("%s ...", description)
    else:
        if _display["progress"] is None:
            _display["progress"] = _rich_progress(console)
            _display["progress"].start()
        _display["open"] += 1
        step._task = _display["progress"].add_task(description, total=total, detail=step.detail())
    try:
        yield step
    finally:
        seconds = step.elapsed
        if console is None:  # a quick step gets no second line
            logger.log(logging.INFO if seconds >= 1 else logging.DEBUG, "%s: done in %.1f s", description, seconds)
        else:
            progress = _display["progress"]
            progress.remove_task(step._task)
            _display["open"] -= 1
            if _display["open"]:
                progress.refresh()  # the finished step's line goes now, not at the next tick
            else:
                progress.stop()
                _display["progress"] = None
            console.print(f"[green]✓[/green] {_escape(description)} [dim]({seconds:.1f} s)[/dim]", highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
