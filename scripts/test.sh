#!/usr/bin/env bash
# The test suite, offline. Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
#
# Tests run in parallel with pytest-xdist: one worker per CPU core (FINETUNE_TEST_WORKERS overrides; 0 runs them
# in this process), each test file on one worker (--dist loadfile: a file's module fixtures are built once) in the
# order tests/conftest.py gives (the longest files first; --no-loadscope-reorder keeps xdist from reordering), one
# torch thread per worker (OMP_NUM_THREADS=1, inherited by the processes tests start; tests of the thread choice
# set their own). On the 2-core build machine this halves the suite's time (docs/benchmarks.md, "The test suite").
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workers="${FINETUNE_TEST_WORKERS:-auto}"
parallel=()
if [ "$workers" != 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
.venv/bin/python -m pytest "${parallel[@]}" --durations=30 "$@"  # the 30 slowest tests, for the suite's time budget
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
