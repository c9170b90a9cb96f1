"""GGUF files: converted once into a plain Hugging Face folder (cached), so they can be quantized and saved."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune_sdk.errors import ModelNotFoundError
from finetune_sdk.fsutil import cache_root, shareable_tree


def converted_folder(gguf_path: Path) -> Path:
    """Return the cached Hugging Face folder for ``gguf_path``, converting it on first use.

    transformers dequantizes GGUF weights on load but refuses to save or re-quantize such a model, so the state
    dict is copied into a fresh model of the same class and saved as safetensors. The cache key is the file's
    path, size and modification time; the folder appears atomically.
    """
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from finetune_sdk.progress import activity

    cache = str(target.parent).replace(str(Path.home()), "~", 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        with activity(f"converting {gguf_path.name} to a Hugging Face folder once (cached in {cache})"):
            _convert(gguf_path, staging)
        shareable_tree(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    except Exception as exc:  # a full disk while converting: one line naming the cache folder
        from finetune_sdk.training.output_paths import folder_bytes, user_os_error

        error = user_os_error(exc, target, folder_bytes(staging))
        if error is exc:
            raise
        raise error from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def _no_gguf_tensor_bar() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"), which its
    progress-bar switch does not reach; the SDK's step shows instead. Only that module's name is swapped, and
    only while converting."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as reader

    original = getattr(reader, "tqdm", None)
    if original is None:
        yield
        return
    reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_sdk.log import library_progress_bars_off

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with library_progress_bars_off(), _no_gguf_tensor_bar():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelNotFoundError(f"can't read GGUF file {gguf_path}: {exc}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
