"""Class x class Wasserstein distances between feature clouds, per model, and their changes.

    python wasserstein.py -D features/quickstart -S 1000 --out images/

For every feature file (``feature_extraction.py``) the samples of each class form a cloud in
feature space; entry (i, j) of the model's matrix is the **sliced Wasserstein-2 distance**
between the clouds of classes i and j (Bonneel, Rabin, Peyre & Pfister, "Sliced and Radon
Wasserstein Barycenters of Measures", J. Math. Imaging Vis. 51, 2015):

    SW_2(mu, nu) = ( integral over the unit sphere S^{d-1} of W_2^2(theta#mu, theta#nu) dtheta )^(1/2)
                ~= ( 1/L * sum_{l=1..L} W_2^2(<theta_l, X>, <theta_l, Y>) )^(1/2)

with L directions theta_l drawn uniformly on the sphere (normalised Gaussian vectors) from
``--seed``: the same directions for every pair, class and model, so the matrices are
comparable. Each 1-D term is exact, not approximated: for empirical measures with quantile
functions F^-1 and G^-1,

    W_2^2 = integral_0^1 (F^-1(t) - G^-1(t))^2 dt,

which is a finite sum over the merged grid of quantile levels {i/n} U {j/m} (so the two clouds
may have different sizes). Consequences used by the tests: SW_2(X, X) = 0; shifting a whole
cloud by a vector v gives exactly (1/L * sum_l <theta_l, v>^2)^(1/2), which tends to
|v| / sqrt(d); in one dimension SW_2 is the exact W_2, |v| for a shift by v.

Outputs (mirroring the feature folder under ``--out``, default ``images/<name of -D>``):
``<model>_wasserstein.png`` (heat map), ``<model>_wasserstein_compare.png`` for unlearned
models (base, unlearned, oracle and the delta maps unlearned - base and unlearned - oracle),
and ``wasserstein.json`` with all matrices. Colour scales are fixed for all models of the same
sample and anchored on the reference models: distances 0..R with R the largest base/oracle
entry, deltas -R/2..+R/2; values beyond saturate (arrows on the colour bars) and each panel
title gives its own maximum.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from analysis.features import FeatureSet, load_features, load_index
from core.errors import UserError, cli

matplotlib.use("Agg")  # headless; this module never imports pyplot

DEFAULT_PROJECTIONS = 256


def projections(dim: int, n: int = DEFAULT_PROJECTIONS, seed: int = 0) -> np.ndarray:
    """``n`` directions drawn uniformly on the unit sphere of R^dim, as rows [n, dim]."""
    if dim == 1:
        return np.ones((1, 1))
    g = np.random.default_rng(seed)
    theta = g.standard_normal((n, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def _quantile_grid(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments of the merged quantile grid {i/n} U {j/m}: their widths and, per segment,
    the index of the order statistic each empirical quantile function takes there."""
    t = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(t, prepend=0.0)
    mid = t - widths / 2
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return widths, ia, ib


def w2_squared_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact squared W_2 between 1-D empirical measures, column by column.

    ``a`` [n, L] and ``b`` [m, L] are sorted along axis 0 (one column per projection)."""
    widths, ia, ib = _quantile_grid(len(a), len(b))
    return (widths[:, None] * (a[ia] - b[ib]) ** 2).sum(axis=0)


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W_2 between two 1-D samples (uniform weights, any sizes)."""
    a = np.sort(np.asarray(a, dtype=np.float64).reshape(-1, 1), axis=0)
    b = np.sort(np.asarray(b, dtype=np.float64).reshape(-1, 1), axis=0)
    return float(np.sqrt(w2_squared_sorted(a, b)[0]))


