"""Peak memory of a benchmark's child process: the kernel's high-water mark, reset when training begins.

    from peak_memory import ResetPeakAtTrainBegin, peak_rss
    get_plugin_host().pm.register(ResetPeakAtTrainBegin())  # before Trainer.fit
    print(peak_rss())  # bytes: the training steps' own peak
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_sdk import hookimpl


def peak_rss() -> int:
    """This process's peak resident memory in bytes (``VmHWM``; 0 where ``/proc`` has none).

    Not ``ru_maxrss``: Linux carries a parent's peak into a forked child's ``ru_maxrss``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class ResetPeakAtTrainBegin:
    """A plugin that resets ``VmHWM`` when training begins, so :func:`peak_rss` is the training steps' own peak."""

    @hookimpl
    def on_train_begin(self, context: Any) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
