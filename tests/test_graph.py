"""The task graph of a sweep (running/graph.py), the worker plan (running/workers.py) and the
terminal table (running/tables.py), on hand-built inputs: nothing is trained here.

An experiment list expands into exactly the base models, oracles and runs it needs, each shared
task once; the dependencies are the ones the runs need; finished tasks are skipped; a run another
process holds is done last; ``--workers auto`` follows its documented rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT

from core.errors import UserError
from datasets import RawData, make_forget_spec, make_split
from running import workers
from running.config import ExperimentConfig, load_experiments, parse_experiment
from running.graph import (
    BASE,
    DONE,
    HELD,
    ORACLE,
    REPORT,
    RUN,
    SUMMARY,
    Graph,
    Progress,
    Task,
    expand,
    run_in_order,
)
from running.results import RunResult
from running.runner import Runner, RunnerOptions, minimal_json
from running.tables import to_terminal
from running.workers import WorkerPlan, plan_workers
from training.config import TrainConfig
from training.recipe import base_checkpoint_name, oracle_checkpoint_name

R1 = {"model": "lenet", "dataset": "mnist5k", "epochs": 1}
R2 = {"model": "lenet", "dataset": "mnist5k", "epochs": 2}
CHEAP = {"method": "ga_small", "epochs": 1, "lr": 0.001}


def runner_for(exps: list[dict[str, Any]], tmp: Path, data_dir: Path, nexp: int = 2) -> Runner:
    opts = RunnerOptions(source="test", out=tmp / "out", ckpt_dir=tmp / "ck", nexp=nexp,
                         data_dir=data_dir, quiet=True)  # fmt: skip
    runner = Runner([parse_experiment(e, "") for e in exps], opts)
    runner.resolve()
    return runner


def oracle_name(base: str, raw: RawData, forget: dict[str, Any], seed: int) -> str:
    """The oracle's cache name, computed here from the split alone."""
    spec = make_forget_spec(forget.get("cf"), forget.get("unlr"), None, seed)
    split = make_split(raw, spec, 0, 0.1, None)
    return oracle_checkpoint_name(base, spec, split.forget)


def test_expand_shares_base_models_and_oracles(
    tmp_path: Path, data_dir: Path, mnist5k: RawData, tiny_base: Path
) -> None:
    exps = [
        {"checkpoint": R1, "class_to_forget": 3} | CHEAP,  # 0
        {"checkpoint": R1, "class_to_forget": 3, "method": "ft", "epochs": 1},  # 1: same oracle
        {"checkpoint": R1, "unlearning_rate": 0.02} | CHEAP,  # 2: an oracle per seed
        {"checkpoint": R2, "class_to_forget": 3} | CHEAP,  # 3: another base model
        # 4: R1's checkpoint in another folder (the session's tiny base model): another base
        # task, and the same oracle (the cache names an oracle by its base model's recipe)
        {"checkpoint": str(tiny_base), "class_to_forget": 3} | CHEAP,
    ]
    runner = runner_for(exps, tmp_path, data_dir)
    graph = expand(runner, report=True)

    ck = tmp_path / "ck"
    b1, b2 = (base_checkpoint_name(TrainConfig.from_json(r)) for r in (R1, R2))
    tiny = tiny_base.with_suffix("")
    assert tiny.name == b1 and tiny.parent != ck
    o1 = ck / "oracles" / oracle_name(b1, mnist5k, {"cf": 3}, 0)
    o1r = [ck / "oracles" / oracle_name(b1, mnist5k, {"unlr": 0.02}, s) for s in (0, 1)]
    o2 = ck / "oracles" / oracle_name(b2, mnist5k, {"cf": 3}, 0)
    assert oracle_name(b1, mnist5k, {"cf": 3}, 1) == o1.name  # a class's forget set: no seed
    folders = [runner.jobs[i].folder for i in range(5)]
    runs = [f"run:{f}/seed{s}" for f in folders for s in (0, 1)]
    assert list(graph.tasks) == [
        f"base:{ck / b1}", f"base:{ck / b2}", f"base:{tiny}",
        f"oracle:{o1}", f"oracle:{o1r[0]}", f"oracle:{o1r[1]}", f"oracle:{o2}",
        *runs, SUMMARY, REPORT,
    ]  # fmt: skip
    t = graph.tasks
    assert t[f"base:{ck / b1}"].path == str(ck / b1) and t[f"base:{ck / b1}"].deps == ()
    assert t[f"base:{tiny}"].path == str(tiny_base)
    # an oracle of a supervised recipe trains alongside its base model: no dependency
    assert t[f"oracle:{o1}"].deps == () and t[f"oracle:{o1}"].path == str(o1)
    assert t[f"oracle:{o2}"].deps == () and t[f"oracle:{o1r[1]}"].deps == ()
    for i, folder in enumerate(folders):
        for s in (0, 1):
            run = t[f"run:{folder}/seed{s}"]
            oracle = {2: o1r[s], 3: o2}.get(i, o1)
            base = {3: ck / b2, 4: tiny}.get(i, ck / b1)
            assert run.deps == (f"base:{base}", f"oracle:{oracle}"), run
            assert (run.kind, run.job, run.k) == (RUN, i, s)
            assert run.path == str(tmp_path / "out" / "runs" / folder / f"seed{s}")
    assert t[SUMMARY].deps == tuple(runs) and t[REPORT].deps == (SUMMARY,)
    assert [len(layer) for layer in graph.layers()] == [3, 4, 10, 1, 1]
    assert [len(layer) for layer in graph.layers((BASE, ORACLE, RUN))] == [3, 4, 10]


