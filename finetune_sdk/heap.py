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
the kernel zero-filling those pages on each allocation (measured in benchmarks/bench_chunked_loss.py; see
docs/speed.md). ``FINETUNE_SDK_MMAP_THRESHOLD`` sets another threshold in bytes; ``0`` leaves glibc's default.
Nothing happens on other C libraries (musl, macOS, Windows) or when the variable is ``0``.

Example:
    >>> mmap_threshold({"FINETUNE_SDK_MMAP_THRESHOLD": "0"}) is None
    True
    >>> mmap_threshold({})
    4194304
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger("finetune_sdk")

#: Tensors of this many bytes or more get their own mapping (4 MiB: 1,024 fp32 rows of 1,024 values).
DEFAULT_MMAP_THRESHOLD = 4 * 2**20
#: ``mallopt``'s parameter number for ``M_MMAP_THRESHOLD`` (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
_applied: list[int] = []


def mmap_threshold(environ: Mapping[str, str] = os.environ) -> int | None:
    """The threshold in bytes to set, from ``FINETUNE_SDK_MMAP_THRESHOLD`` (default 4 MiB), or None for ``0``.

    Raises:
        ConfigError: the variable is not a whole number of bytes >= 0 (the message names it).
    """
    from finetune_sdk.errors import ConfigError

    raw = environ.get("FINETUNE_SDK_MMAP_THRESHOLD", "").strip()
    if not raw:
        return DEFAULT_MMAP_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"FINETUNE_SDK_MMAP_THRESHOLD={raw!r} is not a number of bytes: give e.g. 4194304, "
                         "or 0 to keep glibc's default")
    return value or None


def limit_heap_fragmentation() -> bool:
    """Fix glibc's mmap threshold for the rest of the process (see the module docstring); True when set.

    Safe to call more than once; does nothing off glibc.
    """
    threshold = mmap_threshold()
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
