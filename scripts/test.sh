#!/usr/bin/env bash
# The test suite, offline. Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest --durations=30 "$@"  # the 30 slowest tests, for the suite's time budget
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
