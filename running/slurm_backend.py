"""A sweep on a SLURM cluster (``main.py --launcher slurm``): one job array per layer of the
task graph (base models, oracles, runs, ...), through submitit (running/slurm.py).

For each layer in turn, the tasks whose output is missing or does not verify
(:meth:`Runner.task_done`, as on one machine) and that are not already in the queue become ONE
job array of :func:`running.workers.run_task` calls, whose arguments are plain strings: the run
folder, the task key and the sweep's :meth:`Runner.arguments` (never models). The array runs at
most ``--slurm-array-parallelism`` tasks at once; this process waits for it, verifies every
task's output, and goes on with the next layer. The summary (and the report) are written here at
the end, from the run folders.

A task that failed, was cancelled, preempted or timed out is reported in one line and left
undone: the same command with the same ``--out`` collects what finished, waits for what is still
queued (nothing is submitted twice) and submits the rest again. With ``--no-wait`` the first
layer that has work is submitted and the command returns (:class:`Submitted`).

Every task sets its own thread count in its job (``--threads-per-task``, as on one machine); the
jobs also start with the thread variables set, as SLURM passes the submitter's environment.
Sbatch scripts, logs and results live in ``<run folder>/slurm/``; the run folder and the
checkpoint folder must be on a filesystem the nodes share.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from submitit.core.utils import JobPaths

from core.errors import UserError
from core.userfiles import read_json
from running.graph import WORKER_KINDS, Graph, Progress, Task
from running.runner import Backend, Runner
from running.slurm import SlurmLauncher, SlurmSettings, TaskStatus
from running.threads import thread_env
from running.workers import environment, run_task


class Submitted(Exception):
    """``--no-wait``: a layer's tasks were submitted (or are still queued); nothing to wait
    for here. The message says what is in the queue."""


def job_arguments(runner: Runner, settings: SlurmSettings) -> str:
    """The sweep's arguments for a job: on a GPU node the job sees its GPU(s) from 0."""
    arguments = runner.arguments()
    if runner.opts.device.type == "cuda" or settings.gpus_per_task:
        obj = json.loads(arguments)
        obj["options"]["device"] = "cuda"
        arguments = json.dumps(obj)
    return arguments


def _problem(launcher: SlurmLauncher, task: Task, st: TaskStatus | None) -> str:
    """One line on a task that did not finish, with where its log is."""
    if st is None:
        return f"{task.key}: not submitted (an input it needs did not finish)"
    log = JobPaths(launcher.folder, job_id=st.job_id, task_id=0).stderr
    if st.state == "FAILED":
        last = (st.error or "").strip().splitlines()
        why = f": {last[-1]}" if last else ""
        return f"{task.key}: FAILED in SLURM job {st.job_id}{why} (log: {log})"
    if st.done:
        return (
            f"{task.key}: SLURM job {st.job_id} ended but its output does not verify (log: {log})"
        )
    return f"{task.key}: SLURM job {st.job_id} {st.state}" + (f" ({st.error})" if st.error else "")


