"""Opening what a benchmark scores: the fine-tuned model, its base, and the proof that the trained weights are
applied (the two disagree on a probe), for :func:`finetune_sdk.benchmark` and lm-eval's ``finetune-sdk`` backend
(:mod:`finetune_sdk.evaluation.lm_eval_backend`) alike.

Example:
    >>> from finetune_sdk.evaluation.opening import open_models
    >>> tuned, base, info = open_models("bot@2", with_base=True, check=True)  # doctest: +SKIP
    >>> info["kind"], len(info["adapter_sha256"])  # doctest: +SKIP
    ('result', 64)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from finetune_sdk.errors import FinetuneError

#: A fixed text whose logits the fine-tuned and the base model must disagree on.
PROBE = "Benchmark probe: the quick brown fox answers a question about its data."
#: Below this largest absolute logit difference the fine-tuned weights count as not applied.
APPLIED_TOLERANCE = 1e-6


def weights_sha256(directory: Path) -> str:
    """One sha256 over a result's weight files (``*.safetensors``, by relative path and content hash): what the
    scores record as the adapter's hash. Shape: 64 hex digits."""
    from finetune_sdk.fsutil import sha256_file

    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*.safetensors")):
        digest.update(f"{path.relative_to(directory).as_posix()}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def check_applied(tuned: Any, base: Any, ref: str, technique: str | None) -> float:
    """Raise :class:`FinetuneError` when the fine-tuned model's logits on :data:`PROBE` equal the base model's
    (largest absolute difference <= :data:`APPLIED_TOLERANCE`): the trained weights were not applied (lm-eval
    issues #511 and #808, where PEFT runs scored exactly like the base). Returns the largest difference."""
    import torch

    ids = base.tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diffs = []
        for loaded in (tuned, base):
            device = next(loaded.model.parameters()).device
            diffs.append(loaded.model(input_ids=ids.to(device)).logits.float().cpu())
    difference = float((diffs[0] - diffs[1]).abs().max())
    if difference <= APPLIED_TOLERANCE:
        raise FinetuneError(f"{ref}: the fine-tuned weights are not applied: on a probe the loaded model's output "
                            f"equals the base model's (largest difference {difference:.1e}); technique "
                            f"{technique!r} loaded no change into the base (its load() returned the base model?)")
    return difference


def open_models(ref: str, *, with_base: bool, check: bool, registry: Any = None,
                trust_remote_code: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """The model to score, the base (or ``None``) and what was opened: ``kind`` (``result`` or ``base``),
    ``folder``, ``version`` (an ``AdapterVersion`` or ``None``), ``adapter_sha256``, ``probe_difference``."""
    from finetune_sdk.models.loading import is_result, load, load_base, open_model, result_folder
    from finetune_sdk.training.manifest import read_manifest

    text = os.fspath(ref)
    if not is_result(text):
        return open_model(text, trust_remote_code=trust_remote_code), None, {"kind": "base", "adapter_sha256": None}
    folder = result_folder(text, registry)
    version = None
    if not Path(text).is_dir():
        from finetune_sdk.registry import Registry

        registry = registry if registry is not None else Registry()
        # hf://org/repo@v2 is pulled into the local registry (once; cached after): its scores go with that version
        version = registry.pull(text) if text.startswith("hf://") else registry.resolve(text)
    tuned = load(text, registry=registry, trust_remote_code=trust_remote_code)
    info: dict[str, Any] = {"kind": "result", "folder": folder, "version": version,
                            "adapter_sha256": weights_sha256(folder), "probe_difference": None}
    base = None
    if with_base or check:
        base = load_base(text, registry=registry, trust_remote_code=trust_remote_code)
        if check:
            technique = read_manifest(folder).get("technique")
            info["probe_difference"] = check_applied(tuned, base, text, technique)
    return tuned, (base if with_base else None), info
