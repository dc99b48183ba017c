"""Run unlearning experiments over several seeds and compare them with the retrain oracle.

    python main.py -L exp/quickstart.json --nexp 3
    python main.py -L exp/quickstart.json --nexp 3 --workers 2          # two worker processes
    python main.py -L exp/compare.json --nexp 5 --device cuda --gpus 0,1,2,3 --tasks-per-gpu 2
    python main.py -c checkpoints/lenet_mnist5k_base_s0.safetensors -CF 7 -M rl_split -UM

Every experiment of the list is validated first; then each runs ``--nexp`` times with seeds
``--seed``, ``--seed + 1``, ... as a graph of tasks (base models, retrain oracles, runs), on
``--workers`` processes. Results go to ``output/<timestamp>_<name>/`` (or ``--out``, where a
rerun skips the runs that already finished).

Every task runs with ``--threads-per-task`` CPU threads (default 1): the numbers depend on the
thread count, and PyTorch's default of one thread per core is slow on a busy machine.
``--workers auto`` starts one worker per GPU on CUDA, and floor(usable cores / threads per task)
on CPU (the usable cores: this process's CPU affinity), never more than the widest layer of
the graph has tasks to do; it is the default unless $UNLEARNING_WORKERS says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from analysis.report import check_fig_formats, write_report
from core.cli_options import (
    add_checkpoints,
    add_data_dir,
    add_device,
    add_fig_format,
    add_out,
    new_parser,
)
from core.errors import UserError, cli
from core.io import write_json
from core.progress import show_inner_bars
from core.userfiles import check_output_dir
from core.validation import SEED_MAX
from datasets import pick_device
from running.config import (
    MAX_EVAL_MODELS,
    EvaluateConfig,
    ExperimentConfig,
    check_same_config,
    load_experiments,
    parse_experiment,
    run_record,
)
from running.rundir import config_locked
from running.runner import Runner, RunnerOptions, timestamp
from running.slurm import SETTINGS_HELP
from running.slurm_backend import Submitted, settings_from, slurm_backend
from running.tables import summarize, table_cells, to_terminal
from running.threads import DEFAULT_THREADS, check_threads
from running.tune import check_tunable, tune_experiments, with_trials
from running.wandb_log import MODES
from running.workers import backend, plan_workers

SINGLE = "a single experiment from flags (without -L)"
MAX_NEXP = 10_000
# the default of --workers comes from here when set (the test suite sets 1)
WORKERS_VARIABLE = "UNLEARNING_WORKERS"


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("-L", "--load", type=Path, help="JSON list of experiments")
    p.add_argument("--nexp", type=int, default=1, help="runs (seeds) per experiment")
    p.add_argument("--seed", type=int, default=0, help="base seed: run i uses seed + i")
    g = p.add_argument_group(SINGLE)
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
    add_device(p)
    add_out(p, "run folder (an existing one is resumed)")
    add_checkpoints(p)
    add_data_dir(p)
    p.add_argument("--report", action="store_true", help="write report.md/.html at the end")
    add_fig_format(p)
    p.add_argument("--tune", type=int, metavar="T",
                   help="first tune every experiment with T Optuna trials against the oracle on "
                   "another forget set (running/tune.py); its tuned twin runs next to it")  # fmt: skip
    p.add_argument("--eval-models", type=int, metavar="N",
                   help='many-model evaluation of every experiment: N oracles and N unlearned '
                   'models scored per forget example (sets "evaluate": {"models": N}; '
                   "runs/<experiment>/epsilon/)")  # fmt: skip
    p.add_argument("--no-repr", action="store_true",
                   help="skip the representation metrics (metrics.json repr: probe, kNN, CKA), "
                   "e.g. for large models")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the final table (and warnings)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also a line per training and unlearning epoch")  # fmt: skip
    w = p.add_argument_group("parallel tasks and speed")
    w.add_argument("--workers", default=os.environ.get(WORKERS_VARIABLE, "auto"),
                   metavar="N|auto", help="worker processes (%(default)s; auto: one per GPU, or "
                   "usable cores / threads per task on CPU; 1: all in this process)")  # fmt: skip
    w.add_argument("--gpus", metavar="0,1,...",
                   help="CUDA: the GPUs to use, one worker pinned to each (default: all)")  # fmt: skip
    w.add_argument("--tasks-per-gpu", type=int, default=1, metavar="K",
                   help="CUDA: workers per GPU, for models that use a fraction of one (%(default)s)")  # fmt: skip
    w.add_argument("--threads-per-task", type=int, default=DEFAULT_THREADS, metavar="T",
                   help="CPU threads of every task (%(default)s; recorded in metrics.json)")  # fmt: skip
    w.add_argument("--no-amp", action="store_true",
                   help="CUDA: train in float32 (default: bfloat16 mixed precision, float16 "
                   "with a gradient scaler where bfloat16 is not supported)")  # fmt: skip
    add_cluster(p)
    return p


# --slurm-* flags: (setting of SlurmSettings, type, metavar)
SLURM_FLAGS = (("partition", str, "NAME"), ("time", str, "TIME"), ("gpus_per_task", int, "G"),
               ("cpus_per_task", int, "C"), ("mem", str, "MEM"), ("account", str, "NAME"),
               ("qos", str, "NAME"), ("array_parallelism", int, "N"), ("python", str, "CMD"))  # fmt: skip


def add_cluster(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("cluster (SLURM, through submitit)")
    c.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: this machine (--workers); slurm: one job array per layer of "
                   "the task graph (logs in <out>/slurm/)")  # fmt: skip
    c.add_argument("--launcher-config", type=Path, metavar="FILE",
                   help='JSON file with a "launcher" object of SLURM settings (partition, '
                   "time, ...); the --slurm-* flags override it")  # fmt: skip
    for key, kind, metavar in SLURM_FLAGS:
        flag, meaning = SETTINGS_HELP[key]
        c.add_argument(flag, dest=f"slurm_{key}", type=kind, metavar=metavar, help=meaning)
    c.add_argument("--slurm-extra", action="append", metavar="KEY=VALUE",
                   help="another sbatch parameter, e.g. constraint=a100 (repeatable)")  # fmt: skip
    c.add_argument("--no-wait", action="store_true",
                   help="slurm: submit the first phase with work and return; the same command "
                   "later collects and resumes")  # fmt: skip


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that contradict each other or that the code cannot use, before any work."""
    if args.load:
        single = [
            "/".join(a.option_strings)
            for grp in p._action_groups
            if grp.title == SINGLE
            for a in grp._group_actions
            if getattr(args, a.dest) not in (None, False)
        ]
        if single:
            raise UserError(
                f"-L/--load {args.load}: the experiments come from the file, so the "
                f"single-experiment flags {', '.join(single)} would be ignored; put those "
                "settings in the file or drop -L"
            )
    if not 1 <= args.nexp <= MAX_NEXP:
        raise UserError(f"--nexp {args.nexp} is invalid; use an integer in 1..{MAX_NEXP}")
    top = SEED_MAX - (args.nexp - 1)  # run seeds are --seed .. --seed + nexp - 1
    if not 0 <= args.seed <= top:
        why = f" (with --nexp {args.nexp}, the last run's seed is --seed + {args.nexp - 1})"
        raise UserError(
            f"--seed {args.seed} is invalid; use a seed in 0..{top}"
            f"{why if args.nexp > 1 else ''}: numpy seeds with 0..2**32 - 1"
        )
    if args.report:
        check_fig_formats(args.fig_format)
    check_output_dir(args.checkpoints, "--checkpoints")
    if args.data_dir is not None:
        check_output_dir(args.data_dir, "--data-dir")
    if args.eval_models is not None and not 2 <= args.eval_models <= MAX_EVAL_MODELS:
        raise UserError(f"--eval-models {args.eval_models} is invalid; use a number of models "
                        f"in 2..{MAX_EVAL_MODELS}")  # fmt: skip
    if args.quiet and args.verbose:
        raise UserError("-q/--quiet and -v/--verbose contradict each other; give one")
    check_threads(args.threads_per_task)
    if args.launcher != "slurm":
        given = [f for f, v in (("--no-wait", args.no_wait),
                                ("--launcher-config", args.launcher_config),
                                ("--slurm-extra", args.slurm_extra)) if v]  # fmt: skip
        given += [SETTINGS_HELP[k][0] for k, _, _ in SLURM_FLAGS
                  if getattr(args, f"slurm_{k}") is not None]  # fmt: skip
        if given:
            raise UserError(f"{given[0]} needs --launcher slurm")


