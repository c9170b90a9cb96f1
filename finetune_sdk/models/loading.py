"""``finetune_sdk.load``: a saved result back as a model ready to generate or predict; and a base model opened the
same way (:func:`open_base`, what a ``Trainer`` holds before ``fit``), without building a ``Trainer``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_sdk.errors import FinetuneError
from finetune_sdk.formatter import HEAD_TASKS, Formatter
from finetune_sdk.models.safe_weights import check_result_folder
from finetune_sdk.models.sources import (ModelSource, _first_line, ensure_pad_token, load_base_model, load_tokenizer,
                                         resolve_source, with_new_head)
from finetune_sdk.plugin_manager import PluginHost, get_plugin_host
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique
from finetune_sdk.training.manifest import MANIFEST_NAME, read_manifest

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel

logger = logging.getLogger("finetune_sdk")


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


def untrusted_options(manifest: dict[str, Any], trust_remote_code: bool) -> dict[str, Any]:
    """The manifest's options with ``trust_remote_code`` set by the caller, never by the (maybe downloaded) file."""
    options = dict(manifest.get("options") or {})
    if options.get("trust_remote_code") and not trust_remote_code:
        logger.warning("the result was trained with trust_remote_code; it stays off unless you pass "
                       "trust_remote_code=True (--trust-remote-code) yourself")
    options["trust_remote_code"] = trust_remote_code
    return options


def result_tokenizer(directory: Path, trust_remote_code: bool) -> Any:
    """The tokenizer saved in a result folder (its own code runs only when the caller trusts it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"can't load the tokenizer saved in {directory}: {_first_line(exc)}") from None
    return ensure_pad_token(tokenizer)


def load(ref: str | os.PathLike[str], *, quantized: bool | None = None, base_model: Any = None,
         registry: Any = None, trust_remote_code: bool = False) -> Any:
    """Load a result: the base model (4-bit again when it was trained with qlora) plus what was trained.

    Args:
        ref: a result folder written by ``Trainer.fit``, or a registry reference: ``name``, ``name@3``,
            ``name@production``, ``hf://org/repo`` or ``hf://org/repo@v3`` (pulled and verified first).
        quantized: ``None`` (as trained: a 4-bit base after qlora, the training dtype, e.g. a bfloat16 base
            under ``dtype="auto"``), ``False`` for full precision: the base's weights as stored on disk, read in
            float32 (exact for float32, bfloat16 and float16 checkpoints), even after qlora or a bfloat16 run.
        base_model: a path or Hub id to use instead of the recorded base model.
        registry: the :class:`~finetune_sdk.registry.Registry` to resolve names in (default: ``Registry()``).
        trust_remote_code: let the model repository's own Python code run. Only this argument turns it on: a
            result's manifest (or any downloaded file) never does, even when it was trained with it.

    Returns:
        A :class:`~finetune_sdk.models.inference.FineTunedModel` with ``generate``, ``predict`` and ``evaluate``.

    Example:
        >>> import finetune_sdk
        >>> bot = finetune_sdk.load("support-bot@production")  # doctest: +SKIP
        >>> bot.generate("How do I reset my password?")  # doctest: +SKIP
    """
    import torch

    from finetune_sdk.models.inference import FineTunedModel
    from finetune_sdk.log import ensure_handler

    ensure_handler()

    directory = result_folder(ref, registry)
    manifest = read_manifest(directory)
    check_result_folder(directory)
    host = get_plugin_host()
    technique = host.create("technique", manifest["technique"])
    formatter = host.create("formatter", manifest["formatter"]) if manifest.get("formatter") else None
    options = untrusted_options(manifest, trust_remote_code)
    tokenizer = result_tokenizer(directory, trust_remote_code)
    quantizer = None
    if getattr(technique, "result_is_model", False):
        source = ModelSource("local", str(directory.resolve()), str(directory.resolve()))
    else:
        source = resolve_source(base_model) if base_model else ModelSource.from_manifest(manifest["base_model"])
        if manifest.get("quantizer") and quantized is not False:
            quantizer = host.create("quantizer", manifest["quantizer"])
    # quantized=False: full precision, the weights as stored (read in float32), not the training copy's dtype
    dtype = "float32" if quantized is False else manifest.get("dtype") or "float32"
    model = load_base_model(source, manifest["task"], quantizer, options, dtype=getattr(torch, dtype),
                            pad_token_id=tokenizer.pad_token_id)
    if manifest.get("base_delta"):  # FedEx-LoRA's residual, part of the base weights the adapter applies to
        from finetune_sdk.federated.fedex import fold_into_base

        fold_into_base(model, directory / manifest["base_delta"]["file"])
    model = technique.load(model, directory, {**options, "pad_token_id": tokenizer.pad_token_id})
    if (manifest.get("precision") or {}).get("activations") == "float32" and dtype != "float32":
        from finetune_sdk.speed.precision import keep_activations_fp32

        keep_activations_fp32(model)  # computes as it trained: bf16 matmuls, fp32 in between
    model.eval()
    return FineTunedModel(model, tokenizer, task=manifest["task"], formatter=formatter, options=options,
                          labels=manifest.get("labels"))


def load_base(ref: str | os.PathLike[str], *, registry: Any = None, trust_remote_code: bool = False) -> Any:
    """The untrained starting point of a result: its recorded base model (for a classifier or a reward model, with
    a fresh head seeded as training seeded it), wrapped with the result's tokenizer and formatter."""
    import torch

    from finetune_sdk.models.inference import FineTunedModel

    directory = result_folder(ref, registry)
    manifest = read_manifest(directory)
    check_result_folder(directory)
    host = get_plugin_host()
    technique = host.create("technique", manifest["technique"])
    options = untrusted_options(manifest, trust_remote_code)
    base = manifest.get("merged_from", {}).get("base_model") or manifest["base_model"]
    source = ModelSource.from_manifest(base)
    quantizer = host.create("quantizer", manifest["quantizer"]) if manifest.get("quantizer") else None
    model = load_base_model(source, manifest["task"], quantizer, options,
                            dtype=getattr(torch, manifest.get("dtype") or "float32"))
    tokenizer = result_tokenizer(directory, trust_remote_code)
    labels = manifest.get("labels")
    if manifest["task"] in HEAD_TASKS:
        model = with_new_head(technique, model, options, labels or [], tokenizer)
    formatter = host.create("formatter", manifest["formatter"]) if manifest.get("formatter") else None
    return FineTunedModel(model, tokenizer, task=manifest["task"], formatter=formatter, options=options,
                          labels=labels)