def test_graph_skips_what_is_finished_and_what_no_run_needs() -> None:
    tasks = [
        Task("base:a", BASE, "a"),
        Task("base:b", BASE, "b"),
        Task("oracle:a1", ORACLE, "a1", ("base:a",)),
        Task("oracle:b1", ORACLE, "b1", ("base:b",)),
        Task("run:x/seed0", RUN, "x0", ("base:a", "oracle:a1")),
        Task("run:y/seed0", RUN, "y0", ("base:b", "oracle:b1")),
        Task(SUMMARY, SUMMARY, "s", ("run:x/seed0", "run:y/seed0")),
    ]
    graph = Graph({t.key: t for t in tasks})
    finished = {"run:y/seed0", "base:a"}  # y is done, so b and b1 are not needed (not built)
    graph.check(lambda t: t.key in finished)
    assert graph.done == {"run:y/seed0", "base:a", "base:b", "oracle:b1"}
    assert [t.key for t in graph.todo()] == ["oracle:a1", "run:x/seed0"]
    assert [t.key for t in graph.ready(set(graph.done), set())] == ["oracle:a1"]
    assert [t.key for t in graph.ready(graph.done | {"oracle:a1"}, set())] == ["run:x/seed0"]
    assert graph.ready(graph.done | {"oracle:a1"}, {"run:x/seed0"}) == []
    assert [t.key for t in graph.todo((SUMMARY,))] == [SUMMARY]


def test_a_held_run_is_done_last_and_waited_for(capsys: pytest.CaptureFixture[str]) -> None:
    tasks = [Task(f"run:{n}/seed0", RUN, n) for n in "abc"]
    graph = Graph({t.key: t for t in tasks})
    calls: list[tuple[str, bool]] = []

    def execute(task: Task, wait: bool) -> tuple[str, str]:
        calls.append((task.path, wait))
        if task.path == "a" and not wait:
            return HELD, ""  # another process holds run a
        return DONE, f"did {task.path}"

    progress = Progress(graph, quiet=False)
    run_in_order(graph, execute, progress)
    assert calls == [("a", False), ("b", False), ("c", False), ("a", True)]
    assert progress.finished_tasks == ["run:b/seed0", "run:c/seed0", "run:a/seed0"]
    assert capsys.readouterr().err.splitlines() == ["did b", "did c", "did a"]


# ---------------------------------------------------------------------------- worker plan


def test_workers_auto_on_cpu_fits_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    assert plan_workers("auto", cpu) == WorkerPlan(8, 1, (), "cpu")
    assert plan_workers("auto", cpu, threads=3) == WorkerPlan(2, 3, (), "cpu")  # floor(8 / 3)
    assert plan_workers("auto", cpu, threads=16).workers == 1  # never fewer than one
    assert plan_workers("3", cpu) == WorkerPlan(3, 1, (), "cpu")
    assert plan_workers("1", cpu) == WorkerPlan(1, 1, (), "cpu")
    assert plan_workers("auto", cpu).describe() == "8 workers x 1 thread on cpu"
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(UserError, match=f"--workers '{bad}' is invalid"):
            plan_workers(bad, cpu)
    with pytest.raises(UserError, match="--gpus needs --device cuda"):
        plan_workers("auto", cpu, gpus="0,1")
    with pytest.raises(UserError, match="--tasks-per-gpu needs --device cuda"):
        plan_workers("auto", cpu, tasks_per_gpu=2)
    with pytest.raises(UserError, match="--threads-per-task 0 is invalid"):
        plan_workers("auto", cpu, threads=0)


def test_workers_on_cuda_pin_one_gpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    # the plan only counts the GPUs, so it is checked here without one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cuda = torch.device("cuda")
    assert plan_workers("auto", cuda).gpus == (0, 1, 2, 3)
    plan = plan_workers("auto", cuda, gpus="1,3", tasks_per_gpu=2)
    assert (plan.workers, plan.gpus) == (4, (1, 3, 1, 3))
    assert plan.describe() == "4 workers x 1 thread on GPUs 1,3"
    assert plan_workers("3", cuda, gpus="0,1").gpus == (0, 1, 0)
    assert plan_workers("auto", torch.device("cuda:2")) == WorkerPlan(1, 1, (), "cuda:2")
    for bad, why in (("0,9", "GPU 9 does not exist"), ("a", "is invalid"), ("1,1", "is invalid")):
        with pytest.raises(UserError, match=why):
            plan_workers("auto", cuda, gpus=bad)


