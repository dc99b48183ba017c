"""A results section for a run folder: ``report.html``, ``report.md`` and ``report.pdf``.

    python report.py output/20250101-120000_quickstart [--tsne] [--fig-format pdf,png,svg]
    python main.py -L exp/quickstart.json --report      # the same, at the end of the runs

The report opens with a setup paragraph and the summary table, then the paper figures
(``analysis/figures.py``: Avg. Gap vs cost, metrics vs oracle, per-class accuracy vs oracle, and
the confusion matrices of the best experiment), then one section per experiment with its figures
aggregated over seeds (means and 95% t-intervals; ``analysis/plots.py``; with a many-model
evaluation also the per-example epsilon histogram and the hardest examples' confidences,
``analysis/epsilon_plots.py``), the class x class
sliced-Wasserstein maps of its penultimate features (``analysis/wasserstein.py``; features kept
in ``<run>/features/``), optionally side-by-side t-SNE maps (``--tsne``), a computed reading
guide, and each seed's figures folded away (``<details>``); then the configuration, seeds and
software versions. Figures are files under ``<run>/plots/`` (PDF, SVG and a 200 dpi PNG each,
``--fig-format``); the HTML shows the SVGs (else the PNGs) by relative path, so keep it with its
``plots/`` folder. ``report.pdf`` is printed from the HTML by headless Chromium when one is
installed (``chromium``, ``chromium-browser``, ``google-chrome``); without one it is skipped.

With a W&B mode other than ``disabled`` the same figures are logged as W&B images (the PNGs:
W&B shows raster images), to the active run or to a new ``<run>_report`` run; failing to log
never fails the report.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis import style
from analysis import tsne as T
from analysis import wasserstein as W
from analysis.features import FeatureSet, extract_features, load_index
from analysis.figures import Experiment, cost_axis, experiments, forgetting_kind, mean_ci
from analysis.plots import Plot, load_results, make_run_plots
from core.cli_options import (
    FIG_FORMATS,
    add_data_dir,
    add_device,
    add_fig_format,
    add_samples,
    new_parser,
)
from core.errors import UserError, cli
from core.io import atomic_path, atomic_write_text, dumps
from datasets import pick_device
from running.tables import markdown_table, summarize, table_cells
from running.wandb_log import MODES, log_images
from training.checkpoints import versions as library_versions

DEFAULT_FEATURE_SAMPLES = 1000
DEFAULT_TSNE_SAMPLES = 500
# the summary table's columns shown first; the others are folded below it
MAIN_COLUMNS = ("runs", "forget acc", "retain acc", "test acc", "MIA eff.", "avg gap",
                "eps score", "passes/oracle", "time/oracle", "score")  # fmt: skip
EPS_SUMMARY = (
    " eps score (in %) = F × RA_u/RA_r × TA_u/TA_r, the NeurIPS 2023 unlearning competition's "
    "score of N unlearned against N retrained models (F: forgetting quality from per-example "
    "epsilon; see each experiment's epsilon figures), one number per experiment."
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SCREEN_PX_PER_IN = 120  # figures on screen at 1.25x their printed size (96 px per inch)


@dataclass
class Block:
    """One piece of the report, rendered to both Markdown and HTML."""

    kind: str  # h1, h2, h3, p, table, figure, pre, toc, open (a <details>), close
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    plot: Plot | None = None
    anchor: str = ""
    lazy: bool = False  # a figure inside folded details: loaded when opened


def versions() -> dict[str, str]:
    """Versions of Python and of every library the results depend on, plus the platform."""
    import matplotlib

    return library_versions() | {
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Feature-space figures


@dataclass
class FeatureFigures:
    """Feature-space figures per experiment (over its seeds) and per (experiment, seed), and
    the reading guide of each experiment."""

    overall: dict[str, list[Plot]] = field(default_factory=dict)
    seeds: dict[tuple[str, int], list[Plot]] = field(default_factory=dict)
    guide: dict[str, str] = field(default_factory=dict)


def _run_of(entry: dict[str, Any]) -> tuple[str, int] | None:
    """(experiment, seed) of an unlearned model's feature file ``runs/<exp>/seed<k>/...``."""
    parts = Path(entry["file"]).parts
    if len(parts) >= 3 and parts[0] == "runs" and re.fullmatch(r"seed\d+", parts[2]):
        return parts[1], int(parts[2][4:])
    return None


