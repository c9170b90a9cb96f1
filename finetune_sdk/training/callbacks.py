"""Bridges from the transformers training loop to plugin hooks and to a rich progress bar."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_sdk.plugin_api import STOP_TRAINING, TrainingContext
from finetune_sdk.plugin_manager import PluginHost
from finetune_sdk.progress import format_duration

logger = logging.getLogger("finetune_sdk")


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
        self._steer(control, "on_log", self.host.notify("on_log", context=self.context, logs=dict(logs or {})))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._sync(state)
        self._steer(control, "on_evaluate",
                    self.host.notify("on_evaluate", context=self.context, metrics=dict(metrics or {})))

    def on_save(self, args, state, control, **kwargs):
        self._sync(state)
        checkpoint = Path(self.checkpoint_root or args.output_dir) / f"checkpoint-{state.global_step}"
        self._steer(control, "on_save",
                    self.host.notify("on_save", context=self.context, checkpoint_dir=str(checkpoint)))

    def _steer(self, control: Any, hook_name: str, answers: list[Any]) -> None:
        """A hook answered ``STOP_TRAINING`` or set ``context.should_training_stop``: training stops after this
        step (transformers' ``control.should_training_stop``), and the result is saved as usual."""
        if not (self.context.should_training_stop or STOP_TRAINING in answers):
            return
        if not control.should_training_stop:
            logger.info("a plugin's %s hook asked training to stop at step %d",
                        hook_name, self.context.step)
        self.context.should_training_stop = True
        self.context.stopped_by = self.context.stopped_by or hook_name
        control.should_training_stop = True


class RichProgressCallback(TrainerCallback):
    """Training progress: a rich bar (step, loss, tokens/s, ETA) on a terminal, else a log line per logging step.

    The loss shown (and GRPO's mean reward) is the one logged at the step the bar shows (the mean over the last ``logging_steps`` steps,
    as in ``training_log.json``): on a logging step the bar moves only once that step's loss is known. After a
    resume the bar starts at the resumed step, and tokens/s and the ETA count only the steps run since.
    """

    def __init__(self, tokens_per_step: float) -> None:
        self.tokens_per_step = tokens_per_step
        self.progress: Any = None
        self.task: Any = None
        self.start = 0.0
        self.first_step = 0
        self.loss: float | None = None
        self.reward: float | None = None
        self.rates: tuple[float, float] | None = None  # GRPO: generated and trained tokens/s

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.console import Console

        self.start = time.perf_counter()
        self.first_step = state.global_step
        console = Console(stderr=True)
        if not console.is_terminal:  # logs, CI and notebooks get a plain line per logging step
            resumed = f" (resuming at step {self.first_step})" if self.first_step else ""
            logger.info("training %d steps%s", state.max_steps, resumed)
            return
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(bar_width=None), TextColumn("{task.fields[stats]}"),
            console=console, transient=False, redirect_stderr=False, redirect_stdout=False)
        self.task = self.progress.add_task("train", total=state.max_steps, completed=self.first_step,
                                           stats=self.stats(self.first_step, state.max_steps))
        self.progress.start()
        self.progress.refresh()

    def stats(self, step: int, max_steps: int) -> str:
        """``12/40 loss 1.2345 1,234 tok/s ETA 0:42`` for the bar (and the plain lines); GRPO adds
        ``reward 0.625`` and shows ``generated 41 tok/s trained 310 tok/s`` (sampling and the rest of the steps,
        timed apart: :class:`finetune_sdk.objectives.grpo_loss.GRPOSpeed`) instead of one tokens/s."""
        parts = [f"{step}/{max_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.reward is not None:
            parts.append(f"reward {self.reward:.3f}")
        done = step - self.first_step
        if done > 0:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            if self.rates:
                parts.append("generated {:,.0f} tok/s  trained {:,.0f} tok/s".format(*self.rates))
            else:
                parts.append(f"{self.tokens_per_step * done / elapsed:,.0f} tok/s")
            parts.append(f"ETA {format_duration(elapsed / done * max(max_steps - step, 0))}")
        return "  ".join(parts)

    def show(self, state: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step,
                                 stats=self.stats(state.global_step, state.max_steps))
            self.progress.refresh()

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_log:  # on a logging step on_log moves the bar together with this step's loss
            self.show(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.loss = float(logs["loss"])
        self.reward = float(logs["reward"]) if "reward" in logs else None
        if "generated_tokens_per_second" in logs:
            self.rates = (float(logs["generated_tokens_per_second"]), float(logs["trained_tokens_per_second"]))
        if self.progress is not None:
            self.show(state)
            return
        elapsed = time.perf_counter() - self.start
        logger.info("step %s  elapsed %s", self.stats(state.global_step, state.max_steps),
                    format_duration(elapsed))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            if self.progress.tasks[0].completed != state.global_step:
                self.show(state)
            self.progress.stop()
            self.progress = None
        else:
            logger.info("trained to step %d/%d in %s", state.global_step, state.max_steps,
                        format_duration(time.perf_counter() - self.start))


class CrashAtStep(TrainerCallback):
    """Crash-test hook: ``FINETUNE_SDK_CRASH_AT_STEP=<n>`` SIGKILLs the training process after step n."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class EventLogCallback(TrainerCallback):
    """Appends the run's events to ``<output_dir>.run/events.jsonl`` (:mod:`finetune_sdk.training.run_events`): ``start``,
    one ``log`` per logging step (with ``tokens_per_second`` over the steps since the previous line) and one
    ``eval`` per evaluation. ``tokens_per_step`` is the estimate used when transformers counts no tokens (packing)."""

    def __init__(self, log: Any, start: dict[str, Any], tokens_per_step: float) -> None:
        self.log = log
        self.start = start
        self.tokens_per_step = tokens_per_step
        self.last = (0.0, 0, 0)  # (time, step, tokens seen) at the previous log line

    def on_train_begin(self, args, state, control, **kwargs):
        self.log.append({"event": "start", **self.start, "max_steps": state.max_steps, "step": state.global_step})
        self.last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if not logs or "train_runtime" in logs:  # the final summary: the ``end`` event carries the metrics
            return
        kind = "eval" if any(key.startswith("eval_") for key in logs) else "log"
        event = {"event": kind, "step": state.global_step, "epoch": float(state.epoch or 0.0), **logs}
        if kind == "log":
            now, seen = time.perf_counter(), state.num_input_tokens_seen or 0
            then, step, seen_then = self.last
            tokens = seen - seen_then if seen > seen_then else (state.global_step - step) * self.tokens_per_step
            event["tokens_per_second"] = tokens / max(now - then, 1e-9)
            self.last = (now, state.global_step, seen)
        self.log.append(event)


class StopOnSignal(TrainerCallback):
    """A clean stop on SIGTERM (the studio's Stop button, ``kill <pid>``): the step in progress ends, a checkpoint
    is written (resumable with ``resume=True`` / ``--resume``) and training stops; the run engine then raises
    :class:`~finetune_sdk.errors.RunStopped` instead of saving a result. The previous handler is restored at the end.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self.previous: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM: stopping after this step and writing a checkpoint to resume from")
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
