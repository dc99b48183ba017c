"""Self-supervised base models: BYOL pretraining (Grill et al. 2020), then supervised fine-tuning.

A recipe with a ``pretrain`` object (training/config.py PretrainConfig) is trained in two
stages by :func:`training.recipe.train_checkpoint`:

1. the encoder is pretrained with BYOL (training/byol.py) on the pretraining images, or taken
   from the encoder cache ``<checkpoints>/encoders/`` when the same recipe already pretrained
   it on exactly the same images;
2. the model is fine-tuned on the labelled retain set like any base model: the whole model
   (``finetune: "full"``), or only its classifier on the frozen encoder (``"linear"``: the
   encoder's weights and batch-norm statistics stay bit-identical).

Exact oracles. With ``pretrain.data: "pool"`` the pretraining images are the retain set the
model is fine-tuned on, so a retrain oracle's encoder is pretrained again without its forget
set; it is cached by the recipe and by the hash of its images (the excluded forget set is
recorded in its forget-index file and in its name). With ``"unlabeled"`` (STL-10's unlabeled
split, disjoint from the labelled pool) the forget samples were never pretrained on, so the base
model's encoder is also the exact oracle's: both load the same cache entry and the oracle's
sidecar says so. ``pretrain_oracle: "shared"`` (an experiment key) reuses the base model's
encoder for a ``"pool"`` oracle as well: an approximation (the forget set was pretrained on),
recorded in the oracle's sidecar and flagged in every run's metrics.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import UserError
from core.progress import say
from datasets import (
    UNLABELED,
    DeviceData,
    ForgetSpec,
    RawData,
    Split,
    indices_hash,
    load_raw,
    make_split,
    resolved_dataset_args,
)
from loaders.torchvision_files import DatasetUnavailable
from models import build_model
from training.byol import ByolConfig, ByolResult, pretrain_byol
from training.checkpoints import build_once, load_checkpoint, save_checkpoint, versions
from training.config import PRETRAIN_ORACLES, PretrainConfig, TrainConfig
from training.cost import COUNTS, count_work
from training.loop import FitResult, fit

ENCODERS = "encoders"  # the encoder cache's folder under a checkpoint folder
TAU_SCHEDULE = "cosine from tau_base to 1 over all steps (Grill et al. 2020, sec. 3.2)"
APPROXIMATION = (
    "shared encoder: the oracle's encoder was pretrained with the forget set (pretrain_oracle "
    "'shared'); only its fine-tuning excludes it"
)
DISJOINT = (
    "the pretraining images (the unlabeled split) are disjoint from the labelled pool, so the "
    "forget samples were never pretrained on: the base model's encoder is the exact oracle's"
)


def byol_config(cfg: TrainConfig) -> ByolConfig:
    """The BYOL settings of a recipe's ``pretrain`` object (seed: the recipe's, if unset)."""
    p = cfg.pretrain
    if p is None:
        raise ValueError("the recipe has no pretrain object")
    return ByolConfig(
        epochs=p.epochs,
        lr=float(p.lr),
        optimizer=p.optimizer,
        momentum=float(p.momentum),
        weight_decay=float(p.weight_decay),
        schedule=p.schedule,
        tau_base=float(p.tau_base),
        projector=(int(p.projector[0]), int(p.projector[1])),
        predictor_hidden=p.predictor_hidden,
        batch_size=p.batch_size,
        seed=cfg.seed if p.seed is None else p.seed,
        crop_scale=None
        if p.crop_scale is None
        else (float(p.crop_scale[0]), float(p.crop_scale[1])),
        knn_k=p.knn_k,
        knn_every=p.knn_every,
    )


def resolved_pretrain(cfg: TrainConfig) -> dict[str, Any] | None:
    """The ``pretrain`` object with every default filled in and the seed resolved; None for a
    supervised-only recipe (so its cache name stays what it always was)."""
    if cfg.pretrain is None:
        return None
    b = byol_config(cfg)
    return {"method": cfg.pretrain.method, "data": cfg.pretrain.data} | b.to_json()


def pretrain_tag(cfg: TrainConfig) -> str:
    """The readable part of a base model's cache name: ``-byol`` or ``-byol-linear``."""
    if cfg.pretrain is None:
        return ""
    return f"-{cfg.pretrain.method}" + ("-linear" if cfg.finetune == "linear" else "")


def shares_encoder(cfg: TrainConfig, pretrain_oracle: str) -> bool:
    """Whether a retrain oracle of this recipe reuses the base model's encoder although the
    forget set was pretrained on (the approximation ``pretrain_oracle: "shared"``)."""
    if pretrain_oracle not in PRETRAIN_ORACLES:
        raise ValueError(f"pretrain_oracle must be one of {PRETRAIN_ORACLES}")
    return cfg.pretrain is not None and cfg.pretrain.data == "pool" and pretrain_oracle == "shared"


