"""Tests for mask.py and its use by every method: SalUn's saliency mask and the ``frozen`` key
are hard constraints, so the weights they fix must stay bit-identical (``torch.equal``) through
momentum, weight decay and Adam's moments, for every registered method that accepts a mask; a
frozen BatchNorm layer keeps its running statistics too. The mask keeps exactly
``int(N * mask_thr)`` weights by rank, however many scores tie; a mask file is refused for
another base model, another architecture, or when it is not a mask file at all.

The methods run on a small slice of mnist5k (96 forget, ~270 retain samples) from the session's
one-epoch LeNet, so each run takes well under a second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import metrics as M
from core.errors import UserError
from core.io import sha256_file
from datasets import DeviceData, ForgetSpec, RawData, Split, make_split
from methods import (
    MethodContext,
    Monitor,
    OptimizerSettings,
    Settings,
    Trainer,
    copy_model,
    unlearn,
)
from models import build_model
from training.checkpoints import load_checkpoint
from training.mask import MaskGuard, SaliencyMask, running_stat_modules
from unlearning import METHODS  # the whole registry: every baseline, not only the core

MASKED = [name for name, spec in METHODS.items() if spec.supports_mask]
# the core methods take plain Trainer steps over all weights: most unmasked weights must move
CORE = {"ft", "ga", "ga_small", "rl", "rl_split"}
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def data(mnist5k: RawData) -> DeviceData:
    return DeviceData(mnist5k, "cpu")


@pytest.fixture(scope="module")
def split(mnist5k: RawData) -> Split:
    s = make_split(mnist5k, ForgetSpec(classes=(3,)))
    # train stays whole: SSD compares forget importance with the whole training set's
    return dataclasses.replace(
        s, forget=s.forget[:96], retain=s.retain[::12], val=s.val[::6], test=s.test[::4]
    )


def fresh(tiny_base: Path) -> tuple[nn.Module, dict[str, Any]]:
    model, meta = load_checkpoint(tiny_base)
    return model.train(), meta


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def experiment(method: str, optimizer: str = "sgd", **kw: Any) -> Settings:
    opt = OptimizerSettings(name=optimizer, momentum=0.9, weight_decay=5e-4)
    return Settings(
        method=method,
        lr=0.05 if optimizer == "sgd" else 0.01,
        epochs=1,
        batch_size=16,  # several steps even on the 96 forget samples
        optimizer=opt,
        args=METHODS[method].args(),
        **kw,
    )


class StepLog:
    """Every optimiser step taken while active: (optimiser type, its first param group)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        self.steps.append((type(opt).__name__, group))


@pytest.fixture
def steps() -> Iterator[StepLog]:
    log = StepLog()
    handle = register_optimizer_step_post_hook(log)
    yield log
    handle.remove()


def run(
    method: str,
    tiny_base: Path,
    data: DeviceData,
    split: Split,
    cfg: Settings,
    mask: SaliencyMask | None,
    model: nn.Module | None = None,
) -> nn.Module:
    base, meta = fresh(tiny_base)
    model = model if model is not None else base
    torch.manual_seed(0)
    ctx = MethodContext.from_sidecar(data, split, 0, copy_model(model), meta)
    return unlearn(model, ctx, cfg, mask, Monitor())


