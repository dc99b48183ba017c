"""A sweep on one machine: its tasks on a pool of worker processes (``main.py --workers N``).

Each worker is a fresh Python process (``concurrent.futures.ProcessPoolExecutor`` with the
spawn start method), pinned before CUDA starts in it: to one GPU (``CUDA_VISIBLE_DEVICES``;
``--gpus 0,1,2,3``, ``--tasks-per-gpu K`` workers per GPU for small models), and on CPU to
``--threads-per-task`` threads (PyTorch, OpenMP and BLAS). A worker receives plain values, the
sweep's arguments (a JSON string, :meth:`Runner.arguments`) and a task key, and rebuilds what
it needs: the first task a worker does loads the data, and it keeps data and models for the
tasks that follow. On CPU the process that started the sweep, which has imported everything
and loaded the data already, does the first ready task itself (a fresh sweep's base model)
while the workers start. A task starts when the tasks it depends on are finished (a run when
its base model and oracle exist); the graph holds each cache entry once and the locks of
core/locks.py keep other processes from building it again.

Every backend gives the same numbers and weights as one process doing the tasks in order (same
device type, same threads per task): a task depends on its inputs only, never on what its
process did before.

``--workers auto``: on CUDA one worker per GPU (times ``--tasks-per-gpu``); on CPU
floor(usable cores / threads per task) workers, the usable cores being the CPU affinity of this
process (``os.sched_getaffinity``). Never more workers than the widest layer of the graph has
tasks to do; one worker means no pool: the tasks run in this process.

Lines a worker prints (training headers, ``-v`` epoch lines, warnings) are sent to this process,
which prints them above the progress bar.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from core.progress import say, show_inner_bars
from running.graph import (
    HELD,
    WORKER_KINDS,
    Execute,
    Graph,
    Progress,
    Task,
    expand,
    run_in_order,
)
from running.runner import Backend, Runner
from running.threads import DEFAULT_THREADS, apply_threads, check_threads, thread_env, usable_cores


@dataclass(frozen=True)
class WorkerPlan:
    """How a sweep runs here: `workers` processes (1: in this process), each task with
    `threads` CPU threads; on CUDA, `gpus[i]` is the GPU of worker i."""

    workers: int
    threads: int = DEFAULT_THREADS
    gpus: tuple[int, ...] = ()
    device: str = "cpu"

    @property
    def pool(self) -> bool:
        return self.workers > 1

    def describe(self) -> str:
        where = self.device
        if self.gpus:
            where = f"GPUs {','.join(map(str, sorted(set(self.gpus))))}"
        who = f"{self.workers} workers" if self.pool else "1 process"
        return f"{who} x {self.threads} thread{'s' * (self.threads > 1)} on {where}"


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        gpus = []
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise UserError(
            f"--gpus {text!r} is invalid; use distinct GPU indices separated by commas, e.g. 0,1,2,3"
        )
    return gpus


def plan_workers(
    workers: str,
    device: torch.device,
    *,
    gpus: str | None = None,
    tasks_per_gpu: int = 1,
    threads: int = DEFAULT_THREADS,
    tasks: int | None = None,
) -> WorkerPlan:
    """The plan for ``--workers`` (an integer or ``auto``) and its companion flags; `tasks`,
    the number of tasks to do, caps the number of workers."""
    check_threads(threads)
    if workers == "auto":
        count = None
    else:
        try:
            count = int(workers)
        except ValueError:
            count = 0
        if count < 1:
            raise UserError(f"--workers {workers!r} is invalid; use a positive integer or auto")
    if tasks_per_gpu < 1:
        raise UserError(f"--tasks-per-gpu {tasks_per_gpu} is invalid; use a positive integer")
    slots: list[int] = []
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        listed = parse_gpus(gpus) if gpus is not None else None
        if listed is None:
            listed = [device.index] if device.index is not None else list(range(visible))
        bad = [g for g in listed if g >= visible]
        if bad:
            raise UserError(f"--gpus: GPU {bad[0]} does not exist here (GPUs 0..{visible - 1})")
        # worker i on slots[i]: the GPUs in turn, K times over
        slots = [g for _ in range(tasks_per_gpu) for g in listed]
        count = count or len(slots)
        slots = [slots[i % len(slots)] for i in range(count)]
    else:
        if gpus is not None or tasks_per_gpu != 1:
            flag = "--gpus" if gpus is not None else "--tasks-per-gpu"
            raise UserError(f"{flag} needs --device cuda (this sweep runs on {device.type})")
        count = count or max(usable_cores() // threads, 1)
    if tasks is not None:
        count = max(min(count, tasks), 1)
        slots = slots[:count]
    if count == 1:  # in this process, on the device as given
        return WorkerPlan(1, threads, (), str(device))
    return WorkerPlan(count, threads, tuple(slots), device.type)


# ---------------------------------------------------------------------------------------------
# The worker side


_RUNNERS: dict[str, tuple[Runner, Graph]] = {}


def _runner(arguments: str) -> tuple[Runner, Graph]:
    """This process's runner and graph for a sweep, built on its first task and kept (with its
    data and models) for the ones that follow. ``@<file>`` reads the arguments from a file."""
    if arguments.startswith("@"):
        arguments = Path(arguments[1:]).read_text()
    if arguments not in _RUNNERS:
        runner = Runner.from_arguments(arguments)
        _RUNNERS.clear()  # one sweep per process at a time
        _RUNNERS[arguments] = (runner, expand(runner))
    return _RUNNERS[arguments]


def execute_task(out: str, key: str, arguments: str, wait: bool = True) -> tuple[str, str]:
    """Execute task `key` of the sweep in run folder `out` in this process; (status, line)."""
    runner, graph = _runner(arguments)
    if str(runner.opts.out) != out:
        raise ValueError(f"task {key}: the arguments are for {runner.opts.out}, not {out}")
    task = graph.tasks.get(key)
    if task is None:
        raise UserError(f"{out}: the sweep has no task {key!r}")
    return runner.execute(task, wait)


def _warm_up(arguments: str) -> None:
    """Start a worker: import everything, check the sweep, load its data (while the first
    tasks run elsewhere)."""
    _runner(arguments)


def run_task(out: str, key: str, arguments: str) -> str:
    """Execute one task of a sweep in a fresh (or reused) process: the entry point of every
    worker, local or on a cluster. `out` is the run folder, `key` a task key of
    :func:`running.graph.expand` (``base:...``, ``oracle:...``, ``run:...``, ``summary``) and
    `arguments` the sweep's :meth:`Runner.arguments`, or ``@<file>`` holding them (a cluster's
    job records stay short). Returns the line the task reports."""
    return execute_task(out, key, arguments, wait=True)[1]


class _Lines(io.TextIOBase):
    """A worker's stdout and stderr: each complete line goes to the parent process."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.buffer_text = ""

    def write(self, text: str) -> int:
        self.buffer_text += text
        *lines, self.buffer_text = self.buffer_text.split("\n")
        for line in lines:
            if line.strip():
                self.sink.put(line.rstrip("\r"))
        return len(text)

    def isatty(self) -> bool:
        return False


