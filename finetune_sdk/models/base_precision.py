"""Merges and exports start from the base as stored: its weights read from disk in float32, never the training copy.

Training may hold the frozen base in bfloat16 (``dtype="auto"`` on a bf16 GPU or an AMX/AVX512-BF16 CPU, see
:mod:`finetune_sdk.speed.precision`) or in 4 bits (QLoRA). A merge built on that copy carries its rounding into every
weight, the untouched embeddings too (a tiny Llama's f32 export was 8e-3 off the float32 merge on the logits).
Instead the base is read again from its files in float32, which holds every float32, bfloat16 and float16 checkpoint
exactly (a GGUF base is read from the float32 folder it was converted to once, see :mod:`finetune_sdk.models.gguf_import`); the
adapter is applied in float32, as PEFT's ``merge_and_unload`` does on a float32 base (the reference); the caller
rounds the result once to its output type. :func:`base_precision_record` says in the manifest what was used.

Example:
    >>> import tempfile, pathlib, torch
    >>> from safetensors.torch import save_file
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.zeros(2, dtype=torch.bfloat16), "step": torch.zeros(1, dtype=torch.int64)},
    ...           str(folder / "model.safetensors"))
    >>> stored_dtype(folder)
    'bfloat16'
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger("finetune_sdk")

#: The dtype a merge computes in and a full-precision load reads every stored floating type into.
MERGE_DTYPE = "float32"
#: safetensors header dtype codes of floating tensors -> torch's names.
FLOAT_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2"}


def stored_dtype(folder: Path | None) -> str | None:
    """The floating dtype(s) of the safetensors weights in ``folder`` as written on disk, from the files' headers
    (no tensor is read): ``"float32"``, ``"bfloat16"``..., several joined by ``+`` (``"bfloat16+float32"``), None
    when the folder is unknown or holds no safetensors file."""
    from finetune_sdk.models.safe_weights import check_safetensors

    if folder is None or not Path(folder).is_dir():
        return None
    found: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        header = check_safetensors(path)
        found.update(FLOAT_CODES[entry["dtype"]] for name, entry in header.items()
                     if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in FLOAT_CODES)
    return "+".join(sorted(found)) or None


def source_folder(manifest: dict[str, Any], result: Path, technique: Any) -> Path | None:
    """The folder holding the weights a merge starts from: the result itself for a technique whose result is the
    model (full fine-tuning, an earlier merge), else the recorded base (a local folder, the folder a GGUF file was
    converted to, or the Hub cache's snapshot when it is there); None when it can't be found without the network."""
    if getattr(technique, "result_is_model", False):
        return result
    base = manifest.get("base_model") or {}
    if base.get("kind") == "gguf":
        from finetune_sdk.models.gguf_import import converted_folder

        return converted_folder(Path(base["id"]))
    if base.get("kind") == "local" and base.get("path"):
        return Path(base["path"])
    if base.get("kind") == "hub":
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(base["id"], revision=base.get("revision"), local_files_only=True,
                                          allow_patterns=["*.safetensors", "*.json"]))
        except Exception as exc:  # noqa: BLE001 - only the record needs it; say why it is missing
            logger.debug("stored dtype of %s unknown: %s", base["id"], exc)
    return None


def base_precision_record(manifest: dict[str, Any], result: Path, technique: Any) -> dict[str, Any]:
    """What a merge or export records about its starting point: ``base_dtype_loaded`` (always ``float32``),
    ``base_dtype_stored`` (the source files' dtype, see :func:`stored_dtype`; for a GGUF base the float32 folder
    it was dequantized to), ``base_source`` (``gguf``, ``local``, ``hub``, or ``result`` for full fine-tuning) and
    ``merged_in`` (``float32``, or None when there was no adapter to merge)."""
    own = bool(getattr(technique, "result_is_model", False))
    stored = stored_dtype(source_folder(manifest, result, technique))
    if stored and "float64" in stored:
        logger.warning("the base is stored in float64; the merge reads it in float32 (rounded once)")
    return {"base_dtype_loaded": MERGE_DTYPE, "base_dtype_stored": stored,
            "base_source": "result" if own else (manifest.get("base_model") or {}).get("kind"),
            "merged_in": MERGE_DTYPE if getattr(technique, "saves_adapter", False) else None}


def merged_float32(folder: Path, manifest: dict[str, Any], technique: Any, *, registry: Any = None,
                   trust_remote_code: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, record)``: the result ``folder`` as one plain float32 model, its adapter (if any) merged
    into the base read from disk in float32 (never 4-bit, never the training dtype), in eval mode; ``record`` is
    :func:`base_precision_record`. The caller rounds the model once to its output type."""
    import torch

    from finetune_sdk.models.loading import load
    from finetune_sdk.progress import activity

    loaded = load(folder, quantized=False, registry=registry, trust_remote_code=trust_remote_code)
    model = loaded.model
    if getattr(technique, "saves_adapter", False):
        untied = _untie_embeddings(model)
        with activity("merging the adapter into the float32 base"), warnings.catch_warnings():
            # PEFT warns that the embeddings are "no longer tied" after the copy made just above; the tie is put
            # back below unless the merge really changed one of them
            warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
            model = technique.merge(model)
        if untied:
            _retie_unless_the_merge_split_them(model)
    model = model.to(torch.float32).eval()
    return model, loaded.tokenizer, base_precision_record(manifest, folder, technique)


def _untie_embeddings(model: Any) -> bool:
    """Give the output matrix a copy of its own when it is the input embedding's (``tie_word_embeddings``).

    Training with an adapter on ``lm_head`` (or on the embedding) of a tied model changes only that side: the other
    still reads the shared base matrix. Merging into the shared tensor would change both (a LoRA on GPT-2's tied
    ``lm_head`` moved the exported logits by 12.6 on logits up to 6.2). True when it untied them."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if inputs is None or outputs is None:
        return False
    inputs, outputs = getattr(inputs, "base_layer", inputs), getattr(outputs, "base_layer", outputs)
    if getattr(outputs, "weight", None) is None or outputs.weight is not inputs.weight:
        return False
    outputs.weight = torch.nn.Parameter(outputs.weight.detach().clone(), requires_grad=False)
    return True


def _retie_unless_the_merge_split_them(model: Any) -> None:
    """After the merge: tie the output matrix back to the embedding when neither was adapted (the model stays as
    it was); otherwise mark the config untied, so the two are saved and exported as two matrices."""
    import torch

    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    configs = {id(model.config): model.config, id(config): config}.values()
    tied = torch.equal(inputs.weight, outputs.weight)
    if tied:
        outputs.weight = inputs.weight
    for each in configs:  # PEFT's merge_and_unload marks the config untied when it finds two matrices
        each.tie_word_embeddings = tied
    if tied:
        return
    logger.info("the adapter changed one side of the tied embeddings: the merged model has its own output matrix")
