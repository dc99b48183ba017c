"""Thread policy: every task runs with a known number of CPU threads and records it.

PyTorch starts one OpenMP thread per core. On a machine that is also doing other work those
threads spin against each other (a LeNet base model took 143 s instead of 5.5 s with two
threads on a busy 2-core machine), and the thread count changes the numbers: reductions are
split differently, so the same recipe gives other weights with 1 and with 2 threads. So each
task sets its own count, 1 unless ``--threads-per-task`` says otherwise, for PyTorch and for the
BLAS and OpenMP libraries behind numpy, scipy and scikit-learn (the MIA attacks); its
``metrics.json`` and the sidecars it writes record the count and the device. The same command
then gives the same numbers on any CPU machine.

A cached base model or oracle is used whatever thread count or device made it (cache names do
not change); a run records what made them, from their sidecars (``execution.base``/``oracle``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from core.errors import UserError
from training.precision import amp_name

DEFAULT_THREADS = 1
# read by OpenMP, MKL, OpenBLAS and friends when they start: set for worker processes, which
# inherit them before any library loads
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; a container's or a SLURM job's
    share, not the whole machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def check_threads(threads: int, flag: str = "--threads-per-task") -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"{flag} {threads!r} is invalid; use a positive integer (default 1)")
    return threads


def thread_env(threads: int) -> dict[str, str]:
    """The environment that starts every numeric library of a new process with `threads`."""
    return dict.fromkeys(THREAD_VARIABLES, str(threads))


def apply_threads(threads: int) -> None:
    """Run this process's tasks with `threads` CPU threads: PyTorch's intra-op pool, and the
    OpenMP and BLAS pools already loaded (numpy, scipy, scikit-learn); libraries loaded later
    read the environment."""
    check_threads(threads)
    os.environ.update(thread_env(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def execution_record(device: torch.device | str) -> dict[str, Any]:
    """How this process computes: device, CPU threads, mixed precision (None: float32)."""
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "amp": amp_name(device),
    }


def made_with(meta: dict[str, Any]) -> dict[str, Any]:
    """What made a checkpoint, from its sidecar (None where an older sidecar did not record it)."""
    return {k: meta.get(k) for k in ("device", "threads", "amp")}


__all__ = [
    "DEFAULT_THREADS",
    "THREAD_VARIABLES",
    "apply_threads",
    "check_threads",
    "execution_record",
    "made_with",
    "thread_env",
    "usable_cores",
]
