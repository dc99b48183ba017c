"""Tests for running/tune.py: the Optuna loop on a toy objective with a known optimum, resuming
a study, every method's declared search space, the ``tune`` key's checks, and a hook proving
that tuning never unlearns or evaluates the evaluated forget set (class-wise and random).

The end-to-end tests tune on the session's one-epoch LeNet (``tiny_base``) with small MIA
attacks; the toy tests never touch a model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import UserError
from methods import METHODS
from running.config import load_experiments, parse_experiment
from running.runner import Prepared, Runner, RunnerOptions
from running.tune import (
    PENALTY,
    Dim,
    Tuner,
    check_tunable,
    current,
    optimize,
    search_space,
    with_trials,
)

DIMS = [Dim("lr", "log", (1e-5, 1e-1)), Dim("epochs", "int", (1, 10))]
DEFAULTS = {"lr": 1e-2, "epochs": 8}


def bowl(p: dict[str, Any]) -> float:
    """Minimum 0 at lr 1e-3, epochs 4."""
    return (math.log10(p["lr"]) + 3) ** 2 + (p["epochs"] - 4) ** 2


def batch_of(f: Any, seen: list[tuple[int, dict[str, Any]]] | None = None) -> Any:
    def evaluate(todo: list[tuple[int, dict[str, Any]]]) -> list[float]:
        if seen is not None:
            seen.extend(todo)
        return [f(p) for _, p in todo]

    return evaluate


def test_toy_objective_finds_the_known_optimum(tmp_path: Path) -> None:
    seen: list[tuple[int, dict[str, Any]]] = []
    study = optimize(tmp_path / "t.db", "toy", DIMS, DEFAULTS, 30, 0, batch_of(bowl, seen))
    assert len(study.trials) == 30 and len(seen) == 30
    assert seen[0] == (0, DEFAULTS)  # trial 0 is the experiment's own settings
    assert study.trials[0].value == pytest.approx(bowl(DEFAULTS))
    assert study.best_params["epochs"] == 4
    assert abs(math.log10(study.best_params["lr"]) + 3) < 0.5
    assert study.best_value < 0.25 < bowl(DEFAULTS)


def test_a_resumed_study_is_the_uninterrupted_one(tmp_path: Path) -> None:
    whole = optimize(tmp_path / "a.db", "a", DIMS, DEFAULTS, 12, 3, batch_of(bowl))
    optimize(tmp_path / "b.db", "b", DIMS, DEFAULTS, 5, 3, batch_of(bowl))
    seen: list[tuple[int, dict[str, Any]]] = []
    resumed = optimize(tmp_path / "b.db", "b", DIMS, DEFAULTS, 12, 3, batch_of(bowl, seen))
    assert [n for n, _ in seen] == list(range(5, 12))  # only the missing trials ran
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]
    other = optimize(tmp_path / "c.db", "c", DIMS, DEFAULTS, 12, 4, batch_of(bowl))
    assert [t.params for t in other.trials][1:] != [t.params for t in whole.trials][1:]


def test_an_interrupted_trial_runs_again_with_its_settings(tmp_path: Path) -> None:
    asked: list[tuple[int, dict[str, Any]]] = []

    def stop_at_trial_3(todo: list[tuple[int, dict[str, Any]]]) -> list[float]:
        asked.extend(todo)
        if todo[0][0] == 3:
            raise KeyboardInterrupt
        return [bowl(p) for _, p in todo]

    with pytest.raises(KeyboardInterrupt):
        optimize(tmp_path / "i.db", "i", DIMS, DEFAULTS, 6, 0, stop_at_trial_3)
    seen: list[tuple[int, dict[str, Any]]] = []
    study = optimize(tmp_path / "i.db", "i", DIMS, DEFAULTS, 6, 0, batch_of(bowl, seen))
    assert seen[0] == asked[-1]  # trial 3, with the settings it was asked with
    assert [t.number for t in study.trials] == list(range(6))
    whole = optimize(tmp_path / "w.db", "w", DIMS, DEFAULTS, 6, 0, batch_of(bowl))
    assert [t.params for t in study.trials] == [t.params for t in whole.trials]


def test_batches_and_diverged_trials(tmp_path: Path) -> None:
    seen: list[tuple[int, dict[str, Any]]] = []
    nan_on_big_lr = batch_of(lambda p: math.nan if p["lr"] > 1e-2 else bowl(p), seen)
    study = optimize(tmp_path / "b.db", "b", DIMS, DEFAULTS, 7, 0, nan_on_big_lr, batch=3)
    assert [n for n, _ in seen] == list(range(7))
    for t, (_, p) in zip(study.trials, seen, strict=True):
        assert t.value == (PENALTY if p["lr"] > 1e-2 else pytest.approx(bowl(p)))


def test_every_method_declares_a_valid_space_holding_its_defaults() -> None:
    for name, spec in METHODS.items():
        for f in dataclasses.fields(spec.args):
            r = f.metadata.get("search")
            if r is None:
                continue
            kind, lo, hi = r[0], r[1], r[-1]
            assert kind in ("log", "float", "int"), (name, f.name, r)
            assert (kind == "int") == (f.type in ("int", int)), (name, f.name, r)
            assert lo <= f.default <= hi, (name, f.name, r, f.default)
        cfg = parse_experiment({"class_to_forget": 1, "method": name}, f"{name}: ")
        dims = search_space(cfg)  # ranges well-formed (parse_range raises otherwise)
        names = [d.name for d in dims]
        assert ("lr" in names) == ("lr" not in spec.ignores), name
        assert current(cfg, dims).keys() == set(names)
    ga = search_space(parse_experiment({"class_to_forget": 1, "method": "ga"}, ""))
    assert ga == [
        Dim("lr", "log", (1e-5, 1e-2)),
        Dim("epochs", "int", (1, 10)),
        Dim("method_args.ascent_weight", "log", (0.1, 10.0)),
    ]
    # a method reading lr and epochs without declaring ranges is searched around them
    fs = parse_experiment({"replace_class": {"old": 1, "new": 2}, "method": "freeze_salient",
                           "lr": 0.02, "epochs": 3}, "")  # fmt: skip
    assert search_space(fs)[:2] == [Dim("lr", "log", (0.002, 0.2)), Dim("epochs", "int", (1, 6))]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"class_to_forget": 7, "tune": {"forget": 7}},
         "key 'tune.forget': 7 is invalid; the tuning class must not be an evaluated one"),
        ({"class_to_forget": [3, 7], "tune": {"forget": [1, 3]}},
         "key 'tune.forget': [1, 3] is invalid; the tuning class must not be an evaluated one"),
        ({"unlearning_rate": 0.1, "tune": {"forget": 2}},
         "key 'tune.forget': 2 is invalid; a tuning class is for class-wise forgetting"),
        ({"class_to_forget": 7, "tune": {"trials": 0}},
         "key 'tune.trials': 0 is invalid; use an integer in 1..10000"),
        ({"class_to_forget": 7, "tune": {"trails": 3}}, "unknown key 'tune.trails' (did you mean"),
        ({"replace_class": {"old": 1, "new": 2}, "method": "freeze_salient", "tune": {}},
         "key 'tune': class replacement cannot be tuned"),
    ],
)  # fmt: skip
def test_bad_tune_keys_are_one_line_errors(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as e:
        parse_experiment(obj, "x.json: experiment 0: ")
    assert str(e.value).startswith(f"x.json: experiment 0: {message}"), str(e.value)


def test_base_seeds_need_a_recipe_and_retrain_has_nothing_to_tune(tiny_base: Path) -> None:
    with pytest.raises(UserError, match="key 'tune.base_seeds': \\[1, 2\\] is invalid; base seeds"):
        parse_experiment({"checkpoint": str(tiny_base), "class_to_forget": 7,
                          "tune": {"base_seeds": [1, 2]}}, "")  # fmt: skip
    exps = with_trials([parse_experiment({"class_to_forget": 7, "method": "retrain"}, "")], 5)
    assert exps[0].tune is not None and exps[0].tune.trials == 5
    with pytest.raises(UserError, match="experiment 0: key 'tune': method 'retrain' has no "):
        check_tunable(exps, "x.json")
    with pytest.raises(UserError, match="--tune 0 is invalid"):
        with_trials(exps, 0)


@pytest.fixture
def fast_mia(monkeypatch: pytest.MonkeyPatch) -> None:
    """Smaller attacks (the same code): the attacks dominate a tiny run's time."""
    import metrics

    monkeypatch.setattr(
        metrics, "salun_mia", functools.partial(metrics.salun_mia, max_per_side=200)
    )
    monkeypatch.setattr(metrics, "loss_mia", functools.partial(metrics.loss_mia, n_splits=2))


