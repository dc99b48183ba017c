"""Tests for feature_extraction.py, wasserstein.py, tsne_vis.py, plots.py, the paper figures,
the figure style and report.py.

A tiny run folder is made once with the real runner (mnist5k, a 1-epoch LeNet base, one
class-forgetting experiment, one seed), so the end-to-end tests read the real run-folder format;
a hand-written run folder (tests/synthetic_runs.py: three experiments x two seeds, chosen
numbers) checks intervals, figures and the report against known answers.
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
from PIL import Image
from synthetic_runs import make_run_folder

from analysis import figures as FG
from analysis import plots as P
from analysis import style
from analysis import tsne as T
from analysis import wasserstein as W
from analysis.features import extract_features, load_features, load_index
from analysis.figures import Interval, mean_ci, mean_ci_log
from analysis.report import find_browser, log_figures, without_empty_columns, write_report
from cli import main as main_mod
from core.cli_options import FIG_FORMATS, fig_formats
from core.errors import UserError
from core.io import dumps
from training import checkpoints

PNG = b"\x89PNG\r\n\x1a\n"
MAGIC = {"png": PNG, "pdf": b"%PDF", "svg": b"<?xml"}


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG


def has_all_formats(path: Path, formats: tuple[str, ...] = FIG_FORMATS) -> bool:
    """The figure exists as a real file in every format (same stem)."""
    for f in formats:
        p = path.with_suffix("." + f)
        if not (p.is_file() and p.stat().st_size > 100 and p.read_bytes().startswith(MAGIC[f])):
            return False
    return True


class Saved:
    """Every figure saved while active: its stem, size in inches and text sizes (pt)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.figures: list[tuple[Path, tuple[float, float], list[tuple[str, float]]]] = []
        original = style.save_figure

        def save(fig, path):  # type: ignore[no-untyped-def]
            texts = style.text_sizes(fig)
            self.figures.append((Path(path), tuple(fig.get_size_inches()), texts))
            return original(fig, path)

        mp.setattr(style, "save_figure", save)

    def check_style(self) -> None:
        """Column widths and no text below 8 pt, in every figure; the PNGs 200 dpi wide."""
        assert self.figures
        for path, (w, _), texts in self.figures:
            assert w in style.WIDTHS, (path, w)
            assert texts, path
            small = [(t, s) for t, s in texts if s < style.MIN_FONT_PT]
            assert small == [], (path, small)
            png = path.with_suffix(".png")
            if png.is_file():
                with Image.open(png) as im:
                    assert im.size[0] == round(w * style.PNG_DPI), (png, im.size)


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
# Every figure function: PDF, SVG and PNG at a column width, no text below 8 pt


def test_every_figure_function_writes_every_format_in_style(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    forget = labels == 2
    y2, y3 = rng.normal(size=(60, 2)), rng.normal(size=(60, 3))
    names = ["a", "b", "c", "d"]
    m = np.abs(rng.normal(size=(4, 4)))
    m = m + m.T
    np.fill_diagonal(m, 0)
    run = make_run_folder(tmp_path / "syn")
    results = P.load_results(run)
    exp = FG.experiments(results)[0]
    with pytest.MonkeyPatch.context() as mp:
        saved = Saved(mp)
        T.plot_tsne_2d(y2, labels, forget, tmp_path / "t2", title="2d", class_names=names,
                       forget_classes=[2])  # fmt: skip
        T.plot_tsne_compare([("base", y2), ("unlearned", y2[::-1].copy())], labels, forget,
                            tmp_path / "tc", forget_classes=[2], scores={"base": 0.5})  # fmt: skip
        W.plot_matrix(m, tmp_path / "w", title="w", forget_classes=[2])
        W.plot_compare({"base": m, "unlearned": m * 0.5, "oracle": m}, tmp_path / "wc",
                       vmax=float(m.max()), forget_classes=[2])  # fmt: skip
        P.plot_loss_histograms(
            [("base", rng.exponential(size=50), rng.exponential(size=80), "0.500")] * 3,
            tmp_path / "h",
        )
        P.plot_confusion_matrices([("m", P.confusion(labels, labels[::-1], 4))], tmp_path / "c",
                                  forget_classes=[2])  # fmt: skip
        P.plot_per_class(exp, tmp_path / "a", [str(c) for c in range(10)])
        FG.plot_gap_vs_cost(results, tmp_path / "g")
        FG.plot_metrics_vs_oracle(results, tmp_path / "b")
        FG.plot_per_class_vs_oracle(results, tmp_path / "pc")
    assert len(saved.figures) == 10
    saved.check_style()
    for path, _, _ in saved.figures:
        assert has_all_formats(path), path
    gif = T.tsne_gif(y3, labels, forget, tmp_path / "r.gif", title="gif", frames=3)
    assert gif.read_bytes()[:6] == b"GIF89a"
    with Image.open(gif) as im:
        assert im.n_frames == 3


def test_fig_format_chooses_the_files(tmp_path: Path) -> None:
    assert fig_formats("svg, PNG") == ("png", "svg")
    with pytest.raises(UserError, match=r"--fig-format 'png,jpg' is invalid: jpg is not a figure"):
        fig_formats("png,jpg")
    with style.formats(("pdf",)):
        files = P.plot_confusion_matrices([("m", np.eye(3, dtype=int))], tmp_path / "c")
    assert set(files) == {"pdf"} and has_all_formats(tmp_path / "c", ("pdf",))
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "c.svg").exists()
    run = make_run_folder(tmp_path / "syn")
    with pytest.raises(UserError, match="the HTML report shows svg or png"):
        write_report(run, "cpu", features=False, fig_formats=("pdf",), quiet=True)
    assert not (run / "plots").exists()  # refused before any work