class SlurmSweep:
    """The layers of one sweep's graph on SLURM, from this process."""

    def __init__(
        self, runner: Runner, graph: Graph, progress: Progress, settings: SlurmSettings
    ) -> None:
        self.runner, self.graph, self.progress = runner, graph, progress
        self.settings = settings
        self.launcher = SlurmLauncher(settings, runner.opts.out, job_name="unlearn")
        self.out = str(runner.opts.out)
        self.arguments = job_arguments(runner, settings)
        self.finished = set(graph.done)
        self.reported: set[str] = set()
        self.problems: list[str] = []

    def layers(self) -> list[list[Task]]:
        return [
            todo
            for layer in self.graph.layers(WORKER_KINDS)
            if (todo := [t for t in layer if t.key not in self.finished])
        ]

    def submit(self, layer: list[Task]) -> tuple[list[Task], int, int]:
        """Submit the layer's tasks that are neither queued nor blocked by an unfinished
        input; (the tasks to wait for, submitted, already queued)."""
        latest = self.launcher.latest()
        known = [t.key for t in layer if t.key in latest]
        statuses = self.launcher.statuses(known) if known else {}
        queued = [t for t in layer if t.key in statuses and statuses[t.key].queued]
        for t in layer:  # an earlier submission that ended without the task's output
            if t.key in statuses and not statuses[t.key].queued:
                self.progress.line(f"slurm: {_problem(self.launcher, t, statuses[t.key])}; again")
        free = [t for t in layer if t not in queued and all(d in self.finished for d in t.deps)]
        tasks = {t.key: (self.out, t.key, self.arguments) for t in free}
        if tasks:
            with environment(thread_env(self.runner.opts.threads)):
                self.launcher.submit(run_task, tasks, layer[0].kind)
        return queued + free, len(free), len(queued)

    def collect(self, statuses: dict[str, TaskStatus], tasks: dict[str, Task]) -> None:
        """Report every task of `statuses` that finished since the last call."""
        for key, st in statuses.items():
            if key in self.reported or st.queued or st.state == "UNKNOWN":
                continue
            if st.state == "LOST":  # wait() asks again a while: a result can show late
                continue
            task = tasks[key]
            self.reported.add(key)
            if st.done and self.runner.task_done(task):
                self.finished.add(key)
                self.progress.finished(task, str(self.launcher.returned(st) or ""))
            else:
                self.problems.append(_problem(self.launcher, task, st))
                self.progress.line(f"slurm: {self.problems[-1]}")

    def run(self, wait: bool, resume: str) -> None:
        for layer in self.layers():
            kind = layer[0].kind
            tasks, new, queued = self.submit(layer)
            if not tasks:
                continue
            where = f"{len(tasks)} {kind} task{'s' * (len(tasks) > 1)} on SLURM"
            what = ", ".join(x for x in (f"{new} submitted" * bool(new),
                                         f"{queued} already queued" * bool(queued)) if x)  # fmt: skip
            if not wait:
                raise Submitted(f"{where} ({what}; logs in {self.launcher.folder}); "
                                f"collect and resume with: {resume}")  # fmt: skip
            self.progress.line(f"{where} ({what}, at most "
                               f"{self.settings.array_parallelism} at once)")  # fmt: skip
            by_key = {t.key: t for t in tasks}
            final = self.launcher.wait(list(by_key), on_update=partial(self.collect, tasks=by_key))
            for key, st in final.items():  # LOST after the grace period
                if key not in self.reported:
                    self.reported.add(key)
                    self.problems.append(_problem(self.launcher, by_key[key], st))
                    self.progress.line(f"slurm: {self.problems[-1]}")
        blocked = [t for layer in self.layers() for t in layer if t.key not in self.reported]
        self.problems += [_problem(self.launcher, t, None) for t in blocked]
        if self.problems:
            raise UserError(
                f"{len(self.problems)} task{'s' * (len(self.problems) > 1)} did not finish "
                f"on SLURM (first: {self.problems[0]}); they are redone by: {resume}"
            )


def slurm_backend(settings: SlurmSettings, *, wait: bool = True, resume: str = "") -> Backend:
    """The :meth:`Runner.run_all` backend that runs the graph on SLURM, one array per layer.
    `resume` is the command that collects and resumes the sweep (for the messages)."""
    settings.check()

    def run(runner: Runner, graph: Graph, progress: Progress) -> None:
        todo = graph.todo()
        if not todo:
            return
        counts = ", ".join(f"{sum(t.kind == kind for t in todo)} {kind}" for kind in WORKER_KINDS
                           if any(t.kind == kind for t in todo))  # fmt: skip
        progress.line(f"{len(todo)} tasks to do ({counts}) on SLURM, "
                      f"{runner.opts.threads} thread{'s' * (runner.opts.threads > 1)} per task")  # fmt: skip
        SlurmSweep(runner, graph, progress, settings).run(wait, resume or _default_resume(runner))

    return run


def settings_from(
    config: Path | None, flags: dict[str, object], extra: list[str] | None
) -> SlurmSettings:
    """The settings of ``--launcher-config FILE`` (its ``launcher`` object), then the
    ``--slurm-*`` flags given (`flags`: setting -> value, None when not given) over them; an
    ``--slurm-extra`` KEY replaces the file's KEY."""
    values: dict[str, object] = {}
    where = ""
    if config is not None:
        where = f"--launcher-config {config}: launcher: "
        obj = read_json(config, "--launcher-config")
        if not isinstance(obj, dict) or not isinstance(obj.get("launcher"), dict):
            raise UserError(
                f"--launcher-config {config}: expected a JSON object with a 'launcher' object, "
                'e.g. {"launcher": {"partition": "gpu", "time": "2:00:00"}}'
            )
        values = dict(SlurmSettings.from_mapping(obj["launcher"], where).__dict__)
    values |= {k: v for k, v in flags.items() if v is not None}
    if extra:
        merged = {x.partition("=")[0].strip().lstrip("-"): x for x in values.get("extra", ())}  # type: ignore[attr-defined]
        merged |= {x.partition("=")[0].strip().lstrip("-"): x for x in extra}
        values["extra"] = tuple(merged.values())
    settings = SlurmSettings(**values)  # type: ignore[arg-type]
    settings.check()  # the file's values were checked above: a bad value here is a flag's
    return settings


def _default_resume(runner: Runner) -> str:
    return f"the same main.py command with --out {Path(runner.opts.out)}"


__all__ = ["SlurmSweep", "Submitted", "job_arguments", "settings_from", "slurm_backend"]
