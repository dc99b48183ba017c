"""Damaged files are never trusted: checkpoints, the dataset cache and run folders.

Each case damages one file the way a power cut, a full disk, a partial copy or a careless edit
would (cut in half, emptied, replaced by a pickle, edited) and checks the answer: a one-line
error for a file the user gave, a one-line "rebuilding"/"redoing" and a rebuild or redo for a
file the tool made. Pickle payloads would create a marker file if anything unpickled them.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import datasets
from core.errors import UserError
from core.io import sha256_file, write_json
from datasets import load_raw
from models import build_model
from running.rundir import run_finished, run_problem, unfinish, write_manifest
from training.checkpoints import (
    _content_hash,
    build_once,
    checkpoint_exists,
    checkpoint_problem,
    forget_indices_of,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    usable_cache_entry,
    verify_checkpoint,
)

META: dict[str, Any] = {
    "model": "lenet",
    "num_classes": 10,
    "in_chans": 1,
    "dataset": "mnist5k",
    "split": {"split_seed": 0, "val_fraction": 0.1},
}


class Payload:
    """Unpickling this creates `marker`: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))


def save(stem: Path, seed: int = 0, meta: dict[str, Any] | None = None) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(stem, build_model("lenet", 10, 1), meta or META, torch.tensor([4, 2]))


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------------------- checkpoints


def test_sidecar_records_the_files_and_itself_and_is_written_last(tmp_path: Path) -> None:
    weights = save(tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["files"] == {
        "weights": {"bytes": weights.stat().st_size, "sha256": sha256_file(weights)},
        "forget_file": {"bytes": len("[4, 2]"), "sha256": sha256_file(tmp_path / "m_forget.json")},
    }
    assert checkpoint_problem(tmp_path / "m") is None and checkpoint_exists(tmp_path / "m")
    # the sidecar's self-hash covers every other key: changing any value breaks it
    body = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert meta["sidecar_sha256"] == hashlib.sha256(canon.encode()).hexdigest()


def test_a_crash_before_the_sidecar_leaves_an_entry_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.checkpoints as ck

    save(tmp_path / "m", seed=0)

    def crash(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "m", seed=1)  # new weights are in place, the old sidecar is not theirs
    assert "does not match the sha256" in str(checkpoint_problem(tmp_path / "m"))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "n", seed=1)  # a first build cut before its sidecar
    assert "sidecar" in str(checkpoint_problem(tmp_path / "n")) and "not found" in str(
        checkpoint_problem(tmp_path / "n")
    )


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit(key: str, value: Any) -> Callable[[Path], object]:
    def edit(stem: Path) -> None:
        side = stem.with_name("m.json")
        meta = json.loads(side.read_text())
        meta[key] = value
        side.write_text(json.dumps(meta, indent=2))

    return edit


def _reseal(w: Path, **changes: Any) -> None:
    """Change the sidecar and record consistent hashes: only the shapes can tell."""
    side = w.with_suffix(".json")
    meta = json.loads(side.read_text()) | changes
    meta.pop("sidecar_sha256")
    write_json(side, meta | {"sidecar_sha256": _content_hash(meta)})


def _drop_model(w: Path) -> None:
    side = w.with_suffix(".json")
    meta = json.loads(side.read_text())
    del meta["model"]
    side.write_text(json.dumps(meta))


def _resealed(**changes: Any) -> Callable[[Path], object]:
    return lambda stem: _reseal(stem.with_name("m.safetensors"), **changes)


DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "weights missing": (lambda s: s.with_name("m.safetensors").unlink(), "not found"),
    "weights truncated": (
        lambda s: _truncate(s.with_name("m.safetensors")),
        "weights file is truncated",
    ),
    "weights empty": (lambda s: s.with_name("m.safetensors").write_bytes(b""), "is empty"),
    "weights of another model": (
        lambda s: save(s.parent / "other", seed=5).replace(s.with_name("m.safetensors")),
        "weights file does not match the sha256 recorded",
    ),
    "sidecar truncated": (lambda s: _truncate(s.with_name("m.json")), "not valid JSON"),
    "sidecar a list": (lambda s: s.with_name("m.json").write_text("[1, 2]"), "not a JSON object"),
    "sidecar without model": (_edit("model", None), "has no valid 'model'"),
    "sidecar of an older version": (_edit("sidecar_sha256", None), "records no sha256"),
    "split_seed edited": (
        lambda s: _edit("split", META["split"] | {"split_seed": 7})(s),
        "was changed after it was written",
    ),
    "num_classes edited": (_edit("num_classes", 5), "was changed after it was written"),
    "forget file edited": (
        lambda s: s.with_name("m_forget.json").write_text("[4, 3]"),
        "forget-index file does not match",
    ),
    "sidecar for 5 classes": (
        _resealed(num_classes=5),
        "do not fit the sidecar's model lenet with 5 classes",
    ),
    "sidecar for 3 channels (another dataset)": (
        _resealed(in_chans=3, dataset="cifar10"),
        "3 input channels",
    ),
    "sidecar for another model": (_resealed(model="smallcnn"), "smallcnn"),
    "sidecar for no model at all": (_resealed(model="nosuchnet"), "cannot be built"),
    "sidecar for 10**30 classes": (_resealed(num_classes=10**30), "cannot be built"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_one_line_error_or_rebuild(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, words = DAMAGE[case]
    stem = tmp_path / "m"
    weights = save(stem)
    damage(stem)
    assert words in str(checkpoint_problem(stem))
    assert not checkpoint_exists(stem)
    # given by the user (-c, an experiment's `checkpoint`): one line naming the file
    for call in (load_checkpoint, verify_checkpoint):
        with pytest.raises(UserError) as e:
            call(weights)
        assert one_line(str(e.value)).startswith(f"{weights}: ") and words in str(e.value)
    # a cache entry: one line, then rebuilt exactly once, then trusted
    capsys.readouterr()
    builds: list[int] = []

    def rebuild() -> None:
        builds.append(1)
        save(stem)

    build_once(stem, rebuild)
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{weights}: ") and line.endswith("; rebuilding") and words in line
    assert builds == [1] and checkpoint_problem(stem) is None
    build_once(stem, lambda: builds.append(2))
    assert builds == [1] and capsys.readouterr().err == ""
    model, meta = load_checkpoint(stem)
    assert meta["split"]["split_seed"] == 0 and forget_indices_of(stem) == [4, 2]


def test_a_missing_cache_entry_is_built_without_a_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not usable_cache_entry(tmp_path / "m") and capsys.readouterr().err == ""


def test_a_renamed_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "EXECUTED"
    weights = save(tmp_path / "m")
    pickle_bomb(weights, marker)
    for call in (load_checkpoint, verify_checkpoint):
        with pytest.raises(UserError, match="not a safetensors file"):
            call(weights)
    with pytest.raises(UserError, match="not a safetensors file"):
        build_once(weights, lambda: (_ for _ in ()).throw(UserError("not a safetensors file")))
    assert not marker.exists()


def test_read_meta_refuses_an_edited_sidecar(tmp_path: Path) -> None:
    save(tmp_path / "m")
    assert read_meta(tmp_path / "m")["split"]["split_seed"] == 0
    _edit("split", META["split"] | {"split_seed": 7})(tmp_path / "m")
    with pytest.raises(UserError, match="m.json was changed after it was written"):
        read_meta(tmp_path / "m")


# ---------------------------------------------------------------------------- dataset cache


@pytest.fixture
def digits_cache(tmp_path: Path) -> Path:
    load_raw("digits", tmp_path)
    return tmp_path / "cache" / "digits.safetensors"


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    builds: list[int] = []
    info = datasets.DATASETS["digits"]

    def counted(root: Path, download: bool) -> dict[str, Any]:
        builds.append(1)
        return info.loader(root, download)

    monkeypatch.setitem(datasets.DATASETS, "digits", info.__class__(
        info.name, counted, info.flip, info.crop_pad, info.default_model, info.description))  # fmt: skip
    return builds


def _flip_a_pixel(cache: Path) -> None:
    data = bytearray(cache.read_bytes())
    data[-100] ^= 0xFF
    cache.write_bytes(bytes(data))


CACHE_DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "truncated": (_truncate, "not a whole safetensors file"),
    "emptied": (lambda c: c.write_bytes(b""), "not a whole safetensors file"),
    "one pixel changed": (_flip_a_pixel, "do not match their recorded sha256"),
    "no recorded hash": (
        lambda c: save_file(load_file(str(c)), str(c)),
        "records no content sha256",
    ),
}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_damaged_dataset_cache_is_rebuilt_with_one_line(
    case: str,
    digits_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = digits_cache.parent.parent
    good = load_raw("digits", root)
    builds = _count_builds(monkeypatch)
    capsys.readouterr()
    assert load_raw("digits", root).train_x.equal(good.train_x) and builds == []
    damage, words = CACHE_DAMAGE[case]
    damage(digits_cache)
    again = load_raw("digits", root)
    line = one_line(capsys.readouterr().err)
    assert line == f"{digits_cache}: {line.split(': ', 1)[1]}" and line.endswith("; rebuilding")
    assert words in line and builds == [1]
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, k), getattr(good, k)), k
    assert (again.classes, again.mean, again.std) == (good.classes, good.mean, good.std)
    load_raw("digits", root)
    assert builds == [1] and capsys.readouterr().err == ""


