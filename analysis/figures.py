"""The paper figures of a run folder: every experiment at once, aggregated over its seeds.

Drawn from ``metrics.json`` alone (no outputs, no models), each number as the mean over seeds
with a 95% Student-t interval (:func:`mean_ci`):

* ``gap_vs_cost``: Avg. Gap to the retrain oracle against the cost of unlearning relative to
  retraining, one panel per forgetting type, one marker per method, filled with the SalUn
  saliency mask, hollow without. The cost is ``times.sample_pass_ratio`` (samples the method
  passed through the model / samples the oracle's training passed) when every run recorded it,
  else ``times.time_ratio`` (wall time; it depends on the machine's load). Ratios are averaged
  and given intervals on the log scale they are drawn on (geometric mean), so the interval
  stays positive and symmetric on the axis.
* ``metrics_vs_oracle``: UA, RA, TA and MIA-Efficacy of each experiment minus the oracle's, in
  percentage points (SalUn, Fan et al., ICLR 2024, Table 3's comparison with "Retrain"); the
  mean of their absolute values is the Avg. Gap.
* ``per_class_vs_oracle``: per-class test accuracy minus the oracle's, retained classes and the
  forgotten class(es) on separate scales (they differ by orders of magnitude).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis import style
from analysis.style import Plot
from running.results import RunResult

KINDS = ("class-wise", "random", "index file", "replacement")
GAP_METRICS = (
    ("UA", "gap_UA"),
    ("RA", "gap_RA"),
    ("TA", "gap_TA"),
    ("MIA-Eff.", "gap_mia_efficacy"),
)
ORACLE_KEYS = {"UA": "UA", "RA": "RA", "TA": "TA", "MIA-Eff.": "mia_efficacy"}


# ---------------------------------------------------------------------------------------------
# Intervals


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its 95% Student-t interval [lo, hi] (lo = hi = mean for n = 1)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def text(self, scale: float = 1.0, nd: int = 2) -> str:
        if not math.isfinite(self.mean):
            return "–"
        m = self.mean * scale
        return f"{m:.{nd}f}" if self.n < 2 else f"{m:.{nd}f} ± {self.half * scale:.{nd}f}"


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> Interval:
    """Mean and the Student-t interval mean ± t_{(1+level)/2, n-1} · s / √n of the finite
    values (NaN without any)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if len(v) == 1:
        return Interval(m, m, m, 1)
    half = t_quantile((1 + level) / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return Interval(m, m - half, m + half, len(v))


def mean_ci_log(values: Sequence[float | None], level: float = 0.95) -> Interval:
    """Geometric mean and interval of positive values: :func:`mean_ci` of their logarithms,
    mapped back (so lo > 0, and the interval is symmetric on a log axis)."""
    logs = [math.log(x) for x in values if x is not None and math.isfinite(x) and x > 0]
    i = mean_ci(logs, level)
    if i.n == 0:
        return i
    return Interval(math.exp(i.mean), math.exp(i.lo), math.exp(i.hi), i.n)


# ---------------------------------------------------------------------------------------------
# Experiments


def forgetting_kind(r: RunResult) -> str:
    """class-wise, random, index file or replacement."""
    if r.replacement is not None or r.forget.get("replace"):
        return "replacement"
    if r.forget.get("classes"):
        return "class-wise"
    if r.forget.get("fraction") is not None:
        return "random"
    return "index file"


@dataclass
class Experiment:
    """The runs (seeds) of one experiment of a run folder."""

    name: str
    runs: list[RunResult]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def masked(self) -> bool:
        return any(r.mask_kept is not None for r in self.runs)

    @property
    def kind(self) -> str:
        return forgetting_kind(self.runs[0])

    @property
    def forget_classes(self) -> list[int]:
        return [int(c) for c in self.runs[0].forget.get("classes") or []]

    @property
    def label(self) -> str:
        return self.method + (" + mask" if self.masked else "")

    def values(self, section: str, key: str) -> list[float | None]:
        return [getattr(r, section).get(key) for r in self.runs]

    def ci(self, section: str, key: str) -> Interval:
        return mean_ci(self.values(section, key))


def experiments(results: Sequence[RunResult]) -> list[Experiment]:
    """Runs grouped by experiment, in experiment and seed order."""
    by: dict[str, list[RunResult]] = {}
    for r in sorted(results, key=lambda r: (r.experiment, int(r.seed))):
        by.setdefault(r.experiment, []).append(r)
    return [Experiment(k, v) for k, v in by.items()]


def by_kind(exps: Sequence[Experiment]) -> dict[str, list[Experiment]]:
    out: dict[str, list[Experiment]] = {}
    for k in KINDS:
        found = [e for e in exps if e.kind == k]
        if found:
            out[k] = found
    return out


def labels(exps: Sequence[Experiment]) -> dict[str, str]:
    """A legend label per experiment: method (+ mask), the experiment's name where two
    experiments would read the same."""
    count: dict[str, int] = {}
    for e in exps:
        count[e.label] = count.get(e.label, 0) + 1
    return {e.name: e.label if count[e.label] == 1 else e.name for e in exps}


def best(exps: Sequence[Experiment]) -> Experiment:
    """The experiment with the smallest mean Avg. Gap (class-wise first, if any)."""
    pool = [e for e in exps if e.kind == "class-wise"] or list(exps)
    return min(pool, key=lambda e: _finite(e.ci("gaps", "avg_gap").mean))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _has(r: RunResult, key: str) -> bool:
    v = r.times.get(key)
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def cost_axis(results: Sequence[RunResult]) -> tuple[str, str]:
    """The cost key of ``times`` and its axis label: sample passes when every run has them."""
    if results and all(_has(r, "sample_pass_ratio") for r in results):
        return "sample_pass_ratio", "sample passes / oracle's training sample passes"
    return "time_ratio", "wall time / oracle's training time"


# ---------------------------------------------------------------------------------------------
# Drawing helpers


def marker_kwargs(method: str, masked: bool, size: float = 5.0) -> dict[str, object]:
    """Filled marker with the mask, hollow without; the method's fixed colour and marker."""
    color, marker = style.method_style(method)
    return {
        "marker": marker,
        "color": color,
        "mec": color,
        "mfc": color if masked else "white",
        "mew": 1.0,
        "ms": size,
        "ls": "none",
    }


def method_legend(exps: Sequence[Experiment]) -> list[Line2D]:
    """One entry per method (its colour and marker), then what filled and hollow mean."""
    seen: list[str] = []
    for e in exps:
        if e.method not in seen:
            seen.append(e.method)
    handles = [Line2D([], [], label=m, **marker_kwargs(m, True)) for m in seen]  # type: ignore[arg-type]
    masks = {e.masked for e in exps}
    gray = {"color": style.GREY, "mec": style.GREY, "ls": "none", "marker": "o", "ms": 5}
    if True in masks:
        handles.append(Line2D([], [], mfc=style.GREY, label="with saliency mask", **gray))  # type: ignore[arg-type]
    if False in masks:
        handles.append(Line2D([], [], mfc="white", label="without mask", **gray))  # type: ignore[arg-type]
    return handles


def _log_ratio_axis(ax: Axes, lo: float, hi: float) -> None:
    ax.set_xscale("log")
    span = max(hi / lo, 1.0)
    subs = (1.0,) if span > 300 else (1.0, 2.0, 5.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    pad = (hi / lo) ** 0.08 if hi > lo else 1.5
    ax.set_xlim(lo / pad, hi * pad)


# ---------------------------------------------------------------------------------------------
# (a) Avg. Gap against cost


@style.styled
def plot_gap_vs_cost(results: Sequence[RunResult], path: Path) -> dict[str, Path]:
    """Avg. Gap (pp) against unlearning cost relative to the oracle, per forgetting type."""
    exps = experiments(results)
    kinds = by_kind(exps)
    key, xlabel = cost_axis(results)
    n = max(1, len(kinds))
    fig = style.figure(style.SINGLE if n == 1 else style.DOUBLE, 2.5 if n > 1 else 2.7)
    axes = fig.subplots(1, n, squeeze=False)[0]
    xs_all: list[float] = []
    for ax, (kind, group) in zip(axes, kinds.items(), strict=False):
        for e in group:
            x = mean_ci_log(e.values("times", key))
            y = mean_ci(e.values("gaps", "avg_gap"))
            if not (math.isfinite(x.mean) and math.isfinite(y.mean)):
                continue
            xs_all += [x.lo, x.hi]
            # Avg. Gap is a mean of absolute values: its interval is cut at zero
            yerr = [[y.mean - max(y.lo, 0.0)], [y.hi - y.mean]]
            xerr = [[x.mean - x.lo], [x.hi - x.mean]]
            ax.errorbar(
                [x.mean], [y.mean], xerr=xerr, yerr=yerr, elinewidth=0.7, capsize=1.5,
                ecolor=style.method_style(e.method)[0], **marker_kwargs(e.method, e.masked),
            )  # fmt: skip
        ax.set_title(f"{kind} forgetting")
        top = ax.get_ylim()[1]
        ax.set_ylim(-0.04 * top, top)  # a point at zero stays clear of the axis
        ax.grid(True, axis="y", lw=0.4, alpha=0.5)
        ax.axvline(1.0, color=style.GREY, lw=0.6, ls="--", zorder=0)
    finite = [v for v in xs_all if v > 0 and math.isfinite(v)] + [1.0]
    for ax in axes:
        _log_ratio_axis(ax, min(finite), max(finite))
        ax.set_xlabel(xlabel if n == 1 else "")
    if n > 1:
        fig.supxlabel(xlabel + "  (dashed: cost of retraining)", fontsize=8)
    axes[0].set_ylabel("Avg. Gap to oracle (pp)")
    fig.legend(handles=method_legend(exps), loc="outside upper center",
               ncols=min(6, len(method_legend(exps))))  # fmt: skip
    return style.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# (b) UA, RA, TA, MIA-Efficacy against the oracle


@style.styled
def plot_metrics_vs_oracle(results: Sequence[RunResult], path: Path) -> dict[str, Path]:
    """Grouped bars: each metric of each experiment minus the oracle's (pp), 95% intervals."""
    exps = experiments(results)
    kinds = by_kind(exps)
    fig = style.figure(style.DOUBLE, 0.4 + 1.9 * max(1, len(kinds)))
    axes = fig.subplots(max(1, len(kinds)), 1, squeeze=False)[:, 0]
    for ax, (kind, group) in zip(axes, kinds.items(), strict=False):
        width = 0.8 / len(group)
        names = labels(group)
        runs = [r for e in group for r in e.runs]
        ticks = []
        for g, (metric, gap_key) in enumerate(GAP_METRICS):
            oracle = mean_ci([r.oracle.get(ORACLE_KEYS[metric]) for r in runs])
            ticks.append(f"{metric}\noracle {oracle.text(100, 1)}")
            for k, e in enumerate(group):
                y = e.ci("gaps", gap_key)
                color, _ = style.method_style(e.method)
                ax.bar(
                    g - 0.4 + width * (k + 0.5), y.mean, width * 0.9,
                    color=color if e.masked else "white", edgecolor=color, lw=1.0,
                    yerr=[[y.mean - y.lo], [y.hi - y.mean]] if y.n > 1 else None,
                    error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": style.BLACK},
                    label=names[e.name] if g == 0 else None,
                )  # fmt: skip
        ax.axhline(0, color=style.GREEN, lw=1.0)
        ax.set_xticks(range(len(GAP_METRICS)), ticks)
        ax.set_ylabel("minus oracle (pp)")
        ax.set_title(f"{kind} forgetting", loc="left")
        ax.grid(True, axis="y", lw=0.4, alpha=0.5)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return style.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# (c) per-class accuracy against the oracle


def per_class_differences(e: Experiment, who: str = "metrics") -> np.ndarray:
    """[seeds, classes] per-class test accuracy of `who` (``metrics``: unlearned, or ``base``)
    minus the oracle's, in percentage points."""
    rows = []
    for r in e.runs:
        a = np.array(getattr(r, who).get("per_class_test_acc") or [], dtype=float)
        o = np.array(r.oracle.get("per_class_test_acc") or [], dtype=float)
        if len(a) and len(a) == len(o):
            rows.append(100 * (a - o))
    return np.array(rows) if rows else np.zeros((0, 0))


def draw_class_points(
    axes: tuple[Axes, Axes | None],
    series: Sequence[tuple[str, np.ndarray, dict[str, object]]],
    forget: Sequence[int],
    class_names: Sequence[str],
) -> None:
    """Points with 95% intervals per class, one dodged series per (label, [seeds, C] values,
    marker style); forgotten classes on the second axis (own scale), with a zero line each."""
    ax_keep, ax_forget = axes
    c = max((v.shape[1] for _, v, _ in series if v.size), default=0)
    keep = [k for k in range(c) if k not in set(forget)]
    groups = [(ax_keep, keep)] + ([(ax_forget, list(forget))] if ax_forget is not None else [])
    width = 0.8 / max(1, len(series))
    for ax, cols in groups:
        for s, (label, vals, kw) in enumerate(series):
            if not vals.size:
                continue
            cis = [mean_ci(vals[:, k].tolist()) for k in cols]
            x = np.arange(len(cols)) - 0.4 + width * (s + 0.5)
            m = np.array([i.mean for i in cis])
            err = np.array([[i.mean - i.lo for i in cis], [i.hi - i.mean for i in cis]])
            ax.errorbar(x, m, yerr=err if vals.shape[0] > 1 else None, elinewidth=0.7,
                        capsize=1.0, label=label if ax is ax_keep else None, **kw)  # type: ignore[arg-type]  # fmt: skip
        ax.axhline(0, color=style.GREEN, lw=1.0, zorder=0)
        ax.set_xticks(range(len(cols)), [str(class_names[k]) for k in cols])
        ax.set_xlim(-0.6, len(cols) - 0.4)
        ax.grid(True, axis="y", lw=0.4, alpha=0.5)
    if ax_forget is not None:
        for t in ax_forget.get_xticklabels():
            t.set_color(style.FORGET_COLOR)
            t.set_fontweight("bold")
        ax_forget.set_xlabel("forgotten", color=style.FORGET_COLOR)
        ax_forget.patch.set_facecolor("#FBEDE5")  # a light tint of the forget colour
    ax_keep.set_xlabel("class" if ax_forget is None else "retained classes")


@style.styled
def plot_per_class_vs_oracle(
    results: Sequence[RunResult], path: Path, class_names: Sequence[str] | None = None
) -> dict[str, Path] | None:
    """Per-class test accuracy minus the oracle's (pp) of every experiment and the base model,
    one row per forgetting type; None when no run recorded per-class accuracy."""
    exps = [e for e in experiments(results) if per_class_differences(e).size]
    kinds = by_kind(exps)
    if not kinds:
        return None
    fig = style.figure(style.DOUBLE, 0.5 + 1.9 * len(kinds))
    with_forget = any(e.forget_classes for e in exps)
    grid = fig.subplots(len(kinds), 2 if with_forget else 1, squeeze=False,
                        width_ratios=[8, 1.4] if with_forget else None)  # fmt: skip
    for row, (kind, group) in zip(grid, kinds.items(), strict=True):
        forget = sorted({c for e in group for c in e.forget_classes})
        nc = per_class_differences(group[0]).shape[1]
        cn = list(class_names or map(str, range(nc)))
        series = [("base", per_class_differences(group[0], "base"),
                   {"marker": "s", "color": style.GREY, "ms": 3.5, "ls": "none"})]  # fmt: skip
        series += [(e.name, per_class_differences(e), marker_kwargs(e.method, e.masked, 4))
                   for e in group]  # fmt: skip
        ax_f = row[1] if with_forget and forget else None
        if with_forget and not forget:
            row[1].set_visible(False)
        draw_class_points((row[0], ax_f), series, forget, cn)
        row[0].set_ylabel("minus oracle (pp)")
        row[0].set_title(f"{kind} forgetting", loc="left")
    base = Line2D([], [], marker="s", color=style.GREY, ms=3.5, ls="none", label="base model")
    handles = [base, *method_legend(exps)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(7, len(handles)))
    return style.save_figure(fig, path)


def paper_plots(
    results: Sequence[RunResult], out: Path, class_names: Sequence[str] | None = None
) -> list[Plot]:
    """The three cross-experiment figures, under ``out``."""
    key, _ = cost_axis(results)
    cost = (
        "sample passes through the model relative to the oracle's training (times."
        "sample_pass_ratio)"
        if key == "sample_pass_ratio"
        else "unlearning wall time relative to the oracle's training time (times.time_ratio; "
        "wall time depends on the machine and its load, sample-pass ratios are drawn instead "
        "when every run recorded them)"
    )
    missing = [e.name for e in experiments(results) if not any(_has(r, key) for r in e.runs)]
    if missing:
        cost += f"; without a recorded cost, left out: {', '.join(missing)}"
    n = max(len(e.runs) for e in experiments(results))
    ci = f"95% t-intervals over {n} seeds" if n > 1 else "one seed, no intervals"
    plots = []
    files = plot_gap_vs_cost(results, out / "gap_vs_cost")
    plots.append(Plot(style.primary(files), (
        "Avg. Gap to the retrain oracle (mean |difference| of UA, RA, TA and MIA-Efficacy, "
        f"percentage points) against the cost of unlearning: {cost}; log axis, geometric means. "
        "One marker per method, filled with the SalUn saliency mask, hollow without; one panel "
        f"per forgetting type; {ci}. Lower is better; left of the dashed line is cheaper than "
        "retraining."), "paper", "Avg. Gap vs cost", files))  # fmt: skip
    files = plot_metrics_vs_oracle(results, out / "metrics_vs_oracle")
    plots.append(Plot(style.primary(files), (
        "Unlearning accuracy (UA = 1 − forget accuracy), retain accuracy (RA), test accuracy "
        "(TA) and MIA-Efficacy of each experiment minus the retrain oracle's, in percentage "
        "points (the oracle's own value under each group; green line: the oracle). Filled bars "
        f"used the saliency mask; {ci}."), "paper", "Metrics vs oracle", files))  # fmt: skip
    files_or_none = plot_per_class_vs_oracle(results, out / "per_class_vs_oracle", class_names)
    if files_or_none is not None:
        plots.append(Plot(style.primary(files_or_none), (
            "Test accuracy per class minus the retrain oracle's, in percentage points, for the "
            "base model (grey squares) and every experiment (markers as in the Avg. Gap figure); "
            "the forgotten class(es) on their own scale at the right (tinted). Green line: the "
            f"oracle; {ci}."), "paper", "Per-class accuracy vs oracle", files_or_none))  # fmt: skip
    return plots
