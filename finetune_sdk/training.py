"""The training run behind ``Trainer.fit``: a plan of encoded data, then prepare, train, evaluate, save atomically."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune_sdk import varlen_attention
from finetune_sdk.callbacks import CrashAtStep, PluginCallback, RichProgressCallback, TrainingContext
from finetune_sdk.checkpoints import (
    checkpoints_dir,
    checkpointing_trainer_class,
    latest_checkpoint,
    remove_checkpoints,
)
from finetune_sdk.data import Rows
from finetune_sdk.encoding import Collator, Encoded, encode_causal, encode_classification
from finetune_sdk.formatter import CLASSIFICATION, Formatter
from finetune_sdk.fsutil import staged_directory, write_json_atomic
from finetune_sdk.manifest import MANIFEST_NAME
from finetune_sdk.preference import PREFERENCE, PairCollator, encode_preference
from finetune_sdk.result import FitResult

if TYPE_CHECKING:
    from finetune_sdk.trainer import Trainer


@dataclass
class EvalSet:
    """A held-out dataset with the formatter that renders it."""

    rows: Rows
    formatter: Formatter
    encoded: Encoded


@dataclass
class TrainingPlan:
    """Everything one training run needs, encoded and checked before the model is touched."""

    train: Encoded
    formatter_name: str
    objective: str = "sft"  # "sft" or "dpo"
    evals: dict[str, EvalSet] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    #: Set by run_training: True when each batch's examples are packed into rows (see finetune_sdk.packing).
    packed: bool = False
    #: Set by run_training: True when packed rows attend per example with finetune_sdk.varlen_attention; a batch
    #: is then one row without padding (else rows of at most max_length tokens with block-diagonal masks).
    varlen: bool = False
    #: Continue from the newest complete checkpoint of this output_dir, if there is one.
    resume: bool = False
    #: Set for the classifier on cached features: each held-out set's features, so that the final metrics come
    #: from the trained head without running the backbone again.
    eval_features: dict[str, Any] = field(default_factory=dict)


class ListDataset:
    """A list of encoded examples as a map-style dataset."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def encode(trainer: Trainer, rows: Rows, formatter: Formatter, tokenizer: Any) -> Encoded:
    """Encode rows the way ``formatter`` and the technique's task want them."""
    if trainer.technique.task == CLASSIFICATION:
        label_ids = {label: i for i, label in enumerate(trainer.options["labels"])}
        return encode_classification(rows, formatter, tokenizer, trainer.options, label_ids)
    if formatter.task == PREFERENCE:
        return encode_preference(rows, formatter, tokenizer, trainer.options)
    return encode_causal(rows, formatter, tokenizer, trainer.options)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit packed weights count as the weights they hold."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


PASSTHROUGH = ("fsdp", "fsdp_config", "deepspeed")


def decide_packing(trainer: Trainer, plan: TrainingPlan, model: Any) -> bool:
    """Pack when asked (the default), the data is supervised/text causal-LM data and the model supports it."""
    from finetune_sdk.packing import packing_supported

    if not trainer.options["packing"] or plan.objective != "sft" or trainer.technique.task == CLASSIFICATION:
        return False
    if not packing_supported(model):
        trainer.logger.info("packing off: model type not known to keep attention inside packed examples; "
                            "batches are grouped by length instead")
        return False
    return True


