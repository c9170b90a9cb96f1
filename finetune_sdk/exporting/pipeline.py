"""The steps of an export: resolve and check everything, merge, pick the chat format, write the folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.fsutil import staged_directory, write_json_atomic, write_text_atomic
from finetune_sdk.training.manifest import MANIFEST_NAME, read_manifest
from finetune_sdk.progress import activity

logger = logging.getLogger("finetune_sdk")


def check_export_folder(out: Path, inputs: list[tuple[str, Path | None]]) -> None:
    """Refuse an output folder that would destroy something: it must not exist, be empty, or be an earlier export.

    It may not be, contain or sit inside any of ``inputs`` (the result, the base model).
    """
    resolved = out.expanduser().resolve()
    for what, path in inputs:
        if path is None:
            continue
        other = Path(path).expanduser().resolve()
        if resolved == other or other.is_relative_to(resolved) or resolved.is_relative_to(other):
            raise ConfigError(f"--out {out} overlaps the {what} {path}; pick a folder outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out} is an existing file; pick a folder path that does not exist yet")
    if out.is_dir() and any(out.iterdir()) and not is_export_folder(out):
        raise ConfigError(f"--out {out} is an existing folder that is not a finetune-sdk export; nothing was written: "
                          "pick a new folder")


def is_export_folder(path: Path) -> bool:
    """True when ``path`` holds an export written by this SDK (its manifest says so)."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("export"), dict)


def merged_causal_lm(folder: Path, manifest: dict[str, Any], registry: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, record)``: the result as one float32 model, its adapter merged into the base read from
    disk in float32 (never the training copy), and what :func:`~finetune_sdk.models.base_precision.base_precision_record`
    says about it; the GGUF writer rounds it once to the export's type."""
    from finetune_sdk.models.base_precision import merged_float32
    from finetune_sdk.plugin_manager import get_plugin_host

    technique = get_plugin_host().create("technique", manifest["technique"])
    return merged_float32(folder, manifest, technique, registry=registry)


def run_export(ref: Any, out: Path, *, quantization: str | list[str], name: str | None, registry: Any,
               adapter_only: bool = False) -> Any:
    """Check, merge once, and write one GGUF file per quantization (the first one gets ``Modelfile``)."""
    from finetune_sdk.exporting import GGUFExport, ollama_name
    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.exporting.model_settings import (chat_setup, export_libraries, export_metadata,
                                                       modelfile_parameters)
    from finetune_sdk.exporting.modelfile import modelfile
    from finetune_sdk.models.loading import result_folder

    quantizations = [quantization] if isinstance(quantization, str) else list(quantization)
    folder = result_folder(ref, registry)
    manifest = read_manifest(folder)
    if manifest.get("task", "causal-lm") != "causal-lm":
        raise ConfigError(f"{ref}: a {manifest.get('task')} result has no language-model head to export as GGUF")
    base = manifest.get("base_model") or {}
    check_export_folder(out, [("result", folder), ("base model", Path(base["path"]) if base.get("path") else None)])
    _check_family_early(folder, manifest)
    name = name or (Path(os.fspath(ref)).name if Path(ref).is_dir() else os.fspath(ref).split("@")[0].split("/")[-1])
    if adapter_only:
        from finetune_sdk.exporting.adapter_gguf import run_adapter_export

        return run_adapter_export(folder, manifest, out, name=name, registry=registry, ref=ref,
                                  quantization=quantizations[0])
    model, tokenizer, base_precision = merged_causal_lm(folder, manifest, registry)
    template, chat_format, raw_prompt = chat_setup(manifest, tokenizer)
    options = manifest.get("options") or {}
    metadata = export_metadata(model, manifest, name)
    files: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    with staged_directory(out) as staging:
        for position, quant in enumerate(quantizations):
            gguf_name = f"{ollama_name(name)}-{quant}.gguf"
            with activity(f"writing {gguf_name}"):
                summaries[quant] = write_gguf(
                    model, tokenizer, staging / gguf_name, quantization=quant, chat_template=template, name=name,
                    description=f"{name}: {manifest.get('technique')} fine-tune exported by finetune-sdk",
                    metadata=metadata)
            text = modelfile(gguf_name, chat_format, eos_token=tokenizer.eos_token,
                             system_prompt=options.get("system_prompt"), raw_prompt=raw_prompt)
            text += modelfile_parameters(folder, model.config, manifest)
            write_text_atomic(staging / ("Modelfile" if position == 0 else f"{Path(gguf_name).stem}.Modelfile"), text)
            files[quant] = out / gguf_name
        first = quantizations[0]
        write_json_atomic(staging / MANIFEST_NAME, {
            "format_version": 1, "technique": "gguf-export", "task": "causal-lm",
            "export": {"format": "gguf", "file": files[first].name, "quantization": first,
                       "chat_format": chat_format.name if chat_format else None, **summaries[first],
                       "files": {quant: {"file": path.name, "tensor_types": summaries[quant]["tensor_types"]}
                                 for quant, path in files.items()}},
            "exported_from": {"ref": os.fspath(ref), "technique": manifest.get("technique"),
                              "quantizer": manifest.get("quantizer"), "formatter": manifest.get("formatter"),
                              "base_model": base or None, **base_precision},
            "libraries": export_libraries(),
        })
    return GGUFExport(directory=out, gguf_path=files[first], modelfile_path=out / "Modelfile",
                      quantization=first, ollama_name=ollama_name(name),
                      chat_format=chat_format.name if chat_format else None, summary=summaries[first], files=files)


