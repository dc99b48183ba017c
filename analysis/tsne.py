"""t-SNE maps of penultimate features: per model, and base/unlearned/oracle side by side.

    python tsne_vis.py -D features/quickstart -S 500 --out images/ [--gif]

t-SNE: L. van der Maaten and G. Hinton, "Visualizing Data using t-SNE", JMLR 9 (2008),
2579-2605, as implemented by scikit-learn (``sklearn.manifold.TSNE``, Barnes-Hut, PCA
initialisation, fixed ``random_state``). Features wider than 50 dimensions are first reduced to
50 with PCA, as the paper recommends.

Every model of the same feature sample is mapped on the same ``-S`` samples (chosen by
position with ``--seed``). Points are coloured by class (``analysis/style.py``); forget samples
are drawn on top as large vermillion crosses, a colour no class uses. Outputs (mirroring the
feature folder under ``--out``, default ``images/<name of -D>``), each as PDF, SVG and PNG:
``<model>_tsne2d`` and, for unlearned models, ``<model>_tsne_compare`` with base, unlearned and
retrain oracle side by side; ``--gif`` adds ``<model>_tsne3d.gif``, a rotating 3-D map. t-SNE
orientation is arbitrary, so the unlearned and oracle maps are rotated/reflected onto the base
map (orthogonal Procrustes) to make the panels comparable; distances are unchanged.

Each comparison panel gives the **separation** of the forget samples (:func:`separation`, their
mean silhouette against all other samples, computed on the features, not on the map): t-SNE
distances between clusters mean little, the score says how far the forget samples really form a
group of their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from analysis import style
from analysis.features import FeatureSet, load_features, load_index
from analysis.figures import Interval
from analysis.style import ROLE_TITLES
from analysis.wasserstein import stem_of, subsample
from core.cli_options import add_feature_io, add_fig_format, new_parser
from core.errors import UserError, cli

DEFAULT_SAMPLES = 500
DEFAULT_ITER = 500
GIF_FRAMES = 12


def tsne_embed(
    x: np.ndarray,
    dim: int = 2,
    *,
    seed: int = 0,
    max_iter: int = DEFAULT_ITER,
    perplexity: float = 30.0,
    threads: int | None = 1,
) -> np.ndarray:
    """t-SNE embedding [N, dim] of ``x`` (van der Maaten & Hinton 2008; PCA to 50 dims first).

    ``threads`` caps the OpenMP/BLAS threads while it runs (None: the library default). One
    thread is the default: for a few hundred points it is as fast as two on an idle machine
    and several times faster on a busy one, where OpenMP threads wait for each other."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if x.shape[1] > 50 and len(x) > 50:
        with threadpool_limits(limits=threads):
            x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(perplexity, max(2.0, (len(x) - 1) / 3)))
    tsne = TSNE(
        n_components=dim,
        perplexity=perplexity,
        init="pca",
        learning_rate="auto",
        max_iter=max(250, max_iter),
        random_state=seed,
    )
    with threadpool_limits(limits=threads):
        return tsne.fit_transform(x).astype(np.float32)


