"""CPU threads on shared cores: GNU OpenMP's spinning waits vs sleeping ones (``OMP_WAIT_POLICY=PASSIVE``).

Each measurement is a fresh process that trains a seeded Llama-style model (hidden 256, 4 layers, 8k vocabulary;
all weights, AdamW) for ``--steps`` steps of 4 x 256 tokens with torch's default threads, and reports tokens/s.
Settings: OpenMP's default (threads spin between operations), ``OMP_WAIT_POLICY=PASSIVE`` (the SDK's default), and
one thread; each alone and next to ``--hogs`` busy processes (pure-Python loops, one per core by default) that
stand for other work sharing the cores. Settings alternate over ``--rounds`` rounds; medians.

    python benchmarks/bench_threads.py [--rounds 3] [--steps 6] [--hogs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=8000)
model = LlamaForCausalLM(config)
ids = torch.randint(0, 8000, (4, 256))
optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
def step():
    model(input_ids=ids, labels=ids).loss.backward(); optimizer.step(); optimizer.zero_grad()
step(); step()
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print("TOKS", ids.numel() * int(sys.argv[1]) / (time.perf_counter() - start))
"""
SETTINGS = {"spinning (OpenMP default)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "1 thread": {"OMP_NUM_THREADS": "1"}}


def measure(env: dict[str, str], steps: int) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(steps)], capture_output=True, text=True,
                          env={**clean, **env}, check=True)
    return float(proc.stdout.split("TOKS")[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy processes in the shared case")
    args = parser.parse_args()
    results: dict[tuple[str, bool], list[float]] = {(s, shared): [] for s in SETTINGS for shared in (False, True)}
    load = [os.getloadavg()]
    for i in range(args.rounds):
        for shared in (False, True):
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs if shared
                                                                                                else 0)]
            try:
                order = list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]
                for name in order:
                    results[(name, shared)].append(measure(SETTINGS[name], args.steps))
                    print(f"round {i + 1} {'shared' if shared else 'alone':7} {name:28} "
                          f"{results[(name, shared)][-1]:8,.0f} tok/s", flush=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
        load.append(os.getloadavg())
    import torch

    print(f"\nLlama h256 x 4 layers, full training, 4 x 256 tokens a step, {args.steps} steps; CPU ({os.cpu_count()} "
          f"cores), torch {torch.__version__} ({torch.get_num_threads()} threads by default); shared = next to "
          f"{args.hogs} busy processes")
    print("load averages (1/5/15 min) at start and after each round: "
          + "; ".join("/".join(f"{x:.2f}" for x in avg) for avg in load))
    print(f"{'setting':30}{'alone tok/s':>14}{'shared tok/s':>14}{'shared / alone':>16}")
    for name in SETTINGS:
        alone, shared = statistics.median(results[(name, False)]), statistics.median(results[(name, True)])
        print(f"{name:30}{alone:>14,.0f}{shared:>14,.0f}{shared / alone:>16.2f}")


if __name__ == "__main__":
    main()
