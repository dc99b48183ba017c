"""Evaluation plots of a run folder: what the unlearning did to losses, predictions and classes.

    python plots.py output/20250101-120000_quickstart [--out DIR] [--device cpu]

For every run (experiment x seed) of the folder the unlearned model (``model.safetensors``), its
base checkpoint and its retrain oracle (``base_checkpoint`` / ``oracle_checkpoint`` of
``metrics.json``) are loaded, the split is rebuilt from the model's sidecar (split seed,
validation fraction, forget classes, else the forget-index JSON beside the model) with the
project's own ``make_split``, and per-sample outputs are recomputed with
``metrics.collect_outputs``. Written under ``<run>/plots/`` (or ``--out``):

* ``<experiment>/seed<k>/loss_hist.png``: per-sample cross-entropy of forget vs test samples for
  base, unlearned and oracle; each title gives the loss-MIA accuracy (``metrics.loss_mia``,
  the NeurIPS 2023 starting kit's attack: 0.5 = forget and test samples look alike).
* ``<experiment>/seed<k>/confusion.png``: row-normalised confusion matrices on the whole test
  set (forgotten classes included).
* ``<experiment>/seed<k>/per_class_acc.png``: test accuracy per class, base / unlearned /
  oracle.
* ``summary_table.png``: the summary table (mean ± std over seeds) as a figure.
* ``gap_vs_time.png``: Avg. Gap to the oracle against unlearning time, one point per experiment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter
from torch import nn
from tqdm.auto import tqdm

import metrics as M
from analysis.features import checkpoint_key, resolve_checkpoint
from core.errors import UserError, cli
from datasets import DeviceData, ForgetSpec, Split, make_split, pick_device
from running.tables import COLUMNS, summarize
from training.checkpoints import forget_indices_of, load_checkpoint, read_meta
from training.config import TrainConfig
from training.loop import EVAL_BATCH
from training.recipe import load_data

matplotlib.use("Agg")  # headless; this module never imports pyplot

ROLES = ("base", "unlearned", "oracle")
ROLE_COLORS = {"base": "#7f7f7f", "unlearned": "#1f77b4", "oracle": "#2ca02c"}
ROLE_TITLES = {"base": "base", "unlearned": "unlearned", "oracle": "retrain oracle"}


@dataclass
class Plot:
    """One image of a report: where it is, what it shows."""

    path: Path
    caption: str
    section: str
    title: str = ""


# ---------------------------------------------------------------------------------------------
# Plot functions: arrays in, one PNG out


def _save(fig: Figure, path: Path, **kwargs: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **kwargs)
    return path


def plot_loss_histograms(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray, float]], path: Path, *, title: str = ""
) -> Path:
    """Per-sample loss histograms, forget vs test, one panel per model.

    ``panels``: (model name, forget losses, test losses, loss-MIA accuracy). Bins are
    logarithmic and shared by all panels (losses span many orders of magnitude)."""
    allv = np.concatenate([np.concatenate([f, t]) for _, f, t, _ in panels] + [np.ones(1)])
    allv = allv[np.isfinite(allv)]
    lo = math.log10(max(float(allv.min()), 1e-7))
    hi = max(math.log10(max(float(allv.max()), 1e-7)), lo + 1)
    bins = np.linspace(lo, hi, 41)
    # log10 of the loss on a linear axis: same picture as a log axis, a fraction of the cost
    ticks = np.arange(math.ceil(lo), math.floor(hi) + 1)
    if len(ticks) > 8:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    fig = Figure(figsize=(3.6 * len(panels), 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (name, f, t, acc) in zip(axes, panels, strict=True):
        for vals, color, what in ((t, "#1f77b4", "test"), (f, "#d62728", "forget")):
            v = np.log10(np.clip(vals[np.isfinite(vals)], 10**lo, 10**hi))
            ax.hist(
                v,
                bins=bins,
                density=True,
                histtype="stepfilled",
                alpha=0.5,
                color=color,
                label=f"{what} (n={len(vals)})",
            )
        ax.set_xticks(ticks, [f"$10^{{{int(k)}}}$" for k in ticks])
        ax.set_xlabel("per-sample cross-entropy")
        acc_txt = "n/a" if acc is None or not math.isfinite(acc) else f"{acc:.3f}"
        ax.set_title(f"{name}\nloss-MIA acc {acc_txt}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("density")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    flat = np.asarray(y_true) * num_classes + np.asarray(y_pred)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1)


def _mark_classes(ax: Any, names: Iterable[str]) -> None:
    """Tick labels of forgotten classes in bold red."""
    names = set(names)
    for lab in ax.get_xticklabels() + ax.get_yticklabels():
        if lab.get_text() in names:
            lab.set_color("red")
            lab.set_fontweight("bold")


def plot_confusion_matrices(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    num_classes: int,
    path: Path,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
) -> Path:
    """Row-normalised confusion matrices (true class x predicted class), one per model, on one
    colour scale 0..1. ``panels``: (model name, true labels, predicted labels)."""
    names = list(class_names or map(str, range(num_classes)))
    fig = Figure(figsize=(3.3 * len(panels) + 0.9, 3.6), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.82, wspace=0.3)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (name, yt, yp) in zip(axes, panels, strict=True):
        cm = confusion(yt, yp, num_classes).astype(float)
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        ticks = list(range(num_classes)) if num_classes <= 20 else []
        ax.set_xticks(ticks, [names[i] for i in ticks], fontsize=7)
        ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
        _mark_classes(ax, [names[c] for c in forget_classes])
        if num_classes <= 12:
            for i in range(num_classes):
                for j in range(num_classes):
                    if cm[i, j] >= 0.005:
                        ax.text(
                            j,
                            i,
                            f"{cm[i, j]:.2f}".lstrip("0"),
                            ha="center",
                            va="center",
                            fontsize=5,
                            color="white" if cm[i, j] > 0.5 else "black",
                        )
        acc = float((np.asarray(yt) == np.asarray(yp)).mean()) if len(yt) else float("nan")
        ax.set_title(f"{name} (acc {acc:.3f})", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, pad=0.02, label="share of the true class")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_per_class_accuracy(
    accs: dict[str, Sequence[float]],
    path: Path,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
) -> Path:
    """Grouped bars of test accuracy per class, one bar per model (base / unlearned / oracle);
    forgotten classes are shaded."""
    n = max(len(v) for v in accs.values())
    names = list(class_names or map(str, range(n)))
    fig = Figure(figsize=(max(5.0, 0.55 * n + 1.5), 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(accs)
    x = np.arange(n)
    for c in forget_classes:
        ax.axvspan(c - 0.45, c + 0.45, color="#d62728", alpha=0.12, lw=0)
    for k, (name, vals) in enumerate(accs.items()):
        v = np.array([np.nan if a is None else a for a in vals], dtype=float)
        ax.bar(
            x - 0.4 + width * (k + 0.5),
            np.nan_to_num(v),
            width,
            color=ROLE_COLORS.get(name),
            label=ROLE_TITLES.get(name, name),
        )
    ticks = list(range(n)) if n <= 30 else list(range(0, n, max(1, n // 20)))
    ax.set_xticks(ticks, [names[i] for i in ticks], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("class" + (" (forgotten: shaded)" if forget_classes else ""))
    ax.legend(
        fontsize=7, ncols=len(accs), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False
    )
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _fmt(ms: tuple[float, float] | None) -> str:
    if ms is None or ms[0] is None or math.isnan(ms[0]):
        return "–"
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


def summary_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the summary table (mean ± std over seeds)."""
    cols = [c for c, _, _ in COLUMNS] + (["score"] if any("score" in r for r in rows) else [])
    headers = ["experiment", "runs", *cols]
    body = [[str(r["experiment"]), str(r["runs"])] + [_fmt(r.get(c)) for c in cols] for r in rows]
    return headers, body


