"""t-SNE maps of penultimate features: per model in 2-D and 3-D, and base/unlearned/oracle side by side.

    python tsne_vis.py -D features/quickstart -S 500 --out images/

t-SNE: L. van der Maaten and G. Hinton, "Visualizing Data using t-SNE", JMLR 9 (2008),
2579-2605, as implemented by scikit-learn (``sklearn.manifold.TSNE``, Barnes-Hut, PCA
initialisation, fixed ``random_state``). Features wider than 50 dimensions are first reduced to
50 with PCA, as the paper recommends.

Every model of the same feature sample is mapped on the same ``-S`` samples (chosen by
position with ``--seed``). Points are coloured by true class; samples in the forget set are
drawn larger, with a black edge. Outputs (mirroring the feature folder under
``--out``, default ``images/<name of -D>``): ``<model>_tsne2d.png``, ``<model>_tsne3d.png``,
``<model>_tsne3d.gif`` (a short rotation of the 3-D map) and, for unlearned models,
``<model>_tsne_compare.png`` with base, unlearned and retrain oracle side by side. t-SNE
orientation is arbitrary, so the unlearned and oracle maps are rotated/reflected onto the
base map (orthogonal Procrustes) to make the panels comparable; distances are unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from analysis.features import FeatureSet, load_features, load_index
from analysis.wasserstein import stem_of, subsample
from core.errors import UserError, cli

matplotlib.use("Agg")  # headless; this module never imports pyplot

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


def class_colors(num_classes: int) -> np.ndarray:
    """One RGBA colour per class: tab10 / tab20, else an evenly sampled turbo map."""
    if num_classes <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return np.array([cmap(i) for i in range(num_classes)])
    if num_classes <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return np.array([cmap(i) for i in range(num_classes)])
    cmap = matplotlib.colormaps["turbo"]
    return np.array([cmap(i / max(1, num_classes - 1)) for i in range(num_classes)])


def _scatter(
    ax: Any, y: np.ndarray, labels: np.ndarray, forget: np.ndarray, colors: np.ndarray
) -> None:
    keep = ~forget
    pts = [y[keep, k] for k in range(y.shape[1])]
    ax.scatter(*pts, c=colors[labels[keep]], s=7, alpha=0.65, linewidths=0)
    if forget.any():
        pts = [y[forget, k] for k in range(y.shape[1])]
        ax.scatter(
            *pts, c=colors[labels[forget]], s=22, marker="o", edgecolors="black", linewidths=0.7
        )


def _legend(
    fig: Figure,
    class_names: Sequence[str],
    colors: np.ndarray,
    present: set[int],
    with_forget: bool,
) -> None:
    handles = [
        Line2D([], [], marker="o", ls="", color=colors[c], label=str(class_names[c]), ms=5)
        for c in sorted(present)
    ]
    if len(handles) > 20:
        handles = handles[:20]
    if with_forget:
        handles.append(
            Line2D([], [], marker="o", ls="", mfc="white", mec="black", label="forget sample", ms=6)
        )
    fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)


def _class_names(labels: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    """The given class names, else "0".."C-1" for the classes present in `labels`."""
    nc = int(labels.max()) + 1 if len(labels) else 1
    return list(class_names or map(str, range(nc)))


def plot_tsne_2d(
    y: np.ndarray,
    labels: np.ndarray,
    forget: np.ndarray,
    path: Path,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
) -> Path:
    """One 2-D t-SNE map, coloured by class, forget samples marked."""
    names = _class_names(labels, class_names)
    colors = class_colors(len(names))
    fig = Figure(figsize=(5.6, 4.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    _scatter(ax, y, labels, forget, colors)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    _legend(fig, names, colors, set(labels.tolist()), bool(forget.any()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _figure_3d(
    y: np.ndarray,
    labels: np.ndarray,
    forget: np.ndarray,
    title: str,
    names: Sequence[str],
    size: tuple[float, float] = (5.6, 4.6),
    dpi: int = 100,
    legend: bool = True,
) -> tuple[Figure, Any]:
    colors = class_colors(len(names))
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    ax = fig.add_subplot(projection="3d")
    _scatter(ax, y, labels, forget, colors)
    ax.set_xticklabels([])
    ax.set_yticklabels([])
    ax.set_zticklabels([])
    ax.set_title(title, fontsize=9)
    if legend:
        _legend(fig, names, colors, set(labels.tolist()), bool(forget.any()))
    return fig, ax


def plot_tsne_3d(
    y: np.ndarray,
    labels: np.ndarray,
    forget: np.ndarray,
    path: Path,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
) -> Path:
    """One 3-D t-SNE map (a fixed view), coloured by class, forget samples marked."""
    fig, ax = _figure_3d(y, labels, forget, title, _class_names(labels, class_names))
    ax.view_init(elev=20, azim=35)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def tsne_gif(
    y: np.ndarray,
    labels: np.ndarray,
    forget: np.ndarray,
    path: Path,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
    frames: int = GIF_FRAMES,
    dpi: int = 80,
) -> Path:
    """A looping GIF of the 3-D map turning once around its vertical axis (``frames`` views)."""
    from PIL import Image

    names = _class_names(labels, class_names)
    fig, ax = _figure_3d(y, labels, forget, title, names, size=(4.2, 3.6), dpi=dpi, legend=False)
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


def plot_tsne_compare(
    maps: Sequence[tuple[str, np.ndarray]],
    labels: np.ndarray,
    forget: np.ndarray,
    path: Path,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
) -> Path:
    """2-D maps of several models on the same samples, side by side, aligned to the first."""
    names = _class_names(labels, class_names)
    colors = class_colors(len(names))
    fig = Figure(figsize=(3.8 * len(maps) + 1.2, 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    ref = maps[0][1]
    for ax, (name, y) in zip(axes, maps, strict=True):
        _scatter(ax, align(y, ref) if y is not ref else y - y.mean(0), labels, forget, colors)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    _legend(fig, names, colors, set(labels.tolist()), bool(forget.any()))
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run(
    features_dir: str | Path,
    out: str | Path,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    max_iter: int = DEFAULT_ITER,
    three_d: bool = True,
    gif: bool = True,
    frames: int = GIF_FRAMES,
    only_compare: bool = False,
    quiet: bool = False,
) -> list[Path]:
    """All t-SNE images for the feature folder; returns the files written.

    ``only_compare`` maps just the unlearned models that have a base or oracle, with them,
    and writes only the side-by-side figures (what the report uses)."""
    features_dir, out = Path(features_dir), Path(out)
    entries = load_index(features_dir)
    by_file = {e["file"]: e for e in entries}
    if only_compare:
        wanted: list[str] = []
        for e in entries:
            if e["role"] == "unlearned" and (e.get("base") or e.get("oracle")):
                for f in (e.get("base"), e["file"], e.get("oracle")):
                    if f and f not in wanted:
                        wanted.append(f)
        todo = [by_file[f] for f in wanted]
    else:
        todo = entries
    sets: dict[str, FeatureSet] = {}
    maps2: dict[str, np.ndarray] = {}
    written: list[Path] = []
    for e in tqdm(todo, desc="t-SNE", unit="model", disable=quiet or None):
        fs = subsample(load_features(features_dir / e["file"]), samples, seed)
        sets[e["file"]] = fs
        stem = stem_of(e["file"])
        title = f"{fs.name} ({e['role']})"
        maps2[e["file"]] = tsne_embed(fs.features, 2, seed=seed, max_iter=max_iter)
        if only_compare:
            continue
        written.append(
            plot_tsne_2d(
                maps2[e["file"]],
                fs.labels,
                fs.forget,
                out / f"{stem}_tsne2d.png",
                title=title,
                class_names=fs.class_names,
            )
        )
        if three_d:
            y3 = tsne_embed(fs.features, 3, seed=seed, max_iter=max_iter)
            written.append(
                plot_tsne_3d(
                    y3,
                    fs.labels,
                    fs.forget,
                    out / f"{stem}_tsne3d.png",
                    title=title,
                    class_names=fs.class_names,
                )
            )
            if gif:
                written.append(
                    tsne_gif(
                        y3,
                        fs.labels,
                        fs.forget,
                        out / f"{stem}_tsne3d.gif",
                        title=title,
                        class_names=fs.class_names,
                        frames=frames,
                    )
                )
    for e in todo:
        if e["role"] != "unlearned":
            continue
        u = sets[e["file"]]
        panels = []
        for role, f in (
            ("base", e.get("base")),
            ("unlearned", e["file"]),
            ("retrain oracle", e.get("oracle")),
        ):
            if f and f in maps2:
                if not np.array_equal(sets[f].indices, u.indices):
                    raise UserError(f"{f} and {e['file']} were extracted on different samples")
                panels.append((role, maps2[f]))
        if len(panels) > 1:
            p = out / f"{stem_of(e['file'])}_tsne_compare.png"
            # the unlearned model's forget set is marked in every panel
            written.append(
                plot_tsne_compare(
                    panels,
                    u.labels,
                    u.forget,
                    p,
                    title=f"{u.name}: t-SNE of penultimate features",
                    class_names=u.class_names,
                )
            )
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-D", "--dir", type=Path, required=True, help="feature folder")
    p.add_argument(
        "-S",
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help="samples per map, the same for every model; 0 = all (%(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: images/<name of -D>")
    p.add_argument("--seed", type=int, default=0, help="t-SNE random_state and subsample seed")
    p.add_argument("--iter", type=int, default=DEFAULT_ITER, help="t-SNE iterations (>= 250)")
    p.add_argument("--frames", type=int, default=GIF_FRAMES, help="GIF frames (%(default)s)")
    p.add_argument("--no-3d", action="store_true", help="skip the 3-D maps and GIFs")
    p.add_argument("--no-gif", action="store_true", help="skip the GIFs")
    p.add_argument(
        "--compare-only",
        action="store_true",
        help="only the base/unlearned/oracle side-by-side maps",
    )
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path("images") / args.dir.resolve().name
    written = run(
        args.dir,
        out,
        samples=args.samples,
        seed=args.seed,
        max_iter=args.iter,
        three_d=not args.no_3d,
        gif=not args.no_gif,
        frames=args.frames,
        only_compare=args.compare_only,
    )
    print(f"{len(written)} images in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
