"""Stable MIA-Efficacy: the SalUn and loss attacks over R shadow draws, with intervals and flags.

Sources: SalUn (Fan et al., ICLR 2024) reports MIA-Efficacy from one SVC shadow attack
(:func:`salun_draw`, SalUn's ``SVC_MIA`` after Jia et al., NeurIPS 2023) on the features of
Song & Mittal (USENIX Security 2021, :func:`mia_features`); the NeurIPS 2023 unlearning kit's
loss attack is :func:`loss_draw`. This module is the one implementation of both attacks;
``metrics.salun_mia``/``metrics.loss_mia`` are the report's calls of them. One draw of the attack's shadow sample is one number from
a wide distribution: over 30 draws the same model's MIA-Efficacy had a standard deviation of up
to 25 points, and in class-wise forgetting it flips between 0 and 1 (issue 12). Here each
attack runs on R draws with independent seeds (``core.rng.stream(seed, "attack/salun/<r>",
bits=32)``, the same for every model of a run, so an oracle and an unlearned model meet the
same draws) and is reported as the mean, the sample standard deviation and a 95% Student-t
interval over the draws.

Why the class-wise value flips, and the fix (measured on mnist5k LeNet class-wise oracles,
20 epochs; README "Stable MIA-Efficacy"): every forget sample of a class-wise oracle has
p_y ~ 1e-4, so all of them share one feature value and the efficacy is one verdict of the SVC,
0 or 1. SalUn's non-member shadow set is the test set *without the forgotten class* (the set
that defines TA), so the attack has never seen a non-member of the class it is asked about;
near p_y = 0 it holds only the few retain and test samples the model gets wrong. A model that
generalises (LeNet with augmentation: 2.9% of retain and 3.2% of test below p_y = 0.5 for class
0) has as many of one as of the other there, the SVC's decision value at 0 lies inside its
margin and its sign depends on which retain samples the draw picked: class 0's oracle gave 1
in 6 of 10 draws, class 3's in 8, class 5's in 9. SalUn's 100 for Retrain comes from a model
that fits its training set (ResNet-18, train accuracy 100%): no member then has a low p_y. Fix:
:func:`stable_salun_mia` takes the test samples of the forgotten classes (``test_forget``) as
non-members too, so the shadow non-members cover every class the attack is asked about; the
oracles of all ten classes then give 1.00 in 10 of 10 draws, while the base model (which has not
forgotten) gives 0.00-0.11. In random forgetting ``test_forget`` is empty and nothing changes.

Flags (per attack feature, over the draws):

* ``degenerate``: a draw whose SVC predicts one class for every shadow sample (the attack
  learned nothing; its verdict on any sample is that class).
* ``single``: a draw that gives every forget sample the same verdict (efficacy exactly 0 or 1).
* ``unstable``: the draws disagree by more than 0.5 (max - min): the value is a coin flip of
  the shadow sample, as in the class-wise case above; only the mean and interval mean anything.
* ``uncertain`` (a number, not a flag): the mean share of forget samples inside the SVC margin.

Cost: R times one attack, plus the decision function on the shadow set per draw (to detect
degenerate draws; in numpy, about half an SVC fit, where libsvm's predict costs a whole one).
``metrics.model_report`` runs R = 10 draws of SalUn's feature and one of the three others: on
the 20-epoch mnist5k LeNet (900 shadow samples a side) it took 10.4 s per model where one draw
of all four features took 11.0 s (interleaved, best of 3, one thread, on a 2-core machine at
load ~8); an RBF fit grows about quadratically with the shadow set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC
from torch import Tensor

from core.rng import ATTACK, stream
from training.outputs import LOG_EPS, Outputs

DEFAULT_DRAWS = 10
UNSTABLE_RANGE = 0.5
NAN = math.nan

#: MIA features of :func:`mia_features`; the first is the one SalUn reports as MIA-Efficacy.
MIA_FEATURES: tuple[str, ...] = ("confidence", "entropy", "m_entropy", "loss")
MIA_DEFAULT_FEATURE: str = "confidence"


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _log1mexp(log_p: Tensor) -> Tensor:
    """Stable log(1 - exp(log_p)) for log_p <= 0, floored at LOG_EPS."""
    log_p = log_p.clamp(max=0.0)
    out = torch.where(
        log_p > -math.log(2.0),
        torch.log(-torch.expm1(log_p)),
        torch.log1p(-torch.exp(log_p)),
    )
    return out.clamp(min=LOG_EPS)


def mia_features(o: Outputs, kind: str) -> np.ndarray:
    """One MIA feature per sample, float64 [N] (Song & Mittal 2021; SalUn's ``SVC_MIA``).

    * ``confidence``: p_y, the softmax probability of the true label (SalUn's reported feature).
    * ``entropy``: H(p) = -sum_i p_i log p_i.
    * ``m_entropy``: modified entropy, -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i).
    * ``loss``: the per-sample cross-entropy -log p_y (``Outputs.losses``).

    Logs are floored at log(1e-30) as in SalUn's code, so no -inf appears.
    """
    if kind not in MIA_FEATURES:
        raise ValueError(f"unknown MIA feature {kind!r}; expected one of {MIA_FEATURES}")
    if len(o) == 0:
        return np.empty(0, dtype=np.float64)
    if kind == "loss":
        return o.losses.double().numpy()
    log_p = F.log_softmax(o.logits.double(), dim=1)
    p = log_p.exp()
    log_p = log_p.clamp(min=LOG_EPS)
    y = o.labels.view(-1, 1)
    if kind == "confidence":
        feat = p.gather(1, y).squeeze(1)
    elif kind == "entropy":
        feat = -(p * log_p).sum(dim=1)
    else:  # m_entropy
        p_y = p.gather(1, y).squeeze(1)
        log_p_y = log_p.gather(1, y).squeeze(1)
        terms = p * _log1mexp(log_p)  # p_i log(1 - p_i) for every i
        others = terms.sum(dim=1) - terms.gather(1, y).squeeze(1)
        feat = -(1.0 - p_y) * log_p_y - others
    return feat.numpy()


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Mean, sample std and two-sided Student-t interval of the finite values."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(
    values: Sequence[float] | np.ndarray,
    level: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> Interval:
    """``mean +- t_{(1+level)/2, n-1} * std / sqrt(n)`` over the finite values (std: ddof 1),
    the ends clipped to `bounds` when given (a share cannot leave [0, 1]).

    One value gives a NaN std and interval; none gives NaN everywhere.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Interval(NAN, NAN, NAN, NAN, 0)
    mean = float(v.mean())
    if n == 1:
        return Interval(mean, NAN, NAN, NAN, 1)
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, std, low, high, n)