def test_a_pickle_in_the_dataset_cache_is_never_executed(
    digits_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = digits_cache.parent.parent
    marker = root / "EXECUTED"
    pickle_bomb(digits_cache, marker)
    pickle_bomb(digits_cache.with_suffix(".pt"), marker)  # the old cache name is never read
    capsys.readouterr()
    builds = _count_builds(monkeypatch)
    raw = load_raw("digits", root)
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{digits_cache}: not a whole safetensors file")
    assert line.endswith("; rebuilding")
    assert builds == [1] and raw.train_x.shape == (1438, 1, 8, 8)
    assert not marker.exists()


# ---------------------------------------------------------------------------- run folders


def _run(d: Path, with_mask: bool = True) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    save_checkpoint(d / "model", build_model("lenet", 10, 1), META, torch.tensor([1]))
    names = ["metrics.json", "model.safetensors", "model.json", "model_forget.json"]
    if with_mask:
        save_file({"w": torch.ones(3, dtype=torch.bool)}, str(d / "mask.safetensors"))
        names.append("mask.safetensors")
    write_json(d / "metrics.json", {"metrics": {"forget_acc": 0.5}})
    write_manifest(d, names)
    return names


def test_manifest_records_every_file_of_the_run(tmp_path: Path) -> None:
    names = _run(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == {
        n: {"bytes": (tmp_path / n).stat().st_size, "sha256": sha256_file(tmp_path / n)}
        for n in names
    }
    assert run_finished(tmp_path) and run_problem(tmp_path) is None
    with pytest.raises(ValueError, match="must list metrics.json"):
        write_manifest(tmp_path, ["model.json"])


RUN_DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "metrics.json truncated": (
        lambda d: _truncate(d / "metrics.json"),
        "metrics.json is truncated",
    ),
    "model.safetensors truncated": (
        lambda d: _truncate(d / "model.safetensors"),
        "model.safetensors is truncated",
    ),
    "mask deleted": (lambda d: (d / "mask.safetensors").unlink(), "mask.safetensors is missing"),
    "metrics.json edited, same size": (
        lambda d: (d / "metrics.json").write_text(
            (d / "metrics.json").read_text().replace("0.5", "0.9")
        ),
        "metrics.json does not match the sha256",
    ),
    "manifest truncated": (lambda d: _truncate(d / "manifest.json"), "manifest.json is damaged"),
    "manifest missing": (
        lambda d: (d / "manifest.json").unlink(),
        "metrics.json has no manifest.json",
    ),
}


@pytest.mark.parametrize("case", list(RUN_DAMAGE))
def test_damaged_run_is_redone_with_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path)
    damage, words = RUN_DAMAGE[case]
    damage(tmp_path)
    capsys.readouterr()
    assert not run_finished(tmp_path)
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{tmp_path}: ") and words in line and line.endswith("; redoing")


def test_a_run_that_never_started_is_not_finished_without_a_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not run_finished(tmp_path / "absent") and run_problem(tmp_path / "absent") == ""
    _run(tmp_path)
    unfinish(tmp_path)  # the redo removes the manifest first
    (tmp_path / "metrics.json").unlink()
    assert not run_finished(tmp_path) and capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- through main.py

CHEAP = {"class_to_forget": 3, "method": "ga_small", "epochs": 1, "lr": 0.001}
RECIPE = {"model": "lenet", "dataset": "mnist5k", "epochs": 1, "batch_size": 128}


