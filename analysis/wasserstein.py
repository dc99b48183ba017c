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

Outputs (mirroring the feature folder under ``--out``, default ``images/<name of -D>``), each
as PDF, SVG and PNG: ``<model>_wasserstein`` (heat map), ``<model>_wasserstein_compare`` for
unlearned models (base, unlearned, oracle, then the delta maps unlearned - base and unlearned -
oracle), and ``wasserstein.json`` with all matrices. The distance maps of all models of the same
sample share one colour scale anchored on the reference models (0..R, R the largest base/oracle
entry; a larger value saturates and its panel title gives its own maximum); the delta maps of a
figure share their own symmetric scale, +-(their largest |delta|).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from analysis import style
from analysis.features import FeatureSet, load_features, load_index
from core.cli_options import add_feature_io, add_fig_format, new_parser
from core.errors import UserError, cli

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

CELL_TEXT_MAX_CLASSES = 10  # numbers in the cells of a single-model map stay >= 8 pt


def _heatmap(
    ax: Any,
    m: np.ndarray,
    title: str,
    vmin: float,
    vmax: float,
    cmap: str,
    class_names: Sequence[str],
    forget_classes: Sequence[int] = (),
    annotate: bool = False,
) -> Any:
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    c = len(m)
    ticks = list(range(c)) if c <= 20 else list(range(0, c, max(1, c // 10)))
    ax.set_xticks(ticks, [class_names[i] for i in ticks])
    ax.set_yticks(ticks, [class_names[i] for i in ticks])
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    for lab in ax.get_xticklabels() + ax.get_yticklabels():
        if lab.get_text() in {class_names[i] for i in forget_classes}:
            lab.set_color(style.FORGET_COLOR)
            lab.set_fontweight("bold")
    if annotate and c <= CELL_TEXT_MAX_CLASSES:
        for i in range(c):
            for j in range(c):
                if np.isfinite(m[i, j]) and i != j:
                    dark = (m[i, j] - vmin) / ((vmax - vmin) or 1.0) < 0.45  # viridis: dark low
                    ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("class")
    return im


@style.styled
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
    fig = style.figure(style.SINGLE, 3.0)
    ax = fig.add_subplot()
    im = _heatmap(ax, m, f"{title}\nmax {np.nanmax(m):.3g}", 0.0, vmax or 1.0, "viridis",
                  names, forget_classes, annotate=len(m) <= 8)  # fmt: skip
    ax.set_ylabel("class")
    fig.colorbar(im, ax=ax, shrink=0.9, extend="max", label="sliced $W_2$")
    return style.primary(style.save_figure(fig, path))


def delta_scale(deltas: Sequence[np.ndarray]) -> float:
    """The symmetric colour limit of the delta maps: their own largest |entry|."""
    finite = [float(np.nanmax(np.abs(d))) for d in deltas if np.isfinite(d).any()]
    return max(finite) if finite and max(finite) > 0 else 1.0


@style.styled
def plot_compare(
    mats: dict[str, np.ndarray | None],
    path: Path,
    *,
    vmax: float,
    title: str = "",
    class_names: Sequence[str] | None = None,
    forget_classes: Sequence[int] = (),
) -> dict[str, Path]:
    """Base / unlearned / oracle heat maps on one scale 0..vmax (top row), then the delta maps
    unlearned − base and unlearned − oracle on their own symmetric scale ± max |delta|."""
    panels = [(k, m) for k, m in mats.items() if m is not None]
    names = list(class_names or map(str, range(len(panels[0][1]))))
    u = mats.get("unlearned")
    deltas = []
    if u is not None:
        for ref in ("base", "oracle"):
            m_ref = mats.get(ref)
            if m_ref is not None:
                deltas.append((f"unlearned − {style.ROLE_TITLES[ref]}", u - m_ref))
    rows = 2 if deltas else 1
    fig = style.figure(style.DOUBLE, 2.45 * rows + 0.1)
    axes = fig.subplots(rows, 3, squeeze=False)
    im = dim = None
    for ax, (k, m) in zip(axes[0], panels, strict=False):
        im = _heatmap(ax, m, f"{style.ROLE_TITLES.get(k, k)} (max {np.nanmax(m):.2g})", 0.0,
                      vmax or 1.0, "viridis", names, forget_classes)  # fmt: skip
    dmax = delta_scale([d for _, d in deltas])
    for ax, (k, m) in zip(axes[rows - 1], deltas, strict=False):
        dim = _heatmap(ax, m, k, -dmax, dmax, "RdBu_r", names, forget_classes)
    for row in axes:
        row[0].set_ylabel("class")
        for ax in row:
            if not ax.images:
                ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.9, pad=0.02, extend="max",
                     label="sliced $W_2$")  # fmt: skip
    if dim is not None:
        # in the free third slot of the lower row, so the upper row keeps its even spacing
        cax = axes[1, 2].inset_axes((0.04, 0.05, 0.06, 0.9))
        fig.colorbar(dim, cax=cax, label="Δ sliced $W_2$ (red: apart)")
    if title:
        fig.suptitle(title)
    return style.save_figure(fig, path)


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


def shared_scale(mats: Sequence[np.ndarray], reference: Sequence[bool]) -> float:
    """One colour scale for the distance maps of all models of a sample, anchored on the
    reference models: 0 to R, the largest entry of the base and retrain-oracle matrices (of all
    matrices when there is no reference). A model whose features blew up (e.g. gradient ascent
    gone too far) saturates instead of flattening every other map; its title gives its own
    maximum. Delta maps get their own symmetric scale (:func:`delta_scale`)."""
    refs = [m for m, r in zip(mats, reference, strict=True) if r] or list(mats)
    finite = [float(np.nanmax(m)) for m in refs if np.isfinite(m).any()]
    return max(finite) if finite and max(finite) > 0 else 1.0


def compute_matrices(
    features_dir: Path,
    entries: Sequence[dict[str, Any]],
    *,
    samples: int = 0,
    n_proj: int = DEFAULT_PROJECTIONS,
    seed: int = 0,
    quiet: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, FeatureSet]]:
    """The class x class matrix and the (subsampled) features of every entry, by file."""
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
    return mats, info


def scales(entries: Sequence[dict[str, Any]], mats: dict[str, np.ndarray]) -> dict[str, float]:
    """The distance colour scale of every entry: shared by all models of the same sample."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["sample_key"], []).append(e)
    out: dict[str, float] = {}
    for group in groups.values():
        ref = [e["role"] in ("base", "oracle") for e in group]
        vmax = shared_scale([mats[e["file"]] for e in group], ref)
        out |= {e["file"]: vmax for e in group}
    return out


def trio(e: dict[str, Any], mats: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """Base, unlearned and oracle matrices of an unlearned model's entry (None where absent)."""
    return {
        "base": mats.get(e.get("base") or ""),
        "unlearned": mats[e["file"]],
        "oracle": mats.get(e.get("oracle") or ""),
    }


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
    """Matrices and heat maps for every feature file under ``features_dir``; returns the
    figures written (their PNGs, else the first format written) and writes wasserstein.json.

    ``per_model=False`` writes only the comparison figures of the unlearned models."""
    features_dir, out = Path(features_dir), Path(out)
    entries = load_index(features_dir)
    mats, info = compute_matrices(
        features_dir, entries, samples=samples, n_proj=n_proj, seed=seed, quiet=quiet
    )
    vmax = scales(entries, mats)
    written: list[Path] = []
    for e in entries:
        fs = info[e["file"]]
        fc = fs.meta.get("forget_classes") or []
        stem = stem_of(e["file"])
        if per_model:
            written.append(plot_matrix(
                mats[e["file"]], out / f"{stem}_wasserstein", title=f"{fs.name} ({e['role']})",
                vmax=vmax[e["file"]], class_names=fs.class_names, forget_classes=fc,
            ))  # fmt: skip
        if e["role"] == "unlearned" and (e.get("base") in mats or e.get("oracle") in mats):
            files = plot_compare(
                trio(e, mats), out / f"{stem}_wasserstein_compare", vmax=vmax[e["file"]],
                title=f"{fs.name}: sliced $W_2$ between class clouds", class_names=fs.class_names,
                forget_classes=fc,
            )  # fmt: skip
            written.append(style.primary(files))
    write_matrices(out / "wasserstein.json", mats, n_proj=n_proj, seed=seed, samples=samples)
    return written


def write_matrices(
    path: Path, mats: dict[str, np.ndarray], *, n_proj: int, seed: int, samples: int
) -> None:
    """All matrices as JSON (NaN, an absent class, as null), keyed by feature file."""
    dump = {
        "method": "sliced Wasserstein-2, exact 1-D terms",
        "projections": n_proj,
        "seed": seed,
        "samples": samples,
        "matrices": {k: _jsonable(m) for k, m in mats.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dump))


def _jsonable(m: np.ndarray) -> list[list[float | None]]:
    """Rows of a matrix for JSON, NaN (absent class) as null."""
    return [[round(float(v), 6) if np.isfinite(v) else None for v in row] for row in m]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_feature_io(p, folder="feature folder", samples=0,
                   samples_help="samples per model, the same for all; 0 = all",
                   out="default: images/<name of -D>")  # fmt: skip
    p.add_argument(
        "-P",
        "--projections",
        type=int,
        default=DEFAULT_PROJECTIONS,
        help="random directions of the sliced distance (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of directions and subsample")
    add_fig_format(p)
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.projections < 1:
        raise UserError(f"-P {args.projections} is invalid; use a positive number")
    out = args.out or Path("images") / args.dir.resolve().name
    with style.formats(args.fig_format):
        written = run(args.dir, out, samples=args.samples, n_proj=args.projections, seed=args.seed)
    print(f"{len(written)} figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