# ---------------------------------------------------------------------------------------------
# The pretraining images


def pretraining_data(
    cfg: TrainConfig, data: DeviceData, data_dir: Path | None
) -> tuple[DeviceData, str]:
    """The DeviceData holding the pretraining images and its source name (``train`` or
    ``unlabeled``); the unlabeled split is loaded only here, never for unlearning runs."""
    p = cfg.pretrain
    if p is None or p.data == "pool":
        return data, "train"
    if UNLABELED in data.raw.extra:
        return data, "unlabeled"
    try:
        full = load_raw(cfg.dataset, data_dir, True, **(cfg.dataset_args | {"unlabeled": True}))
    except DatasetUnavailable as e:
        raise UserError(str(e)) from None
    if UNLABELED not in full.extra:
        raise UserError(f"dataset {cfg.dataset} has no unlabeled split to pretrain on")
    return DeviceData(full, data.device), "unlabeled"


def pretraining_indices(
    cfg: TrainConfig, raw: RawData, split: Split, pdata: DeviceData, source: str, shared: bool
) -> tuple[Tensor, Tensor]:
    """(images to pretrain on, forget samples excluded from them) for this split.

    ``pool``: the retain set, i.e. the training part of the pool without the forget set (the
    base model's whole training part when ``shared``); ``unlabeled``: every unlabeled image.
    """
    none = torch.zeros(0, dtype=torch.long)
    if source == "unlabeled":
        return torch.arange(len(pdata.x["unlabeled"])), none
    if shared:
        base = make_split(raw, ForgetSpec(), cfg.split_seed, cfg.val_fraction, cfg.classes)
        return base.retain, none
    return split.retain, split.forget


# ---------------------------------------------------------------------------------------------
# The encoder cache


def encoder_key(cfg: TrainConfig, model_name: str, images: Tensor, source: str) -> dict[str, Any]:
    """What an encoder's weights depend on: the pretraining recipe, the architecture and its
    initialisation (the recipe's seed), the data and exactly which images were pretrained on."""
    return {
        "pretrain": resolved_pretrain(cfg),
        "model": model_name,
        "dataset": cfg.dataset,
        "dataset_args": resolved_dataset_args(cfg.dataset, cfg.dataset_args),
        "init_seed": cfg.seed,
        "source": source,
        "images_sha256": indices_hash(images),
    }


