"""SLURM job arrays through submitit (https://github.com/facebookincubator/submitit).

A batch of tasks is a mapping key -> arguments (paths, strings, numbers: never models) for one
module-level function; it becomes one job array (``SlurmExecutor.map_array``) whose sbatch
scripts, logs and result pickles live in ``<run folder>/slurm/``. Every submission is appended
to ``slurm/jobs.json`` (function, arguments, job ids), so a later process can read the states,
collect the results, or resubmit the tasks that were cancelled, preempted, timed out or failed.

A task's state comes from its result pickle (COMPLETED, or FAILED with the traceback), else
from ``squeue`` while it waits or runs, else from ``scontrol show job`` and ``sacct`` (how it
ended: CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL, ...). A task that left the queue with neither
a result nor a record of how it ended is LOST. Every task that is neither done nor in the
queue is redone by :meth:`SlurmLauncher.redo`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths, pickle_load

from core.errors import UserError, did_you_mean
from core.io import write_json
from core.locks import locked

# the project root: jobs import the project's modules from here, wherever the clone lives
PROJECT_ROOT = Path(__file__).resolve().parent.parent

Arg = str | int | float | bool | None

# each setting: (command-line flag, meaning) for error messages and the launcher JSON object
SETTINGS_HELP: dict[str, tuple[str, str]] = {
    "partition": ("--slurm-partition", "partition name"),
    "time": ("--slurm-time", "time limit per task: minutes, H:MM:SS or D-HH:MM:SS"),
    "gpus_per_task": ("--slurm-gpus-per-task", "GPUs per task, an integer >= 0"),
    "cpus_per_task": ("--slurm-cpus-per-task", "CPU cores per task, an integer >= 1"),
    "mem": ("--slurm-mem", "memory per task, e.g. 16G or 4000M"),
    "account": ("--slurm-account", "account to charge"),
    "qos": ("--slurm-qos", "quality of service"),
    "array_parallelism": ("--slurm-array-parallelism", "tasks of one array running at once"),
    "extra": ("--slurm-extra", "other sbatch parameters, KEY=VALUE (or KEY for a bare flag)"),
    "python": ("--slurm-python", "command that starts Python on the nodes"),
}
# sbatch parameters the launcher sets itself, or that have their own setting
MANAGED = {"array", "output", "error", "open-mode", "parsable", "wrap"}
OWN_SETTING = {
    "partition": "partition",
    "time": "time",
    "t": "time",
    "gpus-per-task": "gpus_per_task",
    "cpus-per-task": "cpus_per_task",
    "c": "cpus_per_task",
    "mem": "mem",
    "account": "account",
    "A": "account",
    "qos": "qos",
    "p": "partition",
}

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+([KMGT]B?)?$", re.IGNORECASE)
_EXTRA_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")

# states of a job that has left the queue (scontrol and sacct spell them so)
FINAL_SLURM_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
}


def time_minutes(value: str) -> int | None:
    """sbatch's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded
    up; None when `value` is none of them or is zero."""
    m = _TIME.match(value.strip())
    if not m:
        return None
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        parts += [0] * (3 - len(parts))
        seconds = ((int(days) * 24 + parts[0]) * 60 + parts[1]) * 60 + parts[2]
    elif len(parts) == 1:  # M
        seconds = parts[0] * 60
    elif len(parts) == 2:  # M:S
        seconds = parts[0] * 60 + parts[1]
    else:  # H:M:S
        seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    minutes = -(-seconds // 60)
    return minutes if minutes > 0 else None


def parse_extra(items: Iterable[str], where: str = "") -> dict[str, str | bool]:
    """``KEY=VALUE`` items (``KEY`` alone for a bare flag) as sbatch parameters, leading dashes
    dropped; keys the launcher sets, or that have their own setting, are refused."""
    flag = SETTINGS_HELP["extra"][0]
    out: dict[str, str | bool] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not _EXTRA_KEY.match(key) or (sep and not value):
            raise UserError(
                f"{where}key 'extra' ({flag}): {item!r} is not KEY=VALUE (e.g. constraint=a100)"
            )
        if key in MANAGED:
            raise UserError(
                f"{where}key 'extra' ({flag}): {key!r} is set by the launcher; leave it out"
            )
        if key in OWN_SETTING:
            own = OWN_SETTING[key]
            raise UserError(
                f"{where}key 'extra' ({flag}): {key!r} has its own setting; use "
                f"{SETTINGS_HELP[own][0]} (key {own!r})"
            )
        out[key] = value if sep else True
    return out


@dataclass(frozen=True)
class SlurmSettings:
    """Where and how the tasks of a sweep run on a SLURM cluster (one array per graph layer)."""

    partition: str | None = None
    time: str = "60"
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 64
    extra: tuple[str, ...] = ()
    python: str | None = None  # None: this interpreter (same venv on a shared filesystem)

    def _bad(self, where: str, key: str, value: Any) -> UserError:
        flag, meaning = SETTINGS_HELP[key]
        return UserError(f"{where}key {key!r} ({flag}): {value!r} is invalid; expected {meaning}")

    def check(self, where: str = "") -> None:
        for key in ("partition", "account", "qos", "python"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise self._bad(where, key, value)
        if not isinstance(self.time, str) or time_minutes(self.time) is None:
            raise self._bad(where, "time", self.time)
        if self.mem is not None and (not isinstance(self.mem, str) or not _MEM.match(self.mem)):
            raise self._bad(where, "mem", self.mem)
        for key, low in (("gpus_per_task", 0), ("cpus_per_task", 1), ("array_parallelism", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise self._bad(where, key, value)
        if isinstance(self.extra, str) or not all(isinstance(x, str) for x in self.extra):
            raise self._bad(where, "extra", self.extra)
        parse_extra(self.extra, where)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "") -> SlurmSettings:
        """Settings from a JSON object (a ``launcher`` entry); ``name`` may say ``slurm``."""
        values = dict(data)
        name = values.pop("name", "slurm")
        if name != "slurm":
            raise UserError(f"{where}key 'name': {name!r} is invalid; this launcher is 'slurm'")
        for key in values:
            if key not in SETTINGS_HELP:
                raise UserError(
                    f"{where}key {key!r} is unknown; use one of {', '.join(SETTINGS_HELP)}"
                    f"{did_you_mean(key, SETTINGS_HELP)}"
                )
        if "time" in values and isinstance(values["time"], int):
            values["time"] = str(values["time"])
        if "extra" in values:
            extra = values["extra"]
            if isinstance(extra, Mapping):  # {"constraint": "a100"}, or true for a bare flag
                extra = [k if v is True else f"{k}={v}" for k, v in extra.items() if v is not False]
            if isinstance(extra, str) or not isinstance(extra, list):
                raise cls()._bad(where, "extra", extra)
            values["extra"] = tuple(str(x) for x in extra)
        settings = cls(**values)
        settings.check(where)
        return settings

    def sbatch_parameters(self) -> dict[str, Any]:
        """Keyword arguments of ``SlurmExecutor.update_parameters`` for these settings."""
        params: dict[str, Any] = {
            "time": time_minutes(self.time),
            "cpus_per_task": self.cpus_per_task,
            "array_parallelism": self.array_parallelism,
            "additional_parameters": parse_extra(self.extra),
        }
        for key in ("partition", "mem", "account", "qos"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.gpus_per_task:
            params["gpus_per_task"] = self.gpus_per_task
        return params


@dataclass(frozen=True)
class TaskStatus:
    """Where one task stands. `state`: COMPLETED (result written), FAILED (the function raised,
    or SLURM says so), PENDING/RUNNING/... while queued, CANCELLED/TIMEOUT/PREEMPTED/... as SLURM
    ended it, LOST when it left the queue with no result and no record, UNKNOWN when the queue
    could not be asked."""

    key: str
    job_id: str
    state: str
    queued: bool = False
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state == "COMPLETED"

    @property
    def needs_redo(self) -> bool:
        return not self.done and not self.queued and self.state != "UNKNOWN"


@dataclass(frozen=True)
class TaskRecord:
    """A task's newest submission in jobs.json: enough to resubmit it from another process."""

    phase: str
    function: str
    job_id: str
    args: list[Arg] = field(default_factory=list)


