"""Sequential fine-tuning (``Trainer.fit([Stage, ...])``) with resume: completed stages are skipped, the
interrupted one resumes from its checkpoints, nothing is published twice.

While the stages of ``output_dir`` run, ``<output_dir>.checkpoints/stage-<i>/trainable.safetensors`` keeps the
trainable weights (adapter, head or all weights) each finished stage ended with, written just before the stage's
result folder; a resumed run loads the last one into the freshly prepared model instead of training the finished
stages again. The folder is removed once the last stage has finished.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_sdk.training.checkpoints import checkpoints_dir
from finetune_sdk.errors import ConfigError
from finetune_sdk.training.manifest import MANIFEST_NAME
from finetune_sdk.training.result import FitResult

if TYPE_CHECKING:
    from finetune_sdk.trainer import Trainer
    from finetune_sdk.training.stages_and_tasks import Stage

logger = logging.getLogger("finetune_sdk")
STATE_FILE = "trainable.safetensors"


def stage_state_path(output_dir: Path, index: int) -> Path:
    """Where stage ``index`` (1-based) of a stages run writing to ``output_dir`` keeps its final trainable
    weights."""
    return checkpoints_dir(Path(output_dir)) / f"stage-{index}" / STATE_FILE


def save_trainable_state(model: Any, path: Path) -> None:
    """Write ``model``'s trainable parameters (by ``named_parameters`` name) to ``path`` atomically."""
    from safetensors.torch import save_file

    from finetune_sdk.fsutil import atomic_path

    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_path(path, suffix=".partial") as tmp:  # a full disk: one line, no partial file
        save_file(tensors, str(tmp))


def completed_stages(trainer: Trainer, stages: list[Stage], output_dir: Path) -> int:
    """How many leading stages of a previous run into ``output_dir`` finished (result and state on disk), each
    checked to have been trained on the same data."""
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.training.stages_and_tasks import is_task_list

    done = 0
    for i, stage in enumerate(stages, start=1):
        folder = output_dir / f"stage-{i}"
        if not (folder / MANIFEST_NAME).is_file():
            break
        if not stage_state_path(output_dir, i).is_file():
            raise ConfigError(
                f"can't resume: stage {i} finished in {folder} but the weights it ended with are not in "
                f"{stage_state_path(output_dir, i).parent} (the run has already finished, or that folder was "
                f"removed); remove {output_dir} to train the stages again")
        recorded = json.loads((folder / MANIFEST_NAME).read_text())["dataset"].get("fingerprint")
        if not is_task_list(stage.data) and recorded != load_rows(stage.data, name=f"stage {i}").fingerprint:
            raise ConfigError(f"can't resume: stage {i} in {folder} was trained on other data than this stage's; "
                              f"remove {output_dir} (or pass the same stages) to resume")
        done = i
    return done


def restore_stage(trainer: Trainer, output_dir: Path, index: int) -> None:
    """Make the trainer's model the one stage ``index`` ended with: prepare it as the technique does, then load the
    saved trainable weights."""
    from safetensors.torch import load_file

    session = trainer.current_model()
    model = trainer.technique.prepare(session.model, trainer.options, session.tokenizer)
    session.model = model
    weights = load_file(str(stage_state_path(output_dir, index)))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if wanted - set(weights):
        raise ConfigError(f"can't resume: the saved weights of stage {index} lack {sorted(wanted - set(weights))[:3]}"
                          f"; remove {output_dir} to train all stages again")
    model.load_state_dict(weights, strict=False)


def finished_result(trainer: Trainer, folder: Path) -> FitResult:
    """A finished stage's result, read back from its folder (publishing it if that never happened)."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    log_file = folder / "training_log.json"
    result = FitResult(output_dir=folder, metrics=manifest["metrics"], manifest=manifest,
                       log_history=json.loads(log_file.read_text()) if log_file.is_file() else [])
    if trainer.publish_as:
        version = published_version(trainer, manifest)
        if version is None:
            parent = trainer.published[-1].ref if trainer.published else None
            version = result.publish(trainer.publish_as, registry=trainer.registry, parent=parent)
            logger.info("published %s", version.ref)
        result.version = version
        trainer.published.append(version)
    return result


def published_version(trainer: Trainer, manifest: dict[str, Any]) -> Any:
    """The registry version of ``publish_as`` that holds this exact result (same manifest), if any."""
    from finetune_sdk.errors import RegistryError
    from finetune_sdk.registry import Registry

    registry = trainer.registry or Registry()
    try:
        versions = registry.versions(trainer.publish_as)
    except RegistryError:
        return None
    return next((v for v in versions if v.manifest == manifest), None)


def run_stages(trainer: Trainer, stages: list[Stage], overrides: list[dict[str, Any]], resume: bool) -> FitResult:
    """Train ``stages`` in order (see :meth:`finetune_sdk.Trainer.fit`); with ``resume`` skip the finished ones and
    resume the interrupted one from its checkpoints."""
    saved = (dict(trainer.options), trainer.formatter, trainer.output_dir)
    output_dir = Path(saved[2])
    done = completed_stages(trainer, stages, output_dir) if resume else 0
    results: list[FitResult] = []
    try:
        for i, (stage, override) in enumerate(zip(stages, overrides), start=1):
            trainer.options = {**saved[0], **override}
            trainer.formatter = trainer.host.create("formatter", stage.formatter) if stage.formatter else saved[1]
            trainer.output_dir = output_dir / f"stage-{i}"
            label = f" ({stage.name})" if stage.name else ""
            if i <= done:
                logger.info("stage %d of %d%s: finished in %s, skipped (resume)", i, len(stages), label,
                            trainer.output_dir)
                results.append(finished_result(trainer, trainer.output_dir))
                if i == done:
                    restore_stage(trainer, output_dir, i)
                continue
            logger.info("stage %d of %d%s", i, len(stages), label)
            trainer._stage_state = stage_state_path(output_dir, i)
            try:
                results.append(trainer.fit(stage.data, stage.eval_data, resume=resume))
            finally:
                trainer._stage_state = None
    finally:
        trainer.options, _, trainer.output_dir = saved
    _remove_tree(checkpoints_dir(output_dir))  # every stage finished: nothing left to resume
    final = results[-1]
    final.stages = results
    return final


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
