"""Regenerate the measured tables that README.md quotes, target by target (issue 11, item 8).

    python bench/readme_numbers.py --list
    python bench/readme_numbers.py --only quickstart,replace_class --out output/readme_numbers
    python bench/readme_numbers.py                      # every target (hours on 2 cores)
    python bench/readme_numbers.py --tiny               # seconds: one 1-epoch sweep (the tests)

Each target runs the real command in a subprocess, with ``OMP_NUM_THREADS`` (and the other
thread variables of running/threads.py) set to the threads per task, and writes
``<out>/<target>.md``: a header line (machine: usable cores and CPU model; torch version;
threads per task; workers; load average before and after; wall time; whether the checkpoint
folder was empty), the command, and the table as README.md quotes it. Tables come from the
files the command wrote (a sweep's ``summary.md`` and ``metrics.json``, a bench's ``.md``),
never from its printed output; a bench script that writes no file is quoted as it prints.

The sweeps of all targets share one checkpoint folder (``<out>/checkpoints`` unless
``--checkpoints``): a target that finds its base model and oracles there does not train them
again, and its header says so (its wall time is then the runs only). Accuracy columns reproduce
exactly at the same thread count on any CPU; times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
# ruff: noqa: E402  (the project imports must follow the line above)

from core.cli_options import add_data_dir, add_device, add_threads, new_parser
from core.errors import UserError, cli
from running.threads import thread_env, usable_cores

REPO = Path(__file__).resolve().parent.parent
# the columns of README.md's Quickstart table (summary.md has more)
QUICKSTART_COLUMNS = ["experiment", "runs", "forget acc", "retain acc", "test acc", "MIA eff.",
                      "avg gap", "time s", "time/oracle", "score"]  # fmt: skip
COMPARE_COLUMNS = ["experiment", "forget acc", "retain acc", "test acc", "MIA eff.", "avg gap",
                   "time s"]  # fmt: skip
TINY_EXPERIMENTS = [
    {
        "checkpoint": {"model": "lenet", "dataset": "mnist5k", "epochs": 1},
        "class_to_forget": 3,
        "method": "ga_small",
        "epochs": 1,
        "lr": 0.001,
    }
]


class Target(NamedTuple):
    """A README table: the command that measures it (``main.py`` sweeps get ``--out``,
    ``--checkpoints``, workers and threads added) and how its table is read back."""

    name: str
    section: str  # where README.md quotes it
    argv: tuple[str, ...]  # relative to the repository
    # the run folder (or the bench's --out) -> Markdown; None: a bench that writes no file,
    # quoted as it prints
    table: Callable[[Path], str] | None
    sweep: bool = True  # a main.py sweep


# ---------------------------------------------------------------------------------------------
# Tables from the files a command wrote


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first Markdown table in `text`."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        raise UserError("no Markdown table found")

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split(" | ")]

    return cells(lines[0]), [cells(line) for line in lines[2:]]


def render(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def summary_columns(columns: list[str] | None) -> Callable[[Path], str]:
    """A sweep's ``summary.md``, restricted to `columns` (None: all of them)."""

    def table(run: Path) -> str:
        header, rows = markdown_table((run / "summary.md").read_text())
        if columns is None:
            return render(header, rows)
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(f"{run / 'summary.md'}: no column {missing[0]!r}")
        keep = [header.index(c) for c in columns]
        return render(columns, [[r[i] for i in keep] for r in rows])

    return table


def file_table(name: str) -> Callable[[Path], str]:
    """A Markdown file the command wrote into its --out folder, as it is."""

    def table(out: Path) -> str:
        return (out / name).read_text().strip()

    return table


