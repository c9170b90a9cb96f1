"""Measured peak memory of real training steps vs ``finetune_sdk.advice.memory.estimate_training_memory``.

Each case runs in a fresh Python process that imports what ``Trainer.fit`` imports, builds a seeded Llama-style
model from a config (random weights; for qlora the model is saved to a temporary folder first and loaded in 4-bit
NF4 with double quantization, as the SDK loads it), prepares it with the SDK's own technique plugin (LoRA r=8 on
PEFT's default targets; QLoRA r=64 on all linear layers; full: every weight), then runs ``--steps`` training
steps on random tokens (forward, backward, gradient clipping, AdamW step, gradients set to None). The measured
peak is the process's peak RSS (``ru_maxrss``) on CPU, or peak reserved GPU memory plus the CUDA context on a
GPU. The table shows the estimate, the measurement and their ratio; ``--check`` exits 1 when a ratio is outside
0.75-1.25.

    python benchmarks/bench_memory.py [--steps 3] [--device cpu|cuda] [--quick] [--json results.json] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name: (hidden, layers, heads, kv_heads, intermediate, vocab, batch, seq)
SIZES: dict[str, tuple[int, ...]] = {
    "llama-h256-l4-v8k": (256, 4, 4, 4, 688, 8000, 8, 256),
    "llama-h512-l6-v16k": (512, 6, 8, 4, 1376, 16000, 4, 512),
    "llama-h768-l8-v32k": (768, 8, 12, 4, 2048, 32000, 4, 384),
    "llama-h1024-l16-v32k": (1024, 16, 16, 4, 2816, 32000, 4, 256),
}
EXTRA_SIZES = ("llama-h1024-l16-v32k",)
TECHNIQUES = ("lora", "qlora", "full")
LORA = {"lora": dict(r=8, target_modules=None), "qlora": dict(r=64, target_modules="all-linear")}


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def smollm2_folder() -> Path | None:
    """The SmolLM2-135M folder the SDK converted from GGUF, when this machine has it cached."""
    cache = Path(os.environ.get("FINETUNE_SDK_CACHE") or Path.home() / ".cache" / "finetune_sdk") / "gguf"
    found = sorted(cache.glob("SmolLM2*/config.json"))
    return found[0].parent if found else None


def case(name: str, technique: str, gc: bool = False, dtype: str = "float32", batch: int | None = None,
         seq: int | None = None) -> dict[str, Any]:
    h, layers, heads, kv, inter, vocab, size_batch, size_seq = SIZES[name]
    return dict(name=name, technique=technique, batch=batch or size_batch, seq=seq or size_seq, gc=gc, dtype=dtype,
                config=dict(hidden=h, layers=layers, heads=heads, kv_heads=kv, intermediate=inter, vocab=vocab))


def cases(quick: bool = False, extra: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    names = list(SIZES)[:1] if quick else [n for n in SIZES if n not in EXTRA_SIZES]
    out = [case(name, technique) for name in names for technique in TECHNIQUES]
    if quick:
        return out
    out += [case("llama-h512-l6-v16k", "lora", gc=True), case("llama-h512-l6-v16k", "full", gc=True)]
    folder = smollm2_folder()
    if folder is not None:
        out += [dict(name="SmolLM2-135M", technique=technique, batch=2, seq=256, gc=False, dtype="float32",
                     folder=str(folder)) for technique in TECHNIQUES]
    if extra or device == "cuda":
        out += [case("llama-h1024-l16-v32k", "qlora"), case("llama-h1024-l16-v32k", "lora"),
                case("llama-h1024-l16-v32k", "qlora", gc=True), case("llama-h768-l8-v32k", "full", gc=True)]
    if device == "cuda":  # what the SDK loads on a GPU: bf16 bases for adapters, and bigger batches
        out += [case(name, "lora", dtype="bfloat16") for name in names]
        out += [case("llama-h1024-l16-v32k", "lora", dtype="bfloat16", batch=8, seq=1024),
                case("llama-h1024-l16-v32k", "full", batch=8, seq=1024),
                case("llama-h1024-l16-v32k", "lora", gc=True, dtype="bfloat16", batch=8, seq=1024)]
    return out


# -- the measured side (runs in a fresh process) ----------------------------------------------------------------
def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so the training steps' own peak can be read apart from loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def build_model(case: dict[str, Any], device: str, work: Path) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_sdk.plugins.quantizers.bnb import NF4Quantizer

    config = AutoConfig.from_pretrained(case["folder"]) if "folder" in case else llama_config(**case["config"])
    if case["technique"] != "qlora":
        torch.manual_seed(0)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, case.get("dtype", "float32")))
    quantizer = NF4Quantizer()
    options = {"compute_dtype": "auto", "double_quant": True}
    model = AutoModelForCausalLM.from_pretrained(
        case.get("folder") or str(work), quantization_config=quantizer.quantization_config(options),
        device_map={"": 0} if device == "cuda" else "cpu", dtype=torch.float32)
    quantizer.after_load(model)
    return model


def measure(case: dict[str, Any], device: str, steps: int, work: Path) -> dict[str, Any]:
    import torch
    import transformers.trainer  # noqa: F401  (what Trainer.fit imports, so the baseline matches)

    from contextlib import nullcontext

    from finetune_sdk.speed.chunked_loss import chunked_loss
    from finetune_sdk.plugins.techniques.full import FullTechnique
    from finetune_sdk.plugins.techniques.lora import LoraTechnique, QLoraTechnique

    if device == "cuda":
        torch.cuda.init()
        torch.ones(1, device="cuda") @ torch.ones(1, 1, device="cuda")
    start = time.perf_counter()
    model = build_model(case, device, work)
    technique = {"lora": LoraTechnique, "qlora": QLoraTechnique, "full": FullTechnique}[case["technique"]]()
    options = {"lora_alpha": 16, "lora_dropout": 0.05, "bias": "none", "use_rslora": False,
               "gradient_checkpointing": case["gc"], **LORA.get(case["technique"], {})}
    model = technique.prepare(model, options, None)
    if case["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    loaded_peak = peak_rss_bytes()
    reset_peak()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        ids = torch.randint(3, vocab, (case["batch"], case["seq"]), generator=generator).to(device)
        with chunked_loss(model) if case.get("chunked", True) else nullcontext():  # as the SDK trains
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        times.append(time.perf_counter() - t)
    result = {"peak_rss": peak_rss_bytes(), "load_peak_rss": loaded_peak, "train_peak_rss": hwm_bytes(),
              "step_seconds": times, "seconds": time.perf_counter() - start}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
        result.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                      context=context, peak_gpu=torch.cuda.max_memory_reserved() + context)
    return result


def worker(spec: str) -> None:
    args = json.loads(spec)
    print("RESULT " + json.dumps(measure(args["case"], args["device"], args["steps"], Path(args["work"]))))


# -- the driver ---------------------------------------------------------------------------------------------------
def save_random_model(case: dict[str, Any], folder: Path) -> None:
    """Write the case's seeded random model (fp32 safetensors) for the 4-bit load, from a separate process."""
    code = ("import sys, json, torch; sys.path.insert(0, %r); from bench_memory import llama_config; "
            "from transformers import AutoModelForCausalLM; torch.manual_seed(0); "
            "AutoModelForCausalLM.from_config(llama_config(**json.loads(sys.argv[1]))).save_pretrained(sys.argv[2])"
            % str(Path(__file__).parent))
    subprocess.run([sys.executable, "-c", code, json.dumps(case["config"]), str(folder)], check=True)


