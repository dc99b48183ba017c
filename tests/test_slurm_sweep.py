"""A sweep through ``main.py --launcher slurm`` (running/slurm_backend.py) on a real one-node
SLURM cluster gives what one local process gives, and resumes after a task was cancelled.

Two class-forgetting experiments x two seeds on a one-epoch mnist5k LeNet: one base model, one
oracle (both experiments forget class 3), four runs, so three job arrays. The metrics.json values
(wall times and cache paths aside) and the weights equal the local sequential run's, bit for
bit. Then a second run folder, sharing the checkpoints, is submitted with ``--no-wait`` (the run
phase only: the base model and oracle exist) at most two tasks at once; the last task, still
pending, is cancelled with ``scancel``; the same command without ``--no-wait`` waits for the
three others (never submitting them again), submits the cancelled one again, and all four
equal the local run.

Needs ``CI=true`` or ``UNLEARN_TEST_SLURM=1`` (tests/slurm_cluster.py).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import numbers, same_weights
from slurm_cluster import slurm_cluster_fixture  # noqa: F401 (registers the fixture)

from cli import main as main_mod
from core.errors import UserError
from running.rundir import run_finished
from running.slurm import SlurmLauncher, SlurmSettings
from running.slurm_backend import settings_from

RECIPE = {"model": "lenet", "dataset": "mnist5k", "epochs": 1, "batch_size": 128}
EXPERIMENTS = [
    {"checkpoint": RECIPE, "class_to_forget": 3, "method": "ga_small", "epochs": 1, "lr": 0.001},
    {"checkpoint": RECIPE, "class_to_forget": 3, "method": "rl_split", "epochs": 1},
]  # fmt: skip
FOLDERS = ["00_ga_small_cf3", "01_rl_split_cf3"]
RUNS = [f"{f}/seed{s}" for f in FOLDERS for s in (0, 1)]


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs inherit it


def sweep_argv(tmp: Path, out: str, ck: str, data_dir: Path, *flags: str) -> list[str]:
    exp_file = tmp / "sweep.json"
    exp_file.write_text(json.dumps(EXPERIMENTS))
    return ["-L", str(exp_file), "--nexp", "2", "-NL", "--no-repr", "--device", "cpu", "--out",
            str(tmp / out), "--checkpoints", str(tmp / ck), "--data-dir", str(data_dir),
            *flags]  # fmt: skip


def wait_until(fn: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not fn():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main_mod.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


def assert_same_runs(a: Path, b: Path) -> None:
    for run in RUNS:
        assert run_finished(a / "runs" / run) and run_finished(b / "runs" / run), run
        assert numbers(a / "runs" / run) == numbers(b / "runs" / run), run
        model = Path("runs", run, "model.safetensors")
        assert same_weights(a / model, b / model), run


def test_slurm_sweep_equals_local_and_resumes_after_scancel(
    tmp_path: Path,
    data_dir: Path,
    mnist5k: object,
    slurm_cluster: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_main(sweep_argv(tmp_path, "local", "ck_local", data_dir, "--workers", "1"), capsys)
    argv = sweep_argv(tmp_path, "slurm", "ck_slurm", data_dir, "--launcher", "slurm",
                      "--slurm-partition", slurm_cluster, "--slurm-time", "5",
                      "--slurm-array-parallelism", "2")  # fmt: skip
    launcher = SlurmLauncher(SlurmSettings(), tmp_path / "slurm")

    # --no-wait: one phase per command; the same command collects it and submits the next
    for phase, count in (("base", "1 base task"), ("oracle", "1 oracle task")):
        err = run_main([*argv, "--no-wait"], capsys)
        assert f"{count} on SLURM (1 submitted; logs in {tmp_path / 'slurm' / 'slurm'}" in err
        last = err.strip().splitlines()[-1]
        assert last.endswith(shlex.join(["--out", str(tmp_path / "slurm")])), last
        assert "--no-wait" not in last  # the command that collects waits
        states = launcher.wait(poll_s=0.5, timeout_s=120)
        assert [s.state for s in states.values()] == ["COMPLETED"] * (1 + (phase == "oracle"))
    err = run_main([*argv, "--no-wait"], capsys)
    assert "4 run tasks on SLURM (4 submitted; logs in" in err
    # one run is cancelled while it runs (two run at once, the others pending or done)
    cancelled = f"run:{RUNS[0]}"
    first_id = launcher.latest()[cancelled].job_id
    wait_until(lambda: launcher.statuses([cancelled])[cancelled].state == "RUNNING")
    subprocess.run(["scancel", first_id], check=True, timeout=60)
    assert launcher.wait([cancelled], poll_s=0.5)[cancelled].state == "CANCELLED"

    err = run_main(argv, capsys)  # collects, waits for the queued ones, redoes the cancelled one
    assert f"slurm: {cancelled}: SLURM job {first_id} CANCELLED; again" in err
    assert "4 run tasks on SLURM (1 submitted, 3 already queued, at most 2 at once)" in err
    assert all(f"== {r.replace('/seed', ' seed ')}:" in err for r in RUNS)  # the jobs' lines
    jobs = json.loads((tmp_path / "slurm" / "slurm" / "jobs.json").read_text())["submissions"]
    assert [(s["phase"], list(s["tasks"])) for s in jobs] == [
        ("base", [k for k in jobs[0]["tasks"] if k.startswith("base:")]),
        ("oracle", [k for k in jobs[1]["tasks"] if k.startswith("oracle:")]),
        ("run", [f"run:{r}" for r in RUNS]),
        ("run", [cancelled]),
    ]
    assert len(jobs[0]["tasks"]) == len(jobs[1]["tasks"]) == 1

    assert_same_runs(tmp_path / "local", tmp_path / "slurm")
    for name in ("lenet_mnist5k*.safetensors", "oracles/*.safetensors"):  # cache entries too
        (a,) = (tmp_path / "ck_local").glob(name)
        (b,) = (tmp_path / "ck_slurm").glob(name)
        assert same_weights(a, b), name
    err = run_main(argv, capsys)  # all done: nothing more is submitted
    assert "on SLURM" not in err
    assert len(json.loads((tmp_path / "slurm" / "slurm" / "jobs.json").read_text())[
        "submissions"]) == 4  # fmt: skip


def test_slurm_flags_and_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Settings from a launcher file, flags over it; bad values are one-line errors."""
    cfg = tmp_path / "cluster.json"
    cfg.write_text(json.dumps({"launcher": {"partition": "gpu", "time": "2:00:00", "mem": "8G",
                                            "extra": {"constraint": "a100"}}}))  # fmt: skip
    s = settings_from(cfg, {"time": "30", "gpus_per_task": 1}, ["constraint=h100", "exclusive"])
    assert (s.partition, s.time, s.mem, s.gpus_per_task) == ("gpu", "30", "8G", 1)
    assert s.extra == ("constraint=h100", "exclusive")
    with pytest.raises(UserError, match=r"^key 'time' \(--slurm-time\): '1h' is invalid"):
        settings_from(cfg, {"time": "1h"}, None)
    cfg.write_text(json.dumps({"launcher": {"partiton": "gpu"}}))
    with pytest.raises(UserError, match=r"--launcher-config .*: key 'partiton' is unknown"):
        settings_from(cfg, {}, None)
    cfg.write_text(json.dumps({"partition": "gpu"}))
    with pytest.raises(UserError, match="expected a JSON object with a 'launcher' object"):
        settings_from(cfg, {}, None)
    for argv, line in ((["--no-wait"], "error: --no-wait needs --launcher slurm"),
                       (["--launcher", "slurm", "--slurm-mem", "lots"],
                        "error: key 'mem' (--slurm-mem): 'lots' is invalid; expected memory "
                        "per task, e.g. 16G or 4000M")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main_mod.main([*argv, "-M", "ft", "-CF", "1", "--out", str(tmp_path / "x")])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
