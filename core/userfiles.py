"""Files and folders named by the user: read JSON safely, check output folders before any work.

A JSON file the user gives (an experiment list, a forget-index file, a run folder's
``config.json``) is read as UTF-8 text and parsed here, so every way it can be wrong is one
line: missing, a folder, a binary file (a PyTorch ``.pt``, a ``.safetensors``, a pickle), a
UTF-16/32 file, bytes that are not UTF-8, nesting too deep for the parser, malformed JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import UserError

_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
MALFORMED = "malformed JSON at line {line}, column {col}: {msg}"


def binary_kind(head: bytes) -> str | None:
    """What a binary file is, judged from its first bytes; None if it looks like text."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pt checkpoint?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 1 << 32:
        return "a safetensors file"
    if b"\x00" in head:
        return "a binary file"
    return None


def describe_missing(path: Path, what: str) -> str:
    """Why `path` cannot be read as a file: a folder, or not there at all."""
    if path.is_dir():
        return f"{path}: is a folder, not {what}"
    if path.exists():
        return f"{path}: is not a regular file, so it cannot be {what}"
    noun = what.removeprefix("a ").removeprefix("an ")
    return f"{path}: {noun} not found"


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of the user's file `path` (`what` names it in errors, e.g. "an
    experiment file"); a UTF-8 byte-order mark is dropped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(describe_missing(p, what))
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read {what}: {e.strerror}") from None
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise UserError(f"{p}: is {name} text; save {what} as UTF-8")
    kind = binary_kind(data[:64])
    if kind:
        raise UserError(f"{p}: is {kind}, not {what} (JSON text)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{p}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"save {what} as UTF-8"
        ) from None


def read_json(path: str | Path, what: str, malformed: str = MALFORMED) -> Any:
    """Parse the user's JSON file; `malformed` formats a syntax error (line, col, msg)."""
    p = Path(path)
    text = read_text(p, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{p}: " + malformed.format(line=e.lineno, col=e.colno, msg=e.msg)
        ) from None
    except RecursionError:
        raise UserError(f"{p}: JSON nested too deeply to be {what}") from None


def check_output_dir(path: str | Path, flag: str) -> None:
    """`path` can be (or already is) a folder: neither it nor a parent is an existing file."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            if q == p:
                raise UserError(f"{flag} {p}: is an existing file, not a folder")
            raise UserError(f"{flag} {p}: {q} is an existing file, so it cannot hold a folder")
        if q.is_dir():
            return
