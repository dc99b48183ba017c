"""Checkpoints: safetensors weights, a JSON sidecar, and the forget-index JSON beside them.

``<stem>.safetensors`` holds the weights, ``<stem>.json`` everything needed to rebuild the
model and its split (model, dataset, split seed, forget specification, training recipe,
accuracies, versions), and ``<stem>_forget.json`` the forget set as a plain JSON list of
training-pool indices, which ``train.py --itf`` accepts back.

Integrity: the sidecar is written last and records the size and sha256 of the weights and of
the forget file (``files``) and a sha256 of its own content (``sidecar_sha256``). Nothing is
trusted before :func:`checkpoint_problem` finds it whole: a missing, truncated, replaced or
non-safetensors weights file, a truncated or edited sidecar (another ``split_seed``, model or
dataset), a forget file that changed, or weights whose tensors do not fit the model the sidecar
names. A weights file is only ever read by safetensors, so a renamed pickle is never unpickled.
The self-hash is how an edited split is caught: a base model's split cannot be re-derived from
its files (its forget set is empty), and one hash covers every field at once without loading
any data. It guards against damage and careless edits, not against someone who rewrites it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from core.errors import UserError
from core.io import atomic_write_with, check_record, dumps, file_record, write_json
from core.locks import locked
from datasets import write_index_file
from models import build_model

# what every sidecar must hold to rebuild the model, with the type each must have
_REQUIRED: dict[str, type] = {"model": str, "num_classes": int, "in_chans": int}


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that training and evaluation depend on."""
    import numpy
    import scipy
    import sklearn
    import timm
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def checkpoint_stem(path: str | Path) -> Path:
    """A checkpoint's path without its ending: ``x``, ``x.safetensors`` and ``x.json`` name
    the same checkpoint ``x``."""
    p = Path(path)
    for suffix in (".safetensors", ".json", ".pt"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def _files(stem: Path) -> tuple[Path, Path, Path]:
    """(weights, sidecar, forget file) of a checkpoint stem."""
    return (
        stem.with_name(stem.name + ".safetensors"),
        stem.with_name(stem.name + ".json"),
        stem.with_name(stem.name + "_forget.json"),
    )


def _content_hash(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(
    stem: str | Path, model: nn.Module, meta: dict[str, Any], forget: torch.Tensor
) -> Path:
    """Write forget file, weights, then the sidecar recording their hashes (each atomically);
    return the weights' path. A crash before the sidecar leaves a checkpoint that fails
    :func:`checkpoint_problem`, never one that passes with the wrong contents."""
    stem = checkpoint_stem(stem)
    weights, side, forget_path = _files(stem)
    write_index_file(forget_path, forget)
    atomic_write_with(weights, lambda tmp: save_model(model, str(tmp)))
    record = {"weights": file_record(weights), "forget_file": file_record(forget_path)}
    meta = meta | {"weights": weights.name, "forget_file": forget_path.name, "files": record}
    meta = json.loads(dumps(meta))  # exactly what will be read back: NaN as null, lists
    meta["sidecar_sha256"] = _content_hash(meta)
    write_json(side, meta)
    return weights


def _sidecar(side: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The sidecar's content if it is whole and unedited, else (None, why not)."""
    if not side.is_file():
        return None, f"checkpoint sidecar {side} not found"
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, f"sidecar {side.name} is not valid JSON (truncated or damaged)"
    if not isinstance(meta, dict):
        return None, f"sidecar {side.name} is not a JSON object"
    for key, kind in _REQUIRED.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return None, f"sidecar {side.name} has no valid {key!r}"
    if not isinstance(meta.get("sidecar_sha256"), str) or not isinstance(meta.get("files"), dict):
        return None, (
            f"sidecar {side.name} records no sha256 (written before integrity checks, or "
            "edited); its files cannot be verified"
        )
    if _content_hash(meta) != meta["sidecar_sha256"]:
        return None, (
            f"sidecar {side.name} was changed after it was written (its content does not "
            "match its recorded sha256)"
        )
    return meta, None


def _weights_shapes(weights: Path) -> dict[str, list[int]] | None:
    """Tensor shapes from the safetensors header; None if it is not a safetensors file."""
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception:  # safetensors raises its own error types for a bad header
        return None


def _weights_problem(weights: Path, meta: dict[str, Any]) -> str | None:
    record = meta["files"].get("weights")
    size = weights.stat().st_size
    want = record.get("bytes") if isinstance(record, dict) else None
    shapes = _weights_shapes(weights)
    if size == 0:
        return "weights file is empty"
    if shapes is None:
        with open(weights, "rb") as f:
            head = f.read(9)
        # a safetensors file starts with its header's length (8 bytes) and "{"
        if head[8:] == b"{" and isinstance(want, int) and size < want:
            return f"weights file is truncated ({size} of {want} bytes)"
        return "weights file is not a safetensors file (another format is never unpickled)"
    problem = check_record(weights, record, "weights file")
    if problem is not None:
        return problem
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, whatever the sidecar says
            model = build_model(meta["model"], meta["num_classes"], meta["in_chans"])
    except Exception as e:  # hashes that agree on absurd values (an unknown model, 10**30 classes)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"sidecar names a model that cannot be built ({why})"
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    for name, shape in shapes.items():
        if expected.get(name, shape) != shape:
            return (
                f"the weights do not fit the sidecar's model {meta['model']} with "
                f"{meta['num_classes']} classes and {meta['in_chans']} input channels "
                f"('{name}' is {shape}, the model's is {expected[name]})"
            )
    if set(shapes) - set(expected):
        extra = sorted(set(shapes) - set(expected))[0]
        return f"the weights hold '{extra}', which the sidecar's model {meta['model']} lacks"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, in a few words, or None if it can."""
    weights, side, forget = _files(checkpoint_stem(path))
    if not weights.is_file():
        return f"checkpoint weights {weights} not found"
    meta, problem = _sidecar(side)
    if meta is None:
        return problem
    return _weights_problem(weights, meta) or check_record(
        forget, meta["files"].get("forget_file"), "forget-index file"
    )


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The sidecar of a checkpoint that passes every check; a one-line UserError otherwise."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"{path}: {problem}")
    return read_meta(path)


def usable_cache_entry(path: str | Path) -> bool:
    """Whether a cached checkpoint (a base model built from a recipe, an oracle) can be used.

    An entry with no files at all is simply not built yet; a damaged one is reported in one
    line ending "rebuilding", and the caller builds it again."""
    weights, side, _ = _files(checkpoint_stem(path))
    problem = checkpoint_problem(path)
    if problem is not None and (weights.exists() or side.exists()):
        print(f"{weights}: {problem}; rebuilding", file=sys.stderr)
    return problem is None


def build_once(path: str | Path, build: Callable[[], object]) -> None:
    """Make sure the cache entry at `path` exists and passes every check, calling `build()` to
    (re)build it otherwise. The lock beside it (``<weights>.lock``) makes the entry built once
    however many processes need it: the others wait, then verify and use what it wrote."""
    weights = _files(checkpoint_stem(path))[0]
    with locked(weights, f"building {weights}"):
        if not usable_cache_entry(path):
            build()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The sidecar's content, once it is found whole and unedited (the weights are not read)."""
    meta, problem = _sidecar(_files(checkpoint_stem(path))[1])
    if meta is None:
        raise UserError(f"{path}: {problem}")
    return meta


def checkpoint_exists(path: str | Path) -> bool:
    """Whether a checkpoint exists and passes every check of :func:`checkpoint_problem`."""
    return checkpoint_problem(path) is None


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Verify the checkpoint, rebuild the model from its sidecar and load the weights with
    safetensors (no pickle is ever executed)."""
    meta = verify_checkpoint(path)
    weights = _files(checkpoint_stem(path))[0]
    model = build_model(meta["model"], meta["num_classes"], meta["in_chans"])
    load_model(model, str(weights), device=str(device))
    return model.to(device), meta


def forget_indices_of(path: str | Path) -> list[int]:
    """The checkpoint's forget set, once its file matches the sidecar's record."""
    _, side, forget = _files(checkpoint_stem(path))
    problem = check_record(forget, read_meta(path)["files"].get("forget_file"), "forget-index file")
    if problem is not None:
        raise UserError(f"{path}: {problem}")
    return json.loads(forget.read_text())
