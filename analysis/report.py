"""A results section for a run folder: ``report.md`` and a self-contained ``report.html``.

    python report.py output/20250101-120000_quickstart [--tsne] [--wandb offline]
    python main.py -L exp/quickstart.json --report      # the same, at the end of the runs

The report holds the summary table, the evaluation plots of ``plots.py`` (saved under
``<run>/plots/``), for each unlearned model the class x class sliced-Wasserstein maps of its
penultimate features next to its base and oracle (``feature_extraction.py`` and
``wasserstein.py``; the features are kept in ``<run>/features/``), optionally the
side-by-side t-SNE maps (``--tsne``), then the configuration, seeds and software versions.
``report.html`` embeds every image as a base64 data URI, so it can be mailed or archived alone;
``report.md`` links the same PNGs by relative path.

With a W&B mode other than ``disabled`` the same figures are also logged as images
(:func:`log_figures`), to the active run or to a new ``<run>_report`` run; failing to log never
fails the report.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from analysis import tsne as tsne_vis
from analysis import wasserstein
from analysis.features import extract_features, load_index
from analysis.plots import Plot, load_results, make_run_plots, summary_cells
from core.errors import UserError, cli
from datasets import pick_device
from running.tables import summarize
from running.wandb_log import MODES, WandbLogger
from training.checkpoints import versions as library_versions

DEFAULT_FEATURE_SAMPLES = 1000
DEFAULT_TSNE_SAMPLES = 500


@dataclass
class Block:
    """One piece of the report, rendered to both Markdown and HTML."""

    kind: str  # h1, h2, h3, p, table, figure, pre, list
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    plot: Plot | None = None


def versions() -> dict[str, str]:
    """Versions of Python and of every library the results depend on, plus the platform."""
    import matplotlib

    return library_versions() | {
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
    }


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _num(v: Any, nd: int = 2) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def feature_figures(
    run_dir: Path,
    *,
    device: torch.device | str | None,
    data_dir: Path | None,
    samples: int,
    tsne: bool,
    tsne_samples: int,
    quiet: bool,
) -> dict[str, list[Plot]]:
    """Feature-space figures of every unlearned model, keyed by its run folder (relative)."""

    feats = run_dir / "features"
    extract_features(
        run_dir,
        feats,
        samples=samples,
        device=device,
        data_dir=data_dir,
        search=[Path("checkpoints")],
        quiet=quiet,
    )
    out = run_dir / "plots"
    written = set(wasserstein.run(feats, out / "wasserstein", per_model=False, quiet=quiet))
    if tsne:
        written |= set(
            tsne_vis.run(feats, out / "tsne", samples=tsne_samples, only_compare=True, quiet=quiet)
        )
    result: dict[str, list[Plot]] = {}
    for e in load_index(feats):
        if e["role"] != "unlearned":
            continue
        stem = e["file"][: -len(".npz")]
        key = str(Path(e["file"]).parent)
        w = out / "wasserstein" / f"{stem}_wasserstein_compare.png"
        if w in written:
            result.setdefault(key, []).append(
                Plot(
                    w,
                    "Sliced Wasserstein-2 distances between the penultimate-feature clouds of every "
                    "pair of classes (Bonneel et al. 2015; 256 seeded directions, exact 1-D terms) "
                    "for base, unlearned and oracle on one colour scale, then the changes "
                    "unlearned − base and unlearned − oracle (red: classes moved apart, blue: "
                    "closer). Forgotten classes in red.",
                    e["name"],
                    "Feature-space distances",
                )
            )
        t = out / "tsne" / f"{stem}_tsne_compare.png"
        if t in written:
            result.setdefault(key, []).append(
                Plot(
                    t,
                    "t-SNE maps (van der Maaten & Hinton 2008) of the penultimate features of the "
                    "same training-pool samples under base, unlearned and retrain-oracle models, "
                    "coloured by class; larger points with black edges are forget samples.",
                    e["name"],
                    "t-SNE of features",
                )
            )
    return result


def build_blocks(
    run_dir: Path, plots: list[Plot], extra: dict[str, list[Plot]], device: str
) -> list[Block]:
    """The report's content, in reading order."""
    results = load_results(run_dir)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    order = sorted({r["experiment"] for r in results})
    rows = summarize(results, order)
    seeds = sorted({int(r["seed"]) for r in results})
    b: list[Block] = [
        Block("h1", f"Results: {run_dir.name}"),
        Block(
            "p",
            f"{len(order)} experiment(s) from {config.get('source', 'an unknown source')}, "
            f"{len(results)} finished run(s), seeds {', '.join(map(str, seeds))}. Every "
            "unlearned model is compared with its base model and with the retrain-from-scratch "
            "oracle trained without exactly the same forget set. Report written "
            f"{datetime.now().isoformat(timespec='seconds')} on {device}.",
        ),
        Block("h2", "Summary"),
        Block(
            "p",
            "Accuracies and MIA-Efficacy in percent (SalUn: forget acc = 1 − UA, retain acc = "
            "RA, test acc = TA), Avg. Gap = mean absolute difference to the oracle of UA, RA, "
            "TA and MIA-Efficacy in percentage points, times in seconds; mean ± std over seeds.",
        ),
    ]
    headers, body = summary_cells(rows)
    b.append(Block("table", rows=[headers, *body]))
    fig_no = 0
    figures: list[Block] = []

    def add(p: Plot) -> None:
        nonlocal fig_no
        fig_no += 1
        figures.append(Block("figure", f"Figure {fig_no}. {p.caption}", plot=p))

    for p in plots:
        # the table is in the text already; its image is for W&B and slides
        if p.section == "Summary" and p.path.name != "summary_table.png":
            add(p)
    b += figures
    figures = []
    b.append(Block("h2", "Runs"))
    by_section: dict[str, list[Plot]] = {}
    for p in plots:
        if p.section != "Summary":
            by_section.setdefault(p.section, []).append(p)
    for r in results:
        section = f"{r['experiment']} (seed {r['seed']})"
        m, o, g = r["metrics"], r["oracle"], r["gaps"]
        b.append(Block("h3", section))
        b.append(
            Block(
                "p",
                f"Method {r['method']}; forget set {_forget_text(r['forget'])}. "
                f"Forget acc {_pct(m.get('forget_acc'))}% (oracle {_pct(o.get('forget_acc'))}%), "
                f"retain acc {_pct(m.get('retain_acc'))}%, test acc {_pct(m.get('test_acc'))}%, "
                f"MIA-Efficacy {_pct(m.get('mia_efficacy'))}% (oracle "
                f"{_pct(o.get('mia_efficacy'))}%), Avg. Gap {_num(g.get('avg_gap'))} pp, "
                f"unlearning {_num(r['times'].get('unlearn_time'), 1)} s "
                f"(oracle {_num(r['times'].get('oracle_time'), 1)} s).",
            )
        )
        rel = str(Path(r["_dir"]).relative_to(run_dir))
        for p in by_section.get(section, []) + extra.get(rel, []):
            add(p)
        b += figures
        figures = []
    b.append(Block("h2", "Configuration"))
    b.append(
        Block(
            "p",
            f"Run folder {run_dir}; {config.get('nexp', '?')} run(s) per experiment with seeds "
            f"{config.get('seed', '?')} + i. The experiments as validated by main.py:",
        )
    )
    b.append(Block("pre", json.dumps(config, indent=2)))
    b.append(Block("h2", "Seeds"))
    seed_rows = [["experiment", "seeds", "forget set", "base checkpoint", "oracle checkpoint"]]
    for exp in order:
        runs = [r for r in results if r["experiment"] == exp]
        seed_rows.append(
            [
                exp,
                ", ".join(str(r["seed"]) for r in runs),
                _forget_text(runs[0]["forget"]),
                Path(runs[0]["base_checkpoint"]).name,
                ", ".join(sorted({Path(r["oracle_checkpoint"]).name for r in runs})),
            ]
        )
    b.append(Block("table", rows=seed_rows))
    b.append(
        Block(
            "p",
            "Each run seeds the unlearning method and, for a random forget set, the draw of the "
            "forget set; the split (validation set) comes from the base checkpoint's split seed. "
            "Feature samples, t-SNE and sliced-Wasserstein directions use seed 0.",
        )
    )
    b.append(Block("h2", "Versions"))
    b.append(Block("table", rows=[["package", "version"], *map(list, versions().items())]))
    return b


