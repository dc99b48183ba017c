"""A sweep on worker processes gives what one process gives: the same metrics.json values (wall
times aside) and the same weights, bit for bit; every task records its thread count and device.

One small sweep (a one-epoch LeNet base model, a class-forgetting and a random-forgetting
experiment, two seeds: one base model, three oracles, four runs) runs from an empty checkpoint
folder twice through ``main.py``: in this process (``--workers 1``) and on two spawned worker
processes (``--workers 2 -v``), each worker with one thread. The output is checked too: a line
per finished run, epoch lines only with ``-v`` (forwarded from the workers), a table that fits
100 columns. Finally one run is redone through :func:`running.workers.run_task`, the entry point
a cluster job calls, and comes out the same.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import numbers, same_weights

import running.workers as workers
from cli import main as main_mod
from running.config import parse_experiment
from running.graph import Graph, Progress, Task
from running.rundir import MANIFEST, run_finished
from running.runner import Runner, RunnerOptions
from running.workers import run_task

RECIPE = {"model": "lenet", "dataset": "mnist5k", "epochs": 1, "batch_size": 128}
EXPERIMENTS = [
    {"checkpoint": RECIPE, "class_to_forget": 3, "method": "ga_small", "epochs": 1, "lr": 0.001},
    {"checkpoint": RECIPE, "unlearning_rate": 0.02, "method": "rl_split", "epochs": 1,
     "use_mask": True, "mask_thr": 0.3},
]  # fmt: skip
FOLDERS = ["00_ga_small_cf3", "01_rl_split+mask_unlr0.02"]
RUNS = [f"{f}/seed{s}" for f in FOLDERS for s in (0, 1)]


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def sweep(
    tmp: Path, name: str, data_dir: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[Path, str, str]:
    exp_file = tmp / "sweep.json"
    exp_file.write_text(json.dumps(EXPERIMENTS))
    out = tmp / name
    argv = ["-L", str(exp_file), "--nexp", "2", "-NL", "--device", "cpu", "--out", str(out)]
    argv += ["--checkpoints", str(tmp / f"ck_{name}"), "--data-dir", str(data_dir), "--no-repr"]
    argv += flags
    code = main_mod.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return out, captured.out, captured.err


def test_two_workers_give_what_one_process_gives(
    tmp_path: Path, data_dir: Path, mnist5k: object, capsys: pytest.CaptureFixture[str]
) -> None:
    one, table1, err1 = sweep(tmp_path, "one", data_dir, capsys, "--workers", "1")
    two, table2, err2 = sweep(tmp_path, "two", data_dir, capsys, "--workers", "2", "-v")

    assert "8 tasks to do (1 base, 3 oracle, 4 run) with 1 process x 1 thread on cpu" in err1
    assert "8 tasks to do (1 base, 3 oracle, 4 run) with 2 workers x 1 thread on cpu" in err2
    for run in RUNS:
        a, b = one / "runs" / run, two / "runs" / run
        assert run_finished(a) and run_finished(b)
        assert numbers(a) == numbers(b), run
        assert same_weights(a / "model.safetensors", b / "model.safetensors"), run
        # the thread count and device of the run, and of what made its base model and oracle
        execution = numbers(a)["execution"]
        made = {"device": "cpu", "threads": 1, "amp": None}
        assert execution == made | {"base": made, "oracle": made}
        side = json.loads((a / "model.json").read_text())
        assert (side["device"], side["threads"], side["amp"]) == ("cpu", 1, None)
    for ck in ("ck_one", "ck_two"):  # one base model and three oracles, each built once
        assert len(list((tmp_path / ck).glob("*.safetensors"))) == 1
        assert len(list((tmp_path / ck / "oracles").glob("*.safetensors"))) == 3
    pairs = [
        (p, tmp_path / "ck_two" / p.relative_to(tmp_path / "ck_one"))
        for p in (tmp_path / "ck_one").rglob("*.safetensors")
        if "outputs" not in p.parts
    ]
    assert len(pairs) == 4 and all(same_weights(a, b) for a, b in pairs)
    for a, _ in pairs:
        meta = json.loads(a.with_suffix(".json").read_text())
        assert (meta["device"], meta["threads"]) == ("cpu", 1)
    for err in (err1, err2):
        assert err.count("training base model") == 1 and err.count("training retrain oracle") == 3
        results = [line for line in err.splitlines() if line.startswith("== ")]
        assert sorted(line.split(":")[0][3:] for line in results) == sorted(
            r.replace("/seed", " seed ") for r in RUNS
        )
    assert " epoch " not in err1 and "retain_loss" not in err1  # no -v: no epoch lines
    assert err2.count("] epoch   1  loss") == 4  # -v: base and oracles, from the workers
    assert err2.count("rl_split epoch 1") == 2  # and the unlearning epochs
    for table in (table1, table2):
        lines = table.splitlines()
        assert max(len(line) for line in lines) <= 100, table
        assert [line.split()[0] for line in lines[3:7]] == [
            "(oracle", FOLDERS[0], "(oracle", FOLDERS[1]]  # fmt: skip

    # the entry point of a cluster job: a run redone from plain arguments comes out the same
    redo = one / "runs" / RUNS[3]
    (redo / MANIFEST).unlink()
    opts = RunnerOptions(source=str(tmp_path / "sweep.json"), out=one, nexp=2, quiet=True,
                         ckpt_dir=tmp_path / "ck_one", data_dir=data_dir, representation=False)  # fmt: skip
    runner = Runner([parse_experiment(e, "") for e in EXPERIMENTS], opts)
    line = run_task(str(one), f"run:{RUNS[3]}", runner.arguments())
    assert line.startswith(f"== {FOLDERS[1]} seed 1: rl_split on mnist5k | forget ")
    assert run_finished(redo) and numbers(redo) == numbers(two / "runs" / RUNS[3])
    args_file = tmp_path / "arguments.json"  # the arguments may come from a file
    args_file.write_text(runner.arguments())
    assert (
        run_task(str(one), f"run:{RUNS[3]}", f"@{args_file}")
        == f"skip {FOLDERS[1]} seed 1: finished"
    )


def test_a_task_sets_and_records_its_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from running.threads import THREAD_VARIABLES, apply_threads, execution_record, made_with

    for name in THREAD_VARIABLES:
        monkeypatch.setenv(name, "7")
    try:
        apply_threads(2)
        assert torch.get_num_threads() == 2
        assert all(os.environ[name] == "2" for name in THREAD_VARIABLES)
        assert execution_record(torch.device("cpu")) == {"device": "cpu", "threads": 2, "amp": None}
    finally:
        apply_threads(1)  # the suite's setting (conftest)
    assert made_with({"device": "cuda", "threads": 4, "amp": "bfloat16", "x": 1}) == {
        "device": "cuda", "threads": 4, "amp": "bfloat16"}  # fmt: skip
    assert made_with({"device": "cpu"}) == {"device": "cpu", "threads": None, "amp": None}


def test_mixed_precision_is_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.amp_dtype(cpu) is None and precision.grad_scaler(cpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.amp_dtype(cuda) == torch.bfloat16 and precision.amp_name(cuda) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.amp_name(cuda) == "float16"  # then with a gradient scaler
    precision.set_amp(False)  # --no-amp
    try:
        assert precision.amp_dtype(cuda) is None and precision.grad_scaler(cuda) is None
    finally:
        precision.set_amp(True)
    conv = torch.nn.Conv2d(1, 2, 3)
    model = torch.nn.Sequential(conv)
    assert not precision.channels_last(model, cpu)  # CPU: weights stay as they are
    assert conv.weight.is_contiguous()
    # summed on the device, the same float as summing loss.item() * batch size in Python
    acc, python = precision.loss_accumulator(cpu), 0.0
    for loss in (torch.tensor(0.1), torch.tensor(0.7), torch.tensor(1 / 3)):
        acc += loss.to(acc.dtype) * 3
        python += loss.item() * 3
    assert acc.dtype == torch.float64 and float(acc) == python


def test_this_process_does_the_first_task_while_the_workers_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scheduler: the process that started the sweep does the first ready task (the base
    model every other task waits for), the pool the rest, each after its dependencies; a
    failure of that first task fails the sweep with its own error."""
    tasks = [
        Task("base:b", "base", "b"),
        Task("oracle:o1", "oracle", "o1", ("base:b",)),
        Task("oracle:o2", "oracle", "o2", ("base:b",)),
        Task("run:r1", "run", "r1", ("base:b", "oracle:o1")),
        Task("run:r2", "run", "r2", ("base:b", "oracle:o2")),
    ]
    order: list[tuple[str, str]] = []
    lock = threading.Lock()

    def in_pool(out: str, key: str, arguments: str, wait: bool = True) -> tuple[str, str]:
        with lock:
            order.append(("pool", key))
        return "done", f"did {key}"

    def here(task: Task, wait: bool) -> tuple[str, str]:
        order.append(("here", task.key))
        return "done", ""

    monkeypatch.setattr(workers, "execute_task", in_pool)
    monkeypatch.setattr(workers, "_warm_up", lambda arguments: None)
    graph = Graph({t.key: t for t in tasks})
    progress = Progress(graph, quiet=True)
    with ThreadPoolExecutor(2) as pool:
        workers._schedule(pool, graph, "out", "{}", 2, progress, here)
    assert order[0] == ("here", "base:b")
    assert sorted(order[1:]) == [("pool", t.key) for t in tasks[1:]]
    at = {key: i for i, (_, key) in enumerate(order)}
    assert at["oracle:o1"] < at["run:r1"] and at["oracle:o2"] < at["run:r2"]
    assert sorted(progress.finished_tasks) == sorted(t.key for t in tasks)

    def fails(task: Task, wait: bool) -> tuple[str, str]:
        raise ValueError("the base model failed")

    order.clear()
    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="base model failed"):
        workers._schedule(pool, Graph({t.key: t for t in tasks}), "out", "{}", 2,
                          Progress(graph, quiet=True), fails)  # fmt: skip
    assert order == []  # nothing depends on nothing else: no task started