def tuner_for(tmp_path: Path, ckpt_dir: Path, data_dir: Path, nexp: int) -> Tuner:
    opts = RunnerOptions(source="test", out=tmp_path / "run", ckpt_dir=ckpt_dir,
                         device=torch.device("cpu"), nexp=nexp, data_dir=data_dir, quiet=True,
                         representation=False)  # fmt: skip
    return Tuner(opts)


def record_forget_sets(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The hook: the forget set of every run prepared (unlearned, its oracle trained and
    both evaluated) from now on."""
    used: list[torch.Tensor] = []
    prepare = Runner.prepare

    def spy(self: Runner, job: Any, seed: int) -> Prepared:
        prep = prepare(self, job, seed)
        used.append(prep.split.forget.clone())
        return prep

    monkeypatch.setattr(Runner, "prepare", spy)
    return used


@pytest.mark.usefixtures("fast_mia")
def test_class_wise_tuning_never_uses_the_evaluated_class(
    tmp_path: Path, tiny_base: Path, checkpoints_dir: Path, data_dir: Path, mnist5k: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cfg = parse_experiment({"checkpoint": str(tiny_base), "class_to_forget": 7, "method": "ga",
                            "lr": 1e-4, "epochs": 1, "tune": {"trials": 2}}, "")  # fmt: skip
    used = record_forget_sets(monkeypatch)
    tuned = tuner_for(tmp_path, checkpoints_dir, data_dir, 1).tune(cfg, 0)
    assert len(used) >= 2  # the oracle task and one run per trial
    for forget in used:
        assert set(mnist5k.train_y[forget].tolist()) == {8}  # the next class, never 7
    r = tuned.report
    assert r["tuning_forget"] == {"class_to_forget": 8}
    assert r["defaults"]["params"] == {"lr": 1e-4, "epochs": 1, "method_args.ascent_weight": 1.0}
    assert [t["trial"] for t in r["trials"]] == [0, 1]
    assert r["trials"][0]["params"] == r["defaults"]["params"]
    assert r["best"]["avg_gap"] == min(t["avg_gap"] for t in r["trials"])
    tuner = tuner_for(tmp_path, checkpoints_dir, data_dir, 1)
    assert cfg.tune is not None
    asked: list[tuple[int | list[int], int | list[int]]] = [(2, 2), ([2, 9], [2, 9]), ([4], 4)]
    for given, keys in asked:
        other = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, forget=given))
        assert tuner.forget_keys(other, 0)["class_to_forget"] == keys
    (best,) = load_experiments(tuned.best_file)  # a ready-to-run experiment file
    assert best.name == "ga_cf7_tuned" and best.class_to_forget == 7 and best.tune is None
    assert best.lr == r["best"]["params"]["lr"] and best.epochs == r["best"]["params"]["epochs"]
    assert (tmp_path / "run" / "tune" / "ga_cf7.db").is_file()
    assert not (tmp_path / "run" / "runs").exists()  # the evaluated experiment did not run


@pytest.mark.usefixtures("fast_mia")
def test_random_tuning_draws_outside_every_evaluated_forget_set(
    tmp_path: Path, tiny_base: Path, checkpoints_dir: Path, data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cfg = parse_experiment({"checkpoint": str(tiny_base), "unlearning_rate": 0.05,
                            "method": "ga_small", "lr": 1e-3, "epochs": 1,
                            "tune": {"trials": 1, "seed": 5}}, "")  # fmt: skip
    tuner = tuner_for(tmp_path, checkpoints_dir, data_dir, 2)
    runner = Runner([cfg], tuner.opts)
    job = runner.resolve()[0]
    raw = runner.raw(job.dataset, job.dataset_args)
    evaluated = [runner.split_for(job, raw, s)[1] for s in (0, 1)]  # the sweep's two seeds
    used = record_forget_sets(monkeypatch)
    tuned = tuner.tune(cfg, 0)
    forget = used[0]
    assert all(torch.equal(f, forget) for f in used)  # the oracle task and the trial
    assert len(forget) == len(evaluated[0].forget) == 200
    for split in evaluated:
        assert not torch.isin(forget, split.forget).any()
        assert not torch.isin(forget, split.val).any()
    path = Path(tuned.report["tuning_forget"]["idxs_to_forget"])
    assert json.loads(path.read_text()) == forget.tolist()
    assert "unlearning_rate" not in tuned.report["tuning_forget"]
    assert tuner.forget_keys(cfg, 0)["idxs_to_forget"] == str(path)  # resumed: the same draw
    assert json.loads(path.read_text()) == forget.tolist()
    with pytest.raises(UserError, match="overlaps an evaluated forget set of seeds 0..2"):
        tuner_for(tmp_path, checkpoints_dir, data_dir, 3).forget_keys(cfg, 0)  # a third seed
    (best,) = load_experiments(tuned.best_file)
    assert best.unlearning_rate == 0.05 and best.idxs_to_forget is None
