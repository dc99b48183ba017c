"""Sweep throughput on one machine: the same ``main.py`` sweep with 1, 2, ... worker processes.

Each sweep is ``main.py -L <file> --nexp <n> -NL -q --workers W`` (called in this process; its
workers are spawned processes), from an empty checkpoint folder unless ``--warm``, so it
includes training the base models and the retrain oracles. For every worker count it prints the
wall time, tasks per minute (base models + oracles + runs done), images per second (the samples
of every training and unlearning pass, as training/cost.py counts them, per second of wall time)
and the speed-up against one worker, and checks that every run's metrics.json holds the same
numbers as with one worker (wall times and checkpoint folders aside). The load average before
and after each sweep is printed: on a machine shared with other jobs the ratios mean little.

    python bench/bench_sweep.py                           # quickstart x 3 seeds, 1..cores workers
    python bench/bench_sweep.py --workers 1,2 --device cpu
    python bench/bench_sweep.py --device cuda --workers 1,2,4 --tasks-per-gpu 2
    python bench/bench_sweep.py --tiny     # a 1-epoch base model, 1 experiment x 2 seeds
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
# ruff: noqa: E402  (the project imports must follow the line above)

from cli import main as main_cli
from core.cli_options import add_data_dir, add_device, add_threads, new_parser
from core.errors import UserError, cli
from running.threads import usable_cores

REPO = Path(__file__).resolve().parent.parent
TINY_EXPERIMENTS = [
    {
        "checkpoint": {"model": "lenet", "dataset": "mnist5k", "epochs": 1},
        "class_to_forget": 3,
        "method": "ga_small",
        "epochs": 1,
        "lr": 0.001,
    }
]


class Row(NamedTuple):
    device: str
    workers: int
    seconds: float
    tasks: int
    images: float  # NaN when the files record no sample counts
    ratio: float  # wall time with one worker / with this many
    identical: bool | None  # None: the reference row itself

    @property
    def tasks_per_minute(self) -> float:
        return 60 * self.tasks / self.seconds

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("-L", "--load", type=Path, default=REPO / "exp" / "quickstart.json",
                   help="experiment list (%(default)s)")  # fmt: skip
    p.add_argument("--nexp", type=int, default=3, help="seeds per experiment (%(default)s)")
    p.add_argument("--workers", help="worker counts, e.g. 1,2,4 (default: 1..usable cores, or "
                   "1..GPUs on CUDA)")  # fmt: skip
    p.add_argument("--tasks-per-gpu", type=int, default=1, help="CUDA (%(default)s)")
    p.add_argument("--warm", action="store_true",
                   help="build the checkpoints once first, then time the runs only")  # fmt: skip
    p.add_argument("--keep", type=Path, help="keep the run and checkpoint folders here")
    p.add_argument("--tiny", action="store_true", help="seconds: a 1-epoch base model, 2 runs")
    add_device(p)
    add_threads(p)
    add_data_dir(p)
    return p


def worker_counts(text: str | None, device: str, tiny: bool) -> list[int]:
    if text is None:
        top = torch.cuda.device_count() if device == "cuda" else usable_cores()
        return [1, 2] if tiny else list(range(1, max(top, 1) + 1))
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--workers {text!r} is invalid; use counts such as 1,2,4")
    return sorted(set(counts) | {1})  # one worker is the reference


def numbers(run: Path) -> dict[str, Any]:
    m = json.loads((run / "metrics.json").read_text())
    return {
        k: v for k, v in m.items() if k not in ("times", "base_checkpoint", "oracle_checkpoint")
    }


def samples(obj: dict[str, Any] | None) -> float:
    """Forward and backward samples of a cost record (training/cost.py); NaN without one."""
    if not isinstance(obj, dict):
        return math.nan
    counts = [obj.get(k) for k in ("backward_samples", "forward_samples")]
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in counts):
        return math.nan
    return float(sum(counts))  # type: ignore[arg-type]


def count_work(out: Path, ck: Path, since: float) -> tuple[int, float]:
    """Tasks done in a sweep (runs, and checkpoints written after `since`) and their images."""
    tasks, images = 0, 0.0
    for side in [*ck.glob("*.json"), *(ck / "oracles").glob("*.json")]:
        if side.name.endswith("_forget.json") or side.stat().st_mtime < since:
            continue
        tasks += 1
        images += samples(json.loads(side.read_text()).get("cost"))
    for metrics in out.glob("runs/*/seed*/metrics.json"):
        tasks += 1
        t = json.loads(metrics.read_text()).get("times", {})
        images += samples(
            {k: t.get(f"unlearn_{k}") for k in ("backward_samples", "forward_samples")}
        )
    return tasks, images


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def sweep(
    args: argparse.Namespace, exp: Path, device: str, workers: int, root: Path
) -> tuple[Path, Path, float, float]:
    out, ck = (
        root / f"{device}_w{workers}",
        root / ("ck" if args.warm else f"ck_{device}_w{workers}"),
    )
    argv = ["-L", str(exp), "--nexp", str(args.nexp), "-NL", "-q", "--device", device]
    argv += ["--workers", str(workers), "--threads-per-task", str(args.threads or 1)]
    argv += ["--out", str(out), "--checkpoints", str(ck)]
    if device == "cuda":
        argv += ["--tasks-per-gpu", str(args.tasks_per_gpu)]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    if args.tiny:
        argv += ["--no-repr"]
    since = time.time() - 1
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the sweep's table: not this bench's output
        code = main_cli.main(argv)
    if code != 0:
        raise UserError(f"the sweep with --workers {workers} failed")
    return out, ck, time.perf_counter() - start, since


def bench(args: argparse.Namespace, root: Path) -> list[Row]:
    exp = args.load
    if args.tiny:
        exp = root / "tiny.json"
        exp.write_text(json.dumps(TINY_EXPERIMENTS))
        args.nexp = 2
    devices = [args.device] if args.device else ["cpu"] + ["cuda"] * torch.cuda.is_available()
    rows: list[Row] = []
    print(f"sweep: {exp.name} x {args.nexp} seeds, {args.threads or 1} thread(s) per task, "
          f"{usable_cores()} usable cores, {torch.cuda.device_count()} GPUs, torch "
          f"{torch.__version__}, {'warm' if args.warm else 'empty'} checkpoint folder")  # fmt: skip
    for device in devices:
        counts = worker_counts(args.workers, device, args.tiny)
        if args.warm:  # the checkpoints first, untimed
            sweep(args, exp, device, 1, root / "warmup")
        ref: dict[str, dict[str, Any]] = {}
        ref_seconds = math.nan
        for w in counts:
            before = load()
            out, ck, seconds, since = sweep(args, exp, device, w, root)
            tasks, images = count_work(out, ck, since)
            runs = {
                str(d.relative_to(out)): numbers(d)
                for d in sorted(out.glob("runs/*/seed*"))
                if d.is_dir()
            }
            if w == 1:
                ref, identical, ref_seconds = runs, None, seconds
            else:
                identical = runs == ref
            row = Row(device, w, seconds, tasks, images, ref_seconds / seconds, identical)
            rows.append(row)
            same = {None: "reference", True: "identical", False: "DIFFERENT"}[identical]
            print(f"{device:>4}  {w:>2} workers  {seconds:8.1f} s  {row.tasks_per_minute:7.1f} "
                  f"tasks/min  {row.images_per_second:9.0f} images/s  {row.ratio:5.2f}x vs 1 "
                  f"worker  metrics {same}  (load {before} -> {load()})")  # fmt: skip
    return rows


@cli
def main(argv: list[str] | None = None) -> list[Row]:
    args = build_parser().parse_args(argv)
    if args.nexp < 1 or args.tasks_per_gpu < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--nexp, --tasks-per-gpu and --threads must be positive")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return bench(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        return bench(args, Path(tmp))


if __name__ == "__main__":
    main()