def _check_family_early(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse an unsupported family from its config.json, before any weights load (when the config is local)."""
    from finetune_sdk.exporting.architectures import FAMILIES, unsupported_family
    from finetune_sdk.exporting.rope import check_rope

    base = manifest.get("base_model") or {}
    candidates = [folder / "config.json"]
    if base.get("path"):
        candidates.append(Path(base["path"]) / "config.json")
    for path in candidates:
        if path.is_file():
            model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
            if model_type not in FAMILIES:
                raise unsupported_family(model_type)
            from transformers import AutoConfig

            check_rope(AutoConfig.from_pretrained(path.parent), llama_arch=FAMILIES[model_type].gguf_arch == "llama")
            return


def attach_to_registry(done: Any, ref: Any, registry: Any) -> None:
    """Store an export's GGUF file and Modelfile as artifacts of the registry version ``ref``."""
    import shutil
    import tempfile

    from finetune_sdk.registry import Registry

    registry = registry if registry is not None else Registry()
    version = registry.pull(os.fspath(ref)) if os.fspath(ref).startswith("hf://") else registry.resolve(os.fspath(ref))
    for kind, path in (done.files or {done.quantization: done.gguf_path}).items():
        if path == done.gguf_path:
            continue  # attached below, with the Modelfile
        quant = done.quantization if kind in ("adapter", "base") else kind
        registry.attach(version.ref, path, kind="gguf-lora" if kind == "adapter" else "gguf",
                        metadata={"quantization": quant, "format": "gguf", "chat_format": done.chat_format,
                                  "architecture": done.summary.get("architecture")})
        if (done.directory / f"{path.stem}.Modelfile").is_file():
            registry.attach(version.ref, done.directory / f"{path.stem}.Modelfile", kind="ollama-modelfile",
                            metadata={"gguf": path.name})
    adapter = done.files.get("adapter") == done.gguf_path
    metadata = {"quantization": done.quantization, "format": "gguf", "chat_format": done.chat_format,
                "architecture": done.summary.get("architecture")}
    registry.attach(version.ref, done.gguf_path, kind="gguf-lora" if adapter else "gguf", metadata=metadata)
    with tempfile.TemporaryDirectory(prefix="finetune-modelfile-") as folder:
        named = Path(folder) / f"{done.gguf_path.stem}.Modelfile"
        shutil.copyfile(done.modelfile_path, named)
        registry.attach(version.ref, named, kind="ollama-modelfile", metadata={"gguf": done.gguf_path.name})
    logger.info("attached %s and its Modelfile to %s in the registry", done.gguf_path.name, version.ref)
