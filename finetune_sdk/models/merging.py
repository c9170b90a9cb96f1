"""Merge an adapter into its base model and save a standalone Hugging Face model folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.fsutil import staged_directory, write_json_atomic
from finetune_sdk.training.manifest import MANIFEST_NAME, read_manifest


def merge(ref: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "float32",
          registry: Any = None, trust_remote_code: bool = False) -> Path:
    """Fold the adapter of ``ref`` (a result folder or registry reference) into its base; save to ``out``.

    The base is read again from disk in float32 (its weights as stored: exact for float32, bfloat16 and float16
    checkpoints; a GGUF base from the float32 folder it was converted to), never from the training copy (a
    bfloat16 base under ``dtype="auto"``, or QLoRA's 4-bit weights: merging into 4-bit degrades outputs). The
    adapter is applied in float32 (PEFT's ``merge_and_unload`` on a float32 base) and the result is rounded once to
    ``dtype`` (float32, bfloat16 or float16). The folder (model, tokenizer, a manifest saying what was merged and,
    in ``merged_from``, ``base_dtype_loaded`` and ``base_dtype_stored``) appears atomically and loads with
    ``finetune_sdk.load`` or plain ``from_pretrained``. ``out`` must be new, empty or an earlier result (see
    :mod:`finetune_sdk.training.output_paths`); the base model's code runs only with ``trust_remote_code=True`` from the
    caller.

    Raises:
        ConfigError: an unknown ``dtype``, a technique with no adapter (a full fine-tune), or an unusable ``out``.

    Example:
        >>> import finetune_sdk
        >>> finetune_sdk.merge("support-bot@production", "exports/support-bot")  # doctest: +SKIP
    """
    import torch

    from finetune_sdk.models.base_precision import merged_float32
    from finetune_sdk.models.loading import result_folder
    from finetune_sdk.plugin_manager import get_plugin_host

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r}: merge into float32, bfloat16 or float16")
    folder = result_folder(ref, registry)
    manifest = read_manifest(folder)
    technique = get_plugin_host().create("technique", manifest["technique"])
    if not getattr(technique, "saves_adapter", False):
        raise ConfigError(f"{ref}: technique {manifest['technique']!r} has no adapter to merge "
                          "(a full fine-tune is already a standalone model)")
    from finetune_sdk.training.output_paths import check_output_path

    base = manifest.get("base_model") or {}
    check_output_path(out, flag="out", inputs=[("result being merged", folder),
                                               ("base model", base.get("path") if base.get("kind") == "local" else None)])
    merged, tokenizer, record = merged_float32(folder, manifest, technique, registry=registry,
                                               trust_remote_code=trust_remote_code)
    merged = merged.to(getattr(torch, dtype))  # the one rounding, to the output type
    out = Path(out)
    with staged_directory(out) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / MANIFEST_NAME, {
            **manifest, "technique": "full", "quantizer": None, "dtype": dtype,
            "merged_from": {"ref": str(ref), "technique": manifest["technique"],
                            "quantizer": manifest.get("quantizer"), "base_model": manifest.get("base_model"),
                            **record},
        })
    return out
