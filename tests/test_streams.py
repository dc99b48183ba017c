"""Independent random streams (core/rng.py) where the tool draws: forget set, data order,
augmentation, random labels, feature sample; no two share a permutation (issue 12)."""

from __future__ import annotations

import torch
from conftest import TINY

from analysis.features import sample_pool
from core.rng import AUGMENT, DATA_ORDER, FORGET, LABELS, generator
from datasets import DeviceData, ForgetSpec, RawData, make_split
from methods import MethodContext
from models import build_model


def test_forget_draw_has_its_own_stream_and_the_feature_sample_another(mnist5k: RawData) -> None:
    split = make_split(mnist5k, ForgetSpec(fraction=0.1, seed=0), 0, 0.1)
    train = split.train
    n = round(0.1 * len(mnist5k.train_y))
    want = train[torch.randperm(len(train), generator=generator(0, FORGET))[:n]]
    assert torch.equal(split.forget, torch.sort(want).values)
    # the feature sample of the same seed: its own permutation, so it holds about its share
    # of the forget set (1000 of 3600 training samples: ~111 of 400), not all of it
    sample = sample_pool(mnist5k, 0, 0.1, 1000, seed=0)
    overlap = int(torch.isin(sample, split.forget).sum())
    assert 70 < overlap < 160
    # the bias the streams remove: one randperm(seed) for both put every forget sample in it
    shared = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    old_forget, old_sample = train[shared[:n]], train[shared[:1000]]
    assert int(torch.isin(old_sample, old_forget).sum()) == n


def test_method_context_streams_are_separate_and_reproducible(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    split = make_split(mnist5k, ForgetSpec(classes=(7,)), 0, 0.1)
    model = build_model("lenet", 10, 1)

    def ctx() -> MethodContext:
        return MethodContext(data, split, 3, model, TINY, "lenet")

    a = ctx()
    for g, purpose in ((a.generator, DATA_ORDER), (a.aug_generator, AUGMENT),
                       (a.label_generator, LABELS)):  # fmt: skip
        assert torch.equal(torch.randperm(50, generator=g),
                           torch.randperm(50, generator=generator(3, purpose)))  # fmt: skip
    # the order of a pass does not depend on how much augmentation or labelling came before
    first = next(ctx().batches(split.retain, 32))[2]
    b = ctx()
    b.wrong_labels(torch.zeros(64, dtype=torch.long))
    assert torch.equal(next(b.batches(split.retain, 32))[2], first)
    # random labels: always another class, from the labels stream
    c = ctx()
    wrong = c.wrong_labels(torch.full((500,), 4))
    assert (wrong != 4).all() and len(set(wrong.tolist())) == 9
