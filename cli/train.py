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
import time
from pathlib import Path

from core.errors import cli
from datasets import (
    dataset_info,
    default_data_dir,
    make_forget_spec,
    make_split,
    pick_device,
)
from training.config import TrainConfig
from training.recipe import load_data, train_checkpoint


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
