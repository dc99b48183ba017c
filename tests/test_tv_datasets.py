"""Tests for tv_datasets: every loader reads tiny fake files written in the real on-disk format.

Each fake image is random uint8 noise plus two markers: pixel (c=0, h=0, w=0) holds the image's
index within its split (checks ordering) and the top-right pixel (c=0, h=0, w=W-1) is 255 while
the bottom-left one is 0 (checks orientation: a transposed image would swap them). Every test
also compares the whole tensor exactly.

torchvision verifies CIFAR / SVHN / STL-10 files against hard-coded md5 sums; the tests
monkeypatch those class attributes with the md5 of the fake files (the product code is not
touched). The network is blocked for the whole module, so download=True is safe to exercise.
"""

from __future__ import annotations

import hashlib
import pickle
import socket
import struct
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
from torchvision import datasets as tvd

from loaders import torchvision_files as tv_datasets
from loaders.torchvision_files import TV_LOADERS, DatasetUnavailable

N_TRAIN = 20
N_TEST = 10
N_UNLABELED = 6
TEST_MARKER_OFFSET = 100  # test images are marked 100, 101, ... so splits cannot be confused


class NetworkTouched(AssertionError):
    """Raised if anything tries to reach the network; deliberately not an OSError/URLError so
    the loaders' error wrapping cannot hide it."""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NetworkTouched(f"network access attempted: {args!r}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def _no_system_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    # these tests are about --data-dir; the system folders (e.g. an installed Debian
    # dataset-fashion-mnist) are covered by tests/test_fashion_offline.py
    monkeypatch.setattr(tv_datasets, "FASHIONMNIST_SYSTEM_DIRS", ())


# ---------------------------------------------------------------------------- fake data helpers


def _fake_images(n: int, c: int, h: int, w: int, seed: int, marker_offset: int = 0) -> np.ndarray:
    """Random uint8 [n, c, h, w] images with index and orientation markers."""
    x = np.random.default_rng(seed).integers(1, 255, size=(n, c, h, w), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) + marker_offset
    x[:, 0, 0, w - 1] = 255
    x[:, 0, h - 1, 0] = 0
    return x


def _fake_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n, dtype=np.int64)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _expected(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: list[str],
) -> dict[str, Any]:
    return {
        "train_x": torch.from_numpy(train_x),
        "train_y": torch.from_numpy(train_y),
        "test_x": torch.from_numpy(test_x),
        "test_y": torch.from_numpy(test_y),
        "classes": classes,
    }


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx-ubyte format: magic 0x0000 08 <ndim>, big-endian dims."""
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


# -------------------------------------------------------- one fake dataset per on-disk format


def _fake_cifar10(root: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train_x, test_x = (
        _fake_images(N_TRAIN, 3, 32, 32, seed=1),
        _fake_images(N_TEST, 3, 32, 32, seed=2, marker_offset=TEST_MARKER_OFFSET),
    )
    train_y, test_y = _fake_labels(N_TRAIN, 10, seed=3), _fake_labels(N_TEST, 10, seed=4)
    classes = ["airplane", "automobile", "bird", "cat", "deer"]
    classes += ["dog", "frog", "horse", "ship", "truck"]

    def batch(x: np.ndarray, y: np.ndarray, label: str) -> dict[str, Any]:
        # Real batches: "data" is [n, 3072] uint8 rows holding a CHW image each.
        return {
            "batch_label": label,
            "labels": [int(v) for v in y],
            "data": x.reshape(len(x), -1),
            "filenames": [f"img_{i}.png" for i in range(len(x))],
        }

    train_list = []
    per_batch = N_TRAIN // 5
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        path = d / f"data_batch_{b + 1}"
        path.write_bytes(pickle.dumps(batch(train_x[part], train_y[part], f"training batch {b}")))
        train_list.append([path.name, _md5(path)])
    (d / "test_batch").write_bytes(pickle.dumps(batch(test_x, test_y, "testing batch 1")))
    meta = {"label_names": classes, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta))

    mp.setattr(tvd.CIFAR10, "train_list", train_list)
    mp.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(d / "test_batch")]])
    mp.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": _md5(d / "batches.meta")})
    return _expected(train_x, train_y, test_x, test_y, classes)


def _fake_cifar100(root: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    train_x, test_x = (
        _fake_images(N_TRAIN, 3, 32, 32, seed=5),
        _fake_images(N_TEST, 3, 32, 32, seed=6, marker_offset=TEST_MARKER_OFFSET),
    )
    train_y, test_y = _fake_labels(N_TRAIN, 100, seed=7), _fake_labels(N_TEST, 100, seed=8)
    classes = [f"fine_{i:02d}" for i in range(100)]

    def split(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return {
            "filenames": [f"img_{i}.png" for i in range(len(x))],
            "batch_label": "fake",
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],  # must be ignored by the loader
            "data": x.reshape(len(x), -1),
        }

    (d / "train").write_bytes(pickle.dumps(split(train_x, train_y)))
    (d / "test").write_bytes(pickle.dumps(split(test_x, test_y)))
    meta = {"fine_label_names": classes, "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(meta))

    mp.setattr(tvd.CIFAR100, "train_list", [["train", _md5(d / "train")]])
    mp.setattr(tvd.CIFAR100, "test_list", [["test", _md5(d / "test")]])
    mp.setattr(tvd.CIFAR100, "meta", {**tvd.CIFAR100.meta, "md5": _md5(d / "meta")})
    return _expected(train_x, train_y, test_x, test_y, classes)


def _fake_svhn(root: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    train_x, test_x = (
        _fake_images(N_TRAIN, 3, 32, 32, seed=9),
        _fake_images(N_TEST, 3, 32, 32, seed=10, marker_offset=TEST_MARKER_OFFSET),
    )
    # Make sure digit 0 (stored as 10 on disk) occurs in both splits.
    train_y, test_y = np.arange(N_TRAIN) % 10, (np.arange(N_TEST) * 3) % 10
    split_list = {k: list(v) for k, v in tvd.SVHN.split_list.items()}
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        path = root / f"{name}_32x32.mat"
        # Real files: X is [H, W, C, N] uint8 and y is [N, 1] with the digit 0 labelled 10.
        on_disk_y = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(path, {"X": x.transpose(2, 3, 1, 0), "y": on_disk_y})
        split_list[name][2] = _md5(path)
    mp.setattr(tvd.SVHN, "split_list", split_list)
    return _expected(
        train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), list("0123456789")
    )


def _fake_mnist_family(
    root: Path, folder: str, classes: list[str], seed: int, prefix: Callable[[str], str]
) -> dict[str, Any]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    train_x, test_x = (
        _fake_images(N_TRAIN, 1, 28, 28, seed=seed),
        _fake_images(N_TEST, 1, 28, 28, seed=seed + 1, marker_offset=TEST_MARKER_OFFSET),
    )
    train_y = _fake_labels(N_TRAIN, len(classes), seed=seed + 2)
    test_y = _fake_labels(N_TEST, len(classes), seed=seed + 3)
    transpose = folder == "EMNIST"
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        images = x[:, 0]
        if transpose:
            # The real EMNIST files store each image transposed.
            images = images.transpose(0, 2, 1)
        _write_idx(raw / f"{prefix(split)}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix(split)}-labels-idx1-ubyte", y.astype(np.uint8))
    return _expected(train_x, train_y, test_x, test_y, classes)


def _mnist_prefix(split: str) -> str:
    return "train" if split == "train" else "t10k"


def _fake_mnist(root: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    return _fake_mnist_family(root, "MNIST", list(tvd.MNIST.classes), 11, _mnist_prefix)


def _fake_fashionmnist(root: Path, mp: pytest.MonkeyPatch) -> dict[str, Any]:
    classes = list(tvd.FashionMNIST.classes)
    return _fake_mnist_family(root, "FashionMNIST", classes, 21, _mnist_prefix)


def _fake_emnist(root: Path, mp: pytest.MonkeyPatch, split: str = "balanced") -> dict[str, Any]:
    classes = list(tvd.EMNIST.classes_split_dict[split])
    return _fake_mnist_family(root, "EMNIST", classes, 31, lambda s: f"emnist-{split}-{s}")


def _fake_stl10(root: Path, mp: pytest.MonkeyPatch, unlabeled: bool = False) -> dict[str, Any]:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    train_x, test_x = (
        _fake_images(N_TRAIN, 3, 96, 96, seed=41),
        _fake_images(N_TEST, 3, 96, 96, seed=42, marker_offset=TEST_MARKER_OFFSET),
    )
    unlabeled_x = _fake_images(N_UNLABELED, 3, 96, 96, seed=43, marker_offset=200)
    train_y, test_y = _fake_labels(N_TRAIN, 10, seed=44), _fake_labels(N_TEST, 10, seed=45)
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

    def write_x(name: str, x: np.ndarray) -> None:
        # Real files are column-major per channel: [N, C, W, H] in C order.
        (d / name).write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())

    write_x("train_X.bin", train_x)
    write_x("test_X.bin", test_x)
    write_x("unlabeled_X.bin", unlabeled_x)
    # Labels are 1..10 on disk.
    (d / "train_y.bin").write_bytes((train_y + 1).astype(np.uint8).tobytes())
    (d / "test_y.bin").write_bytes((test_y + 1).astype(np.uint8).tobytes())
    (d / "class_names.txt").write_text("\n".join(classes) + "\n")
    folds = [" ".join(str(i) for i in range(k, N_TRAIN, 10)) for k in range(10)]
    (d / "fold_indices.txt").write_text("\n".join(folds) + "\n")

    mp.setattr(
        tvd.STL10,
        "train_list",
        [[f, _md5(d / f)] for f in ("train_X.bin", "train_y.bin", "unlabeled_X.bin")],
    )
    mp.setattr(tvd.STL10, "test_list", [[f, _md5(d / f)] for f in ("test_X.bin", "test_y.bin")])
    expected = _expected(train_x, train_y, test_x, test_y, classes)
    if unlabeled:
        expected["unlabeled_x"] = torch.from_numpy(unlabeled_x)
    return expected


FAKES: dict[str, Callable[..., dict[str, Any]]] = {
    "cifar10": _fake_cifar10,
    "cifar100": _fake_cifar100,
    "svhn": _fake_svhn,
    "mnist": _fake_mnist,
    "fashionmnist": _fake_fashionmnist,
    "emnist": _fake_emnist,
    "stl10": _fake_stl10,
}

# (loader name, extra keyword arguments for both the loader and the fake-data writer)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("cifar10", {}),
    ("cifar100", {}),
    ("svhn", {}),
    ("mnist", {}),
    ("fashionmnist", {}),
    ("emnist", {}),
    ("emnist", {"split": "digits"}),
    ("emnist", {"split": "letters"}),
    ("stl10", {}),
    ("stl10", {"unlabeled": True}),
]

TV_CLASSES = {
    "cifar10": tvd.CIFAR10,
    "cifar100": tvd.CIFAR100,
    "svhn": tvd.SVHN,
    "mnist": tvd.MNIST,
    "fashionmnist": tvd.FashionMNIST,
    "emnist": tvd.EMNIST,
    "stl10": tvd.STL10,
}


# ----------------------------------------------------------------------------------- tests


def test_registry_names_the_loaders() -> None:
    expected = {
        "cifar10": tv_datasets.load_cifar10,
        "cifar100": tv_datasets.load_cifar100,
        "svhn": tv_datasets.load_svhn,
        "mnist": tv_datasets.load_mnist,
        "fashionmnist": tv_datasets.load_fashionmnist,
        "emnist": tv_datasets.load_emnist,
        "stl10": tv_datasets.load_stl10,
    }
    assert dict(TV_LOADERS) == expected


@pytest.mark.parametrize("download", [False, True], ids=["local", "download-skipped"])
@pytest.mark.parametrize(
    ("name", "kwargs"), CASES, ids=[n + "".join(f"-{v}" for v in kw.values()) for n, kw in CASES]
)
def test_loader_reads_real_format(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    kwargs: dict[str, Any],
    download: bool,
) -> None:
    # With download=True the files are already present and valid, so torchvision must use
    # them as they are; the autouse fixture fails the test if it reaches for the network.
    expected = FAKES[name](tmp_path, monkeypatch, **kwargs)
    out = TV_LOADERS[name](tmp_path, download, **kwargs)

    assert set(out) == set(expected)
    assert out["classes"] == expected["classes"]
    assert all(isinstance(c, str) for c in out["classes"])
    for key in ("train_x", "test_x", "unlabeled_x"):
        if key not in expected:
            continue
        x, want = out[key], expected[key]
        assert x.dtype == torch.uint8
        assert x.is_contiguous()
        assert tuple(x.shape) == tuple(want.shape)
        offset = {"train_x": 0, "test_x": TEST_MARKER_OFFSET, "unlabeled_x": 200}[key]
        # Ordering: the index marker survives in place.
        assert x[:, 0, 0, 0].tolist() == list(range(offset, offset + len(x)))
        # Orientation: top-right stays 255, bottom-left stays 0 (transposing swaps them).
        assert (x[:, 0, 0, -1] == 255).all()
        assert (x[:, 0, -1, 0] == 0).all()
        assert torch.equal(x, want)
    for key in ("train_y", "test_y"):
        assert out[key].dtype == torch.int64
        assert torch.equal(out[key], expected[key])
    assert len(out["train_x"]) == len(out["train_y"]) == N_TRAIN
    assert len(out["test_x"]) == len(out["test_y"]) == N_TEST


def test_expected_shapes_per_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {
        "cifar10": (3, 32, 32),
        "cifar100": (3, 32, 32),
        "svhn": (3, 32, 32),
        "mnist": (1, 28, 28),
        "fashionmnist": (1, 28, 28),
        "emnist": (1, 28, 28),
        "stl10": (3, 96, 96),
    }
    for name, chw in shapes.items():
        root = tmp_path / name
        FAKES[name](root, monkeypatch)
        out = TV_LOADERS[name](root, False)
        assert tuple(out["train_x"].shape) == (N_TRAIN, *chw), name
        assert tuple(out["test_x"].shape) == (N_TEST, *chw), name


def test_svhn_maps_label_10_to_digit_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_svhn(tmp_path, monkeypatch)
    out = tv_datasets.load_svhn(tmp_path, False)
    assert out["train_y"].min() == 0 and out["train_y"].max() == 9
    assert (out["train_y"] == 0).sum() == N_TRAIN // 10


@pytest.mark.parametrize("name", list(TV_LOADERS))
def test_missing_files_raise_dataset_unavailable(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetUnavailable) as info:
        TV_LOADERS[name](tmp_path, False)
    message = str(info.value)
    assert f"'{name}" in message
    assert str(tmp_path) in message
    assert "download=True" in message
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("name", list(TV_LOADERS))
def test_failed_download_is_wrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    def offline(self: Any) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(TV_CLASSES[name], "download", offline)
    with pytest.raises(DatasetUnavailable) as info:
        TV_LOADERS[name](tmp_path, True)
    message = str(info.value)
    assert f"'{name}" in message
    assert str(tmp_path) in message
    assert "Temporary failure in name resolution" in message
    assert isinstance(info.value.__cause__, URLError)


def test_corrupted_file_is_not_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar10(tmp_path, monkeypatch)
    with (tmp_path / "cifar-10-batches-py" / "data_batch_3").open("ab") as f:
        f.write(b"garbage")
    with pytest.raises(DatasetUnavailable, match="cifar10"):
        tv_datasets.load_cifar10(tmp_path, False)


def test_stl10_without_unlabeled_has_no_unlabeled_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_stl10(tmp_path, monkeypatch)
    assert "unlabeled_x" not in tv_datasets.load_stl10(tmp_path, False)


def test_emnist_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        tv_datasets.load_emnist(tmp_path, False, split="balance")
    message = str(info.value)
    assert "'balance'" in message
    for split in tvd.EMNIST.splits:
        assert split in message
    assert not any(tmp_path.iterdir())  # rejected before torchvision touched the directory
