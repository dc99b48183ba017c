"""Files the tool writes and reads: one atomic writer, strict JSON, content hashes.

Every file goes through :func:`atomic_write_bytes`: a unique temporary name in the target's
folder, ``fsync`` of the data, an atomic rename, then ``fsync`` of the folder, so a crash or a
power cut leaves either the old file or the new one, never half of one, and concurrent writers
never share a temporary file. JSON is written strictly (no NaN or Infinity: ``null``).
:func:`file_record` and :func:`check_record` are the content hashes that whatever depends on a
file records (a checkpoint's sidecar, a run's manifest) and verifies before trusting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    # mkstemp creates files 0600; a renamed file should get the mode open() would give it
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a library that writes files itself (safetensors,
    numpy); on success it is synced and renamed onto `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove(path: str | Path) -> None:
    """Delete `path` if it exists, durably (the folder is synced), e.g. a manifest before a redo."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> None:
    """Let `write(tmp)` produce the file, then move it into place atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def strict(obj: Any) -> Any:
    """The same structure with NaN and infinities replaced by None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text: non-finite floats become null; anything else non-JSON is an error."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """What a dependent file records about `path`: its size and sha256."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def check_record(path: str | Path, record: Any, label: str | None = None) -> str | None:
    """Why `path` does not match `record` (from :func:`file_record`), or None when it does.

    `label` names the file in the answer (default: its name). The size is compared first, so
    a truncated file is named as such without hashing it.
    """
    path = Path(path)
    label = label or path.name
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return f"no sha256 is recorded for the {label}"
    if not path.is_file():
        return f"{label} {path.name} is missing"
    size = path.stat().st_size
    want = record.get("bytes")
    if isinstance(want, int) and size != want:
        cut = "truncated" if size < want else "replaced"
        return f"{label} is {cut} ({size} bytes, {want} were written)"
    if sha256_file(path) != record["sha256"]:
        return f"{label} does not match the sha256 recorded when it was written"
    return None
