"""CPU threads for training: one per physical core, shared among the processes of a node, and sleeping waits.

PyTorch's CPU wheels parallelise each operation with GNU OpenMP (libgomp). Between parallel regions its threads
spin-wait by default (``OMP_WAIT_POLICY`` unset: up to 300,000 spins before sleeping). On a machine where other
processes want the same cores, a spinning thread burns the time slice that the thread it waits for needs, and every
operation then waits for a descheduled thread: on 2 shared cores a LoRA step ran 5-7x slower than with sleeping
waits (docs/benchmarks.md). So:

* ``import finetune_sdk`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set or torch is already imported
  (libgomp reads it once, when torch loads; with torch imported first, set it in the shell).
* Training sets torch's intra-op threads to the physical cores this process may run on (``sched_getaffinity``;
  hyperthread siblings count once), divided among the training processes of the node (``LOCAL_WORLD_SIZE`` under
  torchrun), unless ``OMP_NUM_THREADS`` is set. Data loading stays in the main process (transformers'
  ``dataloader_num_workers=0``), so no worker threads compete with it.

Example:
    >>> threads_per_process(physical=8, local_processes=2)
    4
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

#: Environment variables that decide CPU threading; documented in docs/speed.md.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def prefer_passive_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when nobody chose a policy and OpenMP is not loaded yet; True if set."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (each hyperthread sibling group counts once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def threads_per_process(physical: int | None = None, local_processes: int | None = None) -> int:
    """Intra-op threads for one training process: physical cores / training processes on this node, at least 1."""
    physical = physical if physical is not None else physical_cores()
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, physical // max(1, local_processes))


def set_cpu_threads(logger: logging.Logger | None = None) -> int:
    """Set torch's intra-op threads for training (see the module doc); returns the number in use."""
    import torch

    logger = logger or logging.getLogger("finetune_sdk")
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user chose; torch already follows it
    threads = threads_per_process()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("CPU threads: %d (physical cores / training processes on this node; OMP_NUM_THREADS overrides)",
                    threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and "OMP_WAIT_POLICY" not in os.environ:
        logger.debug("OpenMP threads spin while waiting (torch was imported before finetune_sdk); if other processes "
                     "share these cores, set OMP_WAIT_POLICY=PASSIVE before starting Python")
    return threads