def _init_worker(slots: Any, lines: Any, threads: int) -> None:
    # Ctrl-C is for the parent, which stops the pool; a worker ends with it, however it ends
    # (its call queue closes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "setsid"):
        # its own session: Linux's autogroup scheduler shares the CPU between sessions, so in
        # the parent's session N workers would share one session's part of a busy machine
        os.setsid()
    if slots is not None:  # before anything starts CUDA in this process
        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA started in a worker before it was pinned to its GPU")
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get())
    sys.stdout = sys.stderr = _Lines(lines)
    show_inner_bars(False)
    apply_threads(threads)


# ---------------------------------------------------------------------------------------------
# The parent side


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started inside (worker processes, SLURM
    jobs: they inherit them before any library loads), and put them back afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _forward(lines: Any) -> None:
    while True:
        line = lines.get()
        if line is None:
            return
        say(line)


def run_pool(runner: Runner, graph: Graph, plan: WorkerPlan, progress: Progress) -> None:
    """Execute the graph's worker tasks on `plan.workers` processes, each task as soon as its
    dependencies are done; the first failure stops new tasks, lets the running ones finish
    and is raised. Ctrl-C stops the workers at once (a half-written run is redone on resume)."""
    ctx = multiprocessing.get_context("spawn")
    arguments = runner.arguments()
    if plan.gpus:  # a pinned worker sees its one GPU as cuda:0
        obj = json.loads(arguments)
        obj["options"]["device"] = "cuda"
        arguments = json.dumps(obj)
    out = str(runner.opts.out)
    lines = ctx.Queue()
    slots = None
    if plan.gpus:
        slots = ctx.Queue()
        for g in plan.gpus:
            slots.put(g)
    printer = threading.Thread(target=_forward, args=(lines,), daemon=True)
    printer.start()
    env = thread_env(plan.threads)
    pool = None
    try:
        with environment(env):
            pool = ProcessPoolExecutor(
                plan.workers, mp_context=ctx, initializer=_init_worker,
                initargs=(slots, lines, plan.threads),
            )  # fmt: skip
            # on CPU this process, ready since it checked the sweep, does the first task while
            # the workers start; a pinned GPU worker must do its own
            local = None if plan.gpus else runner.execute
            _schedule(pool, graph, out, arguments, plan.workers, progress, local)
    except BaseException:
        if pool is not None:
            _stop(pool)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        lines.put(None)
        printer.join(timeout=10)
        with contextlib.suppress(Exception):
            lines.close()


