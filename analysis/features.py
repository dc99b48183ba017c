"""Penultimate-layer features of every checkpoint in a folder, on one fixed sample of the pool.

    python feature_extraction.py -D output/20250101-120000_quickstart -S 1000
    python feature_extraction.py -D checkpoints --out features/ckpts

Every ``*.safetensors`` under ``-D`` whose JSON sidecar describes a model is loaded (mask files
are skipped); for a run folder the base and oracle checkpoints named by each ``metrics.json``
are added too. Each model sees the same seeded sample of ``-S`` images from the training part
of its dataset's pool (validation excluded; the sample depends only on the dataset, its split
seed and validation fraction, ``-S`` and ``--seed``), and writes one compressed ``.npz``:

=====================  ==========  =========================================================
array                  shape       meaning
=====================  ==========  =========================================================
``features``           [N, D] f32  penultimate features, ``models.features`` (timm's
                                   ``forward_features`` + ``forward_head(pre_logits=True)``)
``logits``             [N, C] f32  the model's outputs on the same images
``labels``             [N] i64     true labels
``indices``            [N] i64     pool indices of the sampled images (sorted)
``forget``             [N] bool    sample is in this model's forget set
``classifier_weight``  [C, D] f32  the classifier's weights: one class prototype per row
``classifier_bias``    [C] f32     its bias (zeros if it has none)
``meta``               0-d str     JSON: checkpoint, kind, dataset, split, forget spec, ...
=====================  ==========  =========================================================

Files mirror the input folder under ``--out`` (default ``features/<name of -D>``):
``runs/00_x/seed0/model.safetensors`` becomes ``runs/00_x/seed0/model.npz``; checkpoints outside
the folder (a run's base and oracles) go to ``refs/base/<stem>.npz`` and
``refs/oracle/<stem>.npz``. ``index.json`` lists every file with its role and, for unlearned
models, the feature files of their base and retrain oracle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from core import rng
from core.cli_options import (
    add_checkpoints,
    add_data_dir,
    add_device,
    add_feature_io,
    new_parser,
)
from core.errors import UserError, cli
from core.io import atomic_write_with, dumps, write_json
from datasets import DeviceData, ForgetSpec, RawData, indices_hash, make_split, pick_device
from training.checkpoints import (
    checkpoint_exists,
    checkpoint_stem,
    forget_indices_of,
    load_checkpoint,
    read_meta,
)
from training.config import TrainConfig
from training.loop import EVAL_BATCH
from training.recipe import load_data

FORMAT = 1
DEFAULT_SAMPLES = 1000


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoint_key(path: str | Path) -> str:
    """One canonical name per checkpoint: its absolute stem."""
    return str(checkpoint_stem(path).resolve())


def is_model_checkpoint(weights: Path) -> bool:
    """A ``.safetensors`` file with a sidecar that describes a model (masks have none)."""
    if weights.name.startswith("mask") or weights.name.endswith(".tmp"):
        return False
    side = checkpoint_stem(weights).with_name(checkpoint_stem(weights).name + ".json")
    if not side.is_file():
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and {"model", "num_classes", "dataset"} <= meta.keys()


def resolve_checkpoint(
    ref: str | None,
    run_dir: Path | None = None,
    search: Iterable[Path] = (),
    exists: Callable[[Path], bool] = checkpoint_exists,
) -> Path | None:
    """Find a checkpoint named in a metrics.json or sidecar (paths there are relative to the
    folder main.py ran in): as given, then next to the run folder, then by name in ``search``.
    `exists` says whether a candidate stem is what is looked for (default: a whole checkpoint;
    the plots look for its saved outputs instead)."""
    if not ref:
        return None
    p = Path(ref)
    candidates = [p]
    if not p.is_absolute() and run_dir is not None:
        candidates += [run_dir / p] + [parent / p for parent in run_dir.parents]
    for d in search:
        candidates += [Path(d) / p.name, Path(d) / "oracles" / p.name]
    for c in candidates:
        if exists(checkpoint_stem(c)):
            return checkpoint_stem(c)
    return None


def run_folder_of(path: Path) -> Path | None:
    """The run folder (holding config.json and runs/) that contains ``path``, if any."""
    for d in [path, *path.parents]:
        if (d / "runs").is_dir() and (d / "config.json").is_file():
            return d
    return None


@dataclass
class Found:
    """One checkpoint to extract, with what the run folder says about it."""

    stem: Path
    rel: Path  # output path of its feature file, relative to --out
    role: str  # unlearned, base, oracle, checkpoint
    run: dict[str, Any] | None = None  # metrics.json of an unlearned model in a run folder


def find_checkpoints(src: Path, search: Iterable[Path] = ()) -> list[Found]:
    """Every model checkpoint under ``src``, plus base and oracles named by its metrics.json."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a folder")
    found: dict[str, Found] = {}
    for w in sorted(src.rglob("*.safetensors")):
        if not is_model_checkpoint(w):
            continue
        stem = checkpoint_stem(w)
        rel = stem.relative_to(src)
        rel = rel.with_name(rel.name + ".npz")
        found[checkpoint_key(stem)] = Found(stem, rel, "checkpoint")
    search = list(search)
    for mpath in sorted(src.rglob("metrics.json")):
        try:
            m = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(m, dict) or "base_checkpoint" not in m:
            continue
        key = checkpoint_key(mpath.parent / "model")
        if key in found:
            found[key].role, found[key].run = "unlearned", m
        run_dir = run_folder_of(mpath.parent)
        for role, field in (("base", "base_checkpoint"), ("oracle", "oracle_checkpoint")):
            ref = resolve_checkpoint(m.get(field), run_dir, search)
            if ref is None:
                print(
                    f"warning: {mpath}: {field} {m.get(field)} not found; skipped",
                    file=sys.stderr,
                )
                continue
            k = checkpoint_key(ref)
            if k not in found:
                found[k] = Found(ref, Path("refs") / role / f"{ref.name}.npz", role)
            elif found[k].role == "checkpoint":
                found[k].role = role
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# The sample and the features