def test_main_refuses_a_report_without_svg_or_png_before_running(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        main_mod.main(["-c", "nowhere.safetensors", "-CF", "3", "--report", "--fig-format",
                       "pdf", "-NL"])  # fmt: skip
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --fig-format pdf: the HTML report shows svg or png figures; add one of them"
    )


def test_summary_table_drops_columns_no_run_recorded() -> None:
    headers = ["experiment", "a", "b", "c"]
    body = [["e1", "1.00", "-", "-"], ["e1 (oracle)", "-", "-", "2.00"]]
    assert without_empty_columns(headers, body) == [
        ["experiment", "a", "c"],
        ["e1", "1.00", "-"],
        ["e1 (oracle)", "-", "2.00"],
    ]


# ---------------------------------------------------------------------------------------------
# Known answers: intervals, confusion accuracy, separation score, reading guide


def test_mean_and_t_interval_known_answers() -> None:
    # closed forms of Student's t quantile: 1 degree of freedom tan(pi (p - 1/2)), 2 degrees
    # (2p - 1) / sqrt(2 p (1 - p))
    t1 = np.tan(np.pi * 0.475)
    t2 = 0.95 / np.sqrt(2 * 0.975 * 0.025)
    i = mean_ci([1.0, 2.0, 3.0])  # sd 1
    assert i.mean == 2.0 and i.n == 3
    assert i.half == pytest.approx(t2 / np.sqrt(3), rel=1e-9)
    assert (i.lo, i.hi) == pytest.approx((2 - i.half, 2 + i.half))
    # two values: sd / sqrt(2) = |a - b| / 2
    assert mean_ci([12.0, 14.0]).half == pytest.approx(t1, rel=1e-9)
    # None and NaN are left out; one value has no interval; none is NaN
    assert mean_ci([5.0, None, float("nan")]) == Interval(5.0, 5.0, 5.0, 1)
    assert np.isnan(mean_ci([]).mean) and mean_ci([None]).n == 0
    # ratios: the interval of the logs, so positive and symmetric on a log axis
    g = mean_ci_log([1.0, 10.0, 100.0])
    assert g.mean == pytest.approx(10.0)
    assert g.lo > 0 and g.lo * g.hi == pytest.approx(g.mean**2)
    assert np.log(g.hi / g.mean) == pytest.approx(t2 * np.log(10) / np.sqrt(3), rel=1e-9)
    assert mean_ci_log([0.0, -1.0, 2.0]) == Interval(2.0, 2.0, 2.0, 1)  # only positive ratios


