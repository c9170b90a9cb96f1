"""Model FLOP utilisation: the SDK's achieved training FLOP/s against this machine's measured peak matmul FLOP/s.

In one process, alternating for ``--rounds`` rounds, for fp32 (``dtype="float32"``) and bf16 (``dtype="auto"`` on an
AVX512-BF16/AMX CPU or a bf16 GPU, else ``dtype="bfloat16"``):

* the peak: the best of ``--reps`` timed ``n x n`` matmuls (``--matmul 2048``) in that dtype, FLOP/s = 2 n^3 / s;
* training: LoRA r=16 on all linear layers of SmolLM2-135M-Instruct, batch 8, packed, through ``Trainer.fit``;
  achieved FLOP/s = FLOPs per token x training tokens/s, with the standard estimates (Kaplan et al., 2020; PaLM's
  MFU, Chowdhery et al., 2022), attention's own FLOPs not counted: full fine-tuning 6 N per token (N: parameters
  in matmuls, the LM head included, embedding lookups not); LoRA 2 N forward + 2 N for the frozen base's backward
  (input gradients only) + 6 N_adapter.

MFU = achieved / peak of the same dtype. Medians over rounds.

Where the time goes (``--profile``, LoRA only): one more run per dtype whose second step runs under
``torch.profiler``; it prints the step's busiest operations and the share of the step spent in matmuls
(``aten::mm``/``addmm``/``bmm``), and the MFU the step would reach if everything else took no time (its FLOPs over
its matmul time, against the same peak): the ceiling that faster matmuls alone can't lift.

    python benchmarks/bench_mfu.py [--steps 10] [--rounds 3] [--max-length 256] [--technique lora] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_matmul_flops(dtype: str, n: int, reps: int) -> float:
    """Best FLOP/s of ``reps`` timed ``n x n @ n x n`` matmuls in ``dtype`` (after two warm-up runs)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    out = torch.empty_like(a)  # written in place: a fresh output each time would time the allocator's page faults
    best = float("inf")
    for i in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(model_folder: str, technique: str, lora_r: int) -> tuple[float, int, int]:
    """(training FLOPs per token, parameters in matmuls N, adapter parameters) from the model's config."""
    from finetune_sdk.memory import ModelShape, load_config

    shape = ModelShape.from_config(load_config(model_folder))
    counts = shape.parameter_counts()
    matmul = counts["linear"] + shape.vocab_size * shape.hidden  # every linear layer + the LM head (tied or not)
    adapter = lora_r * sum(i + o for _, i, o in shape.layer_linears()) * shape.layers
    if technique == "full":
        return 6.0 * matmul, matmul, 0
    return 4.0 * matmul + 6.0 * adapter, matmul, adapter


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_step(model: str, dtype: str, train: list, evaluation: list, args: argparse.Namespace, out: Path,
                 per_token: float) -> dict:
    """Run two LoRA steps through ``bench_precision.run``, the second under ``torch.profiler``; the step's figures:
    wall and operation seconds, matmul seconds, the busiest operations, and its FLOPs (``per_token`` x tokens)."""
    import bench_precision
    import transformers
    from torch.profiler import ProfilerActivity, profile

    profiled: dict = {}
    original = transformers.Trainer.training_step

    def training_step(self, *a, **k):
        if profiled or self.state.global_step < 1:
            return original(self, *a, **k)
        profiled["flops"] = per_token * a[1]["input_ids"].numel()  # packed: one row, no padding
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            loss = original(self, *a, **k)
            profiled["seconds"] = time.perf_counter() - start
        events = prof.key_averages()
        profiled["total"] = sum(e.self_cpu_time_total for e in events) / 1e6
        profiled["matmul"] = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
        profiled["top"] = [(e.key, e.self_cpu_time_total / 1e6, e.count)
                           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]]
        return loss

    transformers.Trainer.training_step = training_step
    try:
        steps, args.steps = args.steps, 2
        bench_precision.run(model, dtype, train[: 2 * args.batch], evaluation[:1], args, out)
    finally:
        transformers.Trainer.training_step = original
        args.steps = steps
    return profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=8)
    parser.add_argument("--matmul", type=int, default=2048, help="size n of the peak n x n matmul")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--technique", default="lora", choices=("lora", "full"))
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct from the GGUF)")
    parser.add_argument("--profile", action="store_true", help="profile one LoRA step per dtype: where the time goes")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_precision
    import torch
    import transformers

    from finetune_sdk.precision import cpu_bf16_native, cuda_bf16

    transformers.utils.logging.set_verbosity_error()
    model = args.model or bench_precision.real_smollm2()
    native = cuda_bf16() if torch.cuda.is_available() else bool(cpu_bf16_native())
    sides = {"float32": {"dtype": "float32"},
             "bfloat16": {} if native and args.technique == "lora" else {"dtype": "bfloat16"}}
    bench_precision.VARIANTS.update(sides)
    if args.technique == "full":
        bench_precision.LORA.clear()
    train = bench_precision.documentation_rows(args.steps * args.batch)
    evaluation = bench_precision.documentation_rows(args.eval_rows, skip=args.steps * args.batch)
    per_token, matmul_params, adapter = flops_per_token(model, args.technique, 16)
    work = Path(tempfile.mkdtemp(prefix="bench-mfu-"))
    peaks: dict[str, list[float]] = {d: [] for d in sides}
    achieved: dict[str, list[float]] = {d: [] for d in sides}
    load = [os.getloadavg()]
    for i in range(args.rounds):
        for dtype in list(sides) if i % 2 == 0 else list(sides)[::-1]:
            peaks[dtype].append(peak_matmul_flops(dtype, args.matmul, args.reps))
            if args.technique == "full":
                from finetune_sdk import Trainer

                result = Trainer(model, technique="full", formatter="text", output_dir=work / f"{dtype}-{i}",
                                 progress=False, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                 max_length=args.max_length, save_steps=0, seed=0, **sides[dtype]).fit(train)
                speed = result.metrics["train_tokens_per_second"]
            else:
                speed = bench_precision.run(model, dtype, train, evaluation, args, work / f"{dtype}-{i}")["tok/s"]
            achieved[dtype].append(speed * per_token)
            print(f"round {i + 1} {dtype:9} peak matmul {peaks[dtype][-1] / 1e9:7.1f} GFLOP/s  training "
                  f"{speed:7.1f} tok/s = {achieved[dtype][-1] / 1e9:7.1f} GFLOP/s  MFU "
                  f"{achieved[dtype][-1] / peaks[dtype][-1]:.1%}", flush=True)
        load.append(os.getloadavg())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.technique} on {Path(model).name} (N = {matmul_params / 1e6:.1f}M parameters in matmuls"
          + (f", {adapter / 1e6:.2f}M adapter parameters" if adapter else "") + f"; {per_token / 1e6:.0f} MFLOP per "
          f"token), batch {args.batch} packed, max_length {args.max_length}, {args.steps} steps; {device}, torch "
          f"{torch.__version__}; peak = best {args.matmul}x{args.matmul} matmul of {args.reps}")
    print("load averages (1/5/15 min) at start and after each round: "
          + "; ".join("/".join(f"{x:.2f}" for x in avg) for avg in load))
    print(f"{'dtype':10}{'peak GFLOP/s':>14}{'achieved GFLOP/s':>18}{'MFU':>8}")
    for dtype in sides:
        peak, got = statistics.median(peaks[dtype]), statistics.median(achieved[dtype])
        mfu = statistics.median(a / p for a, p in zip(achieved[dtype], peaks[dtype]))
        print(f"{dtype:10}{peak / 1e9:>14.1f}{got / 1e9:>18.1f}{mfu:>8.1%}")
    if args.profile and args.technique == "lora":
        print("\none profiled step per dtype (self CPU seconds of the step's operations)")
        for dtype in sides:
            step = profile_step(model, dtype, train, evaluation, args, work / f"{dtype}-profile", per_token)
            print(f"{dtype}: {step['seconds']:.2f} s wall, {step['total']:.2f} s in operations, "
                  f"{step['matmul']:.2f} s ({step['matmul'] / step['total']:.0%}) in matmuls; busiest: "
                  + ", ".join(f"{k} {t:.2f} s x{c}" for k, t, c in step["top"]))
            ceiling = step["flops"] / step["matmul"] / statistics.median(peaks[dtype])
            print(f"  MFU if everything but the matmuls took no time: {ceiling:.1%}")


if __name__ == "__main__":
    main()
