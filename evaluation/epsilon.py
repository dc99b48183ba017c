"""Forgetting quality of the NeurIPS 2023 Machine Unlearning competition, per forget example.

Source: Triantafillou, Pedregosa, Hayes et al., "Are we making progress in unlearning? Findings
from the first NeurIPS unlearning competition" (2024), and the competition's official scorer,
google-deepmind/unlearning_evaluation, ``metric.py`` and ``main.py`` (read for the facts; the
code here is written anew and vectorised, with the same arithmetic).

For every forget example, N unlearned and N retrained models give N + N logit-scaled
confidences. The two samples are compared as the outputs of an (epsilon, delta)-DP mechanism:

1. Orientation: the "positive" sample is the one with the larger median (ties: unlearned).
2. Degenerate range: if the smaller of the two ranges (max - min) is under 1% of the larger,
   epsilon is the cap, 50 (one distribution is a spike; the rules below may miss that).
3. Decision rules: every single threshold t on ``linspace(min, max, ceil(100 (max - min)))`` over
   both samples (torch, float32 thresholds, as the scorer) predicting "positive" for c >= t;
   and every interval [l, r] (predicting the peakier sample, the smaller range, for l <= c <= r)
   with r on ``linspace(peaky.max - 2, peaky.max + 2)`` and l on
   ``linspace(r - w - 2, r - w + 2, 400)``, w the smaller range, 100 thresholds per unit.
4. Per rule, FPR and FNR (float32 means over the N models): both 0 gives infinity; exactly one
   0 discards the rule; otherwise
   ``eps = max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR)`` clipped at 0,
   delta = 1e-5 (a rule with both terms undefined is discarded too).
5. The example's epsilon is the largest over the kept rules, clipped to [0, 50].

Forgetting quality: bins of width 0.5 from 0 while the bin's end is <= ceil(ln(N - 1)); an
epsilon in the k-th bin (from 0) scores H = 2^-k, one at or above the last end scores 0;
``F`` is the mean of H over the forget set. Final score:
``F * (RA_u / RA_r) * (TA_u / TA_r)``, accuracies averaged over the N models of each kind.

Where this differs from the scorer:

* Confidences are computed exactly, ``z_y - logsumexp_{k != y} z_k`` in float64; the scorer
  exponentiates float32 logits and adds 1e-45 inside the logs, which caps |c| near 103.6.
* An example whose every rule is discarded (e.g. two identical constant samples) gets NaN and
  scores 0; the scorer stops with an assertion there.
* The issue text says the bins go "up to ceil(ln(N-1))"; the scorer's loop is
  ``while end <= ceil(ln(N - 1))``, so an epsilon at or above that value scores 0 (not the last
  bin's points). For N = 2 no bin exists and F = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from core.io import atomic_write_with, write_json
from training.outputs import Outputs

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
BUFFER = 2.0  # half-width of the interval rules' search around the peakier sample
BIN_WIDTH = 0.5
DEGENERATE_RATIO = 0.01

CONFIDENCES_FILE = "confidences.safetensors"
EPSILON_FILE = "epsilon.json"


def logit_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """Logit-scaled confidence ``log p_y - log sum_{k != y} p_k`` per row, float64 [M].

    Computed as ``z_y - logsumexp_{k != y}(z_k)``, which is exact and never overflows (the
    softmax normaliser cancels). Needs at least two classes.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [M, C] with C >= 2, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {logits.shape[0]}")
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu().view(-1, 1)
    z_y = z.gather(1, y).squeeze(1)
    others = z.scatter(1, y, float("-inf"))
    return z_y - torch.logsumexp(others, dim=1)


def confidence_matrix(outputs: Sequence[Outputs]) -> tuple[Tensor, Tensor]:
    """Confidences [N, S] of N models' outputs on one forget set, columns in dataset-index
    order, and those indices [S]. Every model must cover exactly the same indices."""
    if not outputs:
        raise ValueError("no model outputs given")
    rows: list[Tensor] = []
    indices: Tensor | None = None
    for i, o in enumerate(outputs):
        order = torch.argsort(o.indices)
        idx = o.indices[order]
        if indices is None:
            indices = idx
        elif not torch.equal(idx, indices):
            raise ValueError(f"model {i} covers other forget examples than model 0")
        rows.append(logit_confidence(o.logits[order], o.labels[order]))
    assert indices is not None
    return torch.stack(rows), indices


