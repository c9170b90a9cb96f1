"""The run engine behind ``Trainer.fit``: a :class:`~finetune_sdk.training.plan.TrainingPlan` and a
:class:`~finetune_sdk.training.plan.RunSpec` in, a :class:`~finetune_sdk.training.plan.TrainedRun` out. It prepares the
model, trains with the plan's objective (:mod:`finetune_sdk.objectives`) and evaluates; saving is the next step
(:func:`finetune_sdk.training.saving.save_run`). It never sees the ``Trainer``."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from finetune_sdk.errors import FinetuneError
from finetune_sdk.objectives import ListDataset, get_objective
from finetune_sdk.plugin_api import TrainingContext
from finetune_sdk.speed import varlen_attention
from finetune_sdk.speed.chunked_loss import chunked_loss_trainer_class
from finetune_sdk.speed.cpu_threads import set_cpu_threads
from finetune_sdk.speed.fused_lora import bf16_adapter_matmuls, set_adapter_matmuls, use_fused_lora
from finetune_sdk.speed.fused_projections import extra_bytes, fuse_frozen_projections, use_fused_projections
from finetune_sdk.speed.heap import limit_heap_fragmentation
from finetune_sdk.speed.precision import keep_activations_fp32, saved_activations
from finetune_sdk.training.callbacks import (CrashAtStep, EventLogCallback, PluginCallback, RichProgressCallback,
                                             StopOnSignal)
from finetune_sdk.training.checkpoints import checkpoints_dir, checkpointing_trainer_class, latest_checkpoint
from finetune_sdk.training.plan import RunSpec, TrainedRun, TrainingPlan
from finetune_sdk.training.run_events import record_failure
from finetune_sdk.training.saving import is_main_process, unwrap, work_dir_beside

if TYPE_CHECKING:
    from finetune_sdk.speed.precision import Precision
    from finetune_sdk.models.inference import LoadedModel

__all__ = ["ListDataset", "count_parameters", "decide_packing", "evaluate_plan", "run_training",
           "training_arguments"]


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


def decide_packing(run: RunSpec, plan: TrainingPlan, model: Any) -> bool:
    """Pack when asked (the default), the objective packs (``sft`` on causal-LM data) and the model supports it.

    ``run`` is a :class:`RunSpec` (or anything with ``options`` and ``logger``)."""
    from finetune_sdk.data.packing import packing_supported

    if not run.options["packing"] or not get_objective(plan.objective).packs:
        return False
    if not packing_supported(model):
        run.logger.info("packing off: model type not known to keep attention inside packed examples; "
                        "batches are grouped by length instead")
        return False
    return True


def supports_checkpointing(model: Any) -> bool:
    """True when ``model`` can recompute activations in the backward pass (transformers and PEFT models). The
    classifier's model can't and needn't: its frozen backbone runs without gradients, so it keeps no activations
    for the backward pass and ``gradient_checkpointing`` has nothing to save there."""
    return hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable")


def decide_chunked_loss(run: RunSpec, plan: TrainingPlan, model: Any) -> bool:
    """Chunked cross-entropy when asked (the default), for an objective whose loss is the causal-LM cross-entropy
    (its ``chunked_loss``: ``sft``) of a model whose loss it computes exactly (finetune_sdk.speed.chunked_loss.supports_chunked_loss), without
    FSDP or DeepSpeed (the LM head's weight is sharded there)."""
    from finetune_sdk.speed.chunked_loss import supports_chunked_loss

    if not run.options.get("chunked_loss", True) or not get_objective(plan.objective).chunked_loss:
        return False
    if run.options.get("fsdp") or run.options.get("deepspeed"):
        run.logger.info("chunked loss off under FSDP/DeepSpeed: the LM head's weight is sharded")
        return False
    if not supports_chunked_loss(model):
        run.logger.info("chunked loss off: the model's LM head or logits are not plain (full logits are used)")
        return False
    run.logger.info("chunked loss: the logits are computed a chunk of tokens at a time, never all at once")
    return True


def training_arguments(run: RunSpec, work_dir: str, has_eval: bool, group_by_length: bool = False,
                       packed: bool = False, checkpointable: bool = True) -> Any:
    import torch
    from transformers import TrainingArguments

    o = run.options
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
        bf16=bool(o["bf16"]), fp16=bool(o["fp16"]),
        report_to=o["report_to"], disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
        include_num_input_tokens_seen="no" if packed else "non_padding", use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(), save_only_model=False,
    )
    # transformers 5 renamed gradient_checkpointing; the SDK keeps the name users know.
    checkpointing = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
        else "gradient_checkpointing"
    kwargs[checkpointing] = o["gradient_checkpointing"] and checkpointable
    if group_by_length:  # fewer pad tokens when batches are padded
        kwargs["train_sampling_strategy"] = "group_by_length"
    # torch.compile: off by default (one SmolLM2 layer did not finish compiling in 290 s on 2 cores: docs/speed.md)
    kwargs["torch_compile"] = os.environ.get("FINETUNE_SDK_TORCH_COMPILE") == "1"
    for name in PASSTHROUGH:  # FSDP / DeepSpeed settings go to transformers and accelerate as they are
        if o.get(name):
            kwargs[name] = o[name]
    if distributed and not torch.cuda.is_available():
        kwargs["ddp_backend"] = "gloo"
    return TrainingArguments(**kwargs)