W_CAPTION = (
    "Sliced Wasserstein-2 distances between the penultimate-feature clouds of every pair of "
    "classes (Bonneel et al. 2015; 256 seeded directions, exact 1-D terms), {where}. Top: base, "
    "unlearned and retrain oracle on one colour scale (0 to the largest base/oracle entry). "
    "Bottom: the changes unlearned − base and unlearned − oracle on their own symmetric scale "
    "(red: classes moved apart, blue: closer). Forgotten class(es) in vermillion."
)
T_CAPTION = (
    "t-SNE maps (van der Maaten & Hinton 2008) of the penultimate features of the same "
    "{n} training-pool samples under base, unlearned and retrain-oracle models{where}, coloured "
    "by class, the unlearned model's forget samples as vermillion crosses; the unlearned and "
    "oracle maps are rotated onto the base map. Under each title the separation of the forget "
    "samples (silhouette in feature space)."
)


def separations(e: dict[str, Any], info: dict[str, FeatureSet]) -> dict[str, float]:
    """Separation of the unlearned model's forget samples under base, unlearned and oracle."""
    forget = info[e["file"]].forget
    files = {"base": e.get("base"), "unlearned": e["file"], "oracle": e.get("oracle")}
    return {k: T.separation(info[f].features, forget) for k, f in files.items() if f in info}


def mean_trio(
    group: Sequence[dict[str, Any]], mats: dict[str, np.ndarray]
) -> dict[str, np.ndarray | None]:
    """Base, unlearned and oracle matrices averaged over the seeds of an experiment."""
    out: dict[str, np.ndarray | None] = {}
    for k in ("base", "unlearned", "oracle"):
        found = [m for e in group if (m := W.trio(e, mats)[k]) is not None]
        out[k] = np.mean(np.stack(found), axis=0) if len(found) == len(group) else None
    return out