def encoder_name(key: dict[str, Any], excluded: Tensor) -> str:
    """``<model>_<dataset>_byol_s<seed>_<hash of the key>_<all | x<hash of the excluded>>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    what = "all" if len(excluded) == 0 else "x" + indices_hash(excluded)[:12]
    p = key["pretrain"]
    return f"{key['model']}_{key['dataset']}_{p['method']}_s{p['seed']}_{digest}_{what}"


@dataclass
class Encoder:
    """A pretrained encoder (the whole model, its classifier as initialised) and its record."""

    model: nn.Module
    meta: dict[str, Any]  # its sidecar
    path: Path  # its cache entry (a checkpoint stem)
    built: bool  # pretrained by this call (False: loaded from the cache)


def pretrained_encoder(
    cfg: TrainConfig,
    model_name: str,
    raw: RawData,
    pdata: DeviceData,
    source: str,
    images: Tensor,
    excluded: Tensor,
    split: Split,
    encoder_dir: Path,
    *,
    device: torch.device,
    desc: str = "byol",
    quiet: bool = False,
    on_batch: Callable[[Tensor], None] | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> Encoder:
    """The encoder of this recipe pretrained on exactly ``images``: from the cache when a valid
    entry exists (built once however many processes need it), else pretrained and saved
    atomically (training/checkpoints.py: weights, then a sidecar with their hashes; the
    forget-index file lists the excluded forget samples)."""
    key = encoder_key(cfg, model_name, images, source)
    path = encoder_dir / encoder_name(key, excluded)
    bcfg = byol_config(cfg)
    built = False

    def build() -> None:
        nonlocal built
        if not quiet:
            where = "unlabeled images" if source == "unlabeled" else "retain images"
            say(f"BYOL pretraining on {len(images)} {where}, {bcfg.epochs} epochs: {path.name}")
        torch.manual_seed(cfg.seed)  # the same initialisation as a supervised-only model
        model = build_model(model_name, raw.num_classes, raw.in_chans).to(device)
        bank = split.retain if source == "unlabeled" else None  # labelled, for the kNN monitor
        with count_work() as work:  # training/cost.py (the kNN monitor's passes included)
            result = pretrain_byol(
                model, pdata, images, split.val, bcfg, source=source, bank_idx=bank, desc=desc,
                on_batch=on_batch, log=log,
            )  # fmt: skip
        meta = {
            "model": model_name,
            "dataset": cfg.dataset,
            "dataset_args": cfg.dataset_args,
            "num_classes": raw.num_classes,
            "in_chans": raw.in_chans,
            "img_size": list(raw.img_size),
            "kind": "encoder",
            "key": key,
            "images": len(images),
            "excluded": len(excluded),
            "excluded_sha256": indices_hash(excluded),
            "tau_schedule": TAU_SCHEDULE,
            "byol": _result_json(result),
            "cost": work.to_json(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }
        save_checkpoint(path, model, meta, excluded)
        built = True

    build_once(path, build)
    model, meta = load_checkpoint(path, device)
    if meta.get("key") != json.loads(json.dumps(key)):
        raise UserError(
            f"{path}: this encoder cache entry records another recipe or other images than its "
            "name says; delete it and rerun"
        )
    return Encoder(model, meta, path, built)


def _result_json(r: ByolResult) -> dict[str, Any]:
    return {
        "epochs_run": r.epochs_run,
        "seconds": round(r.seconds, 3),
        "train_seconds": round(r.train_seconds, 3),
        "images_per_s": round(r.images_per_s, 1),
        "knn_acc": r.knn_acc,
        "history": r.history,
    }


def pretrain_record(
    cfg: TrainConfig, enc: Encoder, source: str, exact: bool, oracle: bool
) -> dict[str, Any]:
    """The ``pretrain`` block of a fine-tuned model's sidecar: the whole pretraining recipe,
    the images, what was excluded, the encoder it started from and whether an oracle's
    pretraining is exact."""
    m = enc.meta
    rec: dict[str, Any] = {
        "recipe": resolved_pretrain(cfg),
        "data": "unlabeled split" if source == "unlabeled" else "retain set of the pool",
        "images": m["images"],
        "images_sha256": m["key"]["images_sha256"],
        "excluded": m["excluded"],
        "excluded_sha256": m["excluded_sha256"],
        "tau_schedule": m["tau_schedule"],
        "finetune": cfg.finetune,
        "encoder": enc.path.name,
        "encoder_reused": not enc.built,
        "seconds": m["byol"]["seconds"],
        "images_per_s": m["byol"]["images_per_s"],
        "knn_acc": m["byol"]["knn_acc"],
    }
    if oracle:
        rec["oracle"] = "exact" if exact else "shared"
        if source == "unlabeled":
            rec["shared_with_base"] = True
            rec["note"] = DISJOINT
        elif not exact:
            rec["shared_with_base"] = True
            rec["approximation"] = APPROXIMATION
    return rec


def with_pretraining(cost: dict[str, Any], encoder_cost: Any) -> dict[str, Any]:
    """A fine-tuning's counted work plus its encoder's pretraining (when that is recorded)."""
    if not isinstance(encoder_cost, dict) or not all(k in encoder_cost for k in COUNTS):
        return cost
    keys = (*COUNTS, "wall_seconds", "cpu_seconds")
    return cost | {k: cost[k] + encoder_cost[k] for k in keys if k in cost and k in encoder_cost}


def oracle_approximation(meta: dict[str, Any]) -> str | None:
    """The approximation an oracle checkpoint's sidecar records, if any (for metrics.json)."""
    p = meta.get("pretrain")
    return p.get("approximation") if isinstance(p, dict) else None


# ---------------------------------------------------------------------------------------------
# Fine-tuning


class _FrozenEncoder(nn.Module):
    """The model with only its classifier training: the encoder stays in eval mode (batch-norm
    statistics and dropout frozen too) and its parameters take no gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = classifier(model)
        head = {id(p) for p in self.head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)

    def train(self, mode: bool = True) -> _FrozenEncoder:
        super().train(mode)
        self.model.eval()
        self.head.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x)
        return out


def classifier(model: nn.Module) -> nn.Module:
    """The model's last layer (timm's ``get_classifier()``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        raise UserError(
            f"finetune 'linear' needs a model with one classifier layer (get_classifier()); "
            f"{type(model).__name__} has none"
        )
    return head


def finetune(
    model: nn.Module,
    data: DeviceData,
    split: Split,
    cfg: TrainConfig,
    *,
    desc: str,
    log: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Supervised training of a pretrained model on the retain set, whole or head only."""
    if cfg.finetune == "full":
        return fit(model, data, split.retain, split.val, cfg, desc=desc, log=log)
    wrapper = _FrozenEncoder(model)
    try:
        return fit(wrapper, data, split.retain, split.val, cfg, desc=desc, log=log)
    finally:
        for p in model.parameters():  # an ordinary base model: unlearning may train any weight
            p.requires_grad_(True)


__all__ = [
    "ENCODERS",
    "PRETRAIN_ORACLES",
    "Encoder",
    "PretrainConfig",
    "byol_config",
    "finetune",
    "oracle_approximation",
    "pretrain_record",
    "pretrain_tag",
    "pretrained_encoder",
    "pretraining_data",
    "pretraining_indices",
    "resolved_pretrain",
    "shares_encoder",
    "with_pretraining",
]
