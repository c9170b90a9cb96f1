"""The tokenizer in a GGUF file's metadata: vocabulary, token types, merges or scores, special tokens, chat template.

Two kinds of tokenizers are written, as llama.cpp reads them:

* byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2): ``tokenizer.ggml.model = "gpt2"``, the tokens in their
  byte-alphabet spelling, the merges, and ``tokenizer.ggml.pre`` naming the pre-tokenizer regex, told from the
  tokenizer's own pre-tokenizer (llama.cpp's converter tells it from a hash of sample encodings instead);
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama): ``tokenizer.ggml.model = "llama"``,
  the ``▁`` pieces, byte tokens ``<0xNN>``, a score per piece and the merges too. llama.cpp's tokenizer merges by
  score, so each piece scores minus the rank of the merge that makes it: the order the BPE merges were learnt in.
  (The ``gguf`` package's ``LlamaHfVocab`` gives every piece -1000, which leaves llama.cpp no merge order.)

Special token ids, ``add_bos``/``add_eos`` and the merges are read by the ``gguf`` package's ``SpecialVocab`` from
the saved tokenizer, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import re
import tempfile
from typing import Any

from finetune_sdk.errors import ConfigError

#: Byte-level pre-tokenizer regexes (Split patterns in tokenizer.json) and llama.cpp's names for them.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_kind(tokenizer: Any) -> tuple[str, str | None]:
    """``("gpt2", pre)`` for a byte-level BPE, ``("llama", None)`` for SentencePiece-style BPE; else an error."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers) tokenizer; this one has no tokenizer.json form")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    if model.get("byte_fallback"):
        return "llama", None
    pre = _byte_level_pre(spec.get("pre_tokenizer") or {})
    if pre is None:
        raise ConfigError("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp knows (GPT-2, Llama 3, "
                          "Qwen2, SmolLM); its encodings would differ in llama.cpp")
    return "gpt2", pre


def _byte_level_pre(pre: dict[str, Any]) -> str | None:
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts or []]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return PRE_TOKENIZERS.get((parts[0].get("pattern") or {}).get("Regex", ""))
    return None


def vocabulary(tokenizer: Any, vocab_size: int, kind: str, merges: list[str]) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and ``gguf.TokenType`` values for ids ``0..vocab_size-1`` (ids past the tokenizer: unused)."""
    import gguf

    types = gguf.TokenType
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    rank = _merge_ranks(merges) if kind == "llama" else {}
    tokens: list[str] = []
    scores: list[float] = []
    token_types: list[int] = []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            token_types.append(types.UNUSED)
            scores.append(-1000.0)
            continue
        if index in added:
            entry = added[index]
            if entry.special:
                token_type = types.UNKNOWN if token == tokenizer.unk_token and kind == "llama" else types.CONTROL
            else:
                token_type = types.USER_DEFINED
                if kind == "llama":  # llama.cpp matches user-defined tokens in the text as it is
                    token = token.replace("\u2581", " ")
        elif kind == "llama" and BYTE_TOKEN.fullmatch(token):
            token_type = types.BYTE
        elif token == tokenizer.unk_token:
            token_type = types.UNKNOWN
        else:
            token_type = types.NORMAL
        tokens.append(token)
        token_types.append(int(token_type))
        scores.append(-float(rank[token]) if token in rank else 0.0)
    return tokens, scores, token_types


def _merge_ranks(merges: list[str]) -> dict[str, int]:
    """The rank of the first merge that makes each piece (1 = learnt first)."""
    ranks: dict[str, int] = {}
    for number, merge in enumerate(merges, start=1):
        left, right = merge.split(" ", 1)
        ranks.setdefault(left + right, number)
    return ranks


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, chat_template: str | None) -> dict[str, Any]:
    """Write the tokenizer's GGUF keys to ``writer``; return a summary (kind, pre-tokenizer, special ids)."""
    import gguf

    kind, pre = tokenizer_kind(tokenizer)
    with tempfile.TemporaryDirectory(prefix="finetune-gguf-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if tokenizer.pad_token_id is not None:
        special.special_token_ids.setdefault("pad", tokenizer.pad_token_id)
    special.chat_template = chat_template or None
    special.add_special_token.update(_added_special_tokens(tokenizer))
    tokens, scores, token_types = vocabulary(tokenizer, vocab_size, kind, special.merges)
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_prefix_space(tokenizer))
    writer.add_token_types(token_types)
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": kind, "pre_tokenizer": pre, "special_token_ids": dict(special.special_token_ids),
            "merges": len(special.merges)}


def _added_special_tokens(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding adds BOS before and EOS after the text, as observed (configs don't always say)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    marked = tokenizer.encode("a", add_special_tokens=True)
    added = {}
    if tokenizer.bos_token_id is not None:
        added["bos"] = len(marked) > len(plain) and marked[0] == tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        added["eos"] = len(marked) > len(plain) and marked[-1] == tokenizer.eos_token_id
    return added


def _adds_prefix_space(tokenizer: Any) -> bool:
    """Whether the SentencePiece-style tokenizer puts ``▁`` before the first word (Llama 2 and Mistral do)."""
    ids = tokenizer.encode("a", add_special_tokens=False)
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith("\u2581")
