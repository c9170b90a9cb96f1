"""A real model: SmolLM2-135M-Instruct (installed offline by scripts/setup.sh) written at every quantization; file
size and time per quantization are printed (docs/export.md quotes them) and q4_k_m is read back by transformers."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.test_real_models import smollm2_gguf

pytestmark = pytest.mark.slow
QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0")


def test_smollm2_at_every_quantization(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_sdk.exporting.gguf_file import write_gguf

    source = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0]
    measured = {}
    for quantization in QUANTIZATIONS:
        path = tmp_path / f"smollm2-{quantization}.gguf"
        start = time.perf_counter()
        summary = write_gguf(model, tokenizer, path, quantization=quantization, chat_template=tokenizer.chat_template)
        measured[quantization] = {"seconds": round(time.perf_counter() - start, 1),
                                  "MB": round(path.stat().st_size / 1e6, 1), "types": summary["tensor_types"]}
    print("\nSmolLM2-135M write_gguf:", json.dumps(measured, indent=1))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smollm2-q4_k_m.gguf",
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits[0]
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"q4_k_m: top-1 agreement {agree:.3f}, max |logit diff| {(logits - expected).abs().max().item():.3f}, "
          f"logit range {expected.abs().max().item():.1f}")
    assert agree >= 0.9
    sizes = [measured[q]["MB"] for q in ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")]
    assert sizes == sorted(sizes, reverse=True)
