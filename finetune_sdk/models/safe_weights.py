"""Safetensors only: pickled weights are refused, safetensors files are checked before anything loads them.

Pickle files (``pytorch_model.bin``, ``adapter_model.bin``, ``*.pt``...) can run code when they are loaded, and
torch's ``weights_only`` default is a mitigation, not a guarantee. Every model, adapter, head, checkpoint and
feature cache this SDK reads is a ``.safetensors`` file; a folder offering only pickles is refused with the command
that converts it once, where the user trusts it.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets of each
tensor) and the data; :func:`check_safetensors` checks that the header parses and that the offsets cover the file
exactly, so a truncated or corrupt file is named before a loader fails on it with a traceback.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from finetune_sdk.errors import FinetuneError, ModelNotFoundError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Files that are not weights although they end like pickles (none today; kept for plugins' formats).
NOT_WEIGHTS: frozenset[str] = frozenset()
CONVERT_HINT = ("convert it once where you trust it: python -c \"from transformers import AutoModel; "
                "AutoModel.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" (or peft's "
                "PeftModel.save_pretrained for an adapter)")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
               "F6_E3M2": 1, "C64": 8}


def pickle_files(folder: Path) -> list[Path]:
    """Files in ``folder`` (recursively) whose suffix says they are pickles."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
                  and p.name not in NOT_WEIGHTS)


def check_model_folder(folder: Path, what: str = "model folder") -> None:
    """Refuse a model folder that offers only pickled weights; check each safetensors file's header.

    Raises:
        ModelNotFoundError: pickles only (with the conversion command), or a corrupt/truncated safetensors file.
    """
    folder = Path(folder)
    tensors = sorted(folder.glob("*.safetensors"))
    pickles = [p for p in pickle_files(folder) if p.parent == folder]
    if pickles and not tensors:
        names = ", ".join(p.name for p in pickles[:3])
        raise ModelNotFoundError(f"{what} {folder} holds only pickled weights ({names}), which finetune-sdk never "
                                 f"loads because unpickling can run code; {CONVERT_HINT.format(path=folder)}")
    for path in tensors:
        check_safetensors(path, error=ModelNotFoundError)


def check_result_folder(folder: Path) -> None:
    """A result folder holds no pickles at all, and every safetensors file in it is whole."""
    folder = Path(folder)
    pickles = pickle_files(folder)
    if pickles:
        names = ", ".join(p.relative_to(folder).as_posix() for p in pickles[:3])
        raise FinetuneError(f"result {folder} holds pickled files ({names}), which finetune-sdk never loads "
                            f"because unpickling can run code (its own results are safetensors only); "
                            f"{CONVERT_HINT.format(path=folder)}")
    for path in sorted(folder.rglob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: Path, error: type[FinetuneError] = FinetuneError) -> dict:
    """Check that ``path`` is a whole safetensors file; return its header (tensor name -> dtype, shape, offsets).

    Example:
        >>> import tempfile, pathlib, torch
        >>> from safetensors.torch import save_file
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file({"w": torch.zeros(2, 3)}, str(path))
        >>> check_safetensors(path)["w"]["shape"]
        [2, 3]
        >>> _ = path.write_bytes(path.read_bytes()[:-4])  # truncated
        >>> check_safetensors(path)
        Traceback (most recent call last):
        finetune_sdk.errors.FinetuneError: .../w.safetensors is truncated or corrupt (... ends at byte 24 but the file has 20 data bytes); ...
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size} bytes")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        raise error(f"{path}: can't read it ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise error(f"{path} is not a valid safetensors file ({exc}); re-create or re-download it") from None
    data_bytes = size - 8 - length
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise error(f"{path} is not a valid safetensors file (bad header entry {name!r}); re-create or "
                        "re-download it") from None
        if stop < start or (info["dtype"] in DTYPE_BYTES and stop - start != expected and info["dtype"] != "F4"):
            raise error(f"{path} is truncated or corrupt (tensor {name!r} has the wrong size); re-create or "
                        "re-download it")
        end = max(end, stop)
    if end != data_bytes:
        raise error(f"{path} is truncated or corrupt (its tensors' data ends at byte {end} but the file has "
                    f"{data_bytes} data bytes); re-create or re-download it")
    return header
