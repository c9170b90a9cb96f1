#!/usr/bin/env bash
# The SDK vs TRL's SFTTrainer (with and without Liger kernels) on one CUDA GPU, LoRA and QLoRA on a ~0.5B
# Llama-architecture model with random weights (benchmarks/bench_gpu_trl.py): tokens/s and peak memory per
# configuration, in under 8 minutes on an H100/H200. Run it through the device tool from the repository root:
#   run(command="bash scripts/gpu_benchmarks.sh", carry=[".whl"], timeout_s=540)
# The device machine has no network and no pip index: python3 there holds torch, transformers, peft, accelerate
# and pyarrow (docs: /work/.library/device/KINDS.md); what else is needed travels as wheels in .whl/
# (scripts/gpu_wheels.sh downloads them here): trl, datasets (+ dill, multiprocess), bitsandbytes,
# liger-kernel. A configuration whose package is missing is reported as skipped, not fatal.
# ALL=1 also runs the older suite (packing, classifier, peak memory, SDK vs hand-written HF).
# Output: $OUT/gpu.log.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    || echo "some wheels did not install; the configurations that need them will be skipped"
fi
# the SDK itself, without its dependencies (the machine's torch/transformers/peft are used)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . \
  || { echo "could not install the SDK from this folder"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L || true
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger_kernel"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "missing:", type(exc).__name__, exc)
PY
timeout 420 python3 benchmarks/bench_gpu_trl.py --steps 30 --rows 320 --timeout 65
if [ "${ALL:-0}" = 1 ]; then
  timeout 150 python3 benchmarks/bench_packing.py --model smollm2 --bf16 --no-trl --masks --rows 512
  timeout 120 python3 benchmarks/bench_peak_memory.py --bf16 --steps 4 --seq 512 --batch 8
  timeout 100 python3 benchmarks/bench_lora_vs_hf.py --model smollm2 --bf16 --rounds 3 --rows 512
fi
echo "gpu_benchmarks.sh: $(( $(date +%s) - start )) s"