def draw_seeds(seed: int, attack: str, draws: int) -> list[int]:
    """The R independent seeds of an attack's shadow draws under the run seed: 32-bit, since
    scikit-learn's ``random_state`` (the loss attack's folds) takes no more."""
    return [stream(seed, f"{ATTACK}/{attack}/{r}", bits=32) for r in range(draws)]


# --------------------------------------------------------------------------------------------
# SalUn's SVC attack, one draw
# --------------------------------------------------------------------------------------------


def _subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of range(n) without replacement, sorted (all, in order, if k >= n)."""
    if k >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


@dataclass(frozen=True)
class SalunDraw:
    """One draw of the SVC attack on one feature."""

    efficacy: float  # share of forget samples predicted non-member
    shadow_acc: float  # the SVC's accuracy on its own shadow sample
    degenerate: bool  # one predicted class for every shadow sample
    single: bool  # one verdict for every forget sample
    uncertain: float  # share of forget samples with |decision| < 1 (inside the margin)


NAN_DRAW = SalunDraw(NAN, NAN, False, False, NAN)


def salun_draw(
    retain: np.ndarray, test: np.ndarray, forget: np.ndarray, seed: int, max_per_side: int = 5000
) -> SalunDraw:
    """SalUn's attack (``evaluation.SVC_MIA`` of SalUn / Jia et al. 2023) on one feature.

    Members (1): ``min(len(retain), len(test), max_per_side)`` retain samples; non-members
    (0): as many test samples, both drawn with ``numpy.random.default_rng(seed)`` (SalUn takes
    the first ``len(test)`` retain samples and the whole test set; the cap keeps the SVC fast);
    then ``SVC(C=3, gamma="auto", kernel="rbf")``; efficacy = share of forget samples predicted
    non-member (higher: better forgetting). An RBF SVC fit grows roughly quadratically with
    the shadow set: at 5,000 per side one fit takes a few seconds on one core.
    """
    n = min(len(retain), len(test), max_per_side)
    if n == 0 or len(forget) == 0:
        return NAN_DRAW
    rng = np.random.default_rng(seed)
    r_idx = _subsample(len(retain), n, rng)
    t_idx = _subsample(len(test), n, rng)
    x = np.concatenate([retain[r_idx], test[t_idx]]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    target = forget.reshape(-1, 1)
    if not (np.isfinite(x).all() and np.isfinite(target).all()):
        return NAN_DRAW
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    verdict = clf.predict(target)  # the efficacy: libsvm's own verdicts, as SalUn
    # the diagnostics from the decision function in numpy (equal to libsvm's to ~1e-11, at
    # half the cost of its predict on the shadow set, which costs as much as the fit)
    shadow = (_decision(clf, x) > 0).astype(y.dtype)
    return SalunDraw(
        efficacy=float(1.0 - verdict.mean()),
        shadow_acc=float((shadow == y).mean()),
        degenerate=bool(np.all(shadow == shadow[0])),
        single=bool(np.all(verdict == verdict[0])),
        uncertain=float((np.abs(_decision(clf, target)) < 1).mean()),
    )


def _decision(clf: SVC, x: np.ndarray, rows: int = 512) -> np.ndarray:
    """The binary RBF SVC's decision function on one feature [n, 1] (> 0: class 1)."""
    sv = clf.support_vectors_[:, 0]
    coef = clf.dual_coef_[0]
    gamma = float(clf._gamma)
    out = np.empty(len(x))
    for start in range(0, len(x), rows):  # bounded memory: rows x support vectors at a time
        xs = x[start : start + rows, 0]
        out[start : start + rows] = np.exp(-gamma * (xs[:, None] - sv[None, :]) ** 2) @ coef
    return out + clf.intercept_[0]


