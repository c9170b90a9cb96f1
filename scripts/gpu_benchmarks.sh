#!/usr/bin/env bash
# The benchmark suite on a CUDA machine with SmolLM2-135M's architecture in bf16 (run through the device tool;
# wheels for bitsandbytes, peft and transformers travel in .whl/). Output: $OUT/gpu.log.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
python3 - <<'PY'
from pathlib import Path
from transformers import BertConfig, BertModel
from finetune_sdk.testing.tiny import tiny_tokenizer
folder = Path("/tmp/minilm-architecture")
BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)).save_pretrained(folder)
tiny_tokenizer().save_pretrained(folder)
PY
timeout 150 python3 benchmarks/bench_packing.py --model smollm2 --bf16 --no-trl --masks --rows 512
timeout 80 python3 benchmarks/bench_classifier.py --model /tmp/minilm-architecture --rows 2048 --epochs 5
timeout 120 python3 benchmarks/bench_peak_memory.py --bf16 --steps 4 --seq 512 --batch 8
timeout 100 python3 benchmarks/bench_lora_vs_hf.py --model smollm2 --bf16 --rounds 3 --rows 512