# --------------------------------------------------------------------------------------------
# Per-example epsilon
# --------------------------------------------------------------------------------------------


def epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Epsilon of each decision rule from its float32 FPR and FNR, with the scorer's rules.

    ``inf`` where FPR = FNR = 0 (perfect separation), NaN (rule discarded) where exactly one is
    0, else ``max(log(1-delta-FPR) - log FNR, log(1-delta-FNR) - log FPR)`` clipped at 0 and
    NaN when both terms are undefined (FPR = FNR = 1). Arithmetic in float32, as the scorer.
    """
    fpr = np.asarray(fpr, dtype=np.float32)
    fnr = np.asarray(fnr, dtype=np.float32)
    keep = np.float32(1.0 - delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        # fmax is the scorer's nanmax over the two terms: NaN only when both are NaN
        eps = np.fmax(np.log(keep - fpr) - np.log(fnr), np.log(keep - fnr) - np.log(fpr))
    eps = np.where(eps < 0, np.float32(0), eps)  # clip at 0; NaN stays NaN
    one_zero = (fpr * fnr == 0) & ~((fpr == 0) & (fnr == 0))
    eps = np.where(one_zero, np.float32(np.nan), eps)
    return np.where((fpr == 0) & (fnr == 0), np.float32(np.inf), eps).astype(np.float32)


class _Merged:
    """Both samples sorted together, with running counts, to count either side by searchsorted.

    ``below(t)`` = (#pos < t, #neg < t) and ``upto(t)`` = (#pos <= t, #neg <= t), exactly.
    """

    def __init__(self, pos: np.ndarray, neg: np.ndarray) -> None:
        values = np.concatenate([pos, neg])
        order = np.argsort(values, kind="stable")
        self.values = values[order]
        is_pos = order < len(pos)
        self.cum_pos = np.concatenate([[0], np.cumsum(is_pos)])
        self.cum_neg = np.concatenate([[0], np.cumsum(~is_pos)])

    def below(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.searchsorted(self.values, t, side="left")
        return self.cum_pos[i], self.cum_neg[i]

    def upto(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.searchsorted(self.values, t, side="right")
        return self.cum_pos[i], self.cum_neg[i]


def _single_threshold_errors(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#neg predicted positive, #pos predicted negative) per threshold: positive is c >= t."""
    both = torch.from_numpy(np.concatenate([pos, neg]))
    lo, hi = both.min(), both.max()
    num = int(torch.ceil((hi - lo) * THRESHOLDS_PER_UNIT))
    # the scorer's torch.linspace of float64 0-d tensors runs in the default dtype (float32)
    thr = torch.linspace(lo, hi, num).double().numpy()
    pos_below, neg_below = _Merged(pos, neg).below(thr)
    return len(neg) - neg_below, pos_below


def _interval_errors(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#neg predicted positive, #pos predicted negative) per interval rule [l, r].

    Here "positive" is the peakier sample (the smaller range; the other one on a tie); it is
    predicted for l <= c <= r.
    """
    pos_range = pos.max() - pos.min()
    neg_range = neg.max() - neg.min()
    width = neg_range if pos_range > neg_range else pos_range
    if pos_range >= neg_range:
        pos, neg = neg, pos
    lo = pos.min() + width - BUFFER
    hi = pos.max() + BUFFER
    right = np.linspace(lo, hi, num=int(np.ceil((hi - lo) * THRESHOLDS_PER_UNIT)))
    n_left = int(np.ceil(2 * BUFFER * THRESHOLDS_PER_UNIT))
    # rows of np.linspace with array ends equal the scorer's scalar calls, one per right end
    left = np.linspace(right - width - BUFFER, right - width + BUFFER, num=n_left, axis=1)
    merged = _Merged(pos, neg)
    pos_upto, neg_upto = merged.upto(right)
    pos_below, neg_below = merged.below(left)
    # #{l <= c <= r} = #{c <= r} - #{c < l}, and 0 for an empty interval (l > r)
    pos_in = np.maximum(pos_upto[:, None] - pos_below, 0)
    neg_in = np.maximum(neg_upto[:, None] - neg_below, 0)
    return neg_in.ravel(), len(pos) - pos_in.ravel()


def _rule_epsilons(
    false_pos: np.ndarray, false_neg: np.ndarray, n: int, delta: float
) -> np.ndarray:
    """Epsilon of every distinct (false positives, false negatives) count pair among the rules.

    A rule's epsilon depends on its two counts only, so each pair is evaluated once.
    """
    present = np.bincount(false_pos * (n + 1) + false_neg, minlength=(n + 1) ** 2) > 0
    codes = np.flatnonzero(present)
    n32 = np.float32(n)
    fpr = (codes // (n + 1)).astype(np.float32) / n32  # float32 means, as the scorer's
    fnr = (codes % (n + 1)).astype(np.float32) / n32
    return epsilon_from_rates(fpr, fnr, delta)


def example_epsilon(pos: np.ndarray, neg: np.ndarray, delta: float = DELTA) -> float:
    """Epsilon of one example from its positive (larger-median) and negative samples [N]."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    pos_range = pos.max() - pos.min()
    neg_range = neg.max() - neg.min()
    largest = max(pos_range, neg_range)
    smallest = min(pos_range, neg_range)
    # 0/0 (two constant samples) is NaN in the scorer, which fails the test and goes on
    if largest > 0 and smallest / largest < DEGENERATE_RATIO:
        return EPSILON_CAP
    fp_i, fn_i = _interval_errors(pos, neg)
    fp_s, fn_s = _single_threshold_errors(pos, neg)
    fp, fn = np.concatenate([fp_i, fp_s]), np.concatenate([fn_i, fn_s])
    eps = _rule_epsilons(fp, fn, len(pos), delta)
    kept = eps[~np.isnan(eps)]
    if kept.size == 0:
        return math.nan
    return float(np.clip(kept.max(), 0.0, EPSILON_CAP))


def _check_pair(unlearned: np.ndarray, retrained: np.ndarray) -> None:
    if unlearned.ndim != 2 or unlearned.shape != retrained.shape:
        raise ValueError(
            "unlearned and retrained confidences must both be [N models, S examples]; got "
            f"{unlearned.shape} and {retrained.shape}"
        )
    if unlearned.shape[0] < 2:
        raise ValueError(f"need at least 2 models of each kind, got {unlearned.shape[0]}")
    if not (np.isfinite(unlearned).all() and np.isfinite(retrained).all()):
        raise ValueError("confidences must be finite")


def _as_array(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def per_example_epsilon(
    unlearned: Tensor | np.ndarray, retrained: Tensor | np.ndarray, delta: float = DELTA
) -> np.ndarray:
    """Epsilon per forget example, float64 [S], from confidences [N, S] of both model sets."""
    u, r = _as_array(unlearned), _as_array(retrained)
    _check_pair(u, r)
    retrain_positive = np.median(r, axis=0) > np.median(u, axis=0)
    pos = np.where(retrain_positive, r, u)
    neg = np.where(retrain_positive, u, r)
    return np.array([example_epsilon(pos[:, j], neg[:, j], delta) for j in range(u.shape[1])])


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def max_epsilon(n: int) -> float:
    """ceil(ln(N - 1)): the largest epsilon N samples per side can tell apart (scorer's bound)."""
    return float(np.ceil(np.log(n - 1))) if n >= 2 else -math.inf


def bin_points(n: int) -> list[tuple[float, float]]:
    """(bin start, points) of the scorer's bins for N models: width 0.5, points 1, 1/2, ..."""
    top = max_epsilon(n)
    bins: list[tuple[float, float]] = []
    start, points = 0.0, 1.0
    while start + BIN_WIDTH <= top:
        bins.append((start, points))
        points /= 2
        start += BIN_WIDTH
    return bins


def example_points(eps: np.ndarray, n: int) -> np.ndarray:
    """H per example: the points of its epsilon's bin (0 past the last bin or for NaN)."""
    eps = np.asarray(eps, dtype=np.float64)
    points = np.zeros(len(eps))
    done = np.zeros(len(eps), dtype=bool)
    for start, p in bin_points(n):
        hit = ~done & (eps < start + BIN_WIDTH)
        points[hit] = p
        done |= hit
    return points


def forgetting_quality(eps: np.ndarray, n: int) -> float:
    """F = mean over the forget set of H = 2^-k, k the bin of the example's epsilon."""
    eps = np.asarray(eps, dtype=np.float64)
    if eps.size == 0:
        return math.nan
    return float(example_points(eps, n).mean())


def _mean(x: float | Sequence[float]) -> float:
    return float(np.mean(x)) if isinstance(x, Sequence) else float(x)


@dataclass(frozen=True)
class Accuracies:
    """Mean retain (RA) and test (TA) accuracies of the unlearned and the retrained models."""

    retain_acc_unlearned: float
    test_acc_unlearned: float
    retain_acc_retrained: float
    test_acc_retrained: float

    @classmethod
    def from_models(
        cls,
        retain_unlearned: float | Sequence[float],
        test_unlearned: float | Sequence[float],
        retain_retrained: float | Sequence[float],
        test_retrained: float | Sequence[float],
    ) -> Accuracies:
        """Averages per-model accuracies (or takes means as given)."""
        return cls(
            _mean(retain_unlearned),
            _mean(test_unlearned),
            _mean(retain_retrained),
            _mean(test_retrained),
        )


def final_score(quality: float, acc: Accuracies) -> float:
    """``F * (RA_u / RA_r) * (TA_u / TA_r)`` (NaN when a retrained accuracy is 0)."""
    if acc.retain_acc_retrained == 0 or acc.test_acc_retrained == 0:
        return math.nan
    return (
        quality
        * (acc.retain_acc_unlearned / acc.retain_acc_retrained)
        * (acc.test_acc_unlearned / acc.test_acc_retrained)
    )


@dataclass(frozen=True)
class EpsilonResult:
    n_models: int
    per_example_epsilon: list[float]
    forgetting_quality: float
    score: float
    accuracies: Accuracies

    def to_json(self, indices: Sequence[int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_models": self.n_models,
            "n_examples": len(self.per_example_epsilon),
            "per_example_epsilon": self.per_example_epsilon,
            "forgetting_quality": self.forgetting_quality,
            "score": self.score,
            **asdict(self.accuracies),
            "delta": DELTA,
            "epsilon_cap": EPSILON_CAP,
            "max_epsilon": max_epsilon(self.n_models),
            "bin_width": BIN_WIDTH,
        }
        if indices is not None:
            out["forget_indices"] = [int(i) for i in indices]
        return out


def evaluate(
    unlearned: Tensor | np.ndarray, retrained: Tensor | np.ndarray, acc: Accuracies
) -> EpsilonResult:
    """Per-example epsilon, forgetting quality and final score of N unlearned vs N retrained."""
    eps = per_example_epsilon(unlearned, retrained)
    n = int(np.shape(unlearned)[0])
    quality = forgetting_quality(eps, n)
    return EpsilonResult(n, [float(e) for e in eps], quality, final_score(quality, acc), acc)


def write_epsilon(
    folder: str | Path,
    unlearned: Tensor | np.ndarray,
    retrained: Tensor | np.ndarray,
    acc: Accuracies,
    indices: Sequence[int] | None = None,
    extra: dict[str, Any] | None = None,
) -> EpsilonResult:
    """Write ``confidences.safetensors`` and ``epsilon.json`` into `folder`, each atomically.

    The confidences are float64 tensors ``unlearned`` and ``retrained`` of shape [N, |S|],
    columns in the caller's order (pool-index order; `indices` lists them if given). The JSON
    is strict (NaN is written as null); `extra` keys (what was evaluated, its cost) join it.
    """
    folder = Path(folder)
    u = torch.as_tensor(_as_array(unlearned)).contiguous()
    r = torch.as_tensor(_as_array(retrained)).contiguous()
    result = evaluate(u.numpy(), r.numpy(), acc)
    atomic_write_with(
        folder / CONFIDENCES_FILE,
        lambda tmp: save_file({"unlearned": u, "retrained": r}, str(tmp)),
    )
    write_json(folder / EPSILON_FILE, (extra or {}) | result.to_json(indices))
    return result
