"""Tests for metrics.py: known answers on hand-built logits and tiny nn.Linear models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metrics as M
from evaluation.mia import stable_salun_mia


def make_outputs(logits, labels, indices=None) -> M.Outputs:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if indices is None:
        indices = torch.arange(len(labels))
    return M.Outputs(
        logits=logits,
        labels=labels,
        losses=F.cross_entropy(logits, labels, reduction="none"),
        indices=torch.as_tensor(indices, dtype=torch.long),
    )


def binary_with_losses(losses: np.ndarray) -> M.Outputs:
    """Two-class outputs with label 0 whose cross-entropy equals ``losses`` exactly.

    CE of logits [0, z] with label 0 is softplus(z); z = log(exp(loss) - 1).
    """
    z = np.log(np.expm1(np.asarray(losses, dtype=np.float64)))
    logits = np.stack([np.zeros_like(z), z], axis=1)
    return make_outputs(logits, np.zeros(len(z), dtype=np.int64))


def perfect(n: int, c: int, offset: int = 0, n_labels: int | None = None) -> M.Outputs:
    """Confident, correct outputs with C = ``c`` units and labels cycling over ``n_labels``."""
    labels = torch.arange(n) % (n_labels or c)
    return make_outputs(20.0 * F.one_hot(labels, c).float(), labels, torch.arange(n) + offset)


# --------------------------------------------------------------------------------------------
# Outputs, collect_outputs
# --------------------------------------------------------------------------------------------


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.fc(self.drop(x))


@pytest.mark.parametrize("start_training", [True, False])
def test_collect_outputs_order_and_mode(start_training: bool) -> None:
    torch.manual_seed(0)
    model = _Recorder()
    model.train(start_training)
    model.drop.train(True)  # a mixed state must also be restored
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    order = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    batches = [
        (x[order[i : i + 3]], y[order[i : i + 3]], order[i : i + 3]) for i in range(0, 10, 3)
    ]

    o = M.collect_outputs(model, batches)

    assert len(o) == 10
    assert torch.equal(o.indices, order)
    assert torch.equal(o.labels, y[order])
    assert o.logits.dtype == torch.float32 and o.logits.shape == (10, 3)
    assert o.logits.device.type == "cpu"
    with torch.no_grad():
        expected = model.fc(x[order])
    torch.testing.assert_close(o.logits, expected)
    torch.testing.assert_close(o.losses, F.cross_entropy(expected, y[order], reduction="none"))
    assert model.seen_training == [False] * 4  # eval mode during the pass
    assert model.training is start_training
    assert model.drop.training is True
    assert not o.logits.is_inference()


def test_collect_outputs_empty() -> None:
    o = M.collect_outputs(nn.Linear(2, 2), [])
    assert len(o) == 0
    assert math.isnan(M.accuracy(o))
    assert math.isnan(M.kl_to_uniform(o))


def test_outputs_properties() -> None:
    o = make_outputs([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], [0, 1])
    torch.testing.assert_close(o.probs.sum(dim=1), torch.ones(2))
    assert o.preds.tolist() == [0, 2]
    assert o.correct.tolist() == [True, False]
    assert len(o) == 2 and o.num_classes == 3


# --------------------------------------------------------------------------------------------
# Accuracies
# --------------------------------------------------------------------------------------------


def test_accuracy_and_per_class_hand_built() -> None:
    logits = torch.tensor(
        [[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 5.0, 0, 0], [0, 5.0, 0, 0], [5.0, 0, 0, 0]]
    )
    o = make_outputs(logits, [0, 0, 1, 1, 2])  # preds 0, 1, 1, 1, 0
    assert M.accuracy(o) == pytest.approx(3 / 5)
    pc = M.per_class_accuracy(o, 4)
    assert pc[:3] == pytest.approx([0.5, 1.0, 0.0])
    assert math.isnan(pc[3])


def test_perfect_model_report() -> None:
    outs = {"forget": perfect(20, 4), "retain": perfect(40, 4, 100), "test": perfect(30, 4, 500)}
    r = M.model_report(outs, seed=0, num_classes=4)
    assert r["forget_acc"] == 1.0 and r["UA"] == 0.0
    assert r["RA"] == 1.0 and r["TA"] == 1.0 and r["retain_acc"] == 1.0
    assert math.isnan(r["test_forget_acc"]) and math.isnan(r["val_acc"])
    assert r["per_class_test_acc"] == [1.0] * 4


def test_model_report_classwise_and_empty_forget() -> None:
    c = 3
    test = perfect(30, c, 500, n_labels=2)  # classes 0, 1 only
    tf_logits = torch.zeros(5, c)
    tf_logits[0, 2] = 3.0  # one of the five forgotten-class test samples is still recognised
    test_forget = make_outputs(tf_logits, torch.full((5,), 2), torch.arange(5) + 900)
    outs = {
        "forget": M.concat_outputs(),
        "retain": perfect(30, c, n_labels=2),
        "test": test,
        "test_forget": test_forget,
        "val": perfect(6, 3, 700),
    }
    r = M.model_report(outs, seed=1, num_classes=c)
    for key in ("forget_acc", "UA", "mia_efficacy", "loss_mia_acc", "loss_mia_auc"):
        assert math.isnan(r[key]), key
    assert math.isnan(r["kl_uniform_forget"])
    assert r["test_forget_acc"] == pytest.approx(1 / 5)
    assert r["val_acc"] == 1.0
    assert r["per_class_test_acc"][:2] == [1.0, 1.0]
    assert r["per_class_test_acc"][2] == pytest.approx(1 / 5)


def test_model_report_tiny_sets() -> None:
    outs = {"forget": perfect(1, 2), "retain": perfect(2, 2, 10), "test": perfect(1, 2, 20)}
    r = M.model_report(outs, seed=0, num_classes=2)
    assert r["UA"] == 0.0
    assert math.isnan(r["loss_mia_acc"])  # < 2 samples per side
    assert 0.0 <= r["mia_efficacy"] <= 1.0


# --------------------------------------------------------------------------------------------
# MIA features and attacks
# --------------------------------------------------------------------------------------------


def test_uniform_model_entropy_and_kl() -> None:
    c = 7
    o = make_outputs(torch.zeros(5, c), torch.arange(5) % c)
    assert M.kl_to_uniform(o) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(M.mia_features(o, "entropy"), math.log(c), rtol=1e-12)
    np.testing.assert_allclose(M.mia_features(o, "confidence"), 1 / c, rtol=1e-12)
    np.testing.assert_allclose(M.mia_features(o, "loss"), math.log(c), rtol=1e-6)


def test_kl_to_uniform_one_hot_and_seed_formula() -> None:
    c = 10
    one_hot = make_outputs(1e4 * torch.eye(c), torch.arange(c))
    assert M.kl_to_uniform(one_hot) == pytest.approx(math.log(c), rel=1e-6)
    torch.manual_seed(0)
    logits = 3 * torch.randn(50, c)
    o = make_outputs(logits, torch.randint(0, c, (50,)))
    # seed 001 measure_target_uniformity: (probs * log_probs).sum(1) + log(num_classes), mean
    log_probs = F.log_softmax(logits, dim=1)
    seed_value = ((log_probs.exp() * log_probs).sum(dim=1) + torch.log(torch.tensor(c))).mean()
    assert M.kl_to_uniform(o) == pytest.approx(float(seed_value), rel=1e-6)


def test_modified_entropy_hand_computation() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    y = np.array([0, 2])
    o = make_outputs(np.log(p), y)
    hand0 = -(0.3 * math.log(0.7)) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    hand1 = -(0.7 * math.log(0.3)) - 0.1 * math.log(0.9) - 0.6 * math.log(0.4)
    np.testing.assert_allclose(M.mia_features(o, "m_entropy"), [hand0, hand1], rtol=1e-6)
    np.testing.assert_allclose(M.mia_features(o, "confidence"), [0.7, 0.3], rtol=1e-6)
    np.testing.assert_allclose(
        M.mia_features(o, "entropy"), -(p * np.log(p)).sum(axis=1), rtol=1e-6
    )
    np.testing.assert_allclose(M.mia_features(o, "loss"), [-math.log(0.7), -math.log(0.3)], 1e-6)
    # extreme logits: finite everywhere (logs are floored)
    extreme = make_outputs([[1e4, -1e4, 0.0]], [1])
    for kind in M.MIA_FEATURES:
        assert np.isfinite(M.mia_features(extreme, kind)).all(), kind
    with pytest.raises(ValueError):
        M.mia_features(o, "bogus")


def test_loss_mia_same_distribution_is_chance() -> None:
    rng = np.random.default_rng(123)
    forget = binary_with_losses(rng.exponential(1.0, 1000) + 1e-3)
    test = binary_with_losses(rng.exponential(1.0, 1000) + 1e-3)
    r = M.loss_mia(forget, test, seed=0)
    assert r["loss_mia_acc"] == pytest.approx(0.5, abs=0.05)
    assert r["loss_mia_auc"] == pytest.approx(0.5, abs=0.06)


def test_memorised_forget_set_is_caught() -> None:
    rng = np.random.default_rng(7)
    forget = binary_with_losses(rng.uniform(1e-4, 1e-2, 300))
    retain = binary_with_losses(rng.uniform(1e-4, 1e-2, 600))
    test = binary_with_losses(rng.uniform(1.0, 4.0, 400))
    r = M.loss_mia(forget, test, seed=0, draws=3)
    assert r["loss_mia_acc"] > 0.95
    assert r["loss_mia_auc"] > 0.99
    assert r["loss_mia_acc_low"] <= r["loss_mia_acc"] <= r["loss_mia_acc_high"]
    s = M.salun_mia(retain, test, forget, seed=0, draws=3)
    values = {k: v for k, v in s.items() if k in {f"mia_{f}" for f in M.MIA_FEATURES}}
    assert set(values) == {"mia_confidence", "mia_entropy", "mia_m_entropy", "mia_loss"}
    assert s["mia_efficacy"] == s["mia_confidence"] and s["mia_efficacy_draws"] == 3.0
    for key, value in values.items():
        assert value < 0.05, key
    # a forget set that looks like unseen data is declared a non-member
    forgotten = binary_with_losses(rng.uniform(1.0, 4.0, 300))
    s2 = M.salun_mia(retain, test, forgotten, seed=0, draws=3)
    for key in values:
        assert s2[key] > 0.95, key


def test_salun_mia_seeded_and_capped() -> None:
    rng = np.random.default_rng(3)
    retain = binary_with_losses(rng.exponential(0.3, 500) + 1e-3)
    test = binary_with_losses(rng.exponential(1.0, 300) + 1e-3)
    forget = binary_with_losses(rng.exponential(0.6, 100) + 1e-3)
    a = M.salun_mia(retain, test, forget, seed=5, max_per_side=50, draws=4)
    b = M.salun_mia(retain, test, forget, seed=5, max_per_side=50, draws=4)
    assert a == b
    serial = M.salun_mia(retain, test, forget, seed=5, max_per_side=50, n_jobs=1, draws=4)
    assert serial == a
    assert a["mia_efficacy_low"] <= a["mia_efficacy"] <= a["mia_efficacy_high"]
    only = M.salun_mia(retain, test, forget, seed=5, features=("loss",), draws=2)
    assert {"mia_loss", "mia_confidence", "mia_efficacy"} <= set(only)
    assert "mia_entropy" not in only
    empty = M.salun_mia(retain, test, M.concat_outputs(), seed=5, draws=2)
    assert all(math.isnan(empty[f"mia_{k}"]) for k in M.MIA_FEATURES)


def test_other_features_take_the_first_draw_of_the_stable_attack() -> None:
    rng = np.random.default_rng(4)
    retain = binary_with_losses(rng.exponential(0.3, 400) + 1e-3)
    test = binary_with_losses(rng.exponential(1.0, 300) + 1e-3)
    forget = binary_with_losses(rng.exponential(0.6, 100) + 1e-3)
    many = M.salun_mia(retain, test, forget, seed=2, draws=5)
    one = M.salun_mia(retain, test, forget, seed=2, draws=1)
    for k in ("entropy", "m_entropy", "loss"):
        assert many[f"mia_{k}"] == one[f"mia_{k}"], k  # draw 0 either way
    draws = stable_salun_mia(retain, test, forget, seed=2, draws=5)["confidence"].values
    assert one["mia_efficacy"] == draws[0]
    assert many["mia_efficacy"] == pytest.approx(float(np.mean(draws)), abs=1e-12)


# --------------------------------------------------------------------------------------------
# Distances, frozen layers
# --------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2)
        self.fc20 = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc20(self.fc2(self.bn(self.fc1(x))))


def test_l2_distance() -> None:
    torch.manual_seed(0)
    original = _Tiny()
    model = copy.deepcopy(original)
    assert M.l2_distance(model, model) == 0.0
    assert M.l2_distance(model, original) == 0.0
    with torch.no_grad():
        model.fc1.weight[0, 0] += 0.5
        model.fc2.bias[1] -= 1.0
        model.bn.running_mean += 10.0  # buffer: not counted (seed uses named_parameters)
    assert M.l2_distance(model, original) == pytest.approx(math.sqrt(0.25 + 1.0), rel=1e-6)
    assert M.l2_distance(model, original.state_dict()) == M.l2_distance(model, original)
    model.fc2.bias.requires_grad_(False)  # the seed skips parameters without requires_grad
    assert M.l2_distance(model, original) == pytest.approx(0.5, rel=1e-6)


def test_changed_parameters() -> None:
    torch.manual_seed(0)
    original = _Tiny()
    model = copy.deepcopy(original)
    assert M.changed_parameters(model, original, ["fc2"]) == []
    with torch.no_grad():
        model.fc1.weight[1, 2] += 1.0
        model.fc20.weight[0, 0] += 1.0  # "fc20" is not under "fc2"
        model.bn.running_var += 1.0
    assert M.changed_parameters(model, original, ["fc2"]) == []
    with torch.no_grad():
        model.fc2.weight[1, 3] += 1e-3
    assert M.changed_parameters(model, original, ["fc2"]) == ["fc2.weight"]
    assert M.changed_parameters(model, original, ["fc2."]) == ["fc2.weight"]
    assert M.changed_parameters(model, original, ["fc1", "bn"]) == ["fc1.weight", "bn.running_var"]


# --------------------------------------------------------------------------------------------
# Challenge score (seed 001)
# --------------------------------------------------------------------------------------------


def _seed_compute_final_score(kl_after, acc_rest_after, l2_dist, acc_target_after):
    """Seed 001's compute_final_score, transcribed (without the prints)."""

    def compute_metric_score(value, thresholds, maximize=True):
        if maximize:
            if value >= thresholds[1]:
                return 100
            elif value <= thresholds[0]:
                return 0
            else:
                return 100 * (value - thresholds[0]) / (thresholds[1] - thresholds[0])
        else:
            if value <= thresholds[0]:
                return 100
            elif value >= thresholds[1]:
                return 0
            else:
                return 100 * (thresholds[1] - value) / (thresholds[1] - thresholds[0])

    if acc_rest_after < 0.75 or acc_target_after > 0.5 or l2_dist > 8.0 or kl_after > 1.75:
        return 0
    kl_score = compute_metric_score(kl_after, [0.2, 0.5], maximize=False)
    acc_rest_score = compute_metric_score(acc_rest_after, [0.87, 0.90], maximize=True)
    l2_dist_score = compute_metric_score(l2_dist, [1.3, 3.0], maximize=False)
    acc_target_score = compute_metric_score(acc_target_after, [0.09, 0.3], maximize=False)
    return 0.25 * kl_score + 0.25 * acc_rest_score + 0.25 * l2_dist_score + 0.25 * acc_target_score