@contextlib.contextmanager
def starting_point(model: Any, parameters: dict[str, Any] | None) -> Iterator[None]:
    """Inside the block the model's parameters named in ``parameters`` (name -> tensor, e.g. a federated run's
    starting adapter, from which each owner computes its DPO/KTO reference) hold those values; their own values
    come back after it, in place (the optimizer's tensors stay the same). ``None``: nothing changes."""
    if parameters is None:
        yield
        return
    import torch

    params = dict(model.named_parameters())
    own = {name: params[name].detach().clone() for name in parameters}
    with torch.no_grad():
        for name, values in parameters.items():
            params[name].copy_(values)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, values in own.items():
                params[name].copy_(values)


def run_training(run: RunSpec, plan: TrainingPlan, loaded: LoadedModel, tokenizer: Any) -> TrainedRun:
    """Prepare ``loaded.model``, train on ``plan`` and evaluate on its held-out sets; what the run decides goes to
    ``run.state`` (the plan stays as planning made it). Saving is the next step:
    :func:`finetune_sdk.training.saving.save_run`.

    Raises:
        RunStopped: SIGTERM stopped the run (a checkpoint was written; resume continues it).
        FinetuneError: a full disk or a permission error while training, as one line naming the folder.
    """
    from transformers import PrinterCallback, set_seed

    log, options, objective, state = run.logger, run.options, get_objective(plan.objective), run.state
    encoded = plan.train
    set_seed(options["seed"])
    objective.before_prepare(loaded.model, plan, tokenizer, options)
    model = run.technique.prepare(loaded.model, options, tokenizer)
    loaded.model = model
    if os.environ.get("FINETUNE_SDK_FUSED_LORA", "1") == "0":
        log.info("fused LoRA layers off (FINETUNE_SDK_FUSED_LORA=0): PEFT's own LoRA forward")
    elif use_fused_lora(model):
        log.info("fused LoRA layers: dropout, lora_A, lora_B, scaling and the sum in one step; no dropped copy kept")
    precision = run.resolved_precision()
    log.info("precision: %s", precision.describe())
    if precision.activations == "float32" and precision.dtype != "float32":
        keep_activations_fp32(model)  # bf16 matmuls, fp32 in between: adapter updates are not rounded away
    if use_fused_projections(precision, model):
        groups = fuse_frozen_projections(model)
        if groups:
            log.info("fused frozen projections: q/k/v and gate/up as one matmul each (%d groups, %.0f MiB of "
                     "concatenated weights; FINETUNE_SDK_FUSED_PROJECTIONS=0 turns them off)", groups,
                     extra_bytes(model) / 2**20)
    if bf16_adapter_matmuls(precision, model):
        import torch

        if set_adapter_matmuls(model, torch.bfloat16):
            log.info("bf16 adapter matmuls: lora_A's forward and weight gradient in bf16 on the frozen layers' cast "
                     "input, fp32 LoRA weights, gradients and sums (FINETUNE_SDK_BF16_ADAPTERS=0 turns them off)")
    # DPO/KTO: the reference is the policy as it stands now, unless the caller named another starting point
    with starting_point(model, getattr(loaded, "reference_parameters", None)):
        objective.after_prepare(model, plan, tokenizer, options)
    state.packed = decide_packing(run, plan, model)
    state.varlen = state.packed and varlen_attention.applicable(model, options["max_length"])
    if state.packed:
        log.info("packing: %s", "each batch in one row, attention per example" if state.varlen else
                 f"rows of up to {options['max_length']} tokens, block-diagonal attention masks")
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise RuntimeError(f"technique {run.technique.name!r} left no trainable parameters")
    state.trainable_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                                    if p.requires_grad})
    state.chunked_loss = decide_chunked_loss(run, plan, model)
    log.info("%s%s on %s: %s of %s parameters trainable (%.2f%%), %d examples, %d tokens",
             run.technique.name, objective.label, run.source.id,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total, len(encoded.examples), encoded.tokens)

    context = TrainingContext(
        technique=run.technique.name, quantizer=run.quantizer.name if run.quantizer else None,
        formatter=plan.formatter_name, model_id=run.source.id, output_dir=run.output_dir, options=dict(options))
    work_dir = work_dir_beside(run.output_dir)
    checkpoint_root = checkpoints_dir(run.output_dir)
    try:
        checkpointable = supports_checkpointing(model)
        if options["gradient_checkpointing"] and not checkpointable:
            log.info("gradient_checkpointing: nothing to recompute, %s keeps no activations for the backward pass "
                     "(the frozen backbone runs without gradients)", type(model).__name__)
        args = training_arguments(run, str(work_dir), bool(plan.evals), packed=state.packed,
                                  group_by_length=options["group_by_length"] and not state.packed and objective.packs,
                                  checkpointable=checkpointable)
        steps_tokens = encoded.tokens / max(len(encoded.examples), 1) * args.per_device_train_batch_size * \
            args.gradient_accumulation_steps
        callbacks: list[Any] = [PluginCallback(run.host, context, checkpoint_root)]
        if run.progress:
            callbacks.append(RichProgressCallback(steps_tokens))
        if os.environ.get("FINETUNE_SDK_CRASH_AT_STEP"):
            callbacks.append(CrashAtStep(int(os.environ["FINETUNE_SDK_CRASH_AT_STEP"])))
        inputs = objective.training_inputs(run, plan, model, tokenizer, args)
        trainer_class = chunked_loss_trainer_class(inputs.trainer_class) if state.chunked_loss else \
            inputs.trainer_class
        set_cpu_threads(log)
        if args.torch_compile:
            log.info("torch.compile: on (FINETUNE_SDK_TORCH_COMPILE=1); the compile time counts in the run's tokens/s")
        if args.use_cpu:
            # when memory is tight, or under a quantized base (glibc's heap not measured side by side there)
            limit_heap_fragmentation(None if run.quantizer else run.estimated_memory)
        cls = checkpointing_trainer_class(trainer_class, checkpoint_root, options=options)
        hf = cls(model=inputs.model, args=args, train_dataset=inputs.train_dataset, eval_dataset=inputs.eval_dataset,
                 data_collator=inputs.collator, callbacks=callbacks)
        hf.remove_callback(PrinterCallback)  # progress and logs go through rich and the plugin hooks
        resume_from = latest_checkpoint(checkpoint_root) if run.resume else None
        if run.resume:
            log.info("resuming from %s", resume_from) if resume_from else log.info(
                "no complete checkpoint in %s: starting from the beginning", checkpoint_root)
        events, facts = open_event_log(run, plan, precision, resume_from)
        stop = StopOnSignal()
        hf.add_callback(stop)
        if events is not None:
            hf.add_callback(EventLogCallback(events, facts, steps_tokens))
        previous_attention = varlen_attention.use(model, varlen_attention.ATTENTION_NAME) if state.varlen else None
        try:
            with objective.while_training(model), saved_activations(precision, model):
                output = hf.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except Exception as exc:
            record_failure(events, hf.state.global_step, exc)
            raise
        finally:
            stop.restore()
            if previous_attention is not None:
                varlen_attention.use(model, previous_attention)
        if stop.stopped_at is not None:
            stopped_run(run, events, stop.stopped_at, checkpoint_root)
        whole = hf.whole_run_metrics(output)  # a resumed run: loss and seconds of every part, not the last only
        runtime = whole["train_runtime"]
        tokens_seen = hf.state.num_input_tokens_seen or round(encoded.tokens * (hf.state.epoch or 0.0))
        metrics: dict[str, Any] = {
            "train_loss": float(whole["train_loss"]),
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
            **state.metrics,
        }
        metrics.update(evaluate_plan(run, plan, loaded))
        log_history = list(hf.state.log_history)
    except Exception as exc:  # disk full, permissions: one line (checkpoints already written stay for --resume)
        from finetune_sdk.training.output_paths import user_os_error

        error = user_os_error(exc, run.output_dir)
        if error is exc or isinstance(exc, FinetuneError):  # a checkpoint's own line names its folder: keep it
            raise
        raise error from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    return TrainedRun(unwrap(model), metrics, log_history, context, checkpoint_root, events)


