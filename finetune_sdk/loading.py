"""``finetune_sdk.load``: a saved result back as a model ready to generate or predict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune_sdk.errors import FinetuneError
from finetune_sdk.manifest import read_manifest
from finetune_sdk.models import ModelSource, ensure_pad_token, load_model, resolve_source
from finetune_sdk.plugin_manager import get_plugin_host


def result_folder(ref: str | os.PathLike[str], registry: Any = None) -> Path:
    """The folder ``ref`` names: a result folder as is, else a registry version (pulled first for ``hf://``)."""
    if Path(ref).is_dir():
        return Path(ref)
    text = os.fspath(ref)
    from finetune_sdk.registry import Registry
    from finetune_sdk.registry.refs import NAME

    if not (text.startswith("hf://") or NAME.match(text.split("@", 1)[0])):
        raise FinetuneError(f"{ref}: no such result folder or registry adapter")
    registry = registry if registry is not None else Registry()
    if text.startswith("hf://"):
        return registry.path(registry.pull(text).ref)
    return registry.path(text)


def load(ref: str | os.PathLike[str], *, quantized: bool | None = None, base_model: Any = None,
         registry: Any = None) -> Any:
    """Load a result: the base model (4-bit again when it was trained with qlora) plus what was trained.

    Args:
        ref: a result folder written by ``Trainer.fit``, or a registry reference: ``name``, ``name@3``,
            ``name@production``, ``hf://org/repo`` or ``hf://org/repo@v3`` (pulled and verified first).
        quantized: ``None`` (as trained), ``False`` to load the base in full precision even after qlora.
        base_model: a path or Hub id to use instead of the recorded base model.
        registry: the :class:`~finetune_sdk.registry.Registry` to resolve names in (default: ``Registry()``).

    Returns:
        A :class:`~finetune_sdk.inference.FineTunedModel` with ``generate``, ``predict`` and ``evaluate``.

    Example:
        >>> import finetune_sdk
        >>> bot = finetune_sdk.load("support-bot@production")  # doctest: +SKIP
        >>> bot.generate("How do I reset my password?")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoTokenizer

    from finetune_sdk.inference import FineTunedModel
    from finetune_sdk.log import ensure_handler

    ensure_handler()

    directory = result_folder(ref, registry)
    manifest = read_manifest(directory)
    host = get_plugin_host()
    technique = host.create("technique", manifest["technique"])
    formatter = host.create("formatter", manifest["formatter"]) if manifest.get("formatter") else None
    options = dict(manifest["options"])
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(directory))
    quantizer = None
    if getattr(technique, "result_is_model", False):
        source = ModelSource("local", str(directory.resolve()), str(directory.resolve()))
    else:
        source = resolve_source(base_model) if base_model else ModelSource.from_manifest(manifest["base_model"])
        if manifest.get("quantizer") and quantized is not False:
            quantizer = host.create("quantizer", manifest["quantizer"])
    dtype = getattr(torch, manifest.get("dtype") or "float32")
    model = load_model(source, manifest["task"], dtype=dtype,
                       quantization_config=quantizer.quantization_config(options) if quantizer else None,
                       trust_remote_code=bool(options.get("trust_remote_code")))
    if quantizer is not None:
        quantizer.after_load(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = technique.load(model, directory, {**options, "pad_token_id": tokenizer.pad_token_id})
    model.eval()
    return FineTunedModel(model, tokenizer, task=manifest["task"], formatter=formatter, options=options,
                          labels=manifest.get("labels"))


def load_base(ref: str | os.PathLike[str], *, registry: Any = None) -> Any:
    """The untrained starting point of a result: its recorded base model (for a classifier, with a fresh head
    seeded as training seeded it), wrapped with the result's tokenizer and formatter."""
    import torch
    from transformers import AutoTokenizer, set_seed

    from finetune_sdk.inference import FineTunedModel

    directory = result_folder(ref, registry)
    manifest = read_manifest(directory)
    host = get_plugin_host()
    technique = host.create("technique", manifest["technique"])
    options = dict(manifest["options"])
    base = manifest.get("merged_from", {}).get("base_model") or manifest["base_model"]
    source = ModelSource.from_manifest(base)
    quantizer = host.create("quantizer", manifest["quantizer"]) if manifest.get("quantizer") else None
    model = load_model(source, manifest["task"], dtype=getattr(torch, manifest.get("dtype") or "float32"),
                       quantization_config=quantizer.quantization_config(options) if quantizer else None,
                       trust_remote_code=bool(options.get("trust_remote_code")))
    if quantizer is not None:
        quantizer.after_load(model)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(directory))
    labels = manifest.get("labels")
    if manifest["task"] == "classification":
        set_seed(options.get("seed", 42))
        model = technique.prepare(model, {**options, "labels": labels}, tokenizer)
    formatter = host.create("formatter", manifest["formatter"]) if manifest.get("formatter") else None
    return FineTunedModel(model, tokenizer, task=manifest["task"], formatter=formatter, options=options,
                          labels=labels)
