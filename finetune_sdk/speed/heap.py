"""Keep glibc's heap from holding freed activations: large CPU tensors get their own mappings.

glibc's ``malloc`` serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` (returned to the
kernel on ``free``) and smaller ones from the heap. The threshold starts at 128 KiB and, by default, rises to the
size of every mapped block that is freed, up to 32 MiB, so after the first training step nearly every activation
tensor (8 x 512 tokens x 576 fp32 values is 9 MiB) comes from the heap. A heap only shrinks from its top: the
holes left between tensors that are still alive count in the process's resident memory until the step ends. On
SmolLM2-135M-Instruct with LoRA on all linear layers, 8 x 512 tokens, that was 5 GiB of a 13.6 GiB peak
(docs/benchmarks.md: the same step peaks at 8.3 GiB with a fixed threshold).

:func:`limit_heap_fragmentation` fixes the threshold (which also stops glibc raising it) at
:data:`DEFAULT_MMAP_THRESHOLD`, so every tensor of 4 MiB or more is mapped and unmapped on its own. The cost is
speed: the kernel zero-fills those pages on each allocation, and bf16 matmuls whose outputs and buffers are mapped
afresh each time slow down most (SmolLM2-135M LoRA, batch 8 x 256, precision auto: 184 vs 296 tokens/s, peak 3.2 vs
4.0 GiB; docs/benchmarks.md). So a CPU run fixes the threshold only when memory is tight: when its training-memory
estimate times :data:`HEAP_FRAGMENTATION` would exceed :data:`MEMORY_HEADROOM` of the memory available, or when
there is no estimate. ``FINETUNE_SDK_MMAP_THRESHOLD`` sets a threshold in bytes for every run; ``0`` always leaves
glibc's default. Nothing happens on other C libraries (musl, macOS, Windows).

Example:
    >>> mmap_threshold({"FINETUNE_SDK_MMAP_THRESHOLD": "0"}) is None
    True
    >>> mmap_threshold({})  # no estimate: the memory-safe choice
    4194304
    >>> mmap_threshold({}, estimated_bytes=4 * 2**30, available_bytes=20 * 2**30) is None  # room to spare
    True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger("finetune_sdk")

#: Tensors of this many bytes or more get their own mapping (4 MiB: 1,024 fp32 rows of 1,024 values).
DEFAULT_MMAP_THRESHOLD = 4 * 2**20
#: glibc's default heap peaked at up to this many times the fixed threshold's peak (8 x 512 tokens: 13.6 vs 8.3 GiB).
HEAP_FRAGMENTATION = 1.7
#: The share of the available memory a run may plan to use with glibc's default heap.
MEMORY_HEADROOM = 0.8
#: ``mallopt``'s parameter number for ``M_MMAP_THRESHOLD`` (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
_applied: list[int] = []


def mmap_threshold(environ: Mapping[str, str] = os.environ, *, estimated_bytes: int | None = None,
                   available_bytes: int | None = None) -> int | None:
    """The threshold in bytes to set, or None to keep glibc's default heap.

    ``FINETUNE_SDK_MMAP_THRESHOLD`` decides when set (``0``: None). Otherwise None when ``estimated_bytes`` (the
    run's training-memory estimate) times :data:`HEAP_FRAGMENTATION` fits in :data:`MEMORY_HEADROOM` of
    ``available_bytes``, else :data:`DEFAULT_MMAP_THRESHOLD` (also when either figure is unknown).

    Raises:
        ConfigError: the variable is not a whole number of bytes >= 0 (the message names it).
    """
    from finetune_sdk.errors import ConfigError

    raw = environ.get("FINETUNE_SDK_MMAP_THRESHOLD", "").strip()
    if not raw:
        if estimated_bytes and available_bytes and estimated_bytes * HEAP_FRAGMENTATION <= \
                MEMORY_HEADROOM * available_bytes:
            return None
        return DEFAULT_MMAP_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"FINETUNE_SDK_MMAP_THRESHOLD={raw!r} is not a number of bytes: give e.g. 4194304, "
                         "or 0 to keep glibc's default")
    return value or None


def limit_heap_fragmentation(estimated_bytes: int | None = None) -> bool:
    """Fix glibc's mmap threshold for the rest of the process when :func:`mmap_threshold` asks for it (given the
    run's training-memory estimate in bytes, None if unknown); True when set.

    Safe to call more than once; does nothing off glibc. A threshold once set stays for the process (glibc can't go
    back to its rising threshold).
    """
    from finetune_sdk.advice.machine import available_memory

    threshold = mmap_threshold(estimated_bytes=estimated_bytes,
                               available_bytes=available_memory("cpu") if estimated_bytes else None)
    if threshold is None and not _applied:
        why = ("FINETUNE_SDK_MMAP_THRESHOLD=0" if os.environ.get("FINETUNE_SDK_MMAP_THRESHOLD", "").strip()
               else "faster; the run's estimate leaves room to spare")
        logger.info("CPU memory: glibc's heap as it is (%s); FINETUNE_SDK_MMAP_THRESHOLD=4194304 trades speed for "
                    "a lower peak", why)
    if threshold is None or _applied == [threshold]:
        return bool(_applied) and threshold is not None
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False
    if done:
        _applied[:] = [threshold]
        logger.info("CPU memory: tensors of %d MiB or more get their own mappings (FINETUNE_SDK_MMAP_THRESHOLD; "
                    "0 keeps glibc's default)", threshold // 2**20)
    return done