def sliced_wasserstein(
    x: np.ndarray, y: np.ndarray, n_proj: int = DEFAULT_PROJECTIONS, seed: int = 0
) -> float:
    """Sliced W_2 between point clouds ``x`` [n, d] and ``y`` [m, d] (Bonneel et al. 2015)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    theta = projections(x.shape[1], n_proj, seed)
    px, py = np.sort(x @ theta.T, axis=0), np.sort(y @ theta.T, axis=0)
    return float(np.sqrt(w2_squared_sorted(px, py).mean()))


def class_distance_matrix(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    n_proj: int = DEFAULT_PROJECTIONS,
    seed: int = 0,
) -> np.ndarray:
    """[C, C] sliced W_2 between the feature clouds of every pair of classes (NaN where a class
    has no sample). Each cloud is projected and sorted once; pairs only gather and sum."""
    feats = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    theta = projections(feats.shape[1], n_proj, seed)
    proj = feats @ theta.T
    sorted_by_class = {
        c: np.sort(proj[labels == c], axis=0) for c in range(num_classes) if (labels == c).any()
    }
    d = np.full((num_classes, num_classes), np.nan)
    for i in sorted_by_class:
        d[i, i] = 0.0
        for j in sorted_by_class:
            if j > i:
                v = np.sqrt(w2_squared_sorted(sorted_by_class[i], sorted_by_class[j]).mean())
                d[i, j] = d[j, i] = v
    return d


# ---------------------------------------------------------------------------------------------
# Plots


def _heatmap(
    ax: Any,
    m: np.ndarray,
    title: str,
    vmin: float,
    vmax: float,
    cmap: str,
    class_names: Sequence[str],
    forget_classes: Sequence[int] = (),
    annotate: bool = True,
) -> Any:
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    c = len(m)
    ticks = range(c) if c <= 20 else range(0, c, max(1, c // 10))
    ax.set_xticks(list(ticks), [class_names[i] for i in ticks], fontsize=7, rotation=90)
    ax.set_yticks(list(ticks), [class_names[i] for i in ticks], fontsize=7)
    for lab in ax.get_xticklabels() + ax.get_yticklabels():
        if lab.get_text() in {class_names[i] for i in forget_classes}:
            lab.set_color("red")
            lab.set_fontweight("bold")
    if annotate and c <= 12:
        mid = (vmin + vmax) / 2
        for i in range(c):
            for j in range(c):
                if np.isfinite(m[i, j]):
                    dark = m[i, j] > mid if cmap != "RdBu_r" else abs(m[i, j]) > abs(vmax) / 2
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=5.5,
                        color="white" if dark else "black",
                    )
    ax.set_title(title, fontsize=9)
    return im


def plot_matrix(
    m: np.ndarray,
    path: Path,
    *,
    title: str,
    vmax: float | None = None,
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
) -> Path:
    """One model's class x class distance matrix as a heat map (colour scale 0..vmax)."""
    names = list(class_names or map(str, range(len(m))))
    vmax = float(np.nanmax(m)) if vmax is None else vmax
    fig = Figure(figsize=(4.6, 4.0), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.92)
    ax = fig.add_subplot()
    im = _heatmap(
        ax,
        m,
        f"{title}\nmax {np.nanmax(m):.3g}",
        0.0,
        vmax or 1.0,
        "viridis",
        names,
        forget_classes,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, extend="max", label="sliced $W_2$")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_compare(
    mats: dict[str, np.ndarray],
    path: Path,
    *,
    title: str,
    vmax: float,
    dmax: float,
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
) -> Path:
    """Base / unlearned / oracle heat maps on one scale, then the delta maps
    unlearned - base and unlearned - oracle on one symmetric scale +-dmax."""
    names = list(class_names or map(str, range(len(next(iter(mats.values()))))))
    panels = [(k, m) for k, m in mats.items() if m is not None]
    u = mats.get("unlearned")
    deltas = []
    if u is not None:
        for ref in ("base", "oracle"):
            if mats.get(ref) is not None:
                deltas.append((f"unlearned − {ref}", u - mats[ref]))
    n = len(panels) + len(deltas)
    # a fixed layout and no numbers in the cells: this figure is drawn once per model
    fig = Figure(figsize=(3.0 * n + 1.2, 3.2), dpi=100)
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.1, top=0.86, wspace=0.3)
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = dim = None
    for ax, (k, m) in zip(axes, panels, strict=False):
        k = f"{k} (max {np.nanmax(m):.3g})"
        im = _heatmap(ax, m, k, 0.0, vmax or 1.0, "viridis", names, forget_classes, False)
    for ax, (k, m) in zip(axes[len(panels) :], deltas, strict=True):
        dim = _heatmap(
            ax, m, k, -(dmax or 1.0), dmax or 1.0, "RdBu_r", names, forget_classes, False
        )
    if im is not None:
        fig.colorbar(
            im,
            ax=list(axes[: len(panels)]),
            shrink=0.8,
            pad=0.02,
            extend="max",
            label="sliced $W_2$",
        )
    if dim is not None:
        fig.colorbar(
            dim,
            ax=list(axes[len(panels) :]),
            shrink=0.8,
            pad=0.02,
            extend="both",
            label="Δ $W_2$",
        )
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------
# Over a feature folder


def subsample(fs: FeatureSet, n: int, seed: int) -> FeatureSet:
    """The same ``n`` samples of every model of a sample (chosen by position, seeded)."""
    if n <= 0 or n >= len(fs.labels):
        return fs
    keep = np.sort(np.random.default_rng(seed).permutation(len(fs.labels))[:n])
    return fs.subset(keep)


