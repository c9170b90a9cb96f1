"""GGUF tensor types: which type each tensor gets for a requested quantization, and the conversion itself.

The conversion is the ``gguf`` package's (``gguf.quants.quantize``, a port of ggml's reference quantizers) for the
block-32 types, and :mod:`finetune_sdk.exporting.kquants` (a port of ggml's reference quantizers) for
Q2_K...Q6_K and IQ4_NL. The choice of type per tensor follows llama.cpp's ``convert_hf_to_gguf.py`` and
``llama-quantize`` (``llama_tensor_get_type`` in ``src/llama-quant.cpp``):

* 1-D tensors (norms, biases, ``rope_freqs``) and position embeddings stay float32;
* a matrix whose rows don't split into whole blocks (32 values) falls back to float16;
* with a 4- or 5-bit block-32 type, the output matrix (or the embedding when it doubles as the output) is kept at
  q8_0;
* the K mixes: the output matrix (or the tied embedding) at Q6_K (Q8_0 when its rows aren't a multiple of 256);
  with ``q4_k_m`` and ``q5_k_m`` the value projections (``attn_v``, or the fused ``attn_qkv``) and ``ffn_down`` of
  the first and last eighth of the layers and every third layer between get Q6_K (llama.cpp's ``use_more_bits``);
  with ``q4_k_s`` the first 4 value projections and the first eighth of ``ffn_down`` get Q5_K; with ``q3_k_m``
  the first 2 value projections Q5_K and the others Q4_K, ``ffn_down`` Q5_K in the first sixteenth of the layers
  and Q4_K elsewhere, ``attn_output`` Q4_K; ``q3_k_l`` Q5_K for all three; ``q2_k`` Q3_K for ``ffn_down`` and
  ``attn_output`` and for the value projections (Q4_K with 4 or more query heads per key head). A row that isn't a
  multiple of 256 falls back as llama.cpp does (``tensor_type_fallback``): Q2_K/Q3_K to IQ4_NL, Q4_K to Q5_0, Q5_K
  to Q5_1, Q6_K to Q8_0 (F16 when the row isn't a multiple of 32 either).
"""

from __future__ import annotations

from typing import Any

from finetune_sdk.errors import ConfigError

#: quantization name -> (GGMLQuantizationType name for matrices, llama.cpp's LlamaFileType name)
QUANTIZATIONS: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
    "q3_k_l": ("Q3_K", "MOSTLY_Q3_K_L"),
    "q3_k_m": ("Q3_K", "MOSTLY_Q3_K_M"),
    "q3_k_s": ("Q3_K", "MOSTLY_Q3_K_S"),
    "q2_k": ("Q2_K", "MOSTLY_Q2_K"),
}
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")
K_MIXES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
#: llama.cpp's ``tensor_type_fallback`` for a row that isn't a multiple of 256
K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def check_quantization(quantization: str) -> str:
    """The quantization name in lower case; an unknown one is a one-line :class:`ConfigError`."""
    from finetune_sdk.errors import closest

    name = str(quantization).lower()
    if name not in QUANTIZATIONS:
        raise ConfigError(f"unknown GGUF quantization {quantization!r}{closest(name, QUANTIZATIONS)}; use one of "
                          f"{', '.join(QUANTIZATIONS)}")
    return name


def file_type(quantization: str) -> int:
    """llama.cpp's ``general.file_type`` value for a quantization."""
    import gguf

    return int(getattr(gguf.LlamaFileType, QUANTIZATIONS[quantization][1]))


