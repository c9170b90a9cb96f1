"""torch.compile on the CPU: one SmolLM2-135M decoder layer (hidden 576, 9/3 heads, intermediate 1536) with LoRA
r=16 on its linears, forward and backward over one packed row, eager vs ``torch.compile`` (inductor), compile time
counted: the break-even step count is compile seconds / seconds saved per step (issue 23).

    python benchmarks/bench_compile.py [--tokens 490] [--steps 10] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import finetune_sdk  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads)


def layer(dtype: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_sdk.speed.fused_lora import use_fused_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if dtype == "bfloat16":
        from finetune_sdk.speed.precision import keep_activations_fp32

        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
        keep_activations_fp32(model)
    use_fused_lora(model)
    return model.base_model.model.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=490)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    import torch

    ids = torch.randint(0, 256, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("eager", "compiled"):
        model = layer(args.dtype)
        run = torch.compile(model) if name == "compiled" else model
        start = time.perf_counter()
        run(input_ids=ids).last_hidden_state.sum().backward()
        first = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            run(input_ids=ids).last_hidden_state.sum().backward()
            times.append(time.perf_counter() - start)
        results[name] = (first, statistics.median(times))
        print(f"{name:9} first step {first:7.2f} s, then {results[name][1] * 1e3:7.1f} ms/step  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    saved = results["eager"][1] - results["compiled"][1]
    compile_seconds = results["compiled"][0] - results["eager"][1]
    print(f"compiled/eager step time {results['compiled'][1] / results['eager'][1]:.2f}; compile {compile_seconds:.1f} s;"
          + (f" pays after {compile_seconds / saved:,.0f} steps (this layer alone)" if saved > 0 else
             " never pays (no step time saved)"))


if __name__ == "__main__":
    main()
