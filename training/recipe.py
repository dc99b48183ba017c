"""From a recipe to a checkpoint: model name, cache name, data, and the training run itself."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.errors import UserError
from core.progress import say
from datasets import (
    DeviceData,
    ForgetSpec,
    RawData,
    dataset_info,
    indices_hash,
    load_raw,
    make_split,
    resolved_dataset_args,
)
from loaders.torchvision_files import DatasetUnavailable
from models import build_model
from training.checkpoints import save_checkpoint, versions
from training.config import TrainConfig
from training.cost import machine
from training.loop import eval_accuracy, fit
from training.precision import amp_name
from training.pretrain import (
    ENCODERS,
    finetune,
    pretrain_record,
    pretrain_tag,
    pretrained_encoder,
    pretraining_data,
    pretraining_indices,
    resolved_pretrain,
    shares_encoder,
    with_pretraining,
)

RECIPE_HASH_CHARS = 10  # hex digits of the recipe hash in a base model's cache name


def resolved_model(cfg: TrainConfig) -> str:
    return cfg.model or dataset_info(cfg.dataset).default_model


def resolved_recipe(cfg: TrainConfig) -> dict[str, Any]:
    """Every field of the recipe with every default filled in: the model resolved to the
    dataset's default, the loader's default dataset arguments added, float fields as floats
    (``"lr": 1`` and ``"lr": 1.0`` are one recipe), classes sorted (TrainConfig does that)."""
    d = cfg.to_json() | {"classes": cfg.classes}
    defaults = TrainConfig().to_json()
    for key, value in d.items():
        if isinstance(defaults.get(key), float) and type(value) is int:
            d[key] = float(value)
    d["model"] = resolved_model(cfg)
    d["dataset_args"] = resolved_dataset_args(cfg.dataset, cfg.dataset_args)
    if cfg.pretrain is not None:  # absent otherwise: supervised-only names stay as they were
        d["pretrain"] = resolved_pretrain(cfg)
    return d


def base_checkpoint_name(cfg: TrainConfig) -> str:
    """The cache name of a base model: a readable prefix and a hash of the resolved recipe.

    The recipe ``{}``, the same recipe written out in full and ``python train.py`` without
    flags resolve to the same name; a change to any field gives another one. A recipe with
    self-supervised pretraining has ``-byol`` (``-byol-linear``) in its prefix and its whole
    resolved ``pretrain`` object in the hash; one without has neither, so its name is the one
    it always had.
    """
    recipe = resolved_recipe(cfg)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    extra = "".join(f"-{v}" for _, v in sorted(recipe["dataset_args"].items()))
    if cfg.classes is not None:
        extra += "-c" + "-".join(map(str, cfg.classes))
    extra += pretrain_tag(cfg)
    return f"{recipe['model']}_{cfg.dataset}{extra}_base_s{cfg.seed}_{digest[:RECIPE_HASH_CHARS]}"


def oracle_checkpoint_name(
    base_name: str, spec: ForgetSpec, forget: Tensor, shared_encoder: bool = False
) -> str:
    """The cache name of the retrain oracle of a base model for exactly this forget set
    (``_SE``: fine-tuned from the base model's encoder, the pretrain_oracle approximation)."""
    # a replacement oracle also learns `new` in `old`'s slot: not the forget-only oracle
    kind = "RF" if spec.replace is None else f"RP{spec.replace}"
    return f"{base_name}__{kind}_{indices_hash(forget)[:16]}" + ("_SE" if shared_encoder else "")


def load_data(cfg: TrainConfig, data_dir: Path | None, download: bool = True) -> RawData:
    try:
        return load_raw(cfg.dataset, data_dir, download, **cfg.dataset_args)
    except DatasetUnavailable as e:
        raise UserError(str(e)) from None


def train_checkpoint(
    cfg: TrainConfig,
    spec: ForgetSpec,
    out: Path,
    *,
    device: torch.device,
    raw: RawData | None = None,
    data: DeviceData | None = None,
    data_dir: Path | None = None,
    stem: str | None = None,
    comment: str = "",
    extra_meta: dict[str, Any] | None = None,
    quiet: bool = False,
    verbose: bool = True,
    encoder_dir: Path | None = None,
    pretrain_oracle: str = "exact",
) -> Path:
    """Train on the retain set of `spec` (the whole training part when it is empty) and save.

    A recipe with ``pretrain`` first pretrains the encoder (training/pretrain.py; cached in
    `encoder_dir`, default ``<out>/encoders``) without the forget set, or reuses the base
    model's encoder with ``pretrain_oracle="shared"``, then fine-tunes it.

    Prints what it trains and what it saved unless `quiet`, and a line per epoch when also
    `verbose`; the sidecar records the device, the thread count and the mixed precision used.
    """
    cfg.check()
    raw = raw if raw is not None else load_data(cfg, data_dir)
    split = make_split(raw, spec, cfg.split_seed, cfg.val_fraction, cfg.classes)
    data = data if data is not None else DeviceData(raw, device)
    model_name = resolved_model(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, raw.num_classes, raw.in_chans).to(device)
    shared = spec.kind != "none" and shares_encoder(cfg, pretrain_oracle)
    if stem is None:
        stem = base_checkpoint_name(cfg)
        if spec.kind != "none":
            stem = oracle_checkpoint_name(stem, spec, split.forget, shared)
        stem = f"{stem}_{comment}" if comment else stem
    what = "base model" if spec.kind == "none" else f"retrain oracle ({spec.describe()})"

    def log(row: dict[str, float]) -> None:
        if verbose and not quiet:
            say(
                f"  [{stem}] epoch {int(row['epoch']):3d}  loss {row['train_loss']:.4f}  "
                f"val acc {row['val_acc']:.4f}"
            )

    if not quiet:
        say(
            f"training {what}: {model_name} on {cfg.dataset}, {len(split.retain)} samples "
            f"({len(split.forget)} forgotten), {cfg.epochs} epochs, device {device}"
        )
    pre: dict[str, Any] = {}
    pretrain_seconds, pretrain_cost = 0.0, None
    if cfg.pretrain is not None:

        def byol_log(row: dict[str, float]) -> None:
            if verbose and not quiet:
                say(
                    f"  [{stem}] byol epoch {int(row['epoch']):3d}  loss {row['loss']:.4f}  "
                    f"tau {row['tau']:.4f}  knn acc {row.get('knn_acc', float('nan')):.4f}"
                )

        pdata, source = pretraining_data(cfg, data, data_dir)
        images, excluded = pretraining_indices(cfg, raw, split, pdata, source, shared)
        folder = encoder_dir if encoder_dir is not None else out / ENCODERS
        enc = pretrained_encoder(
            cfg, model_name, raw, pdata, source, images, excluded, split, folder,
            device=device, desc=f"{stem} byol", quiet=quiet, log=byol_log,
        )  # fmt: skip
        model = enc.model
        oracle = spec.kind != "none"
        pre = {"pretrain": pretrain_record(cfg, enc, source, not shared, oracle)}
        # the cost of making this model from nothing: its own encoder's pretraining counts;
        # one that needed none for this forget set (shared, or disjoint data) does not
        if not oracle or (source == "train" and not shared):
            pretrain_seconds = float(enc.meta["byol"]["seconds"])
            pretrain_cost = enc.meta.get("cost")
        torch.manual_seed(cfg.seed)  # the fine-tuning starts alike from a cached encoder
        result = finetune(model, data, split, cfg, desc=stem, log=log)
        extra_meta = pre | (extra_meta or {})
    else:
        result = fit(model, data, split.retain, split.val, cfg, desc=stem, log=log)
    accs = {
        "train_acc": eval_accuracy(model, data, split.retain),
        "forget_acc": eval_accuracy(model, data, split.forget),
        "val_acc": eval_accuracy(model, data, split.val),
        "test_acc": eval_accuracy(model, data, split.test, "test"),
        "test_forget_acc": eval_accuracy(model, data, split.test_forget, "test"),
    }
    meta = {
        "model": model_name,
        "dataset": cfg.dataset,
        "dataset_args": cfg.dataset_args,
        "num_classes": raw.num_classes,
        "in_chans": raw.in_chans,
        "img_size": list(raw.img_size),
        "kind": "base" if spec.kind == "none" else "retrain",
        "split": {
            "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "forget": spec.to_json(),
            "sizes": split.summary(),
        }
        | ({"classes": cfg.classes} if cfg.classes is not None else {}),
        "train": cfg.to_json() | {"model": model_name},
        "metrics": accs,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": round(result.seconds + pretrain_seconds, 3),
        # the work of this training (training/cost.py), with the pretraining it needed
        "cost": with_pretraining(result.work.to_json(), pretrain_cost),
        "history": result.history,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "host": machine(device)["host"],
        "amp": amp_name(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "comment": comment,
    } | (extra_meta or {})
    path = save_checkpoint(out / stem, model, meta, split.forget)
    if not quiet:
        say(
            f"saved {path}  (val {accs['val_acc']:.4f}, test {accs['test_acc']:.4f}, "
            f"{result.seconds:.1f}s)"
        )
    return path