def check_quantizations(quantization: str | list[str] | tuple[str, ...]) -> list[str]:
    """One name or a list of names, checked and in lower case, without repeats (order kept)."""
    names = [quantization] if isinstance(quantization, str) else list(quantization)
    if not names:
        raise ConfigError(f"no GGUF quantization given; use one or more of {', '.join(QUANTIZATIONS)}")
    return list(dict.fromkeys(check_quantization(name) for name in names))


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _k_mix_type(name: str, quantization: str, wanted: str, *, value_index: int, value_total: int,
                down_index: int, down_total: int, gqa: int) -> str:
    """``llama_tensor_get_type_impl`` for a value projection, ``ffn_down`` or ``attn_output`` (no experts, no Falcon)."""
    if "attn_v.weight" in name or "attn_qkv.weight" in name:
        if quantization == "q2_k":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        if quantization == "q3_k_m":
            return "Q5_K" if value_index < 2 else "Q4_K"
        if quantization == "q3_k_l":
            return "Q5_K"
        if quantization in ("q4_k_m", "q5_k_m") and _use_more_bits(value_index, value_total):
            return "Q6_K"
        if quantization == "q4_k_s" and value_index < 4:
            return "Q5_K"
    elif "ffn_down" in name:
        if quantization == "q2_k":
            return "Q3_K"
        if quantization == "q3_k_m":
            return "Q5_K" if down_index < down_total // 16 else "Q4_K"
        if quantization == "q3_k_l":
            return "Q5_K"
        if quantization in ("q4_k_m", "q5_k_m") and _use_more_bits(down_index, down_total):
            return "Q6_K"
        if quantization == "q4_k_s" and down_index < down_total // 8:
            return "Q5_K"
    elif "attn_output.weight" in name:
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(quantization, wanted)
    return wanted


def tensor_types(shapes: list[tuple[str, tuple[int, ...]]], quantization: str) -> dict[str, Any]:
    """The ``GGMLQuantizationType`` of every tensor, given ``(gguf name, shape)`` in file order.

    See the module docstring for the rules; the counters of value projections and ``ffn_down`` run in file order,
    as in ``llama_tensor_get_type``; query heads per key head come from the first ``attn_q``/``attn_k`` shapes.
    """
    import gguf

    types = gguf.GGMLQuantizationType
    names = [name for name, _ in shapes]
    tied = "output.weight" not in names
    output_name = "token_embd.weight" if tied else "output.weight"
    value_total = sum(("attn_v.weight" in n or "attn_qkv.weight" in n) for n in names)
    down_total = sum("ffn_down" in n for n in names)
    rows = {part: shape[0] for name, shape in shapes for part in ("attn_q.", "attn_k.") if f".{part}weight" in name}
    gqa = rows["attn_q."] // rows["attn_k."] if len(rows) == 2 and rows["attn_k."] else 1
    value_index = down_index = 0
    chosen: dict[str, Any] = {}
    for name, shape in shapes:
        if (len(shape) <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd")
                or quantization == "f32"):
            chosen[name] = types.F32
            continue
        wanted = getattr(types, QUANTIZATIONS[quantization][0])
        if quantization in LOW_BIT and name == output_name:
            wanted = types.Q8_0
        elif quantization in K_MIXES:
            if name == output_name:
                wanted = types.Q8_0 if shape[-1] % 256 else types.Q6_K
            else:
                wanted = getattr(types, _k_mix_type(name, quantization, wanted.name, value_index=value_index,
                                                    value_total=value_total, down_index=down_index,
                                                    down_total=down_total, gqa=gqa))
                value_index += "attn_v.weight" in name or "attn_qkv.weight" in name
                down_index += "ffn_down" in name
            if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0] and wanted.name in K_FALLBACK:
                wanted = getattr(types, K_FALLBACK[wanted.name])
        if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
            wanted = types.F16
        chosen[name] = wanted
    return chosen


def encode(data: Any, qtype: Any) -> Any:
    """``data`` (float32) in ``qtype``: float arrays for F32/F16, packed bytes for the block types."""
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == types.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    if qtype.name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        from finetune_sdk.exporting.kquants import quantize_k

        return quantize_k(data, qtype.name)
    if qtype == types.IQ4_NL:
        from finetune_sdk.exporting.kquants import quantize_iq4_nl

        return quantize_iq4_nl(data)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
