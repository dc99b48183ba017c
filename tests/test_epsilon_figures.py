"""Tests for analysis/epsilon_plots.py: the per-example epsilon histogram and the confidences of
the hardest examples (NeurIPS 2023 unlearning competition, Triantafillou et al. 2024), drawn
from a hand-built ``runs/<experiment>/epsilon/`` folder with known epsilons, and their place in
the report. The figures' data are checked on the matplotlib objects, not on pixels.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Polygon, Rectangle
from safetensors.torch import save_file
from synthetic_runs import make_run_folder

from analysis import epsilon_plots as EP
from analysis import style
from analysis.plots import load_results
from analysis.report import write_report
from evaluation.epsilon import CONFIDENCES_FILE, EPSILON_FILE, forgetting_quality
from training import checkpoints

N = 4  # models per side: bins of 0.5 up to ceil(ln 3) = 2, worth 1, 1/2, 1/4, 1/8
# per forget example; None is an undefined epsilon (every rule discarded), written as null
EPS: list[float | None] = [0.0, 0.3, 0.7, 1.2, 1.9, 2.5, 50.0, 10.0, None]
INDICES = [100 + 3 * j for j in range(len(EPS))]  # pool indices of the columns
# bars: 0-0.5, 0.5-1, 1-1.5, 1.5-2, 2-50, 50 (cap)
BAR_COUNTS = [2, 1, 1, 1, 2, 1]
BAR_POINTS = [1.0, 0.5, 0.25, 0.125, 0.0, 0.0]
HARDEST_COLUMNS = [6, 7, 5, 4, 3, 2]  # largest epsilon first; the NaN last
RA_U, TA_U, RA_R, TA_R = 0.9, 0.8, 1.0, 0.96
F = (2 * 1 + 0.5 + 0.25 + 0.125) / len(EPS)
SCORE = F * RA_U / RA_R * TA_U / TA_R


def write_epsilon_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A many-model evaluation's files, by hand: known epsilons, seeded confidences."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(N, len(EPS)))
    r = rng.normal(size=(N, len(EPS))) + np.arange(len(EPS))  # columns told apart by location
    folder.mkdir(parents=True)
    save_file({"unlearned": torch.from_numpy(u), "retrained": torch.from_numpy(r)},
              str(folder / CONFIDENCES_FILE))  # fmt: skip
    info = {
        "n_models": N, "n_examples": len(EPS), "per_example_epsilon": EPS,
        "forgetting_quality": F, "score": SCORE, "retain_acc_unlearned": RA_U,
        "test_acc_unlearned": TA_U, "retain_acc_retrained": RA_R, "test_acc_retrained": TA_R,
        "forget_indices": INDICES,
    }  # fmt: skip
    (folder / EPSILON_FILE).write_text(json.dumps(info))
    return u, r


class Figures:
    """Every figure saved while active, by file stem."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.saved: dict[str, Figure] = {}
        original = style.save_figure

        def save(fig: Figure, path: Path) -> Any:
            self.saved[Path(path).name] = fig
            return original(fig, path)

        mp.setattr(style, "save_figure", save)


def test_histogram_and_hardest_examples_by_hand() -> None:
    eps = np.array([math.nan if e is None else e for e in EPS])
    h = EP.epsilon_histogram(eps, N)
    assert h.counts == BAR_COUNTS and h.points == BAR_POINTS and h.undefined == 1
    assert h.labels == ["0–0.5", "0.5–1", "1–1.5", "1.5–2", "2–50", "50 (cap)"]
    # the bars' points give the scorer's F
    assert np.dot(h.counts, h.points) / len(eps) == pytest.approx(forgetting_quality(eps, N))
    assert EP.hardest_examples(eps).tolist() == HARDEST_COLUMNS
    assert EP.hardest_examples(np.array([1.0, 3.0, 1.0, 3.0]), 3).tolist() == [1, 3, 0]  # ties
    assert EP.hardest_examples(eps, 100).tolist()[-1] == 8  # NaN last
    # N = 2: no bin scores, so everything is "past the last bin" or the cap
    h2 = EP.epsilon_histogram(np.array([0.0, 50.0]), 2)
    assert h2.counts == [1, 1] and h2.labels == ["0–50", "50 (cap)"]


