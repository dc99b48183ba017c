"""NeurIPS 2023 forgetting quality (evaluation/epsilon.py): known answers and the scorer's rules.

The reference below transcribes the official scorer's loops (google-deepmind
unlearning_evaluation, metric.py) threshold by threshold on the CPU; the library's vectorised
version must give the same epsilons bit for bit.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import metrics as M
from evaluation.epsilon import (
    DELTA,
    EPSILON_CAP,
    Accuracies,
    bin_points,
    confidence_matrix,
    epsilon_from_rates,
    example_points,
    final_score,
    forgetting_quality,
    logit_confidence,
    per_example_epsilon,
    write_epsilon,
)

LOG3 = float(np.log(np.float32(1 - DELTA) - np.float32(0.25)) - np.log(np.float32(0.25)))


def _reference_rates(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FPR, FNR of every rule, both families, as the scorer's tiled comparisons compute them."""
    pos_d, neg_d = pos.max() - pos.min(), neg.max() - neg.min()
    width = neg_d if pos_d > neg_d else pos_d
    p, q = (neg, pos) if pos_d >= neg_d else (pos, neg)
    lo = (p.min() + width - 2.0).numpy()
    hi = (p.max() + 2.0).numpy()
    rights = np.linspace(lo, hi, num=int(np.ceil((hi - lo) * 100)))
    w = width.numpy()
    lefts = np.concatenate([np.linspace(t - w - 2.0, t - w + 2.0, num=400) for t in rights])
    rr = torch.from_numpy(np.tile(rights.reshape(-1, 1), (1, 400)).reshape(-1))
    ll = torch.from_numpy(lefts)

    def inside(c: torch.Tensor) -> torch.Tensor:
        return ((ll[None] <= c[:, None]) & (c[:, None] <= rr[None])).float()

    fnr_d = (1 - inside(p)).mean(0)
    fpr_d = inside(q).mean(0)
    both = torch.cat([pos, neg])
    thr = torch.linspace(both.min(), both.max(), int(torch.ceil((both.max() - both.min()) * 100)))
    fpr_s = (neg[:, None] >= thr[None]).float().mean(0)
    fnr_s = (pos[:, None] < thr[None]).float().mean(0)
    return torch.cat([fpr_d, fpr_s]), torch.cat([fnr_d, fnr_s])


def _reference_epsilon(pos: np.ndarray, neg: np.ndarray) -> float:
    pd, nd = pos.max() - pos.min(), neg.max() - neg.min()
    with np.errstate(invalid="ignore", divide="ignore"):
        if min(pd, nd) / max(pd, nd) < 0.01:
            return EPSILON_CAP
    fpr_t, fnr_t = _reference_rates(torch.from_numpy(pos), torch.from_numpy(neg))
    fpr, fnr = fpr_t.numpy(), fnr_t.numpy()
    thr_eps = np.zeros(len(fpr), dtype=np.float32)
    thr_eps[(fpr + fnr == 0) & (1 - fnr + 1 - fpr == 2)] = np.inf
    thr_eps[(thr_eps == 0) & (fpr * fnr == 0)] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmax of an all-NaN column
        terms = [np.log(1 - DELTA - fpr) - np.log(fnr), np.log(1 - DELTA - fnr) - np.log(fpr)]
        computed = np.clip(np.nanmax(terms, axis=0), 0, None)
    thr_eps = np.where(thr_eps == 0, computed, thr_eps)
    kept = thr_eps[~np.isnan(thr_eps)]
    return float(np.clip(np.nanmax(kept), 0, EPSILON_CAP)) if kept.size else math.nan


def _reference(unlearned: np.ndarray, retrained: np.ndarray) -> np.ndarray:
    retrain_pos = np.median(retrained, axis=0) > np.median(unlearned, axis=0)
    pos = np.where(retrain_pos, retrained, unlearned)
    neg = np.where(retrain_pos, unlearned, retrained)
    return np.array([_reference_epsilon(pos[:, j], neg[:, j]) for j in range(pos.shape[1])])


# --------------------------------------------------------------------------------------------


def test_vectorised_epsilon_equals_the_scorers_loops_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    n, s = 5, 8
    u = rng.normal(size=(n, s))
    r = rng.normal(size=(n, s)) + np.linspace(-3, 3, s)
    u[:, 0] = np.arange(n)  # ties between the two samples
    r[:, 0] = np.arange(n) + 0.5
    u[:, 1] = r[:, 1] = np.round(rng.normal(size=n), 1)  # identical samples
    u[:, 2] = 7.0  # one constant sample: the degenerate-range cap
    u[:, 3] = np.array([1.0, 1.0, 2.0, 2.0, 2.0])  # coarse values that fall on thresholds
    r[:, 3] = np.array([1.5, 2.0, 2.0, 3.0, 4.0])
    got = per_example_epsilon(u, r)
    want = _reference(u, r)
    np.testing.assert_array_equal(got, want)
    assert got[2] == EPSILON_CAP


