"""Tests for config.py and the validation in Runner.resolve: every bad experiment list fails
before anything trains, with one line naming the file, the experiment, the key and the value.

Most cases call ``load_experiments`` / ``Runner.resolve`` in-process. The CLI cases call
``main.main`` in-process (exit code, stdout and stderr captured), and two of them also run as
plain ``python main.py`` subprocesses, which must print exactly the same line: starting Python
with torch, torchvision and timm takes 10-30 s on the shared 2-core machine, so those two start
with this module and are checked at the end of the session (``@pytest.mark.last``, see
conftest.py), while the other tests run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT

from core.errors import UserError
from methods import METHODS, GAArgs, NoArgs
from models import build_model
from running.config import ExperimentConfig, OptimizerConfig, load_experiments, parse_experiment
from running.runner import Runner, RunnerOptions
from training.config import TrainConfig
from training.mask import SaliencyMask

CKPT = {"dataset": "mnist5k", "epochs": 1}  # trained on demand: must never happen here
GOOD = {"checkpoint": CKPT, "class_to_forget": 3, "method": "rl_split"}
CLI_ENV = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


def write(tmp_path: Path, data: Any, name: str = "exp.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return p


def one_line(e: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def runner_for(path: Path, ckpt_dir: Path, data_dir: Path, tmp_path: Path, nexp: int = 1) -> Runner:
    opts = RunnerOptions(
        source=str(path),
        out=tmp_path / "out",
        ckpt_dir=ckpt_dir,
        device=torch.device("cpu"),
        nexp=nexp,
        data_dir=data_dir,
        quiet=True,
    )
    return Runner(load_experiments(path), opts)


def nothing_written(*dirs: Path) -> None:
    for d in dirs:
        assert not d.exists() or not any(d.rglob("*")), f"{d}: {list(d.rglob('*'))}"


# --------------------------------------------------------------------------- parse errors


def without(key: str, **extra: Any) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key} | extra


# name -> (the bad experiment, texts its message must contain)
PARSE_ERRORS: dict[str, tuple[Any, list[str]]] = {
    "unknown-key": (
        GOOD | {"mask_th": 0.3},
        ["unknown key 'mask_th'", "(did you mean 'mask_thr'?)"],
    ),
    "unknown-key-epoch": (GOOD | {"epoch": 3}, ["unknown key 'epoch'", "did you mean 'epochs'"]),
    "epochs-string": (GOOD | {"epochs": "5"}, ["key 'epochs'", "'5'", "expected integer"]),
    "epochs-float": (GOOD | {"epochs": 2.5}, ["key 'epochs'", "2.5", "expected integer"]),
    "epochs-bool": (GOOD | {"epochs": True}, ["key 'epochs'", "True", "expected integer"]),
    "epochs-negative": (GOOD | {"epochs": -1}, ["key 'epochs'", "-1"]),
    "use-mask-string": (GOOD | {"use_mask": "yes"}, ["key 'use_mask'", "'yes'", "true/false"]),
    "lr-string": (GOOD | {"lr": "0.1"}, ["key 'lr'", "'0.1'", "expected number"]),
    "cf-string": (GOOD | {"class_to_forget": "7"}, ["key 'class_to_forget'", "'7'"]),
    "cf-negative": (GOOD | {"class_to_forget": -1}, ["key 'class_to_forget'", "-1"]),
    "cf-twice": (GOOD | {"class_to_forget": [3, 3]}, ["key 'class_to_forget'", "[3, 3]"]),
    "mask-thr-1.5": (GOOD | {"mask_thr": 1.5}, ["key 'mask_thr'", "1.5", "(0, 1]"]),
    "mask-thr-0": (GOOD | {"mask_thr": 0}, ["key 'mask_thr'", "0.0", "(0, 1]"]),
    "unlr-0": (
        without("class_to_forget", unlearning_rate=0),
        ["key 'unlearning_rate'", "0.0", "(0, 1)"],
    ),
    "unlr-1": (without("class_to_forget", unlearning_rate=1), ["key 'unlearning_rate'", "1.0"]),
    "lr-negative": (GOOD | {"lr": -1}, ["key 'lr'", "-1.0", "positive"]),
    "lr-0": (GOOD | {"lr": 0}, ["key 'lr'", "0.0", "positive"]),
    "batch-size-0": (GOOD | {"batch_size": 0}, ["key 'batch_size'", "0"]),
    "unknown-method": (
        GOOD | {"method": "rl_splt"},
        ["key 'method'", "unknown method 'rl_splt'", "did you mean 'rl_split'", *METHODS],
    ),
    "method-not-string": (GOOD | {"method": 3}, ["key 'method'", "3", "string"]),
    "missing-checkpoint": (
        GOOD | {"checkpoint": "/nonexistent/base.safetensors"},
        ["key 'checkpoint'", "/nonexistent/base.safetensors", "not found"],
    ),
    "checkpoint-number": (GOOD | {"checkpoint": 5}, ["key 'checkpoint'", "5"]),
    "two-forget-specs": (
        GOOD | {"unlearning_rate": 0.1},
        ["two forget specifications at once", "class_to_forget", "unlearning_rate"],
    ),
    "no-forget-set": (
        without("class_to_forget"),
        ["no forget set", "class_to_forget", "unlearning_rate", "idxs_to_forget"],
    ),
    "missing-index-file": (
        without("class_to_forget", idxs_to_forget="/nonexistent/forget.json"),
        ["key 'idxs_to_forget'", "/nonexistent/forget.json", "not found"],
    ),
    "missing-mask-file": (
        GOOD | {"load_mask": "/nonexistent/mask.safetensors"},
        ["key 'load_mask'", "/nonexistent/mask.safetensors", "not found"],
    ),
    "method-args-unknown-key": (
        GOOD | {"method": "ga", "method_args": {"ascent_wieght": 2}},
        ["unknown key 'method_args.ascent_wieght'", "did you mean 'ascent_weight'"],
    ),
    "method-args-for-a-method-without-args": (
        GOOD | {"method": "ft", "method_args": {"alpha": 1}},
        ["unknown key 'method_args.alpha'"],
    ),
    "method-args-type": (
        GOOD | {"method": "ga", "method_args": {"ascent_weight": "2"}},
        ["key 'method_args.ascent_weight'", "'2'", "expected number"],
    ),
    "method-args-range": (
        GOOD | {"method": "ga", "method_args": {"ascent_weight": 0}},
        ["method_args", "ascent_weight", "0.0"],
    ),
    "method-args-not-object": (
        GOOD | {"method_args": [1]},
        ["key 'method_args'", "[1]", "expected an object"],
    ),
    "checkpoint-unknown-key": (
        GOOD | {"checkpoint": {"dataset": "mnist5k", "epoch": 1}},
        ["unknown key 'checkpoint.epoch'", "did you mean 'epochs'"],
    ),
    "checkpoint-type": (
        GOOD | {"checkpoint": {"dataset": "mnist5k", "epochs": "1"}},
        ["key 'checkpoint.epochs'", "'1'", "expected integer"],
    ),
    "checkpoint-range": (
        GOOD | {"checkpoint": {"dataset": "mnist5k", "epochs": 0}},
        ["checkpoint", "epochs", "0"],
    ),
    "checkpoint-unknown-dataset": (
        GOOD | {"checkpoint": {"dataset": "mnist5kk", "epochs": 1}},
        ["checkpoint.dataset", "mnist5kk", "did you mean 'mnist5k'"],
    ),
    "checkpoint-unknown-model": (
        GOOD | {"checkpoint": {"dataset": "mnist5k", "model": "lenett", "epochs": 1}},
        ["checkpoint.model", "lenett", "did you mean 'lenet'"],
    ),
    "mask-without-gradient-steps": (
        GOOD | {"method": "retrain", "use_mask": True},
        ["key 'use_mask'", "retrain"],
    ),
    "frozen-without-gradient-steps": (
        GOOD | {"method": "retrain", "frozen": ["fc2"]},
        ["key 'frozen'", "retrain"],
    ),
    "frozen-not-a-list": (GOOD | {"frozen": "fc2"}, ["key 'frozen'", "'fc2'", "list of string"]),
    "optimizer-name": (
        GOOD | {"optimizer": {"name": "sgdd"}},
        ["key 'optimizer.name'", "'sgdd'", "did you mean 'sgd'"],
    ),
    "optimizer-unknown-key": (
        GOOD | {"optimizer": {"momentun": 0.5}},
        ["unknown key 'optimizer.momentun'", "did you mean 'momentum'"],
    ),
    "optimizer-momentum": (
        GOOD | {"optimizer": {"momentum": 1.0}},
        ["key 'optimizer.momentum'", "1.0"],
    ),
    "not-an-object": (5, ["an experiment must be a JSON object"]),
}


@pytest.mark.parametrize("name", list(PARSE_ERRORS))
def test_parse_error_names_file_experiment_key_and_value(tmp_path: Path, name: str) -> None:
    bad, texts = PARSE_ERRORS[name]
    path = write(tmp_path, [GOOD, bad])  # the bad one is experiment 1
    with pytest.raises(UserError) as e:
        load_experiments(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}: experiment 1: "), msg
    for text in texts:
        assert text in msg, (text, msg)
    nothing_written(tmp_path / "checkpoints")


def test_malformed_json_gives_line_and_column(tmp_path: Path) -> None:
    text = '[\n  {"class_to_forget": 3,\n   "method": "ft",,\n   "lr": 0.1}\n]\n'
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_experiments(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}: malformed JSON at line 3, column 19:"), msg


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[]", "expected a non-empty JSON list of experiment objects"),
        ('"rl_split"', "expected a non-empty JSON list of experiment objects"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_experiments(path)
    assert one_line(e) == f"{path}: {expected}"


def test_missing_experiment_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="experiment file not found"):
        load_experiments(tmp_path / "nope.json")


def test_single_object_is_a_list_of_one(tmp_path: Path) -> None:
    (cfg,) = load_experiments(write(tmp_path, GOOD))
    assert cfg.class_to_forget == 3 and cfg.checkpoint == TrainConfig(epochs=1)


# --------------------------------------------------------------------- defaults and formats


def test_seed_repository_format_parses_with_documented_defaults(tmp_path: Path) -> None:
    seed = [
        {"class_to_forget": 0, "use_mask": False, "method": "rl_split"},
        {"class_to_forget": 0, "use_mask": True, "mask_thr": 0.2, "method": "rl_split"},
    ]
    a, b = load_experiments(write(tmp_path, seed))
    for cfg in (a, b):
        assert cfg.method == "rl_split" and cfg.class_to_forget == 0
        assert cfg.unlearning_rate is None and cfg.idxs_to_forget is None
        assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.01, 5, 128)
        assert cfg.optimizer == OptimizerConfig("sgd", 0.9, 5e-4, "constant")
        assert cfg.method_args == NoArgs()
        assert cfg.load_mask is None and cfg.frozen == [] and cfg.tag == ""
        assert cfg.replace_class is None
        # the default base model: mnist5k's LeNet, 20 epochs, seed 0
        assert cfg.checkpoint == TrainConfig()
        assert cfg.checkpoint.dataset == "mnist5k" and cfg.checkpoint.epochs == 20
    assert (a.use_mask, a.mask_thr, a.name) == (False, 0.5, "rl_split_cf0")
    assert (b.use_mask, b.mask_thr, b.name) == (True, 0.2, "rl_split+mask_cf0")


def test_to_json_round_trips(tmp_path: Path) -> None:
    exps = [
        GOOD | {"method": "ga", "method_args": {"ascent_weight": 2}, "use_mask": True},
        without("class_to_forget", unlearning_rate=0.1, frozen=["fc2"], tag="x"),
        GOOD | {"class_to_forget": [1, 2], "optimizer": {"name": "adam", "schedule": "cosine"}},
    ]
    for cfg in load_experiments(write(tmp_path, exps)):
        again = parse_experiment(json.loads(json.dumps(cfg.to_json())), "")
        assert again == cfg
    assert load_experiments(write(tmp_path, exps))[0].method_args == GAArgs(2.0)


def test_int_is_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    (cfg,) = load_experiments(write(tmp_path, [GOOD | {"lr": 1, "mask_thr": 1}]))
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0 and cfg.mask_thr == 1.0


def test_names() -> None:
    def name(**kw: Any) -> str:
        return ExperimentConfig(**kw).name

    assert name(class_to_forget=[3, 5], use_mask=True) == "rl_split+mask_cf3-5"
    assert name(method="ga", unlearning_rate=0.1) == "ga_unlr0.1"
    assert name(method="ft", idxs_to_forget="a/b/forget7.json") == "ft_itf-forget7"
    assert name(class_to_forget=1, tag="mine") == "mine"


# ------------------------------------------------------------------------ resolve errors


def test_class_outside_the_checkpoint_classes(
    tmp_path: Path, tiny_base: Path, data_dir: Path, checkpoints_dir: Path
) -> None:
    for cf, shown in ((10, "10"), ([3, 12], "12")):
        path = write(tmp_path, [GOOD, GOOD | {"checkpoint": str(tiny_base), "class_to_forget": cf}])
        with pytest.raises(UserError) as e:
            runner_for(path, checkpoints_dir, data_dir, tmp_path).resolve()
        msg = one_line(e)
        assert msg.startswith(f"{path}: experiment 1: key 'class_to_forget': {shown} "), msg
        assert "0..9" in msg
    nothing_written(tmp_path / "out")


def test_resolve_checks_everything_before_training(
    tmp_path: Path, data_dir: Path, mnist5k: object
) -> None:
    """Experiment 0 needs a base model trained; experiment 1 is bad: nothing may be trained."""
    ckpt_dir = tmp_path / "checkpoints"
    path = write(tmp_path, [GOOD, GOOD | {"class_to_forget": 10}])
    runner = runner_for(path, ckpt_dir, data_dir, tmp_path)
    with pytest.raises(UserError, match=r"experiment 1: key 'class_to_forget': 10 "):
        runner.resolve()
    nothing_written(ckpt_dir, tmp_path / "out")


def test_forget_fraction_too_large_for_the_pool(
    tmp_path: Path, tiny_base: Path, data_dir: Path, checkpoints_dir: Path
) -> None:
    exp = without("class_to_forget", checkpoint=str(tiny_base), unlearning_rate=0.95)
    path = write(tmp_path, [exp])
    with pytest.raises(UserError) as e:
        runner_for(path, checkpoints_dir, data_dir, tmp_path).resolve()
    msg = one_line(e)
    assert msg.startswith(f"{path}: experiment 0: unlearning rate 0.95 selects 3800"), msg


def test_forget_index_in_validation(
    tmp_path: Path, tiny_base: Path, data_dir: Path, checkpoints_dir: Path, mnist5k: Any
) -> None:
    from datasets import ForgetSpec, make_split

    val = int(make_split(mnist5k, ForgetSpec()).val[0])
    itf = write(tmp_path, [val], "forget.json")
    exp = without("class_to_forget", checkpoint=str(tiny_base), idxs_to_forget=str(itf))
    path = write(tmp_path, [exp])
    with pytest.raises(UserError) as e:
        runner_for(path, checkpoints_dir, data_dir, tmp_path).resolve()
    msg = one_line(e)
    assert msg.startswith(f"{path}: experiment 0: {itf}: index {val} is in the validation"), msg


def test_mask_file_for_another_model_fails_before_training(
    tmp_path: Path, tiny_base: Path, data_dir: Path, checkpoints_dir: Path
) -> None:
    other = build_model("smallcnn", 10, 1)
    mask_path = tmp_path / "smallcnn_mask.safetensors"
    SaliencyMask(
        {n: torch.ones_like(p, dtype=torch.bool) for n, p in other.named_parameters()}
    ).save(mask_path)
    exps = [GOOD, GOOD | {"checkpoint": str(tiny_base), "load_mask": str(mask_path)}]
    path = write(tmp_path, exps)
    with pytest.raises(UserError) as e:
        runner_for(path, checkpoints_dir, data_dir, tmp_path).resolve()
    msg = one_line(e)
    assert msg.startswith(f"{path}: experiment 1: "), msg
    assert "load_mask" in msg and str(mask_path) in msg and "does not match" in msg


def test_frozen_prefix_that_matches_no_parameter(
    tmp_path: Path, tiny_base: Path, data_dir: Path, checkpoints_dir: Path
) -> None:
    exps = [GOOD | {"checkpoint": str(tiny_base), "frozen": ["fc2", "fc_2"]}]
    path = write(tmp_path, exps)
    with pytest.raises(UserError) as e:
        runner_for(path, checkpoints_dir, data_dir, tmp_path).resolve()
    msg = one_line(e)
    assert msg.startswith(f"{path}: experiment 0: key 'frozen': 'fc_2' "), msg
    assert "did you mean 'fc2'" in msg
    # the same list without the typo resolves
    ok = write(tmp_path, [GOOD | {"checkpoint": str(tiny_base), "frozen": ["fc2", "block1.0"]}])
    assert len(runner_for(ok, checkpoints_dir, data_dir, tmp_path).resolve()) == 1


# ------------------------------------------------------------------------------ CLI errors


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    dirs: tuple[Path, Path]  # --out and --checkpoints

    def error_line(self) -> str:
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("error: "), self.stderr
        assert self.code == 2, (self.code, self.stderr)
        assert self.stdout == ""
        nothing_written(*self.dirs)
        return lines[0]


# name -> (experiment list or file text, extra argv, texts the line must contain)
CLI_CASES: dict[str, tuple[Any, list[str], list[str]]] = {
    "unknown-key": (
        [GOOD, GOOD | {"mask_th": 0.3}],
        [],
        ["experiment 1", "unknown key 'mask_th'", "did you mean 'mask_thr'"],
    ),
    "epochs-string": (
        [GOOD | {"epochs": "5"}],
        [],
        ["experiment 0", "key 'epochs'", "'5'", "integer"],
    ),
    "lr-negative": ([GOOD, GOOD | {"lr": -1}], [], ["experiment 1", "key 'lr'", "-1.0"]),
    "unknown-method": (
        [GOOD | {"method": "salun"}],
        [],
        ["experiment 0", "unknown method 'salun'", "valid methods: ", "rl_split"],
    ),
    "two-specs": (
        [GOOD | {"unlearning_rate": 0.1}],
        [],
        ["experiment 0", "two forget specifications at once"],
    ),
    "missing-checkpoint": (
        [GOOD | {"checkpoint": "nowhere/base.safetensors"}],
        [],
        ["experiment 0", "key 'checkpoint'", "nowhere/base.safetensors", "not found"],
    ),
    "class-10": (
        [GOOD, GOOD | {"class_to_forget": 10}],
        [],
        ["experiment 1", "key 'class_to_forget'", "10", "0..9"],
    ),
    "malformed": ('[{"method": "ft",\n\n "lr": 0.1,]\n', [], ["malformed JSON at line 3, column"]),
    "nexp-0": ([GOOD], ["--nexp", "0"], ["--nexp 0"]),
}
# also run as ordinary `python main.py ...` subprocesses: a parse error and a resolve error
PLAIN = ("unknown-key", "class-10")


def cli_case(root: Path, name: str, data_dir: Path) -> tuple[list[str], tuple[Path, Path]]:
    """Write the case's experiment file under root; return its argv and (--out, --checkpoints)."""
    exps, extra, _ = CLI_CASES[name]
    root.mkdir(parents=True, exist_ok=True)
    path = write(root, exps, f"{name}.json")
    out, ck = root / "out", root / "ck"
    argv = ["-L", str(path), "--nexp", "2", "-NL", "--data-dir", str(data_dir), *extra]
    return [*argv, "--out", str(out), "--checkpoints", str(ck)], (out, ck)


