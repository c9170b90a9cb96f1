"""CPU threads: sleeping OpenMP waits by default, one thread per physical core shared among local processes."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from finetune_sdk.speed import cpu_threads


def _wait_policy(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         capture_output=True, text=True, check=True, env={**clean, **env})
    return out.stdout.strip().splitlines()[-1]


def test_importing_the_sdk_first_makes_openmp_waits_sleep():
    assert _wait_policy("import finetune_sdk") == "PASSIVE"
    loaded = subprocess.run([sys.executable, "-c", "import finetune_sdk, sys; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"  # setting the policy does not load torch


def test_a_policy_the_user_set_or_an_already_loaded_torch_is_left_alone():
    assert _wait_policy("import finetune_sdk", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _wait_policy("import torch, finetune_sdk") == "None"  # too late for OpenMP: the SDK does not pretend


def test_threads_are_physical_cores_shared_among_local_processes(monkeypatch):
    assert cpu_threads.threads_per_process(physical=8, local_processes=1) == 8
    assert cpu_threads.threads_per_process(physical=8, local_processes=3) == 2
    assert cpu_threads.threads_per_process(physical=2, local_processes=4) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads.threads_per_process(physical=4) == 2
    assert 1 <= cpu_threads.physical_cores() <= (os.cpu_count() or 1)


def test_training_sets_torch_threads_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cpu_threads, "physical_cores", lambda: 1)
        assert cpu_threads.set_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(2)
        assert cpu_threads.set_cpu_threads() == 2 and torch.get_num_threads() == 2  # the user's choice stands
    finally:
        torch.set_num_threads(before)
