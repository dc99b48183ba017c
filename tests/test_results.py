"""Tests for running/results.py: metrics.json written and read back by one typed object, and
per-sample outputs saved, read and selected by index (hand-built inputs, known answers)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import UserError
from running.results import (
    RunResult,
    load_outputs,
    load_reference,
    reference_path,
    save_outputs,
    save_reference,
    select,
    select_splits,
)
from running.runner import _reusable_reference
from training.outputs import Outputs

# metrics.json's keys in the order the runner has always written them (users' scripts read them)
KEYS = [
    "experiment", "index", "name", "method", "seed", "forget", "metrics", "oracle", "base",
    "gaps", "times", "mask_kept", "oracle_checkpoint", "base_checkpoint",
]  # fmt: skip


def strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def result(**changes: Any) -> RunResult:
    r = RunResult(
        experiment="00_ft_cf3",
        index=0,
        name="ft_cf3",
        method="ft",
        seed=1,
        forget={"classes": [3], "n": 2, "sha256": "ab"},
        metrics={"forget_acc": 0.5, "test_forget_acc": math.nan, "per_class": [1.0, math.inf]},
        oracle={"forget_acc": 0.0},
        base={"forget_acc": 1.0},
        gaps={"avg_gap": 2.5},
        times={"unlearn_time": 1.0},
        mask_kept=None,
        oracle_checkpoint="ck/oracles/o",
        base_checkpoint="ck/b",
    )
    for k, v in changes.items():
        setattr(r, k, v)
    return r


def outputs(logits: list[list[float]], labels: list[int], indices: list[int]) -> Outputs:
    lg, y = torch.tensor(logits), torch.tensor(labels)
    loss = torch.nn.functional.cross_entropy(lg, y, reduction="none")
    return Outputs(lg, y, loss, torch.tensor(indices))


def test_metrics_json_keys_order_strict_values_and_round_trip(tmp_path: Path) -> None:
    path = result().write(tmp_path)
    assert path == tmp_path / "metrics.json"
    obj = strict_json(path.read_text())
    assert list(obj) == KEYS  # optional sections absent when they do not apply
    assert obj["metrics"] == {"forget_acc": 0.5, "test_forget_acc": None, "per_class": [1.0, None]}
    assert obj["mask_kept"] is None
    back = RunResult.read(tmp_path)
    assert back.run_dir == tmp_path and back.to_json() == obj and back.challenge is None

    r = result(challenge={"score": 0.7}, frozen_changed=[], mask_kept=0.5)
    obj = strict_json(r.write(tmp_path).read_text())
    assert list(obj) == [*KEYS, "frozen_changed", "challenge"]
    assert obj["frozen_changed"] == [] and obj["challenge"] == {"score": 0.7}
    assert RunResult.read(tmp_path / "metrics.json").frozen_changed == []


def test_unknown_keys_are_kept_and_a_missing_key_is_one_line(tmp_path: Path) -> None:
    obj = result().to_json() | {"added_later": {"x": 1}}
    (tmp_path / "metrics.json").write_text(json.dumps(obj))
    r = RunResult.read(tmp_path)
    assert r.extra == {"added_later": {"x": 1}}
    assert strict_json(r.write(tmp_path / "again").read_text())["added_later"] == {"x": 1}

    del obj["gaps"]
    (tmp_path / "metrics.json").write_text(json.dumps(obj))
    with pytest.raises(UserError) as e:
        RunResult.read(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'metrics.json'}: key 'gaps' is missing; not a run's metrics.json"
    )


def test_flat_names_for_wandb() -> None:
    flat = result(challenge={"score": 0.7}).flat()
    assert flat["metrics/forget_acc"] == 0.5 and flat["oracle/forget_acc"] == 0.0
    assert flat["gaps/avg_gap"] == 2.5 and flat["times/unlearn_time"] == 1.0
    assert flat["challenge/score"] == 0.7


def test_outputs_file_round_trip_and_empty_optional_splits_left_out(tmp_path: Path) -> None:
    empty = Outputs(torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0),
                    torch.empty(0, dtype=torch.long))  # fmt: skip
    outs = {
        "forget": outputs([[2.0, 0.0]], [0], [7]),
        "retain": outputs([[0.0, 1.0], [1.0, 0.0]], [1, 1], [1, 4]),
        "val": outputs([[0.0, 3.0]], [1], [2]),
        "val_forget": outputs([[5.0, 0.0]], [0], [9]),
        "test": outputs([[1.0, 1.0]], [0], [0]),
        "test_forget": empty,
    }
    meta = {"dataset": "toy", "num_classes": 2, "classes": ["a", "b"]}
    path = save_outputs(tmp_path / "outputs.safetensors", outs, meta)
    back, m = load_outputs(path)
    assert set(back) == {"forget", "retain", "val", "val_forget", "test"}
    for name, o in back.items():
        for f in ("logits", "labels", "losses", "indices"):
            assert torch.equal(getattr(o, f), getattr(outs[name], f)), (name, f)
    assert m == {"format": 1, "dataset": "toy", "num_classes": 2, "classes": ["a", "b"]}
    assert [p.name for p in tmp_path.iterdir()] == ["outputs.safetensors"]  # no temporary left

    with pytest.raises(UserError, match="outputs.safetensors not found: the run was made before"):
        load_outputs(tmp_path / "other" / "outputs.safetensors")


def test_selection_by_index_and_relabelled_losses(tmp_path: Path) -> None:
    # logits (0, ln 3): p(class 1) = 3/4, so the loss is ln 4 for label 0 and ln 4/3 for 1
    ln3 = math.log(3)
    pool = outputs([[0.0, ln3], [9.0, 0.0], [0.0, ln3], [0.0, 0.0]], [1, 0, 1, 0], [0, 1, 2, 3])
    test = outputs([[1.0, 0.0]], [0], [0])
    path = reference_path(tmp_path / "base.safetensors")
    assert path == tmp_path / "outputs" / "base.safetensors"
    save_reference(path, pool, test, {"weights_sha256": "f00"})
    whole, meta = load_reference(path)
    assert meta["weights_sha256"] == "f00"

    got = select(whole["pool"], torch.tensor([2, 1]))
    assert got.indices.tolist() == [2, 1] and got.labels.tolist() == [1, 0]
    assert torch.equal(got.logits, pool.logits[[2, 1]])
    assert got.losses[0].item() == pytest.approx(math.log(4 / 3))
    # the run's labels (class replacement): 1 -> 0 on sample 2, so its loss is recomputed
    relab = select(whole["pool"], torch.tensor([2, 1]), torch.tensor([0, 0]))
    assert relab.labels.tolist() == [0, 0]
    assert relab.losses.tolist() == pytest.approx([math.log(4), got.losses[1].item()])
    assert len(select(whole["pool"], torch.tensor([], dtype=torch.long))) == 0

    splits = select_splits(whole, {"forget": torch.tensor([3]), "test_forget": torch.tensor([0])})
    assert splits["forget"].indices.tolist() == [3] and splits["forget"].labels.tolist() == [0]
    assert torch.equal(splits["test_forget"].logits, test.logits)  # test* from the test set


def test_reference_outputs_are_reused_only_for_the_weights_they_came_from(tmp_path: Path) -> None:
    path = save_reference(
        tmp_path / "outputs" / "b.safetensors",
        outputs([[1.0, 0.0]], [0], [0]),
        outputs([[0.0, 1.0]], [1], [0]),
        {"weights_sha256": "a" * 64},
    )
    found = _reusable_reference(path, "a" * 64)
    assert found is not None and found["test"].labels.tolist() == [1]
    assert _reusable_reference(path, "b" * 64) is None  # other weights: computed again
    assert _reusable_reference(path, None) is None  # weights without a recorded hash
    path.write_bytes(path.read_bytes()[:20])  # damaged
    assert _reusable_reference(path, "a" * 64) is None