def test_experiment_intervals_on_hand_built_metrics(tmp_path: Path) -> None:
    results = P.load_results(make_run_folder(tmp_path))
    exps = {e.name: e for e in FG.experiments(results)}
    assert list(exps) == ["00_ft_cf3", "01_ft+mask_cf3", "02_ga_unlr0.1"]
    ft, masked, ga = exps.values()
    assert (ft.kind, ga.kind, ft.masked, masked.masked) == ("class-wise", "random", False, True)
    gap = ft.ci("gaps", "avg_gap")  # 12 and 14
    assert (gap.mean, gap.half) == pytest.approx((13.0, np.tan(np.pi * 0.475)))
    cost = mean_ci_log(ft.values("times", "time_ratio"))  # 0.2 and 0.3: geometric mean
    assert cost.mean == pytest.approx(np.sqrt(0.06))
    assert FG.best(list(exps.values())).name == "01_ft+mask_cf3"  # smallest class-wise gap
    d = FG.per_class_differences(ft)  # unlearned - oracle per class, pp
    assert d.shape == (2, 10)
    np.testing.assert_allclose(d[:, 3], [40.0, 50.0])
    np.testing.assert_allclose(np.delete(d, 3, axis=1), 1.0)
    assert FG.cost_axis(results) == ("time_ratio", "wall time / oracle's training time")
    passes = P.load_results(make_run_folder(tmp_path / "passes", sample_passes=True))
    assert FG.cost_axis(passes)[0] == "sample_pass_ratio"
    with pytest.MonkeyPatch.context() as mp:
        saved = Saved(mp)
        FG.plot_gap_vs_cost(passes, tmp_path / "g")
    texts = [t for t, _ in saved.figures[0][2]]
    assert "sample passes / oracle's training sample passes  (dashed: cost of retraining)" in texts
    assert {"class-wise forgetting", "random forgetting"} <= set(texts)
    assert {"ft", "ga", "with saliency mask", "without mask"} <= set(texts)  # the legend


def test_confusion_accuracy_covers_the_tables_classes(tmp_path: Path) -> None:
    counts = np.array([[8, 2, 0], [1, 9, 0], [0, 5, 5]])
    assert P.accuracy_without(counts, [2]) == pytest.approx(17 / 20)  # rows 0, 1 only
    assert P.accuracy_without(counts, []) == pytest.approx(22 / 30)
    with pytest.MonkeyPatch.context() as mp:
        saved = Saved(mp)
        P.plot_confusion_matrices([("unlearned", counts)], tmp_path / "c", forget_classes=[2])
    texts = [t for t, _ in saved.figures[0][2]]
    assert "unlearned\nTA 85.0% (classes ≠ 2)" in texts
    # percent of the true class, cells that round to 0% empty: row 2 shows 50 and 50
    assert texts.count("50") == 2 and "0" not in [t for t in texts if len(t) == 1 and t != "0"]
    assert sorted(t for t in texts if t in {"80", "20", "10", "90"}) == ["10", "20", "80", "90"]


def test_separation_score_known_answers() -> None:
    rng = np.random.default_rng(0)
    rest = rng.normal(size=(300, 8))
    apart = rng.normal(size=(60, 8)) + 20.0  # a tight cloud far from the rest
    x = np.concatenate([rest, apart])
    forget = np.arange(len(x)) >= 300
    assert T.separation(x, forget) > 0.8
    mixed = rng.normal(size=(60, 8))  # the same distribution as the rest
    assert abs(T.separation(np.concatenate([rest, mixed]), forget)) < 0.1
    # exact on a tiny case: forget {0, 1} on a line, rest {10}: a = 1, b = 9.5 and 10.5
    line = np.array([[0.0], [1.0], [10.0]])
    expected = np.mean([(10 - 1) / 10, (9 - 1) / 9])
    assert T.separation(line, np.array([True, True, False])) == pytest.approx(expected)
    assert np.isnan(T.separation(line, np.array([True, False, False])))  # one forget sample


def test_reading_guide_says_what_the_numbers_say() -> None:
    def ci(m: float) -> Interval:
        return Interval(m, m - 0.02, m + 0.02, 3)

    close = T.reading_guide({"base": ci(0.64), "unlearned": ci(0.58), "oracle": ci(0.55)})
    assert "base 0.64 ± 0.02, unlearned 0.58 ± 0.02, retrain oracle 0.55 ± 0.02" in close
    assert "as much as the retrain oracle does" in close
    assert "about where the base model has it (0.64 → 0.55)" in close
    less = T.reading_guide({"base": ci(0.6), "unlearned": ci(0.1), "oracle": ci(0.3)})
    assert "keeps them 0.20 less apart than the oracle" in less
    assert "moves it from 0.60 to 0.30" in less
    more = T.reading_guide({"unlearned": ci(0.6), "oracle": ci(0.3)})
    assert "keeps them 0.30 more apart than the oracle" in more


