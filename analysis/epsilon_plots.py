"""Figures of a many-model evaluation: per-example epsilon and the hardest examples.

The forgetting quality of the NeurIPS 2023 Machine Unlearning competition (Triantafillou,
Pedregosa, Hayes et al., "Are we making progress in unlearning?", 2024; evaluation/epsilon.py)
scores each forget example by an epsilon that says how well one threshold or interval tells
the logit-scaled confidences of N unlearned models from those of N retrained ones. Two figures
per experiment, read from ``runs/<experiment>/epsilon/`` (``epsilon.json`` and
``confidences.safetensors``, written by running/many_models.py); no model is loaded:

* ``epsilon_hist``: how many forget examples fall in each of the competition's bins (width 0.5
  from 0 to ceil(ln(N - 1)), the k-th worth H = 2^-k), the ones past the last bin (H = 0) and
  the ones at the cap (50), with F and the score in the title.
* ``epsilon_hardest``: the confidence histograms, unlearned vs retrained, of the
  :data:`HARDEST` examples with the largest epsilon (ties: the lowest pool index first).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator
from safetensors.torch import load_file

from analysis import style
from analysis.style import Plot
from evaluation.epsilon import (
    BIN_WIDTH,
    CONFIDENCES_FILE,
    EPSILON_CAP,
    EPSILON_FILE,
    bin_points,
)
from running.many_models import EPSILON_DIR, SUMMARY_KEYS
from running.results import RunResult

__all__ = [
    "HARDEST",
    "EpsilonData",
    "Histogram",
    "epsilon_histogram",
    "attach_scores",
    "experiment_epsilon_plots",
    "hardest_examples",
    "plot_epsilon_histogram",
    "plot_hardest",
    "read_epsilon",
]

HARDEST = 6  # examples in the hardest-examples figure: two rows of three panels
CONFIDENCE_BINS = 16


@dataclass(frozen=True)
class EpsilonData:
    """What an experiment's ``epsilon/`` folder holds."""

    unlearned: np.ndarray  # [N, S] logit-scaled confidences
    retrained: np.ndarray  # [N, S]
    epsilon: np.ndarray  # [S]; NaN where every rule was discarded
    indices: np.ndarray  # [S] pool indices of the columns (0..S-1 when not recorded)
    info: dict[str, Any]  # epsilon.json

    @property
    def n_models(self) -> int:
        return int(self.info.get("n_models") or self.unlearned.shape[0])


def read_epsilon(folder: Path) -> EpsilonData | None:
    """The epsilon files of `folder`, or None when there are none (no many-model evaluation,
    or it has not finished); a warning when only one of the two files is there."""
    js, conf = folder / EPSILON_FILE, folder / CONFIDENCES_FILE
    if not js.is_file() and not conf.is_file():
        return None
    if not (js.is_file() and conf.is_file()):
        missing = conf if js.is_file() else js
        print(f"warning: {missing} not found; epsilon figures left out", file=sys.stderr)
        return None
    info = json.loads(js.read_text())
    tensors = load_file(str(conf))
    u, r = tensors["unlearned"].double().numpy(), tensors["retrained"].double().numpy()
    # strict JSON writes NaN as null
    eps = np.array([math.nan if e is None else e for e in info["per_example_epsilon"]], float)
    if u.shape != r.shape or u.ndim != 2 or u.shape[1] != len(eps):
        raise ValueError(f"{folder}: confidences {tuple(u.shape)} and {tuple(r.shape)} do not "
                         f"match {len(eps)} per-example epsilons")  # fmt: skip
    idx = np.asarray(info.get("forget_indices") or range(len(eps)), dtype=np.int64)
    return EpsilonData(u, r, eps, idx, info)


def attach_scores(run_dir: Path, results: list[RunResult]) -> list[RunResult]:
    """Put each experiment's eps score and U-LiRA numbers, read from its ``epsilon/`` folder,
    into its runs' ``extra``, as the runner does for its summary (metrics.json does not hold
    them), so the report's table has them too."""
    cache: dict[str, dict[str, float]] = {}
    for r in results:
        if r.experiment not in cache:
            d = Path(run_dir) / "runs" / r.experiment / EPSILON_DIR
            files = {f: json.loads((d / f).read_text()) if (d / f).is_file() else {}
                     for f in {f for f, _ in SUMMARY_KEYS.values()}}  # fmt: skip
            found = {key: files[f].get(k) for key, (f, k) in SUMMARY_KEYS.items()}
            cache[r.experiment] = {k: v for k, v in found.items() if isinstance(v, (int, float))}
        r.extra.update(cache[r.experiment])
    return results


