"""Tests for runner.py and main.py: reproducible runs, resuming a run folder, an end-to-end
class-wise forgetting run on mnist5k, and W&B logging without a network.

Runs use the session's one-epoch LeNet (``tiny_base``) and its ``--checkpoints`` folder, so the
retrain oracle of a forget set is trained once and shared. The CLI runs call ``main.main`` in
this process (starting Python with torch takes 10-30 s here; tests/test_config.py runs the real
``python main.py``). Nothing is written into the repository: every folder is a temporary one.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

from cli import main as main_mod
from running.config import parse_experiment
from running.results import load_outputs, load_reference, reference_path, select_splits
from running.runner import Runner, RunnerOptions
from running.wandb_log import WandbLogger
from training.mask import SaliencyMask
from training.outputs import accuracy

CHEAP = {"class_to_forget": 3, "method": "ga_small", "epochs": 1, "lr": 0.001}


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def fast_mia(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same MIA code on smaller attacks, for tests about run folders and logging.

    The attacks dominate a tiny run's time (three models, ten logistic-regression folds and
    an SVC per feature each). With at most 200 shadow samples a side the seeded subsampling
    runs too (the real cap, 5000, exceeds mnist5k); the end-to-end test keeps the real settings.
    """
    import metrics

    monkeypatch.setattr(
        metrics, "salun_mia", functools.partial(metrics.salun_mia, max_per_side=200)
    )
    monkeypatch.setattr(metrics, "loss_mia", functools.partial(metrics.loss_mia, n_splits=2))


def make_runner(
    exps: list[dict[str, Any]],
    out: Path,
    ckpt_dir: Path,
    data_dir: Path,
    nexp: int = 1,
    wandb: str = "disabled",
) -> Runner:
    opts = RunnerOptions(
        source="test",
        out=out,
        ckpt_dir=ckpt_dir,
        device=torch.device("cpu"),
        nexp=nexp,
        data_dir=data_dir,
        wandb_mode=wandb,
        quiet=True,
    )
    return Runner([parse_experiment(e, "") for e in exps], opts)


def metrics_of(out: Path, folder: str, seed: int) -> dict[str, Any]:
    return json.loads((out / "runs" / folder / f"seed{seed}" / "metrics.json").read_text())


def numbers(result: dict[str, Any]) -> dict[str, Any]:
    """Everything in metrics.json but the wall-clock times."""
    return {k: v for k, v in result.items() if k != "times"}


def started(stderr: str) -> list[str]:
    """The runs a CLI invocation did (its "== <folder> seed <k>: <method> on <data> | ..."
    result lines, up to the numbers)."""
    return [line.split(" | ")[0] for line in stderr.splitlines() if line.startswith("== ")]


