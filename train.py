"""Train a base model, or a retrain-from-scratch oracle when a forget set is given.

``python train.py`` trains the dataset's default model on the training part of the pool;
``--cf``, ``--unlr`` or ``--itf`` remove a forget set and train on the retain set only (the
exact-unlearning oracle of the SalUn paper). The checkpoint, its sidecar and its forget-index
JSON are written to ``--out`` (default ``checkpoints/``). ``--classes 0,1,2`` trains on those
classes only (pool, validation and test restricted to them; labels keep their dataset ids, so
the model keeps one output per dataset class); the sidecar records the subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ckpt import save_checkpoint, versions
from datasets import (
    DeviceData,
    ForgetSpec,
    RawData,
    dataset_info,
    default_data_dir,
    load_raw,
    make_forget_spec,
    make_split,
    pick_device,
)
from errors import UserError, cli
from models import build_model
from training import TrainConfig, eval_accuracy, fit
from tv_datasets import DatasetUnavailable


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


def parse_classes(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class index or a comma-separated list, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="model name (default: the dataset's default)")
    p.add_argument("--dataset", default=d.dataset, help="dataset name (default: %(default)s)")
    p.add_argument("--emnist-split", default=None, help="EMNIST split (default: balanced)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (%(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (%(default)s)")
    p.add_argument("--pat", type=int, default=d.patience, help="patience in epochs, 0 = off")
    p.add_argument("--cf", type=parse_classes, default=None, help="class(es) to forget: 7 or 3,5")
    p.add_argument("--unlr", type=float, default=None, help="fraction of the pool to forget")
    p.add_argument("--itf", default=None, help="forget-index JSON (list of pool indices)")
    p.add_argument("--comment", default="", help="suffix for the checkpoint name")
    p.add_argument(
        "--classes",
        type=parse_classes,
        default=None,
        help="train on these classes only, e.g. 0,1,2 (labels keep their ids; default: all)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="training and forget-draw seed")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="validation split seed")
    p.add_argument("--val-frac", type=float, default=d.val_fraction, help="validation share")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--wd", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--schedule", default=d.schedule, help="onecycle, cosine or constant")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ./data")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="output folder")
    return p


@cli
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    dataset_info(args.dataset)
    dataset_args = {"split": args.emnist_split} if args.emnist_split else {}
    cfg = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        dataset_args=dataset_args,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        momentum=args.momentum,
        weight_decay=args.wd,
        schedule=args.schedule,
        patience=args.pat,
        augment=not args.no_augment,
        seed=args.seed,
        split_seed=args.split_seed,
        val_fraction=args.val_frac,
        classes=args.classes,
    )
    cfg.check()
    cf = args.cf[0] if args.cf and len(args.cf) == 1 else args.cf
    spec = make_forget_spec(cf, args.unlr, args.itf, seed=args.seed, where="")
    device = pick_device(args.device)
    raw = load_data(cfg, args.data_dir or default_data_dir())
    # check the forget set against the data before any training starts
    make_split(raw, spec, cfg.split_seed, cfg.val_fraction, cfg.classes)
    start = time.perf_counter()
    path = train_checkpoint(cfg, spec, args.out, device=device, raw=raw, comment=args.comment)
    print(json.dumps({"checkpoint": str(path), "seconds": round(time.perf_counter() - start, 1)}))
    return path


if __name__ == "__main__":
    main()
