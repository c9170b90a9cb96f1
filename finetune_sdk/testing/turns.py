"""Tiny tokenizers of chat formats whose turn ends with something else than EOS, and a model that says a known
script, for the checks that generation stops where the model's turn ends.

Example:
    >>> from finetune_sdk.testing.turns import turn_tokenizer
    >>> tok = turn_tokenizer("llama3")
    >>> tok.eos_token, "<|eot_id|>" in tok.chat_template
    ('<|end_of_text|>', True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_sdk.testing.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, _tokenizer_json

#: Chat formats: (chat template, EOS, extra special tokens). The templates are the families' own, reduced to
#: user/assistant turns (the end-of-turn markers and EOS as their tokenizers have them).
TURN_FORMATS: Mapping[str, tuple[str, str, tuple[str, ...]]] = {
    "llama3": ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
               "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
               "<|end_of_text|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                                   "<|end_of_text|>")),
    "gemma": ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
              "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] | trim }}"
              "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
              "<eos>", ("<start_of_turn>", "<end_of_turn>", "<eos>")),
    "phi3": ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}",
             "<|endoftext|>", ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>")),
    "chatml": (CHATML_TEMPLATE, "</s>", ()),
}


def turn_tokenizer(name: str) -> Any:
    """The tiny byte-level tokenizer with the chat template, EOS and special tokens of :data:`TURN_FORMATS`
    ``name`` (``llama3``: turns end with ``<|eot_id|>``, EOS ``<|end_of_text|>``; ``gemma``: ``<end_of_turn>``,
    EOS ``<eos>``; ``phi3``: ``<|end|>``, EOS ``<|endoftext|>``; ``chatml``: ``<|im_end|>``, EOS ``</s>``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    template, eos, extra = TURN_FORMATS[name]
    chatml = [t for t in SPECIAL_TOKENS if t.startswith("<|im")]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(400)), bos_token="<s>",
                                  eos_token=eos, unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=[*chatml, *[t for t in extra if t not in chatml]])
    tok.chat_template = template
    return tok


def plain_token_ids(tokenizer: Any, count: int) -> list[int]:
    """``count`` ids of ordinary word tokens (letters only, 3 or more, not special), in vocabulary order."""
    special = set(tokenizer.all_special_ids)
    found = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if i not in special and text.isalpha() and len(text) >= 3:
            found.append(i)
            if len(found) == count:
                break
    return found


def scripted_model(tokenizer: Any, script: Mapping[int, int], default: int) -> Any:
    """A tiny Llama whose next token depends only on the current one: ``script[current]``, or ``default`` after any
    other token, with probability ~1 (logit 80 against 0), so greedy and sampled generation say the same.

    Every layer adds nothing to the residual stream (attention and MLP outputs zeroed), each scripted token has its
    own embedding direction and the LM head maps each direction to the token that follows.

    >>> from finetune_sdk.testing.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> a, b = plain_token_ids(tok, 2)
    >>> model = scripted_model(tok, {a: b, b: tok.eos_token_id}, default=a)
    >>> out = model.generate(tok("hi", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    >>> out[0, -3:].tolist() == [a, b, tok.eos_token_id]
    True
    """
    import torch

    from finetune_sdk.testing.tiny import tiny_model

    model = tiny_model("llama", tokenizer, seed=0)
    keys = list(script)
    hidden = model.config.hidden_size
    if len(keys) + 1 > hidden:
        raise ValueError(f"scripted_model: at most {hidden - 1} scripted tokens")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        if embed.data_ptr() == head.data_ptr():
            raise ValueError("scripted_model: the model's embeddings are tied to its LM head")
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        head[default, 0] = 10.0
        for direction, token in enumerate(keys, start=1):
            embed[token].zero_()
            embed[token, direction] = 1.0
            head[script[token], direction] = 10.0
    return model.eval()


def trained_end_of_turn(formatter: Any, tokenizer: Any) -> int | None:
    """The id of the first special token the formatter trains after its example's answer begins (the end of turn
    the model learns to say), or ``None`` when the example trains no special token (prompt-only formatters)."""
    from finetune_sdk.data.encoding import IGNORE_INDEX, encode_segments

    encoded = encode_segments(formatter.segments(formatter.example, tokenizer, {"max_length": 512}), tokenizer, None)
    special = set(tokenizer.all_special_ids)
    return next((label for label in encoded["labels"] if label != IGNORE_INDEX and label in special), None)
