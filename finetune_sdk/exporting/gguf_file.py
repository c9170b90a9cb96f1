"""Writing a loaded transformers causal LM and its tokenizer as one GGUF file (the ``gguf`` package's writer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune_sdk.exporting.architectures import family_of, gguf_tensors
from finetune_sdk.exporting.quantization import check_quantization, encode, file_type, tensor_types
from finetune_sdk.exporting.vocab import add_tokenizer
from finetune_sdk.fsutil import atomic_path


def write_gguf(model: Any, tokenizer: Any, path: str | os.PathLike[str], *, quantization: str = "q8_0",
               chat_template: str | None = None, name: str | None = None,
               description: str | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (a float transformers causal LM of a supported family) and ``tokenizer`` to ``path``.

    Args:
        model: a causal LM of a supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3,
            GPT-2; see :mod:`~finetune_sdk.exporting.architectures`) whose weights are float (merge adapters and
            dequantize first).
        tokenizer: its fast tokenizer (byte-level BPE or SentencePiece-style BPE with byte fallback).
        path: the ``.gguf`` file to write; it appears atomically (a temporary file beside it, then a rename).
        quantization: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0`` or a K-quant mix
            ``q6_k``, ``q5_k_m``, ``q5_k_s``, ``q4_k_m``, ``q4_k_s``, ``q3_k_l``, ``q3_k_m``, ``q3_k_s``, ``q2_k`` (types per
            tensor as llama-quantize picks them).
        chat_template: the Jinja chat template stored as ``tokenizer.chat_template`` (None: none).
        name: ``general.name``.
        description: ``general.description``.
        metadata: more ``general.*`` keys (basename, size_label, finetune, license, base_models), as
            :func:`~finetune_sdk.exporting.model_settings.export_metadata` returns them.

    Returns:
        A summary: architecture, quantization, tensor count per GGML type, tokenizer kind and special ids.

    Raises:
        ConfigError: an unsupported family, tokenizer or quantization (one line, nothing written).

    Example:
        >>> from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer
        >>> import tempfile, pathlib
        >>> tok = tiny_tokenizer(); model = tiny_model("llama", tok)
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf"
        >>> write_gguf(model, tok, out, quantization="q8_0")["architecture"]
        'llama'
    """
    import gguf
    import numpy as np

    quantization = check_quantization(quantization)
    family = family_of(model.config)
    for parameter in model.parameters():
        if not parameter.dtype.is_floating_point or parameter.__class__.__name__ in ("Params4bit", "Int8Params"):
            raise TypeError("write_gguf needs float weights: merge the adapter into a dequantized base first")
    path = Path(path)
    with atomic_path(path, suffix=".partial") as tmp:
        writer = gguf.GGUFWriter(str(tmp), family.gguf_arch)
        writer.add_type(gguf.GGUFType.MODEL)
        # transformers reads a file named exactly "mistral" as a Mistral model, which its GGUF loader then can't map
        writer.add_name(name if name and name != "mistral" else f"{family.model_type}-finetune")
        if description:
            writer.add_description(description)
        if metadata:
            from finetune_sdk.exporting.model_settings import add_metadata

            add_metadata(writer, metadata)
        family.write_hparams(model.config, writer)
        writer.add_file_type(file_type(quantization))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        summary = add_tokenizer(writer, tokenizer, model.config.vocab_size, chat_template)
        counts: dict[str, int] = {}
        tensors = list(gguf_tensors(model, family))
        chosen = tensor_types([(n, tuple(data.shape)) for n, data in tensors], quantization)
        for gguf_name, data in tensors:
            qtype = chosen[gguf_name]
            encoded = encode(data, qtype)
            writer.add_tensor(gguf_name, encoded, raw_dtype=qtype if encoded.dtype == np.uint8 else None)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_written(tmp, [n for n, _ in tensors], model.config.vocab_size)
    return {"architecture": family.gguf_arch, "model_type": family.model_type, "quantization": quantization,
            "tensor_types": counts, **summary}


def _check_written(path: Path, tensor_names: list[str], vocab_size: int) -> None:
    """Read the file back (memory-mapped, no model load): every tensor and every token must be there."""
    import gguf

    reader = gguf.GGUFReader(path)
    written = [tensor.name for tensor in reader.tensors]
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if sorted(written) != sorted(tensor_names) or tokens != vocab_size:
        raise RuntimeError(f"the GGUF file written for {path} reads back with {len(written)} tensors and {tokens} "
                           f"tokens instead of {len(tensor_names)} and {vocab_size}; nothing was saved")
