"""Sequential fine-tuning (``Trainer.fit([Stage, ...])``) with resume: completed stages are skipped, the
interrupted one resumes from its checkpoints, nothing is published twice; and options given to one ``fit``.

The facade calls in here with itself; this module sees it only through :class:`StagedTrainer` (its public API).

While the stages of ``output_dir`` run, ``<output_dir>.checkpoints/stage-<i>/trainable.safetensors`` keeps the
trainable weights (adapter, head or all weights) each finished stage ended with, written just before the stage's
result folder; a resumed run loads the last one into the freshly prepared model instead of training the finished
stages again. The folder is removed once the last stage has finished.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from finetune_sdk.errors import ConfigError
from finetune_sdk.training.checkpoints import checkpoints_dir
from finetune_sdk.training.manifest import MANIFEST_NAME
from finetune_sdk.training.request import check_output_dir
from finetune_sdk.training.result import FitResult

if TYPE_CHECKING:
    from finetune_sdk.formatter import Formatter
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.models.sources import ModelSource
    from finetune_sdk.options import Option
    from finetune_sdk.plugin_manager import PluginHost
    from finetune_sdk.technique import Technique
    from finetune_sdk.training.stages_and_tasks import Stage

logger = logging.getLogger("finetune_sdk")


class StagedTrainer(Protocol):
    """What stages and per-fit options need of a :class:`finetune_sdk.Trainer` (its public API), so that this
    module never imports the facade."""

    host: PluginHost
    technique: Technique
    options: dict[str, Any]
    formatter: Formatter | None
    output_dir: Path
    source: ModelSource
    publish_as: str | None
    registry: Any
    published: list[Any]

    def option_specs(self) -> dict[str, Option]: ...

    def current_model(self) -> LoadedModel: ...

    def fit(self, train_data: Any, eval_data: Any = None, *, resume: bool = False) -> FitResult: ...

    def fit_stage(self, train_data: Any, eval_data: Any = None, *, resume: bool = False,
                  state_path: Path | None = None) -> FitResult: ...
STATE_FILE = "trainable.safetensors"


def stage_state_path(output_dir: Path, index: int) -> Path:
    """Where stage ``index`` (1-based) of a stages run writing to ``output_dir`` keeps its final trainable
    weights."""
    return checkpoints_dir(Path(output_dir)) / f"stage-{index}" / STATE_FILE


def completed_stages(trainer: StagedTrainer, stages: list[Stage], output_dir: Path) -> int:
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


def restore_stage(trainer: StagedTrainer, output_dir: Path, index: int) -> None:
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


def finished_result(trainer: StagedTrainer, folder: Path) -> FitResult:
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


def published_version(trainer: StagedTrainer, manifest: dict[str, Any]) -> Any:
    """The registry version of ``publish_as`` that holds this exact result (same manifest), if any."""
    from finetune_sdk.errors import RegistryError
    from finetune_sdk.registry import Registry

    registry = trainer.registry or Registry()
    try:
        versions = registry.versions(trainer.publish_as)
    except RegistryError:
        return None
    return next((v for v in versions if v.manifest == manifest), None)


def run_stages(trainer: StagedTrainer, stages: list[Stage], overrides: list[dict[str, Any]], resume: bool) -> FitResult:
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
            results.append(trainer.fit_stage(stage.data, stage.eval_data, resume=resume,
                                             state_path=stage_state_path(output_dir, i)))
    finally:
        trainer.options, _, trainer.output_dir = saved
    _remove_tree(checkpoints_dir(output_dir))  # every stage finished: nothing left to resume
    final = results[-1]
    final.stages = results
    return final


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def fit_stages(trainer: StagedTrainer, stages: list[Stage], resume: bool = False) -> FitResult:
    """Sequential fine-tuning with a ``Trainer``: each stage's options override the Trainer's for that stage only
    (all checked before the first stage trains), the same adapter continues, each result goes to
    ``output_dir/stage-<i>``; returns the last stage's ``FitResult`` with every stage's in ``stages``. With
    ``resume``, finished stages are skipped and the interrupted one resumes."""
    from finetune_sdk.training.output_paths import check_stages_folder
    from finetune_sdk.training.request import resolve_run_options

    check_stages_folder(trainer.output_dir, len(stages))
    for i, stage in enumerate(stages, start=1):
        check_output_dir(trainer.source, trainer.output_dir / f"stage-{i}", (stage.data, stage.eval_data))
    specs = trainer.option_specs()
    overrides = []
    for i, stage in enumerate(stages, start=1):
        try:
            overrides.append({k: v for k, v in resolve_run_options(trainer.host, trainer.technique, stage.options,
                                                                   specs).items() if k in stage.options})
        except ConfigError as exc:
            raise ConfigError(f"stage {i}: {exc}") from None
        if stage.formatter:
            trainer.host.create("formatter", stage.formatter)
    return run_stages(trainer, stages, overrides, resume)


def fit_with_options(trainer: StagedTrainer, train_data: Any, eval_data: Any, resume: bool,
                     given: dict[str, Any]) -> FitResult:
    """``Trainer.fit(data, objective="orpo", beta=0.2)``: the objective and options given to ``fit`` apply to this
    fit only (checked before anything loads, as the Trainer's own), then the Trainer's options are restored."""
    from finetune_sdk.training.request import resolve_run_options

    resolved = resolve_run_options(trainer.host, trainer.technique, given, trainer.option_specs())
    saved = trainer.options
    trainer.options = {**saved, **{k: v for k, v in resolved.items() if k in given}}
    try:
        return trainer.fit(train_data, eval_data, resume=resume)
    finally:
        trainer.options = saved