def feature_figures(
    run_dir: Path,
    *,
    device: torch.device | str | None,
    data_dir: Path | None,
    samples: int,
    tsne: bool,
    tsne_samples: int,
    quiet: bool,
) -> FeatureFigures:
    """Sliced-Wasserstein maps (and t-SNE maps with `tsne`) of every unlearned model next to
    its base and oracle, per seed and averaged over the seeds of its experiment."""
    feats = run_dir / "features"
    extract_features(run_dir, feats, samples=samples, device=device, data_dir=data_dir,
                     search=[Path("checkpoints")], quiet=quiet)  # fmt: skip
    entries = load_index(feats)
    mats, info = W.compute_matrices(feats, entries, quiet=quiet)
    W.write_matrices(run_dir / "plots" / "wasserstein.json", mats, n_proj=W.DEFAULT_PROJECTIONS,
                     seed=0, samples=samples)  # fmt: skip
    vmax = W.scales(entries, mats)
    out = run_dir / "plots"
    runs: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for e in entries:
        found = _run_of(e) if e["role"] == "unlearned" else None
        if found is not None and (e.get("base") in mats or e.get("oracle") in mats):
            runs.setdefault(found[0], []).append((found[1], e))
    maps: dict[str, tuple[FeatureSet, np.ndarray]] = {}
    if tsne:
        files = [f for group in runs.values() for _, e in group
                 for f in (e.get("base"), e["file"], e.get("oracle")) if f]  # fmt: skip
        maps = T.embed_models(feats, list(dict.fromkeys(files)), samples=tsne_samples, seed=0,
                              max_iter=T.DEFAULT_ITER, quiet=quiet)  # fmt: skip
    result = FeatureFigures()
    for exp, group in sorted(runs.items()):
        group.sort(key=lambda p: p[0])
        fs0 = info[group[0][1]["file"]]
        names, fc = fs0.class_names, fs0.meta.get("forget_classes") or []
        scores: dict[str, list[float]] = {}
        for seed, e in group:
            d = out / exp / f"seed{seed}"
            sep = separations(e, info)
            for k, v in sep.items():
                scores.setdefault(k, []).append(v)
            fw = W.plot_compare(W.trio(e, mats), d / "wasserstein", vmax=vmax[e["file"]],
                                class_names=names, forget_classes=fc)  # fmt: skip
            plots = [Plot(style.primary(fw), W_CAPTION.format(where="this seed"), "",
                          "Feature-space distances", fw, exp, seed)]  # fmt: skip
            if tsne:
                fs, _ = maps[e["file"]]
                panels = [(role, maps[f][1]) for role, f in T.compare_panels(e, maps)]
                ft = T.plot_tsne_compare(panels, fs.labels, fs.forget, d / "tsne",
                                         class_names=names, forget_classes=fc, scores=sep)  # fmt: skip
                caption = T_CAPTION.format(n=len(fs.labels), where=", this seed")
                plots.append(Plot(style.primary(ft), caption, "", "t-SNE of features", ft, exp,
                                  seed))  # fmt: skip
            result.seeds[(exp, seed)] = plots
        n = len(group)
        fw = W.plot_compare(mean_trio([e for _, e in group], mats), out / exp / "wasserstein",
                            vmax=vmax[group[0][1]["file"]], class_names=names, forget_classes=fc)  # fmt: skip
        where = f"averaged over {n} seeds" if n > 1 else "one seed"
        result.overall[exp] = [Plot(style.primary(fw), W_CAPTION.format(where=where), "",
                                    "Feature-space distances", fw, exp)]  # fmt: skip
        result.guide[exp] = T.reading_guide({k: mean_ci(v) for k, v in scores.items()})
        if tsne:  # the first seed's maps, with the guide over all seeds
            first = result.seeds[(exp, group[0][0])][-1]
            caption = T_CAPTION.format(n=len(maps[group[0][1]["file"]][0].labels),
                                       where=f" (seed {group[0][0]})")  # fmt: skip
            result.overall[exp].append(Plot(first.path, caption + " " + result.guide[exp], "",
                                            "t-SNE of features", first.files, exp))  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------
# Content


def _forget_text(f: dict[str, Any]) -> str:
    if f.get("replace"):
        return f"class replacement {f['replace']} ({f.get('n', '?')} samples)"
    if f.get("classes"):
        return f"class(es) {', '.join(map(str, f['classes']))} ({f.get('n', '?')} samples)"
    if f.get("fraction") is not None:
        return f"random {100 * f['fraction']:g}% of the pool ({f.get('n', '?')} samples)"
    return f"index file {f.get('index_file')} ({f.get('n', '?')} samples)"


