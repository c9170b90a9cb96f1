#!/usr/bin/env bash
# The main job: QLoRA-tune SmolLM2-135M-Instruct on the Quillfeather dataset and compare base vs fine-tuned answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/quillfeather.py "$@"
