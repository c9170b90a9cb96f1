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

The ceiling for the shapes fed (per dtype): the frozen base's matmuls of one step at the step's mean token count
(each linear's forward ``[tokens, in] @ [in, out]`` and its input gradient ``[tokens, out] @ [out, in]``, the LM
head included), timed alone in that dtype (bf16: with ``auto``'s casts of the input and output, as a step runs
them); their FLOP/s is what the step would reach if it were nothing but these matmuls. ``--changes`` adds a
``bf16-before`` side: ``auto``'s bf16 path without this issue's changes (no fused projections, every saved
activation of 4,096 values or more packed, fp32 adapter matmuls), and a ``bf16-fp32-adapters`` side (all of them
but the bf16 adapter matmuls), alternating with the others, so each change's effect is side by side; ``--sides``
keeps only some of them.

Where the time goes (``--profile``, LoRA only): one more run per dtype whose second step runs under
``torch.profiler``; it prints the step's busiest operations and the share of the step spent in matmuls
(``aten::mm``/``addmm``/``bmm``), and the MFU the step would reach if everything else took no time (its FLOPs over
its matmul time, against the same peak): the ceiling that faster matmuls alone can't lift.

    python benchmarks/bench_mfu.py [--steps 10] [--rounds 3] [--max-length 256] [--technique lora] [--profile]
                                   [--changes] [--sides bfloat16,bf16-fp32-adapters]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    from finetune_sdk.advice.memory import ModelShape, load_config

    shape = ModelShape.from_config(load_config(model_folder))
    counts = shape.parameter_counts()
    matmul = counts["linear"] + shape.vocab_size * shape.hidden  # every linear layer + the LM head (tied or not)
    adapter = lora_r * sum(i + o for _, i, o in shape.layer_linears()) * shape.layers
    if technique == "full":
        return 6.0 * matmul, matmul, 0
    return 4.0 * matmul + 6.0 * adapter, matmul, adapter


def shape_ceiling(model_folder: str, dtype: str, tokens: int, reps: int = 3) -> float:
    """FLOP/s of one step's frozen matmuls alone at ``tokens`` rows in ``dtype`` (see the module doc): one decoder
    layer's linears (forward and input gradient) timed, times the layers, plus the LM head's forward."""
    import torch
    from torch.nn import functional as F

    from finetune_sdk.advice.memory import ModelShape, load_config

    shape = ModelShape.from_config(load_config(model_folder))
    torch_dtype = getattr(torch, dtype)
    linears = [(i, o) for _, i, o in shape.layer_linears()]
    weights = [torch.randn(o, i).to(torch_dtype) for i, o in linears]
    head = torch.randn(shape.vocab_size, shape.hidden).to(torch_dtype)
    inputs = {n: torch.randn(tokens, n) for pair in linears for n in pair}

    def layer() -> None:
        for w in weights:
            out_features, in_features = w.shape
            F.linear(inputs[in_features].to(torch_dtype), w).float()  # forward
            (inputs[out_features].to(torch_dtype) @ w).float()  # input gradient

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    seconds = shape.layers * best(layer) + best(lambda: F.linear(inputs[shape.hidden].to(torch_dtype), head))
    flops = 2 * tokens * (2 * sum(i * o for i, o in linears) * shape.layers + shape.vocab_size * shape.hidden)
    return flops / seconds


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


#: The ``--changes`` sides: auto's bf16 path without some of issue 23's changes (side -> what it turns off).
CHANGES = {"bf16-before": ("projections", "packing floor", "adapter matmuls"),
           "bf16-fp32-adapters": ("adapter matmuls",)}