def resume_command(argv: list[str], out: Path) -> str:
    """The command that resumes this run: the same arguments with ``--out <out>``."""
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return shlex.join(["python", "main.py", *kept, "--out", str(out)])


def with_models(e: ExperimentConfig, n: int) -> ExperimentConfig:
    """The experiment with ``"evaluate": {"models": n}`` (its U-LiRA setting kept)."""
    ev = e.evaluate or EvaluateConfig()
    return dataclasses.replace(e, evaluate=dataclasses.replace(ev, models=n))


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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.load:
        experiments = load_experiments(args.load)
        source, name = str(args.load), args.load.stem
    else:
        experiments = experiments_from_flags(args)
        source, name = "command line", "cli"
    if args.eval_models is not None:
        experiments = [with_models(e, args.eval_models) for e in experiments]
    if args.tune is not None:
        experiments = with_trials(experiments, args.tune)
    check_tunable(experiments, source)
    device = pick_device(args.device)
    show_inner_bars(args.verbose)  # one bar for the sweep; the epoch and batch bars with -v
    plan = plan_workers(args.workers, device, gpus=args.gpus, tasks_per_gpu=args.tasks_per_gpu,
                        threads=args.threads_per_task)  # fmt: skip
    settings = None
    if args.launcher == "slurm":  # every bad setting is reported before any work
        flags = {k: getattr(args, f"slurm_{k}") for k, _, _ in SLURM_FLAGS}
        settings = settings_from(args.launcher_config, flags, args.slurm_extra)
    out = args.out or Path("output") / f"{timestamp()}_{name}"
    check_output_dir(out, "--out")
    resolved = run_record(source, args.nexp, args.seed, experiments)
    config_path = out / "config.json"
    if config_path.exists():
        check_same_config(config_path, resolved)
    runner = Runner(
        experiments,
        RunnerOptions(
            source=source,
            out=out,
            ckpt_dir=args.checkpoints,
            device=device,
            nexp=args.nexp,
            base_seed=args.seed,
            data_dir=args.data_dir,
            wandb_mode="disabled" if args.no_log else args.wandb,
            project=args.project,
            quiet=args.quiet,
            verbose=args.verbose,
            threads=args.threads_per_task,
            amp=not args.no_amp,
            representation=not args.no_repr,
        ),
    )
    runner.resolve()  # every check that needs checkpoints and data, before any training
    out.mkdir(parents=True, exist_ok=True)
    with config_locked(out):  # another process on this --out may have written it meanwhile
        if config_path.exists():
            check_same_config(config_path, resolved)
        write_json(config_path, resolved | {"device": str(device),
                                            "threads_per_task": args.threads_per_task})  # fmt: skip
    print(f"run folder: {out}", file=sys.stderr)
    try:
        if any(e.tune is not None for e in experiments):  # tuned twins run next to the experiments
            twins = tune_experiments(experiments, runner.opts, backend(plan), plan.workers)
            runner = Runner(experiments + twins, runner.opts)
            runner.resolve()
        if settings is None:
            results = runner.run_all(backend(plan))
        else:
            resume = resume_command([a for a in argv if a != "--no-wait"], out)
            results = runner.run_all(slurm_backend(settings, wait=not args.no_wait, resume=resume))
    except Submitted as e:  # --no-wait: the jobs run on; a later command collects them
        print(str(e), file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; finished runs are kept in {out}; resume with: "
            f"{resume_command(argv, out)}",
            file=sys.stderr,
        )
        return 130
    folders = [j.folder for j in runner.jobs]
    rows = summarize(results, folders)
    print(to_terminal(results, folders))
    print(f"\nresults: {out}")
    if rows:
        headers, cells = table_cells(rows)
        runner.wandb.log_table("summary", headers, cells, resolved)
    if args.report:
        write_report(
            out,
            device=device,
            data_dir=args.data_dir,
            fig_formats=args.fig_format,
            wandb_mode="disabled" if args.no_log else args.wandb,
            project=args.project,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
