"""Honest cost: the work a training or unlearning run did, counted rather than timed (issue 12).

SalUn's run-time efficiency divides wall times, and a wall time measures the machine as much as
the method: the same class-7 ``rl_split`` run was 0.02 of its oracle on a quiet machine and
0.54 on a busy one. So every loop also counts what it computed:

* ``backward_samples``: samples through a forward pass that built an autograd graph, i.e. a
  forward and a backward pass per sample (a training step's work; also an input-gradient pass
  such as boundary shrink's attack, or the saliency pass of a SalUn mask);
* ``forward_samples``: samples through a forward pass without a graph (a teacher's outputs,
  a validation pass, scores computed under ``torch.no_grad``);
* ``steps``: optimiser steps;

plus ``wall_seconds`` and ``cpu_seconds`` (``time.process_time``: every thread of this process).
The sample counts depend on the code and the data only, never on the machine or its load.

How: while a :func:`count_work` block is open, process-wide hooks watch every module call and
every ``Optimizer.step``. Only the outermost module call of a nested tree counts (a model's
layers are not counted again), with the first dimension of its first tensor argument as the
number of samples; the hooks are installed when the first block opens and removed when the
last one closes, so code outside pays nothing. Blocks nest (the ``retrain`` method's training
counts in the unlearning run around it); :func:`not_counted` pauses every open block, its time
included (a run's per-epoch monitoring is bookkeeping, not work). Counting is per thread.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optimizer
from torch.utils.hooks import RemovableHandle

COUNTS = ("backward_samples", "forward_samples", "steps")


@dataclass
class Work:
    """What one block of code computed (see the module docstring)."""

    backward_samples: int = 0
    forward_samples: int = 0
    steps: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    # time spent in not_counted() blocks, taken off the elapsed time on exit
    _paused_wall: float = field(default=0.0, repr=False)
    _paused_cpu: float = field(default=0.0, repr=False)

    def to_json(self) -> dict[str, float | int]:
        d = asdict(self)
        return {k: v for k, v in d.items() if not k.startswith("_")}

    @classmethod
    def from_json(cls, obj: Any) -> Work | None:
        """The work a sidecar records, or None when it records none (made before counting)."""
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), int) for k in COUNTS):
            return None
        return cls(
            int(obj["backward_samples"]),
            int(obj["forward_samples"]),
            int(obj["steps"]),
            float(obj.get("wall_seconds") or 0.0),
            float(obj.get("cpu_seconds") or 0.0),
        )


class _State(threading.local):
    def __init__(self) -> None:
        self.open: list[Work] = []
        self.paused = 0
        self.depth = 0  # nesting of module calls in progress
        self.samples = 0  # samples of the outermost call in progress


_state = _State()
_lock = threading.Lock()
_handles: list[RemovableHandle] = []
_users = 0


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return int(a.shape[0]) if a.dim() > 0 else 1
    return 0


def _builds_graph(output: Any) -> bool:
    if isinstance(output, Tensor):
        return output.requires_grad
    if isinstance(output, (tuple, list)):
        return any(_builds_graph(o) for o in output)
    if isinstance(output, dict):
        return any(_builds_graph(o) for o in output.values())
    return False


def _active() -> bool:
    return bool(_state.open) and not _state.paused


def _pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if not _active():
        return
    _state.depth += 1
    if _state.depth == 1:
        _state.samples = _batch_size(args, kwargs)


def _post_hook(_m: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
    if _state.depth == 0:  # a call that began outside a counted block
        return
    _state.depth -= 1
    if _state.depth == 0 and _active():
        key = "backward_samples" if _builds_graph(output) else "forward_samples"
        for w in _state.open:
            setattr(w, key, getattr(w, key) + _state.samples)


def _step_hook(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    if _active():
        for w in _state.open:
            w.steps += 1


def _install() -> None:
    global _users
    with _lock:
        _users += 1
        if _users == 1:
            _handles.extend([
                _module.register_module_forward_pre_hook(_pre_hook_compat),
                _module.register_module_forward_hook(_post_hook, with_kwargs=True,
                                                     always_call=True),
                _optimizer.register_optimizer_step_post_hook(_step_hook),
            ])  # fmt: skip


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            for h in _handles:
                h.remove()
            _handles.clear()


def _pre_hook_compat(m: nn.Module, args: tuple[Any, ...]) -> None:
    # the global pre-hook has no with_kwargs option: a model called with keyword arguments
    # only counts as one sample-less call (none of this project's models is)
    _pre_hook(m, args, {})


@contextmanager
def count_work() -> Iterator[Work]:
    """Count the work done inside the block; the :class:`Work` is complete on exit."""
    work = Work()
    _install()
    _state.open.append(work)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield work
    finally:
        work.wall_seconds = time.perf_counter() - wall - work._paused_wall
        work.cpu_seconds = time.process_time() - cpu - work._paused_cpu
        _state.open.remove(work)
        _uninstall()


@contextmanager
def not_counted() -> Iterator[None]:
    """Pause every open :func:`count_work` block of this thread, its time included."""
    _state.paused += 1
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        _state.paused -= 1
        dw, dc = time.perf_counter() - wall, time.process_time() - cpu
        if not _state.paused:
            for w in _state.open:
                w._paused_wall += dw
                w._paused_cpu += dc


def machine(device: torch.device | str) -> dict[str, Any]:
    """Where work was done, for comparing wall times: host name, device and CPU threads."""
    return {"host": platform.node(), "device": str(device), "threads": torch.get_num_threads()}


def sidecar_cost(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's cost record from its sidecar: the counted work (absent from sidecars
    written before counting), the wall time ``train_seconds`` and where it ran."""
    rec: dict[str, Any] = dict(meta.get("cost") or {})
    rec["wall_seconds"] = meta.get("train_seconds")
    return rec | {k: meta.get(k) for k in ("host", "device", "threads")}


__all__ = ["COUNTS", "Work", "count_work", "machine", "not_counted", "sidecar_cost"]
