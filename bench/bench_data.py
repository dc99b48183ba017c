"""Training throughput of train.py's data path against a per-sample PIL DataLoader.

Ours: the pool as uint8 tensors on the device, ``DeviceData.batches`` drawing shuffled batches
and augmenting each batch at once (random crop with 2-pixel padding; no flips on digits), then
the SGD steps of ``training.fit``. Reference: the seed's pipeline, a torchvision ``DataLoader``
with per-sample PIL transforms ``RandomCrop(28, padding=2) + ToTensor + Normalize`` and batch
size 32. Both train the same LeNet on the same mnist5k pool for the same number of epochs; the
data path alone (no model) is measured too. Throughput is images per second, the best of
``--repeats`` interleaved measurements; "seconds" is the total time spent on a row.

    OMP_NUM_THREADS=1 python bench/bench_data.py --threads 1   # 3 epochs, auto device
    python bench/bench_data.py --epochs 5 --device cuda --batch-size 256
    python bench/bench_data.py --tiny      # seconds: 512 images, 1 epoch (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
# ruff: noqa: E402  (the project imports must follow the line above)

from core.cli_options import add_data_dir, add_device, add_threads, apply_threads, new_parser
from core.errors import UserError, cli
from datasets import DeviceData, RawData, default_data_dir, load_raw, pick_device
from models import build_model
from training.config import TrainConfig
from training.loop import make_optimizer, step

REF_BATCH = 32
WARMUP = 256  # images run through each pipeline before timing starts
TINY_POOL = 512  # --tiny: images in the pool (and no more than 64 warm-up images)


class PilDataset(Dataset):
    """The seed's dataset: one PIL image per sample, transformed on the fly."""

    def __init__(self, x: Tensor, y: Tensor, transform: Callable[[Image.Image], Tensor]) -> None:
        self.x = x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).numpy()
        self.y = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def reference_loader(
    raw: RawData, idx: Tensor, workers: int, device: torch.device, seed: int
) -> DataLoader:
    h, w = raw.img_size
    tf = transforms.Compose(
        [
            transforms.RandomCrop((h, w), padding=raw.info.crop_pad),
            transforms.ToTensor(),
            transforms.Normalize(raw.mean, raw.std),
        ]
    )
    return DataLoader(
        PilDataset(raw.train_x[idx], raw.train_y[idx], tf),
        batch_size=REF_BATCH,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]


def ours_batches(data: DeviceData, idx: Tensor, bs: int, g: torch.Generator) -> Batches:
    def epoch() -> Iterable[tuple[Tensor, Tensor]]:
        for x, y, _ in data.batches(idx, bs, shuffle=True, augment=True, generator=g):
            yield x, y

    return epoch


def reference_batches(loader: DataLoader, device: torch.device) -> Batches:
    def epoch() -> Iterable[tuple[Tensor, Tensor]]:
        nb = device.type == "cuda"
        for x, y in loader:
            yield x.to(device, non_blocking=nb), y.to(device, non_blocking=nb)

    return epoch


def run(
    batches: Batches,
    epochs: int,
    device: torch.device,
    model: nn.Module | None = None,
    max_images: int | None = None,
) -> tuple[int, float]:
    """Images seen and seconds taken; with a model, one training.fit-style step per batch.

    With ``max_images`` it stops after the batch that reaches that many images.
    """
    opt = None
    if model is not None:
        cfg = TrainConfig()
        opt = make_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        model.train()
    sync(device)
    start = time.perf_counter()
    n, total = 0, 0.0
    for _ in range(epochs):
        for x, y in batches():
            if model is not None and opt is not None:
                loss = F.cross_entropy(model(x), y)
                step(loss, opt)
                total += loss.item() * len(y)  # fit() logs the epoch loss this way
            n += len(y)
            if max_images is not None and n >= max_images:
                break
        if max_images is not None and n >= max_images:
            break
    sync(device)
    return n, time.perf_counter() - start


def fresh_lenet(raw: RawData, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("lenet", raw.num_classes, raw.in_chans).to(device)


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (%(default)s)")
    add_device(p)
    p.add_argument("--batch-size", type=int, default=128, help="our batch size (%(default)s)")
    p.add_argument("--workers", type=int, default=0, help="reference DataLoader workers (0)")
    add_threads(p)
    add_data_dir(p)
    p.add_argument("--repeats", type=int, default=2, help="best of N measurements (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help=f"a check that it runs: {TINY_POOL} images, 1 epoch, 1 repeat")  # fmt: skip
    return p


Row = tuple[str, int, float, float, float]  # pipeline, batch, data img/s, train img/s, seconds


@cli
def main(argv: list[str] | None = None) -> list[Row]:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.epochs, args.repeats = 1, 1
    if min(args.epochs, args.batch_size, args.repeats) < 1 or args.workers < 0:
        raise UserError("--epochs, --batch-size and --repeats must be positive, --workers >= 0")
    apply_threads(args.threads)
    device = pick_device(args.device)
    raw = load_raw("mnist5k", args.data_dir or default_data_dir())
    data = DeviceData(raw, device)
    idx = torch.arange(TINY_POOL if args.tiny else len(raw.train_y))
    warmup = min(WARMUP, 64) if args.tiny else WARMUP
    loader = reference_loader(raw, idx, args.workers, device, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the PIL transforms draw from the global generator

    configs: list[tuple[str, int, Batches]] = [
        ("reference: DataLoader + PIL", REF_BATCH, reference_batches(loader, device)),
        ("ours: DeviceData.batches", args.batch_size, ours_batches(data, idx, args.batch_size, g)),
    ]
    if args.batch_size != REF_BATCH:
        configs.append(
            ("ours: DeviceData.batches", REF_BATCH, ours_batches(data, idx, REF_BATCH, g))
        )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"mnist5k pool: {len(idx)} images 1x28x28, lenet, {args.epochs} epochs, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}, reference workers {args.workers}, "
        f"best of {args.repeats}"
    )
    # best of --repeats, configurations interleaved so a busy spell hits all of them alike
    best = [[0.0, 0.0, 0.0] for _ in configs]  # data img/s, train img/s, seconds
    for _ in range(args.repeats):
        for (_, _, batches), b in zip(configs, best, strict=True):
            run(batches, 1, device, max_images=warmup)
            n, t_data = run(batches, args.epochs, device)
            run(batches, 1, device, fresh_lenet(raw, device, args.seed), max_images=warmup)
            n2, t_train = run(batches, args.epochs, device, fresh_lenet(raw, device, args.seed))
            b[0], b[1] = max(b[0], n / t_data), max(b[1], n2 / t_train)
            b[2] += t_data + t_train
    rows: list[Row] = [
        (name, bs, b[0], b[1], b[2]) for (name, bs, _), b in zip(configs, best, strict=True)
    ]

    print()
    print(
        f"{'pipeline':30s} {'batch':>5s} {'data img/s':>11s} {'train img/s':>12s} {'seconds':>8s}"
    )
    for name, bs, d, t, s in rows:
        print(f"{name:30s} {bs:5d} {d:11,.0f} {t:12,.0f} {s:8.1f}")
    ref = rows[0]
    print()
    print("ratios (ours / reference):")
    for _, bs, d, t, _ in rows[1:]:
        print(f"  batch {bs:4d}: data path {d / ref[2]:6.1f}x   training {t / ref[3]:6.1f}x")
    return rows


if __name__ == "__main__":
    main()
