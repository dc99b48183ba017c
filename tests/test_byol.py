"""BYOL pretraining (training/byol.py): EMA, tau schedule, loss, views, and a real short run.

The end-to-end test pretrains the mnist5k LeNet for 3 epochs: a linear probe on its frozen
features scored 0.894 / 0.887 / 0.891 on the test set (seeds 0 / 1 / 2) against 0.795 for the
same LeNet at initialisation, a margin of 0.092-0.099; the test asks for about half of it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.errors import UserError
from datasets import DeviceData, ForgetSpec, RawData, make_split
from evaluation.representation import linear_probe
from models import build_model
from training.byol import (
    ByolConfig,
    ViewAugment,
    byol_loss,
    ema_update,
    encode,
    gaussian_blur,
    make_view,
    pretrain_byol,
    tau_at,
    two_views,
    view_augment,
)

MARGIN = 0.045  # about half of the smallest measured gain over a random encoder (0.092)


# ------------------------------------------------------------------------------ EMA and tau


def test_tau_schedule_known_values() -> None:
    k = 120
    assert tau_at(0, k, 0.99) == pytest.approx(0.99, abs=1e-15)
    assert tau_at(k, k, 0.99) == pytest.approx(1.0, abs=1e-15)
    assert tau_at(k // 2, k, 0.99) == pytest.approx(0.995, abs=1e-15)
    assert tau_at(k // 3, k, 0.99) == pytest.approx(1 - 0.01 * 0.75, abs=1e-15)  # cos(pi/3)=1/2
    taus = [tau_at(i, k, 0.9) for i in range(k + 1)]
    assert all(a < b for a, b in zip(taus, taus[1:], strict=False))
    assert tau_at(5, k, 1.0) == 1.0


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight))
        m.bias.copy_(torch.tensor(bias))
    return m


def test_ema_update_on_hand_built_weights() -> None:
    target = _linear([[0.0, 1.0], [2.0, 3.0]], [8.0, -4.0])
    online = _linear([[4.0, 5.0], [6.0, 7.0]], [0.0, 4.0])
    ema_update(target, online, 0.75)
    assert torch.equal(target.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(target.bias, torch.tensor([6.0, -2.0]))
    assert torch.equal(online.weight, torch.tensor([[4.0, 5.0], [6.0, 7.0]]))  # untouched
    ema_update(target, online, 1.0)
    assert torch.equal(target.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ema_update(target, online, 0.0)
    assert torch.equal(target.weight, online.weight) and torch.equal(target.bias, online.bias)
    with pytest.raises(ValueError, match="differ"):
        ema_update(target, nn.Linear(3, 2), 0.5)


# ------------------------------------------------------------------------------------- loss


def test_loss_is_symmetric_and_zero_for_identical_normalised_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 5, generator=g) for _ in range(4))
    assert byol_loss(p1, p2, z1, z2) == pytest.approx(float(byol_loss(p2, p1, z2, z1)), abs=1e-6)
    # identical after normalisation: scale does not matter
    assert float(byol_loss(3 * z2, 0.5 * z1, z1, z2)) == pytest.approx(0.0, abs=1e-6)
    # each term is 2 - 2 cos: 4 for opposite vectors, 2 for orthogonal ones
    e = torch.eye(5)[:2]
    assert float(byol_loss(-e, -e, e, e)) == pytest.approx(8.0, abs=1e-6)
    assert float(byol_loss(e.flip(0), e.flip(0), e, e)) == pytest.approx(4.0, abs=1e-6)
    # the targets carry no gradient
    p, z = p1.clone().requires_grad_(), z1.clone().requires_grad_()
    byol_loss(p, p, z, z).backward()
    assert z.grad is None and p.grad is not None


# ------------------------------------------------------------------------------------ views


def test_views_without_randomness_are_the_images(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    x = data.normalise(data.x["train"][:16])
    still = ViewAugment(crop_scale=(1.0, 1.0), flip=False, colour=False, jitter_p=0.0)
    v1, v2 = two_views(data, x, still, torch.Generator().manual_seed(0))
    assert torch.allclose(v1, x, atol=1e-4) and torch.allclose(v2, x, atol=1e-4)


def test_views_are_seeded_and_differ(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    x = data.normalise(data.x["train"][:32])
    aug = view_augment(data)
    assert aug.flip is False and aug.colour is False and aug.crop_scale == (0.6, 1.0)
    a = two_views(data, x, aug, torch.Generator().manual_seed(1))
    b = two_views(data, x, aug, torch.Generator().manual_seed(1))
    c = two_views(data, x, aug, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[0], a[1])
    assert a[0].shape == x.shape


def test_flip_only_flips_whole_images() -> None:
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    aug = ViewAugment(crop_scale=(1.0, 1.0), flip=True, colour=True, jitter_p=0.0, gray_p=0.0)
    v = make_view(x, aug, 0, torch.Generator().manual_seed(0))
    same = (v - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    flipped = (v - x.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | flipped).all()) and 10 < int(flipped.sum()) < 54


def test_grayscale_and_solarize_of_colour_views() -> None:
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gray = ViewAugment(crop_scale=(1.0, 1.0), flip=False, colour=True, jitter_p=0.0, gray_p=1.0)
    v = make_view(x, gray, 0, torch.Generator())
    assert torch.allclose(v[:, 0], v[:, 1]) and torch.allclose(v[:, 1], v[:, 2])
    sol = ViewAugment((1.0, 1.0), False, True, jitter_p=0.0, gray_p=0.0, solarize_p=(0.0, 1.0))
    v0, v1 = make_view(x, sol, 0, torch.Generator()), make_view(x, sol, 1, torch.Generator())
    assert torch.allclose(v0, x, atol=1e-5)  # view 1 never solarises; view 2 always here
    assert torch.allclose(v1, torch.where(x >= 0.5, 1 - x, x), atol=1e-5)


def test_hue_rotation_keeps_grays_and_moves_colours() -> None:
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(4, 1, 6, 6, generator=g).expand(4, 3, 6, 6)
    colourful = torch.rand(4, 3, 6, 6, generator=g) * 0.5 + 0.25
    hue = ViewAugment((1.0, 1.0), False, True, jitter=(0, 0, 0, 0.5), jitter_p=1.0, gray_p=0.0)
    assert torch.allclose(make_view(gray, hue, 0, torch.Generator()), gray, atol=1e-5)
    moved = make_view(colourful, hue, 0, torch.Generator().manual_seed(3))
    assert (moved - colourful).abs().amax() > 0.05


def test_colour_pipeline_pretrains_a_small_cnn() -> None:
    # 56-px colour images switch on every augmentation: jitter, grayscale, blur, solarisation
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 3, 56, 56), generator=g, dtype=torch.uint8)
    y = torch.arange(24) % 4
    raw = RawData("cifar10", x, y, x[:8], y[:8], list("abcd"), (0.5,) * 3, (0.25,) * 3)
    data = DeviceData(raw)
    aug = view_augment(data)
    assert aug.colour and aug.flip and aug.blur_sigma[1] >= 0.5 and aug.solarize_p == (0.0, 0.2)
    torch.manual_seed(0)
    model = build_model("smallcnn", 4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ByolConfig(epochs=1, batch_size=10, projector=(32, 16), predictor_hidden=32)
    res = pretrain_byol(model, data, torch.arange(20), torch.arange(20, 24), cfg)
    assert math.isfinite(res.history[0]["loss"]) and 0.0 <= res.knn_acc <= 1.0
    after = model.state_dict()
    assert not torch.equal(after["features.0.weight"], before["features.0.weight"])
    assert torch.equal(after["fc.weight"], before["fc.weight"])  # the classifier is left alone


def test_blur_spreads_a_point_and_keeps_its_mass() -> None:
    x = torch.zeros(2, 1, 15, 15)
    x[:, 0, 7, 7] = 1.0
    y = gaussian_blur(x, (1.0, 1.5), 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(y.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert bool((y[:, 0, 7, 7] < 0.2).all()) and bool((y[:, 0, 7, 8] > 0.05).all())
    assert torch.equal(gaussian_blur(x, (1.0, 1.5), 0.0, torch.Generator()), x)


# -------------------------------------------------------------------------------- pretraining


def _probe(model: nn.Module, data: DeviceData, train: torch.Tensor, test: torch.Tensor) -> float:
    y = data.y
    feats = encode(model, data, train), encode(model, data, test, "test")
    evals = {"test": (feats[1], y["test"][test])}
    return linear_probe(feats[0], y["train"][train], evals, num_classes=10)["test"]


def test_byol_pretraining_beats_a_random_encoder(mnist5k: RawData) -> None:
    split = make_split(mnist5k, ForgetSpec())
    data = DeviceData(mnist5k)
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1)
    classifier = {k: v.clone() for k, v in model.get_submodule("fc2").state_dict().items()}
    before = _probe(model, data, split.train, split.test)
    rows: list[dict[str, float]] = []
    res = pretrain_byol(model, data, split.train, split.val, ByolConfig(epochs=3), log=rows.append)
    after = _probe(model, data, split.train, split.test)
    assert after >= before + MARGIN, (before, after)
    assert res.epochs_run == 3 and rows == res.history
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["tau"] == pytest.approx(1.0) and 0.5 < res.knn_acc <= 1.0
    assert all(
        torch.equal(v, classifier[k]) for k, v in model.get_submodule("fc2").state_dict().items()
    )


def test_oracle_pretraining_never_draws_a_forget_index(mnist5k: RawData) -> None:
    split = make_split(mnist5k, ForgetSpec(classes=(7,)))
    data = DeviceData(mnist5k)
    retain = split.retain[:600]
    forget = set(split.forget.tolist())
    seen: list[set[int]] = []

    def hook(idx: torch.Tensor) -> None:
        drawn = set(idx.tolist())
        assert not drawn & forget, sorted(drawn & forget)[:5]
        seen.append(drawn)

    cfg = ByolConfig(epochs=2, batch_size=128, knn_every=1)
    pretrain_byol(build_model("lenet", 10, 1), data, retain, split.val[:100], cfg, on_batch=hook)
    per_epoch = math.ceil(len(retain) / 128)
    assert len(seen) == 2 * per_epoch
    for e in range(2):
        assert set().union(*seen[e * per_epoch : (e + 1) * per_epoch]) == set(retain.tolist())


def test_same_seed_same_weights(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    idx = torch.arange(256)

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("lenet", 10, 1)
        pretrain_byol(model, data, idx, idx[:0], ByolConfig(epochs=1, batch_size=64, seed=seed))
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("lr", 0.0),
        ("optimizer", "lamb"),
        ("tau_base", 1.5),
        ("projector", [64]),
        ("batch_size", 1),
        ("crop_scale", [0.5, 0.2]),
        ("schedule", "step"),
        ("epochs", "3"),
        ("lr", True),
        ("projector", 128),
        ("projector", [64.5, 32]),
        ("crop_scale", ["a", 1]),
    ],
)
def test_config_rejects_bad_values(key: str, value: object) -> None:
    with pytest.raises(UserError, match=f"exp.json: pretrain.{key} = "):
        ByolConfig.from_json({key: value}, where="exp.json: ")


def test_config_json_round_trip_and_unknown_key() -> None:
    cfg = ByolConfig.from_json({"projector": [64, 32], "crop_scale": [0.3, 1.0], "epochs": 2})
    assert cfg.projector == (64, 32) and cfg.crop_scale == (0.3, 1.0)
    assert ByolConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(UserError, match="unknown pretrain key 'tau'"):
        ByolConfig.from_json({"tau": 0.99})
