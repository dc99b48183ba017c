"""Self-supervised base models end to end: the recipe, train.py --pretrain, exact oracles, the
repr section of metrics.json and the summary columns (training/pretrain.py,
evaluation/repr_eval.py). The BYOL core and the metrics on hand-built features are tested in
tests/test_byol.py and tests/test_representation.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, TINY
from safetensors.torch import load_file

import metrics
from cli import train as train_cli
from core.errors import UserError
from datasets import DeviceData, ForgetSpec, RawData, indices_hash, load_raw, make_split
from evaluation.repr_eval import FeatureCapture, ReprCache, split_features
from models import build_model
from running.config import load_experiments, parse_experiment
from running.runner import SPLITS, Runner, RunnerOptions
from running.tables import summarize, to_csv, to_markdown, to_terminal
from training.byol import ByolConfig
from training.checkpoints import load_checkpoint, read_meta
from training.config import PretrainConfig, TrainConfig
from training.outputs import collect_outputs
from training.pretrain import (
    byol_config,
    pretrained_encoder,
    pretraining_data,
    pretraining_indices,
    resolved_pretrain,
)
from training.recipe import base_checkpoint_name, train_checkpoint

CPU = torch.device("cpu")
ONE = {"method": "byol", "epochs": 1, "batch_size": 256}  # one quick BYOL epoch
BYOL_TINY = dataclasses.replace(TINY, pretrain=PretrainConfig(epochs=1))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder shared by this module's tests, so one encoder is pretrained once."""
    return tmp_path_factory.mktemp("byol_ckpts")


# ---------------------------------------------------------------------------------- recipe


def test_pretrain_defaults_are_byol_config_defaults() -> None:
    p, b = PretrainConfig(), ByolConfig()
    for f in dataclasses.fields(ByolConfig):
        if f.name != "seed":  # None in a recipe: the recipe's seed
            want = getattr(b, f.name)
            got = getattr(p, f.name)
            assert (tuple(got) if isinstance(got, list) else got) == want, f.name
    assert byol_config(TrainConfig(seed=7, pretrain=p)) == dataclasses.replace(b, seed=7)


def test_recipe_round_trip_and_tau_alias() -> None:
    obj = {"epochs": 3, "pretrain": ONE | {"tau": 0.9, "projector": [64, 32]}, "finetune": "linear"}
    cfg = TrainConfig.parse(obj, "exp.json: ", "checkpoint")
    assert cfg.pretrain is not None and cfg.pretrain.tau_base == 0.9
    assert cfg.pretrain.projector == [64, 32] and cfg.finetune == "linear"
    stored = json.loads(json.dumps(cfg.to_json()))  # what a sidecar holds
    assert stored["pretrain"]["tau_base"] == 0.9 and "tau" not in stored["pretrain"]
    assert TrainConfig.from_json(stored) == cfg
    assert TrainConfig.parse(stored, "x: ") == cfg
    exp = parse_experiment({"checkpoint": obj, "class_to_forget": 7}, "exp.json: ")
    assert exp.checkpoint == cfg
    for bad, msg in [
        ({"finetune": "linear"}, "finetune = 'linear' is invalid without a pretrain object"),
        ({"pretrain": {"tau": 1.5}}, "key 'checkpoint.pretrain.tau': 1.5 is invalid"),
        ({"pretrain": {"projector": [8]}}, "use \\[hidden, out\\]"),
        ({"pretrain": {"method": "simclr"}}, "use one of byol"),
        ({"pretrain": {"data": "unlabeled"}}, "only stl10 has an unlabeled split"),
        ({"pretrain": {"epoch": 2}}, "unknown key 'checkpoint.pretrain.epoch'"),
    ]:
        with pytest.raises(UserError, match=msg):
            TrainConfig.parse(bad, "exp.json: ", "checkpoint")


def test_cache_names_without_pretraining_are_unchanged() -> None:
    # the names these recipes had before pretraining existed (they name users' cached models)
    assert base_checkpoint_name(TrainConfig()) == "lenet_mnist5k_base_s0_9a0b37a8b4"
    subset = TrainConfig(classes=[0, 2, 5], epochs=3, lr=1)
    assert base_checkpoint_name(subset) == "lenet_mnist5k-c0-2-5_base_s0_def833878e"
    flags = train_cli.train_config(train_cli.build_parser().parse_args([]))
    assert base_checkpoint_name(flags) == "lenet_mnist5k_base_s0_9a0b37a8b4"
    assert "pretrain" not in TrainConfig().to_json() and "finetune" not in TrainConfig().to_json()


