"""Compressed client updates: ``update_compression="int8"`` or ``"nf4"``, quantized on the client, dequantized on
the server.

What is quantized is the client's *update* (its new trainable parameters minus the global ones it received), not
the parameters: an update is small next to the adapter it changes, so quantizing it loses far less than quantizing
the parameters would. Each tensor is flattened and cut into blocks of :data:`BLOCK` values; each block is scaled by
its largest magnitude (``absmax``, kept in float32) and every value stored as

* ``int8``: the nearest of the 255 levels ``k / 127``, ``k = -127..127`` (one byte per value);
* ``nf4``: the nearest of the 16 NormalFloat levels of QLoRA (Dettmers et al., 2023; the table bitsandbytes uses),
  two values per byte.

On the wire a tensor ``name`` becomes ``name`` (the codes) and ``name@absmax`` (one float32 per block): about 1.06
bytes per value for int8 and 0.56 for nf4, against 4 for float32 (plus Flower's 128-byte header per array). The
server rebuilds ``global + dequantized update`` before its strategy aggregates, so strategies, DP and the
aggregation error see ordinary float32 parameters. The server's message to the clients stays float32.
"""

from __future__ import annotations

from typing import Any

from finetune_sdk.errors import ConfigError

COMPRESSIONS = ("int8", "nf4")
BLOCK = 64
ABSMAX_SUFFIX = "@absmax"
#: The NF4 levels (QLoRA, Dettmers et al., 2023), as in bitsandbytes' ``functional.get_4bit_type("nf4")``.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def check_compression(value: str | None) -> None:
    """A one-line :class:`ConfigError` unless ``value`` is ``None``, ``"int8"`` or ``"nf4"``."""
    if value is not None and value not in COMPRESSIONS:
        raise ConfigError(f"update_compression must be None, 'int8' or 'nf4', got {value!r}")


def quantize(values: Any, kind: str) -> tuple[Any, Any]:
    """``(codes, absmax)`` of a float array: int8 codes (``kind="int8"``) or packed nf4 nibbles (uint8, two per
    byte, the first in the high nibble), and float32 ``absmax`` per block of :data:`BLOCK` values.

    Example:
        >>> import numpy as np
        >>> codes, absmax = quantize(np.array([0.5, -1.0, 0.25, 0.0]), "int8")
        >>> codes.dtype, codes[:4].tolist(), absmax.tolist()
        (dtype('int8'), [64, -127, 32, 0], [1.0])
        >>> dequantize(codes, absmax, (4,), "int8").tolist()
        [0.5039370059967041, -1.0, 0.25196850299835205, 0.0]
    """
    import numpy as np

    flat = np.asarray(values, dtype=np.float32).ravel()
    padded = np.zeros(-(-flat.size // BLOCK) * BLOCK, dtype=np.float32)
    padded[:flat.size] = flat
    blocks = padded.reshape(-1, BLOCK)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    if kind == "int8":
        return np.round(scaled * 127).astype(np.int8).ravel(), absmax
    levels = np.asarray(NF4_LEVELS, dtype=np.float32)
    nibbles = np.abs(scaled.ravel()[:, None] - levels[None, :]).argmin(axis=1).astype(np.uint8)
    return ((nibbles[0::2] << 4) | nibbles[1::2]).astype(np.uint8), absmax


def dequantize(codes: Any, absmax: Any, shape: tuple[int, ...], kind: str) -> Any:
    """The float32 array of ``shape`` that :func:`quantize`'s ``(codes, absmax)`` stand for."""
    import numpy as np

    if kind == "int8":
        scaled = codes.astype(np.float32) / 127
    else:
        nibbles = np.empty(codes.size * 2, dtype=np.uint8)
        nibbles[0::2], nibbles[1::2] = codes >> 4, codes & 0x0F
        scaled = np.asarray(NF4_LEVELS, dtype=np.float32)[nibbles]
    values = (scaled.reshape(-1, BLOCK) * absmax[:, None]).ravel()
    size = int(np.prod(shape)) if shape else 1
    return values[:size].reshape(shape).astype(np.float32)


def compress_update(new: Any, old: Any, kind: str) -> Any:
    """The ``ArrayRecord`` a client sends: each tensor's update ``new - old`` quantized (codes and absmax)."""
    from flwr.app import Array, ArrayRecord

    out = {}
    for name in new.keys():
        codes, absmax = quantize(new[name].numpy() - old[name].numpy(), kind)
        out[name], out[name + ABSMAX_SUFFIX] = Array(codes), Array(absmax)
    return ArrayRecord(out)


def decompress_update(record: Any, old: Any, kind: str) -> Any:
    """The client's new parameters the server rebuilds: ``old + dequantized update`` (float32 ``ArrayRecord``).

    Raises:
        ValueError: the record doesn't hold a compressed update of ``old``'s tensors.
    """
    from flwr.app import Array, ArrayRecord

    names = [k for k in record.keys() if not k.endswith(ABSMAX_SUFFIX)]
    if sorted(names) != sorted(old.keys()) or any(n + ABSMAX_SUFFIX not in record.keys() for n in names):
        raise ValueError("the client's reply is not a compressed update of the global parameters")
    out = {}
    for name in old.keys():
        base = old[name].numpy()
        update = dequantize(record[name].numpy(), record[name + ABSMAX_SUFFIX].numpy(), base.shape, kind)
        out[name] = Array((base.astype("float32") + update).astype(base.dtype))
    return ArrayRecord(out)
