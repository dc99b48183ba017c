"""Evaluation figures of a run folder: what the unlearning did to losses, predictions and classes.

    python plots.py output/20250101-120000_quickstart [--out DIR] [--fig-format pdf,png,svg]

Every figure is drawn from what the run saved: ``metrics.json``, the run's per-sample outputs
(``outputs.safetensors``) and the base model's and oracle's whole-pool outputs saved with their
checkpoints (``outputs/<stem>.safetensors`` in the checkpoint's folder), selected by the run's
indices (``running/results.py``). No model is loaded and nothing is recomputed. Written under
``<run>/plots/`` (or ``--out``), each as PDF, SVG and a 200 dpi PNG (``analysis/style.py``):

* ``paper/``: the cross-experiment figures of ``analysis/figures.py`` (Avg. Gap vs cost, metrics
  vs oracle, per-class accuracy vs oracle); the report adds the ``confusion`` figure of the
  experiment with the smallest Avg. Gap.
* ``<experiment>/``: the experiment over all its seeds: ``loss_hist`` (per-sample cross-entropy of
  forget vs test samples for base, unlearned and oracle, pooled over seeds; titles give the
  loss-MIA accuracy, ``metrics.loss_mia``, the NeurIPS 2023 starting kit's attack: 0.5 = forget
  and test samples look alike), ``confusion`` (confusion matrices on the whole test set, counts
  pooled over seeds, in percent of the true class) and ``per_class`` (per-class test accuracy
  of base and unlearned minus the oracle's, means and 95% t-intervals over seeds).
  With a many-model evaluation (``"evaluate": {"models": N}``) also ``epsilon_hist`` and
  ``epsilon_hardest``: the per-example epsilon of the NeurIPS 2023 competition and the
  confidences of the hardest examples, read from ``runs/<experiment>/epsilon/``
  (``analysis/epsilon_plots.py``).
* ``<experiment>/seed<k>/``: the same three figures for each seed alone.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Rectangle
from tqdm.auto import tqdm

import metrics as M
from analysis import figures as FG
from analysis import style
from analysis.epsilon_plots import attach_scores, experiment_epsilon_plots
from analysis.features import resolve_checkpoint
from analysis.figures import Experiment, mean_ci
from analysis.style import ROLE_TITLES, ROLES, Plot
from core.cli_options import (
    add_checkpoints,
    add_data_dir,
    add_device,
    add_fig_format,
    add_out,
    new_parser,
)
from core.errors import UserError, cli
from running.results import (
    OUTPUTS_FILE,
    RunResult,
    load_outputs,
    load_reference,
    reference_path,
    select_splits,
)
from training.outputs import Outputs

__all__ = ["Plot", "load_results", "make_run_plots"]

CELL_TEXT_MAX_CLASSES = 12  # numbers in the cells stay >= 8 pt up to this many classes
HIDE_BELOW_PCT = 0.5  # confusion cells that round to 0% stay empty


# ---------------------------------------------------------------------------------------------
# Plot functions: arrays in, figure files out


@style.styled
def plot_loss_histograms(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray, str]], path: Path
) -> dict[str, Path]:
    """Per-sample loss histograms, forget vs test, one panel per model.

    ``panels``: (model name, forget losses, test losses, loss-MIA text). Bins are logarithmic
    and shared by all panels (losses span many orders of magnitude)."""
    allv = np.concatenate([np.concatenate([f, t]) for _, f, t, _ in panels] + [np.ones(1)])
    allv = allv[np.isfinite(allv)]
    lo = math.log10(max(float(allv.min()), 1e-7))
    hi = max(math.log10(max(float(allv.max()), 1e-7)), lo + 1)
    bins = np.linspace(lo, hi, 41)
    # log10 of the loss on a linear axis: the same picture as a log axis, at a fraction of the cost
    ticks = np.arange(math.ceil(lo), math.floor(hi) + 1)
    if len(ticks) > 5:
        ticks = ticks[:: math.ceil(len(ticks) / 5)]
    fig = style.figure(style.DOUBLE if len(panels) > 1 else style.SINGLE, 2.3)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (name, f, t, mia) in zip(axes, panels, strict=True):
        for vals, color, what in ((t, style.TEST_COLOR, "test"), (f, style.FORGET_COLOR, "forget")):
            v = np.log10(np.clip(vals[np.isfinite(vals)], 10**lo, 10**hi))
            ax.hist(v, bins=bins, density=True, histtype="stepfilled", alpha=0.55, color=color,
                    label=f"{what} samples")  # fmt: skip
        ax.set_xticks(ticks, [f"$10^{{{int(k)}}}$" for k in ticks])
        ax.set_xlabel("per-sample cross-entropy")
        ax.set_title(f"{name}\nloss-MIA accuracy {mia}")
    axes[0].set_ylabel("density")
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="outside upper center", ncols=2)
    return style.save_figure(fig, path)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    flat = np.asarray(y_true) * num_classes + np.asarray(y_pred)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1)


def accuracy_without(counts: np.ndarray, forget_classes: Sequence[int]) -> float:
    """Accuracy over the rows (true classes) not forgotten: the table's test accuracy."""
    keep = [c for c in range(len(counts)) if c not in set(forget_classes)]
    total = counts[keep].sum()
    return float(np.trace(counts[np.ix_(keep, keep)]) / total) if total else math.nan