def test_cache_names_with_pretraining() -> None:
    byol = TrainConfig(pretrain=PretrainConfig())
    name = base_checkpoint_name(byol)
    assert name.startswith("lenet_mnist5k-byol_base_s0_") and name != base_checkpoint_name(
        TrainConfig()
    )
    # written out in full (the default seed resolved: the recipe's) it is the same recipe
    full = TrainConfig.parse({"pretrain": resolved_pretrain(byol)})
    assert base_checkpoint_name(full) == name
    assert base_checkpoint_name(TrainConfig(pretrain=PretrainConfig(lr=2e-3))) == name
    others = {
        base_checkpoint_name(TrainConfig(pretrain=PretrainConfig(epochs=5))),
        base_checkpoint_name(TrainConfig(pretrain=PretrainConfig(tau_base=0.9))),
        base_checkpoint_name(TrainConfig(pretrain=PretrainConfig(), finetune="linear")),
        base_checkpoint_name(TrainConfig(seed=1, pretrain=PretrainConfig())),
    }
    assert len(others) == 4 and name not in others
    linear = base_checkpoint_name(TrainConfig(pretrain=PretrainConfig(), finetune="linear"))
    assert linear.startswith("lenet_mnist5k-byol-linear_base_s0_")


# ------------------------------------------------------------------------- train.py --pretrain


def test_train_py_pretrain_byol_records_the_recipe(
    ckpts: Path, data_dir: Path, mnist5k: RawData
) -> None:
    argv = ["--pretrain", "byol", "--pretrain-epochs", "1", "--epochs", "1", "--tau", "0.98"]
    argv += ["--out", str(ckpts), "--data-dir", str(data_dir)]
    path = train_cli.main(argv)
    meta = read_meta(path)
    assert path.name.startswith("lenet_mnist5k-byol_base_s0_")
    given = PretrainConfig(epochs=1, tau_base=0.98)
    assert meta["train"]["pretrain"] == given.to_json()  # the recipe as given (oracles rerun it)
    assert meta["train"]["finetune"] == "full"
    pre = meta["pretrain"]  # and resolved: every default, the seed
    assert pre["recipe"] == resolved_pretrain(TrainConfig(pretrain=given))
    assert pre["recipe"]["seed"] == 0 and pre["recipe"]["projector"] == [512, 128]
    assert pre["data"] == "retain set of the pool" and pre["images"] == 3600
    assert pre["excluded"] == 0 and pre["finetune"] == "full" and "cosine" in pre["tau_schedule"]
    assert pre["encoder_reused"] is False and 0.0 < pre["knn_acc"] <= 1.0
    assert meta["train_seconds"] >= pre["seconds"] > 0  # pretraining is part of its cost
    enc = read_meta(ckpts / "encoders" / pre["encoder"])
    assert enc["kind"] == "encoder" and enc["images"] == 3600
    # the counted work (training/cost.py): one epoch of each, 3600 images
    assert enc["cost"]["steps"] == math.ceil(3600 / 256)
    assert meta["cost"]["steps"] == math.ceil(3600 / 128) + math.ceil(3600 / 256)
    # the same command again: the encoder comes from the cache, the model is the same
    again = read_meta(train_cli.main(argv))
    assert again["pretrain"]["encoder_reused"] is True
    assert again["files"]["weights"]["sha256"] == meta["files"]["weights"]["sha256"]
    # an ordinary base model: every unlearning method loads it as any other
    model, _ = load_checkpoint(path)
    assert all(p.requires_grad for p in model.parameters())


def test_linear_finetune_leaves_the_encoder_bit_identical(ckpts: Path, mnist5k: RawData) -> None:
    cfg = dataclasses.replace(BYOL_TINY, finetune="linear")
    path = train_checkpoint(cfg, ForgetSpec(), ckpts, device=CPU, raw=mnist5k, quiet=True)
    meta = read_meta(path)
    tuned = load_file(str(path))
    encoder = load_file(str(ckpts / "encoders" / (meta["pretrain"]["encoder"] + ".safetensors")))
    changed = sorted(k for k in tuned if not torch.equal(tuned[k], encoder[k]))
    assert changed == ["fc2.bias", "fc2.weight"]  # batch-norm statistics included
    # the head did learn on the frozen features: 0.37 after its one epoch (chance: 0.1)
    assert meta["metrics"]["val_acc"] > 0.2