def replacement_table(run: Path) -> str:
    """README's class-replacement tables from the runs' metrics.json: the base model, the
    oracle, then every experiment (its first seed); and where the old class's test samples go."""
    runs = sorted(run.glob("runs/*/seed*/metrics.json"))
    if not runs:
        raise UserError(f"{run}: no finished runs")
    found = [json.loads(p.read_text()) for p in runs]
    found = [m for i, m in enumerate(found) if m["experiment"] not in
             {n["experiment"] for n in found[:i]}]  # fmt: skip
    header = ["model", "new → old's slot", "old still in its slot", "untouched acc",
              "mean confidence", "train: new", "train: old", "unlearn s"]  # fmt: skip
    rows: list[list[str]] = []
    confusion: list[tuple[str, dict[str, Any]]] = []

    def row(name: str, rp: dict[str, Any], seconds: str) -> None:
        tr = rp["train"]
        rows.append([name] + [_num(v) for v in (rp["new_acc"], rp["old_acc"],
                    rp["untouched_acc"], rp["mean_confidence"], tr["new_acc"], tr["old_acc"])]
                    + [seconds])  # fmt: skip
        confusion.append((name, rp))

    first = found[0]["replacement"]
    row("base", first["base"], "–")
    row("retrain oracle", first["oracle"], f"({found[0]['times']['oracle_time']:.1f} s to train)")
    for m in found:
        row(f"`{m['experiment']}`", m["replacement"]["unlearned"],
            f"{m['times']['unlearn_time']:.1f}")  # fmt: skip
    old = first["base"]["old"]
    conf = first["base"]["confusion"]
    i = conf["rows"].index(old)
    where = ["model"] + [f"slot {c} (= {first['base']['new']} now)" if c == old else str(c)
                         for c in conf["cols"]]  # fmt: skip
    spread = [[name] + [f"{100 * v:.0f}%" if v else "" for v in rp["confusion"]["matrix"][i]]
              for name, rp in confusion]  # fmt: skip
    return (render(header, rows) + f"\n\nWhere the {old}s go (test, rows = true class {old}; "
            f"columns = output slots):\n\n" + render(where, spread))  # fmt: skip


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


TARGETS = [
    Target(
        "quickstart",
        "Quickstart",
        ("main.py", "-L", "exp/quickstart.json", "--nexp", "3"),
        summary_columns(QUICKSTART_COLUMNS),
    ),
    Target(
        "compare",
        "Measured on mnist5k, class 7",
        ("main.py", "-L", "exp/compare.json", "--nexp", "1"),
        summary_columns(COMPARE_COLUMNS),
    ),
    Target(
        "replace_class",
        "Class replacement",
        ("main.py", "-L", "exp/replace_class.json", "--nexp", "1"),
        replacement_table,
    ),
    Target(
        "challenge",
        "Fashion-MNIST challenge",
        ("main.py", "-L", "exp/fashion_lenet_all.json", "--nexp", "1"),
        summary_columns(None),
    ),
    Target(
        "randomforget",
        "Random forgetting on Fashion-MNIST",
        ("main.py", "-L", "exp/randomforget_fashion.json", "--nexp", "3"),
        summary_columns(None),
    ),
    Target(
        "epsilon",
        "Many-model evaluation",
        ("main.py", "-L", "exp/epsilon_mnist5k.json", "--nexp", "1"),
        summary_columns(None),
    ),
    Target(
        "tune",
        "Tuning against the oracle",
        ("main.py", "-L", "exp/tune_mnist5k.json", "--nexp", "1"),
        summary_columns(None),
    ),
    Target(
        "robust",
        "Defaults that hold across base models",
        ("bench/robust_defaults.py",),
        file_table("robust.md"),
        sweep=False,
    ),
    Target(
        "bench_data",
        "Performance: data path",
        ("bench/bench_data.py", "--device", "cpu"),
        None,
        sweep=False,
    ),
    Target(
        "bench_sweep",
        "Batch sweeps: workers and clusters",
        ("bench/bench_sweep.py", "--device", "cpu"),
        None,
        sweep=False,
    ),
    Target(
        "bench_epsilon",
        "Many-model evaluation: cost",
        ("bench/bench_epsilon.py",),
        None,
        sweep=False,
    ),
]


# ---------------------------------------------------------------------------------------------
# Running a target


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def command(t: Target, args: argparse.Namespace, out: Path, ck: Path) -> list[str]:
    argv = [sys.executable, *t.argv]
    threads = str(args.threads or 1)
    if t.sweep:
        argv += ["-NL", "-q", "--workers", str(args.workers), "--threads-per-task", threads,
                 "--out", str(out / "runs" / t.name), "--checkpoints", str(ck)]  # fmt: skip
        if args.device:
            argv += ["--device", args.device]
    else:
        argv += ["--threads", threads]
        if t.name != "bench_data":  # the data bench runs one process
            argv += ["--workers", str(args.workers)]
        if t.table is not None:
            argv += ["--out", str(out / "runs" / t.name)]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    return argv


