"""An observer that appends each logged training loss to a CSV file named by ``FINETUNE_SDK_LOSS_CSV``."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

ENV_VAR = "FINETUNE_SDK_LOSS_CSV"
COLUMNS = ("step", "loss", "epoch")


def csv_path() -> Path | None:
    """The CSV file to append to, or None when ``FINETUNE_SDK_LOSS_CSV`` is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else None


def append_loss(path: Path, step: int, loss: float, epoch: float) -> None:
    """Append one ``step,loss,epoch`` row, writing the header first when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        writer.writerow([step, loss, epoch])


def log_loss(context: Any, logs: dict[str, Any]) -> None:
    """Record ``logs['loss']`` at ``context.step``; other logs (eval, the final summary) are skipped."""
    path = csv_path()
    if path is None or logs.get("loss") is None:
        return
    epoch = logs.get("epoch", getattr(context, "epoch", 0.0))
    append_loss(path, int(context.step), float(logs["loss"]), float(epoch or 0.0))