# ----------------------------------------------------------------- arguments of a worker


def test_every_shipped_experiment_travels_to_a_worker_unchanged() -> None:
    for path in sorted((REPO_ROOT / "exp").glob("*.json")):
        if path.name == "schema.json":
            continue
        exps = load_experiments(path)
        back = [parse_experiment(json.loads(json.dumps(minimal_json(e))), "") for e in exps]
        assert back == exps, path
    assert minimal_json(ExperimentConfig(method="retrain", class_to_forget=1)) == {
        "method": "retrain", "class_to_forget": 1}  # fmt: skip


def test_runner_options_travel_as_plain_values(tmp_path: Path) -> None:
    opts = RunnerOptions(source="exp/x.json", out=tmp_path / "o", ckpt_dir=Path("ck"),
                         nexp=3, base_seed=7, threads=2, amp=False, verbose=True)  # fmt: skip
    text = json.dumps(opts.to_json())
    assert RunnerOptions.from_json(json.loads(text)) == opts


# ---------------------------------------------------------------------------- terminal table


def result(folder: str, seed: int, oracle: str, forget: dict[str, Any], acc: float) -> RunResult:
    report = {"forget_acc": acc, "retain_acc": 0.99, "test_acc": 0.98, "mia_efficacy": 0.5}
    return RunResult(
        experiment=folder, index=0, name=folder[3:], method="ft", seed=seed, forget=forget,
        metrics=report, oracle=report | {"forget_acc": 0.0}, base=report,
        gaps={"avg_gap": 12.3456}, times={"unlearn_time": 1.25, "oracle_time": 10.0},
        mask_kept=None, oracle_checkpoint=oracle, base_checkpoint="b",
    )  # fmt: skip


def test_terminal_table_fits_100_columns_with_each_oracle_once() -> None:
    cf7 = {"classes": [7], "fraction": None, "n": 360}
    unlr = {"classes": [], "fraction": 0.1, "n": 450}
    long = "02_a_very_long_experiment_name_that_does_not_fit_anywhere_at_all_in_a_table"
    folders = ["00_ft_cf7", "01_ft+mask_unlr0.1", long, "03_ga_cf7"]
    results = []
    for s in (0, 1, 2):
        results += [
            result(folders[0], s, "o/cf7", cf7, 0.40 + s / 10),
            result(folders[1], s, f"o/unlr_s{s}", unlr, 0.97),
            result(folders[2], s, "o/cf7", cf7, 0.5),
            result(folders[3], s, "o/cf7", cf7, 0.1),
        ]
    text = to_terminal(results, folders)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    names = [line.split("  ")[0].strip() for line in lines[3:]]
    assert names[0] == "(oracle cf7)" and names[1] == "00_ft_cf7"
    assert names[2] == "(oracle unlr0.1)" and names[3] == "01_ft+mask_unlr0.1"
    assert names[5] == "03_ga_cf7" and len(names) == 6  # cf7's oracle is not repeated
    assert names[4].startswith("02_a_very_long") and "…" in names[4]
    assert lines[0].startswith("mean±std over 3 seeds")
    assert lines[1].split() == ["experiment", "forget", "retain", "test", "MIA", "avg", "gap",
                                "time"]  # fmt: skip
    row = lines[4].split()
    assert row[1:] == ["50.0±10", "99.0±0.0", "98.0±0.0", "50.0±0.0", "12.3±0.0", "1.2±0.0"]
    assert lines[3].split()[2:] == ["0.0±0.0", "99.0±0.0", "98.0±0.0", "50.0±0.0", "10.0±0.0"]
    # another number of runs per experiment: a runs column
    text = to_terminal(results[:-1], folders)
    assert text.splitlines()[1].split()[:2] == ["experiment", "runs"]
    assert max(len(line) for line in text.splitlines()) <= 100


def test_an_oracle_waits_for_a_base_model_given_as_a_file_or_pretrained(
    tmp_path: Path, data_dir: Path, tiny_base: Path
) -> None:
    byol = R1 | {"pretrain": {"method": "byol", "epochs": 1}}
    exps = [
        {"checkpoint": str(tiny_base), "class_to_forget": 3} | CHEAP,  # a file: read its recipe
        {"checkpoint": byol, "class_to_forget": 3} | CHEAP,  # may reuse the base's encoder
        {"checkpoint": R2, "class_to_forget": 3} | CHEAP,  # supervised recipe: no wait
    ]
    runner = runner_for(exps, tmp_path, data_dir, nexp=1)
    graph = expand(runner)
    oracles = [t for t in graph.tasks.values() if t.kind == ORACLE]
    assert [t.job for t in oracles] == [0, 1, 2]
    assert [t.deps for t in oracles] == [
        (f"base:{tiny_base.with_suffix('')}",),
        (runner.base_key(runner.jobs[1]),),
        (),
    ]
    assert [runner.oracle_needs_base(j) for j in runner.jobs] == [True, True, False]