def align(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Rotate/reflect ``y`` onto ``ref`` (orthogonal Procrustes on centred, scaled maps)."""
    from scipy.linalg import orthogonal_procrustes

    yc, rc = y - y.mean(0), ref - ref.mean(0)
    r, _ = orthogonal_procrustes(yc, rc)
    return yc @ r


def separation(x: np.ndarray, forget: np.ndarray) -> float:
    """How far the forget samples form a cluster of their own: the mean silhouette
    (Rousseeuw, J. Comput. Appl. Math. 20, 1987) of the forget samples, with the forget samples
    and all the others as the two clusters, on Euclidean distances in `x` (features or a map).

    s(i) = (b(i) - a(i)) / max(a(i), b(i)), a = mean distance to the other forget samples,
    b = mean distance to the rest: near 1 a tight, distant cluster, near 0 mixed in, below 0
    closer to the rest than to each other. NaN with fewer than two forget samples or no rest."""
    from scipy.spatial.distance import cdist

    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    forget = np.asarray(forget, dtype=bool)
    nf = int(forget.sum())
    if nf < 2 or nf == len(x):
        return float("nan")
    xf = x[forget]
    a = cdist(xf, xf).sum(axis=1) / (nf - 1)
    b = cdist(xf, x[~forget]).mean(axis=1)
    denom = np.maximum(a, b)
    s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def reading_guide(scores: Mapping[str, Interval], tol: float = 0.05) -> str:
    """What the separation scores of base, unlearned and oracle say, in two sentences."""
    shown = [f"{ROLE_TITLES[k]} {v.text(1, 2)}" for k, v in scores.items() if v.n]
    if not shown:
        return ""
    n = max(v.n for v in scores.values())
    out = (
        "Separation of the forget samples from the other samples in feature space (mean "
        f"silhouette{', mean ± 95% t-interval over ' + str(n) + ' seeds' if n > 1 else ''}; 1: "
        f"a cluster of their own, 0: mixed in): {', '.join(shown)}."
    )
    b, u, o = (scores.get(k) for k in ("base", "unlearned", "oracle"))
    if u is not None and o is not None and u.n and o.n:
        d = u.mean - o.mean
        if abs(d) <= tol:
            out += " The unlearned model separates them as much as the retrain oracle does."
        elif d > 0:
            out += (f" The unlearned model keeps them {d:.2f} more apart than the oracle: they "
                    "remain more of a group of their own than after retraining.")  # fmt: skip
        else:
            out += (f" The unlearned model keeps them {-d:.2f} less apart than the oracle: it "
                    "mixes them into the other samples more than retraining does.")  # fmt: skip
    if b is not None and o is not None and b.n and o.n:
        if abs(o.mean - b.mean) <= 2 * tol:
            out += (" Retraining without them leaves their separation about where the base "
                    f"model has it ({b.mean:.2f} → {o.mean:.2f}), so a cluster of forget samples "
                    "in the map is expected here and is not by itself a failure to unlearn.")  # fmt: skip
        else:
            out += (f" Retraining without them moves it from {b.mean:.2f} to {o.mean:.2f}; an "
                    "unlearned model close to the oracle's value looks like retraining.")  # fmt: skip
    return out


def _scatter(
    ax: Any, y: np.ndarray, labels: np.ndarray, forget: np.ndarray, colors: np.ndarray
) -> None:
    keep = ~forget
    pts = [y[keep, k] for k in range(y.shape[1])]
    ax.scatter(*pts, c=colors[labels[keep]], s=5, alpha=0.7, linewidths=0)
    if forget.any():  # on top, large, in the one colour no class uses
        pts = [y[forget, k] for k in range(y.shape[1])]
        ax.scatter(*pts, c=style.FORGET_COLOR, s=16, marker="X", edgecolors="white",
                   linewidths=0.3)  # fmt: skip


def _legend(
    fig: Figure,
    class_names: Sequence[str],
    colors: np.ndarray,
    present: set[int],
    forget_classes: Sequence[int],
    with_forget: bool,
    ncols: int,
) -> None:
    shown = [c for c in sorted(present) if c not in set(forget_classes)][:20]
    handles = [
        Line2D([], [], marker="o", ls="", color=colors[c], label=str(class_names[c]), ms=4)
        for c in shown
    ]
    if with_forget:
        what = ("forget samples (class " + ", ".join(str(class_names[c]) for c in forget_classes)
                + ")" if forget_classes else "forget samples")  # fmt: skip
        handles.append(Line2D([], [], marker="X", ls="", color=style.FORGET_COLOR, mec="white",
                              mew=0.3, label=what, ms=6))  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, columnspacing=0.8,
               handletextpad=0.1)  # fmt: skip


def _class_names(labels: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    """The given class names, else "0".."C-1" for the classes present in `labels`."""
    nc = int(labels.max()) + 1 if len(labels) else 1
    return list(class_names or map(str, range(nc)))


@style.styled
def plot_tsne_2d(
    y: np.ndarray,
    labels: np.ndarray,
    forget: np.ndarray,
    path: Path,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
) -> Path:
    """One 2-D t-SNE map, coloured by class, forget samples marked."""
    names = _class_names(labels, class_names)
    colors = style.class_colors(len(names), forget_classes)
    fig = style.figure(style.SINGLE, 3.5)
    ax = fig.add_subplot()
    _scatter(ax, y, labels, forget, colors)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.spines[:].set_visible(True)
    ax.set_title(title)
    _legend(fig, names, colors, set(labels.tolist()), forget_classes, bool(forget.any()), 6)
    return style.primary(style.save_figure(fig, path))


def _figure_3d(
    y: np.ndarray,
    labels: np.ndarray,
    forget: np.ndarray,
    title: str,
    names: Sequence[str],
    forget_classes: Sequence[int],
    dpi: int,
) -> tuple[Figure, Any]:
    colors = style.class_colors(len(names), forget_classes)
    fig = Figure(figsize=(style.SINGLE, 3.0), dpi=dpi, layout="constrained")
    ax = fig.add_subplot(projection="3d")
    _scatter(ax, y, labels, forget, colors)
    ax.set_xticklabels([])
    ax.set_yticklabels([])
    ax.set_zticklabels([])
    ax.set_title(title)
    return fig, ax


@style.styled
def tsne_gif(
    y: np.ndarray,
    labels: np.ndarray,
    forget: np.ndarray,
    path: Path,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
    frames: int = GIF_FRAMES,
    dpi: int = 100,
) -> Path:
    """A looping GIF of the 3-D map turning once around its vertical axis (``frames`` views)."""
    from PIL import Image

    names = _class_names(labels, class_names)
    fig, ax = _figure_3d(y, labels, forget, title, names, forget_classes, dpi)
    canvas = FigureCanvasAgg(fig)
    images = []
    for k in range(max(1, frames)):
        ax.view_init(elev=20, azim=35 + 360.0 * k / max(1, frames))
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        images.append(Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=150, loop=0, optimize=True
    )
    return path


@style.styled
def plot_tsne_compare(
    maps: Sequence[tuple[str, np.ndarray]],
    labels: np.ndarray,
    forget: np.ndarray,
    path: Path,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
    scores: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """2-D maps of several models on the same samples, side by side, aligned to the first;
    ``scores`` (by panel name) go under the panel titles."""
    names = _class_names(labels, class_names)
    colors = style.class_colors(len(names), forget_classes)
    fig = style.figure(style.DOUBLE, 2.9)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    ref = maps[0][1]
    for ax, (name, y) in zip(axes, maps, strict=True):
        _scatter(ax, align(y, ref) if y is not ref else y - y.mean(0), labels, forget, colors)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(True)
        score = (scores or {}).get(name)
        extra = f"\nseparation {score:.2f}" if score is not None and np.isfinite(score) else ""
        ax.set_title(ROLE_TITLES.get(name, name) + extra)
    _legend(fig, names, colors, set(labels.tolist()), forget_classes, bool(forget.any()), 11)
    if title:
        fig.suptitle(title)
    return style.save_figure(fig, path)


def embed_models(
    features_dir: Path,
    files: Sequence[str],
    *,
    samples: int,
    seed: int,
    max_iter: int,
    quiet: bool,
) -> dict[str, tuple[FeatureSet, np.ndarray]]:
    """The (subsampled) features and the 2-D t-SNE map of each feature file."""
    out = {}
    for f in tqdm(files, desc="t-SNE", unit="model", disable=quiet or None):
        fs = subsample(load_features(features_dir / f), samples, seed)
        out[f] = (fs, tsne_embed(fs.features, 2, seed=seed, max_iter=max_iter))
    return out


def compare_panels(
    e: dict[str, Any], maps: dict[str, tuple[FeatureSet, np.ndarray]]
) -> list[tuple[str, str]]:
    """(role, file) of the base, the unlearned model and the oracle of an unlearned entry,
    those that were mapped; all must share the unlearned model's samples."""
    u = maps[e["file"]][0]
    panels = []
    for role, f in (("base", e.get("base")), ("unlearned", e["file"]), ("oracle", e.get("oracle"))):
        if f and f in maps:
            if not np.array_equal(maps[f][0].indices, u.indices):
                raise UserError(f"{f} and {e['file']} were extracted on different samples")
            panels.append((role, f))
    return panels


def run(
    features_dir: str | Path,
    out: str | Path,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    max_iter: int = DEFAULT_ITER,
    gif: bool = False,
    frames: int = GIF_FRAMES,
    only_compare: bool = False,
    quiet: bool = False,
) -> list[Path]:
    """All t-SNE figures of the feature folder; returns the files written (PNG, else the first
    format written; GIFs as they are).

    ``only_compare`` maps just the unlearned models that have a base or oracle, with them,
    and writes only the side-by-side figures."""
    features_dir, out = Path(features_dir), Path(out)
    entries = load_index(features_dir)
    if only_compare:
        wanted: list[str] = []
        for e in entries:
            if e["role"] == "unlearned" and (e.get("base") or e.get("oracle")):
                for f in (e.get("base"), e["file"], e.get("oracle")):
                    if f and f not in wanted:
                        wanted.append(f)
        todo = [e for f in wanted for e in entries if e["file"] == f]
    else:
        todo = entries
    maps = embed_models(features_dir, [e["file"] for e in todo], samples=samples, seed=seed,
                        max_iter=max_iter, quiet=quiet)  # fmt: skip
    written: list[Path] = []
    for e in todo:
        fs, y2 = maps[e["file"]]
        stem = stem_of(e["file"])
        fc = fs.meta.get("forget_classes") or []
        title = f"{fs.name} ({e['role']})"
        if not only_compare:
            written.append(plot_tsne_2d(y2, fs.labels, fs.forget, out / f"{stem}_tsne2d",
                                        title=title, class_names=fs.class_names,
                                        forget_classes=fc))  # fmt: skip
            if gif:
                y3 = tsne_embed(fs.features, 3, seed=seed, max_iter=max_iter)
                written.append(tsne_gif(y3, fs.labels, fs.forget, out / f"{stem}_tsne3d.gif",
                                        title=title, class_names=fs.class_names,
                                        forget_classes=fc, frames=frames))  # fmt: skip
        if e["role"] != "unlearned":
            continue
        panels = compare_panels(e, maps)
        if len(panels) > 1:
            # the unlearned model's forget set is marked in every panel
            files = plot_tsne_compare(
                [(role, maps[f][1]) for role, f in panels], fs.labels, fs.forget,
                out / f"{stem}_tsne_compare", title=f"{fs.name}: t-SNE of penultimate features",
                class_names=fs.class_names, forget_classes=fc,
                scores={role: separation(maps[f][0].features, fs.forget) for role, f in panels},
            )  # fmt: skip
            written.append(style.primary(files))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_feature_io(p, folder="feature folder", samples=DEFAULT_SAMPLES,
                   samples_help="samples per map, the same for every model; 0 = all",
                   out="default: images/<name of -D>")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="t-SNE random_state and subsample seed")
    p.add_argument("--iter", type=int, default=DEFAULT_ITER, help="t-SNE iterations (>= 250)")
    p.add_argument("--gif", action="store_true", help="add a rotating 3-D map per model (GIF)")
    p.add_argument("--frames", type=int, default=GIF_FRAMES, help="GIF frames (%(default)s)")
    p.add_argument(
        "--compare-only",
        action="store_true",
        help="only the base/unlearned/oracle side-by-side maps",
    )
    add_fig_format(p)
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path("images") / args.dir.resolve().name
    with style.formats(args.fig_format):
        written = run(
            args.dir,
            out,
            samples=args.samples,
            seed=args.seed,
            max_iter=args.iter,
            gif=args.gif,
            frames=args.frames,
            only_compare=args.compare_only,
        )
    print(f"{len(written)} figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
