"""U-LiRA (evaluation/ulira.py): known likelihood ratios and the attack on toy populations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.ulira import (
    attack_metrics,
    fit_gaussians,
    scores,
    shadow_masks,
    tpr_at_fpr,
    ulira,
)


def population(
    memorised_shift: float, seed: int = 0, k: int = 32, t: int = 16, s: int = 200
) -> tuple[np.ndarray, ...]:
    """Toy confidences: example j has its own level mu_j; a model that never trained on j gives
    N(mu_j, 1); a model that trained on j and 'unlearned' it gives N(mu_j + shift, 1).
    Shadows: balanced halves, forget set = every trained example. Targets: t models, half of
    them unlearned each example, the others never saw it."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 3.0, s)
    trained, forgotten = shadow_masks(s, k, seed, candidates=np.ones(s, dtype=bool))
    shadow = mu + rng.normal(size=(k, s)) + memorised_shift * forgotten
    target_unlearned = np.zeros((t, s), dtype=bool)
    target_unlearned[: t // 2] = True
    target = mu + rng.normal(size=(t, s)) + memorised_shift * target_unlearned
    # ulira's arguments: shadow confidences, unlearned and never-seen masks; the same for targets
    return shadow, forgotten, ~trained, target, target_unlearned, ~target_unlearned


def test_shadow_masks_are_balanced_halves() -> None:
    trained, forgotten = shadow_masks(100, 8, seed=0, forget_size=10)
    assert trained.shape == (8, 100)
    np.testing.assert_array_equal(trained.sum(axis=0), np.full(100, 4))  # each in half
    np.testing.assert_array_equal(forgotten.sum(axis=1), np.full(8, 10))
    assert not (forgotten & ~trained).any()  # forget sets come from the shadow's own half
    again, _ = shadow_masks(100, 8, seed=0, forget_size=10)
    np.testing.assert_array_equal(trained, again)
    cls = np.arange(100) < 30
    trained_c, forgotten_c = shadow_masks(100, 8, seed=0, candidates=cls)
    np.testing.assert_array_equal(forgotten_c, trained_c & cls)


def test_likelihood_ratio_known_values() -> None:
    # unlearned confidences {0, 2} (mean 1, sd 1), never seen {-1, 1} (mean 0, sd 1):
    # log N(c; 1, 1) - log N(c; 0, 1) = c - 1/2
    confs = np.array([[0.0], [2.0], [-1.0], [1.0]])
    unl = np.array([[True], [True], [False], [False]])
    g = fit_gaussians(confs, unl, ~unl)
    assert (g.mean_unlearned[0], g.std_unlearned[0], g.n_unlearned[0]) == (1.0, 1.0, 2)
    assert (g.mean_out[0], g.std_out[0], g.n_out[0]) == (0.0, 1.0, 2)
    np.testing.assert_allclose(scores(g, np.array([[0.0], [3.0]])), [[-0.5], [2.5]])
    assert np.isnan(scores(g, np.array([[0.0]]), min_count=3)).all()  # too few shadows


def test_fixed_variance_pools_within_example_spread() -> None:
    confs = np.array([[0.0, 10.0], [2.0, 14.0], [5.0, 5.0], [5.0, 5.0]])
    unl = np.array([[True, True], [True, True], [False, False], [False, False]])
    g = fit_gaussians(confs, unl, ~unl, fixed_variance=True)
    # deviations from each example's own mean: 1, 1 and 2, 2 -> pooled sd sqrt(10 / 4)
    np.testing.assert_allclose(g.std_unlearned, [math.sqrt(2.5)] * 2)
    np.testing.assert_allclose(g.mean_unlearned, [1.0, 12.0])


def test_attack_metrics_on_separated_and_identical_scores() -> None:
    perfect = attack_metrics(np.linspace(1, 2, 100), np.linspace(-2, -1, 1000))
    assert perfect["acc"] == 1.0 and perfect["auc"] == 1.0 and perfect["tpr_01pct"] == 1.0
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=20000), rng.normal(size=20000)
    chance = attack_metrics(pos, neg)
    assert chance["auc"] == pytest.approx(0.5, abs=0.01)
    assert chance["tpr_1pct"] == pytest.approx(0.01, abs=0.004)
    assert tpr_at_fpr(np.array([3.0, 1.0]), np.array([2.0, 0.0]), 0.0) == 0.5


def test_unlearned_like_never_seen_gives_chance() -> None:
    result = ulira(*population(memorised_shift=0.0))
    assert result["auc"] == pytest.approx(0.5, abs=0.03)
    assert result["acc"] == pytest.approx(0.5, abs=0.03)
    assert result["tpr_1pct"] < 0.05
    assert result["examples_scored"] == 200 and len(result["per_example_acc"]) == 200


def test_memorised_forget_set_is_found() -> None:
    result = ulira(*population(memorised_shift=4.0))
    assert result["auc"] > 0.99 and result["acc"] > 0.95 and result["tpr_1pct"] > 0.8
    assert np.nanmean(result["per_example_acc"]) > 0.95
    fixed = ulira(*population(memorised_shift=4.0), fixed_variance=True)
    assert fixed["auc"] > 0.99


def test_masks_are_checked() -> None:
    confs = np.zeros((2, 3))
    both = np.ones((2, 3), dtype=bool)
    with pytest.raises(ValueError, match="both"):
        fit_gaussians(confs, both, both)
    with pytest.raises(ValueError, match="at least 2"):
        shadow_masks(10, 1, 0, forget_size=1)
