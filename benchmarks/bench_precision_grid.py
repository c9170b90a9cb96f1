"""Precision ``auto`` vs fp32 on the shapes users run: the grid that guards ``dtype="auto"``'s choice (issue 23).

LoRA r=16 / alpha 32 on all linear layers of SmolLM2-135M-Instruct (real weights), packed, through the SDK's
``Trainer(technique="lora").fit()``, a fresh ``Trainer`` per run, in one process. Shapes:

* ``chat4``: the demo's chat rows at batch 4 (~245 tokens a step), below the grid's smallest guarded shape;
* ``chat8``: the demo's chat rows (``examples/data/quillfeather_train.jsonl``, SmolLM2's chat template, ~61 tokens
  each, prompt masked), batch 8 (~490 tokens a step);
* ``chat32``: the same rows, batch 32 (~1,950 tokens a step);
* ``doc256``: paragraphs of Python's documentation cut at 256 tokens, batch 8 (~2,000 tokens a step).

Sides: ``fp32`` (``dtype="float32"``), ``auto`` (the default: whatever
:func:`finetune_sdk.speed.precision.resolve_precision` picks for the shape), ``bf16path`` (``auto``'s bf16 path
whatever the shape feeds: ``CPU_BF16_MIN_FEED`` set to 0, to see what the threshold saves) and ``bf16fp32a`` (that
bf16 path with fp32 adapter matmuls, ``FINETUNE_SDK_BF16_ADAPTERS=0``: what the bf16 adapter matmuls save). Rounds
alternate which side goes first; the table gives median tokens/s, the ratio to fp32 in the same round, the training
loss against fp32's, and the process CPU seconds per token (less sensitive to other processes on shared cores than
wall time); with both bf16 sides, one more line per shape gives ``bf16path / bf16fp32a`` in the same round. The load
average is printed with every figure.

    python benchmarks/bench_precision_grid.py [--shapes chat8,chat32,doc256] [--sides fp32,auto] [--rounds 2]
                                              [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import finetune_sdk  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads)

HERE = Path(__file__).parent
SHAPES = {"chat4": ("chat", 4, 512), "chat8": ("chat", 8, 512), "chat32": ("chat", 32, 512), "doc256": ("doc", 8, 256)}
SIDES = {"fp32": {"dtype": "float32"}, "auto": {}, "bf16path": {"dtype": "auto", "bf16_path": True},
         "bf16fp32a": {"dtype": "auto", "bf16_path": True, "env": {"FINETUNE_SDK_BF16_ADAPTERS": "0"}}}


def rows(kind: str, count: int) -> list[dict[str, str]]:
    """``count`` training rows: the demo's chat rows (repeated) or documentation paragraphs."""
    if kind == "chat":
        chat = [json.loads(line) for line in (HERE.parent / "examples/data/quillfeather_train.jsonl").open()]
        return [chat[i % len(chat)] for i in range(count)]
    sys.path.insert(0, str(HERE))
    import bench_precision

    return bench_precision.documentation_rows(count)


def run(model: str, shape: str, side: str, steps: int, out: Path) -> dict:
    from finetune_sdk import Trainer
    from finetune_sdk.speed import precision

    kind, batch, max_length = SHAPES[shape]
    options = dict(SIDES[side])
    threshold = precision.CPU_BF16_MIN_FEED
    if options.pop("bf16_path", None):
        precision.CPU_BF16_MIN_FEED = 0
    env = options.pop("env", {})
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    trainer = Trainer(model, technique="lora", formatter="chat-template" if kind == "chat" else "text",
                      output_dir=out, progress=False, r=16, lora_alpha=32, target_modules="all-linear",
                      per_device_train_batch_size=batch, max_steps=steps, max_length=max_length, learning_rate=2e-4,
                      save_steps=0, seed=0, **options)
    try:
        cpu = time.process_time()
        metrics = trainer.fit(rows(kind, steps * batch)).metrics
        cpu = time.process_time() - cpu
        chosen = trainer.precision.dtype
    finally:
        precision.CPU_BF16_MIN_FEED = threshold
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return {"tok/s": metrics["train_tokens_per_second"], "loss": metrics["train_loss"],
            "cpu_ms_per_token": 1e3 * cpu / max(metrics["train_tokens"], 1), "dtype": chosen,
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="chat8,chat32,doc256")
    parser.add_argument("--sides", default="fp32,auto")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct from the GGUF)")
    args = parser.parse_args()
    shapes, sides = args.shapes.split(","), args.sides.split(",")
    if "fp32" not in sides or any(s not in SIDES for s in sides) or any(s not in SHAPES for s in shapes):
        raise SystemExit(f"--sides must include fp32 and name only {', '.join(SIDES)}; --shapes from "
                         f"{', '.join(SHAPES)}")
    sys.path.insert(0, str(HERE))
    import bench_precision
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    model = args.model or bench_precision.real_smollm2()
    work = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    results: dict[tuple[str, str], list[dict]] = {}
    for i in range(args.rounds):
        for shape in shapes:
            for side in sides if i % 2 == 0 else sides[::-1]:
                r = run(model, shape, side, args.steps, work / f"{shape}-{side}-{i}")
                results.setdefault((shape, side), []).append(r)
                print(f"round {i + 1} {shape:7} {side:9} [{r['dtype']}] {r['tok/s']:7.1f} tok/s  loss "
                      f"{r['loss']:.4f}  {r['cpu_ms_per_token']:.2f} CPU ms/token  load {r['load']:.2f}", flush=True)
    print(f"\nLoRA r=16 all-linear on {Path(model).name}, {args.steps} steps, {args.rounds} rounds; CPU "
          f"({os.cpu_count()} cores), torch {torch.__version__}")
    print(f"{'shape':8}{'side':10}{'dtype':10}{'tok/s':>9}{'x fp32':>8}{'loss vs fp32':>14}{'CPU ms/tok':>12}"
          f"{'x fp32':>8}  rounds (tok/s @ load)")
    for shape in shapes:
        base = results[(shape, "fp32")]
        for side in sides:
            runs = results[(shape, side)]
            ratio = statistics.median(r["tok/s"] / b["tok/s"] for r, b in zip(runs, base))
            cpu_ratio = statistics.median(b["cpu_ms_per_token"] / r["cpu_ms_per_token"] for r, b in zip(runs, base))
            loss = statistics.median(r["loss"] / b["loss"] - 1 for r, b in zip(runs, base))
            print(f"{shape:8}{side:10}{runs[0]['dtype']:10}{statistics.median(r['tok/s'] for r in runs):>9.1f}"
                  f"{ratio:>8.2f}{loss:>+14.2%}{statistics.median(r['cpu_ms_per_token'] for r in runs):>12.2f}"
                  f"{cpu_ratio:>8.2f}  " + ", ".join(f"{r['tok/s']:.1f} @ {r['load']:.1f}" for r in runs))
        if "bf16path" in sides and "bf16fp32a" in sides:
            pairs = list(zip(results[(shape, "bf16path")], results[(shape, "bf16fp32a")]))
            print(f"{shape:8}bf16 adapter matmuls: x{statistics.median(a['tok/s'] / b['tok/s'] for a, b in pairs):.2f}"
                  f" tok/s, x{statistics.median(b['cpu_ms_per_token'] / a['cpu_ms_per_token'] for a, b in pairs):.2f}"
                  f" CPU per token, loss {statistics.median(a['loss'] / b['loss'] - 1 for a, b in pairs):+.2%} "
                  f"(bf16path / bf16fp32a, same rounds)")


if __name__ == "__main__":
    main()