def is_result(ref: str) -> bool:
    """True for a result folder or a registry reference (``name@...``, ``hf://...``, a published name)."""
    if (Path(ref) / MANIFEST_NAME).is_file() or ref.startswith("hf://") or "@" in ref:
        return True
    if "/" in ref or Path(ref).exists():
        return False
    from finetune_sdk.registry import Registry
    from finetune_sdk.registry.refs import NAME

    return bool(NAME.match(ref)) and any(a["name"] == ref for a in Registry().list())


def open_model(ref: str, formatter: str | None = None, trust_remote_code: bool = False) -> Any:
    """A result folder or registry reference loads with ``finetune_sdk.load``; anything else is a base model."""
    from finetune_sdk.log import quiet_third_party_output

    quiet_third_party_output()
    if is_result(ref):
        chosen = None
        if formatter:  # an unknown name is refused before the model loads
            chosen = get_plugin_host().create("formatter", formatter)
        model = load(ref, trust_remote_code=trust_remote_code)
        if chosen is not None:
            model.formatter = chosen
        return model
    from finetune_sdk.log import ensure_handler
    from finetune_sdk.options import TRAINING_OPTIONS, option_table, resolve_options
    from finetune_sdk.speed.precision import choose_precision

    ensure_handler()  # the loading line shows, as for a Trainer
    host = get_plugin_host()
    technique = host.create("technique", "lora")
    chosen = host.create("formatter", formatter) if formatter else None  # refused before the model loads
    options = resolve_options({"trust_remote_code": trust_remote_code},
                              option_table([TRAINING_OPTIONS, technique.options]))
    source = resolve_source(ref, options["revision"])
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    dtype = choose_precision(options, technique, None).torch_dtype()
    return open_base(source, technique, None, chosen, options, host, tokenizer=tokenizer, dtype=dtype)


def open_base(source: ModelSource, technique: Technique, quantizer: Quantizer | None, formatter: Formatter | None,
              options: dict[str, Any], host: PluginHost, *, tokenizer: Any, model: Any = None,
              dtype: Any = None) -> LoadedModel:
    """A base model ready to generate, predict or evaluate, as a ``Trainer`` holds it before ``fit``: loaded from
    ``source`` (or ``model``, already loaded) with ``quantizer`` in ``dtype`` (a ``torch.dtype``), its pad id set;
    for a head technique (classifier, reward model) a new head seeded from ``options["seed"]``; without a
    ``formatter``, a causal LM whose tokenizer has a chat template renders prompts with ``chat-template``."""
    from finetune_sdk.models.inference import LoadedModel

    if model is None:
        model = load_base_model(source, technique.task, quantizer, options, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if technique.task in HEAD_TASKS:
        labels = options.get("labels") or [str(i) for i in range(options.get("num_labels") or 2)]
        model = with_new_head(technique, model, options, labels, tokenizer)
    if formatter is None and technique.task not in HEAD_TASKS and getattr(tokenizer, "chat_template", 0):
        formatter = host.create("formatter", "chat-template")
    return LoadedModel(model, tokenizer, task=technique.task, formatter=formatter, options=options,
                       labels=getattr(model, "labels", None))