def sample_key(dataset: str, dataset_args: dict[str, Any], indices: Tensor | np.ndarray) -> str:
    """Names one sample: models with the same key were shown exactly the same images."""
    blob = json.dumps(
        [dataset, dataset_args, [int(i) for i in np.asarray(indices).tolist()]], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_pool(
    raw: RawData, split_seed: int, val_fraction: float, n: int, seed: int = 0
) -> Tensor:
    """``n`` pool indices drawn from the training part (validation excluded), sorted; all of
    them when ``n`` is 0 or larger than that part.

    The draw has its own stream, ``core.rng.generator(seed, "features")``: a random forget set
    drawn with the same seed comes from another permutation, so the sample holds its share of
    forget samples, not the whole forget set (issue 12: with one shared ``randperm(seed)``,
    seed 0's 1,000-point sample held all 400 forget samples of a 10% run).
    """
    train = make_split(raw, ForgetSpec(), split_seed, val_fraction).train
    if n <= 0 or n >= len(train):
        return train.clone()
    g = rng.generator(seed, rng.FEATURES)
    return torch.sort(train[torch.randperm(len(train), generator=g)[:n]]).values


def classifier_of(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of the final linear layer: ``get_classifier()``, else the last Linear."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
        head = linears[-1]
    w = head.weight.detach().float().cpu().numpy()
    b = head.bias.detach().float().cpu().numpy() if head.bias is not None else np.zeros(len(w))
    return w.astype(np.float32), b.astype(np.float32)


@torch.no_grad()
def extract(
    model: nn.Module, data: DeviceData, idx: Tensor, batch_size: int = EVAL_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and logits of the pool images ``idx`` (eval mode, no augmentation).

    The features are what ``models.features`` returns (timm's ``forward_features`` followed by
    ``forward_head(pre_logits=True)``), flattened to one vector per image."""
    was_training = model.training
    model.eval()
    net: Any = model  # every model here exposes timm's forward_features / forward_head
    feats, logits = [], []
    try:
        for x, _, _ in data.batches(idx, batch_size, source="train"):
            body = net.forward_features(x)
            f = net.forward_head(body, pre_logits=True)
            logits.append(net.forward_head(body).float().cpu())
            feats.append(f.reshape(f.shape[0], -1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def forget_membership(forget: Sequence[int], n_pool: int, idx: Tensor) -> np.ndarray:
    """Which sampled pool indices `idx` are in the forget set `forget` (the checkpoint's
    ``_forget.json``: every checkpoint the tool writes has one, checked against its sidecar)."""
    member = torch.zeros(n_pool, dtype=torch.bool)
    member[torch.as_tensor(list(forget), dtype=torch.long)] = True
    return member[idx].numpy()


def save_features(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write one compressed .npz atomically (``meta`` as a 0-d unicode array, no pickle)."""
    everything = {"meta": np.array(dumps(meta, indent=None))} | arrays

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" to the name
            np.savez_compressed(f, **everything)  # type: ignore[arg-type]

    atomic_write_with(path, write)


@dataclass
class FeatureSet:
    """One feature file, loaded."""

    path: Path
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    forget: np.ndarray
    classifier_weight: np.ndarray
    classifier_bias: np.ndarray
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.stem)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("classes") or range(self.num_classes))

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or int(self.labels.max()) + 1)

    def subset(self, keep: np.ndarray) -> FeatureSet:
        return FeatureSet(
            self.path,
            self.features[keep],
            self.logits[keep],
            self.labels[keep],
            self.indices[keep],
            self.forget[keep],
            self.classifier_weight,
            self.classifier_bias,
            self.meta,
        )


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    return FeatureSet(
        path=path,
        features=a["features"],
        logits=a["logits"],
        labels=a["labels"],
        indices=a["indices"],
        forget=a["forget"].astype(bool),
        classifier_weight=a["classifier_weight"],
        classifier_bias=a["classifier_bias"],
        meta=json.loads(str(a["meta"])),
    )


