"""Bad and hostile input (issue 10): every case is one line ``error: ...``, exit code 2, no
traceback, and nothing is trained or written in ``--out`` / ``--checkpoints``.

The cases are the ones a careful and a hostile user tried: non-finite numbers, files that are
not UTF-8 JSON, integers the code cannot use, unknown dataset arguments, unsafe tags, output
paths that are files, contradictory flags. ``main.py`` and ``train.py`` run in-process (their
``main(argv)``), the way a user calls them, with a warm mnist5k cache in ``--data-dir``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import UserError, closest
from datasets import DATASET_ARG_VALUES, read_index_file
from running.config import check_same_config, load_experiments, run_record

CKPT = {"dataset": "mnist5k", "epochs": 1}  # trained on demand: must never happen here
GOOD = {"checkpoint": CKPT, "class_to_forget": 3, "method": "rl_split"}
DEEP = "[" * 100_000


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def call(
    entry: Callable[[list[str]], Any], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> Run:
    capsys.readouterr()
    try:
        code = entry(argv)
        code = code if isinstance(code, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return Run(code, out.out, out.err)


def error_line(run: Run) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert run.code == 2, (run.code, run.stderr)
    assert run.stdout == ""
    return lines[0]


def empty(*dirs: Path) -> None:
    for d in dirs:
        assert not d.exists() or not any(d.rglob("*")), f"{d}: {list(d.rglob('*'))}"


def main_cli(argv: list[str]) -> Any:
    from cli import main

    return main.main(argv)


def train_cli(argv: list[str]) -> Any:
    from cli import train

    return train.main(argv)


# ------------------------------------------------------------------------------ main.py

# What the experiment file holds: a list of objects (written as JSON, NaN and Infinity as
# JavaScript spells them), a str (written as UTF-8) or bytes (written as they are).
Content = list[dict[str, Any]] | str | bytes


def index_file(tmp: Path, data: bytes) -> str:
    p = tmp / "forget_idx.json"
    p.write_bytes(data)
    return str(p)


def with_index(data: bytes) -> Callable[[Path], Content]:
    """An experiment forgetting the indices of a forget-index file holding `data`."""

    def make(tmp: Path) -> Content:
        return [{"checkpoint": CKPT, "idxs_to_forget": index_file(tmp, data), "method": "ft"}]

    return make


# name -> (experiment file content (or a function of the case's folder), extra argv, texts)
MAIN_CASES: dict[str, tuple[Content | Callable[[Path], Content], list[str], list[str]]] = {
    "lr-infinity": ([GOOD | {"lr": float("inf")}], [], ["key 'lr'", "inf", "finite"]),
    "lr-minus-infinity": ([GOOD | {"lr": float("-inf")}], [], ["key 'lr'", "-inf"]),
    "weight-decay-nan": (
        [GOOD | {"optimizer": {"weight_decay": float("nan")}}],
        [],
        ["key 'optimizer.weight_decay'", "nan", "finite"],
    ),
    "checkpoint-lr-infinity": (
        [GOOD | {"checkpoint": CKPT | {"lr": float("inf")}}],
        [],
        ["key 'checkpoint.lr'", "inf"],
    ),
    "checkpoint-weight-decay-nan": (
        [GOOD | {"checkpoint": CKPT | {"weight_decay": float("nan")}}],
        [],
        ["key 'checkpoint.weight_decay'", "nan"],
    ),
    "method-args-nan": (
        [GOOD | {"method": "ga", "method_args": {"ascent_weight": float("nan")}}],
        [],
        ["key 'method_args.ascent_weight'", "nan"],
    ),
    "not-utf8": ('[{"tag": "caf\xe9"}]'.encode("latin-1"), [], ["not UTF-8", "0xe9"]),
    "utf16-bom": (json.dumps([GOOD]).encode("utf-16"), [], ["UTF-16", "UTF-8"]),
    "deeply-nested": (DEEP, [], ["nested too deeply"]),
    "index-10e30": (
        with_index(b"[1, 1000000000000000000000000000000]"),
        [],
        ["forget_idx.json", "index 1000000000000000000000000000000 is out of range"],
    ),
    "index-not-utf8": (with_index(b"[1, 2]\xff\xfe"), [], ["forget_idx.json", "not UTF-8"]),
    "index-binary": (with_index(b"PK\x03\x04\x00\x00binary"), [], ["forget_idx.json", "zip"]),
    "index-deeply-nested": (with_index(DEEP.encode()), [], ["forget_idx.json", "too deeply"]),
    "dataset-args-unknown": (
        [GOOD | {"checkpoint": CKPT | {"dataset_args": {"foo": 1}}}],
        [],
        ["checkpoint.dataset_args", "'foo'", "1", "mnist5k"],
    ),
    "dataset-args-bad-split": (
        [GOOD | {"checkpoint": {"dataset": "emnist", "dataset_args": {"split": "leters"}}}],
        [],
        ["checkpoint.dataset_args", "'leters'", "did you mean 'letters'"],
    ),
    "checkpoint-seed-64-bit": (
        [GOOD | {"checkpoint": CKPT | {"seed": 2**64}}],
        [],
        ["key 'checkpoint.seed'", str(2**64), "4294967295"],
    ),
    "checkpoint-seed-negative": (
        [GOOD | {"checkpoint": CKPT | {"split_seed": -1}}],
        [],
        ["key 'checkpoint.split_seed'", "-1"],
    ),
    "seed-negative": ([GOOD], ["--seed", "-1"], ["--seed -1", "use a seed in 0..4294967295"]),
    "seed-2**32": ([GOOD], ["--seed", "4294967296"], ["--seed 4294967296"]),
    "seed-plus-nexp-past-2**32": (
        [GOOD],
        ["--seed", str(2**32 - 1), "--nexp", "2"],
        ["--seed 4294967295", "0..4294967294", "--nexp 2"],
    ),
    "epochs-10e30": ([GOOD | {"epochs": 10**30}], [], ["key 'epochs'", str(10**30), "0..10000"]),
    "checkpoint-epochs-10e30": (
        [GOOD | {"checkpoint": CKPT | {"epochs": 10**30}}],
        [],
        ["key 'checkpoint.epochs'", str(10**30)],
    ),
    "method-args-int-10e30": (
        [GOOD | {"method": "scrub", "method_args": {"msteps": 10**30}}],
        [],
        ["key 'method_args.msteps'", str(10**30)],
    ),
    "tag-nul": ([GOOD | {"tag": "a\x00b"}], [], ["key 'tag'", "'a\\x00b'", "control"]),
    "tag-control": ([GOOD | {"tag": "run\x1b[31m"}], [], ["key 'tag'", "control"]),
    "tag-path-traversal": (
        [GOOD | {"tag": "x/../../../../escaped_run"}],
        [],
        ["key 'tag'", "'x/../../../../escaped_run'", "'/'", "'..'"],
    ),
    "tag-dotdot": ([GOOD | {"tag": ".."}], [], ["key 'tag'", "'..'"]),
    "tag-backslash": ([GOOD | {"tag": "a\\..\\b"}], [], ["key 'tag'"]),
    "L-with-single-flags": (
        [GOOD],
        ["-CF", "3", "-M", "ga"],
        ["-L/--load", "-CF/--class-to-forget", "-M/--method", "ignored"],
    ),
    "method-without-args": (
        [GOOD | {"method": "ft", "method_args": {"alpha": 1}}],
        [],
        ["'method_args.alpha'", "method 'ft' takes no method_args"],
    ),
    "setting-the-method-ignores": (
        [GOOD | {"method": "retrain", "epochs": 3}],
        [],
        ["key 'epochs'", "3", "method 'retrain' does not use", "remove the key"],
    ),
    "scrub-temp": (
        [GOOD | {"method": "scrub", "method_args": {"temp": 2}}],
        [],
        ["unknown key 'method_args.temp'", "(did you mean 'T'?)"],
    ),
    "checkpoint-classes-out-of-range": (
        [{"checkpoint": CKPT | {"classes": [0, 12]}, "class_to_forget": 0, "method": "ft"}],
        [],
        ["key 'checkpoint.classes'", "12", "0..9"],
    ),
    "index-file-is-a-folder": (
        lambda tmp: [GOOD | {"class_to_forget": None, "idxs_to_forget": str(tmp)}],
        [],
        ["key 'idxs_to_forget'", "is a folder"],
    ),
    "mask-file-is-a-folder": (
        lambda tmp: [GOOD | {"load_mask": str(tmp), "use_mask": True}],
        [],
        ["key 'load_mask'", "is a folder"],
    ),
    "checkpoint-is-a-folder": (
        lambda tmp: [GOOD | {"checkpoint": str(tmp)}],
        [],
        ["key 'checkpoint'", "is a folder"],
    ),
    "checkpoint-path-nul": (
        [GOOD | {"checkpoint": "a\x00.safetensors"}],
        [],
        ["key 'checkpoint'", "control characters"],
    ),
}


def write_experiments(path: Path, content: Content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        # json.dumps writes NaN/Infinity as JavaScript does, which Python's json accepts
        cleaned = [{k: v for k, v in e.items() if v is not None} for e in content]
        path.write_text(json.dumps(cleaned, indent=2))


def main_argv(tmp: Path, data_dir: Path, content: Content, extra: list[str]) -> list[str]:
    path = tmp / "exp.json"
    write_experiments(path, content)
    return ["-L", str(path), "-NL", "--data-dir", str(data_dir), *extra,
            "--out", str(tmp / "out"), "--checkpoints", str(tmp / "ck")]  # fmt: skip


@pytest.mark.parametrize("name", list(MAIN_CASES))
def test_main_bad_input_is_one_line(
    name: str,
    tmp_path: Path,
    data_dir: Path,
    mnist5k: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    content, extra, texts = MAIN_CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    if callable(content):
        content = content(work)
    line = error_line(call(main_cli, main_argv(tmp_path, data_dir, content, extra), capsys))
    for text in texts:
        assert text in line, (text, line)
    empty(tmp_path / "out", tmp_path / "ck")
    # the traversal tag wrote nothing anywhere, inside the folder or outside it
    assert not list(tmp_path.parent.rglob("escaped_run*"))


@pytest.mark.parametrize("flag", ["--out", "--checkpoints", "--data-dir"])
@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_main_output_path_that_is_a_file(
    flag: str, where: str, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    target = blocker if where == "file" else blocker / "sub"
    argv = replace_flag(main_argv(tmp_path, data_dir, [GOOD], []), flag, str(target))
    line = error_line(call(main_cli, argv, capsys))
    assert line.startswith(f"error: {flag} {target}: "), line
    assert "is an existing file" in line or f"{blocker} is an existing file" in line
    assert blocker.read_text() == "keep me"
    empty(tmp_path / "out", tmp_path / "ck")


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return [*out, flag, value]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"lr": 1, "class_to_forget": 3, ', "malformed JSON at line 1"),
        (b"\x80\x04\x95pickle", "a Python pickle"),
        (b"[]", "not a run folder's configuration"),
    ],
)
def test_damaged_config_json_in_out(
    content: bytes,
    expected: str,
    tmp_path: Path,
    data_dir: Path,
    mnist5k: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_bytes(content)
    line = error_line(call(main_cli, main_argv(tmp_path, data_dir, [GOOD], []), capsys))
    assert line.startswith(f"error: {out / 'config.json'}: "), line
    assert expected in line and "use a new --out" in line
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_bytes() == content


def test_experiment_file_is_a_folder_or_a_checkpoint(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    for path, what in ((tmp_path, "is a folder, not an experiment file"), (pt, "zip archive")):
        argv = ["-L", str(path), "-NL", "--out", str(tmp_path / "out")]
        line = error_line(call(main_cli, argv, capsys))
        assert line.startswith(f"error: {path}: "), line
        assert what in line and "not found" not in line
    line = error_line(call(main_cli, ["-L", str(tmp_path / "nope.json"), "-NL"], capsys))
    assert line == f"error: {tmp_path / 'nope.json'}: experiment file not found"


def test_utf8_with_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(json.dumps([GOOD]).encode("utf-8-sig"))
    (cfg,) = load_experiments(path)
    assert cfg.class_to_forget == 3


# ----------------------------------------------------------------------------- train.py

TRAIN_CASES: dict[str, tuple[list[str], list[str]]] = {
    "lr-inf": (["--lr", "inf"], ["lr = inf is invalid", "finite"]),
    "lr-nan": (["--lr", "nan"], ["lr = nan is invalid"]),
    "wd-nan": (["--wd", "nan"], ["weight_decay (--wd) = nan is invalid", "finite"]),
    "val-frac-inf": (["--val-frac", "inf"], ["val_fraction (--val-frac) = inf"]),
    "momentum-nan": (["--momentum", "nan"], ["momentum = nan"]),
    "emnist-split-on-mnist5k": (
        ["--emnist-split", "letters"],
        ["--emnist-split 'letters'", "--dataset mnist5k"],
    ),
    "seed-negative": (["--seed", "-1"], ["seed = -1 is invalid", "4294967295"]),
    "seed-64-bit": (["--seed", str(2**64)], [f"seed = {2**64} is invalid"]),
    "split-seed-2**32": (["--split-seed", str(2**32)], ["split_seed (--split-seed) = 4294967296"]),
    "epochs-10e30": (["--epochs", str(10**30)], [f"epochs = {10**30} is invalid", "1..10000"]),
    "batch-size-huge": (["--batch-size", str(2**40)], ["batch_size (--batch-size) = "]),
    "classes-out-of-range": (["--classes", "0,12"], ["--classes 0,12", "class 12", "0..9"]),
    "comment-traversal": (["--comment", "../../escaped"], ["--comment '../../escaped'", "'..'"]),
    "comment-nul": (["--comment", "a\x01b"], ["--comment", "control characters"]),
    "unlr-nan": (["--unlr", "nan"], ["unlearning rate", "nan"]),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train_bad_input_is_one_line(
    name: str, tmp_path: Path, data_dir: Path, mnist5k: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    extra, texts = TRAIN_CASES[name]
    out = tmp_path / "out"
    argv = ["--epochs", "1", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out)]
    line = error_line(call(train_cli, [*argv, *extra], capsys))
    for text in texts:
        assert text in line, (text, line)
    empty(out)
    assert not list(tmp_path.parent.rglob("*escaped*"))


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"PK\x03\x04" + bytes(range(256)), "is a zip archive"),
        (b"\x80\x02}q\x00.", "is a Python pickle"),
        (bytes(range(256)), "binary file"),
        (b"[1, 2, \xff]", "is not UTF-8 text (byte 0xff at offset 7)"),
        ("[1, 2]".encode("utf-16"), "is UTF-16 text"),
        (b"[1, 1000000000000000000000000000000]", "index 10000000000"),
        (DEEP.encode(), "nested too deeply"),
    ],
)
def test_train_itf_file_that_is_not_an_index_list(
    data: bytes,
    expected: str,
    tmp_path: Path,
    data_dir: Path,
    mnist5k: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    itf = tmp_path / "forget.json"
    itf.write_bytes(data)
    out = tmp_path / "out"
    argv = ["--itf", str(itf), "--data-dir", str(data_dir), "--out", str(out)]
    line = error_line(call(train_cli, argv, capsys))
    assert line.startswith(f"error: {itf}: ") and expected in line, line
    empty(out)


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_train_out_that_is_a_file(
    where: str, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    target = blocker if where == "file" else blocker / "sub"
    argv = ["--data-dir", str(data_dir), "--out", str(target)]
    line = error_line(call(train_cli, argv, capsys))
    assert line.startswith(f"error: --out {target}: "), line
    assert blocker.read_text() == "keep me"


def test_train_itf_folder_says_folder(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--itf", str(tmp_path), "--data-dir", str(data_dir), "--out", str(tmp_path / "o")]
    line = error_line(call(train_cli, argv, capsys))
    assert line == f"error: {tmp_path}: is a folder, not a forget-index file"


# --------------------------------------------------------------------------- index files


def test_duplicate_check_of_a_large_index_file(tmp_path: Path) -> None:
    """60,000 indices with one repeat at the end: found (in one linear pass; timing: bench)."""
    p = tmp_path / "big.json"
    p.write_text(json.dumps([*range(60_000), 59_999]))
    with pytest.raises(UserError, match=r"lists index 59999 more than once$"):
        read_index_file(p)
    p.write_text(json.dumps(list(range(59_999, -1, -1))))
    assert read_index_file(p) == tuple(range(60_000))


# ------------------------------------------------------------------------- run folders


def test_same_file_relative_and_absolute_is_the_same_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    itf = tmp_path / "forget.json"
    itf.write_text("[1, 2, 3]")
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps([{"idxs_to_forget": "forget.json", "method": "ft"}]))
    config = tmp_path / "out" / "config.json"
    config.parent.mkdir()
    relative = run_record("exp.json", 1, 0, load_experiments("exp.json"))
    config.write_text(json.dumps(relative))
    assert relative["source"] == str(exp)
    assert relative["experiments"][0]["idxs_to_forget"] == str(itf)
    check_same_config(config, run_record(str(exp), 3, 0, load_experiments(exp)))  # nexp: ok
    # a folder written before paths were recorded absolute (relative source and index file)
    old = relative | {"source": "exp.json"}
    old["experiments"] = [relative["experiments"][0] | {"idxs_to_forget": "forget.json"}]
    config.write_text(json.dumps(old))
    check_same_config(config, run_record(str(exp), 1, 0, load_experiments(exp)))


def test_a_different_configuration_says_which_keys_differ(tmp_path: Path) -> None:
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps([GOOD, GOOD | {"lr": 0.02}]))
    config = tmp_path / "out" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(run_record(str(exp), 1, 0, load_experiments(exp))))
    exp.write_text(json.dumps([GOOD | {"epochs": 7}, GOOD | {"lr": 0.05}]))
    with pytest.raises(UserError) as e:
        check_same_config(config, run_record(str(exp), 1, 4, load_experiments(exp)))
    assert str(e.value) == (
        f"{config.parent}: this run folder was made with a different configuration "
        "(seed was 0, now 4; experiments[0].epochs was 5, now 7; experiments[1].lr was 0.02, "
        "now 0.05); use a new --out to start a fresh run"
    )


# ------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_in_main_says_how_to_resume(
    tmp_path: Path,
    tiny_base: Path,
    data_dir: Path,
    checkpoints_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from running import runner

    def interrupted(self: Any, *backend: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "run_all", interrupted)
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps([{"checkpoint": str(tiny_base), "class_to_forget": 3}]))
    out = tmp_path / "my run"
    argv = ["-L", str(exp), "-NL", "--data-dir", str(data_dir), "--out", str(out),
            "--checkpoints", str(checkpoints_dir), "--nexp", "2"]  # fmt: skip
    run = call(main_cli, argv, capsys)
    assert run.code == 130 and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    prefix = f"interrupted; finished runs are kept in {out}; resume with: "
    assert last.startswith(prefix), last
    command = shlex.split(last.removeprefix(prefix))
    rest = [a for a in argv if a not in ("--out", str(out))]
    assert command == ["python", "main.py", *rest, "--out", str(out)]


def test_resume_command_puts_the_run_folder_in() -> None:
    from cli.main import resume_command

    out = Path("output/2024_x")
    assert resume_command(["-L", "e.json", "--nexp", "3"], out) == (
        "python main.py -L e.json --nexp 3 --out output/2024_x"
    )
    assert resume_command(["--out=a", "-L", "e.json", "--out", "b"], out) == (
        "python main.py -L e.json --out output/2024_x"
    )


def test_ctrl_c_in_train_is_one_line(
    tmp_path: Path,
    data_dir: Path,
    mnist5k: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli import train

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_checkpoint", interrupted)
    out = tmp_path / "out"
    run = call(train_cli, ["--data-dir", str(data_dir), "--out", str(out)], capsys)
    assert run.code == 130 and run.stdout == "", run
    assert run.stderr.strip().splitlines() == [
        f"interrupted; nothing was saved to {out} (a checkpoint is written only when its "
        "training finishes)"
    ]
    empty(out)


def test_ctrl_c_in_report_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from analysis import report

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    run = call(report.main, [str(tmp_path)], capsys)
    assert run.code == 130 and run.stdout == "", run
    assert run.stderr.strip().splitlines() == [
        f"interrupted; no new report in {tmp_path} (report.md and report.html are written "
        f"last); rerun: python report.py {tmp_path}"
    ]


def test_ctrl_c_in_any_other_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from core.errors import cli

    @cli
    def command(argv: list[str]) -> int:
        raise KeyboardInterrupt

    run = call(command, [], capsys)
    assert run.code == 130 and run.stderr.strip() == "interrupted"


# --------------------------------------------------------------------- hints and tables


@pytest.mark.parametrize(
    "name, valid, expected",
    [
        ("temp", ["T", "alpha", "gamma", "msteps", "forget_batch_size"], "T"),
        ("epoch", ["epochs", "lr"], "epochs"),
        ("mask_th", ["mask_thr", "use_mask"], "mask_thr"),
        ("momentun", ["name", "momentum", "weight_decay"], "momentum"),
        ("rl_splt", ["rl", "rl_split", "ft"], "rl_split"),
        ("ga_small2", ["ga", "ga_small"], "ga_small"),
        ("LR", ["lr", "epochs"], "lr"),
        ("salun", ["rl_split", "ft", "ga", "scrub", "ssd", "l1_sparse"], None),
        ("x", ["T", "alpha"], None),
    ],
)
def test_closest_suggestion(name: str, valid: list[str], expected: str | None) -> None:
    assert closest(name, valid) == expected


def test_declared_emnist_splits_are_torchvisions() -> None:
    from torchvision.datasets import EMNIST

    assert DATASET_ARG_VALUES["emnist"]["split"] == tuple(EMNIST.splits)