def test_tsne_and_wasserstein_over_feature_folder(features: Path, tmp_path: Path) -> None:
    out = T.run(features, tmp_path / "tsne", samples=80, max_iter=250, gif=True, frames=2,
                quiet=True)  # fmt: skip
    names = {p.name for p in out}
    assert {"model_tsne2d.png", "model_tsne3d.gif", "model_tsne_compare.png"} <= names
    assert not list((tmp_path / "tsne").rglob("*tsne3d.png"))  # no static 3-D map
    assert has_all_formats(tmp_path / "tsne/runs/00_ft_cf3/seed0/model_tsne_compare")
    out = W.run(features, tmp_path / "w", quiet=True)
    assert all(is_png(p) for p in out)
    assert has_all_formats(tmp_path / "w/runs/00_ft_cf3/seed0/model_wasserstein_compare")
    dump = json.loads((tmp_path / "w/wasserstein.json").read_text())
    base = np.array(next(v for k, v in dump["matrices"].items() if k.startswith("refs/base/")))
    assert base.shape == (10, 10) and np.all(np.diag(base) == 0)


def test_delta_maps_have_their_own_symmetric_scale(tmp_path: Path) -> None:
    m = np.array([[0.0, 2.0], [2.0, 0.0]])
    deltas = [np.array([[0.0, 0.1], [0.1, 0.0]]), np.array([[0.0, -0.3], [-0.3, 0.0]])]
    assert W.delta_scale(deltas) == pytest.approx(0.3)
    with pytest.MonkeyPatch.context() as mp:
        images = []
        mp.setattr(W, "_heatmap", functools.partial(_record_heatmap, images, W._heatmap))
        W.plot_compare({"base": m, "unlearned": m + deltas[0], "oracle": m - deltas[0]},
                       tmp_path / "wc", vmax=2.0)  # fmt: skip
    limits = [im.get_clim() for im in images]
    assert limits[:3] == [(0.0, 2.0)] * 3
    assert limits[3:] == [pytest.approx((-0.2, 0.2))] * 2  # +-max |delta|, not +-vmax / 2


def _record_heatmap(images: list, original, *args, **kwargs):  # type: ignore[no-untyped-def]
    im = original(*args, **kwargs)
    images.append(im)
    return im


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
        # the confusion matrix's TA over the retained classes is the table's test accuracy
        counts = P.confusion(full.labels.numpy(), full.preds.numpy(), 10)
        assert P.accuracy_without(counts, [FORGET]) == pytest.approx(saved["test_acc"])
        # every number of the run's report, from the saved outputs alone
        report = json.loads(dumps(P.M.model_report(o, r.seed, 10)))
        assert report == {k: v for k, v in saved.items() if k != "l2_to_base"}, role


EXPECTED_FIGURES = {
    "paper/gap_vs_cost",
    "paper/metrics_vs_oracle",
    "paper/per_class_vs_oracle",
    *(f"00_ft_cf3/{s}{f}" for s in ("", "seed0/") for f in ("loss_hist", "confusion", "per_class")),
}


def figure_stems(run: Path) -> set[str]:
    return {p.relative_to(run / "plots").with_suffix("").as_posix()
            for p in (run / "plots").rglob("*.png")}  # fmt: skip


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
    write_report(run, "cpu", features=False, pdf=False, quiet=True)
    assert "warning" not in capsys.readouterr().err  # base and oracle outputs were found
    assert figure_stems(run) == EXPECTED_FIGURES
    check_report(run, n_figures=4 + 3 + 3)


# ---------------------------------------------------------------------------------------------
# Report


def check_report(run: Path, n_figures: int) -> str:
    """The report's pages reference existing figure files, in every format; returns the HTML."""
    md = (run / "report.md").read_text()
    text = (run / "report.html").read_text()
    assert (run / "report.html").stat().st_size < 2_000_000
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) == n_figures
    for rel in linked:
        assert rel.startswith("plots/") and is_png(run / rel), rel
        assert has_all_formats(run / rel), rel
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == n_figures
    for src in srcs:  # referenced, not inlined: the vector files
        assert src.startswith("plots/") and src.endswith(".svg") and (run / src).is_file(), src
    assert [Path(s).with_suffix("") for s in srcs] == [Path(r).with_suffix("") for r in linked]
    # every contents link has its anchor
    for anchor in re.findall(r'<a href="#([^"]+)"', text):
        assert f'id="{anchor}"' in text, anchor
    order = ["<h1>Unlearning results", "Contents", 'id="summary"', "<table>", "Figure 1.",
             "Figure 4.", 'id="experiments"', "<details><summary>Figures of each seed", 'id="configuration"', 'id="versions"']  # fmt: skip
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions), order
    assert "00_ft_cf3" in md and "| torch |" in md and "loss-MIA" in text
    return text