def test_hand_computed_case() -> None:
    # N = 4. Column 0: retrained 0..3, unlearned 2.5..5.5. Unlearned has the larger median
    # (positive). The best rules err once on each side (e.g. threshold in (2.5, 3]: 2.5 is a
    # false negative, 3 a false positive): eps = log((1 - delta - 1/4) / (1/4)) = log(3 - 4e-5).
    # Column 1: perfectly separated: FPR = FNR = 0 gives inf, capped at 50.
    # Column 2: identical samples: every rule has FPR = 1 - FNR, eps = 0.
    r = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    u = np.stack([r[:, 0] + 2.5, r[:, 1] + 10.0, r[:, 2]], axis=1)
    eps = per_example_epsilon(u, r)
    assert eps[0] == pytest.approx(math.log(3 - 4e-5), abs=1e-6)
    assert eps[0] == LOG3  # float32 arithmetic, as the scorer
    assert eps[1] == EPSILON_CAP
    assert eps[2] == 0.0
    # N = 4: bins up to ceil(ln 3) = 2: [0, .5) 1, [.5, 1) 1/2, [1, 1.5) 1/4, [1.5, 2) 1/8
    assert bin_points(4) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.25), (1.5, 0.125)]
    np.testing.assert_array_equal(example_points(eps, 4), [0.25, 0.0, 1.0])
    assert forgetting_quality(eps, 4) == pytest.approx((0.25 + 0.0 + 1.0) / 3)


def test_bins_follow_the_scorers_loop() -> None:
    # N = 512: ceil(ln 511) = 7: 14 bins; an epsilon of 7 or more scores 0
    bins = bin_points(512)
    assert len(bins) == 14 and bins[-1] == (6.5, 2.0**-13)
    np.testing.assert_array_equal(
        example_points(np.array([0.0, 0.49, 0.5, 6.99, 7.0, 50.0, math.nan]), 512),
        [1.0, 1.0, 0.5, 2.0**-13, 0.0, 0.0, 0.0],
    )
    assert bin_points(2) == []  # ln 1 = 0: no bin, F = 0 whatever the epsilons
    assert forgetting_quality(np.zeros(3), 2) == 0.0


def test_zero_rate_rules() -> None:
    eps = epsilon_from_rates(
        np.array([0.0, 0.0, 0.5, 1.0, 1.0, 0.25, 0.5]),
        np.array([0.0, 0.5, 0.0, 1.0, 0.5, 0.25, 0.5]),
    )
    assert eps[0] == np.inf  # both zero: perfect separation
    assert np.isnan(eps[1]) and np.isnan(eps[2])  # exactly one zero: rule discarded
    assert np.isnan(eps[3])  # FPR = FNR = 1: both terms undefined
    assert eps[4] == 0.0  # log(1-delta-1) undefined, the other term < 0, clipped to 0
    assert eps[5] == np.float32(LOG3)
    assert eps[6] == 0.0


def test_rules_with_one_zero_rate_do_not_set_epsilon() -> None:
    # Unlearned 5..8 against retrained {0, 1, 2, 5.5}: thresholds in (5.5, 6] make no false
    # positive but one false negative; were that rule kept, eps would be infinite. Only the
    # rules erring once on each side count: eps = log(3 - 4e-5).
    u = np.array([[5.0], [6.0], [7.0], [8.0]])
    r = np.array([[0.0], [1.0], [2.0], [5.5]])
    assert per_example_epsilon(u, r)[0] == LOG3


def test_degenerate_range_cap() -> None:
    r = np.array([[0.0], [1.0], [2.0], [3.0]])
    spike = np.array([[2.5], [2.5], [2.5], [2.501]])  # range 0.001 < 1% of 3
    assert per_example_epsilon(spike, r)[0] == EPSILON_CAP
    assert per_example_epsilon(r, spike)[0] == EPSILON_CAP  # either side
    # range 0.05 > 1% of 3: the rules decide. The interval [2.5, 2.55] would hold the whole
    # spike and no retrained value (inf), were 2.52 not retrained: the best rules err once each
    wider = np.array([[2.5], [2.5], [2.5], [2.55]])
    assert per_example_epsilon(wider, np.array([[0.0], [1.0], [2.52], [3.0]]))[0] == LOG3
    assert per_example_epsilon(wider, r)[0] == EPSILON_CAP
    # two constant samples: 0/0 passes the test; different values separate perfectly ...
    assert per_example_epsilon(np.full((4, 1), 2.0), np.full((4, 1), 1.0))[0] == EPSILON_CAP
    # ... equal values leave no rule (the scorer asserts): NaN, which scores 0
    same = per_example_epsilon(np.full((4, 1), 1.0), np.full((4, 1), 1.0))
    assert np.isnan(same[0]) and forgetting_quality(same, 4) == 0.0


