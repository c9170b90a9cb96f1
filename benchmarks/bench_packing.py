"""Packed vs padded SFT on a length-skewed dataset, and finetune_sdk vs TRL's SFTTrainer on the same job.

Lengths are log-uniform between 8 and 512 tokens. Every run trains LoRA (r=8, q/v) on the same seeded Llama-style
model for one epoch, batch 8, lr 2e-4, prompt tokens masked; "useful" tokens are the non-padding tokens of the
data. Eval loss is computed the same way for every run (finetune_sdk's token-weighted loss on held-out rows).

Rows:
  padded (random batches)      finetune_sdk, packing=False, group_by_length=False
  padded (length-grouped)      finetune_sdk, packing=False (the SDK's fallback when a model can't pack)
  packed (SDK default)         finetune_sdk, packing=True: one row per batch, attention per example
  packed, block-diagonal masks with --masks: rows of at most max_length tokens, transformers' dense masks
  TRL SFTTrainer padding_free  trl 1.16 with its padding-free collator, the same batches (its best setting that
                               runs here without flash-attention)

    python benchmarks/bench_packing.py [--rows 256] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import sys
import math
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the quick brown fox jumps over lazy dog model answer question data colour animal red blue cat bird "
         "fish green yellow seven nine ten").split()
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0)
TRAIN = dict(per_device_train_batch_size=8, num_train_epochs=1.0, learning_rate=2e-4, seed=0)


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion rows whose total length is log-uniform in [8, 512] tokens (about 1 token a word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = int(math.exp(rng.uniform(math.log(8), math.log(500))))
        prompt_words = max(1, total // 4)
        rows.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(prompt_words)),
                     "completion": " ".join(rng.choice(WORDS) for _ in range(max(1, total - prompt_words)))})
    return rows


def sdk_run(model_dir: Path, rows, eval_rows, out: Path, **options) -> dict[str, float]:
    from finetune_sdk import Trainer

    trainer = Trainer(model_dir, technique="lora", formatter="chat-template", output_dir=out, progress=False,
                      max_length=1024, **LORA, **TRAIN, **options)
    result = trainer.fit(rows)
    return {"tokens": result.metrics["train_tokens"], "runtime": result.metrics["train_runtime"],
            "eval_loss": trainer.evaluate(eval_rows)["eval_loss"]}


def trl_run(model_dir: Path, rows, eval_rows, out: Path, useful_tokens: int) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune_sdk.models.inference import FineTunedModel
    from finetune_sdk.plugin_manager import get_plugin_host

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(output_dir=str(out), padding_free=True, max_length=None, report_to="none",
                       save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                       dataloader_pin_memory=torch.cuda.is_available(), logging_steps=10, **TRAIN)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    runtime = trainer.train().metrics["train_runtime"]
    evaluated = FineTunedModel(trainer.model, tokenizer, task="causal-lm",
                               formatter=get_plugin_host().create("formatter", "chat-template"),
                               options={"max_length": 1024, "system_prompt": None})
    return {"tokens": useful_tokens, "runtime": runtime, "eval_loss": evaluated.evaluate(eval_rows)["eval_loss"]}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from models import add_model_arguments, model_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    add_model_arguments(parser)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--masks", action="store_true",
                        help="also pack into rows of at most max_length tokens with block-diagonal masks (the "
                             "fallback for attention other than SDPA) instead of attention per example")
    args = parser.parse_args()

    import torch
    import transformers

    from finetune_sdk.log import quiet_third_party_output

    quiet_third_party_output()
    transformers.utils.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    model_dir = model_folder(args.model, work, args.hidden, args.layers)
    TRAIN["bf16"] = args.bf16
    rows, eval_rows = make_rows(args.rows, 0), make_rows(48, 1)
    runs: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    runs["padded (random batches)"] = sdk_run(model_dir, rows, eval_rows, work / "a", packing=False,
                                              group_by_length=False)
    runs["padded (length-grouped)"] = sdk_run(model_dir, rows, eval_rows, work / "b", packing=False)
    runs["packed (SDK default)"] = sdk_run(model_dir, rows, eval_rows, work / "c")
    if args.masks:
        from finetune_sdk.speed import varlen_attention

        applicable, varlen_attention.applicable = varlen_attention.applicable, lambda *_: False
        try:
            runs["packed, block-diagonal masks"] = sdk_run(model_dir, rows, eval_rows, work / "e")
        finally:
            varlen_attention.applicable = applicable
    if not args.no_trl:
        runs["TRL SFTTrainer padding_free"] = trl_run(model_dir, rows, eval_rows, work / "d",
                                                      runs["packed (SDK default)"]["tokens"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    base = runs["padded (random batches)"]
    packed = runs["packed (SDK default)"]
    print(f"\nLoRA SFT, {args.rows} rows with lengths log-uniform in 8..512 tokens, {model_dir.name} ({args.model}), "
          f"{'bf16' if args.bf16 else 'fp32'}, batch 8, 1 epoch; {device}, torch {torch.__version__}; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'run':30}{'useful tok/s':>14}{'x padded':>10}{'eval loss':>11}{'vs padded':>11}")
    for name, run in runs.items():
        rate = run["tokens"] / run["runtime"]
        print(f"{name:30}{rate:>14,.0f}{rate / (base['tokens'] / base['runtime']):>10.2f}{run['eval_loss']:>11.4f}"
              f"{(run['eval_loss'] / base['eval_loss'] - 1) * 100:>10.2f}%")
    if "TRL SFTTrainer padding_free" in runs:
        trl = runs["TRL SFTTrainer padding_free"]
        print(f"\nSDK packed / TRL padding-free useful tokens/s: "
              f"{(packed['tokens'] / packed['runtime']) / (trl['tokens'] / trl['runtime']):.2f}x; "
              f"eval loss difference {(packed['eval_loss'] / trl['eval_loss'] - 1) * 100:+.2f}%")


if __name__ == "__main__":
    main()
