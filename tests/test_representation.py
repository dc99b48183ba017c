"""Representation metrics (evaluation/representation.py) on hand-built features with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.representation import (
    fit_linear_probe,
    knn_accuracy,
    knn_predict,
    linear_cka,
    linear_probe,
)


def _clusters(per_class: list[int], dim: int = 6, noise: float = 0.05, seed: int = 0):
    """Class c sits around 3 * e_c (one axis per class) with small Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, n in enumerate(per_class):
        centre = torch.zeros(dim)
        centre[c] = 3.0
        xs.append(centre + noise * torch.randn(n, dim, generator=g))
        ys.append(torch.full((n,), c))
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- linear probe


def test_probe_separates_clean_clusters() -> None:
    x, y = _clusters([30, 30, 30])
    xt, yt = _clusters([10, 10, 10], seed=1)
    acc = linear_probe(x, y, {"train": (x, y), "test": (xt, yt)})
    assert acc == {"train": 1.0, "test": 1.0}


def test_class_collapsed_onto_another_scores_zero_for_it() -> None:
    # the probe is fitted on the collapsed model's own features: class 2's samples are exact
    # copies of class 1 samples; class 1 has more of them, so the shared points go to class 1
    x, y = _clusters([30, 40, 30])
    ones = x[y == 1]
    x = torch.where((y == 2)[:, None], ones[torch.arange(len(x)) % len(ones)], x)
    test = {f"class {c}": (x[y == c], y[y == c]) for c in range(3)}
    acc = linear_probe(x, y, test)
    assert acc["class 2"] == 0.0
    assert acc["class 0"] == 1.0 and acc["class 1"] == 1.0


def test_probe_fitted_on_clean_features_rejects_collapsed_ones() -> None:
    x, y = _clusters([30, 30, 30])
    probe = fit_linear_probe(x, y)
    collapsed, _ = _clusters([0, 20, 0], seed=2)  # class-1 features labelled 2
    assert probe.accuracy(collapsed, torch.full((20,), 2)) == 0.0
    assert probe.predict(collapsed).tolist() == [1] * 20
    assert math.isnan(probe.accuracy(x[:0], y[:0]))


def test_probe_is_deterministic_and_ignores_feature_scale() -> None:
    x, y = _clusters([20, 20, 20], noise=1.0)
    a, b = fit_linear_probe(x, y), fit_linear_probe(x, y)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # standardisation: scaling a feature does not change the predictions
    c = fit_linear_probe(x * torch.tensor([100.0, 1, 1, 1, 1, 0.01]), y)
    xs = x * torch.tensor([100.0, 1, 1, 1, 1, 0.01])
    assert torch.equal(a.predict(x), c.predict(xs))


def test_probe_counts_classes_beyond_the_largest_label() -> None:
    x, y = _clusters([5, 5])
    assert fit_linear_probe(x, y, num_classes=4).weight.shape == (4, 6)


# -------------------------------------------------------------------------------------- kNN


def test_knn_known_answers() -> None:
    bank, bank_y = _clusters([10, 10, 10])
    q, qy = _clusters([4, 4, 4], seed=3)
    assert knn_accuracy(q, qy, bank, bank_y, k=5) == 1.0
    # queries of class 2 sitting on class 0's features: all wrong
    assert knn_accuracy(q[qy == 0], torch.full((4,), 2), bank, bank_y, k=5) == 0.0
    assert math.isnan(knn_accuracy(q[:0], qy[:0], bank, bank_y))


def test_knn_uses_cosine_similarity_and_weighted_votes() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    # far along e0 (large Euclidean distance to the bank) but cosine 1 with sample 0
    q = torch.tensor([[50.0, 0.1]])
    assert knn_predict(q, bank, labels, k=1).tolist() == [0]
    # k=4: three votes for class 1 with cosine ~0 lose to one vote with cosine ~1 at T=0.07
    assert knn_predict(q, bank, labels, k=4).tolist() == [0]
    # with a very large temperature every neighbour weighs the same: majority wins
    assert knn_predict(q, bank, labels, k=4, temperature=1e6).tolist() == [1]


# -------------------------------------------------------------------------------------- CKA


def test_cka_of_identical_features_is_one() -> None:
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = x[:, :5] @ torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = y + 0.5 * torch.randn(60, 7, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert linear_cka(x, (y @ q) * 3.7) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x * 0.01 + 5.0, y) == pytest.approx(base, abs=1e-10)  # shift and scale
    # an anisotropic scaling is not an invariance: CKA moves
    assert (
        abs(linear_cka(x, y * torch.tensor([10.0, 1, 1, 1, 1, 1, 1], dtype=torch.float64)) - base)
        > 1e-3
    )


def test_cka_known_value_for_one_of_two_orthogonal_directions() -> None:
    # X has two centred orthogonal columns of equal norm, Y keeps one: CKA = 1/sqrt(2)
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    b = torch.tensor([1.0, 1.0, -1.0, -1.0])
    x = torch.stack([a, b], 1)
    assert linear_cka(x, a[:, None]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert linear_cka(a[:, None], b[:, None]) == pytest.approx(0.0, abs=1e-12)


def test_cka_gram_and_feature_forms_agree() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 5, generator=g), torch.randn(30, 4, generator=g)
    wide = torch.cat([y, torch.zeros(30, 40)], 1)  # same representation, wider than N
    assert linear_cka(x, wide) == pytest.approx(linear_cka(x, y), abs=1e-12)


def test_cka_edge_cases() -> None:
    x = torch.randn(10, 3)
    assert math.isnan(linear_cka(x, torch.ones(10, 2)))
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, x[:5])