def training_arguments(trainer: Trainer, work_dir: str, has_eval: bool, group_by_length: bool = False,
                       packed: bool = False) -> Any:
    import torch
    from transformers import TrainingArguments

    o = trainer.options
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs: dict[str, Any] = dict(
        output_dir=work_dir,
        num_train_epochs=o["num_train_epochs"], max_steps=o["max_steps"], learning_rate=o["learning_rate"],
        per_device_train_batch_size=o["per_device_train_batch_size"],
        per_device_eval_batch_size=o["per_device_eval_batch_size"],
        gradient_accumulation_steps=o["gradient_accumulation_steps"], seed=o["seed"], data_seed=o["seed"],
        warmup_steps=o["warmup_steps"], weight_decay=o["weight_decay"], lr_scheduler_type=o["lr_scheduler_type"],
        max_grad_norm=o["max_grad_norm"], optim=o["optim"], logging_steps=o["logging_steps"],
        eval_strategy=("steps" if o["eval_steps"] else "epoch") if has_eval else "no", eval_steps=o["eval_steps"],
        save_strategy="steps" if o["save_steps"] else "no", save_steps=o["save_steps"] or 500,
        bf16=o["bf16"], fp16=o["fp16"],
        report_to=o["report_to"], disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
        include_num_input_tokens_seen="no" if packed else "non_padding", use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(), save_only_model=False,
    )
    # transformers 5 renamed gradient_checkpointing; the SDK keeps the name users know.
    checkpointing = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
        else "gradient_checkpointing"
    kwargs[checkpointing] = o["gradient_checkpointing"]
    if group_by_length:  # fewer pad tokens when batches are padded
        kwargs["train_sampling_strategy"] = "group_by_length"
    for name in PASSTHROUGH:  # FSDP / DeepSpeed settings go to transformers and accelerate as they are
        if o.get(name):
            kwargs[name] = o[name]
    if distributed and not torch.cuda.is_available():
        kwargs["ddp_backend"] = "gloo"
    return TrainingArguments(**kwargs)


