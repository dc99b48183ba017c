"""Wall time of the many-model evaluation (issue 12), and the table it produces.

Runs the experiments of ``exp/epsilon_mnist5k.json`` (class 7 and a random 10%; ``rl_split``
with and without the SalUn mask, ``ft``, ``ga``; N = 32 oracles and 32 unlearned models per
forget set) from nothing: a fresh ``--checkpoints`` folder unless one is given, so the base
model, every oracle and every unlearned model is trained in the measured time. Prints, per
experiment, the eps score and forgetting quality F next to the run's Avg. Gap, MIA-Efficacy
with its interval, the sample-pass ratio, and U-LiRA's numbers when asked for; then the wall
time of the whole sweep with the machine's load, cores, workers and threads, and the summed
work of the oracles and unlearned models.

    OMP_NUM_THREADS=1 python bench/bench_epsilon.py --workers 2        # the whole file, N = 32
    python bench/bench_epsilon.py --workers 2 --only 4 --ulira 16        # random 10% rl_split + U-LiRA
    python bench/bench_epsilon.py --tiny    # seconds: one experiment, 1-epoch recipe, N = 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
# ruff: noqa: E402  (the project imports must follow the line above)

from core.cli_options import add_data_dir, add_device, add_threads, new_parser
from core.errors import UserError, cli
from datasets import pick_device
from running import many_models
from running.config import EvaluateConfig, ExperimentConfig, UliraConfig, load_experiments
from running.runner import Runner, RunnerOptions
from running.workers import backend, plan_workers
from training.config import TrainConfig

EXP = Path(__file__).resolve().parent.parent / "exp" / "epsilon_mnist5k.json"
TINY_MODELS = 3
TINY_SHADOWS = 4

Row = dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("--exp", type=Path, default=EXP, help="experiment file (%(default)s)")
    p.add_argument("--only", default=None, metavar="I,J", help="experiment indices to run")
    p.add_argument("--models", type=int, default=None, help="N (default: the file's)")
    p.add_argument("--ulira", type=int, default=0, metavar="K", help="add U-LiRA, K shadows")
    p.add_argument("--workers", type=int, default=2, help="worker processes (%(default)s)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="cache folder (default: a fresh one: everything is trained)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="run folder (default: temporary)")
    p.add_argument("--tiny", action="store_true", help="a few seconds' version")
    add_device(p)
    add_data_dir(p)
    add_threads(p)
    return p


def experiments(args: argparse.Namespace) -> list[ExperimentConfig]:
    exps = load_experiments(args.exp)
    if args.only is not None:
        try:
            exps = [exps[int(i)] for i in args.only.split(",")]
        except (ValueError, IndexError):
            raise UserError(
                f"--only {args.only}: not indices of {args.exp}'s experiments"
            ) from None
    if args.tiny:
        exps = exps[:1]
    out = []
    for e in exps:
        n = args.models or (e.evaluate.models if e.evaluate else None) or TINY_MODELS
        # U-LiRA covers random forget sets only (running/many_models.py)
        ulira = (
            UliraConfig(shadows=args.ulira) if args.ulira and e.class_to_forget is None else None
        )
        e = dataclasses.replace(e, evaluate=EvaluateConfig(models=n, ulira=ulira))
        if args.tiny and isinstance(e.checkpoint, TrainConfig):
            e = dataclasses.replace(e, checkpoint=dataclasses.replace(e.checkpoint, epochs=1),
                                    epochs=1)  # fmt: skip
        out.append(e)
    return out


def table(runner: Runner) -> list[Row]:
    rows = []
    for job, r in zip(runner.jobs, runner.collect(), strict=True):
        d = many_models.epsilon_dir(runner, job)
        eps = json.loads((d / "epsilon.json").read_text())
        u_path = d / many_models.ULIRA_FILE
        u = json.loads(u_path.read_text()) if u_path.is_file() else {}
        m = r.metrics
        rows.append({
            "experiment": job.folder,
            "n": eps["n_models"],
            "eps_score": eps["score"],
            "F": eps["forgetting_quality"],
            "avg_gap": r.gaps["avg_gap"],
            "mia": (m["mia_efficacy"], m.get("mia_efficacy_low"), m.get("mia_efficacy_high")),
            "mia_flags": m.get("mia_efficacy_flags", []),
            "passes": r.times.get("sample_pass_ratio"),
            "time_ratio": r.times.get("time_ratio"),
            "ulira": {k: u.get(k) for k in ("acc", "auc", "tpr_1pct", "tpr_01pct")} if u else None,
            "cost": eps["cost"],
        })  # fmt: skip
    return rows


def _num(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None or x != x else format(x, fmt)


def report(rows: list[Row]) -> None:
    head = ["experiment", "N", "eps score", "F", "avg gap", "MIA [95% CI]", "passes/oracle"]
    ul = any(r["ulira"] for r in rows)
    head += ["U-LiRA acc", "AUC", "TPR@1%", "TPR@0.1%"] if ul else []
    lines = [head]
    for r in rows:
        mean, low, high = r["mia"]
        flag = " !" if r["mia_flags"] and set(r["mia_flags"]) & {"degenerate", "unstable"} else ""
        cells = [r["experiment"], str(r["n"]), _num(r["eps_score"]), _num(r["F"]),
                 _num(r["avg_gap"], ".2f"),
                 f"{_num(mean, '.2f')} [{_num(low, '.2f')}, {_num(high, '.2f')}]{flag}",
                 _num(r["passes"])]  # fmt: skip
        if ul:
            u = r["ulira"] or {}
            cells += [_num(u.get(k)) for k in ("acc", "auc", "tpr_1pct", "tpr_01pct")]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))  # fmt: skip


@cli
def main(argv: list[str] | None = None) -> list[Row]:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.models, args.workers = args.models or TINY_MODELS, 1
    threads = args.threads or 1
    device = pick_device(args.device)
    exps = experiments(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_epsilon_"))
    ckpt = args.checkpoints or tmp / "checkpoints"
    out = args.out or tmp / "out"
    opts = RunnerOptions(source=str(args.exp), out=out, ckpt_dir=ckpt, device=device,
                         data_dir=args.data_dir, quiet=True, threads=threads)  # fmt: skip
    runner = Runner(exps, opts)
    runner.resolve()
    plan = plan_workers(str(args.workers), device, threads=threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    todo = len(runner.graph().todo())
    n = many_models.models_of(runner.jobs[0])
    print(
        f"{len(exps)} experiments of {args.exp.name}, N = {n}"
        f"{f', U-LiRA {args.ulira} shadows' if args.ulira else ''}; {todo} tasks on "
        f"{plan.describe()}; device {device}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} (1 min) {load[1]:.1f} (5 min) before the start"
    )
    start = time.perf_counter()
    try:
        runner.run_all(backend(plan))
        wall = time.perf_counter() - start
        rows = table(runner)
    finally:
        if args.out is None and args.checkpoints is None and not args.tiny:
            print(f"(files kept in {tmp})")
        elif args.out is None and args.checkpoints is None:
            shutil.rmtree(tmp, ignore_errors=True)
    after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report(rows)
    cost_u = sum(r["cost"]["unlearned"]["wall_seconds"] or 0 for r in rows)
    cost_r = sum(r["cost"]["retrained"]["wall_seconds"] or 0 for r in rows)
    print(
        f"wall time {wall:.1f} s for the whole sweep (base, oracles, runs, epsilon"
        f"{', U-LiRA' if args.ulira else ''}); load average {after:.1f} at the end; summed "
        f"training wall time of the oracles {cost_r:.1f} s, of the unlearned models "
        f"{cost_u:.1f} s (an oracle shared by experiments counts once per experiment)"
    )
    return rows


if __name__ == "__main__":
    main()