# ---------------------------------------------------------------------------------------------
# The numbers the figures show


@dataclass(frozen=True)
class Histogram:
    """Bars of the epsilon histogram: the scoring bins, then "past the last bin", then the cap."""

    labels: list[str]
    counts: list[int]
    points: list[float]  # H of an example in the bar
    undefined: int  # examples whose epsilon is NaN (score 0; not drawn)


def _num(x: float) -> str:
    return f"{x:g}"


def epsilon_histogram(eps: np.ndarray, n_models: int) -> Histogram:
    """Counts of per-example epsilon in the competition's bins for `n_models` per side."""
    eps = np.asarray(eps, dtype=np.float64)
    ok = eps[~np.isnan(eps)]
    bins = bin_points(n_models)
    top = len(bins) * BIN_WIDTH  # the last bin's end: from here on an example scores 0
    labels, counts, points = [], [], []
    for start, p in bins:
        labels.append(f"{_num(start)}–{_num(start + BIN_WIDTH)}")
        counts.append(int(((ok >= start) & (ok < start + BIN_WIDTH)).sum()))
        points.append(p)
    labels += [f"{_num(top)}–{_num(EPSILON_CAP)}", f"{_num(EPSILON_CAP)} (cap)"]
    counts += [int(((ok >= top) & (ok < EPSILON_CAP)).sum()), int((ok >= EPSILON_CAP).sum())]
    points += [0.0, 0.0]
    return Histogram(labels, counts, points, int(np.isnan(eps).sum()))


def hardest_examples(eps: np.ndarray, k: int = HARDEST) -> np.ndarray:
    """Column indices of the `k` examples with the largest epsilon, largest first; ties keep
    column (pool-index) order, NaN comes last."""
    eps = np.asarray(eps, dtype=np.float64)
    key = np.where(np.isnan(eps), -np.inf, eps)
    return np.argsort(-key, kind="stable")[: max(0, min(k, len(eps)))]


def _points_text(p: float) -> str:
    return "1" if p == 1 else f"$2^{{-{round(-math.log2(p))}}}$" if p > 0 else "0"


def _eps_text(e: float) -> str:
    if math.isnan(e):
        return "undefined"
    return f"{EPSILON_CAP:g} (cap)" if e >= EPSILON_CAP else f"{e:.2f}"


# ---------------------------------------------------------------------------------------------
# Plot functions: arrays in, figure files out


@style.styled
def plot_epsilon_histogram(h: Histogram, title: str, path: Path) -> dict[str, Path]:
    """One bar per bin with its count above it, H of the bin on the top axis; the bars that
    score 0 in vermillion."""
    fig = style.figure(style.SINGLE, 2.7)
    ax = fig.add_subplot()
    x = np.arange(len(h.counts))
    colors = [style.BLUE if p > 0 else style.FORGET_COLOR for p in h.points]
    bars = ax.bar(x, h.counts, width=0.8, color=colors)
    # counts written out: the cap's bar often dwarfs the others
    ax.bar_label(bars, labels=[str(c) for c in h.counts], padding=1, fontsize=8)
    ax.set_xticks(x, h.labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(x) - 0.4)
    top = ax.secondary_xaxis("top")
    top.set_xticks(x, [_points_text(p) for p in h.points])
    top.set_xlabel("points H of an example in the bin")
    ax.set_xlabel("per-example ε")
    ax.set_ylabel("forget examples")
    ax.set_ylim(0, max(max(h.counts), 1) * 1.12)  # room for the counts above the bars
    ax.set_title(title)
    return style.save_figure(fig, path)


