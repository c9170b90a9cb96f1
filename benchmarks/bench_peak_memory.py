"""Peak memory of QLoRA vs LoRA vs full fine-tuning on one model, each in a fresh process.

CPU: peak resident memory (ru_maxrss) of a process that loads the model and runs ``--steps`` training steps through
``finetune_sdk.Trainer``; GPU: ``torch.cuda.max_memory_allocated``. The model is SmolLM2-135M's architecture: the
GGUF-converted folder when it is cached (``make demo`` converts it), else the same config with random weights
(memory does not depend on weight values).

    python benchmarks/bench_peak_memory.py [--model PATH] [--steps 4] [--seq 256] [--batch 4] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, os, torch
from finetune_sdk import Trainer
spec = json.loads(sys.argv[1])
rows = [{"text": " ".join(["the quick brown fox jumps over the lazy dog"] * 64)}] * (spec["batch"] * spec["steps"])
trainer = Trainer(spec["model"], technique=spec["technique"], formatter="text", output_dir=spec["out"],
                  max_length=spec["seq"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                  bf16=spec["bf16"], progress=False, **({"dtype": "bfloat16"} if spec["bf16"] and spec["technique"] != "qlora" else {}))
trainer.fit(rows)
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK", peak)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    sys.path.insert(0, str(Path(__file__).parent))
    from models import smollm2_folder

    model = args.model or smollm2_folder(tmp)
    results = {}
    for technique in ("qlora", "lora", "full"):
        spec = {"model": model, "technique": technique, "out": str(tmp / technique), "steps": args.steps,
                "seq": args.seq, "batch": args.batch, "bf16": args.bf16}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp)  # import the installed SDK
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        results[technique] = int(proc.stdout.split("PEAK")[-1].split()[0])
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    kind = "CUDA max allocated" if torch.cuda.is_available() else "peak RSS"
    print(f"\n{Path(model).name}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{'bf16' if args.bf16 else 'fp32'}; {device}; {kind}")
    print(f"{'technique':10}{'peak MiB':>12}{'x full':>9}")
    for technique, peak in results.items():
        print(f"{technique:10}{peak / 2**20:>12,.0f}{peak / results['full']:>9.2f}")


if __name__ == "__main__":
    main()