def setup_text(config: dict[str, Any], exps: list[Experiment], seeds: list[int]) -> str:
    """Data, model, training recipe, methods, seeds and machine, from config.json."""
    bases: list[str] = []
    for x in config.get("experiments", []):
        c = x.get("checkpoint") if isinstance(x, dict) else None
        if isinstance(c, dict) and c.get("model"):
            t = (f"{c.get('model')} on {c.get('dataset')} (trained {c.get('epochs')} epochs, "
                 f"lr {c.get('lr')}, batch {c.get('batch_size')}, {c.get('schedule')} schedule"
                 f"{', augmented' if c.get('augment') else ''}, seed {c.get('seed')})")  # fmt: skip
            if t not in bases:
                bases.append(t)
    methods = list(dict.fromkeys(e.method for e in exps))
    masked = any(e.masked for e in exps)
    kinds = list(dict.fromkeys(forgetting_kind(e.runs[0]) for e in exps))
    n = len(seeds)
    seed_text = (f"seeds {seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
                 and n > 2 else "seeds " + ", ".join(map(str, seeds)))  # fmt: skip
    machine = [f"device {config['device']}"] if config.get("device") else []
    for key in ("threads", "workers"):
        if config.get(key) is not None:
            machine.append(f"{key} {config[key]}")
    text = (
        f"Base model{'s' if len(bases) > 1 else ''}: {'; '.join(bases) or 'unknown'}. "
        f"{len(exps)} unlearning experiment(s) ({', '.join(kinds)} forgetting) with the methods "
        f"{', '.join(methods)}{', with and without the SalUn saliency mask' if masked else ''}, "
        f"each run {n} time(s) ({seed_text}); every unlearned model is compared with its base "
        "model and with the retrain-from-scratch oracle trained without exactly the same forget "
        "set."
    )
    if machine:
        text += f" Runs on {', '.join(machine)}."
    return text


def experiment_text(e: Experiment) -> str:
    """The experiment's numbers as a sentence: means ± 95% t-intervals over seeds."""
    m, o = (lambda k: e.ci("metrics", k)), (lambda k: e.ci("oracle", k))
    ratio_key = cost_axis(e.runs)[0]
    ratio_what = "sample passes" if ratio_key == "sample_pass_ratio" else "time"
    return (
        f"Method {e.method}{' with the saliency mask' if e.masked else ''}; forget set "
        f"{_forget_text(e.runs[0].forget)}; {len(e.runs)} seed(s), mean ± 95% t-interval. "
        f"Forget acc {m('forget_acc').text(100)}% (oracle {o('forget_acc').text(100)}%), "
        f"retain acc {m('retain_acc').text(100)}% ({o('retain_acc').text(100)}%), "
        f"test acc {m('test_acc').text(100)}% ({o('test_acc').text(100)}%), MIA-Efficacy "
        f"{m('mia_efficacy').text(100)}% ({o('mia_efficacy').text(100)}%); Avg. Gap "
        f"{e.ci('gaps', 'avg_gap').text()} pp; unlearning {e.ci('times', 'unlearn_time').text(1, 1)}"
        f" s, {e.ci('times', ratio_key).text()}× the oracle's training {ratio_what}."
    )


def seed_text(e: Experiment, seed: int) -> str:
    r = next(r for r in e.runs if int(r.seed) == seed)
    g = r.gaps.get("avg_gap")
    return (
        f"Seed {seed}: forget acc {100 * r.metrics['forget_acc']:.2f}%, test acc "
        f"{100 * r.metrics['test_acc']:.2f}%, MIA-Efficacy {100 * r.metrics['mia_efficacy']:.2f}%, "
        f"Avg. Gap {'–' if g is None else f'{g:.2f}'} pp."
    )


def without_empty_columns(headers: list[str], body: list[list[str]]) -> list[list[str]]:
    """The table without the columns no row has a value in (e.g. a metric these runs did not
    record), header first."""
    keep = [k for k in range(len(headers)) if k == 0 or any(r[k] not in ("-", "") for r in body)]
    return [[row[k] for k in keep] for row in [headers, *body]]