@contextmanager
def before_changes(side: str) -> Iterator[None]:
    """Within the block, auto's bf16 path without the changes :data:`CHANGES` lists for ``side`` (none for other
    sides): no fused projections, every saved fp32 activation of 4,096 values or more packed in bf16, fp32 adapter
    matmuls."""
    from finetune_sdk.speed import precision

    off = CHANGES.get(side, ())
    smallest = precision.SMALLEST_PACKED
    env = {"FINETUNE_SDK_FUSED_PROJECTIONS": "projections", "FINETUNE_SDK_BF16_ADAPTERS": "adapter matmuls"}
    saved = {name: os.environ.get(name) for name in env}
    if "packing floor" in off:
        precision.SMALLEST_PACKED = 4096
    for name, change in env.items():
        if change in off:
            os.environ[name] = "0"
    try:
        yield
    finally:
        precision.SMALLEST_PACKED = smallest
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    parser.add_argument("--changes", action="store_true",
                        help="add the bf16-before side (auto's bf16 path without issue 23's changes) and the "
                             "bf16-fp32-adapters side (without the bf16 adapter matmuls only)")
    parser.add_argument("--sides", help="only these sides, comma-separated (float32 is always measured)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_precision
    import torch
    import transformers

    from finetune_sdk.speed.precision import cpu_bf16_native, cuda_bf16

    transformers.utils.logging.set_verbosity_error()
    model = args.model or bench_precision.real_smollm2()
    native = cuda_bf16() if torch.cuda.is_available() else bool(cpu_bf16_native())
    sides = {"float32": {"dtype": "float32"},
             "bfloat16": {} if native and args.technique == "lora" else {"dtype": "bfloat16"}}
    if args.changes and args.technique == "lora":
        sides.update({side: sides["bfloat16"] for side in CHANGES})
    if args.sides:
        sides = {side: options for side, options in sides.items()
                 if side == "float32" or side in args.sides.split(",")}
    bench_precision.VARIANTS.update(sides)
    from finetune_sdk.speed import precision as precision_module

    precision_module.CPU_BF16_MIN_FEED = 0  # the bf16 sides measure auto's bf16 path whatever the rows feed
    matmul_dtype = {side: "float32" if side == "float32" else "bfloat16" for side in sides}
    ceilings: dict[str, float] = {}
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
            peaks[dtype].append(peak_matmul_flops(matmul_dtype[dtype], args.matmul, args.reps))
            if args.technique == "full":
                from finetune_sdk import Trainer

                result = Trainer(model, technique="full", formatter="text", output_dir=work / f"{dtype}-{i}",
                                 progress=False, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                 max_length=args.max_length, save_steps=0, seed=0, **sides[dtype]).fit(train)
                speed = result.metrics["train_tokens_per_second"]
            else:
                with before_changes(dtype):
                    ran = bench_precision.run(model, dtype, train, evaluation, args, work / f"{dtype}-{i}")
                speed = ran["tok/s"]
                if matmul_dtype[dtype] not in ceilings:
                    ceilings[matmul_dtype[dtype]] = shape_ceiling(model, matmul_dtype[dtype],
                                                                  round(ran["tokens_per_step"]))
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
    print(f"{'side':12}{'peak GFLOP/s':>14}{'shapes-fed ceiling':>20}{'= of peak':>10}{'achieved GFLOP/s':>18}"
          f"{'MFU':>8}{'of ceiling':>12}{'x float32':>10}")
    base = statistics.median(achieved["float32"])
    for dtype in sides:
        peak, got = statistics.median(peaks[dtype]), statistics.median(achieved[dtype])
        mfu = statistics.median(a / p for a, p in zip(achieved[dtype], peaks[dtype]))
        ceiling = ceilings.get(matmul_dtype[dtype], float("nan"))
        print(f"{dtype:12}{peak / 1e9:>14.1f}{ceiling / 1e9:>20.1f}{ceiling / peak:>10.1%}{got / 1e9:>18.1f}"
              f"{mfu:>8.1%}{got / ceiling:>12.1%}{got / base:>10.2f}")
    if args.profile and args.technique == "lora":
        print("\none profiled step per dtype (self CPU seconds of the step's operations)")
        for dtype in sides:
            with before_changes(dtype):
                step = profile_step(model, dtype, train, evaluation, args, work / f"{dtype}-profile", per_token)
            print(f"{dtype}: {step['seconds']:.2f} s wall, {step['total']:.2f} s in operations, "
                  f"{step['matmul']:.2f} s ({step['matmul'] / step['total']:.0%}) in matmuls; busiest: "
                  + ", ".join(f"{k} {t:.2f} s x{c}" for k, t, c in step["top"]))
            ceiling = step["flops"] / step["matmul"] / statistics.median(peaks[dtype])
            print(f"  MFU if everything but the matmuls took no time: {ceiling:.1%}")


if __name__ == "__main__":
    main()