def stem_of(rel: str) -> str:
    return rel[: -len(".npz")] if rel.endswith(".npz") else rel


def shared_scales(mats: Sequence[np.ndarray], reference: Sequence[bool]) -> tuple[float, float]:
    """One colour scale for all models of a sample, anchored on the reference models.

    Distances run from 0 to R, the largest entry of the base and retrain-oracle matrices (of
    all matrices when there is no reference); delta maps run from -R/2 to +R/2. A model whose
    features blew up (e.g. gradient ascent gone too far) saturates instead of flattening
    every other map; its title gives its own maximum."""
    refs = [m for m, r in zip(mats, reference, strict=True) if r] or list(mats)
    finite = [float(np.nanmax(m)) for m in refs if np.isfinite(m).any()]
    r = max(finite) if finite and max(finite) > 0 else 1.0
    return r, r / 2


def run(
    features_dir: str | Path,
    out: str | Path,
    *,
    samples: int = 0,
    n_proj: int = DEFAULT_PROJECTIONS,
    seed: int = 0,
    per_model: bool = True,
    quiet: bool = False,
) -> list[Path]:
    """Matrices and heat maps for every feature file under ``features_dir``; returns the PNGs.

    ``per_model=False`` writes only the comparison figures of the unlearned models.

    Colour scales are fixed for every model of the same sample (:func:`shared_scales`)."""
    features_dir, out = Path(features_dir), Path(out)
    entries = load_index(features_dir)
    mats: dict[str, np.ndarray] = {}
    info: dict[str, FeatureSet] = {}
    compute = 0.0
    for e in tqdm(entries, desc="wasserstein", unit="model", disable=quiet or None):
        fs = subsample(load_features(features_dir / e["file"]), samples, seed)
        start = time.perf_counter()
        mats[e["file"]] = class_distance_matrix(
            fs.features, fs.labels, fs.num_classes, n_proj, seed
        )
        compute += time.perf_counter() - start
        info[e["file"]] = fs
    if not quiet:
        print(f"sliced W2 matrices of {len(mats)} model(s): {compute:.2f} s", file=sys.stderr)
    written: list[Path] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["sample_key"], []).append(e)
    for group in groups.values():
        vmax, dmax = shared_scales(
            [mats[e["file"]] for e in group], [e["role"] in ("base", "oracle") for e in group]
        )
        for e in group:
            fs = info[e["file"]]
            fc = fs.meta.get("forget_classes") or []
            p = out / f"{stem_of(e['file'])}_wasserstein.png"
            if per_model:
                title = f"{fs.name} ({e['role']})"
                written.append(
                    plot_matrix(
                        mats[e["file"]],
                        p,
                        title=title,
                        vmax=vmax,
                        class_names=fs.class_names,
                        forget_classes=fc,
                    )
                )
            if e["role"] == "unlearned" and (e.get("base") in mats or e.get("oracle") in mats):
                trio = {
                    "base": mats.get(e.get("base") or ""),
                    "unlearned": mats[e["file"]],
                    "oracle": mats.get(e.get("oracle") or ""),
                }
                p = out / f"{stem_of(e['file'])}_wasserstein_compare.png"
                written.append(
                    plot_compare(
                        trio,
                        p,
                        title=f"{fs.name}: class-cloud sliced W2",
                        vmax=vmax,
                        dmax=dmax,
                        class_names=fs.class_names,
                        forget_classes=fc,
                    )
                )
    out.mkdir(parents=True, exist_ok=True)
    dump = {
        "method": "sliced Wasserstein-2, exact 1-D terms",
        "projections": n_proj,
        "seed": seed,
        "samples": samples,
        "matrices": {k: _jsonable(m) for k, m in mats.items()},
    }
    (out / "wasserstein.json").write_text(json.dumps(dump))
    return written


def _jsonable(m: np.ndarray) -> list[list[float | None]]:
    """Rows of a matrix for JSON, NaN (absent class) as null."""
    return [[round(float(v), 6) if np.isfinite(v) else None for v in row] for row in m]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-D", "--dir", type=Path, required=True, help="feature folder")
    p.add_argument(
        "-S",
        "--samples",
        type=int,
        default=0,
        help="samples per model, the same for all; 0 = all (%(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: images/<name of -D>")
    p.add_argument(
        "-P",
        "--projections",
        type=int,
        default=DEFAULT_PROJECTIONS,
        help="random directions of the sliced distance (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of directions and subsample")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.projections < 1:
        raise UserError(f"-P {args.projections} is invalid; use a positive number")
    out = args.out or Path("images") / args.dir.resolve().name
    written = run(args.dir, out, samples=args.samples, n_proj=args.projections, seed=args.seed)
    print(f"{len(written)} images in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
