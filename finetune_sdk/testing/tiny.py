"""Tiny tokenizers and models built in code, for tests that must run offline in seconds.

Example:
    >>> from finetune_sdk.testing.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> tok.decode(tok("hello world")["input_ids"])
    'hello world'
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
ENCODER_FAMILIES = ("bert",)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = """
the quick brown fox jumps over the lazy dog. a model learns to answer questions about its data.
question: what is the capital of france? answer: paris. hello world, how are you today?
fine tuning adapts a pretrained model to a task with few examples. the cat sat on the mat.
instruction input output response system user assistant positive negative neutral label text
zero one two three four five six seven eight nine ten red green blue yellow cat dog bird fish
"""


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400, chat_template: bool = True) -> Any:
    """A byte-level BPE tokenizer (any text encodes) with ``<s>``, ``</s>``, ``<pad>`` and ChatML markers."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_config(family: str, tokenizer: Any, hidden_size: int = 64, layers: int = 2) -> Any:
    """A small config of a model family: llama, mistral, qwen2, gpt2 or bert."""
    import transformers

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    decoder = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **ids)
    if family == "llama":
        return transformers.LlamaConfig(**decoder)
    if family == "mistral":
        return transformers.MistralConfig(**decoder, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**decoder, tie_word_embeddings=False)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=hidden_size, n_layer=layers, n_head=4, n_positions=1024, **ids)
    if family == "bert":
        return transformers.BertConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                                       intermediate_size=hidden_size * 2, max_position_embeddings=512,
                                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES + ENCODER_FAMILIES)}")


def tiny_model(family: str = "llama", tokenizer: Any = None, seed: int = 0, **config: Any) -> Any:
    """A randomly initialised (seeded) tiny model: causal LM for decoders, ``BertModel`` for bert."""
    import torch
    import transformers

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(family, tokenizer, **config)
    if family in ENCODER_FAMILIES:
        return transformers.BertModel(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def save_tiny_model(directory: str | Path, family: str = "llama", **config: Any) -> Path:
    """Write a tiny model and its tokenizer to ``directory`` as a Hugging Face folder (safetensors)."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, tokenizer, **config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
