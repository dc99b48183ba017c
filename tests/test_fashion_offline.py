"""Fashion-MNIST offline: the loader reads the original gzip IDX files from a system folder.

Search order under test: ``--data-dir`` (torchvision's ``FashionMNIST/raw``), then the system
folders (``FASHIONMNIST_SYSTEM_DIRS``, monkeypatched to temporary folders here), then download.
The network is blocked in every test, so a loader that reached for it fails loudly.
"""

from __future__ import annotations

import gzip
import socket
import struct
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision import datasets as tvd

import datasets
from datasets import load_raw
from loaders import torchvision_files as tv
from loaders.torchvision_files import DatasetUnavailable, load_fashionmnist, read_idx

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class NetworkTouched(AssertionError):
    """Not an OSError, so the loader's error wrapping cannot swallow it."""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NetworkTouched(f"network access attempted: {args!r}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _fake(seed: int, n_train: int = 12, n_test: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    out["train_x"][:, 0, 0] = np.arange(n_train)  # order marker
    out["train_x"][:, 0, 27], out["train_x"][:, 27, 0] = 255, 0  # orientation marker
    return out


def _write(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("train_x", "train_y", "test_x", "test_y")
    for name, key in zip(NAMES, keys, strict=True):
        blob = _idx_bytes(arrays[key])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
        else:
            (folder / name).write_bytes(blob)


def _check(out: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert set(out) == {"train_x", "train_y", "test_x", "test_y", "classes"}
    assert out["classes"] == list(tvd.FashionMNIST.classes)
    for split in ("train", "test"):
        x, y = out[f"{split}_x"], out[f"{split}_y"]
        assert x.dtype == torch.uint8 and x.is_contiguous()
        assert torch.equal(x, torch.from_numpy(want[f"{split}_x"]).unsqueeze(1))
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(want[f"{split}_y"]).long())


@pytest.fixture
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty first system folder and a second one that the tests fill."""
    second = tmp_path / "system2"
    monkeypatch.setattr(tv, "FASHIONMNIST_SYSTEM_DIRS", (tmp_path / "system1", second))
    return second


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_system_folder_is_read_with_exact_contents(
    tmp_path: Path, system: Path, download: bool, gz: bool
) -> None:
    want = _fake(1)
    _write(system, want, gz=gz)
    data_dir = tmp_path / "data"
    _check(load_fashionmnist(data_dir, download), want)
    assert not data_dir.exists()  # read in place: nothing downloaded or copied


def test_data_dir_comes_before_the_system_folder(tmp_path: Path, system: Path) -> None:
    mine, theirs = _fake(2), _fake(3)
    _write(system, theirs)
    _write(tmp_path / "data" / "FashionMNIST" / "raw", mine, gz=False)
    _check(load_fashionmnist(tmp_path / "data", True), mine)


def test_first_complete_system_folder_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    partial, full, later = _fake(4), _fake(5), _fake(6)
    _write(tmp_path / "a", partial)
    (tmp_path / "a" / f"{NAMES[3]}.gz").unlink()  # incomplete: skipped
    _write(tmp_path / "b", full)
    _write(tmp_path / "c", later)
    dirs = (tmp_path / "a", tmp_path / "b", tmp_path / "c")
    monkeypatch.setattr(tv, "FASHIONMNIST_SYSTEM_DIRS", dirs)
    _check(load_fashionmnist(tmp_path / "data", False), full)


def test_load_raw_caches_the_system_copy(tmp_path: Path, system: Path) -> None:
    want = _fake(7)
    _write(system, want)
    raw = load_raw("fashionmnist", tmp_path / "data", download=False)
    assert torch.equal(raw.train_x, torch.from_numpy(want["train_x"]).unsqueeze(1))
    assert raw.classes == list(tvd.FashionMNIST.classes)
    for f in system.iterdir():  # the second load must come from the cache under --data-dir
        f.unlink()
    again = load_raw("fashionmnist", tmp_path / "data", download=False)
    assert torch.equal(again.train_x, raw.train_x) and torch.equal(again.test_y, raw.test_y)


def test_nothing_anywhere_names_the_package(tmp_path: Path, system: Path) -> None:
    with pytest.raises(DatasetUnavailable) as info:
        load_fashionmnist(tmp_path / "data", False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(system) in message and str(tmp_path / "data") in message
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[:-5], "bytes follow"),
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "not an unsigned-byte IDX file"),
        (lambda b: b[:6], "cut short"),
    ],
    ids=["truncated", "float-type", "short-header"],
)
def test_broken_idx_file_is_named(tmp_path: Path, damage: Any, match: str) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(damage(_idx_bytes(np.zeros((3, 4, 5), np.uint8)))))
    with pytest.raises(DatasetUnavailable, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_not_gzip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(_idx_bytes(np.zeros((2, 2), np.uint8)))  # plain bytes under a .gz name
    with pytest.raises(DatasetUnavailable, match="cannot be read"):
        read_idx(path)


def test_mismatched_counts_are_rejected(tmp_path: Path, system: Path) -> None:
    bad = _fake(8)
    bad["train_y"] = bad["train_y"][:-1]
    _write(system, bad)
    with pytest.raises(DatasetUnavailable, match="expected \\[N, H, W\\] images and \\[N\\]"):
        load_fashionmnist(tmp_path / "data", False)


@pytest.mark.skipif(
    not all((REAL_DIR / f"{n}.gz").is_file() for n in NAMES),
    reason=f"Debian package dataset-fashion-mnist is not installed (no files in {REAL_DIR}); "
    "`apt-get install -y dataset-fashion-mnist` provides them (CI installs it)",
)
def test_real_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tv, "FASHIONMNIST_SYSTEM_DIRS", (REAL_DIR,))
    out = load_fashionmnist(tmp_path, False)
    assert out["train_x"].shape == (60000, 1, 28, 28) and out["test_x"].shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class
    assert out["train_y"].bincount().tolist() == [6000] * 10
    assert out["test_y"].bincount().tolist() == [1000] * 10
    # the published normalisation of the training images (mean 0.2860, std 0.3530)
    x = out["train_x"].double() / 255
    assert abs(float(x.mean()) - 0.2860) < 5e-5 and abs(float(x.std()) - 0.3530) < 5e-5


# ------------------------------------------------------------------------------ fashion5k


def _rows(x: torch.Tensor) -> dict[bytes, int]:
    return {bytes(r.flatten().tolist()): i for i, r in enumerate(x)}


def _check_fashion5k(out: dict[str, Any], full: dict[str, Any]) -> None:
    """500 training images of every class, each one of the full set's with its label, in the
    full set's order; the test set whole."""
    assert out["train_y"].bincount().tolist() == [datasets.FASHION5K_PER_CLASS] * 10
    where = _rows(full["train_x"])
    picked = [where[bytes(r.flatten().tolist())] for r in out["train_x"]]
    assert picked == sorted(set(picked))  # distinct images, in order
    assert torch.equal(full["train_y"][picked], out["train_y"])
    assert torch.equal(out["test_x"], full["test_x"]) and torch.equal(out["test_y"], full["test_y"])


def test_fashion5k_is_a_stratified_pool_of_the_system_copy(tmp_path: Path, system: Path) -> None:
    want = _fake(4, n_train=12000, n_test=9)
    want["train_y"] = np.repeat(np.arange(10, dtype=np.uint8), 1200)
    want["train_x"][:, 1, :2] = np.stack([np.arange(12000) // 256, np.arange(12000) % 256], 1)
    _write(system, want)
    full = load_fashionmnist(tmp_path / "data", False)
    out = datasets.load_fashion5k(tmp_path / "data", False)
    _check_fashion5k(out, full)
    again = load_raw("fashion5k", tmp_path / "data", False)  # cached, the same pool
    assert torch.equal(again.train_x, out["train_x"]) and torch.equal(again.train_y, out["train_y"])


@pytest.mark.skipif(
    not all((REAL_DIR / f"{n}.gz").is_file() for n in NAMES),
    reason=f"Debian package dataset-fashion-mnist is not installed (no files in {REAL_DIR})",
)
def test_fashion5k_from_the_real_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tv, "FASHIONMNIST_SYSTEM_DIRS", (REAL_DIR,))
    full = load_fashionmnist(tmp_path, False)
    _check_fashion5k(datasets.load_fashion5k(tmp_path, False), full)