def test_oracle_pretraining_never_draws_a_forget_index(
    ckpts: Path, mnist5k: RawData, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(BYOL_TINY, pretrain=PretrainConfig(epochs=1, knn_every=0))
    split = make_split(mnist5k, ForgetSpec(classes=(7,)))
    data = DeviceData(mnist5k)
    pdata, source = pretraining_data(cfg, data, None)
    images, excluded = pretraining_indices(cfg, mnist5k, split, pdata, source, shared=False)
    assert torch.equal(images, split.retain) and torch.equal(excluded, split.forget)
    forget = set(split.forget.tolist())
    drawn: set[int] = set()

    def hook(idx: torch.Tensor) -> None:
        batch = set(idx.tolist())
        assert not batch & forget, sorted(batch & forget)[:5]
        drawn.update(batch)

    enc = pretrained_encoder(
        cfg, "lenet", mnist5k, pdata, source, images, excluded, split, tmp_path / "enc",
        device=CPU, quiet=True, on_batch=hook,
    )  # fmt: skip
    assert drawn == set(split.retain.tolist())
    assert enc.meta["excluded"] == len(split.forget) == 360
    assert enc.meta["excluded_sha256"] == indices_hash(split.forget)
    forget_file = tmp_path / "enc" / f"{enc.path.name}_forget.json"
    assert json.loads(forget_file.read_text()) == split.forget.tolist()
    # the approximation: the base model's images, forget set included
    shared, none = pretraining_indices(cfg, mnist5k, split, pdata, source, shared=True)
    assert torch.equal(shared, split.train) and len(none) == 0


# ----------------------------------------------------------------------- repr in metrics.json


def test_captured_features_are_the_pre_logits_features(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    split = make_split(mnist5k, ForgetSpec(classes=(7,)))
    for name, n_each in (("lenet", 40), ("resnet18_cifar", 4)):  # a timm model's head too
        torch.manual_seed(0)
        model = build_model(name, 10, 1).eval()
        few = dataclasses.replace(split, **{n: getattr(split, n)[:n_each] for n in SPLITS})
        cap = FeatureCapture(model)
        outs = {n: collect_outputs(model, data.batches(getattr(few, n), 16,
                                   source="test" if n.startswith("test") else "train"))
                for n in SPLITS}  # fmt: skip
        got = cap.take({n: len(outs[n]) for n in SPLITS})
        want = split_features(model, data, few)
        assert got is not None and all(torch.allclose(got[n], want[n], atol=1e-5) for n in SPLITS)
        assert not model.get_classifier()._forward_pre_hooks  # the hook is gone
    # rows from other passes: no silent mix-up, the caller computes them itself
    cap = FeatureCapture(model)
    model(data.normalise(data.x["train"][:3]))
    assert cap.take({"forget": 2}) is None


def _runner(exps: list[dict[str, Any]], out: Path, ckpts: Path, data_dir: Path) -> Runner:
    opts = RunnerOptions(source="test", out=out, ckpt_dir=ckpts, device=CPU, nexp=1,
                         data_dir=data_dir, quiet=True)  # fmt: skip
    return Runner([parse_experiment(e, "") for e in exps], opts)


def test_repr_section_and_shared_encoder_oracle(
    ckpts: Path, data_dir: Path, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # smaller MIA attacks (as tests/test_runner.py's fast_mia): not what is tested here
    monkeypatch.setattr(
        metrics, "salun_mia", functools.partial(metrics.salun_mia, max_per_side=200)
    )
    monkeypatch.setattr(metrics, "loss_mia", functools.partial(metrics.loss_mia, n_splits=2))
    recipe = TINY.to_json() | {"pretrain": ONE}
    exps = [
        {"checkpoint": recipe, "class_to_forget": 7, "method": "rl_split", "epochs": 1,
         "pretrain_oracle": "shared"},
        {"checkpoint": str(tiny_base), "class_to_forget": 7, "method": "ft", "epochs": 1,
         "representation": False},
    ]  # fmt: skip
    runner = _runner(exps, tmp_path / "out", ckpts, data_dir)
    runner.resolve()
    results = runner.run_all()
    assert len(results) == 2
    byol, plain = (json.loads((r.run_dir / "metrics.json").read_text()) for r in results)  # type: ignore[operator]
    rep = byol["repr"]
    keys = {"probe_forget_acc", "probe_test_forget_acc", "probe_test_acc", "knn_forget_acc",
            "cka_oracle", "cka_base"}  # fmt: skip
    for who in (rep, rep["base"], rep["oracle"]):
        assert keys <= set(who) and all(0.0 <= who[k] <= 1.0 + 1e-9 for k in keys)
    assert rep["base"]["cka_base"] == pytest.approx(1.0) == rep["oracle"]["cka_oracle"]
    assert rep["cka_base"] < 1.0  # unlearning moved the features
    assert rep["gaps"]["probe_forget_acc"] == pytest.approx(
        100 * (rep["probe_forget_acc"] - rep["oracle"]["probe_forget_acc"])
    )
    assert rep["sizes"] == {"probe_fit": 400, "knn_bank": 3280, "cka_test": 1000}
    assert rep["features_reused"] is True and byol["times"]["repr_time"] > 0
    # the oracle reused the base model's encoder: flagged, and named apart from the exact one
    assert "shared encoder" in byol["oracle_approximation"]
    assert byol["oracle_checkpoint"].endswith("_SE")
    oracle = read_meta(byol["oracle_checkpoint"])
    assert oracle["pretrain"]["oracle"] == "shared" and oracle["pretrain"]["excluded"] == 0
    assert (
        oracle["pretrain"]["encoder"] == read_meta(byol["base_checkpoint"])["pretrain"]["encoder"]
    )
    # turned off: no section, no cost
    assert "repr" not in plain and "repr_time" not in plain["times"]
    assert "oracle_approximation" not in plain
    # the summary shows the repr columns only where the runs have them
    rows = summarize(results, [r.experiment for r in results])
    assert "probe forget" in rows[0] and "probe forget" not in rows[2]
    md = to_markdown(rows)
    assert "| probe forget | probe test-forget | kNN forget | CKA oracle |" in md
    assert "probe forget" in to_csv(rows) and " probe " in to_terminal(
        results, [r.experiment for r in results]
    )
    only_plain = [r for r in results if r.experiment.startswith("01")]
    assert "probe" not in to_markdown(summarize(only_plain, [only_plain[0].experiment]))


def test_repr_cache_computes_reference_features_once(mnist5k: RawData, tiny_base: Path) -> None:
    data = DeviceData(mnist5k)
    split = make_split(mnist5k, ForgetSpec(classes=(7,)))
    model, _ = load_checkpoint(tiny_base)
    model.eval()
    cache = ReprCache()
    a = cache.section(model, ("b", model), ("o", model), data, split)
    whole = cache.whole["b"]
    b = cache.section(model, ("b", model), ("o", model), data, split)
    assert cache.whole["b"] is whole and a == b
    # the same model as base, oracle and unlearned: no gap, CKA 1
    assert a["cka_oracle"] == pytest.approx(1.0) and a["gaps"]["avg_gap"] == pytest.approx(0.0)
    assert a["features_reused"] is False


# ------------------------------------------------------------------- the shipped experiments


def test_byol_mnist5k_experiment_file() -> None:
    exps = load_experiments(REPO_ROOT / "exp" / "byol_mnist5k.json")
    recipes = [e.checkpoint for e in exps]
    assert all(isinstance(c, TrainConfig) for c in recipes)
    byol = [c for c in recipes if isinstance(c, TrainConfig) and c.pretrain is not None]
    assert len(byol) == 3 and len(recipes) == 6
    # the same data and supervised budget for both base models; BYOL adds its pretraining
    same = {json.dumps(dataclasses.replace(c, pretrain=None).to_json()) for c in recipes}  # type: ignore[type-var]
    assert len(same) == 1
    assert [(e.method, e.use_mask) for e in exps[:3]] == [(e.method, e.use_mask) for e in exps[3:]]


def test_byol_stl10_experiment_resolves_on_fake_stl10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_tv_datasets import _fake_stl10

    _fake_stl10(tmp_path, monkeypatch, unlabeled=True)
    exps = load_experiments(REPO_ROOT / "exp" / "byol_stl10.json")
    runner = _runner([e.to_json() for e in exps], tmp_path / "out", tmp_path / "ck", tmp_path)
    jobs = runner.resolve()
    byol = [j for j in jobs if j.base_train is not None and j.base_train.pretrain is not None]
    assert byol and all(j.base_train.pretrain.data == "unlabeled" for j in byol)  # type: ignore[union-attr]
    # the unlabeled split is loaded for pretraining only, and excludes nothing
    cfg = byol[0].base_train
    assert cfg is not None
    raw = load_raw("stl10", tmp_path)
    assert "unlabeled_x" not in raw.extra
    split = make_split(raw, ForgetSpec(classes=(3,)), cfg.split_seed, cfg.val_fraction)
    pdata, source = pretraining_data(cfg, DeviceData(raw), tmp_path)
    images, excluded = pretraining_indices(cfg, raw, split, pdata, source, shared=False)
    assert source == "unlabeled" and len(images) == 6 and len(excluded) == 0
    assert pdata.y["unlabeled"].tolist() == [-1] * 6