def run_case(case: dict[str, Any], device: str, steps: int, work: Path) -> dict[str, Any]:
    spec = json.dumps({"case": case, "device": device, "steps": steps, "work": str(work)})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case {case['name']} {case['technique']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def estimate(case: dict[str, Any], device: str) -> Any:
    from finetune_sdk.advice.memory import estimate_for_options

    config = case.get("folder") or llama_config(**case["config"])
    options = {"per_device_train_batch_size": case["batch"], "gradient_checkpointing": case["gc"],
               "lora_dropout": 0.05, "dtype": case.get("dtype", "float32"), "optim": "adamw_torch",
               "chunked_loss": case.get("chunked", True),
               **LORA.get(case["technique"], {})}
    quantizer = "nf4" if case["technique"] == "qlora" else None
    return estimate_for_options(config, case["technique"], quantizer, options, case["seq"], device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="the smallest size only")
    parser.add_argument("--extra", action="store_true", help="also a 250M-parameter model (adds ~3 minutes on CPU)")
    parser.add_argument("--only", help="run the cases whose name or technique contains this")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--plain-loss", action="store_true",
                        help="the loss from the full logits instead of the SDK's chunked cross-entropy")
    parser.add_argument("--check", action="store_true", help="exit 1 when an estimate is off by more than 25%%")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.device == "cuda":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("bitsandbytes is not installed: skipping the qlora cases", file=sys.stderr)
            global TECHNIQUES
            TECHNIQUES = ("lora", "full")
    baseline = run_case(dict(name="framework", technique="lora", batch=1, seq=16, gc=False,
                             config=dict(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=128, vocab=256)),
                        args.device, args.steps, Path(tempfile.gettempdir()))
    base_peak = baseline["peak_gpu"] if args.device == "cuda" else baseline["peak_rss"]
    print(f"framework baseline (1-layer hidden-64 model, 16 tokens): {base_peak / 2**20:,.0f} MiB", flush=True)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    selected = [c for c in cases(args.quick, args.extra, args.device)
                if not args.only or args.only in f"{c['name']} {c['technique']}"]
    selected = [{**c, "chunked": not args.plain_loss} for c in selected if c["technique"] in TECHNIQUES]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for case in selected:
            work = Path(tmp) / case["name"]
            if case["technique"] == "qlora" and "folder" not in case and not work.exists():
                save_random_model(case, work)
            try:
                measured = run_case(case, args.device, args.steps, work)
            except RuntimeError as exc:  # one broken case (say, out of memory) doesn't lose the others
                print(str(exc)[-1500:], file=sys.stderr, flush=True)
                failed.append(f"{case['name']} {case['technique']}")
                continue
            est = estimate(case, args.device)
            peak = measured["peak_gpu"] if args.device == "cuda" else measured["peak_rss"]
            label = case["technique"] + (" +gc" if case["gc"] else "") + (" bf16" if case["dtype"] != "float32" else "")
            row = {"model": case["name"], "technique": label,
                   "tokens": f"{case['batch']}x{case['seq']}", "parameters": est.parameters,
                   "estimate_mib": est.total / 2**20, "measured_mib": peak / 2**20, "ratio": est.total / peak,
                   "step_s": min(measured["step_seconds"]), "estimate": est.as_dict(), "measured": measured}
            rows.append(row)
            print(f"{row['model']:<20} {row['technique']:<14} {row['tokens']:>7} est {row['estimate_mib']:>8,.0f} MiB"
                  f"  measured {row['measured_mib']:>8,.0f} MiB  ratio {row['ratio']:.3f}  "
                  f"({measured['seconds']:.0f} s)", flush=True)
    print_table(rows, args.device, time.perf_counter() - began, base_peak)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    if failed or (args.check and any(not 0.75 <= row["ratio"] <= 1.25 for row in rows)):
        sys.exit(1)


def print_table(rows: list[dict[str, Any]], device: str, seconds: float, baseline: int) -> None:
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    unit = "peak GPU (reserved + context)" if device == "cuda" else "peak RSS"
    print(f"\n{device}: {machine}; measured = {unit}; framework baseline {baseline / 2**20:,.0f} MiB; "
          f"{seconds:.0f} s in all\n")
    print("| model | params | technique | batch x seq | estimate MiB | measured MiB | ratio |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['technique']} | {r['tokens']} | "
              f"{r['estimate_mib']:,.0f} | {r['measured_mib']:,.0f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
