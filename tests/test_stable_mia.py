"""Stable MIA-Efficacy (evaluation/mia.py): draws, intervals, flags and the class-wise fix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from scipy import stats

import metrics as M
from datasets import DeviceData, ForgetSpec, RawData, make_split
from evaluation.mia import (
    draw_seeds,
    loss_draw,
    salun_draw,
    stable_loss_mia,
    stable_salun_flat,
    stable_salun_mia,
    t_interval,
)
from training.checkpoints import load_checkpoint
from training.recipe import train_checkpoint


def outputs(p_y: np.ndarray) -> M.Outputs:
    """Two-class outputs whose true-label probability is exactly `p_y` (label 0)."""
    p = torch.as_tensor(p_y, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).float()
    n = len(p)
    return M.Outputs(
        logits=logits,
        labels=torch.zeros(n, dtype=torch.long),
        losses=-p.log().float(),
        indices=torch.arange(n),
    )


def overlapping(seed: int, n: int = 250) -> tuple[M.Outputs, M.Outputs, M.Outputs]:
    """Members a little more confident than non-members; the shadow draws take n of 4n."""
    rng = np.random.default_rng(seed)
    retain = outputs(rng.beta(6, 1, 4 * n))
    test = outputs(rng.beta(4, 1, n))
    forget = outputs(rng.beta(5, 1, 80))
    return retain, test, forget


def classwise_oracle_like(seed: int) -> tuple[M.Outputs, M.Outputs, M.Outputs, M.Outputs]:
    """A model that generalises (same confidence law on retain and test, 4% of both below 0.5),
    asked about a forget class it never saw (every forget p_y ~ 1e-4); its test samples of that
    class sit at p_y ~ 1e-4 too."""
    rng = np.random.default_rng(seed)

    def side(n: int) -> np.ndarray:
        high = rng.uniform(0.9, 1.0, n)
        low = rng.uniform(1e-4, 0.5, n)
        return np.where(rng.random(n) < 0.04, low, high)

    retain, test = outputs(side(2000)), outputs(side(450))
    forget = outputs(rng.uniform(0.5e-4, 2e-4, 200))
    test_forget = outputs(rng.uniform(0.5e-4, 2e-4, 50))
    return retain, test, forget, test_forget


# --------------------------------------------------------------------------------------------


def test_t_interval_known_values() -> None:
    iv = t_interval([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) / math.sqrt(3)  # std = 1
    assert (iv.mean, iv.std, iv.n) == (2.0, 1.0, 3)
    assert iv.low == pytest.approx(2.0 - half) and iv.high == pytest.approx(2.0 + half)
    clipped = t_interval([0.9, 1.0, 1.0], bounds=(0.0, 1.0))
    assert clipped.high == 1.0 and 0.8 < clipped.low < 0.9
    one = t_interval([0.4, math.nan])
    assert one.mean == 0.4 and one.n == 1 and math.isnan(one.low)
    assert math.isnan(t_interval([]).mean)


def test_report_attacks_are_the_mean_of_the_draws() -> None:
    # one implementation: metrics.salun_mia / loss_mia average exactly these single draws
    retain, test, forget = overlapping(0)
    feats = [M.mia_features(o, "confidence") for o in (retain, test, forget)]
    effs = [salun_draw(*feats, seed).efficacy for seed in draw_seeds(5, "salun", 3)]
    got = M.salun_mia(retain, test, forget, 5, features=("confidence",), draws=3)
    assert got["mia_efficacy"] == pytest.approx(float(np.mean(effs)), abs=1e-15)
    assert got["mia_efficacy_std"] == pytest.approx(float(np.std(effs, ddof=1)), abs=1e-15)
    f_loss, t_loss = forget.losses.double().numpy(), test.losses.double().numpy()
    accs = [loss_draw(f_loss, t_loss, seed).acc for seed in draw_seeds(5, "loss", 2)]
    assert M.loss_mia(forget, test, 5, draws=2)["loss_mia_acc"] == pytest.approx(np.mean(accs))
    assert len(loss_draw(f_loss, t_loss, 0).fold_accs) == 10


def test_draw_seeds_are_independent_streams() -> None:
    seeds = draw_seeds(0, "salun", 10)
    assert len(set(seeds)) == 10 and all(0 <= s < 2**32 for s in seeds)
    assert draw_seeds(0, "salun", 3) == seeds[:3]  # a longer run extends, never reshuffles
    assert not set(draw_seeds(0, "loss", 10)) & set(seeds)


def test_interval_shrinks_as_draws_grow() -> None:
    retain, test, forget = overlapping(1)
    widths = {}
    for r in (3, 24):
        feat = stable_salun_mia(retain, test, forget, seed=0, draws=r, n_jobs=1)["confidence"]
        assert len(feat.values) == r and feat.flags == []
        widths[r] = feat.interval.high - feat.interval.low
    assert 0 < widths[24] < widths[3] / 2
    flat = stable_salun_flat(stable_salun_mia(retain, test, forget, seed=0, draws=3, n_jobs=1))
    assert flat["mia_efficacy"] == flat["mia_confidence"] and flat["mia_efficacy_draws"] == 3.0
    assert 0.5 < flat["mia_efficacy_shadow_acc"] < 0.8  # the attack has a signal here


def test_results_do_not_depend_on_threads() -> None:
    retain, test, forget = overlapping(2, n=150)
    one = stable_salun_mia(retain, test, forget, seed=3, draws=4, n_jobs=1)["confidence"]
    two = stable_salun_mia(retain, test, forget, seed=3, draws=4, n_jobs=2)["confidence"]
    assert one.values == two.values


def test_degenerate_attack_is_flagged() -> None:
    # members and non-members with the same confidences: the SVC cannot split them and answers
    # one class for every shadow sample, so the efficacy is 0 or 1 by its intercept alone
    same = np.full(200, 0.9)
    retain, test, forget = outputs(same), outputs(same), outputs(np.full(30, 0.2))
    feat = stable_salun_mia(retain, test, forget, seed=0, draws=3, n_jobs=1)["confidence"]
    assert all(d.degenerate and d.single for d in feat.draws)
    assert feat.values[0] in (0.0, 1.0) and "degenerate" in feat.flags
    flat = stable_salun_flat({"confidence": feat})
    assert flat["mia_efficacy_degenerate"] == 3.0 and "degenerate" in flat["mia_efficacy_flags"]
    # a working attack raises no flag
    sep_retain, sep_test = outputs(np.linspace(0.95, 1.0, 200)), outputs(np.linspace(0.3, 0.6, 200))
    ok = stable_salun_mia(sep_retain, sep_test, outputs(np.full(30, 0.4)), seed=0, draws=3)
    assert ok["confidence"].values == [1.0, 1.0, 1.0] and ok["confidence"].flags == ["single"]


def test_classwise_flip_and_its_fix_on_hand_built_outputs() -> None:
    retain, test, forget, test_forget = classwise_oracle_like(0)
    # SalUn's attack: no non-member of the forgotten class in the shadow set, so the verdict at
    # p_y ~ 0 is decided by which low-confidence retain samples a draw picked: it flips
    salun = stable_salun_mia(retain, test, forget, seed=0, draws=10, n_jobs=1)["confidence"]
    assert set(salun.values) == {0.0, 1.0}
    assert "unstable" in salun.flags and "single" in salun.flags
    assert salun.interval.low < 0.5 < salun.interval.high
    # the fix: the forgotten class's test samples join the non-members: 1 in every draw
    fixed = stable_salun_mia(
        retain, test, forget, seed=0, draws=10, n_jobs=1, test_forget=test_forget
    )["confidence"]
    assert fixed.values == [1.0] * 10 and "unstable" not in fixed.flags
    assert fixed.interval.std == 0.0


def test_classwise_oracle_on_mnist5k_is_a_non_member_in_every_draw(
    mnist5k: RawData, tmp_path: Path
) -> None:
    spec = ForgetSpec(classes=(3,))
    path = train_checkpoint(
        TINY, spec, tmp_path, device=torch.device("cpu"), raw=mnist5k, quiet=True
    )
    model, _ = load_checkpoint(path, "cpu")
    split = make_split(mnist5k, spec, TINY.split_seed, TINY.val_fraction)
    data = DeviceData(mnist5k, "cpu")
    outs = {}
    for name in ("forget", "retain", "test", "test_forget"):
        source = "test" if name.startswith("test") else "train"
        outs[name] = M.collect_outputs(
            model, data.batches(getattr(split, name), 512, source=source)
        )
    assert M.accuracy(outs["forget"]) == 0.0
    result = stable_salun_mia(
        outs["retain"], outs["test"], outs["forget"], seed=0, draws=4,
        test_forget=outs["test_forget"],
    )  # fmt: skip
    assert result["confidence"].values == [1.0] * 4


def test_stable_loss_mia_intervals_and_degenerate_folds() -> None:
    retain, test, forget = overlapping(3)
    out = stable_loss_mia(forget, test, seed=0, draws=5)
    assert out["loss_mia_draws"] == 5.0
    assert out["loss_mia_acc_low"] <= out["loss_mia_acc"] <= out["loss_mia_acc_high"]
    assert out["loss_mia_auc_low"] <= out["loss_mia_auc"] <= out["loss_mia_auc_high"]
    assert out["loss_mia_acc_std"] > 0 and out["loss_mia_acc_fold_std"] > out["loss_mia_acc_std"]
    # identical losses on both sides: every fold's classifier answers one class
    same = outputs(np.full(100, 0.7))
    flat = stable_loss_mia(same, outputs(np.full(100, 0.7)), seed=0, draws=2)
    assert flat["loss_mia_degenerate"] == 1.0 and flat["loss_mia_acc"] == 0.5
