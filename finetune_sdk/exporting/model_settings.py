"""What an export carries of the model's own settings: GGUF ``general.*`` metadata and Modelfile ``PARAMETER``s.

* Metadata, as llama.cpp's converter writes it (``gguf.Metadata.set_gguf_meta_model``): ``general.basename`` (the
  export's name), ``general.size_label`` (``gguf.size_label`` of the parameter count: ``135M``, ``8B``),
  ``general.finetune`` (the technique), ``general.base_model.count`` and ``general.base_model.0.*`` (name,
  organization and Hub URL of the base), ``general.license`` when the base's model card states one.
* Modelfile: ``PARAMETER num_ctx`` = the context training used (``max_length``), capped by the model's
  ``max_position_embeddings``; and the sampling defaults of ``generation_config.json`` (result folder first, then
  the base model's): ``temperature``, ``top_p``, ``top_k``, and ``repetition_penalty`` as Ollama's
  ``repeat_penalty``. Unless it says ``do_sample: true`` transformers decodes greedily and ignores the first three,
  so a config that sets ``do_sample: false`` (or sampling values without ``do_sample``) gives ``temperature 0``
  (Ollama's greedy) instead; ``repeat_penalty`` applies either way.
* Chat format (:func:`chat_setup`): the template written into the GGUF file and the Modelfile's ``TEMPLATE``, from
  the formatter the result was trained with.
* The export manifest's ``libraries`` (:func:`export_libraries`): the training libraries' versions and ``gguf``'s.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from finetune_sdk.errors import FinetuneError

logger = logging.getLogger("finetune_sdk")
#: generation_config.json key -> Ollama Modelfile parameter
SAMPLING_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                       "repetition_penalty": "repeat_penalty"}


def _base_folder(manifest: dict[str, Any]) -> Path | None:
    path = (manifest.get("base_model") or {}).get("path")
    return Path(path) if path and Path(path).is_dir() else None


def card_license(folder: Path | None) -> str | None:
    """The ``license:`` of a model card's YAML header (``README.md``), or None.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "README.md").write_text("---\\nlicense: apache-2.0\\n---\\n")
    >>> card_license(d)
    'apache-2.0'
    """
    if folder is None or not (folder / "README.md").is_file():
        return None
    text = (folder / "README.md").read_text(encoding="utf-8", errors="replace")
    header = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*['\"]?([^'\"\n]+)", header.group(1), re.M) if header else None
    return found.group(1).strip() if found else None


def export_metadata(model: Any, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """``general.*`` keys for :func:`~finetune_sdk.exporting.gguf_file.write_gguf` (see the module docstring)."""
    import gguf

    total = sum(parameter.numel() for parameter in model.parameters())
    metadata: dict[str, Any] = {"basename": name, "size_label": gguf.size_label(total, 0, 0, 0)}
    if manifest.get("technique"):
        metadata["finetune"] = str(manifest["technique"])
    base = manifest.get("base_model") or {}
    if base.get("id"):
        entry: dict[str, str] = {"name": Path(str(base["id"])).name}
        if base.get("kind") == "hub":
            entry["repo_url"] = f"https://huggingface.co/{base['id']}"
            if "/" in str(base["id"]):
                entry["organization"] = str(base["id"]).split("/")[0]
        metadata["base_models"] = [entry]
    license_name = card_license(_base_folder(manifest))
    if license_name:
        metadata["license"] = license_name
    return metadata


def add_metadata(writer: Any, metadata: dict[str, Any]) -> None:
    """Write what :func:`export_metadata` returned with the ``gguf`` writer's ``add_*`` methods."""
    for key in ("basename", "size_label", "finetune", "license"):
        if metadata.get(key):
            getattr(writer, f"add_{key}")(metadata[key])
    bases = metadata.get("base_models") or []
    if bases:
        writer.add_base_model_count(len(bases))
        for index, entry in enumerate(bases):
            for key, value in entry.items():
                getattr(writer, f"add_base_model_{key}")(index, value)