def run_training(trainer: Trainer, plan: TrainingPlan, tokenizer: Any) -> FitResult:
    """Prepare the model, train on ``plan``, evaluate, and write the result folder atomically."""
    from transformers import PrinterCallback, set_seed

    log = trainer.logger
    encoded = plan.train
    session = trainer.session()
    set_seed(trainer.options["seed"])
    if plan.objective == "dpo":
        from finetune_sdk.preference import precompute_reference

        batch = trainer.options["per_device_eval_batch_size"]
        precompute_reference(session.model, encoded, tokenizer.pad_token_id, batch)
        for eval_set in plan.evals.values():
            precompute_reference(session.model, eval_set.encoded, tokenizer.pad_token_id, batch)
    model = trainer.technique.prepare(session.model, trainer.options, tokenizer)
    session.model = model
    plan.packed = decide_packing(trainer, plan, model)
    plan.varlen = plan.packed and varlen_attention.applicable(model, trainer.options["max_length"])
    if plan.packed:
        trainer.logger.info("packing: %s", "each batch in one row, attention per example" if plan.varlen else
                            f"rows of up to {trainer.options['max_length']} tokens, block-diagonal attention masks")
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise RuntimeError(f"technique {trainer.technique.name!r} left no trainable parameters")
    log.info("%s%s on %s: %s of %s parameters trainable (%.2f%%), %d examples, %d tokens",
             trainer.technique.name, " + DPO" if plan.objective == "dpo" else "", trainer.source.id,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total, len(encoded.examples), encoded.tokens)

    context = TrainingContext(
        technique=trainer.technique.name, quantizer=trainer.quantizer.name if trainer.quantizer else None,
        formatter=plan.formatter_name, model_id=trainer.source.id, output_dir=trainer.output_dir,
        options=dict(trainer.options))
    from finetune_sdk.trainer import work_dir_beside

    work_dir = work_dir_beside(trainer.output_dir)
    checkpoint_root = checkpoints_dir(trainer.output_dir)
    try:
        args = training_arguments(trainer, str(work_dir), bool(plan.evals), packed=plan.packed,
                                  group_by_length=trainer.options["group_by_length"] and not plan.packed
                                  and plan.objective == "sft" and trainer.technique.task != CLASSIFICATION)
        steps_tokens = encoded.tokens / max(len(encoded.examples), 1) * args.per_device_train_batch_size * \
            args.gradient_accumulation_steps
        callbacks: list[Any] = [PluginCallback(trainer.host, context, checkpoint_root)]
        if trainer.progress:
            callbacks.append(RichProgressCallback(steps_tokens))
        if os.environ.get("FINETUNE_SDK_CRASH_AT_STEP"):
            callbacks.append(CrashAtStep(int(os.environ["FINETUNE_SDK_CRASH_AT_STEP"])))
        train_model, datasets = model, None
        if trainer.technique.task == CLASSIFICATION and trainer.options["cache_features"] and \
                hasattr(model, "features"):
            train_model, datasets = feature_training(trainer, plan, model, tokenizer)
            args.include_num_input_tokens_seen = "no"  # feature batches have no input_ids to count
        hf = _hf_trainer(plan, train_model, args, tokenizer, callbacks, trainer.options, checkpoint_root, datasets)
        hf.remove_callback(PrinterCallback)  # progress and logs go through rich and the plugin hooks
        resume_from = latest_checkpoint(checkpoint_root) if plan.resume else None
        if plan.resume:
            log.info("resuming from %s", resume_from) if resume_from else log.info(
                "no complete checkpoint in %s: starting from the beginning", checkpoint_root)
        previous_attention = varlen_attention.use(model, varlen_attention.ATTENTION_NAME) if plan.varlen else None
        try:
            output = hf.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            if previous_attention is not None:
                varlen_attention.use(model, previous_attention)
        runtime = output.metrics["train_runtime"]
        tokens_seen = hf.state.num_input_tokens_seen or round(encoded.tokens * (hf.state.epoch or 0.0))
        metrics: dict[str, Any] = {
            "train_loss": float(output.training_loss),
            "train_runtime": float(runtime),
            "train_tokens": int(tokens_seen),
            "train_tokens_per_second": float(tokens_seen / runtime) if runtime else 0.0,
            "train_steps": int(hf.state.global_step),
            "epochs": float(hf.state.epoch or 0.0),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "examples": len(encoded.examples),
            "examples_dropped": encoded.dropped,
            **plan.extra_metrics,
        }
        metrics.update(evaluate_plan(trainer, plan, session))
        log_history = list(hf.state.log_history)
    except OSError as exc:  # disk full, permissions: one line (checkpoints already written stay for --resume)
        from finetune_sdk.output_paths import user_os_error

        raise user_os_error(exc, trainer.output_dir) from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    manifest = trainer.manifest(plan, metrics)
    if _is_main_process():
        with staged_directory(trainer.output_dir) as staging:
            trainer.technique.save(_unwrap(model), staging)
            tokenizer.save_pretrained(staging)
            write_json_atomic(staging / "training_log.json", log_history)
            write_json_atomic(staging / MANIFEST_NAME, manifest)
        remove_checkpoints(checkpoint_root)  # the result is complete: nothing left to resume
    context.step = metrics["train_steps"]
    trainer.host.notify("on_train_end", context=context, metrics=metrics)
    log.info("saved %s result to %s", trainer.technique.name, trainer.output_dir)
    return FitResult(output_dir=trainer.output_dir, metrics=metrics, manifest=manifest, log_history=log_history)


