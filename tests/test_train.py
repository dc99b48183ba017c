"""Tests for training.py and train.py: the retrain oracle's data, reproducibility, and the CLI.

CLI runs. Starting Python with torch, torchvision and timm takes about 10 s on the 2-core test
machine, so a dozen ``python train.py ...`` subprocesses would blow the time budget. The CLI
cases therefore run in one subprocess (``sys.executable``, cwd = repo root) that imports the
project once and then forks a child per case; each child gets its own stdout/stderr files and
runs ``train.py`` as ``__main__`` with ``runpy``, so the exit code, the stderr text and any
traceback are exactly what a user would see. One training run also runs as a plain
``python train.py`` subprocess, concurrently, and must agree with its forked twin bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, TINY, one_error_line
from safetensors.torch import load_file
from torch import Tensor

from cli.train import build_parser as build_train_parser
from cli.train import train_config
from core.errors import UserError
from datasets import DeviceData, ForgetSpec, RawData, indices_hash, make_forget_spec, make_split
from models import build_model
from running.config import load_experiments
from training import loop as training
from training import recipe as train_mod
from training.checkpoints import load_checkpoint, read_meta
from training.config import PretrainConfig, TrainConfig
from training.loop import eval_accuracy, fit
from training.recipe import (
    RECIPE_HASH_CHARS,
    base_checkpoint_name,
    oracle_checkpoint_name,
    resolved_recipe,
    train_checkpoint,
)

CPU = torch.device("cpu")
CLI_ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # see conftest: tiny models, shared cores

DRIVER = r"""
import json, os, runpy, sys, traceback

repo, cases_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
import training.recipe  # noqa: F401  -- the slow imports happen once, before forking

cases = json.loads(open(cases_file).read())
codes = {}
for case in cases:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, case["stdout"]), (2, case["stderr"])):
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            sys.argv = ["train.py", *case["argv"]]
            try:
                runpy.run_path("train.py", run_name="__main__")
                code = 0
            except SystemExit as e:  # what the interpreter does with SystemExit
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    codes[case["name"]] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    out: Path

    def error_line(self) -> str:
        line = one_error_line(self.code, self.stdout, self.stderr)
        assert not self.out.exists() or not any(self.out.iterdir()), "nothing may be written"
        return line

    def checkpoint(self) -> Path:
        assert self.code == 0, self.stderr
        assert "Traceback" not in self.stderr
        path = Path(json.loads(self.stdout.strip().splitlines()[-1])["checkpoint"])
        assert path.is_file() and path.parent == self.out
        return path


def _stem_path(out: Path, raw: RawData, **spec: Any) -> Path:
    """Where `train.py --epochs 1` with this forget set writes its oracle."""
    forget = make_forget_spec(**spec)
    base = base_checkpoint_name(TrainConfig(epochs=1, seed=spec.get("seed", 0)))
    return out / oracle_checkpoint_name(base, forget, make_split(raw, forget).forget)


def _weights_path(out: Path, raw: RawData, **spec: Any) -> Path:
    stem = _stem_path(out, raw, **spec)
    return stem.with_name(stem.name + ".safetensors")


def _cli_cases(root: Path, data_dir: Path, raw: RawData) -> dict[str, list[str]]:
    """Argument lists by case name; later cases may read files written by earlier ones."""
    files = root / "files"
    files.mkdir()
    val_index = int(make_split(raw, ForgetSpec()).val[3])
    bad_files = {
        "itf-dict": '{"a": 1}',
        "itf-floats": "[1, 2.5]",
        "itf-malformed": "[1, 2",
        "itf-duplicate": "[17, 9, 17]",
        "itf-out-of-range": "[3, 4000]",
        "itf-in-validation": json.dumps([val_index]),
        "itf-empty": "[]",
    }
    for name, text in bad_files.items():
        (files / f"{name}.json").write_text(text)
    out = root / "out"
    cf7 = _stem_path(out / "e2e-cf7", raw, cf=7)
    unlr = _stem_path(out / "e2e-unlr", raw, unlr=0.1, seed=3)
    cases = {
        "cf12": ["--cf", "12"],
        "cf-list": ["--cf", "3,10"],
        "unlr1.5": ["--unlr", "1.5"],
        "unlr0": ["--unlr", "0"],
        "two-specs": ["--cf", "3", "--unlr", "0.1"],
        "dataset": ["--dataset", "nope"],
        "model": ["--model", "nope"],
        "epochs0": ["--epochs", "0"],
        "itf-missing": ["--itf", str(files / "missing.json")],
        **{name: ["--itf", str(files / f"{name}.json")] for name in bad_files},
        "e2e-cf7": ["--cf", "7", "--epochs", "1"],
        "e2e-unlr": ["--unlr", "0.1", "--seed", "3", "--epochs", "1"],
        "e2e-itf-cf7": ["--itf", f"{cf7}_forget.json", "--epochs", "1"],
        "e2e-itf-unlr": ["--itf", f"{unlr}_forget.json", "--seed", "3", "--epochs", "1"],
    }
    return {
        name: [*argv, "--data-dir", str(data_dir), "--out", str(out / name)]
        for name, argv in cases.items()
    }


