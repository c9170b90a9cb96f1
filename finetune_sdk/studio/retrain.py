"""Retrain from the ratings in one step: the next stage of the rated version, trained and published by the SDK.

:func:`plan` counts the ratings file and says what the run will learn from, with warnings (too few rows, KTO's
desirable/undesirable imbalance from :func:`finetune_sdk.objectives.kto_training.check_label_balance`, ties and both-bad pairs the
preference formatter skips), before anything starts. :func:`start` then launches ``python -m
finetune_sdk.studio.retrain SPEC`` as a process of its own (like a run started from the form: it outlives the page
and the server, and its events are in ``<runs>/<name>.run/``). The process (:func:`run_job`):

1. The starting point is the rated version (:func:`starting_point`): a ``lora`` result or registry version's adapter
   is loaded trainable on its base and continued, as ``Trainer.fit([Stage, ...])`` continues one adapter from stage
   to stage (no model copy; the KTO/DPO/GRPO reference is the rated policy); another technique's result is folded
   into its base with :func:`finetune_sdk.merge` (``<runs>/<name>.start``); a base model is used as it is.
2. ``Trainer(start, technique="lora", formatter=...).fit(ratings)``: ``kto`` on thumbs, ``preference`` (DPO, or the
   ``objective`` the options name: ``orpo``, ``simpo``) on pairs, ``chatml`` on edited answers; for ``reward-grpo``
   a ``reward-model`` run from the base model on the pairs first (``<runs>/<name>-reward``), then GRPO on the pairs'
   prompts scored by it.
3. The result is published to the registry under the rated version's name (or the name given) with the rated version
   as its parent: the lineage shows ``rated -> new``, and the chat lists the new version.

Example:
    >>> plan(Path("thumbs.jsonl"), "kto")["counts"]  # doctest: +SKIP
    {'rows': 6, 'desirable': 4, 'undesirable': 2}
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError

#: Objective -> (the ratings rows it reads, the formatter, what it trains).
OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "kto": ("thumbs", "kto", "KTO on thumbs up/down"),
    "dpo": ("pairs", "preference", "DPO (or the objective the options name) on A/B pairs"),
    "reward-grpo": ("pairs", "preference", "a reward model on the pairs, then GRPO scored by it"),
    "sft": ("edits", "chatml", "SFT on the edited answers"),
}
#: Below this many usable rows the plan warns that the run will move the model little.
FEW_ROWS = 16
SPEC = "retrain.json"


def _rows(path: Path) -> list[dict[str, Any]]:
    from finetune_sdk.feedback.rating_record import select_ratings

    return select_ratings(path) if path.is_file() else []


def plan(path: Path, objective: str) -> dict[str, Any]:
    """What a retrain on ``path`` would learn from: ``counts``, ``warnings`` (one line each) and ``error`` (a line
    when nothing can be trained: no file, no usable row); reads the file only."""
    from finetune_sdk.feedback.ratings_file import KTO_ROWS, PREFERENCE_ROWS, SFT_ROWS

    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    kind, formatter, what = OBJECTIVES[objective]
    shape = {"thumbs": KTO_ROWS, "pairs": PREFERENCE_ROWS, "edits": SFT_ROWS}[kind]
    rows = [r for r in _rows(path) if shape.matches(r)]
    warnings: list[str] = []
    if kind == "thumbs":
        up = sum(1 for r in rows if r["label"])
        counts = {"rows": len(rows), "desirable": up, "undesirable": len(rows) - up}
        warnings += _balance_warnings(rows, str(path))
        usable = len(rows)
        if rows and (not up or up == len(rows)):  # KTO's own refusal (kto.encode_rows): checked before the start
            one_way = (f"all {len(rows)} ratings are thumbs {'up' if up else 'down'}: KTO needs both desirable and "
                       "undesirable answers; rate some answers the other way")
            return {"objective": objective, "formatter": formatter, "trains": what, "file": str(path),
                    "counts": counts, "warnings": warnings, "error": one_way}
    elif kind == "pairs":
        unranked = sum(1 for r in rows if "preference" in r)
        counts = {"rows": len(rows), "ranked": len(rows) - unranked, "tie_or_both_bad": unranked}
        if unranked:
            warnings.append(f"{unranked} tie/both-bad pair{'s' * (unranked > 1)} recorded, not trained on")
        usable = len(rows) - unranked
    else:
        counts = {"rows": len(rows)}
        usable = len(rows)
    if 0 < usable < FEW_ROWS:
        warnings.append(f"only {usable} usable rating{'s' * (usable > 1)}: a run on fewer than {FEW_ROWS} moves the "
                        "model little; rate more answers for a clearer change")
    error = None if usable else f"{path.name} has no {kind} ratings to train {objective} on: rate some answers first"
    return {"objective": objective, "formatter": formatter, "trains": what, "file": str(path), "counts": counts,
            "warnings": warnings, "error": error}


def _balance_warnings(rows: list[dict[str, Any]], source: str) -> list[str]:
    """KTO's own imbalance warning (:func:`finetune_sdk.objectives.kto_training.check_label_balance`, default weights), as text."""
    from finetune_sdk.objectives.kto_training import check_label_balance

    caught: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    logger = logging.getLogger("finetune_sdk")
    handler = Catch(logging.WARNING)
    logger.addHandler(handler)
    try:
        check_label_balance([{"desirable": r["label"]} for r in rows], 1.0, 1.0, source)
    finally:
        logger.removeHandler(handler)
    return caught