def plot_summary_table(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """The summary table (``runner.summarize`` rows) drawn as a figure; oracle rows in grey."""
    headers, body = summary_cells(rows)
    if not body:
        body = [["(no finished runs)"] + [""] * (len(headers) - 1)]
    # column widths from the longest text, the figure sized to the table: no empty margins
    chars = [max(len(str(row[k])) for row in [headers, *body]) + 2 for k in range(len(headers))]
    width = 0.065 * sum(chars)
    height = 0.2 * (len(body) + 1) + (0.35 if title else 0.05)
    fig = Figure(figsize=(width, height), dpi=110)
    ax = fig.add_axes((0.005, 0.005, 0.99, (0.2 * (len(body) + 1)) / height - 0.01))
    ax.axis("off")
    table = ax.table(
        cellText=body,
        colLabels=headers,
        cellLoc="center",
        bbox=(0, 0, 1, 1),
        colWidths=[c / sum(chars) for c in chars],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for (r, c), cell in table.get_celld().items():
        cell.set_linewidth(0.4)
        if r == 0:
            cell.set_facecolor("#dde5f0")
            cell.set_text_props(fontweight="bold")
        elif "(oracle)" in body[r - 1][0]:
            cell.set_facecolor("#f2f2f2")
            cell.set_text_props(color="#555555")
        if c == 0 and r > 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.02
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    return _save(fig, path)


def plot_gap_vs_time(results: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Avg. Gap to the oracle (percentage points) against unlearning time, per experiment
    (mean ± std over seeds; faint dots are single seeds), labelled with the experiment's
    number. Lower-left is better."""
    by_exp: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_exp.setdefault(r["experiment"], []).append(r)
    methods = sorted({r["method"] for r in results})
    cmap = matplotlib.colormaps["tab10"]
    color = {m: cmap(i % 10) for i, m in enumerate(methods)}
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for exp, runs in by_exp.items():
        t = np.array([r["times"]["unlearn_time"] for r in runs], dtype=float)
        g = np.array(
            [np.nan if r["gaps"].get("avg_gap") is None else r["gaps"]["avg_gap"] for r in runs],
            dtype=float,
        )
        masked = "+mask" in exp or bool(runs[0].get("mask_kept"))
        c = color[runs[0]["method"]]
        ax.scatter(t, g, color=c, alpha=0.3, s=12, marker="s" if masked else "o")
        ax.errorbar(
            np.nanmean(t),
            np.nanmean(g),
            xerr=np.nanstd(t) if len(t) > 1 else None,
            yerr=np.nanstd(g) if len(g) > 1 else None,
            color=c,
            marker="s" if masked else "o",
            ms=7,
            capsize=2,
            mec="black",
            mew=0.5,
        )
        ax.annotate(
            exp.split("_", 1)[0],
            (np.nanmean(t), np.nanmean(g)),
            fontsize=6,
            xytext=(4, 3),
            textcoords="offset points",
        )
    handles = [ax.scatter([], [], color=color[m], label=m) for m in methods]
    handles += [
        ax.scatter(
            [], [], color="white", edgecolors="black", marker="s", label="with saliency mask"
        )
    ]
    ax.legend(handles=handles, fontsize=7)
    ax.set_xlabel("unlearning time (s)")
    ax.set_ylabel("Avg. Gap to oracle (pp)")
    times = [r["times"]["unlearn_time"] for r in results if r["times"].get("unlearn_time")]
    if times and max(times) > 30 * min(times):  # a log axis only for wide ranges
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.set_title(title or "Avg. Gap vs run time (lower left is better)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Rebuilding outputs from a run folder


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished run's metrics.json (with ``_dir``), in experiment and seed order."""
    found = []
    for p in sorted((Path(run_dir) / "runs").glob("*/seed*/metrics.json")):
        r = json.loads(p.read_text())
        r["_dir"] = p.parent
        found.append(r)
    found.sort(key=lambda r: (r["experiment"], int(r["seed"])))
    return found


def rebuild_split(raw: Any, meta: dict[str, Any], forget_idx: list[int] | None) -> Split:
    """The split of an unlearned model, from its sidecar and forget-index JSON.

    Class-wise forgetting is rebuilt from the classes (so ``test_forget`` is right); any other
    forget set from the saved indices. The result must reproduce the saved forget set."""
    s = meta.get("split", {})
    spec = s.get("forget", {})
    if spec.get("classes"):
        fs = ForgetSpec(classes=tuple(sorted(spec["classes"])), seed=int(spec.get("seed", 0)))
    elif forget_idx:
        fs = ForgetSpec(indices=tuple(sorted(forget_idx)), seed=int(spec.get("seed", 0)))
    elif spec.get("fraction") is not None:
        fs = ForgetSpec(fraction=float(spec["fraction"]), seed=int(spec.get("seed", 0)))
    else:
        fs = ForgetSpec()
    split = make_split(raw, fs, int(s.get("split_seed", 0)), float(s.get("val_fraction", 0.1)))
    if forget_idx is not None and sorted(split.forget.tolist()) != sorted(forget_idx):
        raise UserError("the rebuilt forget set differs from the saved forget-index file")
    return split


class Evaluator:
    """Loads models and data once and recomputes per-sample outputs of a run folder."""

    def __init__(
        self,
        run_dir: Path,
        device: torch.device | str | None = None,
        data_dir: Path | None = None,
        search: Iterable[Path] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.device = pick_device(str(device) if device is not None else None)
        self.data_dir = data_dir
        self.search = list(search)
        self._data: dict[str, DeviceData] = {}
        self._models: dict[str, nn.Module] = {}
        self._outs: dict[tuple[str, str], dict[str, M.Outputs]] = {}

    def data(self, meta: dict[str, Any]) -> DeviceData:
        key = json.dumps([meta["dataset"], meta.get("dataset_args", {})], sort_keys=True)
        if key not in self._data:
            cfg = TrainConfig(dataset=meta["dataset"], dataset_args=meta.get("dataset_args", {}))
            self._data[key] = DeviceData(load_data(cfg, self.data_dir), self.device)
        return self._data[key]

    def model(self, stem: Path) -> nn.Module:
        key = checkpoint_key(stem)
        if key not in self._models:
            self._models[key] = load_checkpoint(stem, self.device)[0].eval()
        return self._models[key]

    def paths(self, r: dict[str, Any]) -> dict[str, Path | None]:
        return {
            "unlearned": r["_dir"] / "model",
            "base": resolve_checkpoint(r.get("base_checkpoint"), self.run_dir, self.search),
            "oracle": resolve_checkpoint(r.get("oracle_checkpoint"), self.run_dir, self.search),
        }

    def outputs(self, r: dict[str, Any]) -> tuple[dict[str, dict[str, M.Outputs]], DeviceData]:
        """Outputs on forget, test and test_forget of each model of the run that can be found."""
        meta = read_meta(r["_dir"] / "model")
        data = self.data(meta)
        try:
            forget_idx = forget_indices_of(r["_dir"] / "model")
        except (OSError, json.JSONDecodeError):
            forget_idx = None
        split = rebuild_split(data.raw, meta, forget_idx)
        skey = str(r.get("forget", {}).get("sha256")) + str(split.spec.classes)
        result: dict[str, dict[str, M.Outputs]] = {}
        for role, stem in self.paths(r).items():
            if stem is None:
                print(
                    f"warning: {r['_dir']}: {role} checkpoint not found; left out", file=sys.stderr
                )
                continue
            key = (checkpoint_key(stem), skey)
            if key not in self._outs:
                model = self.model(stem)
                outs = {}
                for name in ("forget", "test", "test_forget"):
                    src = "test" if name.startswith("test") else "train"
                    idx = getattr(split, name)
                    outs[name] = M.collect_outputs(model, data.batches(idx, EVAL_BATCH, source=src))
                self._outs[key] = outs
            result[role] = self._outs[key]
        return result, data


def run_plots(ev: Evaluator, r: dict[str, Any], out: Path) -> list[Plot]:
    """Loss histograms, confusion matrices and per-class accuracy of one run."""
    outs, data = ev.outputs(r)
    exp, seed = r["experiment"], int(r["seed"])
    d = out / exp / f"seed{seed}"
    label = f"{exp}, seed {seed}"
    nc = data.num_classes
    names = data.raw.classes
    fc = list(r.get("forget", {}).get("classes") or [])
    roles = [k for k in ROLES if k in outs]
    section = f"{exp} (seed {seed})"

    hist = []
    for role in roles:
        o = outs[role]
        mia = M.loss_mia(o["forget"], o["test"], seed)["loss_mia_acc"]
        hist.append((ROLE_TITLES[role], o["forget"].losses.numpy(), o["test"].losses.numpy(), mia))
    plots = [
        Plot(
            plot_loss_histograms(hist, d / "loss_hist.png", title=f"Losses: {label}"),
            f"Per-sample cross-entropy of forget (red) and test (blue) samples, {label}. "
            "The loss-MIA accuracy in each title is the NeurIPS 2023 kit's logistic-regression "
            "attack telling forget from test samples by their loss: 0.5 means it cannot.",
            section,
            "Loss distributions",
        )
    ]
    conf, per_class = [], {}
    for role in roles:
        full = M.concat_outputs(outs[role]["test"], outs[role]["test_forget"])
        conf.append((ROLE_TITLES[role], full.labels.numpy(), full.preds.numpy()))
        per_class[role] = M.per_class_accuracy(full, nc)
    plots.append(
        Plot(
            plot_confusion_matrices(
                conf,
                nc,
                d / "confusion.png",
                title=f"Test set: {label}",
                class_names=names,
                forget_classes=fc,
            ),
            f"Row-normalised confusion matrices on the whole test set, {label}"
            + (f"; forgotten class(es) {', '.join(map(str, fc))} in red." if fc else "."),
            section,
            "Confusion matrices",
        )
    )
    plots.append(
        Plot(
            plot_per_class_accuracy(
                per_class,
                d / "per_class_acc.png",
                title=f"Per-class test accuracy: {label}",
                class_names=names,
                forget_classes=fc,
            ),
            f"Test accuracy per class of base, unlearned and retrain-oracle models, {label}.",
            section,
            "Per-class accuracy",
        )
    )
    return plots


def make_run_plots(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    device: torch.device | str | None = None,
    data_dir: Path | None = None,
    search: Iterable[Path] = (),
    quiet: bool = False,
) -> list[Plot]:
    """Every evaluation plot of a run folder (default ``<run>/plots``); returns them in order:
    summary table, gap vs time, then per run loss histograms, confusion, per-class bars."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    if not results:
        raise UserError(f"{run_dir}: no finished runs (runs/*/seed*/metrics.json) found")
    out = Path(out) if out is not None else run_dir / "plots"
    order = sorted({r["experiment"] for r in results})
    rows = summarize(results, order)
    plots = [
        Plot(
            plot_summary_table(rows, out / "summary_table.png"),
            "Mean ± std over seeds of each experiment; the retrain oracle's numbers below it.",
            "Summary",
            "Summary table",
        ),
        Plot(
            plot_gap_vs_time(results, out / "gap_vs_time.png"),
            "Avg. Gap to the retrain oracle (mean |difference| of UA, RA, TA and MIA-Efficacy, "
            "percentage points) against unlearning wall time, one point per experiment, labelled "
            "with its number; squares used the saliency mask.",
            "Summary",
            "Avg. Gap vs run time",
        ),
    ]
    ev = Evaluator(run_dir, device, data_dir, search)
    for r in tqdm(results, desc="plots", unit="run", disable=quiet or None):
        plots += run_plots(ev, r, out)
    return plots


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", type=Path, nargs="+", help="run folder(s) made by main.py")
    p.add_argument("--out", type=Path, default=None, help="default: <run>/plots")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ./data")
    p.add_argument(
        "--checkpoints",
        type=Path,
        action="append",
        default=[],
        help="where to look for base/oracle checkpoints",
    )
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for run in args.run:
        out = (args.out / run.name if len(args.run) > 1 else args.out) if args.out else None
        plots = make_run_plots(
            run,
            out,
            device=args.device,
            data_dir=args.data_dir,
            search=args.checkpoints + [Path("checkpoints")],
        )
        print(f"{run}: {len(plots)} plots in {plots[0].path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