@pytest.fixture
def fast_mia(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same attacks on at most 200 samples a side and 2 folds (as in test_runner.py)."""
    import functools

    import metrics

    monkeypatch.setattr(
        metrics, "salun_mia", functools.partial(metrics.salun_mia, max_per_side=200)
    )
    monkeypatch.setattr(metrics, "loss_mia", functools.partial(metrics.loss_mia, n_splits=2))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def main(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from cli import main as main_mod

    try:
        code = main_mod.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def test_damaged_cache_entries_are_rebuilt_and_damaged_runs_redone(
    tmp_path: Path, data_dir: Path, mnist5k: object, fast_mia: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    exp_file, ckpt, out = tmp_path / "exp.json", tmp_path / "checkpoints", tmp_path / "out"
    exp_file.write_text(json.dumps([{"checkpoint": RECIPE} | CHEAP]))
    argv: list[object] = ["-L", exp_file, "-NL", "--device", "cpu", "--out", out]
    argv += ["--checkpoints", ckpt, "--data-dir", data_dir]
    code, err = main(argv, capsys)
    assert code == 0, err
    run = out / "runs" / "00_ga_small_cf3" / "seed0"
    want = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k != "times"}
    [base] = ckpt.glob("*.safetensors")
    [oracle] = (ckpt / "oracles").glob("*__RF_*.safetensors")
    marker = tmp_path / "EXECUTED"
    rounds: list[tuple[dict[Path, Callable[[Path], object]], list[str]]] = [
        ({run / "metrics.json": _truncate, base: _truncate},
         [f"{run}: metrics.json is truncated", f"{base}: weights file is truncated",
          "training base model"]),
        ({run / "model.safetensors": _truncate, oracle: _truncate},
         [f"{run}: model.safetensors is truncated", f"{oracle}: weights file is truncated",
          "training retrain oracle"]),
        ({run / "outputs.safetensors": _truncate, oracle.with_suffix(".json"): _truncate},
         [f"{run}: outputs.safetensors is truncated", f"{oracle}: sidecar", "not valid JSON",
          "training retrain oracle"]),
        ({run / "manifest.json": lambda p: p.unlink(), base: lambda p: pickle_bomb(p, marker)},
         [f"{run}: metrics.json has no manifest.json", f"{base}: weights file is not a "
          "safetensors file", "training base model"]),
        ({run / "metrics.json": _truncate, base.with_suffix(".json"):
          lambda p: p.write_text(p.read_text().replace('"split_seed": 0', '"split_seed": 1'))},
         [f"{run}: metrics.json is truncated", f"{base}: sidecar", "was changed after it was "
          "written", "training base model"]),
        ({run / "metrics.json": _truncate, base: lambda p: p.write_bytes(b"")},
         [f"{base}: weights file is empty", "training base model"]),
    ]  # fmt: skip
    for damage, lines in rounds:
        for path, hurt in damage.items():
            hurt(path)
        code, err = main(argv, capsys)
        assert code == 0, err
        for words in lines:
            assert words in err, (words, err)
        for line in err.splitlines():
            if line.startswith(str(tmp_path)):
                assert line.endswith(("; rebuilding", "; redoing")), line
        assert err.count("== 00_ga_small_cf3 seed 0") == 1, err  # redone once
        got = json.loads((run / "metrics.json").read_text())
        assert {k: v for k, v in got.items() if k != "times"} == want  # the same numbers
        assert run_finished(run) and checkpoint_exists(base) and checkpoint_exists(oracle)
    assert not marker.exists()
    # nothing damaged: nothing redone, nothing rebuilt
    code, err = main(argv, capsys)
    assert code == 0 and "== " not in err and "training" not in err, err


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    for a, b in ((".safetensors", ".safetensors"), (".json", ".json")):
        dst.with_name(dst.name + b).write_bytes(src.with_suffix(a).read_bytes())
    forget = src.with_name(src.name.removesuffix(".safetensors") + "_forget.json")
    dst.with_name(dst.name + "_forget.json").write_bytes(forget.read_bytes())
    return dst.with_name(dst.name + ".safetensors")


USER_DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "truncated": (lambda w: _truncate(w), "weights file is truncated"),
    "empty": (lambda w: w.write_bytes(b""), "weights file is empty"),
    "renamed pickle": (
        lambda w: pickle_bomb(w, w.parent / "EXECUTED"),
        "weights file is not a safetensors file",
    ),
    "sidecar truncated": (lambda w: _truncate(w.with_suffix(".json")), "not valid JSON"),
    "sidecar a list": (lambda w: w.with_suffix(".json").write_text("[]"), "not a JSON object"),
    "sidecar without model": (
        _drop_model,
        "has no valid 'model'",
    ),
    "split_seed edited": (
        lambda w: w.with_suffix(".json").write_text(
            w.with_suffix(".json").read_text().replace('"split_seed": 0', '"split_seed": 3')
        ),
        "was changed after it was written",
    ),
    "sidecar for 5 classes": (lambda w: _reseal(w, num_classes=5), "with 5 classes"),
    "sidecar for another dataset": (
        lambda w: _reseal(w, in_chans=3, dataset="cifar10"),
        "3 input channels",
    ),
}


@pytest.mark.parametrize("case", list(USER_DAMAGE))
def test_a_damaged_user_checkpoint_is_one_line_before_anything_runs(
    case: str, tmp_path: Path, tiny_base: Path, data_dir: Path, fast_mia: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    weights = _copy_checkpoint(tiny_base, tmp_path / "user")
    damage, words = USER_DAMAGE[case]
    damage(weights)
    out = tmp_path / "out"
    code, err = main(["-c", weights, "-CF", 3, "-M", "ga_small", "-E", 1, "-NL", "--device",
                      "cpu", "--out", out, "--checkpoints", tmp_path / "ck", "--data-dir",
                      data_dir], capsys)  # fmt: skip
    line = one_line(err)
    assert code == 2 and line.startswith("error: ") and str(weights) in line and words in line
    assert not (out / "runs").exists() and not (tmp_path / "ck").exists()  # nothing ran
    assert not (tmp_path / "EXECUTED").exists()
