"""The SDK vs TRL's ``SFTTrainer`` (with and without Liger kernels) on a CUDA GPU: LoRA and QLoRA, tokens/s and peak
memory, on a ~0.5B Llama-architecture model built from a config with random weights (nothing downloaded).

Model: Llama, hidden 1024, intermediate 4096, 28 layers, 16 heads / 8 KV heads, vocabulary 32,000, untied head:
~0.5B parameters (speed and memory do not depend on the weight values). Data: ``--rows`` synthetic prompt/completion
rows of 100-480 tokens (seeded), tokenized by the SDK's tiny byte-level tokenizer. Every configuration trains LoRA
r=16 / alpha 32 / dropout 0.05 on all linear layers, bf16, batch 8, ``max_length`` 512, lr 2e-4, for ``--steps``
steps, prompt tokens masked, in a fresh process (peak memory and Liger's patches stay per run). QLoRA: NF4 with
double quantization and bf16 compute (bitsandbytes). The SDK trains with its defaults (packed rows with
block-diagonal masks on a GPU, chunked loss); TRL with ``SFTConfig(packing=False)`` (padded batches, its default)
and, with ``--trl-packing``, ``packing=True``. Tokens/s = non-padding tokens of the steps / training seconds;
peak memory = ``torch.cuda.max_memory_allocated``. Configurations whose packages are missing (trl, liger_kernel,
bitsandbytes) are reported as skipped with the import error.

    python benchmarks/bench_gpu_trl.py [--steps 30] [--rows 320] [--only sdk-lora,trl-lora,...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = ("sdk-lora", "trl-lora", "trl-liger-lora", "sdk-qlora", "trl-qlora", "trl-liger-qlora")
MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
WORDS = ("the river old stone quietly carries light over seven hills where a bell once rang for every ship that "
         "came home before winter and the keepers wrote each name in a book").split()


def build(folder: Path, rows: int) -> None:
    """The model folder (config + random bf16 weights + tokenizer) and ``rows.jsonl``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_sdk.testing.tiny import tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(torch.bfloat16)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    with (folder / "rows.jsonl").open("w") as f:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 180)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)


def run_sdk(folder: Path, qlora: bool, steps: int) -> dict:
    from finetune_sdk import Trainer

    trainer = Trainer(str(folder), technique="qlora" if qlora else "lora", formatter="prompt",
                      output_dir=folder.parent / f"sdk-{qlora}", progress=False, target_modules="all-linear",
                      per_device_train_batch_size=8, max_steps=steps, max_length=512, learning_rate=2e-4,
                      save_steps=0, seed=0, **LORA)
    metrics = trainer.fit(str(folder / "rows.jsonl")).metrics
    return {"tok/s": metrics["train_tokens_per_second"], "loss": metrics["train_loss"]}


def run_trl(folder: Path, qlora: bool, liger: bool, steps: int, packing: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs: dict = {"dtype": torch.bfloat16}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": 0}, **kwargs)
    data = load_dataset("json", data_files=str(folder / "rows.jsonl"), split="train")
    tokens = {"seen": 0}  # non-padding tokens of the steps' batches
    args = SFTConfig(output_dir=str(folder.parent / f"trl-{qlora}-{liger}"), per_device_train_batch_size=8,
                     max_steps=steps, max_length=512, learning_rate=2e-4, bf16=True, logging_steps=10,
                     save_strategy="no", report_to=[], packing=packing, use_liger_kernel=liger, seed=0,
                     gradient_checkpointing=False, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))
    original = trainer.training_step

    def training_step(model, inputs, *a, **k):
        mask = inputs.get("attention_mask")
        tokens["seen"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return original(model, inputs, *a, **k)

    trainer.training_step = training_step
    output = trainer.train()
    return {"tok/s": tokens["seen"] / output.metrics["train_runtime"], "loss": output.metrics["train_loss"]}


def one(name: str, folder: Path, steps: int, packing: bool) -> dict:
    import torch

    torch.cuda.reset_peak_memory_stats()
    qlora, liger = name.endswith("qlora"), "liger" in name
    start = time.perf_counter()
    if name.startswith("sdk"):
        result = run_sdk(folder, qlora, steps)
    else:
        result = run_trl(folder, qlora, liger, steps, packing)
    return {**result, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--trl-packing", action="store_true", help="TRL with packing=True")
    parser.add_argument("--timeout", type=int, default=100, help="seconds per configuration")
    parser.add_argument("--work", default="/tmp/bench-gpu-trl")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.work) / "llama-0.5b"
    if args.one:
        print("RESULT " + json.dumps(one(args.one, folder, args.steps, args.trl_packing)), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_trl.py needs a CUDA GPU")
    folder.mkdir(parents=True, exist_ok=True)
    build(folder, args.rows)
    results: dict[str, dict | str] = {}
    for name in args.only.split(","):
        command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--work", args.work]
        command += ["--trl-packing"] if args.trl_packing else []
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[name] = f"timed out after {args.timeout} s"
            print(f"{name}: {results[name]}", flush=True)
            continue
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            results[name] = f"skipped: {error[:160]}"
        else:
            results[name] = json.loads(line.removeprefix("RESULT "))
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; ~0.5B Llama (random weights), LoRA r=16 "
          f"all-linear, bf16, batch 8, max_length 512, {args.steps} steps; TRL packing={args.trl_packing}")
    print(f"{'configuration':18}{'tok/s':>10}{'x TRL':>8}{'peak MiB':>10}{'loss':>8}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:18}  {r}")
            continue
        trl = results.get(name.replace("sdk-", "trl-"))
        ratio = f"{r['tok/s'] / trl['tok/s']:.2f}" if isinstance(trl, dict) else "-"
        print(f"{name:18}{r['tok/s']:>10,.0f}{ratio:>8}{r['peak_mib']:>10,.0f}{r['loss']:>8.3f}")


if __name__ == "__main__":
    main()
