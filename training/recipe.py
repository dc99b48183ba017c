"""From a recipe to a checkpoint: model name, cache name, data, and the training run itself."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from datasets import DeviceData, ForgetSpec, RawData, dataset_info, load_raw, make_split
from loaders.torchvision_files import DatasetUnavailable
from models import build_model
from training.checkpoints import save_checkpoint, versions
from training.config import TrainConfig
from training.loop import eval_accuracy, fit


def resolved_model(cfg: TrainConfig) -> str:
    return cfg.model or dataset_info(cfg.dataset).default_model


def checkpoint_stem(cfg: TrainConfig, spec: ForgetSpec, comment: str = "") -> str:
    kind = "base" if spec.kind == "none" else f"RF_{spec.describe()}"
    extra = "".join(f"-{v}" for _, v in sorted(cfg.dataset_args.items()))
    if cfg.classes is not None:
        extra += "-c" + "-".join(map(str, cfg.classes))
    name = f"{resolved_model(cfg)}_{cfg.dataset}{extra}_{kind}_s{cfg.seed}"
    return f"{name}_{comment}" if comment else name


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
) -> Path:
    """Train on the retain set of `spec` (the whole training part when it is empty) and save."""
    cfg.check()
    raw = raw if raw is not None else load_data(cfg, data_dir)
    split = make_split(raw, spec, cfg.split_seed, cfg.val_fraction, cfg.classes)
    data = data if data is not None else DeviceData(raw, device)
    model_name = resolved_model(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, raw.num_classes, raw.in_chans).to(device)
    stem = stem or checkpoint_stem(cfg, spec, comment)
    what = "base model" if spec.kind == "none" else f"retrain oracle ({spec.describe()})"

    def log(row: dict[str, float]) -> None:
        if not quiet:
            print(
                f"  [{stem}] epoch {int(row['epoch']):3d}  loss {row['train_loss']:.4f}  "
                f"val acc {row['val_acc']:.4f}",
                file=sys.stderr,
            )

    if not quiet:
        print(
            f"training {what}: {model_name} on {cfg.dataset}, {len(split.retain)} samples "
            f"({len(split.forget)} forgotten), {cfg.epochs} epochs, device {device}",
            file=sys.stderr,
        )
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
        "train_seconds": round(result.seconds, 3),
        "history": result.history,
        "device": str(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "comment": comment,
    } | (extra_meta or {})
    path = save_checkpoint(out / stem, model, meta, split.forget)
    if not quiet:
        print(
            f"saved {path}  (val {accs['val_acc']:.4f}, test {accs['test_acc']:.4f}, "
            f"{result.seconds:.1f}s)",
            file=sys.stderr,
        )
    return path
