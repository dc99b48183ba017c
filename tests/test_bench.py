"""The bench/ scripts keep running: each one's ``--tiny`` mode runs here in a few seconds.

Timing is never asserted (that is what the scripts are for); what is checked is that every
script still runs against today's code and reports what it measured.
"""

from __future__ import annotations

import importlib.util
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
