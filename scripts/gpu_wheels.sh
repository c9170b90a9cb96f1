#!/usr/bin/env bash
# Downloads (here, where pip reaches the index) the wheels scripts/gpu_benchmarks.sh installs on the device machine
# (Python 3.12, x86-64, no network there) into .whl/ (ignored by git; pass carry=[".whl"] to the device tool).
# Versions as installed here (docs: /work/shared/ENV_FACTS.md); keep one version of each.
set -eu
echo /.whl/ >> .git/info/exclude 2>/dev/null || true
mkdir -p .whl
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for spec in transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
            bitsandbytes==0.50.2 liger-kernel==0.8.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .whl "$spec" || echo "no wheel for $spec: its configurations will be skipped there"
done
du -sh .whl
