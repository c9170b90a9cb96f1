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
Q8_0_LOGIT_BOUND = 0.1  # as in test_export_gguf.py


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
    prompt = loaded.prompt_ids("what is 1 plus 2?")
    if quantization == "f16":  # against the merged float32 model
        reference = loaded.model.merge_and_unload().eval()
    else:  # against transformers running the same quantized file (dequantized)
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(export.directory, gguf_file=export.gguf_path.name,
                                                         dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
    got, llm = _llama_cpp_greedy(export.gguf_path, prompt, tok.eos_token_id)
    if quantization == "f16":
        assert got == expected.tolist()
    else:  # llama.cpp also rounds activations to 8 bits in q8_0 products: the same tokens wherever they are clear
        import numpy as np

        with torch.no_grad():
            steps = reference(input_ids=torch.tensor([prompt + got])).logits[0, len(prompt) - 1:-1]
        llm.reset()
        llm.eval(prompt + got)
        ours = torch.tensor(np.array(llm.scores[len(prompt) - 1:len(prompt) + len(got) - 1]))
        assert (ours - steps).abs().max().item() <= Q8_0_LOGIT_BOUND
        for step, token in zip(steps, got):
            top2 = step.topk(2).values
            assert token == step.argmax().item() or top2[0] - top2[1] <= 2 * Q8_0_LOGIT_BOUND
    # llama.cpp's tokenizer on plain text; with SentencePiece it also puts the dummy-prefix space after special
    # tokens and before a leading space, as SentencePiece does and transformers' non-legacy Llama tokenizer doesn't
    texts = ["what is 1 plus 2?", "Hello world, héllo 日本語 ☃ 12345"]
    if tokenizer_kind == "bpe":
        texts += [tok.decode(prompt), " leading space", "  two\ttabs\n\nnewlines"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)[
            "input_ids"], text


@pytest.mark.slow
@pytest.mark.parametrize("quantization,ftype", [("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
                                                ("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K")])
def test_k_quants_equal_llama_model_quantize(tmp_path, quantization, ftype):
    """llama.cpp's own quantizer on the f16 export against this SDK's K-quants of the same f16-rounded weights.

    Not run on the build machine (llama-cpp-python isn't installed there). Tensor types must be the same; bytes may
    differ in a few blocks where the compiled C code contracts ``a * b + c`` into one rounding (FMA) and a level
    lands on the other side of a rounding boundary.
    """
    import ctypes

    import gguf
    import numpy as np

    from finetune_sdk.exporting.gguf_file import write_gguf

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, hidden_size=256).eval()
    with torch.no_grad():  # what llama-quantize reads from an f16 file: f16 values
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    write_gguf(model, tokenizer, tmp_path / "model-f16.gguf", quantization="f16")
    write_gguf(model, tokenizer, tmp_path / "ours.gguf", quantization=quantization)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(tmp_path / "model-f16.gguf").encode(),
                                          str(tmp_path / "theirs.gguf").encode(), ctypes.byref(params)) == 0
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    equal = total = 0
    for name, tensor in ours.items():
        if tensor.tensor_type.name.endswith("_K"):
            block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
            a = np.asarray(tensor.data).reshape(-1, block_bytes)
            b = np.asarray(theirs[name].data).reshape(-1, block_bytes)
            equal += int((a == b).all(axis=1).sum())
            total += len(a)
    assert total > 0 and equal / total >= 0.99, (equal, total)
