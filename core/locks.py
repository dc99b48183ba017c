"""Locks between processes sharing a run folder, a checkpoint cache or a dataset cache.

Each protected thing has its own lock file beside it, ``<path>.lock``. The locks are the
operating system's (``flock`` on Unix, ``LockFileEx`` on Windows, through ``filelock``): the
kernel drops them when the holding process ends, however it ends (``kill -9`` included), so a
lock file left on disk is never a stale blocker and nobody needs to delete it. Within one
process a path always maps to the same re-entrant lock object, so code that takes a lock it
already holds goes on instead of waiting for itself.

Lock order, so two processes never wait for each other: a run, then a base model, then an
oracle, then a dataset cache; the dataset cache lock is never held while taking another.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

_LOCKS: dict[str, FileLock] = {}


def lock_path(path: str | Path) -> Path:
    """The lock file that protects `path`: ``<path>.lock`` beside it."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


def file_lock(path: str | Path) -> FileLock:
    """This process's lock object for `path` (one per resolved path, re-entrant)."""
    lp = lock_path(path).absolute()
    key = str(lp.resolve())  # a relative and an absolute spelling share one lock
    if key not in _LOCKS:
        lp.parent.mkdir(parents=True, exist_ok=True)
        _LOCKS[key] = FileLock(key)
    return _LOCKS[key]


@contextlib.contextmanager
def locked(path: str | Path, doing: str) -> Iterator[None]:
    """Hold the lock of `path`; if another process holds it, say so in one line and wait.

    `doing` completes "waiting: another process is ...", e.g. "building checkpoints/x".
    """
    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting: another process is {doing} ({lock.lock_file})", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def try_locked(path: str | Path) -> Iterator[bool]:
    """Hold the lock of `path` if it is free (yield True); yield False, holding nothing,
    when another process has it."""
    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


__all__ = ["file_lock", "lock_path", "locked", "try_locked"]