# ---------------------------------------------------------------------------------------------
# Extraction


def _role_of(meta: dict[str, Any], found: Found) -> str:
    if found.role != "checkpoint":
        return found.role
    return {"base": "base", "retrain": "oracle", "unlearned": "unlearned"}.get(
        meta.get("kind", ""), "checkpoint"
    )


def _display_name(found: Found, meta: dict[str, Any], role: str) -> str:
    if found.run is not None:
        return f"{found.run['experiment']} seed {found.run['seed']}"
    if role == "unlearned" and found.rel.parent.name.startswith("seed"):
        return f"{found.rel.parent.parent.name} {found.rel.parent.name}"
    return found.stem.name


def extract_features(
    src: str | Path,
    out: str | Path,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    device: torch.device | str | None = None,
    data_dir: Path | None = None,
    search: Iterable[Path] = (),
    batch_size: int = EVAL_BATCH,
    quiet: bool = False,
) -> list[Path]:
    """Extract features of every checkpoint under ``src`` into ``out``; return the files."""
    src, out = Path(src), Path(out)
    dev = pick_device(str(device) if device is not None else None)
    found = find_checkpoints(src, search)
    if not found:
        raise UserError(f"{src}: no model checkpoints (.safetensors with a JSON sidecar) found")
    data_cache: dict[str, DeviceData] = {}
    sample_cache: dict[str, Tensor] = {}
    entries: list[dict[str, Any]] = []
    written: list[Path] = []
    bar = tqdm(found, desc="features", unit="model", disable=quiet or None)
    for f in bar:
        meta = read_meta(f.stem)
        split = meta.get("split", {})
        split_seed, val_fraction = (
            int(split.get("split_seed", 0)),
            float(split.get("val_fraction", 0.1)),
        )
        dkey = json.dumps([meta["dataset"], meta.get("dataset_args", {})], sort_keys=True)
        if dkey not in data_cache:
            cfg = TrainConfig(dataset=meta["dataset"], dataset_args=meta.get("dataset_args", {}))
            data_cache[dkey] = DeviceData(load_data(cfg, data_dir), dev)
        data = data_cache[dkey]
        skey = json.dumps([dkey, split_seed, val_fraction, samples, seed])
        if skey not in sample_cache:
            sample_cache[skey] = sample_pool(data.raw, split_seed, val_fraction, samples, seed)
        idx = sample_cache[skey]
        model, _ = load_checkpoint(f.stem, dev)
        feats, logits = extract(model, data, idx, batch_size)
        weight, bias = classifier_of(model)
        all_forget = forget_indices_of(f.stem)
        forget = forget_membership(all_forget, len(data.raw.train_y), idx)
        forget_sha = indices_hash(all_forget)  # as metrics.json's forget.sha256
        role = _role_of(meta, f)
        run = f.run or {}
        info = {
            "format": FORMAT,
            "name": _display_name(f, meta, role),
            "role": role,
            "kind": meta.get("kind"),
            "checkpoint": str(f.stem),
            "key": checkpoint_key(f.stem),
            "model": meta["model"],
            "dataset": meta["dataset"],
            "dataset_args": meta.get("dataset_args", {}),
            "classes": data.raw.classes,
            "num_classes": data.raw.num_classes,
            "split_seed": split_seed,
            "val_fraction": val_fraction,
            "forget_spec": split.get("forget", {}),
            "forget_classes": list(split.get("forget", {}).get("classes") or []),
            "n_forget_total": len(all_forget),
            "forget_sha256": forget_sha,
            "samples": int(len(idx)),
            "sample_seed": seed,
            "sample_key": sample_key(meta["dataset"], meta.get("dataset_args", {}), idx),
            "method": run.get("method", meta.get("method")),
            "experiment": run.get("experiment"),
            "seed": run.get("seed", meta.get("seed")),
            "base_checkpoint": run.get("base_checkpoint", meta.get("base_checkpoint")),
            "oracle_checkpoint": run.get("oracle_checkpoint"),
        }
        arrays: dict[str, np.ndarray] = {
            "features": feats.astype(np.float32),
            "logits": logits.astype(np.float32),
            "labels": data.raw.train_y[idx].numpy().astype(np.int64),
            "indices": idx.numpy().astype(np.int64),
            "forget": forget,
            "classifier_weight": weight,
            "classifier_bias": bias,
        }
        path = out / f.rel
        save_features(path, arrays, info)
        written.append(path)
        entries.append({"file": f.rel.as_posix(), **{k: info[k] for k in _INDEX_KEYS}})
        del model
    _link_entries(entries, src, search)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "index.json", {"format": FORMAT, "files": entries})
    return written


