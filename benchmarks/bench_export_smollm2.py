"""GGUF export of a real model at every quantization: file size, write time and tensor types per quantization.

SmolLM2-135M-Instruct (the GGUF that ``scripts/setup.sh`` installs offline, dequantized to float32 once through the
SDK's cache) is written by :func:`finetune_sdk.exporting.gguf_file.write_gguf` at each quantization in turn; every
file is written whole, as ``finetune export`` writes it, and timed alone (no work is shared between files). The
table is the one docs/export.md quotes. ``tests/test_export_smollm2.py`` keeps the checks on the real model
(q8_0, q4_k_m, q4_0 read back by transformers, the K-mix fallbacks for rows of 576, file sizes in order); the
correctness of every quantization type is tested on tiny models (tests/test_export_kquants.py).

    python benchmarks/bench_export_smollm2.py [--quantizations q8_0,q4_k_m]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                 "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantizations", default=",".join(QUANTIZATIONS),
                        help="comma-separated quantizations (default: all %(default)s)")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.models.gguf_import import converted_folder
    from finetune_sdk.training.run_events import describe_device
    from models import smollm2_gguf

    source = converted_folder(smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    print(f"SmolLM2-135M-Instruct, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"{describe_device()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| quantization | file size | write time | tensor types (count) |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        for quantization in args.quantizations.split(","):
            path = Path(folder) / f"smollm2-{quantization}.gguf"
            start = time.perf_counter()
            summary = write_gguf(model, tokenizer, path, quantization=quantization,
                                 chat_template=tokenizer.chat_template)
            seconds = time.perf_counter() - start
            types = ", ".join(f"{name} {count}" for name, count in
                              sorted(summary["tensor_types"].items(), key=lambda item: -item[1]))
            print(f"| `{quantization}` | {path.stat().st_size / 1e6:.1f} MB | {seconds:.1f} s | {types} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
