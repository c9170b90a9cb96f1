"""A real model: SmolLM2-135M-Instruct (installed offline by scripts/setup.sh) written at f16, q8_0, q4_k_m and
q4_0, each read back by transformers. The table of every quantization's size and write time (docs/export.md) is a
benchmark, benchmarks/bench_export_smollm2.py; every quantization type is tested on tiny models
(tests/test_export_kquants.py, tests/test_export_gguf.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_real_models import smollm2_gguf

pytestmark = pytest.mark.slow
QUANTIZATIONS = ("f16", "q8_0", "q4_k_m", "q4_0")


def test_smollm2_written_at_f16_q8_0_q4_k_m_q4_0_reads_back(tmp_path):
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
    for quantization in QUANTIZATIONS:
        path = tmp_path / f"smollm2-{quantization}.gguf"
        summary = write_gguf(model, tokenizer, path, quantization=quantization, chat_template=tokenizer.chat_template)
        measured[quantization] = {"MB": round(path.stat().st_size / 1e6, 1), "types": summary["tensor_types"]}
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
    assert measured["q4_k_m"]["types"]["Q6_K"] > 0 and measured["q4_k_m"]["types"]["Q8_0"] > 0  # ffn_down, attn_v
    sizes = [measured[q]["MB"] for q in QUANTIZATIONS]
    assert sizes == sorted(sizes, reverse=True)  # docs/export.md: 270.9, 144.8, 105.5, 91.7 MB
