"""The task graph of a sweep: an experiment list x seeds as base models, retrain oracles,
unlearning runs, the summary and (with ``--report``) the report.

    base (one per distinct base checkpoint) -> oracle (one per distinct base model and forget
    set) -> run (one per experiment and seed) -> summary -> report

An oracle of a supervised recipe does not wait for its base model (it is trained from scratch
with the same recipe, so both train at once); one whose base is a checkpoint file or a
self-supervised recipe does (``Runner.oracle_needs_base``).

Every task is a function of its inputs whose output has a content-addressed name: a base
model's cache name is a hash of its resolved recipe (training/recipe.py), an oracle's names its
base model and the sha256 of its forget set, a run's folder its experiment and seed. Outputs are
written atomically, and a task whose output is present and verifies is not run again
(:meth:`running.runner.Runner.task_done`). Tasks shared by several experiments appear once, so a
cache entry is built once however many runs need it; across processes the lock of each cache
entry and run folder (core/locks.py) does the same.

A base task also computes the model's outputs on the whole pool and test set
(``outputs/<stem>.safetensors``), an oracle task its own, so the runs only read them.

An experiment with ``"evaluate"`` adds its many-model evaluation (running/many_models.py):

    base -> model-oracle (N oracles, training seeds s..s+N-1) \
    base -> model-run (N unlearned models, seeds s..s+N-1)     -> epsilon -> summary
    base -> shadow-base (K half-pool models) -> shadow (K runs) + epsilon -> ulira -> summary

Tasks carry plain values (keys, paths, indices), never models: a worker process executes one
from the sweep's arguments and the task key alone (:func:`running.workers.run_task`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from core.progress import say

if TYPE_CHECKING:
    from running.runner import Runner

BASE, ORACLE, RUN, SUMMARY, REPORT = "base", "oracle", "run", "summary", "report"
# the many-model evaluation of an experiment with "evaluate" (running/many_models.py): oracles
# with other training seeds, unlearned models with other seeds, the epsilon score; U-LiRA's
# shadow base models, their unlearning runs, the attack
MODEL_ORACLE, MODEL_RUN, EPSILON = "model-oracle", "model-run", "epsilon"
SHADOW_BASE, SHADOW, ULIRA = "shadow-base", "shadow", "ulira"
KINDS = (BASE, ORACLE, MODEL_ORACLE, SHADOW_BASE, RUN, MODEL_RUN, SHADOW, EPSILON, ULIRA,
         SUMMARY, REPORT)  # fmt: skip
# what worker processes execute; the summary and the report are written by the process that
# started the sweep, from the run folders
WORKER_KINDS = (BASE, ORACLE, MODEL_ORACLE, SHADOW_BASE, RUN, MODEL_RUN, SHADOW, EPSILON, ULIRA)
# tasks whose output is a result; the others are inputs, needed only by unfinished results
RESULT_KINDS = (RUN, EPSILON, ULIRA)

# what :meth:`Runner.execute` reports about a task
DONE, SKIPPED, HELD = "done", "skipped", "held"


@dataclass(frozen=True)
class Task:
    """One node: `key` names it (``base:<checkpoint path>``, ``oracle:<checkpoint path>``,
    without ``.safetensors``; ``run:<experiment folder>/seed<N>``, ``summary``, ``report``);
    `path` is what it makes
    (a checkpoint path, a run folder, the summary file); `job` is the index of the first
    experiment that needs it and `k` the seed offset (seed = ``--seed`` + k)."""

    key: str
    kind: str
    path: str
    deps: tuple[str, ...] = ()
    job: int = -1
    k: int = -1


@dataclass
class Graph:
    """Tasks in an order that respects every dependency: layer by layer (base, oracle, run,
    summary, report), and within a layer by experiment, then seed."""

    tasks: dict[str, Task]
    done: set[str] = field(default_factory=set)  # found finished (see :meth:`check`)

    def layer(self, kind: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.kind == kind]

    def layers(self, kinds: Iterable[str] = KINDS) -> list[list[Task]]:
        """The non-empty layers of `kinds`, in order: one SLURM array each."""
        return [layer for kind in kinds if (layer := self.layer(kind))]

    def check(self, is_done: Callable[[Task], bool]) -> None:
        """Mark the worker tasks already finished; an input (a base model, an oracle, ...)
        that no unfinished result (run, epsilon, U-LiRA) needs is left alone (counted done),
        whatever state its cache entry is in."""
        results = [t for t in self.tasks.values() if t.kind in RESULT_KINDS]
        self.done = {t.key for t in results if is_done(t)}
        needed: set[str] = set()
        todo = [d for t in results if t.key not in self.done for d in t.deps]
        while todo:  # every input an unfinished result needs, directly or through another
            key = todo.pop()
            if key not in needed and key in self.tasks:
                needed.add(key)
                todo.extend(self.tasks[key].deps)
        for t in self.tasks.values():
            if t.kind in WORKER_KINDS and t.kind not in RESULT_KINDS:
                if t.key not in needed or is_done(t):
                    self.done.add(t.key)

    def todo(self, kinds: Iterable[str] = WORKER_KINDS) -> list[Task]:
        """The tasks of `kinds` still to do, in order."""
        wanted = set(kinds)
        return [t for t in self.tasks.values() if t.kind in wanted and t.key not in self.done]

    def ready(
        self, finished: set[str], taken: set[str], kinds: Iterable[str] = WORKER_KINDS
    ) -> list[Task]:
        """Tasks still to do whose dependencies are all `finished`, and not `taken` yet."""
        return [
            t
            for t in self.todo(kinds)
            if t.key not in finished and t.key not in taken and all(d in finished for d in t.deps)
        ]


def expand(runner: Runner, *, report: bool = False) -> Graph:
    """The graph of a resolved runner (:meth:`Runner.resolve`): every experiment x seed.

    Nothing is trained or read from the cache here; the oracle of a run is named from its
    split, which depends on the data, the split settings and the seed only.
    """
    opts = runner.opts
    layers: dict[str, dict[str, Task]] = {kind: {} for kind in KINDS}
    for job in runner.jobs:
        base = runner.base_key(job)
        layers[BASE].setdefault(base, Task(base, BASE, str(job.base_path), (), job.index))
        raw = runner.raw(job.dataset, job.dataset_args)
        for k in range(opts.nexp):
            spec, split = runner.split_for(job, raw, opts.base_seed + k)
            path = runner.oracle_path(job, spec, split)
            oracle = f"{ORACLE}:{path}"
            needs = (base,) if runner.oracle_needs_base(job) else ()
            layers[ORACLE].setdefault(oracle, Task(oracle, ORACLE, str(path), needs, job.index, k))
            d = runner.run_dir(job, k)
            key = f"{RUN}:{job.folder}/{d.name}"
            layers[RUN][key] = Task(key, RUN, str(d), (base, oracle), job.index, k)
        for task in runner.evaluation_tasks(job):  # "evaluate": many models, U-LiRA
            layers[task.kind].setdefault(task.key, task)
    runs = tuple(layers[RUN]) + tuple(layers[EPSILON]) + tuple(layers[ULIRA])
    layers[SUMMARY][SUMMARY] = Task(SUMMARY, SUMMARY, str(opts.out / "summary.csv"), runs)
    if report:
        layers[REPORT][REPORT] = Task(REPORT, REPORT, str(opts.out / "report.md"), (SUMMARY,))
    return Graph({key: t for kind in KINDS for key, t in layers[kind].items()})


Execute = Callable[[Task, bool], tuple[str, str]]


def run_in_order(graph: Graph, execute: Execute, progress: Progress) -> None:
    """Execute the worker tasks still to do, one after the other, in this process.

    `execute(task, wait)` returns (status, line). A run another process holds (status
    ``held``) is left for the end and then waited for, so two processes sharing a run folder
    each take the free runs first.
    """
    held = []
    for task in graph.todo():
        status, line = execute(task, False)
        if status == HELD:
            held.append(task)
        else:
            progress.finished(task, line)
    for task in held:
        progress.finished(task, execute(task, True)[1])


class Progress:
    """A sweep's output: one progress bar over its tasks (done / total, rate, time left) and
    the line each finished task reports, printed above the bar."""

    def __init__(self, graph: Graph, quiet: bool, desc: str = "sweep") -> None:
        tasks = [t for t in graph.tasks.values() if t.kind in WORKER_KINDS]
        done = sum(t.key in graph.done for t in tasks)
        self.quiet = quiet
        self.finished_tasks: list[str] = []  # in the order they finished
        self.bar = tqdm(
            total=len(tasks), initial=done, desc=desc, unit="task", disable=True if quiet else None,
            dynamic_ncols=True, smoothing=0.1,
        )  # fmt: skip

    def line(self, text: str) -> None:
        if text and not self.quiet:
            say(text)

    def finished(self, task: Task, line: str) -> None:
        self.finished_tasks.append(task.key)
        self.line(line)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


__all__ = [
    "BASE",
    "DONE",
    "EPSILON",
    "Execute",
    "HELD",
    "KINDS",
    "MODEL_ORACLE",
    "MODEL_RUN",
    "ORACLE",
    "RESULT_KINDS",
    "SHADOW",
    "SHADOW_BASE",
    "ULIRA",
    "REPORT",
    "RUN",
    "SKIPPED",
    "SUMMARY",
    "WORKER_KINDS",
    "Graph",
    "Progress",
    "Task",
    "expand",
    "run_in_order",
]