def evaluate_plan(trainer: Trainer, plan: TrainingPlan, session: Any) -> dict[str, Any]:
    """Final metrics on each held-out set: ``eval_loss``... for one set, ``eval_<task>_loss``... for several."""
    from finetune_sdk.preference import evaluate_preference

    metrics: dict[str, Any] = {}
    batch = trainer.options["per_device_eval_batch_size"]
    for name, eval_set in plan.evals.items():
        if name in plan.eval_features:
            from finetune_sdk.features import evaluate_head

            result = evaluate_head(_unwrap(session.model).head, plan.eval_features[name])
        elif plan.objective == "dpo":
            result = evaluate_preference(session.model, eval_set.encoded, session.tokenizer.pad_token_id,
                                         trainer.options["dpo_beta"], batch)
        else:
            previous, session.formatter = session.formatter, eval_set.formatter
            try:
                result = session.evaluate(eval_set.rows, batch_size=batch)
            finally:
                session.formatter = previous
        if not name:
            metrics.update(result)  # eval_loss, perplexity / accuracy, macro_f1 / reward_margin...
            continue
        for key, value in result.items():
            metrics[f"eval_{name}_{key.removeprefix('eval_')}"] = value
        trainer.logger.info("task %s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return metrics


def feature_training(trainer: Trainer, plan: TrainingPlan, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """The head and (train, eval) feature datasets: the frozen backbone runs once per dataset (cached on disk)."""
    from finetune_sdk.features import FeatureDataset, cached_features, head_model, model_identity
    from finetune_sdk.fsutil import cache_root

    base = {"model": model_identity(trainer.source), "pooling": model.pooling,
            "quantizer": trainer.quantizer.name if trainer.quantizer else None, "dtype": trainer.options["dtype"],
            "max_length": trainer.options["max_length"]}
    cache_dir = cache_root() / "features"
    features, seconds, hit = cached_features(model, plan.train, tokenizer.pad_token_id,
                                             {**base, "data": plan.dataset.get("fingerprint")}, cache_dir)
    trainer.logger.info("classifier features for %d examples: %s in %.1f s", len(plan.train.examples),
                        "read from the cache" if hit else "computed once", seconds)
    plan.extra_metrics.update({"feature_seconds": seconds, "features_cached": hit})
    train = FeatureDataset(features, [ex["labels"] for ex in plan.train.examples])
    evals = {}
    for name, eval_set in plan.evals.items():
        eval_features, _, _ = cached_features(model, eval_set.encoded, tokenizer.pad_token_id,
                                              {**base, "data": eval_set.rows.fingerprint}, cache_dir)
        evals[name or "eval"] = plan.eval_features[name] = FeatureDataset(
            eval_features, [ex["labels"] for ex in eval_set.encoded.examples])
    return head_model(model), (train, evals)


def _hf_trainer(plan: TrainingPlan, model: Any, args: Any, tokenizer: Any, callbacks: list[Any],
                options: dict[str, Any], checkpoint_root: Any, datasets: Any = None) -> Any:
    from transformers import Trainer as HFTrainer

    if datasets is not None:  # the classifier head on cached features
        from finetune_sdk.features import collate_features

        train, evals = datasets
        cls = checkpointing_trainer_class(HFTrainer, checkpoint_root, options=options)
        eval_dataset = (evals if len(evals) > 1 else next(iter(evals.values()))) if evals else None
        return cls(model=model, args=args, train_dataset=train, eval_dataset=eval_dataset,
                   data_collator=collate_features, callbacks=callbacks)

    evals = {name or "eval": ListDataset(s.encoded.examples) for name, s in plan.evals.items()}
    eval_dataset: Any = None
    if evals:
        eval_dataset = evals if len(evals) > 1 or "" not in plan.evals else next(iter(evals.values()))
    if plan.objective == "dpo":
        from finetune_sdk.preference import dpo_trainer_class

        cls = dpo_trainer_class()
        cls.beta = options["dpo_beta"]
        collator: Any = PairCollator(tokenizer.pad_token_id)
    elif plan.packed:
        from finetune_sdk.packing import PackingCollator

        row_length = None if plan.varlen else options["max_length"]  # per-example attention: one row, no padding
        cls, collator = HFTrainer, PackingCollator(row_length, tokenizer.pad_token_id, varlen_kwargs=plan.varlen)
    else:
        cls, collator = HFTrainer, Collator(tokenizer.pad_token_id)
    cls = checkpointing_trainer_class(cls, checkpoint_root, options=options)
    return cls(model=model, args=args, train_dataset=ListDataset(plan.train.examples), eval_dataset=eval_dataset,
               data_collator=collator, callbacks=callbacks)


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
