"""The machine a run will use, and memory sizes as people write them: ``resolve_device``, ``available_memory``,
``format_bytes``, ``parse_memory``."""

from __future__ import annotations

import re

from finetune_sdk.errors import ConfigError

MiB = 1024**2
GiB = 1024**3


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``300 MiB``, ``4.2 MiB``, ``12 KiB``.

    >>> format_bytes(1.5 * 2**30), format_bytes(300 * 2**20), format_bytes(12 * 1024)
    ('1.5 GiB', '300 MiB', '12 KiB')
    """
    if n >= GiB:
        return f"{n / GiB:,.1f} GiB"
    if n >= 10 * MiB:
        return f"{n / MiB:,.0f} MiB"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:,.0f} KiB"


def parse_memory(text: str | int) -> int:
    """Bytes from ``8GiB``, ``8 GB``, ``8000MB``, ``512MiB`` or a plain number of bytes.

    >>> parse_memory("8GiB"), parse_memory("1.5 GB"), parse_memory("2048")
    (8589934592, 1500000000, 2048)
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"can't read memory size {text!r}; write it like 8GiB, 16GB or 8000MB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit[0]]
    if "I" in unit:
        scale = 1024 ** ("BKMGT".index(unit[0]))
    return int(number * scale)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu`` (torch is imported only for ``auto``)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be cpu, cuda or auto, got {device!r}")
    return "cuda" if device.startswith("cuda") else "cpu"


def available_memory(device: str = "auto") -> int:
    """Bytes free for a training run: ``MemAvailable`` (or psutil) on CPU, free GPU memory on CUDA."""
    if resolve_device(device) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        raise ConfigError("can't tell how much memory is free here; pass the size explicitly") from None