PLAIN = ("e2e-cf7",)  # also run as an ordinary `python train.py ...` subprocess


@pytest.fixture(scope="module")
def cli(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, mnist5k: RawData
) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("cli")
    cases = _cli_cases(root, data_dir, mnist5k)  # mnist5k's cache is already in data_dir
    logs = root / "logs"
    logs.mkdir()

    def out_dir(argv: list[str]) -> Path:
        return Path(argv[argv.index("--out") + 1])

    plain = {}
    for name in PLAIN:
        argv = cases[name][:-1] + [str(root / "plain" / name)]
        plain[name] = (
            argv,
            subprocess.Popen(
                [sys.executable, "train.py", *argv],
                cwd=REPO_ROOT,
                env=CLI_ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    runs: dict[str, Run] = {}
    if hasattr(os, "fork"):
        spec = [
            {
                "name": n,
                "argv": a,
                "stdout": str(logs / f"{n}.out"),
                "stderr": str(logs / f"{n}.err"),
            }
            for n, a in cases.items()
        ]
        (root / "cases.json").write_text(json.dumps(spec))
        (root / "driver.py").write_text(DRIVER)
        done = subprocess.run(
            [sys.executable, str(root / "driver.py"), str(REPO_ROOT), str(root / "cases.json")],
            cwd=REPO_ROOT,
            env=CLI_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        codes = json.loads(done.stdout)
        for n, a in cases.items():
            runs[n] = Run(
                codes[n],
                (logs / f"{n}.out").read_text(),
                (logs / f"{n}.err").read_text(),
                out_dir(a),
            )
    else:  # no fork (Windows): one subprocess per case
        for n, a in cases.items():
            p = subprocess.run(
                [sys.executable, "train.py", *a],
                cwd=REPO_ROOT,
                env=CLI_ENV,
                capture_output=True,
                text=True,
            )
            runs[n] = Run(p.returncode, p.stdout, p.stderr, out_dir(a))
    for n, (argv, proc) in plain.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[f"plain-{n}"] = Run(proc.returncode, stdout, stderr, out_dir(argv))
    return runs


# ------------------------------------------------------------------------------- CLI errors

CLI_ERRORS = {
    "cf12": ["class to forget 12 is out of range", "0..9"],
    "cf-list": ["class to forget 10 is out of range"],
    "unlr1.5": ["unlearning rate", "1.5"],
    "unlr0": ["unlearning rate", "got 0.0"],
    "two-specs": ["two forget specifications at once (cf, unlr)"],
    "dataset": ["unknown dataset 'nope'", "mnist5k", "cifar10", "digits"],
    "model": ["unknown model 'nope'", "lenet", "smallcnn", "resnet18_cifar"],
    "epochs0": ["epochs = 0"],
    "itf-missing": ["missing.json", "not found"],
    "itf-dict": ["itf-dict.json", "JSON list of ints"],
    "itf-floats": ["itf-floats.json", "JSON list of ints"],
    "itf-malformed": ["itf-malformed.json", "not valid JSON"],
    "itf-duplicate": ["itf-duplicate.json", "index 17 more than once"],
    "itf-out-of-range": ["itf-out-of-range.json", "index 4000 is out of range"],
    "itf-in-validation": ["itf-in-validation.json", "is in the validation split"],
    "itf-empty": ["itf-empty.json", "empty"],
}


@pytest.mark.parametrize("name", list(CLI_ERRORS))
def test_cli_errors_are_one_line(cli: dict[str, Run], name: str) -> None:
    line = cli[name].error_line()
    for text in CLI_ERRORS[name]:
        assert text in line, line


# ---------------------------------------------------------------------------- CLI training


def _pool_outside_val(raw: RawData) -> set[int]:
    return set(range(len(raw.train_y))) - set(make_split(raw, ForgetSpec()).val.tolist())


def _forget_file(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name.removesuffix(".safetensors") + "_forget.json")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_class_oracle(cli: dict[str, Run], mnist5k: RawData) -> None:
    run = cli["e2e-cf7"]
    path = run.checkpoint()
    assert path == _weights_path(run.out, mnist5k, cf=7)
    assert path.name.startswith("lenet_mnist5k_base_s0_") and "__RF_" in path.name
    forget = json.loads(_forget_file(path).read_text())
    sevens = {i for i, y in enumerate(mnist5k.train_y.tolist()) if y == 7}
    assert forget == sorted(sevens & _pool_outside_val(mnist5k))
    assert len(forget) == 360

    meta = read_meta(path)
    split = make_split(mnist5k, make_forget_spec(cf=7))
    assert meta["model"] == "lenet" and meta["dataset"] == "mnist5k"
    assert (meta["num_classes"], meta["in_chans"], meta["img_size"]) == (10, 1, [28, 28])
    assert meta["kind"] == "retrain"
    assert meta["split"] == {
        "split_seed": 0,
        "val_fraction": 0.1,
        "forget": {"classes": [7], "fraction": None, "index_file": None, "seed": 0},
        "sizes": split.summary(),
    }
    assert meta["train"] == TrainConfig(epochs=1).to_json() | {"model": "lenet"}
    m = meta["metrics"]
    assert set(m) == {"train_acc", "forget_acc", "val_acc", "test_acc", "test_forget_acc"}
    assert m["val_acc"] > 0.3 and m["test_acc"] > 0.3
    # class 7 was never trained on, so the oracle never predicts it
    assert m["forget_acc"] < 0.05 and m["test_forget_acc"] < 0.05
    assert (meta["epochs_run"], meta["best_epoch"], len(meta["history"])) == (1, 1, 1)
    assert meta["history"][0]["val_acc"] == m["val_acc"]
    assert meta["train_seconds"] > 0
    assert meta["versions"]["torch"] == torch.__version__
    assert {"python", "torchvision", "timm", "numpy"} <= set(meta["versions"])
    assert meta["weights"] == path.name and meta["forget_file"] == _forget_file(path).name
    # the saved weights are the ones the metrics were measured on
    model, _ = load_checkpoint(path)
    assert eval_accuracy(model, DeviceData(mnist5k), split.val) == m["val_acc"]


def test_cli_random_oracle(cli: dict[str, Run], mnist5k: RawData) -> None:
    run = cli["e2e-unlr"]
    path = run.checkpoint()
    assert path == _weights_path(run.out, mnist5k, unlr=0.1, seed=3)
    forget = json.loads(_forget_file(path).read_text())
    assert len(forget) == round(0.1 * 4000) == 400
    assert set(forget) <= _pool_outside_val(mnist5k)
    assert forget == make_split(mnist5k, make_forget_spec(unlr=0.1, seed=3)).forget.tolist()
    meta = read_meta(path)
    assert meta["split"]["forget"] == {
        "classes": [],
        "fraction": 0.1,
        "index_file": None,
        "seed": 3,
    }
    assert meta["train"]["seed"] == 3 and meta["split"]["sizes"]["forget"] == 400


def test_cli_index_file_reproduces_the_random_oracle(cli: dict[str, Run]) -> None:
    src, run = cli["e2e-unlr"].checkpoint(), cli["e2e-itf-unlr"].checkpoint()
    assert _forget_file(run).read_bytes() == _forget_file(src).read_bytes()
    a, b = read_meta(src), read_meta(run)
    assert b["split"]["sizes"] == a["split"]["sizes"]
    assert b["split"]["forget"]["index_file"] == str(_forget_file(src))
    # same retain set, same validation, same seed: the same oracle
    assert _same_weights(src, run)
    assert b["metrics"] == a["metrics"]


def test_cli_index_file_reproduces_the_class_oracle(cli: dict[str, Run]) -> None:
    src, run = cli["e2e-cf7"].checkpoint(), cli["e2e-itf-cf7"].checkpoint()
    assert _forget_file(run).read_bytes() == _forget_file(src).read_bytes()
    a, b = read_meta(src)["split"]["sizes"], read_meta(run)["split"]["sizes"]
    for k in ("train", "forget", "retain"):
        assert a[k] == b[k], k
    # an index file carries no class: validation and test keep class 7
    assert (b["val_forget"], b["test_forget"]) == (0, 0)
    assert b["val"] == a["val"] + a["val_forget"] and b["test"] == a["test"] + a["test_forget"]
    assert _same_weights(src, run)


def test_plain_subprocess_run_matches(cli: dict[str, Run]) -> None:
    plain, forked = cli["plain-e2e-cf7"].checkpoint(), cli["e2e-cf7"].checkpoint()
    assert plain.name == forked.name
    assert _forget_file(plain).read_bytes() == _forget_file(forked).read_bytes()
    assert _same_weights(plain, forked)
    a, b = read_meta(plain), read_meta(forked)
    for k in ("model", "dataset", "split", "train", "metrics", "history"):
        assert a[k] == b[k], k


# ------------------------------------------------------------------------ oracle and fitting


@pytest.mark.parametrize("spec_kwargs", [{"cf": 7}, {"unlr": 0.1, "seed": 3}])
def test_oracle_never_sees_a_forget_index(
    mnist5k: RawData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec_kwargs: dict
) -> None:
    epochs: list[list[Tensor]] = [[]]
    calls: list[tuple[Tensor, Tensor]] = []
    real_fit = training.fit

    def spy(model, data, train_idx, val_idx, cfg, **kw):  # type: ignore[no-untyped-def]
        calls.append((train_idx, val_idx))
        log = kw.pop("log", None)

        def next_epoch(row: dict[str, float]) -> None:
            epochs.append([])
            if log is not None:
                log(row)

        def record(bi: Tensor) -> None:
            epochs[-1].append(bi.cpu().clone())

        return real_fit(model, data, train_idx, val_idx, cfg, on_batch=record, log=next_epoch, **kw)

    monkeypatch.setattr(train_mod, "fit", spy)
    spec = make_forget_spec(**spec_kwargs)
    cfg = dataclasses.replace(TINY, epochs=2)
    train_checkpoint(cfg, spec, tmp_path, device=CPU, raw=mnist5k, quiet=True)
    split = make_split(mnist5k, spec)
    assert len(calls) == 1
    assert torch.equal(calls[0][0], split.retain) and torch.equal(calls[0][1], split.val)
    assert epochs[-1] == [] and len(epochs) == 3
    forget = set(split.forget.tolist())
    orders = []
    for batches in epochs[:-1]:
        drawn = torch.cat(batches)
        assert not set(drawn.tolist()) & forget
        assert torch.equal(torch.sort(drawn).values, split.retain)  # all of retain, once each
        assert all(len(b) == cfg.batch_size for b in batches[:-1])
        orders.append(drawn)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch


def _weights_after_one_epoch(raw: RawData, seed: int) -> dict[str, Tensor]:
    split = make_split(raw, ForgetSpec())
    torch.manual_seed(seed)
    model = build_model("lenet", raw.num_classes, raw.in_chans)
    cfg = dataclasses.replace(TINY, seed=seed)
    fit(model, DeviceData(raw), split.retain[::3], split.val[::2], cfg)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_reproducible(mnist5k: RawData) -> None:
    a, b = _weights_after_one_epoch(mnist5k, 5), _weights_after_one_epoch(mnist5k, 5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _weights_after_one_epoch(mnist5k, 6)
    assert not torch.equal(a["fc2.weight"], c["fc2.weight"])


def test_digits_default_model_checkpoint(digits: RawData, tmp_path: Path) -> None:
    cfg = TrainConfig(dataset="digits", epochs=2, batch_size=64)
    spec = make_forget_spec(cf=[0, 1])
    path = train_checkpoint(cfg, spec, tmp_path, device=CPU, raw=digits, quiet=True)
    split = make_split(digits, spec)
    base = base_checkpoint_name(cfg)
    assert base.startswith("smallcnn_digits_base_s0_")
    assert path.name == f"{oracle_checkpoint_name(base, spec, split.forget)}.safetensors"
    model, meta = load_checkpoint(path)
    assert meta["model"] == "smallcnn" and meta["split"]["sizes"] == split.summary()
    assert json.loads(_forget_file(path).read_text()) == split.forget.tolist()
    assert (
        eval_accuracy(model, DeviceData(digits), split.test, "test") == meta["metrics"]["test_acc"]
    )


@pytest.mark.parametrize(
    "change,key",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"schedule": "linear"}, "schedule"),
        ({"patience": -1}, "patience"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_train_config_check(change: dict[str, Any], key: str) -> None:
    TrainConfig().check()
    with pytest.raises(UserError, match=rf"^{key} = .* is invalid"):
        dataclasses.replace(TrainConfig(), **change).check()


# ------------------------------------------------------------------------------ cache names


def test_one_recipe_one_cache_name(tmp_path: Path) -> None:
    """`{}`, the quickstart's explicit recipe and `train.py` without flags: one base model."""
    quick = json.loads((REPO_ROOT / "exp" / "quickstart.json").read_text())
    exp_file = tmp_path / "e.json"
    exp_file.write_text(json.dumps([quick[0] | {"checkpoint": {}}, quick[0]]))
    empty, explicit = (e.checkpoint for e in load_experiments(exp_file))
    assert isinstance(empty, TrainConfig) and isinstance(explicit, TrainConfig)
    assert empty.model is None and explicit.model == "lenet"  # written differently
    flags = train_config(build_train_parser().parse_args([]))
    name = base_checkpoint_name(flags)
    assert base_checkpoint_name(empty) == base_checkpoint_name(explicit) == name
    prefix, digest = name.rsplit("_", 1)
    assert prefix == "lenet_mnist5k_base_s0" and len(digest) == RECIPE_HASH_CHARS
    int(digest, 16)


def test_spelled_out_defaults_share_the_cache_name() -> None:
    same = [
        (TrainConfig(), TrainConfig(model="lenet")),
        (TrainConfig(lr=1), TrainConfig(lr=1.0)),
        (TrainConfig(classes=[5, 0, 2]), TrainConfig(classes=[0, 2, 5])),
        (TrainConfig(dataset="emnist"), TrainConfig(dataset="emnist", dataset_args={"split": "balanced"})),
        (TrainConfig(dataset="stl10"), TrainConfig(dataset="stl10", dataset_args={"unlabeled": False})),
    ]  # fmt: skip
    for a, b in same:
        assert base_checkpoint_name(a) == base_checkpoint_name(b), (a, b)
    assert resolved_recipe(TrainConfig(dataset="emnist"))["dataset_args"] == {"split": "balanced"}
    assert base_checkpoint_name(TrainConfig(dataset="emnist")).startswith(
        "lenet_emnist-balanced_base_s0_"
    )
    assert base_checkpoint_name(TrainConfig(classes=[2, 0, 5])).startswith(
        "lenet_mnist5k-c0-2-5_base_s0_"
    )


# one changed value per recipe field; a field missing here fails the test below
CHANGED: dict[str, Any] = {
    "model": "smallcnn",
    "dataset": "digits",
    "dataset_args": {"split": "letters"},
    "epochs": 21,
    "lr": 0.051,
    "batch_size": 64,
    "momentum": 0.8,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "patience": 3,
    "augment": False,
    "seed": 1,
    "split_seed": 1,
    "val_fraction": 0.2,
    "classes": [0, 1],
    "pretrain": PretrainConfig(),
    "finetune": "linear",
}


def test_every_recipe_field_changes_the_cache_name() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(TrainConfig)}
    names = {"default": base_checkpoint_name(TrainConfig())}
    for key, value in CHANGED.items():
        # dataset arguments need a dataset that takes one: compare against emnist's default
        start = TrainConfig(dataset="emnist") if key == "dataset_args" else TrainConfig()
        # and the fine-tuning mode one that pretrains (names["pretrain"]: full fine-tuning)
        start = TrainConfig(pretrain=PretrainConfig()) if key == "finetune" else start
        names[key] = base_checkpoint_name(dataclasses.replace(start, **{key: value}))
    names["emnist"] = base_checkpoint_name(TrainConfig(dataset="emnist"))
    assert len(set(names.values())) == len(names), names


def test_unknown_dataset_argument_is_a_one_line_error() -> None:
    with pytest.raises(
        UserError,
        match="'splt' = 'letters' is not an argument of dataset 'emnist'.*did you mean 'split'",
    ):
        base_checkpoint_name(TrainConfig(dataset="emnist", dataset_args={"splt": "letters"}))
    with pytest.raises(UserError, match="dataset 'mnist5k'; it takes none"):
        base_checkpoint_name(TrainConfig(dataset_args={"split": "letters"}))


def test_train_py_writes_the_runner_cache_name(mnist5k: RawData, tmp_path: Path) -> None:
    """train.py's base and oracle land under the names main.py looks for (one cache)."""
    cfg = dataclasses.replace(TINY, model=None, epochs=1)
    base = train_checkpoint(cfg, ForgetSpec(), tmp_path, device=CPU, raw=mnist5k, quiet=True)
    assert base.name == f"{base_checkpoint_name(TrainConfig(epochs=1))}.safetensors"
    spec = make_forget_spec(cf=3)
    oracle = train_checkpoint(cfg, spec, tmp_path, device=CPU, raw=mnist5k, quiet=True)
    forget = make_split(mnist5k, spec).forget
    assert (
        oracle.name
        == f"{base.name.removesuffix('.safetensors')}__RF_{indices_hash(forget)[:16]}.safetensors"
    )
    with_comment = train_checkpoint(
        cfg, ForgetSpec(), tmp_path, device=CPU, raw=mnist5k, quiet=True, comment="x"
    )
    assert with_comment.name == base.name.replace(".safetensors", "_x.safetensors")
