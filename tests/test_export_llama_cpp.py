"""llama.cpp runs the exported files: its tokenizer gives the same ids and greedy decoding the same tokens as
transformers on the merged model. Needs the ``bench`` extra's ``llama-cpp-python`` (built from source: ~30 min on
2 cores); skipped without it."""

from __future__ import annotations

import pytest
import torch

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer
from finetune_sdk.testing.tiny_sentencepiece import tiny_sentencepiece_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(4) for b in range(4)]
NEW_TOKENS = 8


def _llama_cpp_greedy(path, prompt_ids: list[int], eos: int) -> list[int]:
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0)
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out, llm


@pytest.mark.slow
@pytest.mark.parametrize("family,tokenizer_kind", [("llama", "bpe"), ("llama", "sentencepiece"),
                                                   ("qwen2", "bpe"), ("gpt2", "bpe")])
@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_llama_cpp_generates_the_same_greedy_tokens(tmp_path, family, tokenizer_kind, quantization):
    tok = tiny_sentencepiece_tokenizer() if tokenizer_kind == "sentencepiece" else tiny_tokenizer()
    base = tmp_path / "base"
    tiny_model(family, tok).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    result = Trainer(base, technique="lora", formatter="chat-template", output_dir=tmp_path / "run",
                     num_train_epochs=8, learning_rate=2e-2, r=16, progress=False).fit(ROWS).output_dir
    export = finetune_sdk.export(result, tmp_path / "gguf", quantization=quantization)
    loaded = finetune_sdk.load(result, quantized=False)
    merged = loaded.model.merge_and_unload().eval()
    prompt = loaded.prompt_ids("what is 1 plus 2?")
    with torch.no_grad():
        expected = merged.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
    got, llm = _llama_cpp_greedy(export.gguf_path, prompt, tok.eos_token_id)
    assert got == expected.tolist()[:len(got)] and len(got) == len(expected)
    text = tok.decode(prompt)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
