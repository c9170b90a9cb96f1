"""Bridges from the transformers training loop to plugin hooks and to a rich progress bar."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("finetune_sdk")

from finetune_sdk.plugin_manager import PluginHost


@dataclass
class TrainingContext:
    """What observer hooks see: the run's settings and where it stands.

    ``step``/``max_steps``/``epoch`` are updated as training goes.
    """

    technique: str
    quantizer: str | None
    formatter: str | None
    model_id: str
    output_dir: Path
    options: dict[str, Any]
    step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class PluginCallback(TrainerCallback):
    """Forwards begin/log/evaluate/save to the plugins' ``on_*`` hooks (``on_train_end`` is sent by Trainer)."""

    def __init__(self, host: PluginHost, context: TrainingContext, checkpoint_root: Path | None = None) -> None:
        self.host = host
        self.context = context
        self.checkpoint_root = checkpoint_root

    def _sync(self, state: Any) -> None:
        self.context.step = state.global_step
        self.context.max_steps = state.max_steps
        self.context.epoch = float(state.epoch or 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync(state)
        self.host.notify("on_train_begin", context=self.context)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._sync(state)
        self.host.notify("on_log", context=self.context, logs=dict(logs or {}))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._sync(state)
        self.host.notify("on_evaluate", context=self.context, metrics=dict(metrics or {}))

    def on_save(self, args, state, control, **kwargs):
        self._sync(state)
        checkpoint = Path(self.checkpoint_root or args.output_dir) / f"checkpoint-{state.global_step}"
        self.host.notify("on_save", context=self.context, checkpoint_dir=str(checkpoint))


class RichProgressCallback(TrainerCallback):
    """A rich progress bar with step, loss, tokens/s and ETA (on stderr)."""

    def __init__(self, tokens_per_step: float) -> None:
        self.tokens_per_step = tokens_per_step
        self.progress: Any = None
        self.task: Any = None
        self.start = 0.0
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.start = time.perf_counter()
        console = Console(stderr=True)
        if not console.is_terminal:  # CI logs and pipes get a log line per logging step instead of a bar
            self.max_steps = state.max_steps
            return
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=console, transient=False)
        self.task = self.progress.add_task("train", total=state.max_steps, stats="")
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.tokens_per_step * state.global_step / elapsed
        loss = f"loss {self.loss:.4f}  " if self.loss is not None else ""
        self.progress.update(self.task, completed=state.global_step, stats=f"{loss}{rate:,.0f} tok/s")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            if self.progress is None:
                elapsed = max(time.perf_counter() - self.start, 1e-9)
                rate = self.tokens_per_step * state.global_step / elapsed
                logger.info("step %d/%d  loss %.4f  %.0f tok/s  %.0f s", state.global_step, state.max_steps,
                            self.loss, rate, elapsed)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.on_step_end(args, state, control)
            self.progress.stop()
            self.progress = None


class CrashAtStep(TrainerCallback):
    """Crash-test hook: ``FINETUNE_SDK_CRASH_AT_STEP=<n>`` SIGKILLs the training process after step n."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