def build_blocks(
    run_dir: Path, plots: list[Plot], feats: FeatureFigures, device: str
) -> list[Block]:
    """The report's content, in reading order."""
    results = load_results(run_dir)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    exps = experiments(results)
    rows = summarize(results, [e.name for e in exps])
    seeds = sorted({int(r.seed) for r in results})
    source = Path(str(config.get("source", run_dir.name))).stem
    b: list[Block] = [Block("h1", f"Unlearning results: {source}")]
    b.append(Block("p", setup_text(config, exps, seeds) + f" Run folder {run_dir.name}; report "
                   f"written {datetime.now().isoformat(timespec='seconds')} on {device}."))  # fmt: skip
    toc = Block("toc")
    b.append(toc)
    b.append(Block("h2", "Summary", anchor="summary"))
    b.append(Block("p", (
        "Accuracies and MIA-Efficacy in percent (SalUn, Fan et al. 2024: UA = 1 − forget acc, "
        "RA = retain acc, TA = test acc, on the test set without the forgotten classes), Avg. "
        "Gap = mean absolute difference to the oracle of UA, RA, TA and MIA-Efficacy in "
        "percentage points, times in seconds; mean ± standard deviation over seeds (the "
        "figures give 95% t-intervals). Below each experiment, its retrain oracle."
        + (EPS_SUMMARY if any("eps_score" in r.extra for r in results) else ""))))  # fmt: skip
    table = without_empty_columns(*table_cells(rows))
    main = [k for k, h in enumerate(table[0]) if k == 0 or h in MAIN_COLUMNS]
    more = [0] + [k for k in range(1, len(table[0])) if k not in main]
    b.append(Block("table", rows=[[row[k] for k in main] for row in table]))
    if len(more) > 1:
        b.append(Block("open", "More columns: " + ", ".join(table[0][k] for k in more[1:])))
        b.append(Block("table", rows=[[row[k] for k in more] for row in table]))
        b.append(Block("close"))
    number = 0

    def figure(p: Plot, lazy: bool = False, numbered: bool = True) -> Block:
        nonlocal number
        if numbered:
            number += 1
            return Block("figure", f"Figure {number}. {p.caption}", plot=p, lazy=lazy)
        return Block("figure", f"{p.title}. {p.caption}", plot=p, lazy=lazy)

    b.append(Block("h2", "Paper figures", anchor="figures"))
    b += [figure(p) for p in plots if not p.experiment]
    b.append(Block("h2", "Experiments", anchor="experiments"))
    for e in exps:
        b.append(Block("h3", e.name, anchor="exp-" + slug(e.name)))
        b.append(Block("p", experiment_text(e)))
        if feats.guide.get(e.name):
            b.append(Block("p", feats.guide[e.name]))
        b += [figure(p) for p in plots if p.experiment == e.name and p.seed is None]
        b += [figure(p) for p in feats.overall.get(e.name, [])]
        seeds_e = [int(r.seed) for r in e.runs]
        b.append(Block("open", f"Figures of each seed ({', '.join(map(str, seeds_e))})"))
        for s in seeds_e:
            b.append(Block("p", seed_text(e, s)))
            b += [figure(p, lazy=True, numbered=False) for p in plots
                  if p.experiment == e.name and p.seed == s]  # fmt: skip
            b += [figure(p, lazy=True, numbered=False) for p in feats.seeds.get((e.name, s), [])]
        b.append(Block("close"))
    b.append(Block("h2", "Configuration", anchor="configuration"))
    b.append(Block("p", (
        f"{config.get('nexp', '?')} run(s) per experiment with seeds {config.get('seed', '?')} + "
        "i. Each run seeds the unlearning method and, for a random forget set, its draw; the "
        "split (validation set) comes from the base checkpoint's split seed. Feature samples, "
        "t-SNE and sliced-Wasserstein directions use seed 0.")))  # fmt: skip
    b.append(Block("open", "The experiments as validated by main.py (config.json)"))
    b.append(Block("pre", dumps(config)))
    b.append(Block("close"))
    seed_rows = [["experiment", "seeds", "forget set", "base checkpoint", "oracle checkpoint"]]
    for e in exps:
        seed_rows.append([
            e.name, ", ".join(str(r.seed) for r in e.runs), _forget_text(e.runs[0].forget),
            Path(e.runs[0].base_checkpoint).name,
            ", ".join(sorted({Path(r.oracle_checkpoint).name for r in e.runs})),
        ])  # fmt: skip
    b.append(Block("h2", "Seeds and checkpoints", anchor="seeds"))
    b.append(Block("table", rows=seed_rows))
    b.append(Block("h2", "Versions", anchor="versions"))
    b.append(Block("table", rows=[["package", "version"], *map(list, versions().items())]))
    toc.rows = [[x.text, x.anchor, x.kind] for x in b if x.kind in ("h2", "h3") and x.anchor]
    return b


