"""A run folder's integrity and ownership: the manifest that marks a run finished, and locks.

A run (one experiment, one seed) is finished when its ``manifest.json`` exists and every file
it lists still has the size and sha256 recorded there. The manifest is written last, after
``metrics.json``, so a crash at any moment leaves either a verified run or one that is redone;
a truncated ``metrics.json`` or model file (power cut, full disk, partial copy) is named in one
line and the run is redone.

Several processes may share one ``--out``: each run is done under its own lock
(``seedN.lock`` beside the run folder), a process takes the runs nobody holds first and comes
back to the others at the end, waiting for their holder, so each run is done once. The folder's
``config.json`` is checked and written under ``config.json.lock``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from core.io import check_record, file_record, remove, write_json
from core.locks import locked, try_locked

MANIFEST = "manifest.json"
METRICS = "metrics.json"
FORMAT = 1


def write_manifest(run_dir: Path, files: Iterable[str]) -> None:
    """Record size and sha256 of each of the run's `files` (names inside `run_dir`, which must
    include ``metrics.json``); written last, it marks the run finished."""
    names = sorted(set(files))
    if METRICS not in names:
        raise ValueError(f"{run_dir}: a manifest must list {METRICS}")
    record = {name: file_record(run_dir / name) for name in names}
    write_json(run_dir / MANIFEST, {"format": FORMAT, "files": record})


def unfinish(run_dir: Path) -> None:
    """Remove the manifest before a run is redone, so a crash half-way through the new files
    cannot leave an old manifest beside them."""
    remove(run_dir / MANIFEST)


def run_problem(run_dir: Path) -> str | None:
    """Why the run in `run_dir` is not finished ("" when it never got as far as metrics.json),
    or None when its manifest and every file it lists check out."""
    manifest = run_dir / MANIFEST
    if not manifest.is_file():
        if (run_dir / METRICS).is_file():
            return f"{METRICS} has no {MANIFEST} (the run stopped before it was recorded)"
        return ""
    try:
        files = json.loads(manifest.read_bytes().decode("utf-8"))["files"]
        if not isinstance(files, dict) or METRICS not in files:
            raise ValueError
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError):
        return f"{MANIFEST} is damaged"
    for name, record in sorted(files.items()):
        problem = check_record(run_dir / name, record)
        if problem is not None:
            return problem
    return None


def run_finished(run_dir: Path) -> bool:
    """Whether the run is verified finished; a damaged one is named in one line ("...;
    redoing") and counts as not finished."""
    problem = run_problem(run_dir)
    if problem:
        print(f"{run_dir}: {problem}; redoing", file=sys.stderr)
    return problem is None


def for_each_run(
    run_dirs: Sequence[Path],
    do: Callable[[Path], None],
    *,
    finished: Callable[[Path], bool] = run_finished,
    skipped: Callable[[Path], None] | None = None,
) -> None:
    """Call `do(run_dir)` for every run not verified `finished`, holding the run's lock.

    A run another process holds is left for later; once every free run is done, this waits
    for each held one in turn and does it only if its holder did not finish it (the holder
    stopped or crashed: the operating system has released its lock). `skipped(run_dir)` is
    called for each run found finished, by this process earlier or by another one.
    """

    def attempt(d: Path) -> None:
        if finished(d):
            if skipped is not None:
                skipped(d)
        else:
            do(d)

    held = []
    for d in run_dirs:  # a run's lock is "<run folder>.lock" beside it
        with try_locked(d) as mine:
            if mine:
                attempt(d)
            else:
                held.append(d)
    for d in held:
        with locked(d, f"running {d}"):
            attempt(d)


@contextlib.contextmanager
def config_locked(out: Path) -> Iterator[Path]:
    """Hold the lock of the run folder's ``config.json`` (read, compare and write it inside);
    yields its path."""
    path = out / "config.json"
    with locked(path, f"writing {path}"):
        yield path


__all__ = [
    "MANIFEST",
    "config_locked",
    "for_each_run",
    "run_finished",
    "run_problem",
    "unfinish",
    "write_manifest",
]