@dataclass(frozen=True)
class StableFeature:
    """R draws of the SalUn attack on one feature, summarised."""

    feature: str
    draws: list[SalunDraw]
    interval: Interval = field(init=False)

    def __post_init__(self) -> None:
        values = [d.efficacy for d in self.draws]
        object.__setattr__(self, "interval", t_interval(values, bounds=(0.0, 1.0)))

    @property
    def values(self) -> list[float]:
        return [d.efficacy for d in self.draws]

    @property
    def flags(self) -> list[str]:
        found = []
        if any(d.degenerate for d in self.draws):
            found.append("degenerate")
        if any(d.single for d in self.draws):
            found.append("single")
        v = np.array(self.values)
        v = v[np.isfinite(v)]
        if len(v) > 1 and v.max() - v.min() > UNSTABLE_RANGE:
            found.append("unstable")
        return found

    def flat(self, name: str) -> dict[str, Any]:
        """``<name>`` (the mean), ``<name>_std``, ``_low``, ``_high``, ``_draws``, counts of
        degenerate and single-verdict draws, mean ``_uncertain`` and ``_shadow_acc``, and
        ``<name>_flags`` (a list of strings)."""
        iv = self.interval
        return {
            name: iv.mean,
            f"{name}_std": iv.std,
            f"{name}_low": iv.low,
            f"{name}_high": iv.high,
            f"{name}_draws": float(len(self.draws)),
            f"{name}_degenerate": float(sum(d.degenerate for d in self.draws)),
            f"{name}_single": float(sum(d.single for d in self.draws)),
            f"{name}_uncertain": _nanmean([d.uncertain for d in self.draws]),
            f"{name}_shadow_acc": _nanmean([d.shadow_acc for d in self.draws]),
            f"{name}_flags": self.flags,
        }


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else NAN


