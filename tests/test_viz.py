"""Tests for feature_extraction.py, wasserstein.py, tsne_vis.py, plots.py and report.py.

A tiny run folder is made once with the real runner (mnist5k, a 1-epoch LeNet base, one
class-forgetting experiment, one seed), so every test reads the real run-folder format.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from analysis import plots as P
from analysis import tsne as T
from analysis import wasserstein as W
from analysis.features import extract_features, load_features, load_index
from analysis.report import log_figures, write_report
from cli import main as main_mod
from core.io import dumps
from training import checkpoints

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG


FORGET = 3  # the class the runner tests forget too, so a full session shares the oracle


@pytest.fixture(scope="module")
def tiny_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> Path:
    """A real run folder: main.py --report, one experiment, one seed, on a one-epoch LeNet."""
    root = tmp_path_factory.mktemp("viz")
    try:  # the session's base checkpoint and --checkpoints folder (tests/conftest.py)
        checkpoint: object = str(request.getfixturevalue("tiny_base"))
        ckpt_dir = request.getfixturevalue("checkpoints_dir")
    except pytest.FixtureLookupError:
        checkpoint = {"dataset": "mnist5k", "model": "lenet", "epochs": 1, "seed": 0}
        ckpt_dir = root / "ck"
    exp = [
        {
            "checkpoint": checkpoint,
            "class_to_forget": FORGET,
            "method": "ft",
            "lr": 0.02,
            "epochs": 1,
        }
    ]
    (root / "exp.json").write_text(json.dumps(exp))
    out = root / "run"
    argv = [
        "-L",
        str(root / "exp.json"),
        "--nexp",
        "1",
        "-NL",
        "-q",
        "--out",
        str(out),
        "--checkpoints",
        str(ckpt_dir),
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        "--report",
    ]
    import metrics

    with pytest.MonkeyPatch.context() as mp:
        # smaller SVC attacks (as tests/test_runner.py does); the loss MIA keeps its settings
        mp.setattr(metrics, "salun_mia", functools.partial(metrics.salun_mia, max_per_side=200))
        mp.setenv("DATA_DIR", str(data_dir))  # write_report(out) reads the default data folder
        assert main_mod.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def features(tiny_run: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features")
    extract_features(
        tiny_run, out, samples=300, seed=0, device="cpu", data_dir=data_dir, quiet=True
    )
    return out


# ---------------------------------------------------------------------------------------------
# Feature extraction


def test_feature_files_shapes_and_forget_membership(tiny_run: Path, features: Path) -> None:
    entries = {e["role"]: e for e in load_index(features)}
    assert set(entries) == {"unlearned", "base", "oracle"}
    u = entries["unlearned"]
    assert u["file"] == "runs/00_ft_cf3/seed0/model.npz"  # mirrors the run folder
    assert u["base"] == entries["base"]["file"] and u["oracle"] == entries["oracle"]["file"]
    sets = {role: load_features(features / e["file"]) for role, e in entries.items()}
    saved_forget = json.loads((tiny_run / "runs/00_ft_cf3/seed0/model_forget.json").read_text())
    metrics = json.loads((tiny_run / "runs/00_ft_cf3/seed0/metrics.json").read_text())
    assert u["forget_sha256"] == entries["oracle"]["forget_sha256"] == metrics["forget"]["sha256"]
    for role, fs in sets.items():
        assert fs.features.shape == (300, 84) and fs.features.dtype == np.float32
        assert fs.logits.shape == (300, 10)
        assert fs.labels.shape == fs.indices.shape == fs.forget.shape == (300,)
        assert fs.forget.dtype == bool
        assert fs.classifier_weight.shape == (10, 84) and fs.classifier_bias.shape == (10,)
        # the same seeded sample for every model
        np.testing.assert_array_equal(fs.indices, sets["unlearned"].indices)
        assert np.all(np.diff(fs.indices) > 0)
        if role == "base":
            assert not fs.forget.any()
        else:
            np.testing.assert_array_equal(fs.forget, np.isin(fs.indices, saved_forget))
            # class-wise forgetting: the sample excludes validation, so every sampled image
            # of the class is a forget sample and nothing else is
            np.testing.assert_array_equal(fs.forget, fs.labels == FORGET)
    assert sets["unlearned"].forget.sum() > 10
    # the logits are what the classifier makes of the features
    fs = sets["oracle"]
    np.testing.assert_allclose(
        fs.features @ fs.classifier_weight.T + fs.classifier_bias, fs.logits, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------
# Wasserstein


def test_sliced_wasserstein_known_values() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    assert W.sliced_wasserstein(x, x) == 0.0
    # 1-D: SW_2 is the exact W_2, and a shift by d moves every quantile by d
    a = rng.normal(size=300)
    for d in (0.5, 2.0, -3.0):
        assert W.wasserstein_1d(a, a + d) == pytest.approx(abs(d), abs=1e-12)
        assert W.sliced_wasserstein(a[:, None], a[:, None] + d) == pytest.approx(abs(d))
    # unequal sizes: exact, checked against replicating both samples to a common size
    u, v = rng.normal(size=4), rng.normal(size=6)
    brute = np.sqrt(np.mean((np.sort(np.repeat(u, 3)) - np.sort(np.repeat(v, 2))) ** 2))
    assert W.wasserstein_1d(u, v) == pytest.approx(brute, rel=1e-12)
    # d dims: a shift by v gives sqrt(mean_l <theta_l, v>^2) exactly, ~ |v| / sqrt(d)
    shift = np.zeros(16)
    shift[3] = 4.0
    theta = W.projections(16, 2000, seed=1)
    got = W.sliced_wasserstein(x, x + shift, n_proj=2000, seed=1)
    assert got == pytest.approx(np.sqrt(np.mean((theta @ shift) ** 2)), rel=1e-9)
    assert got == pytest.approx(4.0 / np.sqrt(16), rel=0.05)
    assert W.sliced_wasserstein(x, x + 2 * shift, n_proj=2000, seed=1) == pytest.approx(2 * got)


def test_class_matrix_zero_diagonal_symmetric_and_fast() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)
    feats = rng.normal(size=(5000, 84)) + labels[:, None] * 0.5
    t = time.perf_counter()
    m = W.class_distance_matrix(feats, labels, 10)
    assert time.perf_counter() - t < 10  # seconds for 10 classes x 500 samples
    assert np.all(np.diag(m) == 0) and np.allclose(m, m.T)
    # class clouds shifted by 0.5 * k along the all-ones direction: distance grows with |i - j|
    assert np.all(np.diff(m[0]) > 0)
    # identical inputs give identical matrices; a class absent from the labels gives NaN
    np.testing.assert_array_equal(m, W.class_distance_matrix(feats, labels, 10))
    m11 = W.class_distance_matrix(feats, labels, 11)
    assert np.isnan(m11[10]).all() and np.allclose(m11[:10, :10], m)


# ---------------------------------------------------------------------------------------------
# Every plot function writes a PNG


def test_every_plot_function_writes_a_png(tmp_path: Path, tiny_run: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    forget = labels == 2
    y2, y3 = rng.normal(size=(60, 2)), rng.normal(size=(60, 3))
    names = ["a", "b", "c", "d"]
    m = np.abs(rng.normal(size=(4, 4)))
    m = m + m.T
    np.fill_diagonal(m, 0)
    results = P.load_results(tiny_run)
    written = [
        T.plot_tsne_2d(y2, labels, forget, tmp_path / "t2.png", title="2d", class_names=names),
        T.plot_tsne_3d(y3, labels, forget, tmp_path / "t3.png", title="3d"),
        T.plot_tsne_compare(
            [("base", y2), ("unl", y2[::-1].copy())],
            labels,
            forget,
            tmp_path / "tc.png",
            title="cmp",
        ),
        W.plot_matrix(m, tmp_path / "w.png", title="w", forget_classes=[2]),
        W.plot_compare(
            {"base": m, "unlearned": m * 0.5, "oracle": m},
            tmp_path / "wc.png",
            title="wc",
            vmax=float(m.max()),
            dmax=float(m.max()),
            forget_classes=[2],
        ),
        P.plot_loss_histograms(
            [("base", rng.exponential(size=50), rng.exponential(size=80), 0.5)] * 3,
            tmp_path / "h.png",
            title="h",
        ),
        P.plot_confusion_matrices(
            [("m", labels, labels[::-1])], 4, tmp_path / "c.png", forget_classes=[2]
        ),
        P.plot_per_class_accuracy(
            {"base": [1, 0.9, 0.8, 1], "unlearned": [1, 0.9, 0, 1]},
            tmp_path / "a.png",
            forget_classes=[2],
        ),
        P.plot_summary_table(P.summarize(results, ["00_ft_cf3"]), tmp_path / "s.png"),
        P.plot_gap_vs_time(results, tmp_path / "g.png"),
    ]
    for p in written:
        assert is_png(p), p
    gif = T.tsne_gif(y3, labels, forget, tmp_path / "r.gif", title="gif", frames=3)
    assert gif.read_bytes()[:6] == b"GIF89a"
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 3


def test_tsne_and_wasserstein_over_feature_folder(features: Path, tmp_path: Path) -> None:
    out = T.run(features, tmp_path / "tsne", samples=80, max_iter=250, frames=2, quiet=True)
    names = {p.name for p in out}
    assert {
        "model_tsne2d.png",
        "model_tsne3d.png",
        "model_tsne3d.gif",
        "model_tsne_compare.png",
    } <= names
    assert (tmp_path / "tsne/runs/00_ft_cf3/seed0/model_tsne_compare.png").is_file()
    out = W.run(features, tmp_path / "w", quiet=True)
    assert all(is_png(p) for p in out)
    assert (tmp_path / "w/runs/00_ft_cf3/seed0/model_wasserstein_compare.png").is_file()
    dump = json.loads((tmp_path / "w/wasserstein.json").read_text())
    base = np.array(next(v for k, v in dump["matrices"].items() if k.startswith("refs/base/")))
    assert base.shape == (10, 10) and np.all(np.diag(base) == 0)


# ---------------------------------------------------------------------------------------------
# Evaluation plots read the runner's saved outputs


def test_plots_read_the_runners_outputs(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (r,) = P.load_results(tiny_run)
    ev = P.Evaluator(tiny_run)
    outs, info = ev.outputs(r)
    assert set(outs) == {"base", "unlearned", "oracle"}
    assert info["num_classes"] == 10 and info["classes"] == [str(i) for i in range(10)]
    # the attack settings tiny_run ran with
    monkeypatch.setattr(P.M, "salun_mia", functools.partial(P.M.salun_mia, max_per_side=200))
    for role, key in (("unlearned", "metrics"), ("base", "base"), ("oracle", "oracle")):
        o = outs[role]
        saved = getattr(r, key)
        assert len(o["forget"]) == r.forget["n"]
        mia = P.M.loss_mia(o["forget"], o["test"], r.seed)["loss_mia_acc"]
        assert mia == pytest.approx(saved["loss_mia_acc"], abs=1e-9), role
        full = P.M.concat_outputs(o["test"], o.get("test_forget"))
        assert P.M.per_class_accuracy(full, 10) == pytest.approx(saved["per_class_test_acc"])
        # every number of the run's report, from the saved outputs alone
        report = json.loads(dumps(P.M.model_report(o, r.seed, 10)))
        assert report == {k: v for k, v in saved.items() if k != "l2_to_base"}, role


def test_report_never_loads_a_model(
    tiny_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("plots", "features", "report.*"))
    (run / "runs/00_ft_cf3/seed0/model.safetensors").unlink()  # the unlearned weights are gone

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report loaded model weights")

    monkeypatch.setattr(checkpoints, "load_checkpoint", forbidden)
    monkeypatch.setattr(checkpoints, "load_model", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_model", forbidden)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", forbidden)
    write_report(run, "cpu", features=False, quiet=True)
    assert "warning" not in capsys.readouterr().err  # base and oracle outputs were found
    d = "plots/00_ft_cf3/seed0"
    assert {p.relative_to(run).as_posix() for p in (run / "plots").rglob("*.png")} == {
        "plots/summary_table.png",
        "plots/gap_vs_time.png",
        f"{d}/loss_hist.png",
        f"{d}/confusion.png",
        f"{d}/per_class_acc.png",
    }
    check_report(run, 4)


# ---------------------------------------------------------------------------------------------
# Report


def check_report(run: Path, n_figures: int) -> str:
    """Every image the report shows is embedded in the HTML and exists; returns the HTML."""
    md = (run / "report.md").read_text()
    text = (run / "report.html").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) == n_figures
    for rel in linked:
        assert rel.startswith("plots/") and is_png(run / rel), rel
    srcs = re.findall(r'<img src="([^"]+)"', text)
    files = re.findall(r'data-file="([^"]+)"', text)
    assert len(srcs) == len(linked) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert files == [Path(rel).name for rel in linked]
    assert 'src="plots/' not in text  # self-contained
    for heading in (
        "<h1>Results",
        "<h2>Summary</h2>",
        "<figcaption>Figure 1.",
        "<h2>Runs",
        "<h2>Configuration",
        "<h2>Seeds",
        "<h2>Versions",
        "loss-MIA",
    ):
        assert heading in text
    assert "00_ft_cf3" in md and "| torch |" in md
    # the figures are the plots under plots/, bar the summary table (in the text as a table)
    on_disk = {p.relative_to(run).as_posix() for p in (run / "plots").rglob("*.png")}
    assert on_disk - set(linked) == {"plots/summary_table.png"}
    return text


def test_main_report_flag_writes_the_report(tiny_run: Path) -> None:
    # gap vs time + loss histograms, confusion, per-class accuracy, Wasserstein comparison
    check_report(tiny_run, 5)


def test_report_with_tsne(tiny_run: Path, data_dir: Path) -> None:
    page = write_report(
        tiny_run, "cpu", data_dir=data_dir, samples=200, tsne=True, tsne_samples=60, quiet=True
    )
    assert page == tiny_run / "report.html"
    assert "t-SNE" in check_report(tiny_run, 6)


def test_log_figures_is_optional_and_never_fails(tiny_run: Path, monkeypatch) -> None:
    plots = [P.Plot(tiny_run / "plots" / "gap_vs_time.png", "c", "Summary")]
    assert log_figures(plots, tiny_run, "disabled") == 0
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    assert log_figures(plots, tiny_run, "offline") == 0


def test_log_figures_logs_to_the_active_run(tiny_run: Path, monkeypatch) -> None:
    import types

    logged: list[dict] = []
    fake = types.ModuleType("wandb")
    fake.run = types.SimpleNamespace(log=logged.append)
    fake.Image = lambda path, caption=None: ("image", path, caption)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    plots = [P.Plot(tiny_run / "plots" / "gap_vs_time.png", "caption", "Summary")]
    assert log_figures(plots, tiny_run, "offline") == 1
    assert logged == [{"report/plots/gap_vs_time": ("image", str(plots[0].path), "caption")}]