def _function_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a function a job (and a later process) can import by name."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise TypeError(
            f"{fn!r}: SLURM tasks run module-level functions a node can import by name "
            "(not lambdas, local functions or functions of __main__)"
        )
    return f"{module}:{qualname}"


def _import_function(name: str) -> Callable[..., Any]:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _plain_args(key: str, args: Sequence[Any]) -> list[Arg]:
    out: list[Arg] = []
    for a in args:
        if isinstance(a, Path):
            out.append(str(a))  # a resubmission from jobs.json passes str too
        elif a is None or isinstance(a, (str, int, float, bool)):
            out.append(a)
        else:
            raise TypeError(
                f"task {key!r}: arguments of SLURM tasks are paths, strings and numbers "
                f"(never models or tensors); got {type(a).__name__}"
            )
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


class SlurmLauncher:
    """Submit tasks as SLURM job arrays from one run folder, and follow them there.

    `pythonpath`: folders the jobs need on ``PYTHONPATH`` besides the project root (the
    function is pickled by reference and imported on the node).
    """

    def __init__(
        self,
        settings: SlurmSettings,
        run_dir: str | Path,
        *,
        job_name: str = "unlearn",
        pythonpath: Sequence[str | Path] = (),
    ) -> None:
        settings.check()
        self.settings = settings
        self.folder = Path(run_dir).resolve() / "slurm"
        self.record_path = self.folder / "jobs.json"
        self.job_name = job_name
        self.pythonpath = [str(PROJECT_ROOT)] + [str(Path(p).resolve()) for p in pythonpath]

    # ---- the record in jobs.json ----

    def _submissions(self) -> list[dict[str, Any]]:
        if not self.record_path.exists():
            return []
        return list(json.loads(self.record_path.read_text())["submissions"])

    def latest(self) -> dict[str, TaskRecord]:
        """The newest submission of every key (a resubmission replaces the earlier one)."""
        out: dict[str, TaskRecord] = {}
        for sub in self._submissions():
            for key, task in sub["tasks"].items():
                out[key] = TaskRecord(sub["phase"], sub["function"], task["job_id"], task["args"])
        return out

    # ---- submitting ----

    def _executor(self) -> submitit.SlurmExecutor:
        python = self.settings.python or shlex.quote(sys.executable)
        try:
            executor = submitit.SlurmExecutor(folder=self.folder, python=python)
        except RuntimeError as e:  # no srun on PATH
            raise UserError(
                f"--launcher slurm: {e} (the SLURM client commands sbatch, squeue and srun "
                "must be on PATH)"
            ) from e
        path = ":".join(shlex.quote(p) for p in self.pythonpath)
        executor.update_parameters(
            job_name=self.job_name,
            setup=[f'export PYTHONPATH={path}"${{PYTHONPATH:+:$PYTHONPATH}}"'],
            **self.settings.sbatch_parameters(),
        )
        return executor

    def submit(
        self, fn: Callable[..., Any], tasks: Mapping[str, Sequence[Any]], phase: str = "tasks"
    ) -> dict[str, str]:
        """Submit ``fn(*args)`` for every key as one job array; returns key -> job id."""
        if not tasks:
            return {}
        name = _function_name(fn)
        keys = list(tasks)
        args = [_plain_args(k, tasks[k]) for k in keys]
        if len({len(a) for a in args}) != 1:
            raise TypeError(f"phase {phase!r}: every task of one array takes the same arguments")
        self.folder.mkdir(parents=True, exist_ok=True)
        executor = self._executor()
        try:
            jobs = executor.map_array(fn, *zip(*args, strict=True))
        except (FailedJobError, FailedSubmissionError) as e:
            lines = [x for x in str(e).splitlines() if "error" in x.lower()] or [str(e)]
            raise UserError(
                f"--launcher slurm: sbatch refused the {phase!r} array of {len(keys)} tasks: "
                f"{lines[-1].strip()}"
            ) from e
        ids = {k: str(j.job_id) for k, j in zip(keys, jobs, strict=True)}
        tasks_json = {k: {"job_id": ids[k], "args": a} for k, a in zip(keys, args, strict=True)}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # read, append, write under the record's lock: two submitters never drop each other's jobs
        with locked(self.record_path, f"recording SLURM jobs in {self.record_path}"):
            submissions = self._submissions()
            submissions.append(
                {"phase": phase, "function": name, "submitted": now, "tasks": tasks_json}
            )
            write_json(self.record_path, {"folder": str(self.folder), "submissions": submissions})
        return ids

    def redo(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """Resubmit, from jobs.json alone, every task (of `keys`) that is neither done nor
        queued; one array per phase and function. Returns key -> new job id."""
        latest = self.latest()
        statuses = self.statuses(keys)
        groups: dict[tuple[str, str], dict[str, list[Arg]]] = {}
        for key, st in statuses.items():
            if st.needs_redo:
                rec = latest[key]
                groups.setdefault((rec.phase, rec.function), {})[key] = rec.args
        new: dict[str, str] = {}
        for (phase, function), tasks in groups.items():
            new.update(self.submit(_import_function(function), tasks, phase))
        return new

    def cancel(self, keys: Iterable[str] | None = None) -> None:
        latest = self.latest()
        ids = [latest[k].job_id for k in (latest if keys is None else keys)]
        if ids:
            _run(["scancel", *ids])

    # ---- following ----

    def _outcome(self, job_id: str) -> tuple[str, Any] | None:
        path = JobPaths(self.folder, job_id=job_id, task_id=0).result_pickle
        if not path.exists():
            return None
        try:
            return pickle_load(path)
        except EOFError:  # still being written
            return None

    def statuses(self, keys: Iterable[str] | None = None) -> dict[str, TaskStatus]:
        latest = self.latest()
        selected = list(latest) if keys is None else list(keys)
        for k in selected:
            if k not in latest:
                raise KeyError(f"{k!r} was never submitted from {self.folder}")
        ids = {latest[k].job_id for k in selected}
        queue = _squeue(ids)  # asked before reading results: a task can finish in between
        # refreshes a network filesystem's cached listing (as submitit does)
        with contextlib.suppress(OSError):
            self.folder.chmod(self.folder.stat().st_mode)
        out: dict[str, TaskStatus] = {}
        for k in selected:
            job_id = latest[k].job_id
            outcome = self._outcome(job_id)
            if outcome is not None:
                ok = outcome[0] == "success"
                err = None if ok else str(outcome[1])
                out[k] = TaskStatus(k, job_id, "COMPLETED" if ok else "FAILED", False, err)
            elif queue is None:
                out[k] = TaskStatus(k, job_id, "UNKNOWN", False, "squeue failed")
            elif job_id in queue:
                out[k] = TaskStatus(k, job_id, queue[job_id], True)
            else:
                state, reason = _ended_state(job_id)
                out[k] = TaskStatus(k, job_id, state, False, reason)
        return out

    def wait(
        self,
        keys: Iterable[str] | None = None,
        *,
        poll_s: float = 2.0,
        timeout_s: float | None = None,
        lost_grace_s: float = 15.0,
        on_update: Callable[[dict[str, TaskStatus]], None] | None = None,
    ) -> dict[str, TaskStatus]:
        """Poll until no task of `keys` is queued (or `timeout_s` passes); a LOST task is asked
        again for `lost_grace_s`, as a shared filesystem can show a result late."""
        selected = None if keys is None else list(keys)
        start = time.monotonic()
        last: dict[str, TaskStatus] | None = None
        while True:
            st = self.statuses(selected)
            if on_update is not None and st != last:
                on_update(st)
            last = st
            waiting = any(s.queued or s.state == "UNKNOWN" for s in st.values())
            lost = any(s.state == "LOST" for s in st.values())
            elapsed = time.monotonic() - start
            if not waiting and not (lost and elapsed < lost_grace_s):
                return st
            if timeout_s is not None and elapsed >= timeout_s:
                return st
            time.sleep(poll_s)

    def returned(self, status: TaskStatus) -> Any:
        """The value a COMPLETED task's function returned (None otherwise), without asking
        the queue again."""
        outcome = self._outcome(status.job_id) if status.done else None
        return outcome[1] if outcome is not None and outcome[0] == "success" else None

    def result(self, key: str) -> Any:
        """The value the task's function returned; UserError when it has none."""
        st = self.statuses([key])[key]
        outcome = self._outcome(st.job_id)
        if outcome is None or outcome[0] != "success":
            log = JobPaths(self.folder, job_id=st.job_id, task_id=0).stderr
            raise UserError(
                f"task {key!r} (SLURM job {st.job_id}) is {st.state}, no result; log: {log}"
                + (f"\n{st.error}" if st.error else "")
            )
        return outcome[1]


def _squeue(job_ids: Iterable[str]) -> dict[str, str] | None:
    """job id -> state for the tasks still queued (one call for all arrays); None when
    squeue itself failed (controller down), so that nothing is wrongly taken for lost."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    proc = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        return None
    out = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            out[job] = state
    return out


def _ended_state(job_id: str) -> tuple[str, str | None]:
    """How a task that left the queue ended: the controller's memory of it (``scontrol``,
    kept MinJobAge seconds), else the accounting database (``sacct``), else LOST."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    m = re.search(r"\bJobState=(\S+)", proc.stdout) if proc.returncode == 0 else None
    if m and m.group(1) in FINAL_SLURM_STATES:
        reason = re.search(r"\bReason=(\S+)", proc.stdout)
        return _without_result(m.group(1), reason.group(1) if reason else None)
    proc = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", job_id])
    if proc.returncode == 0:
        for line in proc.stdout.splitlines():
            job, _, state = line.partition("|")
            word = state.split(" ")[0] if state else ""
            if job == job_id and word in FINAL_SLURM_STATES:
                return _without_result(word, state)
    return "LOST", "left the queue without a result or a record of how it ended"


def _without_result(state: str, reason: str | None) -> tuple[str, str | None]:
    # the result pickle is the proof of success; "COMPLETED" without one means the job ended
    # before the function could return (e.g. a setup line failed)
    if state == "COMPLETED":
        return "LOST", "SLURM says COMPLETED but the task wrote no result"
    return state, None if reason in (None, "None") else reason
