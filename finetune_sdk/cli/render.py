"""Rich output shared by the commands."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def cell(value: Any) -> Text:
    """Table cell text shown literally (no rich markup: prompts and descriptions contain brackets)."""
    return Text(fmt(value))


@lru_cache(maxsize=1)
def console() -> Console:
    return Console()


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def metrics_table(metrics: Mapping[str, Any], title: str = "metrics") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(cell(name), cell(value))
    return table