def run_target(t: Target, args: argparse.Namespace, out: Path, ck: Path) -> str:
    """Run one target; write and return ``<out>/<target>.md``."""
    argv = command(t, args, out, ck)
    threads = args.threads or 1
    env = os.environ | thread_env(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    empty = not any(ck.glob("*.safetensors"))
    before = load()
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise UserError(f"target {t.name}: {shlex.join(argv[1:])} failed "
                        f"(exit code {done.returncode}):\n" + "\n".join(tail))  # fmt: skip
    if t.table is not None:
        table = t.table(out / "runs" / t.name)
    else:  # the bench writes no file: its printed report, as it is
        table = "```\n" + done.stdout.strip() + "\n```"
    shown = shlex.join(["OMP_NUM_THREADS=" + str(threads), "python", *argv[1:]])
    checkpoints = f", checkpoints {'empty' if empty else 'reused'} at the start" if t.sweep else ""
    header = (f"{t.name} (README: {t.section}): {usable_cores()} usable cores ({cpu_model()}), "
              f"torch {torch.__version__}, {threads} thread(s) per task, --workers "
              f"{args.workers}, load average {before} -> {load()}, wall {seconds:.1f} s"
              f"{checkpoints}")  # fmt: skip
    text = f"{header}\n\n```\n{shown}\n```\n\n{table}\n"
    (out / f"{t.name}.md").write_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("--only", help="targets, comma-separated (see --list; default: all)")
    p.add_argument("--list", action="store_true", help="list the targets and their commands")
    p.add_argument("--out", type=Path, default=REPO / "output" / "readme_numbers",
                   help="where <target>.md, runs/ and checkpoints/ go (%(default)s)")  # fmt: skip
    p.add_argument(
        "--checkpoints", type=Path, help="checkpoint folder (default: <out>/checkpoints)"
    )
    p.add_argument("--workers", default=str(max(usable_cores(), 1)),
                   help="worker processes of every sweep (%(default)s: the usable cores)")  # fmt: skip
    p.add_argument("--tiny", action="store_true",
                   help="seconds: one 1-epoch sweep of 2 runs, into a temporary folder")  # fmt: skip
    add_device(p)
    add_threads(p)
    add_data_dir(p)
    return p


def pick(only: str | None) -> list[Target]:
    if only is None:
        return list(TARGETS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {t.name: t for t in TARGETS}
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UserError(f"--only {only!r}: unknown target {bad[0] if bad else ''!r}; "
                        f"use some of {', '.join(known)}")  # fmt: skip
    return [known[n] for n in names]


@cli
def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} is invalid; use a positive integer")
    targets = pick(args.only)
    if args.list:
        for t in targets:
            shown = shlex.join(["python", *t.argv])
            print(f"{t.name:14} {shown}   (README: {t.section})")
        return []
    if args.tiny:
        with tempfile.TemporaryDirectory(prefix="readme_numbers_") as tmp:
            root = Path(tmp)
            exp = root / "tiny.json"
            exp.write_text(json.dumps(TINY_EXPERIMENTS))
            tiny = Target("tiny", "none (the test suite's check)",
                          ("main.py", "-L", str(exp), "--nexp", "2", "--no-repr"),
                          summary_columns(QUICKSTART_COLUMNS))  # fmt: skip
            args.workers = "1"
            text = _run(tiny, args, root, root / "checkpoints")
            print(text)
            return [text]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ck = args.checkpoints or out / "checkpoints"
    texts = []
    for t in targets:
        print(f"{t.name}: {shlex.join(['python', *t.argv])} ...", flush=True)
        text = _run(t, args, out, ck)
        print(text, flush=True)
        texts.append(text)
    return texts


def _run(t: Target, args: argparse.Namespace, out: Path, ck: Path) -> str:
    """Run one target; a table the files do not hold is a one-line error."""
    try:
        return run_target(t, args, out, ck)
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise UserError(f"target {t.name}: its table could not be read ({e})") from None


if __name__ == "__main__":
    main()
