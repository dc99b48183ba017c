"""Run unlearning experiments over several seeds and compare them with the retrain oracle.

    python main.py -L exp/quickstart.json --nexp 3
    python main.py -c checkpoints/lenet_mnist5k_base_s0.safetensors -CF 7 -M rl_split -UM

Every experiment of the list is validated first; then each runs ``--nexp`` times with seeds
``--seed``, ``--seed + 1``, ... Results go to ``output/<timestamp>_<name>/`` (or ``--out``,
where a rerun skips the runs that already finished).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from analysis.report import write_report
from core.errors import UserError, cli
from core.io import atomic_write_text
from datasets import pick_device
from running.config import ExperimentConfig, load_experiments, parse_experiment
from running.runner import Runner, timestamp
from running.tables import summarize, table_cells, to_text
from running.wandb_log import MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-L", "--load", type=Path, help="JSON list of experiments")
    p.add_argument("--nexp", type=int, default=1, help="runs (seeds) per experiment")
    p.add_argument("--seed", type=int, default=0, help="base seed: run i uses seed + i")
    g = p.add_argument_group("a single experiment from flags (without -L)")
    g.add_argument("-c", "--checkpoint", help="base checkpoint (.safetensors with .json)")
    g.add_argument("-CF", "--class-to-forget", type=int, nargs="+", help="class(es) to forget")
    g.add_argument("-UL", "--unlearning-rate", type=float, help="fraction of the pool to forget")
    g.add_argument("--itf", help="forget-index JSON")
    g.add_argument("-M", "--method", help="unlearning method")
    g.add_argument("-E", "--epochs", type=int, help="unlearning epochs")
    g.add_argument("-LR", "--lr", type=float, help="unlearning learning rate")
    g.add_argument("-UM", "--use-mask", action="store_true", help="use the SalUn saliency mask")
    g.add_argument("-MT", "--mask-thr", type=float, help="fraction of weights the mask keeps")
    g.add_argument("-LM", "--load-mask", help="load a saved mask (.safetensors)")
    g.add_argument("--tag", help="name of the experiment")
    p.add_argument("-NL", "--no-log", action="store_true", help="disable Weights & Biases")
    p.add_argument("--wandb", choices=MODES, default="online", help="W&B mode (%(default)s)")
    p.add_argument("--project", default="unlearning", help="W&B project")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--out", type=Path, help="run folder (an existing one is resumed)")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                   help="where base checkpoints and oracles are cached")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ./data")
    p.add_argument("--report", action="store_true", help="write report.md/.html at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch lines")
    return p


def experiments_from_flags(args: argparse.Namespace) -> list[ExperimentConfig]:
    obj: dict[str, Any] = {}
    cf = args.class_to_forget
    pairs = {
        "checkpoint": args.checkpoint,
        "class_to_forget": cf[0] if cf and len(cf) == 1 else cf,
        "unlearning_rate": args.unlearning_rate,
        "idxs_to_forget": args.itf,
        "method": args.method,
        "epochs": args.epochs,
        "lr": args.lr,
        "mask_thr": args.mask_thr,
        "load_mask": args.load_mask,
        "tag": args.tag,
    }
    obj = {k: v for k, v in pairs.items() if v is not None}
    if args.use_mask:
        obj["use_mask"] = True
    return [parse_experiment(obj, "command line: ")]


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nexp < 1:
        raise UserError(f"--nexp {args.nexp} is invalid; use a positive integer")
    if args.load:
        experiments = load_experiments(args.load)
        source, name = str(args.load), args.load.stem
    else:
        experiments = experiments_from_flags(args)
        source, name = "command line", "cli"
    device = pick_device(args.device)
    out = args.out or Path("output") / f"{timestamp()}_{name}"
    resolved = {
        "source": source,
        "nexp": args.nexp,
        "seed": args.seed,
        "experiments": [e.to_json() for e in experiments],
    }
    config_path = out / "config.json"
    if config_path.is_file():
        # a different --nexp only adds or leaves out seeds: finished runs stay valid
        old = json.loads(config_path.read_text())
        same = [k for k in resolved if k != "nexp"]
        if {k: old.get(k) for k in same} != json.loads(json.dumps({k: resolved[k] for k in same})):
            raise UserError(
                f"{out}: this run folder was made with a different configuration; "
                "use a new --out to start a fresh run"
            )
    runner = Runner(
        experiments,
        source=source,
        nexp=args.nexp,
        base_seed=args.seed,
        device=device,
        out=out,
        ckpt_dir=args.checkpoints,
        data_dir=args.data_dir,
        wandb_mode="disabled" if args.no_log else args.wandb,
        project=args.project,
        quiet=args.quiet,
    )
    runner.resolve()  # every check that needs checkpoints and data, before any training
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, json.dumps(resolved | {"device": str(device)}, indent=2))
    print(f"run folder: {out}", file=sys.stderr)
    try:
        results = runner.run_all()
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are kept in {out}", file=sys.stderr)
        return 130
    rows = summarize(results, [j.folder for j in runner.jobs])
    print(to_text(rows))
    print(f"\nresults: {out}")
    if rows:
        headers, cells = table_cells(rows)
        runner.wandb.log_table("summary", headers, cells, resolved)
    if args.report:
        write_report(
            out,
            device=device,
            data_dir=args.data_dir,
            wandb_mode="disabled" if args.no_log else args.wandb,
            project=args.project,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