def covered(forget_classes: Sequence[int], names: Sequence[str]) -> str:
    if not forget_classes:
        return "all classes"
    return "classes ≠ " + ", ".join(str(names[c]) for c in forget_classes)


@style.styled
def plot_confusion_matrices(
    panels: Sequence[tuple[str, np.ndarray]],
    path: Path,
    *,
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
) -> dict[str, Path]:
    """Confusion matrices (true class x predicted class) in percent of the true class, one per
    model, on one colour scale; ``panels``: (model name, counts [C, C]). Cells below 0.5% stay
    empty; each title gives the accuracy over the classes the table's TA covers."""
    nc = len(panels[0][1])
    names = list(class_names or map(str, range(nc)))
    fig = style.figure(style.DOUBLE, 2.75)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    ticks = list(range(nc)) if nc <= 20 else list(range(0, nc, math.ceil(nc / 10)))
    for ax, (name, counts) in zip(axes, panels, strict=True):
        pct = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(pct, vmin=0, vmax=100, cmap="Blues")
        ax.set_xticks(ticks, [names[i] for i in ticks])
        ax.set_yticks(ticks, [names[i] for i in ticks])
        ax.tick_params(length=0)
        ax.spines[:].set_visible(False)
        for lab in ax.get_xticklabels() + ax.get_yticklabels():
            if lab.get_text() in {names[c] for c in forget_classes}:
                lab.set_color(style.FORGET_COLOR)
                lab.set_fontweight("bold")
        for c in forget_classes:  # the forgotten class's row: where its test images went
            ax.add_patch(Rectangle((-0.5, c - 0.5), nc, 1, fill=False,
                                   ec=style.FORGET_COLOR, lw=1.2))  # fmt: skip
        if nc <= CELL_TEXT_MAX_CLASSES:
            for i in range(nc):
                for j in range(nc):
                    if pct[i, j] >= HIDE_BELOW_PCT:
                        ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center", fontsize=8,
                                color="white" if pct[i, j] > 55 else "black")  # fmt: skip
        acc = accuracy_without(counts, forget_classes)
        ax.set_title(f"{name}\nTA {100 * acc:.1f}% ({covered(forget_classes, names)})")
        ax.set_xlabel("predicted class")
    axes[0].set_ylabel("true class")
    return style.save_figure(fig, path)


@style.styled
def plot_per_class(e: Experiment, path: Path, class_names: Sequence[str]) -> dict[str, Path]:
    """Per-class test accuracy of base and unlearned minus the oracle's (pp), with 95%
    intervals over the experiment's seeds; the forgotten class(es) on their own scale."""
    fc = e.forget_classes
    fig = style.figure(style.SINGLE, 2.4)
    if fc:
        # the forgotten panel wide enough for its label
        ax_k, ax_f = fig.subplots(1, 2, width_ratios=[max(1, len(class_names) - len(fc)),
                                                      max(2.4, 1.2 * len(fc))])  # fmt: skip
    else:
        ax_k, ax_f = fig.add_subplot(), None
    color, _ = style.method_style(e.method)
    series = [
        ("base", FG.per_class_differences(e, "base"),
         {"marker": style.ROLE_MARKERS["base"], "color": style.ROLE_COLORS["base"], "ms": 3.5,
          "ls": "none"}),
        ("unlearned", FG.per_class_differences(e),
         {"marker": style.ROLE_MARKERS["unlearned"], "color": style.ROLE_COLORS["unlearned"],
          "ms": 4, "ls": "none"}),
    ]  # fmt: skip
    FG.draw_class_points((ax_k, ax_f), series, fc, class_names)
    ax_k.set_ylabel("accuracy − oracle (pp)")
    handles, texts = ax_k.get_legend_handles_labels()
    fig.legend(handles, texts, loc="outside upper center", ncols=2)
    return style.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Reading what a run saved