def _forget_text(f: dict[str, Any]) -> str:
    if f.get("classes"):
        return f"class(es) {', '.join(map(str, f['classes']))} ({f.get('n', '?')} samples)"
    if f.get("fraction") is not None:
        return f"random {100 * f['fraction']:g}% of the pool ({f.get('n', '?')} samples)"
    return f"index file {f.get('index_file')} ({f.get('n', '?')} samples)"


# ---------------------------------------------------------------------------------------------
# Rendering


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], run_dir: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "pre":
            out.append("```json\n" + b.text + "\n```")
        elif b.kind == "table":
            head, *body = b.rows
            lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in body]
            out.append("\n".join(lines))
        elif b.kind == "figure" and b.plot is not None:
            rel = b.plot.path.relative_to(run_dir).as_posix()
            out.append(f"![{b.plot.title}]({rel})\n\n*{b.text}*")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: Georgia, 'Times New Roman', serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1, h2, h3 { font-family: Helvetica, Arial, sans-serif; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .85em;
        font-family: Helvetica, Arial, sans-serif; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #eef2f7; } td:first-child, th:first-child { text-align: left; }
tr.oracle td { color: #666; background: #fafafa; }
figure { margin: 1.2em 0; text-align: center; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; text-align: left; margin-top: .4em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .8em; }
"""


def _data_uri(path: Path) -> str:
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "pre":
            out.append(f"<pre>{e(b.text)}</pre>")
        elif b.kind == "table":
            head, *body = b.rows
            out.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in head))
            out.append("</tr></thead><tbody>")
            for r in body:
                cls = ' class="oracle"' if r and "(oracle)" in r[0] else ""
                out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
            out.append("</tbody></table>")
        elif b.kind == "figure" and b.plot is not None:
            out.append(
                f'<figure><img src="{_data_uri(b.plot.path)}" alt="{e(b.plot.title)}" '
                f'data-file="{e(b.plot.path.name)}"><figcaption>{e(b.text)}</figcaption></figure>'
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# W&B


def log_figures(
    plots: list[Plot],
    run_dir: Path,
    wandb_mode: str = "disabled",
    project: str = "unlearning",
) -> int:
    """Log the figures as W&B images (to the active run, else to a new ``<run>_report`` run).

    Does nothing when ``wandb_mode`` is ``disabled``; never raises. Returns how many images
    were logged."""
    if wandb_mode == "disabled" or not plots:
        return 0
    try:
        import wandb

        images = {}
        for p in plots:
            key = "report/" + p.path.relative_to(run_dir).with_suffix("").as_posix()
            images[key] = wandb.Image(str(p.path), caption=p.caption)
        if wandb.run is not None:
            wandb.run.log(images)
            return len(images)
        logger = WandbLogger(wandb_mode, project, run_dir)
        logger.start(f"{run_dir.name}_report", "report", {"run_folder": str(run_dir)})
        if logger.run is None:
            return 0
        logger.run.log(images)
        logger.finish()
        return len(images)
    except Exception as e:  # logging is a convenience: the report on disk is what counts
        print(f"warning: W&B: figures not logged ({e.__class__.__name__}: {e})", file=sys.stderr)
        return 0


# ---------------------------------------------------------------------------------------------


def write_report(
    run_dir: Path,
    device: torch.device | str | None = None,
    *,
    data_dir: Path | None = None,
    features: bool = True,
    tsne: bool = False,
    samples: int = DEFAULT_FEATURE_SAMPLES,
    tsne_samples: int = DEFAULT_TSNE_SAMPLES,
    wandb_mode: str = "disabled",
    project: str = "unlearning",
    quiet: bool = False,
) -> Path:
    """Write ``report.md`` and ``report.html`` into the run folder; return the HTML's path."""

    run_dir = Path(run_dir)
    if not (run_dir / "runs").is_dir():
        raise UserError(f"{run_dir}: not a run folder (no runs/ inside)")
    dev = pick_device(str(device) if device is not None else None)
    plots = make_run_plots(
        run_dir,
        run_dir / "plots",
        device=dev,
        data_dir=data_dir,
        search=[Path("checkpoints")],
        quiet=quiet,
    )
    extra: dict[str, list[Plot]] = {}
    if features:
        extra = feature_figures(
            run_dir,
            device=dev,
            data_dir=data_dir,
            samples=samples,
            tsne=tsne,
            tsne_samples=tsne_samples,
            quiet=quiet,
        )
    blocks = build_blocks(run_dir, plots, extra, str(dev))
    md = run_dir / "report.md"
    md.write_text(to_markdown(blocks, run_dir))
    page = run_dir / "report.html"
    page.write_text(to_html(blocks, f"Results: {run_dir.name}"))
    all_plots = [b.plot for b in blocks if b.plot is not None]
    log_figures(plots + [p for ps in extra.values() for p in ps], run_dir, wandb_mode, project)
    if not quiet:
        print(f"report: {page} ({len(all_plots)} figures)", file=sys.stderr)
    return page


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", type=Path, help="run folder made by main.py")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ./data")
    p.add_argument("--no-features", action="store_true", help="skip the feature-space figures")
    p.add_argument("--tsne", action="store_true", help="add side-by-side t-SNE maps (slower)")
    p.add_argument(
        "-S",
        "--samples",
        type=int,
        default=DEFAULT_FEATURE_SAMPLES,
        help="pool images for the feature figures (%(default)s)",
    )
    p.add_argument("--wandb", choices=MODES, default="disabled", help="log figures to W&B")
    p.add_argument("--project", default="unlearning", help="W&B project")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    page = write_report(
        args.run,
        args.device,
        data_dir=args.data_dir,
        features=not args.no_features,
        tsne=args.tsne,
        samples=args.samples,
        wandb_mode=args.wandb,
        project=args.project,
        quiet=args.quiet,
    )
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
