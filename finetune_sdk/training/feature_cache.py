"""Cached backbone features for the classifier: the frozen backbone runs once, the head trains on its output.

Features are cached on disk (safetensors) keyed by the base model (id, revision or file size and time), the
quantizer, dtype, pooling, ``max_length`` and the data fingerprint, so a second run on the same data skips the
backbone entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

from finetune_sdk.data.encoding import Collator, Encoded
from finetune_sdk.fsutil import atomic_path

if TYPE_CHECKING:
    from finetune_sdk.models.sources import ModelSource
    from finetune_sdk.training.plan import RunSpec
    from finetune_sdk.training.plan import TrainingPlan

logger = logging.getLogger("finetune_sdk")


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def model_identity(source: ModelSource) -> dict[str, Any]:
    """What identifies the backbone's weights: path with size and mtime of its files, or Hub id and revision."""
    identity: dict[str, Any] = {"kind": source.kind, "id": source.id, "revision": source.revision}
    path = Path(source.path or source.id)
    if source.kind in ("local", "gguf") and path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        identity["files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return identity


def compute_features(model: Any, encoded: Encoded, pad_token_id: int, batch_size: int = 32,
                     what: str = "classifier features") -> Any:
    """Pooled backbone features ``[N, hidden]`` (float32, CPU) of every example, in order.

    Batches are formed from examples of similar length (sorted by length), so the backbone computes on little
    padding; the features are put back in the examples' order. Widths are rounded up to a multiple of 8, so that
    GPU attention kernels (cuDNN plans) see a handful of shapes rather than one per batch.
    """
    import torch

    from finetune_sdk.progress import activity

    collate = Collator(pad_token_id, pad_to_multiple_of=8)
    device = next(model.parameters()).device
    examples = encoded.examples
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    model.eval()
    chunks = []
    with torch.no_grad(), activity(f"{what}: running the frozen backbone once", total=len(order),
                                   unit="examples") as step:
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]])
            chunks.append(model.features(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
            step.advance(len(batch["input_ids"]))
    if not chunks:
        return torch.empty(0)
    by_length = torch.cat(chunks)
    features = torch.empty_like(by_length)
    features[torch.tensor(order)] = by_length
    return features


def cached_features(model: Any, encoded: Encoded, pad_token_id: int, key: dict[str, Any],
                    cache_dir: Path | None, what: str = "classifier features") -> tuple[Any, float, bool]:
    """(features, seconds spent, whether they came from the cache); ``what`` names them in the progress line."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    path = (cache_dir / f"{cache_key(key)}.safetensors") if cache_dir else None
    if path is not None and path.is_file():
        features = read_cached_features(path, len(encoded.examples))
        if features is not None:
            return features, time.perf_counter() - start, True
    features = compute_features(model, encoded, pad_token_id, what=what)
    if path is not None:
        with atomic_path(path, prefix=".features-") as tmp:
            save_file({"features": features.contiguous()}, str(tmp))
    return features, time.perf_counter() - start, False


def read_cached_features(path: Path, count: int) -> Any:
    """The cached ``[count, hidden]`` features in ``path``, or ``None`` (with a warning) when the file is damaged."""
    from safetensors.torch import load_file

    from finetune_sdk.errors import FinetuneError
    from finetune_sdk.models.safe_weights import check_safetensors

    try:
        check_safetensors(path)
        features = load_file(str(path))["features"]
        if features.dim() != 2 or features.shape[0] != count:
            raise ValueError(f"shape {list(features.shape)} instead of [{count}, hidden]")
        if not features.isfinite().all():
            raise ValueError("non-finite values")
        return features
    except (FinetuneError, OSError, ValueError, KeyError, RuntimeError) as exc:
        logger.warning("feature cache %s is damaged (%s); computing the features again", path, exc)
        path.unlink(missing_ok=True)
        return None


class FeatureDataset:
    """(features, label) pairs for training the head."""

    def __init__(self, features: Any, labels: list[int]) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"features": self.features[index], "labels": self.labels[index]}


def evaluate_head(head: Any, dataset: FeatureDataset) -> dict[str, float]:
    """``eval_loss``, ``accuracy`` and ``macro_f1`` of the trained head on cached features: the same metrics as
    :meth:`finetune_sdk.FineTunedModel.evaluate` without running the backbone again."""
    import torch

    from finetune_sdk.models.inference import classification_metrics

    labels = torch.tensor(dataset.labels, dtype=torch.long)
    head.eval()
    with torch.no_grad():
        logits = head(dataset.features.to(head.weight))
    return classification_metrics(logits.cpu(), labels, head.out_features)


def collate_features(batch: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"features": torch.stack([b["features"] for b in batch]),
            "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.long)}


def head_model(classifier: Any) -> Any:
    """A module that trains ``classifier.head`` (the same object) on features."""
    import torch
    from torch import nn
    from transformers.modeling_outputs import SequenceClassifierOutput

    from finetune_sdk.models.classifier_model import classification_loss

    class HeadOnly(nn.Module):
        accepts_loss_kwargs = True  # the loss is normalised by the step's num_items_in_batch (accumulation)

        def __init__(self, head: nn.Linear) -> None:
            super().__init__()
            self.head = head

        def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                    **_: Any) -> Any:
            logits = self.head(features.to(self.head.weight.dtype))
            return SequenceClassifierOutput(loss=classification_loss(logits, labels, num_items_in_batch),
                                            logits=logits)

    return HeadOnly(classifier.head)


def feature_key(run: RunSpec, model: Any) -> dict[str, Any]:
    """What a frozen backbone's features depend on besides the data: the base model's identity, pooling, quantizer,
    dtype and ``max_length`` (``run`` is a :class:`~finetune_sdk.training.engine.RunSpec`)."""
    return {"model": model_identity(run.source), "pooling": model.pooling,
            "quantizer": run.quantizer.name if run.quantizer else None, "dtype": run.options["dtype"],
            "max_length": run.options["max_length"]}


def classifier_feature_datasets(run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """The classifier's (train, {name: eval}) feature datasets: the frozen backbone runs once per dataset (cached on
    disk); each held-out set's features are kept in ``run.state.eval_features`` for the final metrics."""
    from finetune_sdk.fsutil import cache_root

    base, cache_dir = feature_key(run, model), cache_root() / "features"
    features, seconds, hit = cached_features(model, plan.train, tokenizer.pad_token_id,
                                             {**base, "data": plan.dataset.get("fingerprint")}, cache_dir)
    logger.info("classifier features for %d examples: %s in %.1f s", len(plan.train.examples),
                "read from the cache" if hit else "computed once", seconds)
    run.state.metrics.update({"feature_seconds": seconds, "features_cached": hit})
    train = FeatureDataset(features, [ex["labels"] for ex in plan.train.examples])
    evals = {}
    for name, eval_set in plan.evals.items():
        eval_features, _, _ = cached_features(model, eval_set.encoded, tokenizer.pad_token_id,
                                              {**base, "data": eval_set.rows.fingerprint}, cache_dir)
        evals[name or "eval"] = run.state.eval_features[name] = FeatureDataset(
            eval_features, [ex["labels"] for ex in eval_set.encoded.examples])
    return train, evals
