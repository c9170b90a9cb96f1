"""Adapter-only export: the LoRA matrices as a GGUF adapter (llama.cpp ``--lora``, Ollama ``ADAPTER``) beside the
base model as a GGUF file, so one base serves many fine-tunes.

The adapter file is what llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp`` reads:
``general.type = adapter``, ``general.architecture`` of the base, ``adapter.type = lora``, ``adapter.lora.alpha``
(float32), and per adapted matrix ``<base tensor name>.lora_a`` (PEFT's ``lora_A``, shape ``(r, in)``) and
``.lora_b`` (``lora_B``, ``(out, r)``), float32. llama.cpp adds ``alpha / r * B @ A`` to the base matrix. The
base-side reshaping the full export does applies to the adapter too: for llama.cpp's ``llama`` architecture the
query/key rows are permuted, which for ``B @ A`` means permuting the rows of ``B`` (as ``LoraTorchTensor`` does).

Differences from ``convert_lora_to_gguf.py``: with rsLoRA (scale ``alpha / sqrt(r)``) the written alpha is
``alpha * sqrt(r)`` so llama.cpp's ``alpha / r`` gives PEFT's scale (the converter writes ``alpha`` as is).
Refused, one line each: a result that isn't a LoRA adapter (full fine-tunes, DoRA, IA3...), trained biases,
``modules_to_save`` (e.g. resized embeddings), per-module ranks or alphas, LoRA on embeddings, LoRA on an
``lm_head`` tied to the embedding (but GPT-2's).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_lora_folder(folder: Path, technique: str | None) -> dict[str, Any]:
    """The PEFT ``adapter_config.json`` of ``folder`` if llama.cpp can serve it as a LoRA adapter; else an error."""
    if not all((folder / name).is_file() for name in ADAPTER_FILES):
        raise ConfigError(f"--adapter-only: {folder} holds no LoRA adapter (technique {technique!r}); only lora and "
                          "qlora results can be exported as a GGUF adapter: export the merged model instead")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"PEFT type {config.get('peft_type')!r}")
    if config.get("use_dora"):
        problems.append("DoRA (llama.cpp has no magnitude vectors)")
    if config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={config['bias']!r})")
    if config.get("modules_to_save"):
        problems.append(f"fully trained modules {config['modules_to_save']}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module ranks or alphas (a GGUF adapter has one alpha)")
    if problems:
        raise ConfigError(f"--adapter-only: this adapter can't be a llama.cpp LoRA: {'; '.join(problems)}; export the "
                          "merged model instead (without --adapter-only)")
    return config


def lora_pairs(folder: Path) -> dict[str, tuple[Any, Any]]:
    """``{Hugging Face weight name: (A, B)}`` (float32 numpy) from ``adapter_model.safetensors``."""
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if ".lora_embedding_" in key:
            raise ConfigError("--adapter-only: LoRA on embeddings is not supported; export the merged model instead")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module + ".weight", {})[part] = value.astype("float32")
    return {name: (parts["lora_A"], parts["lora_B"]) for name, parts in pairs.items()}


def write_lora_gguf(config: Any, adapter_config: dict[str, Any], pairs: dict[str, tuple[Any, Any]], path: Path, *,
                    name: str) -> dict[str, Any]:
    """Write the adapter file (see the module docstring); return a summary (tensor count, alpha, rank)."""
    import gguf

    from finetune_sdk.exporting.architectures import family_of
    from finetune_sdk.fsutil import atomic_path

    family = family_of(config)
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == family.gguf_arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and family.model_type != "gpt2"
    if tied and "lm_head.weight" in pairs:  # the base file has no output matrix for the adapter to change
        raise ConfigError("--adapter-only: this LoRA adapts lm_head, which this model ties to its token embedding "
                          "(llama.cpp reads one matrix for both); export the merged model instead")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # llama.cpp scales by alpha / r; rsLoRA by lora_alpha / sqrt(r)
    with atomic_path(path, suffix=".partial") as tmp:
        writer = gguf.GGUFWriter(str(tmp), family.gguf_arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for hf_name, (lora_a, lora_b) in sorted(pairs.items()):
            if family.gguf_arch == "llama":  # the q/k row permutation of the full export, applied to B's rows
                (_, lora_b), = list(family.transform(hf_name, lora_b, config))
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise ConfigError(f"--adapter-only: no llama.cpp name for adapted weight {hf_name!r}")
            writer.add_tensor(f"{gguf_name}.lora_a", lora_a.copy())
            writer.add_tensor(f"{gguf_name}.lora_b", lora_b.copy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"adapter_tensors": 2 * len(pairs), "lora_alpha": alpha, "r": rank}


def run_adapter_export(folder: Path, manifest: dict[str, Any], out: Path, *, name: str, registry: Any, ref: Any,
                       quantization: str = "f16") -> Any:
    """Write ``<name>-lora.gguf``, the base as ``<name>-base-<quantization>.gguf`` and a Modelfile with ``ADAPTER``."""
    from finetune_sdk.exporting import GGUFExport, ollama_name
    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.exporting.model_settings import chat_setup, export_libraries, modelfile_parameters
    from finetune_sdk.exporting.modelfile import modelfile
    from finetune_sdk.fsutil import staged_directory, write_json_atomic, write_text_atomic
    from finetune_sdk.models.loading import load
    from finetune_sdk.training.manifest import MANIFEST_NAME
    from finetune_sdk.progress import activity

    adapter_config = check_lora_folder(folder, manifest.get("technique"))
    pairs = lora_pairs(folder)
    loaded = load(folder, quantized=False, registry=registry)
    import torch

    base = loaded.model.unload().to(torch.float32).eval()  # the base without the adapter, not merged
    tokenizer = loaded.tokenizer
    template, chat_format, raw_prompt = chat_setup(manifest, tokenizer)
    stem = ollama_name(name)
    adapter_name, base_name = f"{stem}-lora.gguf", f"{stem}-base-{quantization}.gguf"
    with staged_directory(out) as staging:
        with activity(f"writing {adapter_name} and {base_name}"):
            summary = write_lora_gguf(base.config, adapter_config, pairs, staging / adapter_name, name=name)
            base_summary = write_gguf(base, tokenizer, staging / base_name, quantization=quantization,
                                      chat_template=template, name=f"{name}-base")
        text = modelfile(base_name, chat_format, eos_token=tokenizer.eos_token,
                         system_prompt=(manifest.get("options") or {}).get("system_prompt"), raw_prompt=raw_prompt)
        first, rest = text.split("\n", 1)
        text = f"{first}\nADAPTER ./{adapter_name}\n{rest}" + modelfile_parameters(folder, base.config, manifest)
        write_text_atomic(staging / "Modelfile", text)
        write_json_atomic(staging / MANIFEST_NAME, {
            "format_version": 1, "technique": "gguf-export", "task": "causal-lm",
            "export": {"format": "gguf-lora-adapter", "file": adapter_name, "base_file": base_name,
                       "quantization": quantization, "chat_format": chat_format.name if chat_format else None,
                       **summary, "architecture": base_summary["architecture"]},
            "exported_from": {"ref": os.fspath(ref), "technique": manifest.get("technique"),
                              "base_model": manifest.get("base_model")},
            "libraries": export_libraries(),
        })
    return GGUFExport(directory=out, gguf_path=out / adapter_name, modelfile_path=out / "Modelfile",
                      quantization=quantization, ollama_name=stem,
                      chat_format=chat_format.name if chat_format else None,
                      summary={**base_summary, **summary},
                      files={"adapter": out / adapter_name, "base": out / base_name})
