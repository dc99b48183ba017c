"""The many-model evaluation (running/many_models.py) end to end on the tiny mnist5k LeNet.

One sweep with ``"evaluate"`` on a class-wise and a random-forgetting experiment: its tasks are
ordinary graph tasks; member 0 of the N unlearned models is exactly the seed-s run and the
oracle of the recipe's seed is exactly the ordinary oracle; every oracle shares one forget set;
the files hold what epsilon.json says; U-LiRA reports its metrics; a rerun has nothing to do.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import metrics
from core.errors import UserError
from evaluation.epsilon import Accuracies, evaluate, logit_confidence
from running import many_models
from running.config import parse_experiment
from running.graph import EPSILON, MODEL_ORACLE, MODEL_RUN, SHADOW, SHADOW_BASE, ULIRA
from running.results import load_outputs
from running.runner import Runner, RunnerOptions
from running.tables import summarize, to_markdown, to_terminal
from training.checkpoints import read_meta

N, K = 3, 4


@pytest.fixture(scope="module")
def sweep(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, checkpoints_dir: Path,
    data_dir: Path,
) -> tuple[Runner, list[Any]]:  # fmt: skip
    mp = pytest.MonkeyPatch()
    mp.setattr(metrics, "salun_mia", functools.partial(metrics.salun_mia, max_per_side=200))
    exps = [
        {"checkpoint": str(tiny_base), "class_to_forget": 3, "method": "ga_small",
         "epochs": 1, "lr": 0.001, "evaluate": {"models": N}},
        {"checkpoint": str(tiny_base), "unlearning_rate": 0.05, "method": "ft", "epochs": 1,
         "evaluate": {"models": N, "ulira": {"shadows": K}}},
    ]  # fmt: skip
    opts = RunnerOptions(source="test", out=tmp_path_factory.mktemp("many") / "out",
                         ckpt_dir=checkpoints_dir, device=torch.device("cpu"), nexp=1,
                         data_dir=data_dir, quiet=True)  # fmt: skip
    runner = Runner([parse_experiment(e, "") for e in exps], opts)
    runner.resolve()
    try:
        results = runner.run_all()
    finally:
        mp.undo()
    return runner, results


def test_graph_tasks(sweep: tuple[Runner, list[Any]]) -> None:
    runner, _ = sweep
    graph = runner.graph()
    kinds = [t.kind for t in graph.tasks.values()]
    # N - 1 oracles of other seeds per experiment (the recipe's seed is the ordinary oracle)
    assert kinds.count(MODEL_ORACLE) == 2 * (N - 1) and kinds.count(MODEL_RUN) == 2 * N
    assert kinds.count(EPSILON) == 2 and kinds.count(ULIRA) == 1
    assert kinds.count(SHADOW_BASE) == K and kinds.count(SHADOW) == K
    paths = [t.path for t in graph.tasks.values()]
    assert len(set(paths)) == len(paths)  # each output is one task (the ordinary oracle too)
    summary = graph.tasks["summary"]
    assert {"epsilon:00_ga_small_cf3", "epsilon:01_ft_unlr0.05", "ulira:01_ft_unlr0.05"} <= set(
        summary.deps
    )
    assert graph.todo() == []  # everything verified done: a rerun does nothing


def test_members_are_the_runs_and_the_oracles(sweep: tuple[Runner, list[Any]]) -> None:
    runner, _ = sweep
    for job in runner.jobs:
        d = many_models.epsilon_dir(runner, job)
        conf = load_file(str(d / "confidences.safetensors"))
        eps = json.loads((d / "epsilon.json").read_text())
        run = runner.run_dir(job, 0)
        outs, _ = load_outputs(run / "outputs.safetensors")
        forget = outs["forget"]
        order = torch.argsort(forget.indices)
        assert eps["forget_indices"] == forget.indices[order].tolist()
        assert conf["unlearned"].shape == conf["retrained"].shape == (N, len(forget))
        # member 0 (seed s) is the run of seed s, bit for bit
        want = logit_confidence(forget.logits[order], forget.labels[order])
        torch.testing.assert_close(conf["unlearned"][0], want, rtol=0, atol=0)
        # the oracle of the recipe's seed is the run's oracle; all N share its forget set
        run_metrics = json.loads((run / "metrics.json").read_text())
        assert eps["oracles"][0] == run_metrics["oracle_checkpoint"]
        shas = {read_meta(p)["forget_sha256"] for p in eps["oracles"][1:]}
        assert shas == {run_metrics["forget"]["sha256"][:16]}
        assert [read_meta(p)["train"]["seed"] for p in eps["oracles"]] == list(range(N))
        # the oracles differ (other training seeds), and so do the unlearned models
        assert not torch.equal(conf["retrained"][0], conf["retrained"][1])
        assert not torch.equal(conf["unlearned"][1], conf["unlearned"][2])
        # epsilon.json is what evaluation/epsilon.py gives for these confidences
        acc = Accuracies(*(eps[k] for k in ("retain_acc_unlearned", "test_acc_unlearned",
                                             "retain_acc_retrained", "test_acc_retrained")))  # fmt: skip
        again = evaluate(conf["unlearned"].numpy(), conf["retrained"].numpy(), acc)
        assert eps["n_models"] == N and eps["score"] == pytest.approx(again.score, abs=1e-12)
        assert np.allclose(eps["per_example_epsilon"], again.per_example_epsilon, equal_nan=True)
        per = eps["per_model"]
        assert eps["test_acc_unlearned"] == pytest.approx(np.mean(per["test_acc_unlearned"]))
        assert per["test_acc_unlearned"][0] == run_metrics["metrics"]["test_acc"]
        assert eps["cost"]["retrained"]["backward_samples"] > 0


def test_ulira_and_the_summary(sweep: tuple[Runner, list[Any]]) -> None:
    runner, results = sweep
    job = runner.jobs[1]
    u = json.loads((many_models.epsilon_dir(runner, job) / "ulira.json").read_text())
    assert u["n_shadows"] == K and u["n_targets_unlearned"] == N and u["fixed_variance"]
    assert u["examples_scored"] > 0 and 0 <= u["auc"] <= 1 and 0 <= u["acc"] <= 1
    assert u["n_positive"] == u["n_negative"] == N * u["examples_scored"]
    folders = [j.folder for j in runner.jobs]
    md = to_markdown(summarize(results, folders))
    assert "eps score" in md and "U-LiRA AUC" in md and "passes/oracle" in md
    lines = to_terminal(results, folders).splitlines()
    head = next(line for line in lines if line.startswith("experiment")).split()
    assert head[head.index("gap") + 1] == "eps"  # next to the avg gap
    assert all("eps_score" in r.extra for r in results)


def test_evaluate_key_is_checked() -> None:
    base = {"class_to_forget": 1, "method": "ft"}
    with pytest.raises(UserError, match=r"key 'evaluate.ulira'.*add \"models\""):
        parse_experiment(base | {"evaluate": {"ulira": {"shadows": 4}}}, "x: ")
    with pytest.raises(UserError, match="evaluate.models"):
        parse_experiment(base | {"evaluate": {"models": 1}}, "x: ")
    with pytest.raises(UserError, match="evaluate.ulira.shadows"):
        parse_experiment(base | {"evaluate": {"models": 4, "ulira": {"shadows": 1}}}, "x: ")
    with pytest.raises(UserError, match="not with class_to_forget"):
        parse_experiment(base | {"evaluate": {"models": 4, "ulira": {"shadows": 4}}}, "x: ")
    ok = parse_experiment(base | {"evaluate": {"models": 4}}, "x: ")
    assert ok.to_json()["evaluate"] == {"models": 4}
    assert "evaluate" not in parse_experiment(base, "x: ").to_json()