def _schedule(
    pool: Executor,
    graph: Graph,
    out: str,
    arguments: str,
    width: int,
    progress: Progress,
    local: Execute | None = None,
) -> None:
    finished = set(graph.done)
    taken: set[str] = set()
    held: list[Task] = []
    running: dict[Future[tuple[str, str]], Task] = {}
    error: BaseException | None = None

    def submit(task: Task, wait_for_lock: bool) -> None:
        taken.add(task.key)
        running[pool.submit(execute_task, out, task.key, arguments, wait_for_lock)] = task

    def finish(task: Task, status: str, line: str) -> None:
        if status == HELD:
            held.append(task)
        else:
            finished.add(task.key)
            progress.finished(task, line)

    # every worker starts now (the pool starts them one per waiting call), and loads the data
    # while the first tasks run; a failure here fails the first task again, with its message
    for _ in range(width):
        pool.submit(_warm_up, arguments)
    if local is not None:
        # a worker needs seconds to import and load the data; this process has done both, so
        # it does the first ready task (a fresh sweep's base model, which every other task
        # waits for) meanwhile, with the same threads per task: the same numbers. The tasks
        # ready besides it go to the pool first.
        ready = graph.ready(finished, taken)
        if ready:
            taken.add(ready[0].key)
            for task in ready[1 : width + 1]:
                submit(task, False)
            try:
                finish(ready[0], *local(ready[0], False))
            except Exception as e:  # as a worker's failure: raised once the others end
                error = e
    while True:
        if error is None:
            for task in graph.ready(finished, taken)[: max(width - len(running), 0)]:
                submit(task, False)
            # runs another process holds: once nothing else is ready, wait for them
            while held and len(running) < width and not graph.ready(finished, taken):
                submit(held.pop(0), True)
        if not running:
            break
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            task = running.pop(future)
            try:
                status, line = future.result()
            except BaseException as e:  # the task's own error, raised once the others end
                error = error or e
                continue
            finish(task, status, line)
    if error is not None:
        raise error
    left = [t.key for t in graph.todo() if t.key not in finished]
    if left:  # cannot happen with a valid graph; say so rather than stop silently
        raise RuntimeError(f"tasks never became ready: {', '.join(left[:3])}")


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (their locks go with them; a half-written output is redone)."""
    processes = list(getattr(pool, "_processes", {}).values())
    for p in processes:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(timeout=10)


def backend(plan: WorkerPlan) -> Backend:
    """The :meth:`Runner.run_all` backend of a plan: the tasks in this process, or on a pool
    of at most as many workers as the widest layer has tasks to do (a chain of tasks, such as
    one run that needs its oracle, runs in this process)."""

    def run(runner: Runner, graph: Graph, progress: Progress) -> None:
        todo = graph.todo()
        if not todo:
            return
        widest = max(sum(t.kind == kind for t in todo) for kind in WORKER_KINDS)
        n = min(plan.workers, widest)
        here = replace(plan, workers=n, gpus=plan.gpus[:n]) if n > 1 else replace(
            plan, workers=1, gpus=(), device=str(runner.opts.device))  # fmt: skip
        counts = ", ".join(f"{sum(t.kind == kind for t in todo)} {kind}" for kind in WORKER_KINDS
                           if any(t.kind == kind for t in todo))  # fmt: skip
        progress.line(f"{len(todo)} tasks to do ({counts}) with {here.describe()}")
        if here.pool:
            run_pool(runner, graph, here, progress)
        else:
            run_in_order(graph, runner.execute, progress)

    return run


__all__ = [
    "WorkerPlan",
    "backend",
    "execute_task",
    "parse_gpus",
    "plan_workers",
    "run_pool",
    "run_task",
]
