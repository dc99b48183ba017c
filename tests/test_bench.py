"""The bench/ scripts keep running: each one's ``--tiny`` mode runs here in a few seconds.

Timing is never asserted (that is what the scripts are for); what is checked is that every
script still runs against today's code and reports what it measured.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT

from datasets import DeviceData, RawData

SCRIPTS = sorted((REPO_ROOT / "bench").glob("*.py"))


def load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_argv(data_dir: Path) -> list[str]:
    # every bench script takes these flags (core.cli_options), so one test runs them all
    return ["--tiny", "--device", "cpu", "--threads", "1", "--data-dir", str(data_dir)]


def test_there_are_bench_scripts() -> None:
    assert "bench_data.py" in [p.name for p in SCRIPTS]


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_bench_script_runs_tiny(
    path: Path, data_dir: Path, mnist5k: RawData, capsys: pytest.CaptureFixture[str]
) -> None:
    load_script(path).main(tiny_argv(data_dir))
    out = capsys.readouterr().out
    assert "Traceback" not in out and out.strip(), out


def test_bench_data_reports_both_pipelines(
    data_dir: Path, mnist5k: RawData, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_script(REPO_ROOT / "bench" / "bench_data.py")
    rows = bench.main(tiny_argv(data_dir) + ["--batch-size", "64"])
    out = capsys.readouterr().out
    assert [(name, bs) for name, bs, *_ in rows] == [
        ("reference: DataLoader + PIL", 32),
        ("ours: DeviceData.batches", 64),
        ("ours: DeviceData.batches", 32),
    ]
    for _, _, data_rate, train_rate, seconds in rows:
        assert math.isfinite(data_rate) and data_rate > 0
        assert math.isfinite(train_rate) and train_rate > 0
        assert seconds > 0
    assert f"mnist5k pool: {bench.TINY_POOL} images" in out
    ratio_lines = [line for line in out.splitlines() if "data path" in line]
    assert [line.split(":")[0].strip() for line in ratio_lines] == ["batch   64", "batch   32"]


def test_bench_run_counts_images_and_trains(mnist5k: RawData) -> None:
    bench = load_script(REPO_ROOT / "bench" / "bench_data.py")
    cpu = torch.device("cpu")
    idx = torch.arange(300)
    g = torch.Generator().manual_seed(0)
    batches = bench.ours_batches(DeviceData(mnist5k), idx, 64, g)
    n, seconds = bench.run(batches, 2, cpu)
    assert n == 600 and seconds > 0  # two epochs of 300 images
    assert bench.run(batches, 3, cpu, max_images=100)[0] == 128  # the batch that reaches 100
    model = bench.fresh_lenet(mnist5k, cpu, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert bench.run(batches, 1, cpu, model)[0] == 300
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_readme_numbers_reads_tables_from_run_files(tmp_path: Path) -> None:
    """bench/readme_numbers.py: README's columns picked from summary.md, and the class
    replacement table from the runs' metrics.json, on hand-written files."""
    rn = load_script(REPO_ROOT / "bench" / "readme_numbers.py")
    (tmp_path / "summary.md").write_text(
        "| experiment | runs | forget acc | extra |\n|---|---|---|---|\n"
        "| 00_ga_cf7 | 3 | 11.20 ± 0.16 | x |\n| 00_ga_cf7 (oracle) | 3 | 0.00 ± 0.00 | y |\n"
    )
    table = rn.summary_columns(["experiment", "forget acc"])(tmp_path)
    assert table == (
        "| experiment | forget acc |\n|---|---|\n"
        "| 00_ga_cf7 | 11.20 ± 0.16 |\n| 00_ga_cf7 (oracle) | 0.00 ± 0.00 |"
    )
    with pytest.raises(rn.UserError, match="no column 'score'"):
        rn.summary_columns(["score"])(tmp_path)

    def report(new: float, old: float) -> dict[str, object]:
        return {"old": 1, "new": 2, "new_acc": new, "old_acc": old, "untouched_acc": 0.5,
                "mean_confidence": 0.9, "train": {"new_acc": new, "old_acc": old},
                "confusion": {"rows": [0, 1], "cols": [0, 1], "matrix": [[1.0, 0.0], [0.25, 0.75]]}}  # fmt: skip

    run = tmp_path / "runs" / "00_ft_rp1by2" / "seed0"
    run.mkdir(parents=True)
    metrics = {"experiment": "00_ft_rp1by2", "times": {"unlearn_time": 1.25, "oracle_time": 30.0},
               "replacement": {"base": report(0.0, 1.0), "oracle": report(0.99, 0.2),
                               "unlearned": report(0.5, 0.125)}}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    lines = rn.replacement_table(tmp_path).splitlines()
    assert lines[2] == "| base | 0.000 | 1.000 | 0.500 | 0.900 | 0.000 | 1.000 | – |"
    assert lines[3].startswith("| retrain oracle | 0.990 | 0.200 |") and "30.0 s" in lines[3]
    assert lines[4] == "| `00_ft_rp1by2` | 0.500 | 0.125 | 0.500 | 0.900 | 0.500 | 0.125 | 1.2 |"
    assert lines[-1] == "| `00_ft_rp1by2` | 25% | 75% |"  # where the 1s go
    with pytest.raises(rn.UserError, match="unknown target 'nope'"):
        rn.pick("quickstart,nope")
