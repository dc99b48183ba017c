"""A run's results on disk: ``metrics.json`` as one typed object, and per-sample outputs.

``metrics.json`` is written and read back by :class:`RunResult`; its keys are the ones users'
scripts read (newer keys are added, never renamed; keys this version does not know are kept in
``extra`` and written back unchanged).

``outputs.safetensors`` in a run folder holds what the evaluation computed for the unlearned
model, as flat tensors ``<split>.<field>``: ``logits`` float32 [N, C], ``labels`` int64 [N]
(the labels the run scored against: in class replacement ``new`` carries ``old``'s label),
``losses`` float32 [N] (per-sample cross-entropy) and ``indices`` int64 [N] (pool indices for
forget, retain, val, val_forget; test-set indices for test, test_forget), for forget, retain,
val and test, plus test_forget and val_forget when not empty.

A base model's or oracle's outputs are saved once per cache entry, as
``outputs/<stem>.safetensors`` in the checkpoint's folder (a subfolder, so ``*.safetensors`` in
a checkpoint folder still lists checkpoints only), over the whole pool (``pool.*``) and the
whole test set (``test.*``), so any run's split is a selection by index (:func:`select_splits`).
The file records the sha256 of the weights it came from and is only reused for those weights.
The metadata of both files names the dataset and its classes, so the plots need neither the
data nor the models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.errors import UserError
from core.io import atomic_path, dumps, write_json
from training.checkpoints import checkpoint_stem
from training.outputs import Outputs

METRICS_FILE = "metrics.json"
OUTPUTS_FILE = "outputs.safetensors"
FORMAT = "1"
FIELDS = ("logits", "labels", "losses", "indices")
RUN_SPLITS = ("forget", "retain", "val", "test")  # always in outputs.safetensors
OPTIONAL_SPLITS = ("test_forget", "val_forget")  # only when not empty
REFERENCE_PARTS = ("pool", "test")  # a reference file covers the whole pool and test set


def source_of(split: str) -> str:
    """Which part of the dataset a split's indices point into: ``test`` or ``train`` (pool)."""
    return "test" if split.startswith("test") else "train"


# ---------------------------------------------------------------------------------------------
# metrics.json


@dataclass
class RunResult:
    """Everything ``metrics.json`` holds about one run (experiment x seed)."""

    experiment: str  # the run's folder name, "<index>_<name>"
    index: int
    name: str
    method: str
    seed: int
    forget: dict[str, Any]  # the forget spec, its size ``n`` and ``sha256`` of the indices
    metrics: dict[str, Any]  # the unlearned model's report (metrics.model_report + l2_to_base)
    oracle: dict[str, Any]
    base: dict[str, Any]
    gaps: dict[str, Any]
    times: dict[str, Any]
    mask_kept: float | None
    oracle_checkpoint: str
    base_checkpoint: str
    frozen_changed: list[str] | None = None  # only with frozen layers
    replacement: dict[str, Any] | None = None  # only in class replacement
    challenge: dict[str, Any] | None = None  # only in class-wise forgetting
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer versions, kept as read
    run_dir: Path | None = field(default=None, compare=False)  # the folder it was read from

    def to_json(self) -> dict[str, Any]:
        """The content of metrics.json, keys in the order they have always been written."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("extra", "run_dir"):
                continue
            if f.name in _OPTIONAL and value is None:
                continue
            out[f.name] = value
        return out | self.extra

    def write(self, run_dir: str | Path) -> Path:
        """Write ``metrics.json`` into `run_dir` atomically, as strict JSON (NaN as null)."""
        path = Path(run_dir) / METRICS_FILE
        write_json(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RunResult:
        if not isinstance(obj, dict):
            raise UserError(f"{where}: not a JSON object")
        missing = [f for f in _REQUIRED if f not in obj]
        if missing:
            raise UserError(f"{where}: key '{missing[0]}' is missing; not a run's metrics.json")
        known = {f: obj[f] for f in _REQUIRED + _OPTIONAL if f in obj}
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        """Read ``metrics.json`` (or the run folder holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / METRICS_FILE
        try:
            obj = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: cannot be read ({e.__class__.__name__})") from None
        result = cls.from_json(obj, str(p))
        result.run_dir = p.parent
        return result

    def flat(self) -> dict[str, Any]:
        """One level of ``section/key`` names, for W&B summaries."""
        out: dict[str, Any] = {}
        for sect in ("metrics", "gaps", "times", "oracle"):
            for k, v in getattr(self, sect).items():
                out[f"{sect}/{k}"] = v
        if self.challenge is not None:
            out["challenge/score"] = self.challenge["score"]
        return out


_OPTIONAL = ("frozen_changed", "replacement", "challenge")
_REQUIRED = tuple(
    f.name for f in fields(RunResult) if f.name not in _OPTIONAL + ("extra", "run_dir")
)


# ---------------------------------------------------------------------------------------------
# Per-sample outputs


def _empty() -> Outputs:
    # exactly what training.outputs.collect_outputs returns for an empty split
    return Outputs(
        logits=torch.empty(0, 0),
        labels=torch.empty(0, dtype=torch.long),
        losses=torch.empty(0),
        indices=torch.empty(0, dtype=torch.long),
    )


def _flatten(outs: Mapping[str, Outputs]) -> dict[str, Tensor]:
    return {
        f"{name}.{k}": getattr(o, k).detach().cpu().contiguous()
        for name, o in outs.items()
        for k in FIELDS
    }


def _save(path: Path, tensors: dict[str, Tensor], meta: Mapping[str, Any]) -> None:
    text = {k: v if isinstance(v, str) else dumps(v, indent=None) for k, v in meta.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT} | text)