_INDEX_KEYS = (
    "name",
    "role",
    "kind",
    "key",
    "dataset",
    "sample_key",
    "forget_sha256",
    "forget_classes",
    "experiment",
    "seed",
    "method",
    "base_checkpoint",
    "oracle_checkpoint",
)


def _link_entries(entries: list[dict[str, Any]], src: Path, search: Iterable[Path]) -> None:
    """Point every unlearned model at the feature files of its base and retrain oracle."""
    by_key = {e["key"]: e for e in entries}
    for e in entries:
        e["base"] = e["oracle"] = None
        if e["role"] != "unlearned":
            continue
        run_dir = run_folder_of(src.resolve()) or src
        for field, role in (("base_checkpoint", "base"), ("oracle_checkpoint", "oracle")):
            stem = resolve_checkpoint(e.get(field), run_dir, search)
            if stem is not None and checkpoint_key(stem) in by_key:
                e[role] = by_key[checkpoint_key(stem)]["file"]
        if e["oracle"] is None and e.get("forget_sha256"):
            # outside a run folder: the retrain oracle with exactly this forget set
            for o in entries:
                if (
                    o["role"] == "oracle"
                    and o["forget_sha256"] == e["forget_sha256"]
                    and o["sample_key"] == e["sample_key"]
                ):
                    e["oracle"] = o["file"]
                    break


def load_index(features_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``index.json`` (or, without one, of every .npz found below the folder)."""
    d = Path(features_dir)
    idx = d / "index.json"
    if idx.is_file():
        return list(json.loads(idx.read_text())["files"])
    entries = []
    for p in sorted(d.rglob("*.npz")):
        if p.name.endswith(".tmp.npz"):
            continue
        with np.load(p, allow_pickle=False) as z:
            if "meta" not in z.files or "features" not in z.files:
                continue
            meta = json.loads(str(z["meta"]))
        entries.append(
            {"file": p.relative_to(d).as_posix(), "base": None, "oracle": None}
            | {k: meta.get(k) for k in _INDEX_KEYS}
        )
    if not entries:
        raise UserError(f"{d}: no feature files (run feature_extraction.py first)")
    return entries


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_feature_io(p, folder="run folder or checkpoint folder", samples=DEFAULT_SAMPLES,
                   samples_help="pool images in the sample, 0 = all",
                   out="default: features/<name of -D>")  # fmt: skip
    add_device(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (%(default)s)")
    add_checkpoints(p, search=True)
    add_data_dir(p)
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH)
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 0:
        raise UserError(f"-S {args.samples} is invalid; use a positive number, or 0 for all")
    out = args.out or Path("features") / args.dir.resolve().name
    written = extract_features(
        args.dir,
        out,
        samples=args.samples,
        seed=args.seed,
        device=args.device,
        data_dir=args.data_dir,
        search=args.checkpoints + [Path("checkpoints")],
        batch_size=args.batch_size,
    )
    print(f"{len(written)} feature files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
