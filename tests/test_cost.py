"""Honest cost (training/cost.py): the counters equal the samples each loop drew.

Every check counts what the loop drew with its own hook (``fit``'s ``on_batch``, a wrapped
batches iterator of the method's context) and compares it with the counted work exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY
from torch import Tensor, nn

from datasets import DeviceData, ForgetSpec, RawData, make_split
from methods import MethodContext, Monitor, Settings, copy_model, unlearn
from models import build_model
from training.checkpoints import load_checkpoint, read_meta
from training.cost import Work, count_work, not_counted, sidecar_cost
from training.loop import fit
from training.recipe import train_checkpoint
from unlearning import METHODS


@pytest.fixture(scope="module")
def setup(mnist5k: RawData) -> tuple[DeviceData, Any]:
    data = DeviceData(mnist5k, "cpu")
    split = make_split(mnist5k, ForgetSpec(classes=(7,)), 0, 0.1)
    return data, split


def test_fit_counts_every_drawn_sample_and_step(setup: Any) -> None:
    data, split = setup
    drawn: list[int] = []
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1)
    train = split.retain[:700]
    cfg = dataclasses.replace(TINY, epochs=2, batch_size=128)
    result = fit(model, data, train, split.val, cfg, on_batch=lambda bi: drawn.append(len(bi)))
    w = result.work
    assert sum(drawn) == 2 * 700 and w.backward_samples == sum(drawn)
    assert w.steps == len(drawn) == 2 * 6
    assert w.forward_samples == 2 * len(split.val)  # one validation pass per epoch
    assert w.wall_seconds > 0 and w.cpu_seconds > 0


class CountingContext(MethodContext):
    """A method context whose shuffled passes count the samples they hand out."""

    drawn: int = 0

    def _count(self, it: Iterator[tuple[Tensor, Tensor, Tensor]]) -> Iterator[Any]:
        for x, y, bi in it:
            self.drawn += len(y)
            yield x, y, bi

    def batches(self, idx: Tensor, batch_size: int, augment: bool = True) -> Iterator[Any]:
        return self._count(super().batches(idx, batch_size, augment))

    def cycle(self, idx: Tensor, batch_size: int, augment: bool = True) -> Iterator[Any]:
        return self._count(super().cycle(idx, batch_size, augment))


def _context(data: DeviceData, split: Any, model: nn.Module) -> CountingContext:
    return CountingContext(data, split, 0, copy_model(model), TINY, "lenet")


@pytest.mark.parametrize(
    ("method", "steps_of"),
    [("ft", lambda n_f, n_r: -(-n_r // 64)), ("ga", lambda n_f, n_r: -(-n_f // 64)),
     ("rl_split", lambda n_f, n_r: -(-n_f // 64) - (-n_r // 64))],
)  # fmt: skip
def test_methods_count_what_they_drew_and_not_the_monitor(
    setup: Any, method: str, steps_of: Any
) -> None:
    data, split = setup
    sub = dataclasses.replace(split, retain=split.retain[:300], forget=split.forget[:100])
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1)
    ctx = _context(data, sub, model)
    monitor = Monitor()
    spec = METHODS[method]
    settings = Settings(method, lr=0.01, epochs=1, batch_size=64, args=spec.args())
    unlearn(model, ctx, settings, None, monitor)
    w = monitor.work
    assert w is not None and len(monitor.rows) == 1  # the monitor evaluated once ...
    assert w.forward_samples == 0  # ... and none of its passes counted
    assert w.backward_samples == ctx.drawn > 0
    assert w.steps == steps_of(100, 300)


def test_teacher_passes_count_as_forward_only(setup: Any) -> None:
    data, split = setup
    sub = dataclasses.replace(split, retain=split.retain[:200], forget=split.forget[:60])
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1)
    ctx = _context(data, sub, model)
    monitor = Monitor()
    spec = METHODS["scrub"]
    args = spec.args(msteps=1)
    unlearn(model, ctx, Settings("scrub", lr=1e-4, epochs=1, batch_size=50, args=args), None,
            monitor)  # fmt: skip
    w = monitor.work
    assert w is not None
    # every student sample is trained on, and the teacher sees each of them once, without graph
    assert w.backward_samples == ctx.drawn and w.forward_samples == ctx.drawn


def test_nesting_pausing_and_grad_free_passes() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with count_work() as outer:
        with count_work() as inner:
            model(torch.zeros(5, 3)).sum().backward()  # 5 samples with a graph
            opt.step()
        with torch.no_grad():
            model(torch.zeros(7, 3))  # 7 without
        with not_counted():
            model(torch.zeros(11, 3)).sum().backward()
            opt.step()
    assert (inner.backward_samples, inner.forward_samples, inner.steps) == (5, 0, 1)
    assert (outer.backward_samples, outer.forward_samples, outer.steps) == (5, 7, 1)
    model(torch.zeros(2, 3))  # outside any block: nothing counts, nothing breaks
    assert outer.backward_samples == 5
    assert Work.from_json(json.loads(json.dumps(outer.to_json()))) == Work(
        5, 7, 1, outer.wall_seconds, outer.cpu_seconds
    )
    assert Work.from_json({"steps": 3}) is None


def test_checkpoint_sidecar_records_work_and_machine(tiny_base: Path) -> None:
    meta = read_meta(tiny_base)
    cost = meta["cost"]
    n_train, n_val = meta["split"]["sizes"]["retain"], meta["split"]["sizes"]["val"]
    epochs, batch = meta["train"]["epochs"], meta["train"]["batch_size"]
    assert cost["backward_samples"] == epochs * n_train
    assert cost["forward_samples"] == epochs * n_val
    assert cost["steps"] == epochs * -(-n_train // batch)
    rec = sidecar_cost(meta)
    assert rec["host"] and rec["device"] == "cpu" and rec["threads"] == meta["threads"]
    assert rec["wall_seconds"] == meta["train_seconds"]


def test_retrain_method_counts_its_training(setup: Any, tmp_path: Path) -> None:
    data, split = setup
    sub = dataclasses.replace(split, retain=split.retain[:256])
    path = train_checkpoint(TINY, ForgetSpec(), tmp_path, device=torch.device("cpu"),
                            raw=data.raw, quiet=True)  # fmt: skip
    model, _ = load_checkpoint(path, "cpu")
    ctx = MethodContext(data, sub, 0, copy_model(model), TINY, "lenet")
    monitor = Monitor()
    unlearn(model, ctx, Settings("retrain"), None, monitor)
    w = monitor.work
    assert w is not None
    assert w.backward_samples == TINY.epochs * 256 and w.steps == TINY.epochs * 2
    assert w.forward_samples == TINY.epochs * len(sub.val)