def test_report_of_hand_built_runs(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        saved = Saved(mp)
        write_report(run, "cpu", features=False, pdf=False, quiet=True)
    saved.check_style()
    assert len(saved.figures) == 3 + 3 * 3 + 6 * 3
    text = check_report(run, n_figures=4 + 3 * 3 + 6 * 3)
    # the summary first, then the four paper figures, then the experiments
    figs = re.findall(r"<figcaption>(Figure \d+)\. ", text)
    assert figs[:4] == ["Figure 1", "Figure 2", "Figure 3", "Figure 4"]
    paper = text[text.index('id="figures"') : text.index('id="experiments"')]
    assert paper.count("<img ") == 4 and "01_ft+mask_cf3, the experiment with the smallest" in paper
    # per-seed figures folded away, one <details> per experiment
    assert text.count("<details><summary>Figures of each seed (0, 1)</summary>") == 3
    folded = re.findall(r"<details>(.*?)</details>", text, re.S)
    assert sum(f.count("<img ") for f in folded) == 6 * 3
    assert all('loading="lazy"' in img for f in folded for img in re.findall(r"<img [^>]+>", f))
    # numbers from the hand-built metrics: mean ± 95% t-interval over the two seeds
    assert "Avg. Gap 13.00 ± 12.71 pp" in text
    assert "Forget acc 45.00 ± 63.53% (oracle 0.00 ± 0.00%)" in text
    assert "<h1>Unlearning results: synthetic</h1>" in text
    assert "seeds 0, 1" in text and "device cpu" in text


def test_main_report_flag_writes_the_report(tiny_run: Path) -> None:
    # the paper figures, the experiment's and the seed's: loss histograms, confusion matrices,
    # per-class accuracy, Wasserstein maps
    text = check_report(tiny_run, n_figures=4 + 4 + 4)
    assert figure_stems(tiny_run) == EXPECTED_FIGURES | {
        "00_ft_cf3/wasserstein",
        "00_ft_cf3/seed0/wasserstein",
    }
    assert "Separation of the forget samples" in text  # the computed reading guide
    if find_browser() is not None:
        assert (tiny_run / "report.pdf").read_bytes().startswith(b"%PDF")


def test_report_with_tsne(tiny_run: Path, data_dir: Path) -> None:
    page = write_report(tiny_run, "cpu", data_dir=data_dir, samples=200, tsne=True,
                        tsne_samples=60, pdf=False, quiet=True)  # fmt: skip
    assert page == tiny_run / "report.html"
    text = check_report(tiny_run, n_figures=4 + 5 + 5)
    assert "t-SNE maps" in text and has_all_formats(tiny_run / "plots/00_ft_cf3/seed0/tsne")


def test_log_figures_is_optional_and_never_fails(tiny_run: Path, monkeypatch) -> None:
    png = tiny_run / "plots/paper/gap_vs_cost.png"
    plots = [P.Plot(png, "c", "paper", files={"png": png})]
    assert log_figures(plots, tiny_run, "disabled") == 0
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    assert log_figures(plots, tiny_run, "offline") == 0


def test_log_figures_logs_the_pngs_to_the_active_run(tiny_run: Path, monkeypatch) -> None:
    import types

    logged: list[dict] = []
    fake = types.ModuleType("wandb")
    fake.run = types.SimpleNamespace(log=logged.append)
    fake.Image = lambda path, caption=None: ("image", path, caption)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    stem = tiny_run / "plots/paper/gap_vs_cost"
    files = {f: stem.with_suffix("." + f) for f in FIG_FORMATS}
    plots = [P.Plot(files["png"], "caption", "paper", files=files)]
    assert log_figures(plots, tiny_run, "offline") == 1
    assert logged == [{"report/plots/paper/gap_vs_cost": ("image", str(files["png"]), "caption")}]