def in_process(argv: list[str], dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> Run:
    from cli import main

    capsys.readouterr()
    try:
        code = main.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err, dirs)


@pytest.fixture(scope="session")
def plain(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, mnist5k: Any
) -> Iterator[dict[str, tuple[subprocess.Popen[str], list[str], tuple[Path, Path]]]]:
    """The plain `python main.py` runs, started with this module and checked at the very end
    of the session (marker `last`), so that other tests run while Python starts up."""
    root = tmp_path_factory.mktemp("plain")
    procs = {}
    for name in PLAIN:
        argv, dirs = cli_case(root / name, name, data_dir)
        proc = subprocess.Popen(
            [sys.executable, "main.py", *argv],
            cwd=REPO_ROOT,
            env=CLI_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[name] = (proc, argv, dirs)
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def start_plain(plain: dict[str, Any]) -> None:
    """Start the subprocesses when this module's first test runs."""


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_error_is_one_line_with_exit_code_2(
    name: str, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, dirs = cli_case(tmp_path, name, data_dir)
    line = in_process(argv, dirs, capsys).error_line()
    for text in CLI_CASES[name][2]:
        assert text in line, (text, line)
    if name != "nexp-0":
        assert line.startswith(f"error: {tmp_path / name}.json: "), line


@pytest.mark.last
@pytest.mark.parametrize("name", PLAIN)
def test_cli_error_in_a_plain_subprocess(
    name: str,
    plain: dict[str, tuple[subprocess.Popen[str], list[str], tuple[Path, Path]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc, argv, dirs = plain[name]
    stdout, stderr = proc.communicate(timeout=300)
    line = Run(proc.returncode, stdout, stderr, dirs).error_line()
    assert line == in_process(argv, dirs, capsys).error_line()


# ------------------------------------------------------------------------------ JSON Schema


def test_shipped_schema_is_generated_from_the_config() -> None:
    """exp/schema.json is what `python -m running.schema` writes now (rerun it after changing
    running/config.py, training/config.py or a method's arguments)."""
    from running.schema import SCHEMA_PATH, schema_text

    assert SCHEMA_PATH == REPO_ROOT / "exp" / "schema.json"
    assert SCHEMA_PATH.read_text() == schema_text()


def test_schema_describes_every_key_and_every_method() -> None:
    from running.schema import experiment_schema

    schema = experiment_schema()
    defs = schema["$defs"]
    for name in ("Experiment", "TrainConfig", "OptimizerConfig", "PretrainConfig"):
        assert defs[name]["additionalProperties"] is False
        for key, prop in defs[name]["properties"].items():
            assert prop.get("description"), (name, key)
    exp = defs["Experiment"]
    assert exp["properties"]["method"]["enum"] == sorted(METHODS)
    by_method = {c["if"]["properties"]["method"]["const"]: c["then"] for c in exp["allOf"][:-1]}
    assert sorted(by_method) == sorted(METHODS)
    scrub = by_method["scrub"]["properties"]["method_args"]
    assert scrub["additionalProperties"] is False and "T" in scrub["properties"]
    assert by_method["ft"]["properties"]["method_args"]["properties"] == {}
    # the bounds the validation enforces are the ones an editor shows
    train = defs["TrainConfig"]["properties"]
    assert (train["seed"]["minimum"], train["seed"]["maximum"]) == (0, 2**32 - 1)
    assert (train["epochs"]["minimum"], train["epochs"]["maximum"]) == (1, 10_000)
    assert exp["properties"]["lr"]["exclusiveMinimum"] == 0


def _keys(obj: Any, prefix: str = "") -> set[str]:
    if not isinstance(obj, dict):
        return set()
    out = set()
    for k, v in obj.items():
        out.add(prefix + k)
        if k != "method_args":
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_every_key_of_the_shipped_experiment_files_is_in_the_schema() -> None:
    from running.schema import experiment_schema

    defs = experiment_schema()["$defs"]
    known = {f"{k}" for k in defs["Experiment"]["properties"]}
    known |= {f"checkpoint.{k}" for k in defs["TrainConfig"]["properties"]}
    known |= {f"checkpoint.pretrain.{k}" for k in defs["PretrainConfig"]["properties"]}
    known |= {f"optimizer.{k}" for k in defs["OptimizerConfig"]["properties"]}
    known |= {f"tune.{k}" for k in defs["TuneConfig"]["properties"]}
    known |= {f"evaluate.{k}" for k in defs["EvaluateConfig"]["properties"]}
    known |= {f"evaluate.ulira.{k}" for k in defs["UliraConfig"]["properties"]}
    known |= {f"checkpoint.dataset_args.{k}" for k in ("split", "unlabeled")}
    replace = defs["Experiment"]["properties"]["replace_class"]["anyOf"][0]["properties"]
    known |= {f"replace_class.{k}" for k in replace}
    files = sorted(p for p in (REPO_ROOT / "exp").glob("*.json") if p.name != "schema.json")
    assert len(files) >= 5
    for path in files:
        data = json.loads(path.read_text())
        for exp in data if isinstance(data, list) else [data]:
            assert _keys(exp) <= known, (path, _keys(exp) - known)
        load_experiments(path)  # and they validate