def test_challenge_score_thresholds() -> None:
    best = M.challenge_score(0.09, 0.90, 1.3, 0.2)
    assert best["score"] == 100.0 and best["hard_fails"] == []
    assert [best[k] for k in ("score_forget", "score_retain", "score_l2", "score_kl")] == [
        100.0
    ] * 4
    worst = M.challenge_score(0.3, 0.87, 3.0, 0.5)
    assert worst["score"] == 0.0 and worst["hard_fails"] == []
    assert [worst[k] for k in ("score_forget", "score_retain", "score_l2", "score_kl")] == [0.0] * 4


def test_challenge_score_between_thresholds() -> None:
    r = M.challenge_score(forget_acc=0.2, retain_acc=0.885, l2=2.15, kl=0.35)
    assert r["score_forget"] == pytest.approx(100 * 0.1 / 0.21)
    assert r["score_retain"] == pytest.approx(50.0)
    assert r["score_l2"] == pytest.approx(50.0)
    assert r["score_kl"] == pytest.approx(50.0)
    assert r["score"] == pytest.approx(0.25 * (150.0 + 100 * 0.1 / 0.21))  # 49.4047...
    assert r["score"] == pytest.approx(49.40476190476, abs=1e-9)


def test_challenge_score_matches_seed_on_grid() -> None:
    for fa in (0.0, 0.09, 0.15, 0.3, 0.45, 0.5, 0.51):
        for ra in (0.7, 0.75, 0.86, 0.88, 0.9, 0.99):
            for l2 in (0.0, 1.3, 2.0, 3.0, 8.0, 8.5):
                for kl in (0.0, 0.2, 0.3, 0.5, 1.75, 2.0):
                    ours = M.challenge_score(fa, ra, l2, kl)["score"]
                    assert ours == _seed_compute_final_score(kl, ra, l2, fa)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((0.51, 0.95, 1.0, 0.1), "forget_acc > 0.5"),
        ((0.0, 0.749, 1.0, 0.1), "retain_acc < 0.75"),
        ((0.0, 0.95, 8.01, 0.1), "l2 > 8.0"),
        ((0.0, 0.95, 1.0, 1.76), "kl > 1.75"),
    ],
)
def test_challenge_score_hard_fails(args: tuple[float, ...], reason: str) -> None:
    r = M.challenge_score(*args)
    assert r["score"] == 0.0
    assert r["hard_fails"] == [reason]
    subs = [r[k] for k in ("score_forget", "score_retain", "score_l2", "score_kl")]
    assert sorted(subs) == [0.0, 100.0, 100.0, 100.0]  # sub-scores are still reported