def start(runs: Any, name: str, spec: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Launch the retrain job ``spec`` as run ``name`` of the RunsFolder ``runs`` (a process of its own)."""
    from finetune_sdk.fsutil import atomic_path
    from finetune_sdk.training.run_events import run_area
    from finetune_sdk.studio.runs import LAUNCH, OUTPUT

    out = runs.path(name)
    area = run_area(out)
    if area.exists() or out.exists():
        raise ConfigError(f"a run named {name!r} exists in {runs.folder}: pick another name")
    area.mkdir(parents=True)
    with atomic_path(area / SPEC) as tmp:
        Path(tmp).write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(area / OUTPUT, "ab") as output:
        child = subprocess.Popen([sys.executable, "-m", "finetune_sdk.studio.retrain", str(area / SPEC)], cwd=cwd,
                                 stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
    runs.children[name] = child
    record = {"pid": child.pid, "args": [], "job": "retrain", "started": time.time(), "model": spec["rated"]}
    with atomic_path(area / LAUNCH) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1))
    return runs.summary(name)


#: The options that shape a LoRA adapter: a continued adapter keeps the rated version's (its manifest's).
LORA_SHAPE = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora")


def continued_adapter(rated: str, options: dict[str, Any], registry: Any) -> tuple[Path, dict[str, Any]] | None:
    """``(its folder, its LoRA shape)`` when the rated version is a ``lora`` result whose adapter the new stage
    continues; ``None`` for a base model or another technique's result. Reads the manifest only (no model loads),
    so the studio checks it before the job starts.

    Raises :class:`~finetune_sdk.errors.ConfigError` when ``options`` set a LoRA shape (:data:`LORA_SHAPE`) other
    than the rated adapter's: a continued adapter keeps its shape.
    """
    from finetune_sdk.models.loading import is_result, result_folder
    from finetune_sdk.formatter import CAUSAL_LM
    from finetune_sdk.training.manifest import read_manifest

    if not is_result(rated):
        return None
    folder = result_folder(rated, registry)
    manifest = read_manifest(folder)
    if manifest["technique"] != "lora" or manifest.get("task") != CAUSAL_LM:
        return None
    shape = {k: manifest["options"][k] for k in LORA_SHAPE if k in (manifest.get("options") or {})}
    clash = [k for k in shape if k in options and options[k] != shape[k]]
    if clash:
        raise ConfigError(f"the new stage continues {rated}'s adapter, which has {clash[0]}={shape[clash[0]]!r}; "
                          f"leave {clash[0]} out of the options (got {options[clash[0]]!r})")
    return folder, shape


def starting_point(spec: dict[str, Any], out: Path, registry: Any) -> tuple[Any, dict[str, Any], str]:
    """What the new stage trains, as ``(model for Trainer, options it fixes, base model for a reward model)``.

    * A base model: itself.
    * A ``lora`` result (a folder or registry version, :func:`continued_adapter`): its base plus its adapter, loaded
      trainable (PEFT's ``PeftModel.from_pretrained(..., is_trainable=True)``); the lora technique continues a
      ``PeftModel`` as it is (as ``Trainer.fit([Stage, ...])`` continues one adapter from stage to stage), with the
      rated version's LoRA shape. No model copy is written; the new result is an adapter on the same base.
    * Any other result (``qlora``: its 4-bit base; ``full``; a plugin's technique): folded into its base with
      :func:`finetune_sdk.merge` (``<runs>/<name>.start``), and a fresh LoRA adapter trains on that copy.
    """
    from finetune_sdk.models.loading import is_result, result_folder
    from finetune_sdk.training.manifest import read_manifest

    rated = spec["rated"]
    if not is_result(rated):
        return rated, {}, rated
    continued = continued_adapter(rated, spec.get("options") or {}, registry)
    folder = continued[0] if continued else result_folder(rated, registry)
    manifest = read_manifest(folder)
    base = manifest.get("merged_from", {}).get("base_model") or manifest["base_model"]
    base_model = base.get("path") or base["id"]
    if continued is None:
        import finetune_sdk

        start = out.parent / f"{out.name}.start"
        finetune_sdk.merge(folder, start, registry=registry)
        return str(start), {}, base_model
    return _trainable_adapter(folder), continued[1], base_model


def _trainable_adapter(folder: Path) -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)``: the result's recorded base with its adapter loaded for training."""
    from finetune_sdk.models.loading import load_base
    from finetune_sdk.log import known_dependency_warnings

    base = load_base(folder)
    with known_dependency_warnings():
        from peft import PeftModel

        return PeftModel.from_pretrained(base.model, folder, is_trainable=True), base.tokenizer


def run_job(spec: dict[str, Any]) -> Any:
    """Train and publish the next stage (the body of the job process); returns the published version."""
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.fsutil import write_text_atomic
    from finetune_sdk.log import quiet_third_party_output
    from finetune_sdk.registry import Registry
    from finetune_sdk.trainer import Trainer

    quiet_third_party_output()
    out, objective, options = Path(spec["output_dir"]), spec["objective"], dict(spec.get("options") or {})
    registry = Registry(spec["registry"])
    start_model, shape, base_model = starting_point(spec, out, registry)
    options.update(shape)
    data = spec["data"]
    if objective == "reward-grpo":  # the reward model: a scorer of its own, trained from the base model
        reward = Trainer(base_model, technique="reward-model", formatter="preference",
                         output_dir=out.parent / f"{out.name}-reward", progress=False,
                         **{k: v for k, v in options.items() if k in ("max_steps", "learning_rate", "seed")})
        reward.fit(data)
        prompts = out.parent / f"{out.name}.prompts.jsonl"
        seen = dict.fromkeys(r["prompt"] for r in load_rows(data, name="pairs").rows)
        write_text_atomic(prompts, "".join(json.dumps({"prompt": p}) + "\n" for p in seen))
        trainer = Trainer(start_model, technique="lora", output_dir=out, progress=False,
                          reward_model=str(reward.output_dir), **options)
        result = trainer.fit(str(prompts))
    else:
        trainer = Trainer(start_model, technique="lora", formatter=OBJECTIVES[objective][1], output_dir=out,
                          progress=False, **options)
        result = trainer.fit(data)
    parent = registry.resolve(spec["rated"]).ref if spec.get("parent") else None
    version = result.publish(spec["publish_as"], registry=registry, parent=parent,
                             description=f"studio: {OBJECTIVES[objective][2]} from {Path(data).name}")
    print(f"published {version.ref}" + (f" (parent {parent})" if parent else ""), flush=True)
    return version


def main(argv: list[str]) -> int:
    """``python -m finetune_sdk.studio.retrain SPEC``: one line on a bad spec or a failed run, exit code 2."""
    from finetune_sdk.errors import FinetuneError

    try:
        run_job(json.loads(Path(argv[0]).read_text()))
    except FinetuneError as exc:
        print(f"Error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