def stable_salun_mia(
    retain: Outputs,
    test: Outputs,
    forget: Outputs,
    seed: int,
    draws: int = DEFAULT_DRAWS,
    features: Sequence[str] = (MIA_DEFAULT_FEATURE,),
    max_per_side: int = 5000,
    n_jobs: int | None = None,
    test_forget: Outputs | None = None,
) -> dict[str, StableFeature]:
    """SalUn's MIA-Efficacy over `draws` independent shadow draws, per feature.

    `test_forget`: test samples of the forgotten classes; they join `test` as shadow
    non-members (the class-wise fix in the module docstring). Pass it in class-wise forgetting;
    without it the attack is SalUn's exactly, draw by draw.

    Draw r uses ``stream(seed, "attack/salun/r", bits=32)``; results do not depend on ``n_jobs``
    (threads; libsvm releases the GIL; default: PyTorch's thread count, the task's budget of
    running/threads.py, so that a worker of a sweep does not take more than its share).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    seeds = draw_seeds(seed, "salun", draws)
    nonmembers = [test] if test_forget is None else [test, test_forget]

    def features_of(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = np.concatenate([mia_features(o, kind) for o in nonmembers])
        return mia_features(retain, kind), t, mia_features(forget, kind)

    feats = {k: features_of(k) for k in features}
    jobs = [(k, s) for k in features for s in seeds]

    def run(job: tuple[str, int]) -> SalunDraw:
        r, t, f = feats[job[0]]
        return salun_draw(r, t, f, job[1], max_per_side)

    workers = min(n_jobs if n_jobs is not None else torch.get_num_threads(), len(jobs))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(j) for j in jobs]
    return {
        k: StableFeature(k, results[i * draws : (i + 1) * draws]) for i, k in enumerate(features)
    }


def stable_salun_flat(result: dict[str, StableFeature]) -> dict[str, Any]:
    """``mia_<feature>...`` keys for metrics.json, plus ``mia_efficacy...`` for confidence."""
    out: dict[str, Any] = {}
    for k, feat in result.items():
        out.update(feat.flat(f"mia_{k}"))
        if k == MIA_DEFAULT_FEATURE:
            out.update(feat.flat("mia_efficacy"))
    return out


# --------------------------------------------------------------------------------------------
# The kit's loss attack, one draw and R draws
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossDraw:
    acc: float  # mean fold accuracy
    auc: float  # ROC AUC of the pooled out-of-fold member probabilities
    fold_accs: list[float]
    constant_folds: int  # folds whose classifier gave one class to all its held-out samples


def loss_draw(forget: np.ndarray, test: np.ndarray, seed: int, n_splits: int = 10) -> LossDraw:
    """The NeurIPS 2023 starting kit's loss attack (``simple_mia``) on per-sample losses.

    A ``LogisticRegression()`` separates forget (1) from test (0) losses; the larger side is
    subsampled with ``seed`` to the size of the smaller one (the kit keeps ``len(test)``
    shuffled forget losses). Cross-validation is ``StratifiedKFold(n_splits, shuffle=True,
    random_state=seed)``, ``n_splits`` reduced to the per-side count when smaller (the kit uses
    ``StratifiedShuffleSplit(n_splits=10, random_state=0)``; k-fold gives every sample one
    out-of-fold probability, which the AUC needs). ``acc``: mean fold accuracy (0.5 = chance);
    ``auc``: ROC AUC of the pooled out-of-fold member probabilities.
    """
    n = min(len(forget), len(test))
    k = min(n_splits, n)
    if k < 2:
        return LossDraw(NAN, NAN, [], 0)
    rng = np.random.default_rng(seed)
    f_idx = _subsample(len(forget), n, rng)
    t_idx = _subsample(len(test), n, rng)
    x = np.concatenate([test[t_idx], forget[f_idx]]).reshape(-1, 1)
    y = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)])
    if not np.isfinite(x).all():
        return LossDraw(NAN, NAN, [], 0)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    proba = np.empty(2 * n, dtype=np.float64)
    accs: list[float] = []
    constant = 0
    for train_idx, test_idx in cv.split(x, y):
        clf = LogisticRegression()
        clf.fit(x[train_idx], y[train_idx])
        # predict and predict_proba from one decision function, as scikit-learn derives them
        # for a binary problem (the class of score > 0; expit of the score): the same numbers
        scores = clf.decision_function(x[test_idx])
        pred = clf.classes_[(scores > 0).astype(np.intp)]
        accs.append(float((pred == y[test_idx]).mean()))
        constant += int(np.all(pred == pred[0]))
        proba[test_idx] = expit(scores)
    return LossDraw(float(np.mean(accs)), float(roc_auc_score(y, proba)), accs, constant)


def stable_loss_mia(
    forget: Outputs, test: Outputs, seed: int, draws: int = DEFAULT_DRAWS, n_splits: int = 10
) -> dict[str, Any]:
    """The loss attack over `draws` draws (``stream(seed, "attack/loss/r", bits=32)``): intervals of
    its accuracy and AUC over the draws, the fold-level interval of the accuracy, and the
    share of folds whose classifier predicted one class only (``loss_mia_degenerate``)."""
    f_loss = forget.losses.double().numpy()
    t_loss = test.losses.double().numpy()
    # 100 small fits: scikit-learn's argument and finiteness checks (loss_draw checks the
    # values itself) would cost a tenth of the time
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        results = [loss_draw(f_loss, t_loss, s, n_splits) for s in draw_seeds(seed, "loss", draws)]
    acc = t_interval([d.acc for d in results], bounds=(0.0, 1.0))
    auc = t_interval([d.auc for d in results], bounds=(0.0, 1.0))
    folds = [a for d in results for a in d.fold_accs]
    fold_iv = t_interval(folds, bounds=(0.0, 1.0))
    n_folds = len(folds)
    return {
        "loss_mia_acc": acc.mean,
        "loss_mia_acc_std": acc.std,
        "loss_mia_acc_low": acc.low,
        "loss_mia_acc_high": acc.high,
        "loss_mia_acc_fold_std": fold_iv.std,
        "loss_mia_auc": auc.mean,
        "loss_mia_auc_std": auc.std,
        "loss_mia_auc_low": auc.low,
        "loss_mia_auc_high": auc.high,
        "loss_mia_draws": float(draws),
        "loss_mia_degenerate": (
            sum(d.constant_folds for d in results) / n_folds if n_folds else NAN
        ),
    }