def test_challenge_score_boundaries_and_frozen_rule() -> None:
    # the seed's hard fails are strict inequalities
    r = M.challenge_score(0.5, 0.75, 8.0, 1.75)
    assert r["hard_fails"] == [] and r["score"] == 0.0
    ok = M.challenge_score(0.0, 0.95, 1.0, 0.1)
    assert ok["score"] == 100.0
    frozen = M.challenge_score(0.0, 0.95, 1.0, 0.1, frozen_changed=["fc2.weight"])
    assert frozen["score"] == 0.0 and len(frozen["hard_fails"]) == 1


# --------------------------------------------------------------------------------------------
# Oracle comparison, timing
# --------------------------------------------------------------------------------------------


def test_oracle_comparison_hand_values() -> None:
    report = {"UA": 0.10, "RA": 0.95, "TA": 0.90, "mia_efficacy": 0.20}
    oracle = {"UA": 0.08, "RA": 0.97, "TA": 0.91, "mia_efficacy": 0.25}
    p_u = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    p_o = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    forget_u = make_outputs(np.log(p_u), [0, 0, 1], [10, 11, 12])
    # oracle outputs in a different order: they are aligned by dataset index
    forget_o = make_outputs(np.log(p_o[[2, 0, 1]]), [1, 0, 0], [12, 10, 11])
    test_u = make_outputs([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [0, 0, 1, 1])
    test_o = make_outputs([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], [0, 0, 1, 1])
    r = M.oracle_comparison(
        report, oracle, {"forget": forget_u, "test": test_u}, {"forget": forget_o, "test": test_o}
    )
    assert r["gap_UA"] == pytest.approx(2.0)
    assert r["gap_RA"] == pytest.approx(-2.0)
    assert r["gap_TA"] == pytest.approx(-1.0)
    assert r["gap_mia_efficacy"] == pytest.approx(-5.0)
    assert r["avg_gap"] == pytest.approx(2.5)
    assert r["agree_test"] == pytest.approx(0.75)
    # preds: unlearned [0 (tie -> first), 0, 1]; oracle [0, 0, 1]
    assert r["agree_forget"] == pytest.approx(1.0)
    kl_hand = np.mean((p_o * (np.log(p_o) - np.log(p_u))).sum(axis=1))  # KL(oracle || unlearned)
    assert r["kl_oracle_forget"] == pytest.approx(kl_hand, rel=1e-5)
    nan_gap = M.oracle_comparison(
        {**report, "UA": float("nan")},
        oracle,
        {"forget": forget_u, "test": test_u},
        {"forget": forget_o, "test": test_o},
    )
    assert math.isnan(nan_gap["avg_gap"])


def test_time_efficiency_ratios_and_machine_rule() -> None:
    oracle = {"backward_samples": 36000, "forward_samples": 4000, "steps": 290,
              "wall_seconds": 120.0, "cpu_seconds": 100.0, "host": "a", "device": "cpu",
              "threads": 1}  # fmt: skip
    run = {"backward_samples": 9000, "forward_samples": 0, "steps": 29, "wall_seconds": 30.0,
           "cpu_seconds": 20.0, "host": "a", "device": "cpu", "threads": 1}  # fmt: skip
    t = M.time_efficiency(run, oracle)
    assert t["sample_pass_ratio"] == 0.25 and t["step_ratio"] == 0.1
    assert t["time_ratio"] == 0.25 and t["time_ratio_note"] == ""
    assert (t["unlearn_time"], t["oracle_time"], t["oracle_cpu_time"]) == (30.0, 120.0, 100.0)
    assert t["unlearn_backward_samples"] == 9000 and t["oracle_steps"] == 290
    assert "cost_note" not in t
    # another machine or thread count: the wall-time ratio is withheld, and said why
    other = M.time_efficiency(run | {"threads": 2}, oracle)
    assert (
        other["time_ratio"] is None and "CPU threads 1, this run used 2" in other["time_ratio_note"]
    )
    assert other["sample_pass_ratio"] == 0.25  # the counts do not care
    host = M.time_efficiency(run, oracle | {"host": "b"})
    assert host["time_ratio"] is None and "host b" in host["time_ratio_note"]
    # an oracle cached before work was counted: NaN ratios with a note, never silently
    old = M.time_efficiency(run, {"wall_seconds": 120.0, "device": "cpu", "threads": 1})
    assert math.isnan(old["sample_pass_ratio"]) and math.isnan(old["step_ratio"])
    assert "records no work counts" in old["cost_note"]
    assert old["time_ratio"] is None and "oracle records no host" in old["time_ratio_note"]
