"""Train a base model, or a retrain-from-scratch oracle when a forget set is given.

``python train.py`` trains the dataset's default model on the training part of the pool;
``--cf``, ``--unlr`` or ``--itf`` remove a forget set and train on the retain set only (the
exact-unlearning oracle of the SalUn paper). The checkpoint, its sidecar and its forget-index
JSON are written to ``--out`` (default ``checkpoints/``) under the cache name main.py uses for
the same recipe: ``<model>_<dataset>_base_s<seed>_<hash of the resolved recipe>``, and for an
oracle that name plus ``__RF_<hash of the forget set>``. ``--classes 0,1,2`` trains on those
classes only (pool, validation and test restricted to them; labels keep their dataset ids, so
the model keeps one output per dataset class); the sidecar records the subset.

``--pretrain byol`` pretrains the encoder with BYOL (Grill et al. 2020) first, on the training
part of the pool (``--pretrain-data unlabeled``: STL-10's unlabeled split), then fine-tunes the
whole model (``--finetune full``) or only its classifier (``--finetune linear``); with a forget
set the oracle's pretraining leaves it out too (``--pretrain-oracle shared``: reuse the base
model's encoder, an approximation). Encoders are cached in ``<out>/encoders/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.cli_options import add_data_dir, add_device, add_out, new_parser
from core.errors import UserError, cli
from core.userfiles import check_output_dir
from core.validation import NAME_RULE, safe_name
from datasets import (
    dataset_info,
    default_data_dir,
    make_forget_spec,
    make_split,
    pick_device,
)
from training.config import (
    FINETUNE,
    PRETRAIN_DATA,
    PRETRAIN_METHODS,
    PRETRAIN_ORACLES,
    PretrainConfig,
    TrainConfig,
)
from training.recipe import load_data, train_checkpoint


def parse_classes(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class index or a comma-separated list, got {text!r}"
        ) from None


def parse_pair(text: str) -> list[int]:
    try:
        pair = [int(t) for t in text.split(",")]
    except ValueError:
        pair = []
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers hidden,out, got {text!r}")
    return pair


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = new_parser(__doc__)
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
    b = PretrainConfig()
    g = p.add_argument_group("self-supervised pretraining (BYOL) before fine-tuning")
    g.add_argument("--pretrain", choices=PRETRAIN_METHODS, default=None, help="method")
    g.add_argument("--pretrain-epochs", type=int, help=f"pretraining epochs ({b.epochs})")
    g.add_argument("--pretrain-lr", type=float, help=f"AdamW learning rate ({b.lr})")
    g.add_argument("--pretrain-batch-size", type=int, help=f"batch size ({b.batch_size})")
    g.add_argument("--pretrain-data", choices=PRETRAIN_DATA, help=f"images ({b.data})")
    g.add_argument("--tau", type=float, help=f"EMA rate at the start, rising to 1 ({b.tau_base})")
    g.add_argument("--projector", type=parse_pair, help="projector widths hidden,out (512,128)")
    g.add_argument("--predictor-hidden", type=int, help=f"({b.predictor_hidden})")
    g.add_argument("--finetune", choices=FINETUNE, default=None, help="full (default) or linear")
    g.add_argument(
        "--pretrain-oracle",
        choices=PRETRAIN_ORACLES,
        default="exact",
        help="an oracle's encoder: pretrained without the forget set (exact, default) or the "
        "base model's (shared: an approximation)",
    )
    add_device(p)
    add_data_dir(p)
    add_out(p, "output folder (%(default)s)", Path("checkpoints"))
    return p


# the flag of each recipe key whose spelling differs from --<key>, for error messages
FLAGS = {
    "patience": "--pat",
    "weight_decay": "--wd",
    "split_seed": "--split-seed",
    "val_fraction": "--val-frac",
    "batch_size": "--batch-size",
    "augment": "--no-augment",
    "finetune": "--finetune",
}
# the pretraining flags and the keys of the pretrain object they set
PRETRAIN_FLAGS = {
    "pretrain_epochs": "epochs",
    "pretrain_lr": "lr",
    "pretrain_batch_size": "batch_size",
    "pretrain_data": "data",
    "tau": "tau_base",
    "projector": "projector",
    "predictor_hidden": "predictor_hidden",
}
FLAGS |= {f"pretrain.{k}": "--" + a.replace("_", "-") for a, k in PRETRAIN_FLAGS.items()}


def pretrain_config(args: argparse.Namespace) -> PretrainConfig | None:
    """The pretrain object the flags describe; pretraining flags need --pretrain."""
    given = {k: getattr(args, a) for a, k in PRETRAIN_FLAGS.items() if getattr(args, a) is not None}
    if args.pretrain is None:
        stray = [f"--{a.replace('_', '-')}" for a in PRETRAIN_FLAGS if getattr(args, a) is not None]
        stray += ["--finetune"] if args.finetune is not None else []
        if stray:
            raise UserError(
                f"{stray[0]} needs --pretrain byol (self-supervised pretraining is off); add "
                f"--pretrain byol or drop {' and '.join(stray)}"
            )
        return None
    return PretrainConfig(method=args.pretrain, **given)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training recipe the flags describe (checked)."""
    dataset_info(args.dataset)
    if args.emnist_split is not None and args.dataset != "emnist":
        raise UserError(
            f"--emnist-split {args.emnist_split!r} is invalid with --dataset {args.dataset}; "
            "only emnist has splits (add --dataset emnist or drop --emnist-split)"
        )
    cfg = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        dataset_args={"split": args.emnist_split} if args.emnist_split else {},
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
        pretrain=pretrain_config(args),
        finetune=args.finetune or "full",
    )
    cfg.check(flags=FLAGS)
    return cfg


def check_paths(args: argparse.Namespace) -> None:
    """Where the checkpoint goes, before any work."""
    check_output_dir(args.out, "--out")
    if args.data_dir is not None:
        check_output_dir(args.data_dir, "--data-dir")
    if args.comment and not safe_name(args.comment):
        raise UserError(f"--comment {args.comment!r} is invalid; {NAME_RULE}")


@cli
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    cfg = train_config(args)
    check_paths(args)
    cf = args.cf[0] if args.cf and len(args.cf) == 1 else args.cf
    spec = make_forget_spec(cf, args.unlr, args.itf, seed=args.seed, where="")
    device = pick_device(args.device)
    raw = load_data(cfg, args.data_dir or default_data_dir())
    wrong = [c for c in cfg.classes or [] if c >= raw.num_classes]
    if wrong:
        raise UserError(
            f"--classes {','.join(map(str, cfg.classes or []))}: class {wrong[0]} is out of "
            f"range; {raw.name} has classes 0..{raw.num_classes - 1}"
        )
    # check the forget set against the data before any training starts
    make_split(raw, spec, cfg.split_seed, cfg.val_fraction, cfg.classes)
    start = time.perf_counter()
    try:
        path = train_checkpoint(
            cfg,
            spec,
            args.out,
            device=device,
            raw=raw,
            data_dir=args.data_dir or default_data_dir(),
            comment=args.comment,
            pretrain_oracle=args.pretrain_oracle,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; nothing was saved to {args.out} (a checkpoint is written only "
            "when its training finishes)",
            file=sys.stderr,
        )
        sys.exit(130)
    print(json.dumps({"checkpoint": str(path), "seconds": round(time.perf_counter() - start, 1)}))
    return path


if __name__ == "__main__":
    main()