# ---------------------------------------------------------------------------------------------
# Rendering


def _md_figure(p: Plot, text: str, run_dir: Path) -> str:
    rel = p.file("png", "svg", "pdf").relative_to(run_dir).as_posix()
    return f"![{p.title}]({rel})\n\n*{text}*"


def to_markdown(blocks: list[Block], run_dir: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            anchor = f'<a id="{b.anchor}"></a>\n\n' if b.anchor else ""
            out.append(anchor + "#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "toc":
            out.append("\n".join(("  " if k == "h3" else "") + f"- [{t}](#{a})"
                                 for t, a, k in b.rows))  # fmt: skip
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "pre":
            out.append("```json\n" + b.text + "\n```")
        elif b.kind == "table":
            out.append(markdown_table(b.rows))
        elif b.kind == "figure" and b.plot is not None:
            out.append(_md_figure(b.plot, b.text, run_dir))
        elif b.kind == "open":
            out.append(f"<details><summary>{html.escape(b.text)}</summary>")
        elif b.kind == "close":
            out.append("</details>")
    return "\n\n".join(out) + "\n"


FONT = "'DejaVu Sans', 'Bitstream Vera Sans', Verdana, sans-serif"  # the figures' font
CSS = f"""
html {{ font-family: {FONT}; font-size: 15px; }}
body {{ max-width: 1000px; margin: 2em auto; padding: 0 1.5em; color: #222; line-height: 1.5; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.3em; border-bottom: 1px solid #ccc;
  padding-bottom: .2em; margin-top: 2em; }} h3 {{ font-size: 1.1em; margin-top: 1.8em; }}
nav.toc {{ background: #f6f8fa; padding: .6em 1em; font-size: .9em; }}
nav.toc ul {{ margin: .2em 0; padding-left: 1.2em; }}
nav.toc ul ul {{ columns: 2; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: .8em; }}
th, td {{ border: 1px solid #ccc; padding: .2em .4em; text-align: right; }}
td {{ font-variant-numeric: tabular-nums; }}
th {{ background: #eef2f7; }} td:first-child, th:first-child {{ text-align: left; }}
tr.oracle td {{ color: #666; background: #fafafa; }}
td .sd {{ display: block; font-size: .85em; color: #777; white-space: nowrap; }}
figure {{ margin: 1.4em 0; break-inside: avoid; }}
figure img {{ max-width: 100%; height: auto; display: block; margin: 0 auto; }}
figcaption {{ font-size: .9em; color: #444; margin-top: .4em; }}
details {{ margin: 1em 0; border-left: 3px solid #ddd; padding-left: 1em; }}
summary {{ cursor: pointer; color: #0072B2; }}
pre {{ background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .75em; }}
@media print {{ html {{ font-size: 11px; }} body {{ max-width: none; margin: 0; }}
  h2, h3 {{ break-after: avoid; }} details {{ display: none; }} }}
"""


def image_width_in(path: Path) -> float | None:
    """The printed width of a saved figure: PNG pixels at style.PNG_DPI, or the SVG's width."""
    try:
        if path.suffix == ".png":
            with path.open("rb") as f:
                head = f.read(24)
            return struct.unpack(">I", head[16:20])[0] / style.PNG_DPI
        if path.suffix == ".svg":
            m = re.search(r'<svg[^>]*\swidth="([\d.]+)pt"', path.read_text()[:2000])
            return float(m.group(1)) / 72 if m else None
    except (OSError, struct.error):
        return None
    return None


def _cell(text: str) -> str:
    """A table cell; "mean ± std" as the mean over a smaller std, so the table stays narrow."""
    mean, sep, std = text.partition(" ± ")
    if not sep:
        return html.escape(text)
    return f'{html.escape(mean)}<span class="sd">± {html.escape(std)}</span>'


def to_html(blocks: list[Block], title: str, run_dir: Path) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            anchor = f' id="{b.anchor}"' if b.anchor else ""
            out.append(f"<{b.kind}{anchor}>{e(b.text)}</{b.kind}>")
        elif b.kind == "toc":
            out.append('<nav class="toc"><strong>Contents</strong><ul>')
            nested = False
            for text, anchor, kind in b.rows:
                if kind == "h3" and not nested:
                    out.append("<ul>")
                    nested = True
                elif kind == "h2" and nested:
                    out.append("</ul>")
                    nested = False
                out.append(f'<li><a href="#{anchor}">{e(text)}</a></li>')
            out.append("</ul></ul></nav>" if nested else "</ul></nav>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "pre":
            out.append(f"<pre>{e(b.text)}</pre>")
        elif b.kind == "table":
            head, *body = b.rows
            out.append('<div class="scroll"><table><thead><tr>')
            out.append("".join(f"<th>{e(c)}</th>" for c in head) + "</tr></thead><tbody>")
            for r in body:
                cls = ' class="oracle"' if r and "(oracle)" in r[0] else ""
                out.append(f"<tr{cls}>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>")
            out.append("</tbody></table></div>")
        elif b.kind == "figure" and b.plot is not None:
            src = b.plot.file("svg", "png")
            width = image_width_in(b.plot.file("png", "svg"))
            size = f' style="width: {round(width * SCREEN_PX_PER_IN)}px"' if width else ""
            lazy = ' loading="lazy"' if b.lazy else ""
            out.append(
                f'<figure><img src="{e(src.relative_to(run_dir).as_posix())}" '
                f'alt="{e(b.plot.title)}"{size}{lazy}><figcaption>{e(b.text)}</figcaption>'
                "</figure>"
            )
        elif b.kind == "open":
            out.append(f"<details><summary>{e(b.text)}</summary>")
        elif b.kind == "close":
            out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# PDF and W&B


def find_browser() -> str | None:
    """A headless-capable Chromium on PATH, if any."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_command(browser: str, *args: str) -> list[str]:
    """Headless Chromium with `args`; without its sandbox when run as root (which it refuses)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return [browser, "--headless", "--disable-gpu", "--hide-scrollbars",
            *(["--no-sandbox"] if root else []), *args]  # fmt: skip


class _NotPrinted(Exception):
    pass


def print_pdf(page: Path, pdf: Path, timeout: float = 300) -> bool:
    """Print the HTML page to `pdf` with headless Chromium; False (with a warning when one was
    found) if there is none or it fails."""
    browser = find_browser()
    if browser is None:
        return False
    try:
        with atomic_path(pdf) as tmp:
            cmd = browser_command(browser, "--no-pdf-header-footer", f"--print-to-pdf={tmp}",
                                  "--virtual-time-budget=20000", page.resolve().as_uri())  # fmt: skip
            try:
                subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise _NotPrinted(e.__class__.__name__) from None
            if tmp.stat().st_size == 0:
                raise _NotPrinted(f"{browser} printed nothing")
    except _NotPrinted as e:
        print(f"warning: report.pdf not written ({e})", file=sys.stderr)
        return False
    return True


def log_figures(
    plots: list[Plot],
    run_dir: Path,
    wandb_mode: str = "disabled",
    project: str = "unlearning",
) -> int:
    """Log the figures' PNGs as W&B images (to the active run, else to a new ``<run>_report``
    run), keyed ``report/<path under the run folder>``. Nothing when ``wandb_mode`` is
    ``disabled``; never raises. Returns how many images were logged."""
    images = {}
    for p in plots:
        png = p.files.get("png", p.path if p.path.suffix == ".png" else None)
        if png is not None:
            key = "report/" + png.relative_to(run_dir).with_suffix("").as_posix()
            images[key] = (png, p.caption)
    return log_images(images, wandb_mode, project, run_dir, f"{run_dir.name}_report")


# ---------------------------------------------------------------------------------------------


def check_fig_formats(fig_formats: Sequence[str]) -> None:
    """The report's page needs figures a browser shows: svg or png."""
    if not {"svg", "png"} & set(fig_formats):
        raise UserError(f"--fig-format {','.join(fig_formats)}: the HTML report shows svg or png "
                        "figures; add one of them")  # fmt: skip


def write_report(
    run_dir: Path,
    device: torch.device | str | None = None,
    *,
    data_dir: Path | None = None,
    features: bool = True,
    tsne: bool = False,
    samples: int = DEFAULT_FEATURE_SAMPLES,
    tsne_samples: int = DEFAULT_TSNE_SAMPLES,
    fig_formats: Sequence[str] = FIG_FORMATS,
    pdf: bool = True,
    wandb_mode: str = "disabled",
    project: str = "unlearning",
    quiet: bool = False,
) -> Path:
    """Write ``report.md``, ``report.html`` (and ``report.pdf`` when `pdf` and a Chromium is
    installed) into the run folder; return the HTML's path."""

    run_dir = Path(run_dir)
    if not (run_dir / "runs").is_dir():
        raise UserError(f"{run_dir}: not a run folder (no runs/ inside)")
    check_fig_formats(fig_formats)
    dev = pick_device(str(device) if device is not None else None)
    with style.formats(fig_formats):
        plots = make_run_plots(run_dir, run_dir / "plots", search=[Path("checkpoints")],
                               quiet=quiet)  # fmt: skip
        feats = FeatureFigures()
        if features:
            feats = feature_figures(run_dir, device=dev, data_dir=data_dir, samples=samples,
                                    tsne=tsne, tsne_samples=tsne_samples, quiet=quiet)  # fmt: skip
    blocks = build_blocks(run_dir, plots, feats, str(dev))
    title = next(b.text for b in blocks if b.kind == "h1")
    atomic_write_text(run_dir / "report.md", to_markdown(blocks, run_dir))
    page = run_dir / "report.html"
    atomic_write_text(page, to_html(blocks, title, run_dir))
    printed = pdf and print_pdf(page, run_dir / "report.pdf")
    shown = [b.plot for b in blocks if b.plot is not None]
    unique = list({p.path: p for p in shown}.values())
    log_figures(unique, run_dir, wandb_mode, project)
    if not quiet:
        print(f"report: {page} ({len(unique)} figures{', report.pdf' if printed else ''})",
              file=sys.stderr)  # fmt: skip
    return page


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("run", type=Path, help="run folder made by main.py")
    add_device(p)
    add_data_dir(p)
    p.add_argument("--no-features", action="store_true", help="skip the feature-space figures")
    p.add_argument("--tsne", action="store_true", help="add side-by-side t-SNE maps (slower)")
    add_samples(p, DEFAULT_FEATURE_SAMPLES, "pool images for the feature figures")
    add_fig_format(p)
    p.add_argument("--no-pdf", action="store_true", help="do not print report.pdf")
    p.add_argument("--wandb", choices=MODES, default="disabled", help="log figures to W&B")
    p.add_argument("--project", default="unlearning", help="W&B project")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        page = write_report(
            args.run,
            args.device,
            data_dir=args.data_dir,
            features=not args.no_features,
            tsne=args.tsne,
            samples=args.samples,
            fig_formats=args.fig_format,
            pdf=not args.no_pdf,
            wandb_mode=args.wandb,
            project=args.project,
            quiet=args.quiet,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; no new report in {args.run} (report.md and report.html are "
            f"written last); rerun: python report.py {args.run}",
            file=sys.stderr,
        )
        return 130
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