def _load(path: Path) -> tuple[dict[str, Outputs], dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"{path}: not a readable outputs file ({e})") from None
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    try:
        outs = {n: Outputs(**{k: tensors[f"{n}.{k}"] for k in FIELDS}) for n in names}
    except KeyError as e:
        raise UserError(f"{path}: tensor {e} is missing; not an outputs file") from None
    return outs, meta


def save_outputs(path: str | Path, outs: Mapping[str, Outputs], meta: Mapping[str, Any]) -> Path:
    """Write a run's ``outputs.safetensors`` atomically: every split of RUN_SPLITS, and those
    of OPTIONAL_SPLITS that are not empty. `meta`: dataset, num_classes, classes."""
    keep = {n: outs[n] for n in RUN_SPLITS} | {
        n: outs[n] for n in OPTIONAL_SPLITS if n in outs and len(outs[n]) > 0
    }
    _save(Path(path), _flatten(keep), meta)
    return Path(path)


def load_outputs(path: str | Path) -> tuple[dict[str, Outputs], dict[str, Any]]:
    """A run's outputs by split name, and the file's metadata (JSON values decoded)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"{p} not found: the run was made before per-sample outputs were saved, or is "
            "incomplete; rerun it into a new --out"
        )
    outs, meta = _load(p)
    missing = [n for n in RUN_SPLITS if n not in outs]
    if missing:
        raise UserError(f"{p}: split '{missing[0]}' is missing")
    return outs, decode_meta(meta)


def decode_meta(meta: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Reference outputs of a base model or an oracle, once per cache entry


def reference_path(checkpoint: str | Path) -> Path:
    """Where the whole-pool outputs of the checkpoint ``<folder>/<stem>`` are saved:
    ``<folder>/outputs/<stem>.safetensors``."""
    stem = checkpoint_stem(checkpoint)
    return stem.parent / "outputs" / f"{stem.name}.safetensors"


def save_reference(path: str | Path, pool: Outputs, test: Outputs, meta: Mapping[str, Any]) -> Path:
    """Write the whole-pool and whole-test-set outputs of a checkpoint atomically. `meta`
    should name ``weights_sha256``, the weights they were computed from."""
    _save(Path(path), _flatten({"pool": pool, "test": test}), meta)
    return Path(path)


def load_reference(path: str | Path) -> tuple[dict[str, Outputs], dict[str, Any]]:
    outs, meta = _load(Path(path))
    if set(outs) != set(REFERENCE_PARTS):
        raise UserError(f"{path}: holds {sorted(outs)}, not the pool and test outputs")
    return outs, decode_meta(meta)


def select(whole: Outputs, indices: Tensor, labels: Tensor | None = None) -> Outputs:
    """The outputs of the samples `indices` (in that order) from whole-pool or whole-test-set
    outputs. With `labels` (the run's, e.g. relabelled in class replacement) the losses are
    recomputed wherever they differ from the stored labels."""
    idx = torch.as_tensor(indices).long().cpu()
    if len(idx) == 0:
        return _empty()
    logits, stored = whole.logits[idx], whole.labels[idx]
    if labels is None or torch.equal(labels.cpu().long(), stored):
        return Outputs(logits, stored, whole.losses[idx], idx)
    y = labels.cpu().long()
    return Outputs(logits, y, F.cross_entropy(logits, y, reduction="none"), idx)


def select_splits(
    reference: Mapping[str, Outputs],
    indices: Mapping[str, Tensor],
    labels: Mapping[str, Tensor] | None = None,
) -> dict[str, Outputs]:
    """One selection per split name (``test*`` from the test set, the rest from the pool)."""
    part = {"train": "pool", "test": "test"}
    return {
        name: select(reference[part[source_of(name)]], idx, labels.get(name) if labels else None)
        for name, idx in indices.items()
    }


__all__ = [
    "METRICS_FILE",
    "OUTPUTS_FILE",
    "RunResult",
    "load_outputs",
    "load_reference",
    "reference_path",
    "save_outputs",
    "save_reference",
    "select",
    "select_splits",
    "source_of",
]