def open_event_log(run: RunSpec, plan: TrainingPlan, precision: Precision,
                   resume_from: Path | None) -> tuple[Any, dict[str, Any]]:
    """The run's :class:`~finetune_sdk.training.run_events.EventLog` (main process only, else ``None``; a resumed run
    appends to its log) and its ``start`` facts: model, plugins, device, precision, memory estimate, options."""
    from finetune_sdk.training.manifest import scrub
    from finetune_sdk.training.run_events import EventLog, describe_device

    if not is_main_process():
        return None, {}
    log = EventLog(run.output_dir, fresh=resume_from is None).open()
    return log, {
        "resumed_from": str(resume_from) if resume_from else None,
        "pid": os.getpid(), "model": run.source.id, "technique": run.technique.name,
        "quantizer": run.quantizer.name if run.quantizer else None, "formatter": plan.formatter_name,
        "objective": plan.objective, "device": describe_device(), "precision": precision.describe(),
        "estimated_memory": run.estimated_memory, "options": scrub(dict(run.options))}


def stopped_run(run: RunSpec, events: Any, step: int, checkpoint_root: Path) -> None:
    """After a SIGTERM stop: record it and raise :class:`~finetune_sdk.errors.RunStopped` (no result is saved)."""
    from finetune_sdk.errors import RunStopped

    checkpoint = latest_checkpoint(checkpoint_root)
    if events is not None:
        events.append({"event": "stopped", "step": step, "checkpoint": str(checkpoint) if checkpoint else None})
        events.close()
    raise RunStopped(f"stopped at step {step} on request (SIGTERM); checkpoint {checkpoint}: continue with "
                     f"resume=True (finetune train ... --output-dir {run.output_dir} --resume)")


def evaluate_plan(run: RunSpec, plan: TrainingPlan, loaded: LoadedModel) -> dict[str, Any]:
    """Final metrics on each held-out set: ``eval_loss``... for one set, ``eval_<task>_loss``... for several."""
    metrics: dict[str, Any] = {}
    for name in plan.evals:
        result = get_objective(plan.objective).evaluate(loaded, plan, name, run)
        if not name:
            metrics.update(result)  # eval_loss, perplexity / accuracy, macro_f1 / reward_margin...
            continue
        for key, value in result.items():
            metrics[f"eval_{name}_{key.removeprefix('eval_')}"] = value
        run.logger.info("task %s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return metrics