def strict_json(path: Path) -> Any:
    """A JSON file's content; NaN or Infinity in it fail the test."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main_mod.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_numbers_other_seed_other_forget_set(
    tmp_path: Path, tiny_base: Path, checkpoints_dir: Path, data_dir: Path, fast_mia: None
) -> None:
    exp = {
        "checkpoint": str(tiny_base),
        "unlearning_rate": 0.02,
        "method": "rl_split",
        "epochs": 1,
        "use_mask": True,
        "mask_thr": 0.3,
    }
    a = make_runner([exp], tmp_path / "a", checkpoints_dir, data_dir, nexp=2)
    b = make_runner([exp], tmp_path / "b", checkpoints_dir, data_dir, nexp=1)
    ref = reference_path(tiny_base)
    stamps = []
    for r in (a, b):
        r.resolve()
        assert len(r.run_all()) == r.opts.nexp
        stamps.append(ref.stat().st_mtime_ns)
    assert stamps[0] == stamps[1]  # the base model's outputs: computed once, then read back
    folder = "00_rl_split+mask_unlr0.02"
    a0, a1 = metrics_of(tmp_path / "a", folder, 0), metrics_of(tmp_path / "a", folder, 1)
    b0 = metrics_of(tmp_path / "b", folder, 0)

    assert numbers(a0) == numbers(b0)
    assert set(a0["times"]) == set(b0["times"])
    run_a, run_b = (p / "runs" / folder / "seed0" for p in (tmp_path / "a", tmp_path / "b"))
    wa, wb = (
        load_file(str(run_a / "model.safetensors")),
        load_file(str(run_b / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (
        SaliencyMask.load(run_a / "mask.safetensors"),
        SaliencyMask.load(run_b / "mask.safetensors"),
    )
    assert all(torch.equal(ma.masks[n], mb.masks[n]) for n in ma.masks)
    assert (run_a / "model_forget.json").read_text() == (run_b / "model_forget.json").read_text()

    # another seed draws another forget set of the same size, so another oracle and other numbers
    assert a0["forget"]["n"] == a1["forget"]["n"] == 80
    assert a0["forget"]["sha256"] != a1["forget"]["sha256"]
    assert (a0["forget"]["seed"], a1["forget"]["seed"]) == (0, 1)
    assert a0["oracle_checkpoint"] != a1["oracle_checkpoint"]
    assert a0["metrics"] != a1["metrics"] and a0["oracle"] != a1["oracle"]
    assert a0["base"]["test_acc"] == a1["base"]["test_acc"]  # one base model, one test set


# --------------------------------------------------------------------------------- resume


def test_resume_skips_finished_runs_and_redoes_missing_ones(
    tmp_path: Path,
    tiny_base: Path,
    checkpoints_dir: Path,
    data_dir: Path,
    fast_mia: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    exps = [
        {"checkpoint": str(tiny_base)} | CHEAP,
        {"checkpoint": str(tiny_base), "use_mask": True, "mask_thr": 0.3, "frozen": ["fc2"]}
        | CHEAP,
    ]
    exp_file = tmp_path / "two.json"
    exp_file.write_text(json.dumps(exps))
    out = tmp_path / "out"
    argv = ["-L", str(exp_file), "--nexp", "2", "-NL", "--out", str(out)]
    argv += ["--checkpoints", str(checkpoints_dir), "--data-dir", str(data_dir)]
    argv += ["--device", "cpu"]  # the redone run is compared bit for bit (cuDNN may not be)
    folders = ["00_ga_small_cf3", "01_ga_small+mask_cf3"]

    code, stdout, stderr = cli(argv, capsys)
    assert code == 0, stderr
    assert len(started(stderr)) == 4, stderr
    runs = {(f, s): out / "runs" / f / f"seed{s}" for f in folders for s in (0, 1)}
    for (f, _), d in runs.items():
        for name in ("metrics.json", "model.safetensors", "model.json", "model_forget.json"):
            assert (d / name).is_file(), d / name
        assert (d / "mask.safetensors").is_file() == (f == folders[1])
    for name in ("config.json", "summary.csv", "summary.md"):
        assert (out / name).is_file(), name
    assert not (out / "wandb").exists()  # -NL: W&B disabled, nothing logged
    assert all(f in stdout for f in folders)
    masked = metrics_of(out, folders[1], 1)
    assert masked["frozen_changed"] == [] and 0.3 <= masked["mask_kept"] <= 0.31

    stamps = {k: (d / "metrics.json").stat().st_mtime_ns for k, d in runs.items()}
    gone = (folders[1], 1)
    (runs[gone] / "metrics.json").unlink()

    code, stdout, stderr = cli(argv, capsys)
    assert code == 0, stderr
    for f, s in runs:
        if (f, s) != gone:
            assert f"skip {f} seed {s}: finished" in stderr, stderr
            assert (runs[f, s] / "metrics.json").stat().st_mtime_ns == stamps[f, s]
    assert f"skip {gone[0]} seed {gone[1]}" not in stderr
    assert started(stderr) == [f"== {gone[0]} seed {gone[1]}: ga_small on mnist5k"], stderr
    redone = metrics_of(out, *gone)
    assert numbers(redone) == numbers(masked)  # the same run, the same numbers
    summary = (out / "summary.csv").read_text()
    assert all(f in summary for f in folders)

    # the same --out with another configuration: refused before anything runs
    def refused(args: list[str]) -> None:
        code, stdout, stderr = cli(args, capsys)
        assert code == 2 and stdout == "", stderr
        assert stderr.splitlines() == [
            f"error: {out}: this run folder was made with a different configuration "
            "(experiments[0].lr was 0.001, now 0.002); use a new --out to start a fresh run"
        ]

    exp_file.write_text(json.dumps([exps[0] | {"lr": 0.002}, exps[1]]))
    refused(argv)
    exp_file.write_text(json.dumps(exps))
    stamps[gone] = (runs[gone] / "metrics.json").stat().st_mtime_ns
    assert all((d / "metrics.json").stat().st_mtime_ns == stamps[k] for k, d in runs.items())


# ----------------------------------------------------------------------------- end to end


def test_class_forgetting_end_to_end(
    tmp_path: Path, data_dir: Path, mnist5k: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    quick = json.loads((REPO_ROOT / "exp" / "quickstart.json").read_text())
    rl = next(e for e in quick if e["method"] == "rl_split" and not e.get("use_mask"))
    exp = {
        "checkpoint": {"dataset": "mnist5k", "model": "lenet", "epochs": 8, "seed": 0},
        "class_to_forget": 7,
        "method": "rl_split",
        "lr": rl["lr"],
        "epochs": rl["epochs"],
    }
    exp_file = tmp_path / "e2e.json"
    exp_file.write_text(json.dumps([exp]))
    out, ck = tmp_path / "out", tmp_path / "ck"
    argv = ["-L", str(exp_file), "-NL", "-q", "--out", str(out), "--checkpoints", str(ck)]
    code, stdout, stderr = cli([*argv, "--data-dir", str(data_dir)], capsys)
    assert code == 0, stderr

    # the base model was trained once and cached under --checkpoints, the oracle beside it
    (base_path,) = ck.glob("lenet_mnist5k_base_s0_*.safetensors")
    base_meta = json.loads(base_path.with_suffix(".json").read_text())
    assert base_meta["train"]["epochs"] == 8 and base_meta["kind"] == "base"
    assert base_meta["metrics"]["test_acc"] >= 0.93, base_meta["metrics"]
    assert len(list((ck / "oracles").glob("*.safetensors"))) == 1

    folder = "00_rl_split_cf7"
    r = metrics_of(out, folder, 0)
    m, base, oracle, gaps, times = r["metrics"], r["base"], r["oracle"], r["gaps"], r["times"]
    assert (r["experiment"], r["method"], r["seed"]) == (folder, "rl_split", 0)
    assert r["forget"]["classes"] == [7] and r["forget"]["n"] == 360
    assert r["base_checkpoint"] == str(base_path.with_suffix(""))
    # forgotten, while the other classes keep their accuracy
    assert base["forget_acc"] > 0.9
    assert m["forget_acc"] < 0.05, m["forget_acc"]
    assert m["test_acc"] >= base["test_acc"] - 0.03, (m["test_acc"], base["test_acc"])
    assert m["test_forget_acc"] < 0.05
    # the oracle never saw class 7
    assert oracle["forget_acc"] < 0.05 and oracle["test_acc"] > 0.9
    for key in ("forget_acc", "retain_acc", "test_acc", "mia_efficacy", "UA", "RA", "TA"):
        assert isinstance(oracle[key], float) and isinstance(m[key], float), key
    for g in ("UA", "RA", "TA", "mia_efficacy"):
        assert math.isclose(gaps[f"gap_{g}"], 100 * (m[g] - oracle[g]), abs_tol=1e-9), g
    assert math.isclose(
        gaps["avg_gap"],
        sum(abs(gaps[f"gap_{g}"]) for g in ("UA", "RA", "TA", "mia_efficacy")) / 4,
        abs_tol=1e-9,
    )
    assert times["unlearn_time"] > 0 and times["oracle_time"] > 0 and times["eval_time"] > 0
    assert math.isclose(times["time_ratio"], times["unlearn_time"] / times["oracle_time"])
    assert times["mask_time"] >= 0 and r["mask_kept"] is None
    assert isinstance(r["challenge"]["score"], float)

    md = (out / "summary.md").read_text()
    assert f"| {folder} | 1 |" in md and f"| {folder} (oracle) | 1 |" in md
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["experiment"] for row in rows] == [folder, f"{folder} (oracle)"]
    assert rows[0]["method"] == "rl_split" and rows[0]["runs"] == "1"
    assert math.isclose(float(rows[0]["forget acc mean"]), 100 * m["forget_acc"], rel_tol=1e-5)
    assert math.isclose(float(rows[0]["avg gap mean"]), gaps["avg_gap"], rel_tol=1e-5)
    assert math.isclose(float(rows[1]["test acc mean"]), 100 * oracle["test_acc"], rel_tol=1e-5)
    assert folder in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["nexp"] == 1 and config["experiments"][0]["class_to_forget"] == 7

    # what the run computed is on disk: per-sample outputs reproduce metrics.json
    d = out / "runs" / folder / "seed0"
    outs, info = load_outputs(d / "outputs.safetensors")
    assert set(outs) == {"forget", "retain", "val", "val_forget", "test", "test_forget"}
    assert info["num_classes"] == 10 and info["dataset"] == "mnist5k"
    forget_file = json.loads((d / "model_forget.json").read_text())
    assert outs["forget"].indices.tolist() == forget_file and len(forget_file) == 360
    assert all(outs[n].labels.eq(7).all() for n in ("forget", "val_forget", "test_forget"))
    for name in ("forget", "retain", "test", "test_forget", "val"):
        assert accuracy(outs[name]) == m[f"{name}_acc"], name
    # the base model's and oracle's outputs: once, over the whole pool and test set
    for ck, report in ((base_path, base), (Path(r["oracle_checkpoint"]), oracle)):
        whole, meta = load_reference(reference_path(ck))
        assert len(whole["pool"]) == len(mnist5k.train_y) and len(whole["test"]) == 1000
        assert meta["weights_sha256"] == strict_json(ck.with_suffix(".json"))["files"][
            "weights"]["sha256"]  # fmt: skip
        chosen = select_splits(whole, {n: o.indices for n, o in outs.items()})
        assert accuracy(chosen["forget"]) == report["forget_acc"]
        assert accuracy(chosen["test"]) == report["test_acc"]

    # the unlearned model's sidecar describes it, not its base model; all JSON is strict
    side = strict_json(d / "model.json")
    assert side["kind"] == "unlearned" and side["method"] == "rl_split" and side["seed"] == 0
    assert side["experiment"]["class_to_forget"] == 7 and side["experiment_folder"] == folder
    assert side["base_checkpoint"] == r["base_checkpoint"]
    assert side["base_sha256"] == base_meta["files"]["weights"]["sha256"]
    assert side["metrics"] == {k: m[k] for k in side["metrics"]}
    assert side["metrics"]["forget_acc"] == m["forget_acc"] != base_meta["metrics"]["forget_acc"]
    assert side["split"]["sizes"]["forget"] == 360 and side["split"]["sizes"]["test_forget"] == 100
    assert side["split"]["sizes"] != base_meta["split"]["sizes"]
    assert not {"history", "train_seconds", "best_epoch", "epochs_run"} & set(side)
    for p in [*out.rglob("*.json"), *ck.rglob("*.json")]:
        strict_json(p)


# --------------------------------------------------------------------------------- W&B


@pytest.fixture
def no_wandb_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key in the environment, and .env looked up in a fresh working folder only.

    wandb_log calls ``load_dotenv()``, which searches from wandb_log.py's folder (the
    repository) upwards, so a developer's real .env would make these tests go online.
    """
    import dotenv.main

    real = dotenv.main.find_dotenv

    def find_in_cwd(*args: Any, **kwargs: Any) -> str:
        return real(*args, **(kwargs | {"usecwd": True}))

    monkeypatch.setattr(dotenv.main, "find_dotenv", find_in_cwd)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for key in ("WANDB_API_KEY", "WANDB_SECRET"):
        monkeypatch.setenv(key, "")  # so the teardown also removes what load_dotenv sets
        monkeypatch.delenv(key)
    return cwd


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def test_wandb_offline_writes_into_the_run_folder(
    tmp_path: Path,
    tiny_base: Path,
    checkpoints_dir: Path,
    data_dir: Path,
    no_wandb_key: Path,
    fast_mia: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    runner = make_runner(
        [{"checkpoint": str(tiny_base)} | CHEAP], out, checkpoints_dir, data_dir, wandb="offline"
    )
    assert runner.wandb.mode == "offline"
    runner.resolve()
    runner.run_all()
    (run,) = offline_runs(out)
    assert list(run.glob("run-*.wandb")), list(run.rglob("*"))
    assert "warning: W&B" not in capsys.readouterr().err
    assert not (no_wandb_key / "wandb").exists()


def test_wandb_online_without_key_falls_back_to_offline_with_one_warning(
    tmp_path: Path,
    tiny_base: Path,
    checkpoints_dir: Path,
    data_dir: Path,
    no_wandb_key: Path,
    fast_mia: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    started: list[str] = []
    real_init = WandbLogger.__init__

    def init(self: WandbLogger, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        started.append(self.mode)  # decided before any wandb.init: never online without a key
        assert self.mode == "offline"

    monkeypatch.setattr(WandbLogger, "__init__", init)
    exp_file = tmp_path / "one.json"
    exp_file.write_text(json.dumps([{"checkpoint": str(tiny_base)} | CHEAP]))
    out = tmp_path / "out"
    argv = ["-L", str(exp_file), "--wandb", "online", "--out", str(out), "-q"]
    argv += ["--checkpoints", str(checkpoints_dir), "--data-dir", str(data_dir)]
    code, _, stderr = cli(argv, capsys)
    assert code == 0, stderr
    assert started == ["offline"]
    # one run for the experiment's single seed, one for the summary table main.py logs
    runs = offline_runs(out)
    assert len(runs) == 2 and all(list(r.glob("run-*.wandb")) for r in runs)
    warnings = [line for line in stderr.splitlines() if "W&B" in line]
    assert warnings == ["warning: W&B: no WANDB_API_KEY (or WANDB_SECRET) found; logging offline"]


def test_wandb_key_from_dotenv_keeps_online(
    no_wandb_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (no_wandb_key / ".env").write_text("WANDB_SECRET=abc123\n")
    logger = WandbLogger("online", "p", tmp_path / "out")  # no run is started: no network
    assert logger.mode == "online" and os.environ["WANDB_API_KEY"] == "abc123"
    assert "W&B" not in capsys.readouterr().err


def test_wandb_disabled_logs_nothing(tmp_path: Path) -> None:
    logger = WandbLogger("disabled", "p", tmp_path / "out")
    logger.start("run", "group", {"a": 1})
    logger.log({"x": 1.0})
    logger.finish({"x": 1.0})
    assert logger.run is None and not (tmp_path / "out").exists()
    with pytest.raises(ValueError):
        WandbLogger("sometimes", "p", tmp_path)


def test_wandb_config_never_carries_secrets() -> None:
    from running.wandb_log import _scrub

    cfg = {"lr": 0.1, "WANDB_API_KEY": "k", "nested": {"my_token": "t", "ok": [{"password": 1}]}}
    assert _scrub(cfg) == {"lr": 0.1, "nested": {"ok": [{}]}}
