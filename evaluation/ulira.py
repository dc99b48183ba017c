"""U-LiRA: the per-example likelihood-ratio attack on unlearning.

Source: Hayes, Shumailov, Triantafillou, Khalifa, Papernot, "Inexact Unlearning Needs More
Careful Evaluations to Avoid a False Sense of Privacy" (2024), adapting LiRA (Carlini et al.,
"Membership Inference Attacks From First Principles", S&P 2022) to unlearning.

K shadow models are trained on random halves of the pool (each example in exactly half of
them); each shadow then unlearns a forget set drawn from its own half with the method under
test. For every example j the attacker fits two Gaussians to logit-scaled confidences
(``evaluation.epsilon.logit_confidence``): "unlearned" (shadows that trained on j and unlearned
it) and "never trained on" (shadows whose half did not hold j). A target model's confidence c
on j gets the score

    log N(c; mu_unlearned_j, sd_unlearned_j) - log N(c; mu_out_j, sd_out_j)

(> 0: more likely unlearned than never seen). The game: target (model, example) pairs where the
example was unlearned (positives: the evaluated unlearned models on their forget set) against
pairs where it was never trained on (negatives: e.g. the retrained oracles on the same forget
set). Reported: balanced accuracy of the score > 0 decision, ROC AUC, and TPR at 1% and 0.1%
FPR. A perfect unlearning method leaves 0.5 / 0.5 / 0.01 / 0.001 (TPR = FPR).

Everything here is a pure function of confidence arrays and masks; training the shadows is the
runner's job (cost: K base trainings plus K unlearning runs; :func:`shadow_masks` draws the
halves and forget sets). Means and standard deviations are the Gaussians' maximum-likelihood
fits (LiRA's code uses medians for the means); ``fixed_variance`` pools one within-example
standard deviation per hypothesis, LiRA's choice for few shadows (fewer than ~64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from core.rng import numpy_rng

MIN_STD = 1e-6  # a spike (all shadows equal) still has a finite density
NAN = math.nan


def shadow_halves(n_pool: int, shadows: int, seed: int) -> np.ndarray:
    """Training halves of K shadows, bool [K, P]: each pool example is in exactly ``K // 2``
    of them (LiRA's balanced split, from ``numpy_rng(seed, "ulira/halves")``)."""
    if shadows < 2:
        raise ValueError(f"U-LiRA needs at least 2 shadow models, got {shadows}")
    order = np.argsort(numpy_rng(seed, "ulira/halves").random((shadows, n_pool)), axis=0)
    return order < shadows // 2


def shadow_masks(
    n_pool: int,
    shadows: int,
    seed: int,
    *,
    forget_size: int | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Training halves and forget sets of K shadows: (trained [K, P], forgotten [K, P]) bool.

    Halves from :func:`shadow_halves`. Forget sets: every trained example among `candidates`
    (e.g. the forgotten class, or the evaluated forget set), topped up to `forget_size` with
    other trained examples when both are given (so each evaluated example is unlearned in about
    half of the shadows, and every shadow forgets as many examples as the evaluated run); with
    `forget_size` alone, that many trained examples per shadow. Draws from
    ``numpy_rng(seed, "ulira/forget")``.
    """
    trained = shadow_halves(n_pool, shadows, seed)
    if candidates is None and forget_size is None:
        raise ValueError("give forget_size or candidates")
    cand = (
        np.zeros(n_pool, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    )
    forgotten = trained & cand[None, :]
    if forget_size is None:
        return trained, forgotten
    rng = numpy_rng(seed, "ulira/forget")
    for k in range(shadows):
        need = forget_size - int(forgotten[k].sum())
        pool = np.flatnonzero(trained[k] & ~cand)
        if need > len(pool):
            raise ValueError(f"forget_size {forget_size} exceeds a shadow's half ({len(pool)})")
        if need > 0:
            forgotten[k, rng.choice(pool, size=need, replace=False)] = True
    return trained, forgotten


@dataclass(frozen=True)
class Gaussians:
    """Per-example fits [S]: mean, std and sample count of each hypothesis."""

    mean_unlearned: np.ndarray
    std_unlearned: np.ndarray
    n_unlearned: np.ndarray
    mean_out: np.ndarray
    std_out: np.ndarray
    n_out: np.ndarray


def _fit(confs: np.ndarray, mask: np.ndarray, fixed: bool) -> tuple[np.ndarray, ...]:
    n = mask.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(mask, confs, 0.0).sum(axis=0) / n
        sq = np.where(mask, (confs - mean) ** 2, 0.0).sum(axis=0)
        std = np.sqrt(sq / n)
        if fixed:
            std = np.full_like(mean, math.sqrt(sq[n > 0].sum() / max(int(n.sum()), 1)))
    return mean, np.maximum(std, MIN_STD), n


def fit_gaussians(
    confs: np.ndarray,
    unlearned: np.ndarray,
    out: np.ndarray,
    fixed_variance: bool = False,
) -> Gaussians:
    """Fit both hypotheses per example from shadow confidences [K, S] and bool masks [K, S]:
    `unlearned` (shadow trained on the example, then unlearned it), `out` (never trained on)."""
    confs = np.asarray(confs, dtype=np.float64)
    unlearned = np.asarray(unlearned, dtype=bool)
    out = np.asarray(out, dtype=bool)
    if not (confs.shape == unlearned.shape == out.shape) or confs.ndim != 2:
        raise ValueError(
            f"shadow confidences and masks must share one [K, S] shape, got {confs.shape}, "
            f"{unlearned.shape}, {out.shape}"
        )
    if (unlearned & out).any():
        raise ValueError("an example cannot be both unlearned and never trained on")
    mu, su, nu = _fit(confs, unlearned, fixed_variance)
    mo, so, no = _fit(confs, out, fixed_variance)
    return Gaussians(mu, su, nu, mo, so, no)


def _log_normal(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)


def scores(g: Gaussians, target_confs: np.ndarray, min_count: int = 2) -> np.ndarray:
    """Log-likelihood ratio per target model and example [T, S]; NaN for an example with fewer
    than `min_count` shadows under either hypothesis."""
    c = np.asarray(target_confs, dtype=np.float64)
    llr = _log_normal(c, g.mean_unlearned, g.std_unlearned) - _log_normal(c, g.mean_out, g.std_out)
    enough = (g.n_unlearned >= min_count) & (g.n_out >= min_count)
    return np.where(enough[None, :], llr, NAN)


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float) -> float:
    """Largest TPR of a threshold on the score whose FPR is at most `fpr`."""
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    fprs, tprs, _ = roc_curve(y, np.r_[positive, negative])
    return float(tprs[fprs <= fpr].max())


def attack_metrics(positive: np.ndarray, negative: np.ndarray) -> dict[str, float]:
    """Scores of unlearned (positive) and never-seen (negative) targets -> the attack's quality.

    ``acc``: balanced accuracy of "unlearned if score > 0"; ``auc``: ROC AUC; ``tpr_1pct``,
    ``tpr_01pct``: TPR at 1% and 0.1% FPR (resolution 1 / #negatives). NaN scores are dropped.
    """
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    result = {"n_positive": float(len(pos)), "n_negative": float(len(neg))}
    if len(pos) == 0 or len(neg) == 0:
        return result | {"acc": NAN, "auc": NAN, "tpr_1pct": NAN, "tpr_01pct": NAN}
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return result | {
        "acc": float(((pos > 0).mean() + (neg <= 0).mean()) / 2),
        "auc": float(roc_auc_score(y, np.r_[pos, neg])),
        "tpr_1pct": tpr_at_fpr(pos, neg, 0.01),
        "tpr_01pct": tpr_at_fpr(pos, neg, 0.001),
    }


def per_example_accuracy(
    llr: np.ndarray, target_unlearned: np.ndarray, target_out: np.ndarray
) -> np.ndarray:
    """Balanced accuracy of "score > 0" per example [S] over the target models (NaN without
    targets of both kinds): how exposed each example is (Hayes et al.: it varies widely)."""
    hit_pos = np.where(target_unlearned, llr > 0, False).sum(axis=0)
    hit_neg = np.where(target_out, llr <= 0, False).sum(axis=0)
    n_pos = (target_unlearned & np.isfinite(llr)).sum(axis=0)
    n_neg = (target_out & np.isfinite(llr)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (hit_pos / n_pos + hit_neg / n_neg) / 2
    return np.where((n_pos > 0) & (n_neg > 0), acc, NAN)


def ulira(
    shadow_confs: np.ndarray,
    shadow_unlearned: np.ndarray,
    shadow_out: np.ndarray,
    target_confs: np.ndarray,
    target_unlearned: np.ndarray,
    target_out: np.ndarray,
    *,
    fixed_variance: bool = False,
    min_count: int = 2,
) -> dict[str, Any]:
    """The whole attack: fit on shadows [K, S], score targets [T, S], evaluate the game.

    ``target_unlearned[t, j]``: target model t unlearned example j (positive);
    ``target_out[t, j]``: t never trained on j (negative); other pairs are not attacked.
    Returns the :func:`attack_metrics` keys, ``n_shadows``, ``per_example_acc`` (a list) and
    ``examples_scored`` (examples with enough shadows under both hypotheses).
    """
    target_unlearned = np.asarray(target_unlearned, dtype=bool)
    target_out = np.asarray(target_out, dtype=bool)
    target_confs = np.asarray(target_confs, dtype=np.float64)
    if not (target_confs.shape == target_unlearned.shape == target_out.shape):
        raise ValueError("target confidences and masks must share one [T, S] shape")
    if target_confs.shape[1] != np.shape(shadow_confs)[1]:
        raise ValueError("shadow and target confidences must cover the same examples")
    g = fit_gaussians(shadow_confs, shadow_unlearned, shadow_out, fixed_variance)
    llr = scores(g, target_confs, min_count)
    result: dict[str, Any] = attack_metrics(llr[target_unlearned], llr[target_out])
    result["n_shadows"] = float(np.shape(shadow_confs)[0])
    result["examples_scored"] = float(np.isfinite(llr).all(axis=0).sum())
    result["per_example_acc"] = [
        float(a) for a in per_example_accuracy(llr, target_unlearned, target_out)
    ]
    return result
