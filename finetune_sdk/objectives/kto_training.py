"""KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") on unpaired feedback:
each row is a prompt, one completion and a rating (``label``: true desirable, false undesirable).

With ``r = log pi(y|x) - log pi_ref(y|x)`` (summed over the completion's tokens) and ``z0`` the KL reference point,
a desirable row's loss is ``desirable_weight * (1 - sigmoid(beta * (r - z0)))`` and an undesirable row's
``undesirable_weight * (1 - sigmoid(beta * (z0 - r)))`` (the paper's Eq. 7-8, ``lambda_D``/``lambda_U`` as TRL's
``desirable_weight``/``undesirable_weight``); a batch's loss is the mean over its rows. ``z0`` is estimated as in the
paper and TRL: ``max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` over mismatched pairs, each prompt with the next
row's completion (in file order, wrapping around; TRL pairs within chunks of the batch size instead), computed
without gradient over the optimizer step's whole batch: every accumulated micro-batch and every process of a
distributed run (TRL estimates it per micro-batch, so its accumulation is not the bigger batch; here batch ``b``
with ``gradient_accumulation_steps=k`` trains as batch ``k*b``, :mod:`finetune_sdk.training.accumulation`).

The reference is handled as for DPO (:mod:`finetune_sdk.objectives.dpo_training`): ``pi_ref`` is the policy as it stands when
KTO starts (after the technique prepared it; a trained adapter of an earlier stage included), its log-probs of the
matched and the mismatched pairs computed once before the first step, for the held-out rows too. No second model
is held; each optimizer step runs one more forward pass, without gradient, over its mismatched pairs.

Why not TRL's ``KTOTrainer``: in TRL 1.16 it lives in ``trl.experimental`` (no stable API), tokenizes rows itself
with the chat template applied to raw strings (row content could become control tokens, which the SDK's
formatters never allow), takes a ``datasets.Dataset``, wraps the model in PEFT and k-bit preparation itself (the
SDK's techniques do that), takes the adapter-disabled base as the reference of a PEFT model (not the policy when
KTO starts after an SFT stage), and refuses ``per_device_train_batch_size=1``. The loss is a few lines; written
here on ``transformers.Trainer`` it keeps the SDK's checkpoints and resume, atomic results, registry and
one-line errors, like DPO.

Example:
    >>> import torch
    >>> zero = torch.zeros(4)
    >>> loss, logratios, kl = kto_loss(zero, zero, zero, zero, torch.tensor([True, True, False, False]), 0.1)
    >>> float(loss), float(kl)
    (0.5, 0.0)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TYPE_CHECKING

from finetune_sdk.data.rows import Rows
from finetune_sdk.data.encoding import IGNORE_INDEX, Collator, Encoded, encode_segments
from finetune_sdk.errors import DataError

if TYPE_CHECKING:
    from finetune_sdk.formatter import Formatter

__all__ = ["KTOCollator", "check_label_balance", "encode_kto", "evaluate_kto", "kl_reference_point", "kto_loss",
           "kto_losses", "kto_trainer_class", "precompute_kto_reference"]
logger = logging.getLogger("finetune_sdk")
#: The paper's recommended range of desirable_weight * n_desirable / (undesirable_weight * n_undesirable) (Eq. 8).
RECOMMENDED_RATIO = (1.0, 4 / 3)


def encode_kto(rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
    """Encode KTO rows: ``{"completion": {input_ids, labels}, "kl": {input_ids, labels}, "desirable": bool}``.

    ``kl`` is the row's prompt with the next kept row's completion. A row whose completion is cut off entirely by
    ``max_length`` is dropped (an error when most are). Raises :class:`DataError` naming the file, line and field of
    a bad row, or the file when every row has the same label (KTO needs desirable and undesirable rows).
    """
    max_length = options["max_length"]
    kept: list[tuple[Mapping[str, Any], dict[str, list[int]]]] = []
    out = Encoded()
    for row, where in zip(rows.rows, rows.where):
        formatter.validate(row, where)
        sequence = encode_segments(formatter.segments(row, tokenizer, options), tokenizer, max_length)
        if all(x == IGNORE_INDEX for x in sequence["labels"]):
            out.dropped += 1
            continue
        kept.append((row, sequence))
    if out.dropped * 2 > len(rows):
        raise DataError(f"{rows.source}: {out.dropped} of {len(rows)} rows have no completion tokens left after "
                        f"truncation to max_length={max_length}; raise max_length")
    ratings = {formatter.desirable(row) for row, _ in kept}
    if len(ratings) < 2:
        only = "true (desirable)" if ratings == {True} else "false (undesirable)"
        raise DataError(f"{rows.source}: every row has label {only}; KTO needs both desirable (label true) and "
                        "undesirable (label false) completions")
    for i, (row, sequence) in enumerate(kept):
        other = kept[(i + 1) % len(kept)][0]
        kl = encode_segments(formatter.mismatched_segments(row, other, tokenizer, options), tokenizer, max_length)
        out.tokens += len(sequence["input_ids"])
        out.examples.append({"completion": sequence, "kl": kl, "desirable": formatter.desirable(row)})
    return out


def check_label_balance(examples: list[Mapping[str, Any]], desirable_weight: float, undesirable_weight: float,
                        source: str) -> None:
    """Warn (as TRL does) when ``desirable_weight * n_D / (undesirable_weight * n_U)`` is outside the paper's
    recommended [1, 4/3], naming the weights that would bring it in."""
    n_desirable = sum(1 for ex in examples if ex["desirable"])
    n_undesirable = len(examples) - n_desirable
    if not n_desirable or not n_undesirable:
        return
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    low, high = RECOMMENDED_RATIO
    if low <= ratio <= high + 1e-9:
        return
    base_d = undesirable_weight * n_undesirable / n_desirable
    base_u = desirable_weight * n_desirable / n_undesirable
    logger.warning("%s: %d desirable and %d undesirable rows give a weighted ratio of %.2f, outside KTO's "
                   "recommended [1, 1.33]; set desirable_weight in [%.2f, %.2f] or undesirable_weight in "
                   "[%.2f, %.2f] (not both)", source, n_desirable, n_undesirable, ratio, base_d * low,
                   base_d * high, base_u / high, base_u / low)


class KTOCollator:
    """Stacks a batch of KTO examples: the matched rows as ``input_ids``/``attention_mask``/``labels``, the
    mismatched ones as ``kl_input_ids``/``kl_attention_mask``/``kl_labels`` (each right-padded to its own width),
    ``desirable`` (bool ``[B]``) and, once computed, ``ref_logps``/``ref_kl_logps`` (float32 ``[B]``)."""

    def __init__(self, pad_token_id: int) -> None:
        self.inner = Collator(pad_token_id)

    def __call__(self, batch: list[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        out = self.inner([ex["completion"] for ex in batch])
        out.update({f"kl_{k}": v for k, v in self.inner([ex["kl"] for ex in batch]).items()})
        out["desirable"] = torch.tensor([ex["desirable"] for ex in batch], dtype=torch.bool)
        if "ref_logp" in batch[0]:
            out["ref_logps"] = torch.tensor([ex["ref_logp"] for ex in batch], dtype=torch.float32)
            out["ref_kl_logps"] = torch.tensor([ex["ref_kl_logp"] for ex in batch], dtype=torch.float32)
        return out


def kto_loss(policy: Any, reference: Any, kl_policy: Any, kl_reference: Any, desirable: Any, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             across_processes: bool = False) -> tuple[Any, Any, Any]:
    """(mean loss, per-row log-ratios ``[B]``, KL estimate) from summed log-probs ``[B]`` of the matched rows
    (``policy``/``reference``) and of the mismatched pairs (``kl_policy``/``kl_reference``); ``desirable`` is
    bool ``[B]``. The KL estimate is :func:`kl_reference_point` of the mismatched pairs."""
    kl = kl_reference_point(kl_policy - kl_reference, across_processes)
    logratios = policy - reference
    losses = kto_losses(logratios, kl, desirable, beta, desirable_weight, undesirable_weight)
    return losses.mean(), logratios, kl


def kl_reference_point(kl_logratios: Any, across_processes: bool = False) -> Any:
    """KTO's ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` from the mismatched pairs' log-ratios ``[N]``,
    detached (TRL computes it without gradient); with ``across_processes`` the mean is over the rows of every
    process of a distributed run (TRL averages the processes' means: the same when they hold equal counts).

    >>> import torch
    >>> float(kl_reference_point(torch.tensor([1.0, 2.0]))), float(kl_reference_point(torch.tensor([-1.0])))
    (1.5, 0.0)
    """
    import torch

    total = torch.stack([kl_logratios.detach().float().sum(),
                         torch.tensor(float(kl_logratios.numel()), device=kl_logratios.device)])
    if across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).clamp(min=0)


def kto_losses(logratios: Any, kl: Any, desirable: Any, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> Any:
    """Per-row KTO losses ``[B]`` from the log-ratios ``[B]``, the reference point ``kl`` (a scalar) and the bool
    ``desirable`` ``[B]`` (the paper's Eq. 7-8 with TRL's weights)."""
    import torch

    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, desirable_losses, undesirable_losses)


def _logps(model: Any, batch: Mapping[str, Any], prefix: str = "") -> Any:
    from finetune_sdk.objectives.dpo_training import sequence_logps

    return sequence_logps(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                          batch[prefix + "labels"])


def precompute_kto_reference(model: Any, encoded: Encoded, pad_token_id: int, batch_size: int) -> None:
    """Store ``model``'s summed log-probs of each example's matched and mismatched rows (``ref_logp``,
    ``ref_kl_logp``): call it with the policy as it stands when KTO starts (adapters stay on)."""
    from finetune_sdk.objectives.dpo_training import reference_batches

    for chunk, batch in reference_batches(model, encoded, KTOCollator(pad_token_id), batch_size):
        logps, kl_logps = _logps(model, batch).cpu(), _logps(model, batch, "kl_").cpu()
        for i, example in enumerate(chunk):
            example["ref_logp"], example["ref_kl_logp"] = float(logps[i]), float(kl_logps[i])


def evaluate_kto(model: Any, encoded: Encoded, pad_token_id: int, options: Mapping[str, Any],
                 source: str = "eval_data") -> dict[str, float]:
    """KTO loss and log-ratio margin on held-out rows.

    Returns ``eval_loss`` (the KTO loss, with the KL reference point estimated over the whole held-out set),
    ``kto_margin`` (mean ``log pi/pi_ref`` of the desirable completions minus that of the undesirable ones, in nats;
    positive: training moved probability towards the desirable ones), ``kto_kl`` (the KL estimate) and
    ``eval_rows_scored``/``eval_rows_skipped``. References stored by :func:`precompute_kto_reference` at the start
    of KTO are used; rows without them get ``model`` itself as the reference (margin 0: a baseline).
    ``options`` holds ``beta``, ``desirable_weight``, ``undesirable_weight``, ``per_device_eval_batch_size``.
    """
    import torch

    from finetune_sdk.models.scoring import require_rows, scored_rows

    require_rows(len(encoded.examples), encoded.dropped, source, "have their completion cut off entirely by "
                 "max_length")
    batch_size = options["per_device_eval_batch_size"]
    if "ref_logp" not in encoded.examples[0]:
        precompute_kto_reference(model, encoded, pad_token_id, batch_size)
    collate = KTOCollator(pad_token_id)
    device = next(model.parameters()).device
    parts: dict[str, list[Any]] = {"policy": [], "reference": [], "kl_policy": [], "kl_reference": [],
                                   "desirable": []}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded.examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded.examples[start:start + batch_size]).items()}
            parts["policy"].append(_logps(model, batch).cpu())
            parts["kl_policy"].append(_logps(model, batch, "kl_").cpu())
            parts["reference"].append(batch["ref_logps"].cpu())
            parts["kl_reference"].append(batch["ref_kl_logps"].cpu())
            parts["desirable"].append(batch["desirable"].cpu())
    model.train(was_training)
    whole = {k: torch.cat(v) for k, v in parts.items()}
    loss, logratios, kl = kto_loss(whole["policy"], whole["reference"], whole["kl_policy"], whole["kl_reference"],
                                   whole["desirable"], options["beta"], options["desirable_weight"],
                                   options["undesirable_weight"])
    desirable = whole["desirable"]
    margin = logratios[desirable].mean() - logratios[~desirable].mean()
    return {"eval_loss": float(loss), "kto_margin": float(margin), "kto_kl": float(kl),
            **scored_rows(len(encoded.examples), encoded.dropped)}


def kto_trainer_class() -> type:
    """A transformers ``Trainer`` whose loss is KTO's (built lazily so importing this module stays light); set
    ``beta``, ``desirable_weight`` and ``undesirable_weight`` on the returned class.

    Under gradient accumulation every statistic is the optimizer step's (:mod:`finetune_sdk.training.accumulation`): the
    KL reference point ``z0`` is estimated once per step over the mismatched pairs of all its micro-batches (a
    first pass without gradient, as TRL computes it for one batch), and the loss is the mean over the step's rows,
    so batch ``b`` with ``gradient_accumulation_steps=k`` trains as batch ``k*b``. Each training log entry also gets
    ``kto_margin`` (mean log-ratio of the desirable rows minus that of the undesirable ones since the last log) and
    ``kto_kl`` (the mean of the steps' KL estimates), as TRL logs ``rewards/margins`` and ``kl``."""
    from transformers import Trainer as HFTrainer

    from finetune_sdk.training.accumulation import step_batch_trainer_class
    from finetune_sdk.objectives.dpo_training import loss_only_prediction_step

    class KTOTrainer(step_batch_trainer_class(HFTrainer)):  # type: ignore[misc]
        beta = 0.1
        desirable_weight = 1.0
        undesirable_weight = 1.0

        def examples_in(self, batch):
            return len(batch["desirable"])

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            step = self.current_step(model)
            if step is None:  # an evaluation batch: its own reference point
                with torch.no_grad():
                    kl = kl_reference_point(_logps(model, inputs, "kl_") - inputs["ref_kl_logps"], True)
            else:
                kl = step.once("kto_kl", lambda: self._step_reference_point(model, step))
            logratios = _logps(model, inputs) - inputs["ref_logps"]
            losses = kto_losses(logratios, kl, inputs["desirable"], self.beta, self.desirable_weight,
                                self.undesirable_weight)
            loss = self.step_mean(losses.sum(), len(losses), num_items_in_batch if step else None)
            if step is not None:
                self._record(logratios.detach(), inputs["desirable"], kl if step.current == 0 else None)
            return (loss, {"logratios": logratios, "kl": kl}) if return_outputs else loss

        def _step_reference_point(self, model, step):
            """z0 over the mismatched pairs of every micro-batch of the step (and every process), no gradient."""
            import torch

            with torch.no_grad():
                logratios = [_logps(model, batch, "kl_") - batch["ref_kl_logps"]
                             for batch in map(self._prepare_inputs, step.micro_batches)]
            return kl_reference_point(torch.cat(logratios), across_processes=True)

        def _record(self, logratios, desirable, kl):
            sums = self.__dict__.setdefault("_kto_sums", [0.0, 0, 0.0, 0, 0.0, 0])
            sums[0] += float(logratios[desirable].sum())
            sums[1] += int(desirable.sum())
            sums[2] += float(logratios[~desirable].sum())
            sums[3] += int((~desirable).sum())
            if kl is not None:  # one reference point per optimizer step
                sums[4] += float(kl)
                sums[5] += 1

        def log(self, logs, start_time=None):
            sums = self.__dict__.pop("_kto_sums", None)
            if sums and "loss" in logs:
                if sums[1] and sums[3]:
                    logs["kto_margin"] = sums[0] / sums[1] - sums[2] / sums[3]
                if sums[5]:
                    logs["kto_kl"] = sums[4] / sums[5]
            elif sums:
                self._kto_sums = sums  # an evaluation's log: keep collecting for the next training log
            return super().log(logs, start_time)

        prediction_step = loss_only_prediction_step

    return KTOTrainer
