"""Several processes on the same files: atomic writes, cache entries built once, runs done once.

Every case runs real processes (``subprocess``, one OpenMP thread each) against one folder:
hundreds of concurrent atomic saves to one path, a lock holder killed with ``kill -9``, two
processes that need the same dataset cache and base checkpoint, and two processes sharing a
run folder's runs, one of them killed half-way. Start barriers (files each process waits for)
make the processes really overlap instead of relying on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from cli import main as main_mod
from core.locks import lock_path, locked, try_locked
from running.rundir import run_finished

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}

BARRIER = """
import sys, time
from pathlib import Path
def barrier(folder, me, n):
    folder = Path(folder)
    (folder / f"ready{me}").touch()
    while len(list(folder.glob("ready*"))) < n:
        time.sleep(0.01)
"""


def spawn(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen[str]], timeout: float = 300) -> list[tuple[str, str]]:
    """Wait for every process; each must exit 0. Their (stdout, stderr), in order."""
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        outs.append((out, err))
    return outs


# ---------------------------------------------------------------------------- atomic writes

WRITER = (
    BARRIER
    + """
import json
from core.io import atomic_write_bytes
target, folder, me, n, writers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
barrier(folder, me, writers)
for i in range(n):
    body = {"writer": me, "i": i, "pad": "x" * (1000 * ((me * 7 + i) % 50))}
    atomic_write_bytes(target, json.dumps(body).encode())
"""
)

READER = """
import json, sys, time
from pathlib import Path
target, stop = Path(sys.argv[1]), Path(sys.argv[2])
reads = 0
while True:
    done = stop.exists()
    if target.exists():
        body = json.loads(target.read_bytes())  # a half-written file would not parse
        assert body["pad"] == "x" * len(body["pad"])
        reads += 1
    if done:
        break