# ------------------------------------------------------------------ the guard, every method


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", MASKED)
def test_masked_weights_stay_bit_identical(
    method: str,
    optimizer: str,
    tiny_base: Path,
    data: DeviceData,
    split: Split,
    steps: StepLog,
) -> None:
    model, _ = fresh(tiny_base)
    mask = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 64)
    before = snapshot(model)
    out = run(method, tiny_base, data, split, experiment(method, optimizer), mask, model)
    after = dict(out.named_parameters())
    assert set(after) == set(mask.masks)
    moved = free = 0
    for n, m in mask.masks.items():
        a, b = after[n].detach(), before[n]
        assert a.shape == b.shape == m.shape
        assert torch.equal(a[~m], b[~m]), f"{method}/{optimizer}: masked weights of {n} moved"
        moved += int((a[m] != b[m]).sum())
        free += int(m.sum())
    assert moved > 0, f"{method}/{optimizer}: no unmasked weight moved"
    if method in CORE:
        assert moved > 0.5 * free, (method, optimizer, moved, free)
        # several real steps with the configured optimiser
        assert len(steps.steps) >= 6, len(steps.steps)
        kind, group = steps.steps[0]
        assert group["weight_decay"] == 5e-4
        if optimizer == "sgd":
            assert kind == "SGD" and group["momentum"] == 0.9 and group["nesterov"] is True
        else:
            assert kind in ("Adam", "AdamW")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_guard_keeps_optimizer_state_of_masked_weights_at_zero(optimizer: str) -> None:
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1)
    g = torch.Generator().manual_seed(1)
    mask = SaliencyMask(
        {n: torch.rand(p.shape, generator=g) < THRESHOLD for n, p in model.named_parameters()}
    )
    before = snapshot(model)
    tr = Trainer(model, experiment("ft", optimizer), mask)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    for _ in range(5):
        tr.step(F.cross_entropy(model(x), y))
        for n, p in model.named_parameters():
            m = mask.masks[n]
            assert torch.equal(p.detach()[~m], before[n][~m]), n
            state = [
                s for s in tr.opt.state[p].values() if torch.is_tensor(s) and s.shape == p.shape
            ]
            assert state, f"{optimizer} keeps no per-weight state for {n}"
            for s in state:
                assert not s[~m].any(), f"optimizer state of masked weights of {n} is not zero"
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0.25 * sum(p.numel() for p in model.parameters())