def _generation_config(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    for candidate in (folder, _base_folder(manifest)):
        if candidate is not None and (candidate / "generation_config.json").is_file():
            try:
                return json.loads((candidate / "generation_config.json").read_text(encoding="utf-8"))
            except ValueError:
                return {}
    return {}


def modelfile_parameters(folder: Path, config: Any, manifest: dict[str, Any]) -> str:
    """``PARAMETER`` lines (each ending in a newline) for the Modelfile: ``num_ctx`` and sampling defaults.

    >>> from types import SimpleNamespace
    >>> print(modelfile_parameters(Path("/nonexistent"), SimpleNamespace(max_position_embeddings=8192),
    ...                            {"options": {"max_length": 1024}}), end="")
    PARAMETER num_ctx 1024
    """
    lines = []
    trained = (manifest.get("options") or {}).get("max_length")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    context = min(int(x) for x in (trained, limit) if x) if (trained or limit) else None
    if context:
        lines.append(f"PARAMETER num_ctx {context}")
    generation = _generation_config(folder, manifest)
    sampling_only = ("temperature", "top_p", "top_k")
    if generation.get("do_sample") is not True and ("do_sample" in generation or
                                                    any(key in generation for key in sampling_only)):
        # transformers decodes greedily unless do_sample is true (its temperature/top_p/top_k are then ignored):
        # Ollama's greedy is temperature 0, and its own 0.8 default would sample instead
        lines.append("PARAMETER temperature 0")
        generation = {k: v for k, v in generation.items() if k not in sampling_only}
    for key, parameter in SAMPLING_PARAMETERS.items():
        value = generation.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"PARAMETER {parameter} {value:g}" if isinstance(value, float) else
                         f"PARAMETER {parameter} {value}")
    return "".join(line + "\n" for line in lines)


def export_libraries() -> dict[str, str | None]:
    """The export manifest's ``libraries``: ``python`` and the training libraries' versions
    (:func:`finetune_sdk.training.manifest.library_versions`) plus ``gguf``'s; ``None`` for one not installed."""
    from importlib import metadata

    from finetune_sdk.training.manifest import library_versions

    try:
        gguf = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        gguf = None
    return {**library_versions(), "gguf": gguf}


def chat_setup(manifest: dict[str, Any], tokenizer: Any) -> tuple[str | None, Any, bool]:
    """``(jinja template for the file, ChatFormat for Ollama or None, raw_prompt)`` for the format trained in.

    The trained formatter says which chat format it rendered prompts in (``Formatter.chat_format`` with the
    result's tokenizer and the manifest's options), whatever the objective: DPO's ``preference``, KTO's ``kto`` and
    GRPO's ``prompt`` formatters name the format they delegate to. The training ``system_prompt`` becomes the
    templates' default system prompt. A formatter that is not installed, or doesn't say, leaves the tokenizer's own
    template.
    """
    from finetune_sdk.exporting.chat_formats import export_chat
    from finetune_sdk.plugin_manager import get_plugin_host

    options = manifest.get("options") or {}
    trained = None
    name = manifest.get("formatter")
    try:
        formatter = get_plugin_host().create("formatter", name) if name else None
    except FinetuneError as exc:  # an uninstalled formatter: fall back to the tokenizer's template, and say so
        formatter = None
        logger.warning("%s; the export uses the tokenizer's own chat template", exc)
    if formatter is not None:
        trained = formatter.chat_format(tokenizer, options)
    chat = export_chat(trained, tokenizer, system_prompt=options.get("system_prompt"))
    if chat.jinja and chat.ollama is None and not chat.raw_prompt:
        logger.warning("the chat template is not one finetune-sdk can write as an Ollama TEMPLATE; the Modelfile "
                       "leaves it out and Ollama falls back to the template stored in the GGUF file")
    return chat.jinja, chat.ollama, chat.raw_prompt