def test_identical_distributions_do_not_score_one_and_a_shift_scores_lower() -> None:
    # The estimator is biased upwards: with the scorer's rules, two samples of N from the same
    # Gaussian give F near 0.2 at every N (measured 0.17-0.27 for N = 4..256), never 1.
    rng = np.random.default_rng(0)
    s = 100
    same = {}
    for n in (8, 64):
        eps = per_example_epsilon(rng.normal(size=(n, s)), rng.normal(size=(n, s)))
        same[n] = forgetting_quality(eps, n)
    for f in same.values():
        assert 0.1 < f < 0.35
    shifted = per_example_epsilon(rng.normal(size=(64, s)) + 1.0, rng.normal(size=(64, s)))
    assert forgetting_quality(shifted, 64) < same[64] - 0.07


def test_logit_confidence_is_exact() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1000.0, 0.0, -5.0]])
    labels = torch.tensor([0, 1, 0])
    c = logit_confidence(logits, labels)
    assert c.dtype == torch.float64
    assert c[0].item() == pytest.approx(2.0 - math.log(2.0), abs=1e-12)
    assert c[1].item() == pytest.approx(1.0 - math.log(1.0 + math.exp(3.0)), abs=1e-12)
    # the scorer, flooring probabilities at 1e-45, would give about 103.6
    assert c[2].item() == pytest.approx(1000.0 - math.log1p(math.exp(-5.0)), abs=1e-9)
    # the scorer's formula on moderate logits
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(1))
    p = torch.softmax(x.double(), 1)
    py = p[torch.arange(50), y]
    official = torch.log(py + 1e-45) - torch.log(1 - py + 1e-45)
    torch.testing.assert_close(logit_confidence(x, y), official, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        logit_confidence(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def test_final_score_averages_accuracies_over_models() -> None:
    acc = Accuracies.from_models([0.8, 1.0], [0.5, 0.7], [1.0, 1.0], [0.8, 0.8])
    assert acc == Accuracies(0.9, 0.6, 1.0, 0.8)
    assert final_score(0.5, acc) == pytest.approx(0.5 * 0.9 * 0.75)
    assert math.isnan(final_score(0.5, Accuracies(0.9, 0.6, 0.0, 0.8)))


def test_write_epsilon_files(tmp_path: Path) -> None:
    r = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [2.0, 2.0, 1.0], [3.0, 3.0, 1.0]])
    u = np.stack([r[:, 0] + 2.5, r[:, 1] + 10.0, r[:, 2]], axis=1)
    acc = Accuracies(0.9, 0.6, 1.0, 0.8)
    result = write_epsilon(tmp_path / "epsilon", u, torch.from_numpy(r), acc, indices=[7, 9, 12])
    tensors = load_file(tmp_path / "epsilon" / "confidences.safetensors")
    assert set(tensors) == {"unlearned", "retrained"}
    assert tensors["unlearned"].shape == (4, 3) and tensors["unlearned"].is_floating_point()
    np.testing.assert_array_equal(tensors["unlearned"].numpy(), u)
    np.testing.assert_array_equal(tensors["retrained"].numpy(), r)
    text = (tmp_path / "epsilon" / "epsilon.json").read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["n_models"] == 4 and data["forget_indices"] == [7, 9, 12]
    assert data["per_example_epsilon"][0] == LOG3 and data["per_example_epsilon"][1] == 50.0
    assert data["per_example_epsilon"][2] is None  # constant and equal: no rule, NaN -> null
    assert data["forgetting_quality"] == pytest.approx(0.25 / 3)
    assert data["score"] == pytest.approx(0.25 / 3 * 0.9 * 0.75)
    assert data["retain_acc_unlearned"] == 0.9 and data["test_acc_retrained"] == 0.8
    assert result.forgetting_quality == data["forgetting_quality"]
    assert not list((tmp_path / "epsilon").glob("*.tmp"))


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="both be"):
        per_example_epsilon(np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        per_example_epsilon(np.zeros((1, 3)), np.zeros((1, 3)))


def test_confidence_matrix_orders_columns_by_dataset_index() -> None:
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    a = M.Outputs(logits, labels, torch.zeros(3), torch.tensor([30, 10, 20]))
    perm = torch.tensor([1, 2, 0])
    b = M.Outputs(logits[perm], labels[perm], torch.zeros(3), torch.tensor([10, 20, 30]))
    confs, idx = confidence_matrix([a, b])
    assert idx.tolist() == [10, 20, 30] and confs.shape == (2, 3)
    torch.testing.assert_close(confs[0], torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(confs[1], confs[0])
    other = M.Outputs(logits, labels, torch.zeros(3), torch.tensor([30, 10, 21]))
    with pytest.raises(ValueError, match="other forget examples"):
        confidence_matrix([a, other])