def test_without_restoring_the_guard_would_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: masking gradients alone lets weight decay move masked weights."""
    monkeypatch.setattr(MaskGuard, "after_step", lambda self: None)
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1)
    mask = SaliencyMask(
        {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    )
    before = snapshot(model)
    tr = Trainer(model, experiment("ft"), mask)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        tr.step(F.cross_entropy(model(x), y))
    assert not torch.equal(model.fc.weight.detach(), before["fc.weight"])


@pytest.mark.parametrize("method", MASKED)
def test_frozen_fc2_stays_bit_identical(
    method: str, tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    before = snapshot(model)
    cfg = experiment(method, frozen=("fc2",))
    out = run(method, tiny_base, data, split, cfg, None, model)
    after = {n: p.detach() for n, p in out.named_parameters()}
    for n in ("fc2.weight", "fc2.bias"):
        assert torch.equal(after[n], before[n]), f"{method}: frozen {n} changed"
    assert any(not torch.equal(after[n], before[n]) for n in after if not n.startswith("fc2."))


def test_frozen_and_mask_combine(tiny_base: Path, data: DeviceData, split: Split) -> None:
    model, _ = fresh(tiny_base)
    mask = SaliencyMask.compute(model, data, split.forget, 0.5, 64)
    assert mask.masks["fc2.weight"].any()  # so freezing fc2 really removes allowed weights
    before = snapshot(model)
    cfg = experiment("rl_split", frozen=("fc2",))
    out = run("rl_split", tiny_base, data, split, cfg, mask, model)
    for n, p in out.named_parameters():
        m = mask.masks[n] & (not n.startswith("fc2."))
        assert torch.equal(p.detach()[~m], before[n][~m]), n
        if not n.startswith("fc2."):
            assert bool((p.detach()[m] != before[n][m]).any()), n


# ------------------------------------------------------------- frozen BatchNorm statistics


def block1_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("block1.")}


@pytest.mark.parametrize("method", MASKED)
def test_frozen_batchnorm_keeps_weights_and_running_statistics(
    method: str, tiny_base: Path, data: DeviceData, split: Split
) -> None:
    """``frozen: ["block1"]`` on LeNet (conv + BatchNorm): every tensor of the block, buffers
    included, stays bit-identical under every method that accepts ``frozen``, while the
    unfrozen BatchNorm of block2 keeps learning its statistics where the method trains."""
    model, _ = fresh(tiny_base)
    before = block1_state(model)
    assert {"block1.1.running_mean", "block1.1.running_var"} <= set(before)
    bn2 = model.block2[1].running_mean.clone()
    out = run(method, tiny_base, data, split, experiment(method, frozen=("block1",)), None, model)
    assert out is model
    assert M.changed_parameters(out, before, ["block1"]) == [], method
    for k, v in block1_state(out).items():
        assert torch.equal(v, before[k]), f"{method}: frozen {k} changed"
    # the hook is gone and the frozen layer follows the model's mode again
    assert not out.block1[1]._forward_pre_hooks
    assert out.block1[1].training == out.training
    if method in CORE:
        assert not torch.equal(out.block2[1].running_mean, bn2), method


def test_without_eval_mode_a_frozen_batchnorm_moves(
    tiny_base: Path, data: DeviceData, split: Split
) -> None:
    """The check above can fail: calling the method itself, not through ``unlearn``, lets the
    running statistics of the frozen layer move, and the bit-equality check names them."""
    model, meta = fresh(tiny_base)
    before = block1_state(model)
    ctx = MethodContext.from_sidecar(data, split, 0, copy_model(model), meta)
    out = METHODS["ft"].fn(model, ctx, experiment("ft", frozen=("block1",)), None, Monitor())
    moved = M.changed_parameters(out, before, ["block1"])
    assert "block1.1.running_mean" in moved and "block1.1.running_var" in moved
    assert "block1.0.weight" not in moved and "block1.1.weight" not in moved  # the guard's part


def test_running_stat_modules_are_the_normalisation_layers_under_a_prefix() -> None:
    model = build_model("smallcnn", 10, 1)
    names = {id(m): n for n, m in model.named_modules()}
    found = [names[id(m)] for m in running_stat_modules(model, ["features"])]
    assert found == ["features.1", "features.4", "features.8"]
    assert running_stat_modules(model, ["fc"]) == []
    assert [names[id(m)] for m in running_stat_modules(model, ["features.4"])] == ["features.4"]


# ------------------------------------------------------------------------ computing a mask


def saliency(model: nn.Module, data: DeviceData, idx: Tensor) -> dict[str, Tensor]:
    """|d sum-CE(forget) / d w|, computed independently of mask.py."""
    model.eval()
    model.zero_grad(set_to_none=True)
    x, y = data.normalise(data.x["train"][idx]), data.y["train"][idx]
    F.cross_entropy(model(x), y, reduction="sum").backward()
    out = {n: p.grad.detach().abs().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("threshold", [0.1, THRESHOLD, 0.5, 1.0])
def test_compute_keeps_the_requested_fraction_of_the_most_salient_weights(
    threshold: float, tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = SaliencyMask.compute(model, data, split.forget, threshold, 32)
    assert model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # no weight or BN statistic moved
        assert torch.equal(v, state[k]), k
    params = dict(model.named_parameters())
    assert set(mask.masks) == set(params)
    for n, m in mask.masks.items():
        assert m.dtype == torch.bool and m.shape == params[n].shape
    assert mask.threshold == threshold
    n = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in mask.masks.values()) == math.floor(n * threshold + 1e-9)
    assert abs(mask.kept_fraction() - threshold) < 1 / n
    if threshold == 1.0:
        return
    # ranked globally, not per layer: every kept weight is at least as salient as every other
    scores = saliency(model, data, split.forget)
    kept = torch.cat([scores[n][m] for n, m in mask.masks.items()])
    dropped = torch.cat([scores[n][~m] for n, m in mask.masks.items()])
    assert float(kept.min()) >= float(dropped.max()) * (1 - 1e-4)
    per_layer = {n: float(m.float().mean()) for n, m in mask.masks.items() if m.numel() > 100}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.1, per_layer
    # the same inputs give the same mask
    again = SaliencyMask.compute(model, data, split.forget, threshold, 32)
    assert all(torch.equal(again.masks[n], m) for n, m in mask.masks.items())


def dead_units(model: nn.Module, n: int) -> None:
    """Switch off the first `n` units of fc1 (bias -1e3): the gradients of their weights, and
    of the fc2 weights they feed, are exactly 0, so those saliency scores all tie at 0."""
    with torch.no_grad():
        model.fc1.bias[:n] = -1e3


THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


def test_mask_size_is_exact_at_every_threshold_despite_ties(
    tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    dead_units(model, 60)
    scores = saliency(model, data, split.forget)
    flat = torch.cat([s.flatten() for s in scores.values()])
    n, zeros = flat.numel(), int((flat == 0).sum())
    # more than 10% of the scores tie at 0: keeping "every score >= the k-th largest" would keep
    # all N weights at thresholds 0.9 and above (the bug this rule fixes)
    assert zeros > 0.11 * n, zeros / n
    previous = torch.zeros(n, dtype=torch.bool)
    for t in THRESHOLDS:
        mask = SaliencyMask.compute(model, data, split.forget, t, 64)
        kept = torch.cat([m.flatten() for m in mask.masks.values()])
        # floor(N * t) of the decimal threshold (int(44470 * 0.7) would give 31128, not 31129)
        assert int(kept.sum()) == math.floor(n * t + 1e-9), t
        assert abs(mask.kept_fraction() - t) < 1 / n, t
        # by rank: every kept score is at least every dropped one (up to summation order)
        assert float(flat[kept].min()) >= float(flat[~kept].max()) * (1 - 1e-4), t
        # ties at 0 go to the lower position in the concatenation of the parameters
        tied = kept[flat == 0]
        assert torch.equal(tied, torch.sort(tied, descending=True, stable=True).values), t
        assert bool(previous[~kept].logical_not().all()), t  # a larger threshold adds weights
        previous = kept
    assert 0 < int(tied.sum()) < zeros  # at 0.99 the cut falls inside the block of ties


def test_mask_augment_draws_its_own_seeded_crops(
    tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    plain = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 32)
    a = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 32, augment=True, seed=1)
    b = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 32, augment=True, seed=1)
    c = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 32, augment=True, seed=2)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    differ = [k for k in a.masks if not torch.equal(a.masks[k], plain.masks[k])]
    assert differ and any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    assert a.kept_fraction() == plain.kept_fraction()


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_compute_rejects_a_bad_threshold(
    threshold: float, tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    with pytest.raises(UserError, match="mask_thr"):
        SaliencyMask.compute(model, data, split.forget, threshold)


def test_compute_rejects_an_empty_forget_set(tiny_base: Path, data: DeviceData) -> None:
    model, _ = fresh(tiny_base)
    with pytest.raises(UserError, match="forget set is empty"):
        SaliencyMask.compute(model, data, torch.zeros(0, dtype=torch.long), 0.5)


# --------------------------------------------------------------------- saving and loading


def test_save_load_round_trip(
    tmp_path: Path, tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    mask = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 64)
    path = tmp_path / "sub" / "mask.safetensors"
    mask.save(path)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    for loaded in (SaliencyMask.load(path, model), SaliencyMask.load(str(path))):
        assert set(loaded.masks) == set(mask.masks)
        for n, m in mask.masks.items():
            assert loaded.masks[n].dtype == torch.bool
            assert torch.equal(loaded.masks[n], m), n
        assert loaded.kept_fraction() == mask.kept_fraction()
        assert loaded.threshold == THRESHOLD


def test_mask_of_another_model_is_a_user_error(tmp_path: Path, tiny_base: Path) -> None:
    model, _ = fresh(tiny_base)
    for other in (build_model("smallcnn", 10, 1), build_model("lenet", 5, 1)):
        path = tmp_path / f"{type(other).__name__}-{other.num_classes}.safetensors"
        SaliencyMask(
            {n: torch.ones_like(p, dtype=torch.bool) for n, p in other.named_parameters()}
        ).save(path)
        with pytest.raises(UserError) as e:
            SaliencyMask.load(path, model)
        msg = str(e.value)
        assert msg.startswith(f"{path}: mask entry '"), msg
        assert msg.endswith("' does not match the model's parameters"), msg


def test_missing_or_broken_mask_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="mask file not found"):
        SaliencyMask.load(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a safetensors mask file"):
        SaliencyMask.load(bad)


def test_mask_file_records_its_base_model(
    tmp_path: Path, tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    mask = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 64)
    base_sha = sha256_file(tiny_base)
    path = tmp_path / "mask.safetensors"
    mask.save(path, base_sha256=base_sha)
    loaded = SaliencyMask.load(path, model, base_sha256=base_sha)
    assert all(torch.equal(loaded.masks[n], m) for n, m in mask.masks.items())
    assert SaliencyMask.load(path, model).kept_fraction() == mask.kept_fraction()
    other = "0" * 64
    with pytest.raises(UserError) as e:
        SaliencyMask.load(path, model, base_sha256=other)
    msg = str(e.value)
    assert msg.startswith(f"{path}: mask was made for another base model") and "\n" not in msg
    assert base_sha[:12] in msg and "000000000000" in msg
    # a mask saved without a base hash cannot be checked: it is accepted
    mask.save(tmp_path / "old.safetensors")
    SaliencyMask.load(tmp_path / "old.safetensors", model, base_sha256=other)


def test_truncated_or_foreign_mask_files_are_user_errors(
    tmp_path: Path, tiny_base: Path, data: DeviceData, split: Split
) -> None:
    model, _ = fresh(tiny_base)
    mask = SaliencyMask.compute(model, data, split.forget, THRESHOLD, 64)
    good = tmp_path / "mask.safetensors"
    mask.save(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match=f"^{cut}: not a safetensors mask file"):
        SaliencyMask.load(cut, model)
    # a model checkpoint is a safetensors file, but not a mask
    with pytest.raises(UserError, match=r"not a mask file: entry '.*' is torch\.\w+, not bool"):
        SaliencyMask.load(tiny_base, model)
    # a mask with an entry missing (made for a model with fewer parameters)
    part = tmp_path / "part.safetensors"
    SaliencyMask({n: m for n, m in mask.masks.items() if n != "fc2.bias"}).save(part)
    with pytest.raises(UserError, match="mask has no entry for the model's parameter 'fc2.bias'"):
        SaliencyMask.load(part, model)


def test_guard_rejects_a_mask_entry_the_model_lacks() -> None:
    model = build_model("lenet", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="'features.0.weight' is not a parameter"):
        MaskGuard(model, opt, SaliencyMask({"features.0.weight": torch.zeros(3, dtype=torch.bool)}))


def test_frozen_mask_and_combine() -> None:
    model = build_model("lenet", 10, 1)
    frozen = SaliencyMask.frozen(model, ["fc2", "block1.0"])
    for n, m in frozen.masks.items():
        fixed = n.startswith("fc2.") or n.startswith("block1.0.")
        assert bool(m.all()) is not fixed and bool(m.any()) is not fixed, n
    # "fc" names a layer, not every layer whose name starts with "fc"
    assert SaliencyMask.frozen(model, ["fc"]).masks["fc1.weight"].all()
    half = SaliencyMask({n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()}, 0.5)
    both = half.combine(frozen)
    for n, m in both.masks.items():
        assert torch.equal(m, half.masks[n] & frozen.masks[n]), n
    assert both.threshold == 0.5 and half.combine(None) is half