def test_figures_of_a_hand_built_epsilon_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    u, r = write_epsilon_folder(run / "runs" / "00_x" / "epsilon")
    with pytest.MonkeyPatch.context() as mp:
        figs = Figures(mp)
        plots = EP.experiment_epsilon_plots(run, "00_x", run / "plots" / "00_x")
    assert [p.title for p in plots] == ["Per-example epsilon", "Hardest examples"]
    assert all(p.experiment == "00_x" and p.seed is None for p in plots)
    for p in plots:
        assert set(p.files) == {"pdf", "svg", "png"} and all(f.is_file() for f in p.files.values())
    hist = figs.saved["epsilon_hist"]
    (ax,) = hist.axes
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [b.get_height() for b in bars] == BAR_COUNTS
    assert f"F = {F:.3f}, score = {SCORE:.3f}, N = 4" == ax.get_title()
    assert "1 example(s) with every rule discarded" in plots[0].caption
    assert "RA_u/RA_r = 0.900, TA_u/TA_r = 0.833" in plots[0].caption
    hard = figs.saved["epsilon_hardest"]
    assert len(hard.axes) == EP.HARDEST == 6
    titles = [a.get_title() for a in hard.axes]
    assert titles[:2] == ["pool #118: ε = 50 (cap)", "pool #121: ε = 10.00"]
    assert titles == [f"pool #{INDICES[j]}: " + titles[k].split(": ")[1]
                      for k, j in enumerate(HARDEST_COLUMNS)]  # fmt: skip
    for a, j in zip(hard.axes, HARDEST_COLUMNS, strict=True):
        # one filled histogram per side over the panel's shared bins, holding all N models
        ret, unl = (p for p in a.patches if isinstance(p, Polygon))
        lo, hi = min(u[:, j].min(), r[:, j].min()), max(u[:, j].max(), r[:, j].max())
        assert a.get_xlim()[0] <= lo and a.get_xlim()[1] >= hi
        assert ret.get_facecolor()[:3] == pytest.approx(to_rgba(style.GREEN)[:3])
        assert unl.get_facecolor()[:3] == pytest.approx(to_rgba(style.BLUE)[:3])
        assert max(v[1] for v in ret.get_xy()) <= N and max(v[1] for v in unl.get_xy()) <= N


def test_no_epsilon_folder_no_figures(tmp_path: Path) -> None:
    assert EP.experiment_epsilon_plots(tmp_path, "00_x", tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def test_report_shows_the_epsilon_figures_without_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run_folder(tmp_path)
    for other in ("00_ft_cf3", "01_ft+mask_cf3"):  # one experiment is enough, and 3x faster
        shutil.rmtree(run / "runs" / other)
    write_epsilon_folder(run / "runs" / "02_ga_unlr0.1" / "epsilon")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report loaded model weights")

    monkeypatch.setattr(checkpoints, "load_checkpoint", forbidden)
    monkeypatch.setattr(checkpoints, "load_model", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_model", forbidden)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", forbidden)
    write_report(run, "cpu", features=False, pdf=False, quiet=True, fig_formats=("svg", "png"))
    md = (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    # both figures in the experiment's section, after its own figures and before its seeds'
    section = html[html.index('id="exp-02-ga-unlr0-1"') : html.index('id="configuration"')]
    overall = section[: section.index("<details>")]
    srcs = re.findall(r'<img src="([^"]+)"', overall)
    assert srcs[-2:] == ["plots/02_ga_unlr0.1/epsilon_hist.svg",
                         "plots/02_ga_unlr0.1/epsilon_hardest.svg"]  # fmt: skip
    assert "bins of width 0.5" in overall.lower() and "50 is the cap" in overall
    assert "6 forget examples with the largest epsilon" in overall
    assert "plots/02_ga_unlr0.1/epsilon_hist.png" in md
    assert "epsilon_hist" not in html[: html.index('id="exp-02-ga-unlr0-1"')]
    # the eps score, read from epsilon.json, in the summary's main table, only for its runs
    table = html[html.index("<table>") : html.index("</table>")]
    assert "<th>eps score</th>" in table
    assert f"{100 * SCORE:.2f}" in table
    results = load_results(run)
    assert {r.experiment for r in results if "eps_score" in r.extra} == {"02_ga_unlr0.1"}
    assert all(r.extra["eps_quality"] == F for r in results if "eps_quality" in r.extra)