@style.styled
def plot_hardest(
    panels: list[tuple[str, np.ndarray, np.ndarray]], n_models: int, path: Path
) -> dict[str, Path]:
    """Confidence histograms, unlearned vs retrained, one panel per example: (title, unlearned
    confidences [N], retrained confidences [N]); bins shared by the two in a panel."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = style.figure(style.DOUBLE, 1.1 + 1.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[len(panels) :]:
        fig.delaxes(ax)
    for k, (title, u, r) in enumerate(panels):
        ax = axes.ravel()[k]
        both = np.concatenate([u, r])
        edges = np.histogram_bin_edges(both, bins=CONFIDENCE_BINS)
        for vals, role, what in ((r, "oracle", "retrained"), (u, "unlearned", "unlearned")):
            ax.hist(vals, bins=edges, histtype="stepfilled", alpha=0.55,
                    color=style.ROLE_COLORS[role], label=f"{what} ({n_models} models)")  # fmt: skip
        ax.set_title(title)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if k % cols == 0:
            ax.set_ylabel("models")
        if k >= len(panels) - cols:
            ax.set_xlabel("logit-scaled confidence")
    handles, texts = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles[::-1], texts[::-1], loc="outside upper center", ncols=2)
    return style.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# The figures of one experiment


def _score_text(x: Any) -> str:
    if not (isinstance(x, (int, float)) and math.isfinite(x)):
        return "–"
    # class-wise F is often below 0.001: two significant digits there, not 0.000
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2g}"


def _ratio(info: dict[str, Any], kind: str) -> float:
    """Mean accuracy of the unlearned models over the retrained models' (`kind`: retain, test)."""
    u, r = info.get(f"{kind}_acc_unlearned"), info.get(f"{kind}_acc_retrained")
    ok = isinstance(u, (int, float)) and isinstance(r, (int, float)) and r != 0
    return float(u) / float(r) if ok else math.nan  # type: ignore[arg-type]


def experiment_epsilon_plots(run_dir: Path, experiment: str, out: Path) -> list[Plot]:
    """The epsilon histogram and the hardest examples of `experiment` of a run folder, written
    into `out` (the experiment's plot folder); none when it has no many-model evaluation."""
    data = read_epsilon(Path(run_dir) / "runs" / experiment / EPSILON_DIR)
    if data is None or data.epsilon.size == 0:
        return []
    n, s = data.n_models, len(data.epsilon)
    f, score = data.info.get("forgetting_quality"), data.info.get("score")
    h = epsilon_histogram(data.epsilon, n)
    top = len(bin_points(n)) * BIN_WIDTH
    title = f"F = {_score_text(f)}, score = {_score_text(score)}, N = {n}"
    files = plot_epsilon_histogram(h, title, out / "epsilon_hist")
    acc = ", ".join(f"{a}_u/{a}_r = {_score_text(_ratio(data.info, k))}"
                    for a, k in (("RA", "retain"), ("TA", "test")))  # fmt: skip
    undefined = (f" {h.undefined} example(s) with every rule discarded (epsilon undefined, "
                 "H = 0) are not drawn." if h.undefined else "")  # fmt: skip
    caption = (
        f"Per-example epsilon of the NeurIPS 2023 unlearning competition (Triantafillou et al. "
        f"2024) over the {s} forget examples, from the logit-scaled confidences of {n} unlearned "
        f"and {n} retrained models: the privacy loss of the best single-threshold or interval "
        f"rule telling the two apart at delta = 1e-5 (0: the rules cannot tell them apart). Bins "
        f"of width {BIN_WIDTH:g} from 0 to ceil(ln(N − 1)) = {top:g}; an example in the k-th bin "
        f"(from 0) scores H = 2^−k (top axis; counts above the bars), one at or past {top:g} "
        f"scores 0 (vermillion), and {EPSILON_CAP:g} is the cap (perfect separation, or one "
        f"side a spike under 1% of the other's range). Forgetting quality F = mean H = "
        f"{_score_text(f)}; "
        f"score = F × RA_u/RA_r × TA_u/TA_r = {_score_text(score)} ({acc}, accuracies averaged "
        f"over the models). The estimator is biased upwards: even two samples from the same "
        f"distribution give F ≈ 0.2, not 1, so compare F between methods.{undefined}"
    )
    plots = [Plot(style.primary(files), caption, "", "Per-example epsilon", files, experiment)]
    cols = hardest_examples(data.epsilon)
    panels = [(f"pool #{data.indices[j]}: ε = {_eps_text(data.epsilon[j])}",
               data.unlearned[:, j], data.retrained[:, j]) for j in cols]  # fmt: skip
    files = plot_hardest(panels, n, out / "epsilon_hardest")
    caption = (
        f"Logit-scaled confidences log p_y − log Σ_(k≠y) p_k of the {len(panels)} forget "
        f"examples with the largest epsilon (ties: lowest pool index first), under the {n} "
        f"unlearned models (blue) and the {n} retrained models (green); each title gives the "
        "example's pool index and epsilon. Where the two do not overlap, one confidence tells "
        "an unlearned model from a retrained one on that example."
    )
    plots.append(Plot(style.primary(files), caption, "", "Hardest examples", files, experiment))
    return plots