def load_results(run_dir: Path) -> list[RunResult]:
    """Every finished run's metrics.json (``run_dir`` set), in experiment and seed order, with
    its experiment's many-model scores (eps score, U-LiRA) in ``extra``."""
    found = [
        RunResult.read(p) for p in sorted((Path(run_dir) / "runs").glob("*/seed*/metrics.json"))
    ]
    found.sort(key=lambda r: (r.experiment, int(r.seed)))
    return attach_scores(Path(run_dir), found)


def has_reference(stem: Path) -> bool:
    return reference_path(stem).is_file()


class Evaluator:
    """The per-sample outputs of a run folder's runs, read from disk: each run's own, and its
    base model's and oracle's, selected from their whole-pool outputs by the run's indices
    (with the run's labels, so class replacement scores as the run did)."""

    def __init__(self, run_dir: Path, search: Iterable[Path] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.search = list(search)
        self._refs: dict[Path, dict[str, Outputs]] = {}

    def reference(self, ref: str) -> dict[str, Outputs] | None:
        """Whole-pool and test-set outputs of the checkpoint `ref`, if they can be found."""
        stem = resolve_checkpoint(ref, self.run_dir, self.search, exists=has_reference)
        if stem is None:
            return None
        path = reference_path(stem)
        if path not in self._refs:
            self._refs[path] = load_reference(path)[0]
        return self._refs[path]

    def outputs(self, r: RunResult) -> tuple[dict[str, dict[str, Outputs]], dict[str, Any]]:
        """Outputs per model (base, unlearned, oracle: those found) and split, and what the
        run's outputs file says about the data (``num_classes``, ``classes``)."""
        if r.run_dir is None:
            raise UserError(f"{r.experiment} seed {r.seed}: not read from a run folder")
        own, meta = load_outputs(r.run_dir / OUTPUTS_FILE)
        found = {"unlearned": own}
        idx = {n: o.indices for n, o in own.items()}
        labels = {n: o.labels for n, o in own.items()}
        for role, ref in (("base", r.base_checkpoint), ("oracle", r.oracle_checkpoint)):
            whole = self.reference(ref)
            if whole is None:
                print(f"warning: {r.run_dir}: outputs of the {role} checkpoint {ref} not "
                      "found; left out", file=sys.stderr)  # fmt: skip
                continue
            found[role] = select_splits(whole, idx, labels)
        return {k: found[k] for k in ROLES if k in found}, meta


# ---------------------------------------------------------------------------------------------
# The figures of one experiment


class SeedData:
    """What the figures of one run need from its outputs: losses, confusion counts, loss-MIA."""

    def __init__(self, r: RunResult, outs: dict[str, dict[str, Outputs]], nc: int) -> None:
        self.run = r
        self.roles = list(outs)
        self.forget = {k: o["forget"].losses.numpy() for k, o in outs.items()}
        self.test = {k: o["test"].losses.numpy() for k, o in outs.items()}
        # the loss-MIA the run computed (metrics.json), else computed here from the outputs
        saved = {"unlearned": r.metrics, "base": r.base, "oracle": r.oracle}
        self.mia = {}
        for k, o in outs.items():
            v = saved[k].get("loss_mia_acc")
            self.mia[k] = v if isinstance(v, (int, float)) else (
                M.loss_mia(o["forget"], o["test"], int(r.seed))["loss_mia_acc"])  # fmt: skip
        self.counts = {}
        for k, o in outs.items():
            full = M.concat_outputs(o["test"], o.get("test_forget"))
            self.counts[k] = confusion(full.labels.numpy(), full.preds.numpy(), nc)


def _seeds_text(n: int) -> str:
    return f"pooled over {n} seeds" if n > 1 else "one seed"


def experiment_plots(
    e: Experiment, data: list[SeedData], names: list[str], out: Path
) -> tuple[list[Plot], list[Plot]]:
    """The experiment's figures over all its seeds, and each seed's alone."""
    fc = e.forget_classes
    forgotten = (f"; forgotten class(es) {', '.join(names[c] for c in fc)} outlined"
                 if fc else "")  # fmt: skip

    def group(rows: list[SeedData], d: Path, seed: int | None) -> list[Plot]:
        roles = [k for k in ROLES if all(k in s.roles for s in rows)]
        where = "this seed" if seed is not None else _seeds_text(len(rows))
        hist = []
        for k in roles:
            f = np.concatenate([s.forget[k] for s in rows])
            t = np.concatenate([s.test[k] for s in rows])
            hist.append((ROLE_TITLES[k], f, t, mean_ci([s.mia[k] for s in rows]).text(1, 3)))
        plots = [
            Plot(style.primary(files := plot_loss_histograms(hist, d / "loss_hist")), (
                f"Per-sample cross-entropy of forget (vermillion) and test (blue) samples, {where}. "
                "The loss-MIA accuracy (mean ± 95% t-interval over seeds) is the NeurIPS 2023 "
                "kit's logistic-regression attack telling forget from test samples by their loss: "
                "0.5 means it cannot."), "", "Loss distributions", files, e.name, seed),
        ]  # fmt: skip
        counts = [(ROLE_TITLES[k], np.sum([s.counts[k] for s in rows], axis=0)) for k in roles]
        files = plot_confusion_matrices(counts, d / "confusion", class_names=names,
                                        forget_classes=fc)  # fmt: skip
        plots.append(Plot(style.primary(files), (
            f"Confusion matrices on the whole test set ({where}), in percent of each true class "
            f"(rows sum to 100; cells below {HIDE_BELOW_PCT}% left empty){forgotten}. TA in the "
            "titles is the accuracy over the classes the summary table's test accuracy covers."),
            "", "Confusion matrices", files, e.name, seed))  # fmt: skip
        sub = Experiment(e.name, [s.run for s in rows])
        files = plot_per_class(sub, d / "per_class", names)
        plots.append(Plot(style.primary(files), (
            "Test accuracy per class minus the retrain oracle's (green line), in percentage "
            "points, of the base model (grey squares) and the unlearned model (blue dots)"
            + (", 95% t-intervals over seeds" if len(rows) > 1 else "")
            + ("; the forgotten class(es) on their own scale at the right." if fc else ".")),
            "", "Per-class accuracy vs oracle", files, e.name, seed))  # fmt: skip
        return plots

    overall = group(data, out / e.name, None)
    per_seed = [p for s in data for p in group([s], out / e.name / f"seed{s.run.seed}", s.run.seed)]
    return overall, per_seed


def make_run_plots(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    search: Iterable[Path] = (),
    quiet: bool = False,
) -> list[Plot]:
    """Every evaluation figure of a run folder (default ``<run>/plots``), in report order: the
    paper figures, then per experiment its figures over seeds, then per seed.
    `search`: folders to look in for the base and oracle outputs (as for checkpoints)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    if not results:
        raise UserError(f"{run_dir}: no finished runs (runs/*/seed*/metrics.json) found")
    out = Path(out) if out is not None else run_dir / "plots"
    ev = Evaluator(run_dir, search)
    exps = FG.experiments(results)
    data: dict[str, list[SeedData]] = {}
    names: list[str] = []
    for r in tqdm(results, desc="outputs", unit="run", disable=quiet or None):
        outs, info = ev.outputs(r)
        nc = int(info["num_classes"])
        names = [str(c) for c in info.get("classes") or range(nc)]
        data.setdefault(r.experiment, []).append(SeedData(r, outs, nc))
    paper = FG.paper_plots(results, out / "paper", names)
    best = FG.best(exps)
    rest: list[Plot] = []
    for e in tqdm(exps, desc="figures", unit="experiment", disable=quiet or None):
        overall, per_seed = experiment_plots(e, data[e.name], names, out)
        rest += overall + experiment_epsilon_plots(run_dir, e.name, out / e.name) + per_seed
        if e.name == best.name:
            conf = next(p for p in overall if p.title == "Confusion matrices")
            paper.append(Plot(conf.path, (
                f"Confusion matrices of {e.name}, the experiment with the smallest mean Avg. Gap"
                f"{' among the class-wise ones' if e.kind == 'class-wise' else ''}: "
                + conf.caption[0].lower() + conf.caption[1:]), "paper",
                "Confusion matrices (best experiment)", conf.files))  # fmt: skip
    return paper + rest


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("run", type=Path, nargs="+", help="run folder(s) made by main.py")
    add_out(p, "default: <run>/plots")
    add_fig_format(p)
    add_device(p)
    add_data_dir(p)
    add_checkpoints(p, search=True)
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for run in args.run:
        out = (args.out / run.name if len(args.run) > 1 else args.out) if args.out else None
        # --device and --data-dir stay accepted; the figures read saved outputs and need neither
        with style.formats(args.fig_format):
            plots = make_run_plots(run, out, search=args.checkpoints + [Path("checkpoints")])
        print(f"{run}: {len(plots)} figures in {plots[0].path.parent.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