print(reads)
"""


def test_600_concurrent_atomic_saves_to_one_path(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    target.parent.mkdir()
    writers, each = 4, 150
    reader = spawn(READER, target, tmp_path / "stop")
    procs = [spawn(WRITER, target, tmp_path, me, each, writers) for me in range(writers)]
    finish(procs)
    (tmp_path / "stop").touch()
    [(reads, _)] = finish([reader])  # it read the file while it was being replaced, whole
    assert int(reads) >= 1
    body = json.loads(target.read_text())
    assert body["i"] == each - 1 and 0 <= body["writer"] < writers  # someone's last write
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]  # no temp files
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- lock life

HOLDER = """
import sys, time
from core.locks import locked
with locked(sys.argv[1], "holding it for a test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    print("releasing", flush=True)
"""


def _wait_held(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    entry = tmp_path / "checkpoints" / "base.safetensors"
    holder = spawn(HOLDER, entry, 120)
    _wait_held(holder)
    with try_locked(entry) as mine:
        assert not mine
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path(entry).exists()  # the file stays; the kernel's lock died with the process
    with try_locked(entry) as mine:
        assert mine


def test_a_second_process_waits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = tmp_path / "cache" / "mnist5k.safetensors"
    holder = spawn(HOLDER, entry, 1.0)
    _wait_held(holder)
    with locked(entry, "building the cache"):
        assert holder.stdout is not None  # we got the lock only once the holder let go
        assert holder.stdout.readline().strip() == "releasing"
    err = capsys.readouterr().err
    assert err == f"waiting: another process is building the cache ({lock_path(entry)})\n"
    holder.wait(timeout=30)


def test_locks_are_reentrant_within_a_process(tmp_path: Path) -> None:
    same = (tmp_path / "x", str(tmp_path / "x"), tmp_path / "." / "x")
    with locked(same[0], "a"), locked(same[1], "b"), try_locked(same[2]) as mine:
        assert mine


# ---------------------------------------------------------------------------- cache entries

BUILDER = (
    BARRIER
    + """
import torch
import datasets
from datasets import load_raw
from models import build_model
from training.checkpoints import build_once, load_checkpoint, save_checkpoint

folder, me = Path(sys.argv[1]), int(sys.argv[2])
info = datasets.DATASETS["digits"]

def counted(root, download):
    with open(folder / "dataset_builds", "a") as f:
        f.write(f"{me}\\n")
    time.sleep(0.5)  # a slow decode: the other process arrives while it runs
    return info.loader(root, download)

datasets.DATASETS["digits"] = info.__class__(
    info.name, counted, info.flip, info.crop_pad, info.default_model, info.description)

def train():
    with open(folder / "trainings", "a") as f:
        f.write(f"{me}\\n")
    time.sleep(0.5)
    torch.manual_seed(0)
    meta = {"model": "smallcnn", "num_classes": 10, "in_chans": 1}
    save_checkpoint(folder / "ck" / "base", build_model("smallcnn", 10, 1), meta, torch.tensor([1]))

barrier(folder, me, 2)
raw = load_raw("digits", folder / "data")
build_once(folder / "ck" / "base", train)
model, meta = load_checkpoint(folder / "ck" / "base")
print(raw.train_x.shape[0], meta["model"])
"""
)


def test_two_processes_build_each_cache_entry_once(tmp_path: Path) -> None:
    procs = [spawn(BUILDER, tmp_path, me) for me in range(2)]
    outs = finish(procs)
    assert len((tmp_path / "dataset_builds").read_text().split()) == 1
    assert len((tmp_path / "trainings").read_text().split()) == 1
    assert [o for o, _ in outs] == ["1438 smallcnn\n"] * 2  # both use the one entry
    # the one that arrived second waited for the first and said so
    assert sum("waiting: another process is building" in e for _, e in outs) >= 1, outs


# ---------------------------------------------------------------------------- runs

RUNS = (
    BARRIER
    + """
from core.io import write_json
from running.rundir import for_each_run, write_manifest

folder, me, hang = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dirs = [folder / "runs" / f"{e:02d}_x" / f"seed{s}" for e in range(2) for s in range(2)]

def do(d):
    with open(folder / "log", "a") as f:
        f.write(f"{me} {d.parent.name}/{d.name}\\n")
    if hang == d.name + d.parent.name:
        print("held", flush=True)
        time.sleep(120)  # killed here
    time.sleep(0.2)
    write_json(d / "metrics.json", {"run": f"{d.parent.name}/{d.name}"})
    write_manifest(d, ["metrics.json"])

barrier(folder, me, int(sys.argv[4]))
for_each_run(dirs, do, skipped=lambda d: print("skip", d.parent.name, d.name, file=sys.stderr))
"""
)


def _runs_done(log: Path) -> list[str]:
    return sorted(line.split()[1] for line in log.read_text().splitlines())


def test_two_processes_share_the_runs_each_done_once(tmp_path: Path) -> None:
    procs = [spawn(RUNS, tmp_path, me, "-", 2) for me in range(2)]
    errs = [e for _, e in finish(procs)]
    names = [f"{e:02d}_x/seed{s}" for e in range(2) for s in range(2)]
    assert _runs_done(tmp_path / "log") == names  # four runs, each once
    assert all(run_finished(tmp_path / "runs" / n) for n in names)
    log = [line.split()[0] for line in (tmp_path / "log").read_text().splitlines()]
    assert set(log) == {"0", "1"}, "both processes worked"
    # each process did or skipped (finished by the other) each of the four runs
    assert sum(e.count("skip ") for e in errs) == 4, errs


def test_a_run_whose_holder_is_killed_is_redone_by_the_other(tmp_path: Path) -> None:
    victim = spawn(RUNS, tmp_path, 0, "seed101_x", 1)  # hangs in run 01_x/seed1
    _wait_held(victim)
    other = spawn(RUNS, tmp_path, 1, "-", 1)
    time.sleep(1.0)  # let it reach the held run and wait for it; the result does not depend on it
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    finish([other])
    lines = (tmp_path / "log").read_text().splitlines()
    names = [f"{e:02d}_x/seed{s}" for e in range(2) for s in range(2)]
    assert sorted({line.split()[1] for line in lines}) == names
    assert all(run_finished(tmp_path / "runs" / n) for n in names)
    # the killed run was started by the victim and done again, in full, by the other process
    assert [line.split()[0] for line in lines if line.endswith("01_x/seed1")] == ["0", "1"]


# ---------------------------------------------------------------------------- main.py x 2

# a one-epoch LeNet recipe: the base model and the class-3 oracle are trained in the test
RECIPE = {"model": "lenet", "dataset": "mnist5k", "epochs": 1, "batch_size": 128}
EXPERIMENTS = [
    {"checkpoint": RECIPE, "class_to_forget": 3, "method": "ga_small", "epochs": 1, "lr": 0.001},
    {"checkpoint": RECIPE, "class_to_forget": 3, "method": "ga_small", "epochs": 1, "lr": 0.002},
]


def main_py(out: Path, exp_file: Path, ckpt: Path, data_dir: Path) -> subprocess.Popen[str]:
    argv = ["main.py", "-L", exp_file, "--nexp", 2, "-NL", "--device", "cpu", "--out", out]
    argv += ["--checkpoints", ckpt, "--data-dir", data_dir]
    return subprocess.Popen(
        [sys.executable, *map(str, argv)],
        cwd=REPO_ROOT,
        env=ENV | {"WANDB_MODE": "disabled", "WANDB_SILENT": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _numbers(run: Path) -> dict[str, object]:
    """metrics.json without the wall-clock times."""
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k != "times"}


def test_two_main_processes_on_one_out_do_each_run_once(
    tmp_path: Path, data_dir: Path, mnist5k: object
) -> None:
    exp_file, ckpt, out = tmp_path / "two.json", tmp_path / "checkpoints", tmp_path / "out"
    exp_file.write_text(json.dumps(EXPERIMENTS))
    procs = [main_py(out, exp_file, ckpt, data_dir) for _ in range(2)]
    errs = [e for _, e in finish(procs, timeout=900)]
    started = [line for e in errs for line in e.splitlines() if line.startswith("== ")]
    runs = [f"{f} seed {s}" for f in ("00_ga_small_cf3", "01_ga_small_cf3") for s in (0, 1)]
    assert sorted(line.split(":")[0][3:] for line in started) == runs, errs  # each run once
    for what in ("training base model", "training retrain oracle"):  # each cache entry once
        assert sum(e.count(what) for e in errs) == 1, (what, errs)
    folders = sorted(out.glob("runs/*/seed*/"))
    assert [f"{d.parent.name} {d.name.replace('seed', 'seed ')}" for d in folders] == runs
    assert all(run_finished(d) for d in folders)

    # one process alone (this one, one thread too), from the same cached base model and oracle
    alone = tmp_path / "alone"
    argv = ["-L", exp_file, "--nexp", 2, "-NL", "--device", "cpu", "--out", alone]
    assert (
        main_mod.main([str(a) for a in argv + ["--checkpoints", ckpt, "--data-dir", data_dir]]) == 0
    )
    for d in folders:
        assert _numbers(d) == _numbers(alone / "runs" / d.parent.name / d.name), d
