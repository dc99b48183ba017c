"""Throughput of BYOL pretraining against supervised training on the same model and data path.

Supervised: ``training.loop.fit`` (cross-entropy, crop/flip augmentation, SGD). BYOL:
``training.byol.pretrain_byol`` with its kNN monitor off; each image becomes two views made on
the device, goes through the online network (forward and backward) and the EMA target
(forward). Both draw shuffled batches from ``DeviceData.batches`` over the same pool with the
same batch size; "views" times the view-making alone. Images per second count training images
(not views), the best of ``--repeats`` interleaved measurements.

    OMP_NUM_THREADS=1 python bench/bench_byol.py --threads 1          # mnist5k, lenet, cpu
    python bench/bench_byol.py --dataset cifar10 --model resnet18_cifar --device cuda
    python bench/bench_byol.py --tiny                                    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
# ruff: noqa: E402  (the project imports must follow the line above)

from core.cli_options import add_data_dir, add_device, add_threads, apply_threads, new_parser
from core.errors import UserError, cli
from datasets import DeviceData, default_data_dir, load_raw, pick_device
from models import build_model
from training.byol import ByolConfig, pretrain_byol, two_views, view_augment
from training.config import TrainConfig
from training.loop import fit

TINY_POOL = 256


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("--dataset", default="mnist5k", help="(%(default)s)")
    p.add_argument("--model", default=None, help="default: the dataset's default model")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement (%(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(%(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="best of N measurements (%(default)s)")
    p.add_argument("--tiny", action="store_true", help=f"{TINY_POOL} images, 1 epoch, 1 repeat")
    add_device(p)
    add_threads(p)
    add_data_dir(p)
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@cli
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.epochs, args.repeats = 1, 1
    if min(args.epochs, args.batch_size, args.repeats) < 1:
        raise UserError("--epochs, --batch-size and --repeats must be positive integers")
    apply_threads(args.threads)
    device = pick_device(args.device)
    raw = load_raw(args.dataset, args.data_dir or default_data_dir())
    model_name = args.model or raw.info.default_model
    data = DeviceData(raw, device)
    pool = torch.arange(TINY_POOL if args.tiny else len(raw.train_y))
    none = pool[:0]
    sup = TrainConfig(model=model_name, dataset=args.dataset, epochs=args.epochs,
                      batch_size=args.batch_size)  # fmt: skip
    byol = ByolConfig(epochs=args.epochs, batch_size=args.batch_size, knn_every=0)
    aug = view_augment(data, byol.crop_scale)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(model_name, raw.num_classes, raw.in_chans).to(device)

    def time_it(fn: object) -> float:
        sync(device)
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        sync(device)
        return time.perf_counter() - t

    def views() -> None:
        g = torch.Generator().manual_seed(0)
        for _ in range(args.epochs):
            for x, _, _ in data.batches(pool, args.batch_size, shuffle=True, generator=g):
                two_views(data, x, aug, g)

    runs = {
        "views only (two_views)": views,
        "supervised (training.loop.fit)": lambda: fit(fresh(), data, pool, none, sup),
        "BYOL (pretrain_byol)": lambda: pretrain_byol(fresh(), data, pool, none, byol),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.dataset} pool: {len(pool)} images {'x'.join(map(str, raw.train_x.shape[1:]))}, "
        f"{model_name}, batch {args.batch_size}, {args.epochs} epochs, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{load:.1f}, best of {args.repeats}"
    )
    best = dict.fromkeys(runs, 0.0)
    for _ in range(args.repeats):
        for name, fn in runs.items():  # interleaved: a busy spell hits all alike
            best[name] = max(best[name], args.epochs * len(pool) / time_it(fn))
    print(f"\n{'run':32s} {'images/s':>10s}")
    for name, v in best.items():
        print(f"{name:32s} {v:10,.0f}")
    ratio = best["supervised (training.loop.fit)"] / best["BYOL (pretrain_byol)"]
    print(f"\nBYOL costs {ratio:.1f}x the time per image of supervised training")
    return best


if __name__ == "__main__":
    main()
