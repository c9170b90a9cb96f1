"""The tokenizer in a GGUF file's metadata: vocabulary, token types, merges or scores, special tokens, chat template.

Two kinds of tokenizers are written, as llama.cpp reads them:

* byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2): ``tokenizer.ggml.model = "gpt2"``, the tokens in their
  byte-alphabet spelling, the merges, and ``tokenizer.ggml.pre`` naming the pre-tokenizer, told as llama.cpp's
  converter tells it (``convert_hf_to_gguf.py``, ``get_vocab_base_pre``): the sha256 of ``str(tokenizer.encode(t))``
  for its fixed test text ``t``, looked up among the models llama.cpp knows; a tokenizer of no known model (a new
  vocabulary) is named from its own pre-tokenizer's shape instead;
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama): ``tokenizer.ggml.model = "llama"``,
  the ``▁`` pieces, byte tokens ``<0xNN>``, a score per piece and the merges too. llama.cpp's tokenizer merges by
  score, so each piece scores minus the rank of the merge that makes it: the order the BPE merges were learnt in.
  (The ``gguf`` package's ``LlamaHfVocab`` gives every piece -1000, which leaves llama.cpp no merge order.)

Special token ids, ``add_bos``/``add_eos`` and the merges are read by the ``gguf`` package's ``SpecialVocab`` from
the saved tokenizer, as llama.cpp's converter does.
"""

from __future__ import annotations

import hashlib
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
#: The text llama.cpp's converter encodes to tell a BPE pre-tokenizer (``chktxt`` in ``get_vocab_base_pre``).
LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis "
    "concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL")
#: llama.cpp's pre-tokenizer names by the sha256 of the check text's ids, for the byte-level BPE models of the
#: families exported here (from ``get_vocab_base_pre``; where two models share a hash, the later entry there wins).
LLAMA_CPP_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M (and SmolLM2)
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # ruGPT3XL
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stablelm-2-zephyr-1_6b
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # OLMo-1.7-7B (and mpt-7b)
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # falcon-7b
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
}


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
    pre = llama_cpp_pre_name(tokenizer) or _byte_level_pre(spec.get("pre_tokenizer") or {})
    if pre is None:
        raise ConfigError("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp knows (GPT-2, Llama 3, "
                          "Qwen2, SmolLM); its encodings would differ in llama.cpp")
    return "gpt2", pre


def llama_cpp_pre_name(tokenizer: Any) -> str | None:
    """The ``tokenizer.ggml.pre`` llama.cpp's converter writes for ``tokenizer``, or None for a model it doesn't know.

    As ``convert_hf_to_gguf.py``'s ``get_vocab_base_pre``: sha256 of ``str(tokenizer.encode(LLAMA_CPP_CHECK_TEXT))``
    (special tokens added as the tokenizer adds them), looked up in :data:`LLAMA_CPP_PRE_HASHES`.

    >>> from finetune_sdk.testing.tiny import tiny_tokenizer
    >>> llama_cpp_pre_name(tiny_tokenizer()) is None  # a vocabulary llama.cpp has never seen
    True
    """
    return LLAMA_CPP_PRE_HASHES.get(llama_cpp_pre_hash(tokenizer))


def llama_cpp_pre_hash(tokenizer: Any) -> str:
    """The hex sha256 llama.cpp's converter computes to tell ``tokenizer``'s pre-tokenizer."""
    ids = tokenizer.encode(LLAMA_CPP_CHECK_TEXT)
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


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
