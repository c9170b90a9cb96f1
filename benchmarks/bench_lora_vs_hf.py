"""SDK ``Trainer(technique="lora").fit()`` vs a hand-written transformers Trainer + PEFT script, same work.

Same model (a seeded Llama-style model built from a config), same data, same LoRA settings, batch size, epochs,
learning rate and sequence lengths. Each side runs ``--rounds`` times, alternating, in one process; the table
shows the median training tokens/s (non-pad tokens / transformers' train_runtime) and the SDK/hand-written ratio.

    python benchmarks/bench_lora_vs_hf.py [--rounds 3] [--hidden 256] [--layers 4] [--rows 256]
"""

from __future__ import annotations

import argparse
import sys
import os
import platform
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "the quick brown fox jumps over lazy dog model answer question data colour animal red blue cat".split()


def make_rows(n: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        rows.append({"prompt": f"{i}: {prompt}?", "completion": answer + "."})
    return rows


LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05)
TRAIN = dict(per_device_train_batch_size=8, num_train_epochs=1.0, learning_rate=2e-4, seed=0, logging_steps=10)


def run_sdk(model_dir: Path, rows: list[dict[str, str]], out: Path) -> float:
    from finetune_sdk import Trainer

    result = Trainer(model_dir, technique="lora", formatter="chatml", output_dir=out, progress=False,
                     max_length=512, **LORA, **TRAIN).fit(rows)
    return result.metrics["train_tokens_per_second"]


def run_hand_written(model_dir: Path, rows: list[dict[str, str]], out: Path) -> float:
    """What a practitioner writes by hand: tokenize with masked prompts, pad per batch, HF Trainer + PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, tokens = [], 0
    for row in rows:
        prompt = f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        answer = row["completion"] + "<|im_end|>" + tokenizer.eos_token
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = (p + a)[:512]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": ([-100] * len(p) + a)[:512]})
        tokens += len(ids)
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(output_dir=str(out), report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                             dataloader_pin_memory=torch.cuda.is_available(), **TRAIN)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    runtime = trainer.train().metrics["train_runtime"]
    return tokens * TRAIN["num_train_epochs"] / runtime


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from models import add_model_arguments, model_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    add_model_arguments(parser)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()

    import torch
    import transformers


    transformers.utils.logging.set_verbosity_error()
    rows = make_rows(args.rows)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    model_dir = model_folder(args.model, work, args.hidden, args.layers)
    TRAIN["bf16"] = args.bf16
    sdk, hand = [], []
    for i in range(args.rounds):
        hand.append(run_hand_written(model_dir, rows, work / f"hand-{i}"))
        sdk.append(run_sdk(model_dir, rows, work / f"sdk-{i}"))
    s, h = statistics.median(sdk), statistics.median(hand)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nLoRA r=8 on {model_dir.name} ({args.model}; tiny = hidden {args.hidden} x {args.layers} layers), "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.rows} rows, "
          f"batch 8, 1 epoch; {device}, torch {torch.__version__}, {platform.python_version()}")
    print(f"{'':24}{'tokens/s (median)':>20}{'rounds':>40}")
    print(f"{'hand-written HF + PEFT':24}{h:>20,.0f}{', '.join(f'{x:,.0f}' for x in hand):>40}")
    print(f"{'finetune_sdk lora':24}{s:>20,.0f}{', '.join(f'{x:,.0f}' for x in sdk):>40}")
    print(f"{'ratio SDK / hand-written':24}{s / h:>20.3f}")


if __name__ == "__main__":
    main()
