"""glibc's mmap threshold is fixed for CPU training when memory is tight: freed activations leave no heap holes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune_sdk.errors import ConfigError
from finetune_sdk.speed.heap import DEFAULT_MMAP_THRESHOLD, mmap_threshold

PEAK_AFTER_CHURN = r"""
import os, sys
if sys.argv[1] == "fixed":
    from finetune_sdk.speed.heap import limit_heap_fragmentation
    assert limit_heap_fragmentation()
import torch
first = torch.ones(8_000_000)  # a 32 MB block, then freed: glibc's default raises its threshold to 32 MB
del first
pinned = []
for step in range(40):  # activations of growing sizes, each followed by a small tensor that outlives it
    big = torch.ones(2_000_000 + 100_000 * step)  # 8-24 MB, written so its pages are resident
    pinned.append(torch.ones(1000))
    del big
# VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak RSS into a forked child's ru_maxrss
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def test_threshold_from_the_environment():
    assert mmap_threshold({}) == DEFAULT_MMAP_THRESHOLD
    assert mmap_threshold({"FINETUNE_SDK_MMAP_THRESHOLD": "1048576"}) == 1048576
    assert mmap_threshold({"FINETUNE_SDK_MMAP_THRESHOLD": "0"}) is None
    with pytest.raises(ConfigError, match="FINETUNE_SDK_MMAP_THRESHOLD='lots' is not a number of bytes"):
        mmap_threshold({"FINETUNE_SDK_MMAP_THRESHOLD": "lots"})


def test_the_fixed_threshold_only_when_memory_is_tight():
    """Room to spare keeps glibc's faster heap; a tight fit or an unknown estimate fixes the threshold; the
    environment variable decides whatever the estimate."""
    gib = 2**30
    assert mmap_threshold({}, estimated_bytes=4 * gib, available_bytes=20 * gib) is None  # 6.8 <= 16
    assert mmap_threshold({}, estimated_bytes=10 * gib, available_bytes=20 * gib) == DEFAULT_MMAP_THRESHOLD  # 17 > 16
    assert mmap_threshold({}, estimated_bytes=None, available_bytes=20 * gib) == DEFAULT_MMAP_THRESHOLD
    assert mmap_threshold({}, estimated_bytes=4 * gib, available_bytes=None) == DEFAULT_MMAP_THRESHOLD
    env = {"FINETUNE_SDK_MMAP_THRESHOLD": "8388608"}
    assert mmap_threshold(env, estimated_bytes=gib, available_bytes=20 * gib) == 8388608
    assert mmap_threshold({"FINETUNE_SDK_MMAP_THRESHOLD": "0"}, estimated_bytes=10 * gib, available_bytes=gib) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_fixed_threshold_lowers_the_peak_of_alternating_tensors():
    def peak(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK_AFTER_CHURN, mode], capture_output=True, text=True,
                             env={"FINETUNE_SDK_MMAP_THRESHOLD": "", "PATH": "", "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    default, fixed = peak("default"), peak("fixed")
    # about 650 MB of heap holes with the default threshold
    assert default - fixed > 300_000, f"peak RSS {default} KiB with glibc default, {fixed} KiB fixed"


def test_cpu_training_asks_with_its_memory_estimate(tiny_models, tmp_path, qa_rows, monkeypatch):
    from finetune_sdk import Trainer
    from finetune_sdk.training import engine as run_engine

    calls = []
    monkeypatch.setattr(run_engine, "limit_heap_fragmentation", lambda estimated: calls.append(estimated) or True)
    Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "a", max_steps=1,
            progress=False).fit(qa_rows)
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "b", max_steps=1,
                      progress=False)
    trainer.evaluate(qa_rows)  # the model is loaded before fit: the run still gets its estimate
    trainer.fit(qa_rows)
    assert len(calls) == 2 and all(isinstance(c, int) and 0 < c < 2**30 for c in calls), calls  # tiny estimates
    Trainer(tiny_models("llama"), technique="qlora", formatter="chatml", output_dir=tmp_path / "c", max_steps=1,
            progress=False).fit(qa_rows)
    assert calls[2] is None  # a quantized base keeps the fixed threshold (docs/speed.md)


def test_a_loaded_model_that_looks_too_big_gets_no_estimate_instead_of_an_error(monkeypatch):
    from finetune_sdk.advice import advisor

    def too_big(*args, **kwargs):
        raise ConfigError("training needs about 99 GiB")

    monkeypatch.setattr(advisor, "preflight", too_big)
    args = ("model", "lora", None, {"max_length": 16}, [{"input_ids": [1, 2, 3]}])
    with pytest.raises(ConfigError, match="99 GiB"):
        advisor.check_run_memory(*args)  # before the model loads: refused
    assert advisor.check_run_memory(*args, refuse=False) is None  # already loaded: no estimate, no error
