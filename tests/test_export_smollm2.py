"""A real model: SmolLM2-135M-Instruct (installed offline by scripts/setup.sh) written at every quantization; file
size and time per quantization are printed (docs/export.md quotes them) and q4_k_m is read back by transformers."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.test_real_models import smollm2_gguf

pytestmark = pytest.mark.slow
QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                 "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


def encode_each_tensor_once(monkeypatch) -> dict[str, float]:
    """Make ``write_gguf`` encode a tensor to a K-quant or IQ4_NL type once for all the files of this test.

    The K mixes share most of their work: ``q3_k_l``, ``q3_k_m``, ``q3_k_s`` and ``q2_k`` each encode 120-180 of
    SmolLM2's matrices to IQ4_NL (the fallback for rows of 576; ~1 min a file here), the same matrices to the same
    bytes. ``encode`` is a pure function of (values, type), so its result is kept by a hash of the values and
    reused; every file is still written, checked and read back whole, and every (tensor, type) pair is encoded
    once. Block-32 and float types (gguf's own quantizers, a few seconds a file) are encoded afresh every time.
    Returns the encoding seconds each file reused, by file name stem, so the printed write times stay readable."""
    import hashlib

    from finetune_sdk.exporting import gguf_file

    original, done, reused = gguf_file.encode, {}, {"": 0.0}

    def encode(data, qtype):
        if qtype.name not in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"):
            return original(data, qtype)
        key = (qtype.name, data.shape, hashlib.blake2b(data.tobytes(), digest_size=16).digest())
        if key in done:
            reused[""] += done[key][1]
            return done[key][0]
        start = time.perf_counter()
        encoded = original(data, qtype)
        done[key] = (encoded, time.perf_counter() - start)
        return encoded

    monkeypatch.setattr(gguf_file, "encode", encode)
    return reused


def test_smollm2_at_every_quantization(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.models.gguf_import import converted_folder

    # the GGUF's weights dequantized to float32 once per session, in the SDK's cache (as a GGUF base is trained and
    # exported): test_real_models' QLoRA run on the same file finds it there instead of converting again
    source = converted_folder(smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0]
    measured = {}
    reused = encode_each_tensor_once(monkeypatch)
    for quantization in QUANTIZATIONS:
        path = tmp_path / f"smollm2-{quantization}.gguf"
        start, reused[""] = time.perf_counter(), 0.0
        summary = write_gguf(model, tokenizer, path, quantization=quantization, chat_template=tokenizer.chat_template)
        # "seconds": the write as it would take alone (the encodings this test reused from an earlier file added)
        measured[quantization] = {"seconds": round(time.perf_counter() - start + reused[""], 1),
                                  "reused_encoding_seconds": round(reused[""], 1),
                                  "MB": round(path.stat().st_size / 1e6, 1), "types": summary["tensor_types"]}
    print("\nSmolLM2-135M write_gguf:", json.dumps(measured, indent=1))
    agreement = {}
    for quantization in ("q8_0", "q4_0", "q4_k_m"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"smollm2-{quantization}.gguf",
                                                        dtype=torch.float32).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=ids).logits[0]
            answer = reloaded.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        agreement[quantization] = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
        print(f"{quantization}: top-1 agreement with float32 over the prompt {agreement[quantization]:.3f}, max |logit "
              f"diff| {(logits - expected).abs().max().item():.2f} (logits up to {expected.abs().max().item():.1f}), "
              f"answer {tokenizer.decode(answer)!r}")
    # SmolLM2's rows of 576 aren't a multiple of 256: most q4_k_m matrices fall back to Q5_0, as in llama.cpp
    assert measured["q4_k_m"]["types"]["Q5_0"] > measured["q4_k_m"]["types"]["Q4_K"] > 0
    assert agreement["q8_0"] >= agreement["q4_k_m"] >= max(agreement["q4_0"], 0.8)  # measured q4_k_m 0.865
    sizes = [measured[q]["MB"] for q in ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")]
    assert sizes == sorted(sizes, reverse=True)
