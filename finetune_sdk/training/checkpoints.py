"""Crash-proof checkpoints in safetensors and JSON (no pickles), written atomically, verified on resume.

A checkpoint folder ``<output_dir>.checkpoints/checkpoint-<step>/`` holds:

* ``trainable.safetensors``: the trainable weights (the adapter for LoRA/QLoRA, the head for the classifier,
  everything for full fine-tuning);
* ``optimizer.safetensors`` + ``optimizer.json``: optimizer tensors, and its param groups and scalars;
* ``scheduler.json``: the learning-rate scheduler;
* ``rng.safetensors`` + ``rng.json``: torch (CPU and CUDA), NumPy and Python random states;
* ``trainer_state.json``: transformers' step, epoch and log history (the data position);
* ``run_totals.json``: the summed training loss and seconds of the run so far, so that a resumed run's
  ``train_loss`` and ``train_runtime`` describe the whole run;
* ``checkpoint.json``, written last: the sha256 of every file above.

Each checkpoint is built in a staging folder and renamed into place, so a crash never leaves a half checkpoint
under a final name; one whose files don't match ``checkpoint.json`` is skipped with a warning on resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("finetune_sdk")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RECORD = "checkpoint.json"
RUN_TOTALS = "run_totals.json"


def checkpoints_dir(output_dir: Path) -> Path:
    """Where the checkpoints of a run writing to ``output_dir`` live (removed once the run has finished)."""
    return Path(str(output_dir) + ".checkpoints")


def remove_checkpoints(directory: Path) -> None:
    """Remove the checkpoints this module wrote in ``directory`` (and the folder once empty); nothing else."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.is_dir() and (CHECKPOINT.match(path.name) or path.name.startswith(".staging-")):
            shutil.rmtree(path, ignore_errors=True)
    try:
        directory.rmdir()
    except OSError:
        logger.warning("kept %s: it holds files finetune-sdk did not write", directory)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete, verified checkpoint in ``directory``; damaged ones are skipped with a warning."""
    from finetune_sdk.fsutil import sha256_file

    if not directory.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in directory.iterdir()
                    if p.is_dir() and (m := CHECKPOINT.match(p.name))), reverse=True)
    for _, path in found:
        record = path / RECORD
        try:
            files = json.loads(record.read_text())["files"]
            bad = [name for name, sha in files.items()
                   if not (path / name).is_file() or sha256_file(path / name) != sha]
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("skipping checkpoint %s: unreadable %s (%s)", path, RECORD, type(exc).__name__)
            continue
        if bad:
            logger.warning("skipping checkpoint %s: %s damaged", path, ", ".join(bad))
            continue
        return path
    return None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer state as flat ``"<param index>.<key>[/<nested key>...]"`` tensors and JSON scalars; nested dicts
    (bitsandbytes' 8-bit optimizers keep their quantization state in one) are flattened by path."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            name = f"{prefix}/{key}" if "." in prefix else f"{prefix}.{key}"
            if isinstance(value, dict):
                walk(name, value)
            elif isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value

    for index, values in state["state"].items():
        walk(str(index), values)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, path = flat.split(".", 1)
        *parents, key = path.split("/")
        target = state.setdefault(int(index), {})
        for parent in parents:
            target = target.setdefault(parent, {})
        target[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"can't store {type(value).__name__} in a checkpoint")


def _plain(options: Any) -> dict[str, Any]:
    from finetune_sdk.training.manifest import scrub

    return json.loads(json.dumps(scrub(dict(options or {})), default=str))


def resume_mismatch(checkpoint: Path, weights: dict[str, Any], target: Any, options: Any) -> str | None:
    """Why the weights in ``checkpoint`` can't go into ``target`` (shapes or names differ), naming the options that
    changed since the checkpoint was written; ``None`` when they fit."""
    params = {n: p for n, p in target.named_parameters() if p.requires_grad}
    reshaped = [n for n in weights if n in params and tuple(weights[n].shape) != tuple(params[n].shape)]
    missing = sorted(set(params) - set(weights))
    if not reshaped and not missing:
        return None
    try:
        before = json.loads((checkpoint / RECORD).read_text()).get("options") or {}
    except (OSError, ValueError):
        before = {}
    from finetune_sdk.options import TRAINING_OPTIONS

    now = _plain(options)
    loop = {o.name for o in TRAINING_OPTIONS}  # the training loop's options don't shape the trained weights
    differing = [k for k in sorted(before) if before[k] != now.get(k)]
    shaping = [k for k in differing if k not in loop] or differing
    changed = [f"{k} was {before[k]!r}, now {now.get(k)!r}" for k in shaping]
    if changed:
        why = "options changed since: " + "; ".join(changed[:4])
    elif reshaped:
        name = reshaped[0]
        why = f"{name} is {list(weights[name].shape)} there and {list(params[name].shape)} now"
    else:
        why = f"it has no weights for {missing[0]}"
    return (f"can't resume from {checkpoint}: its trained weights don't fit this run's model ({why}); resume with "
            "the options of the interrupted run, or train into a new output_dir")


def read_run_totals(checkpoint: str | None) -> dict[str, float]:
    """The run's totals up to ``checkpoint`` (``loss_sum``, ``runtime``, ``steps``); zeros for a fresh run or a
    checkpoint written before they were recorded (then only the resumed part is counted, with a warning)."""
    totals = {"loss_sum": 0.0, "runtime": 0.0, "steps": 0}
    if checkpoint is None:
        return totals
    path = Path(checkpoint) / RUN_TOTALS
    if not path.is_file():
        logger.warning("%s has no %s: train_loss and train_runtime will cover the resumed part only",
                       checkpoint, RUN_TOTALS)
        return totals
    return {**totals, **json.loads(path.read_text())}


def checkpointing_trainer_class(base: type, checkpoint_root: Path, keep: int = 2,
                                options: Any = None) -> type:
    """A subclass of the transformers ``Trainer`` class ``base`` that checkpoints in this module's format.

    ``options`` (the run's options) are recorded in each checkpoint, so that resuming with options that change the
    trained weights' shapes is an error naming them.
    """
    from safetensors.torch import load_file, save_file

    from finetune_sdk.errors import ConfigError

    class CheckpointingTrainer(base):  # type: ignore[misc, valid-type]
        #: Totals of the run before this ``train()`` call (read from the checkpoint it resumes from).
        prior: dict[str, float] = {"loss_sum": 0.0, "runtime": 0.0, "steps": 0}

        def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
            self.prior = read_run_totals(resume_from_checkpoint)
            self._call_started = time.perf_counter()
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

        def run_totals(self) -> dict[str, float]:
            """Summed training loss, seconds and steps of the whole run so far, resumed parts included."""
            loss = self._total_loss_scalar + float(self._tr_loss.item() if hasattr(self._tr_loss, "item") else
                                                   self._tr_loss)
            return {"loss_sum": self.prior["loss_sum"] + loss,
                    "runtime": self.prior["runtime"] + time.perf_counter() - self._call_started,
                    "steps": self.state.global_step}

        def whole_run_metrics(self, output: Any) -> dict[str, float]:
            """``train_loss`` (mean over every step of the run) and ``train_runtime`` (seconds of every part of
            the run) after ``train()``; on a fresh run they equal transformers' own."""
            steps_now = self.state.global_step - self.prior["steps"]
            loss_sum = self.prior["loss_sum"] + float(output.training_loss) * steps_now
            return {"train_loss": loss_sum / max(self.state.global_step, 1),
                    "train_runtime": self.prior["runtime"] + float(output.metrics["train_runtime"])}

        def _trainable(self) -> dict[str, Any]:
            model = self.accelerator.unwrap_model(self.model)
            return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            from finetune_sdk.fsutil import sha256_file, shareable_tree
            from finetune_sdk.training.output_paths import folder_bytes, user_os_error

            if not self.args.should_save:
                return
            checkpoint_root.mkdir(parents=True, exist_ok=True)
            final = checkpoint_root / f"checkpoint-{self.state.global_step}"
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=checkpoint_root))
            try:
                save_file(self._trainable(), str(staging / "trainable.safetensors"))
                tensors, meta = _flatten_optimizer(self.optimizer.state_dict())
                save_file(tensors, str(staging / "optimizer.safetensors"))
                _write_json(staging / "optimizer.json", meta)
                _write_json(staging / "scheduler.json", self.lr_scheduler.state_dict())
                rng_tensors, rng_meta = _rng_state()
                save_file(rng_tensors, str(staging / "rng.safetensors"))
                _write_json(staging / "rng.json", rng_meta)
                self.state.save_to_json(str(staging / "trainer_state.json"))
                _write_json(staging / RUN_TOTALS, self.run_totals())
                files = {p.name: sha256_file(p) for p in staging.iterdir()}
                _write_json(staging / RECORD, {"files": files, "step": self.state.global_step,
                                               "options": _plain(options)})
                for path in staging.iterdir():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
                if final.exists():
                    shutil.rmtree(final)
                shareable_tree(staging)  # mkdtemp's 0700 and safetensors' 0600: the umask's modes instead
                os.rename(staging, final)
            except Exception as exc:  # a full disk (also inside safetensors' writer): one line, no partial checkpoint
                error = user_os_error(exc, final, folder_bytes(staging))
                if error is exc:
                    raise
                raise error from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            for old in sorted((int(m.group(1)), p) for p in checkpoint_root.iterdir()
                              if p.is_dir() and (m := CHECKPOINT.match(p.name)))[:-keep]:
                shutil.rmtree(old[1], ignore_errors=True)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            weights = load_file(str(Path(resume_from_checkpoint) / "trainable.safetensors"))
            problem = resume_mismatch(Path(resume_from_checkpoint), weights, target, options)
            if problem:
                raise ConfigError(problem)
            target.load_state_dict(weights, strict=False)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            folder = Path(checkpoint)
            meta = json.loads((folder / "optimizer.json").read_text())
            tensors = load_file(str(folder / "optimizer.safetensors"))
            self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
            self.lr_scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))

        def _load_rng_state(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            folder = Path(checkpoint)
            _set_rng_state(load_file(str(folder / "rng.safetensors")), json.loads((folder / "rng.json").read_text()))

        def _load_scaler(self, checkpoint: str | None) -> None:
            return None

    return CheckpointingTrainer


def save_trainable_state(model: Any, path: Path) -> None:
    """Write ``model``'s trainable parameters (by ``named_parameters`` name) to ``path`` atomically."""
    from safetensors.torch import save_file

    from finetune_sdk.fsutil import atomic_path

    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_path(path, suffix=".partial") as tmp:  # a full disk: one line, no partial file
        save_file(tensors, str(tmp))
