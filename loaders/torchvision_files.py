"""Load torchvision datasets into in-memory uint8 tensors.

Every loader lets torchvision do what it already does well (download, extract, verify md5 /
existence, parse the on-disk format) and then reads the dataset object's raw arrays (``.data``,
``.targets`` / ``.labels``) directly. That avoids the per-sample PIL round trip of
``dataset[i]``, which is orders of magnitude slower for 50k+ images.

Each loader returns a dict with the keys

* ``train_x``: uint8 tensor ``[N, C, H, W]``, contiguous
* ``train_y``: int64 tensor ``[N]``
* ``test_x`` / ``test_y``: same for the test split
* ``classes``: ``list[str]`` of class names, indexed by label
* ``unlabeled_x``: only for :func:`load_stl10` with ``unlabeled=True``

Files live under ``root`` in torchvision's standard layout, so a directory that already holds
them (from torchvision or a manual copy) is used as is and never re-downloaded. A missing,
corrupted or undownloadable dataset raises :class:`DatasetUnavailable` with one message saying
which dataset, where it was looked for and how to fix it.

Fashion-MNIST is looked for in this order: ``root/FashionMNIST/raw`` (``--data-dir``), then the
system dataset folders in :data:`FASHIONMNIST_SYSTEM_DIRS` (the Debian package
``dataset-fashion-mnist`` installs the four original gzip IDX files in
``/usr/share/datasets/fashion-mnist``), then a torchvision download when allowed. System files
are read in place (nothing is written next to them) and the network is never touched.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.error import URLError

import numpy as np
import torch
from torchvision import datasets as tvd

__all__ = [
    "DatasetUnavailable",
    "FASHIONMNIST_SYSTEM_DIRS",
    "TV_LOADERS",
    "load_cifar10",
    "load_cifar100",
    "load_emnist",
    "load_fashionmnist",
    "load_mnist",
    "load_stl10",
    "load_svhn",
]

# torchvision's STL10 only sets ``classes`` when class_names.txt exists (the official archive
# ships it); this is the same list, in the same order, for directories that lack the file.
_STL10_CLASSES = [
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
]

_T = TypeVar("_T")


class DatasetUnavailable(Exception):
    """A dataset's files are missing or corrupted and could not be (or were not) downloaded."""


def _open(
    name: str,
    root: Path,
    data_dir: Path,
    files: Sequence[str],
    download: bool,
    make: Callable[[], _T],
) -> _T:
    """Build a torchvision dataset, turning "not there / cannot fetch" into DatasetUnavailable.

    torchvision signals a missing or corrupted dataset with a bare RuntimeError and a failed
    download with URLError / OSError (or RuntimeError after all MNIST mirrors failed); none of
    them says which directory to fill, so we add that. The original error is chained and quoted.
    """
    try:
        return make()
    except (RuntimeError, URLError, OSError) as err:
        if download:
            what = "could not be downloaded (or the downloaded files failed verification)"
            fix = "check the internet connection and retry"
        else:
            what = "was not found (or its files are corrupted) and download=False"
            fix = f"run once with download=True and internet access (it is fetched into {root})"
        raise DatasetUnavailable(
            f"Dataset '{name}' is unavailable: it {what}. Looked in {data_dir} for: "
            f"{', '.join(files)}. To fix: {fix}, or place the files under {data_dir}. "
            f"(torchvision said: {type(err).__name__}: {' '.join(str(err).split())})"
        ) from err


def _images(array: Any, layout: str) -> torch.Tensor:
    """Turn a raw image array into a contiguous uint8 [N, C, H, W] tensor.

    ``layout`` names the axes of ``array``: "NHWC", "NCHW" or "NHW" (single channel).
    """
    t = torch.as_tensor(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    if layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    elif layout == "NHW":
        t = t.unsqueeze(1)
    elif layout != "NCHW":
        raise ValueError(f"unknown layout {layout!r}")
    # torchvision's arrays are often transposed views; make one compact copy so callers can
    # index, pin and move them without hidden strides.
    return t.contiguous()


def _labels(values: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64).contiguous()


def _cifar(name: str, cls: type[tvd.CIFAR10], root: Path, download: bool) -> dict[str, Any]:
    root = Path(root)
    data_dir = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    # One archive holds both splits, so only the first constructor may need to download;
    # passing download=False to the second skips a redundant md5 pass over all files.
    train = _open(
        name, root, data_dir, files, download, lambda: cls(str(root), train=True, download=download)
    )
    test = _open(
        name, root, data_dir, files, download, lambda: cls(str(root), train=False, download=False)
    )
    return {
        "train_x": _images(train.data, "NHWC"),
        "train_y": _labels(train.targets),
        "test_x": _images(test.data, "NHWC"),
        "test_y": _labels(test.targets),
        "classes": [str(c) for c in train.classes],
    }


def load_cifar10(root: Path, download: bool) -> dict[str, Any]:
    """CIFAR-10: 50000 train / 10000 test, 3x32x32, 10 classes (``root/cifar-10-batches-py``)."""
    return _cifar("cifar10", tvd.CIFAR10, root, download)


def load_cifar100(root: Path, download: bool) -> dict[str, Any]:
    """CIFAR-100 with the 100 fine labels: 50000 / 10000, 3x32x32 (``root/cifar-100-python``)."""
    return _cifar("cifar100", tvd.CIFAR100, root, download)


def load_svhn(root: Path, download: bool) -> dict[str, Any]:
    """SVHN train (73257) and test (26032) splits, 3x32x32; the 'extra' split is not loaded.

    torchvision keeps the ``.mat`` files directly in ``root`` and already maps the on-disk
    label 10 to digit 0, so labels are 0..9 and equal the digit.
    """
    root = Path(root)
    files = [tvd.SVHN.split_list[s][1] for s in ("train", "test")]
    # Each split is a separate file with its own URL, so both constructors get ``download``.
    train = _open(
        "svhn", root, root, files, download, lambda: tvd.SVHN(str(root), "train", download=download)
    )
    test = _open(
        "svhn", root, root, files, download, lambda: tvd.SVHN(str(root), "test", download=download)
    )
    return {
        "train_x": _images(train.data, "NCHW"),
        "train_y": _labels(train.labels),
        "test_x": _images(test.data, "NCHW"),
        "test_y": _labels(test.labels),
        "classes": [str(d) for d in range(10)],
    }


def _mnist_like(
    name: str,
    make: Callable[[bool, bool], tvd.MNIST],
    data_dir: Path,
    files: Sequence[str],
    root: Path,
    download: bool,
    transpose: bool = False,
) -> dict[str, Any]:
    # One download fetches both splits (see _cifar for why the second call passes False).
    train = _open(name, root, data_dir, files, download, lambda: make(True, download))
    test = _open(name, root, data_dir, files, download, lambda: make(False, False))
    out: dict[str, Any] = {}
    for split, ds in (("train", train), ("test", test)):
        x = ds.data
        if transpose:
            # The EMNIST idx files store every image transposed (column-major); swap H and W
            # so the characters come out upright like MNIST.
            x = x.transpose(1, 2)
        out[f"{split}_x"] = _images(x, "NHW")
        out[f"{split}_y"] = _labels(ds.targets)
    out["classes"] = [str(c) for c in train.classes]
    return out


def _mnist_files(cls: type[tvd.MNIST]) -> list[str]:
    # torchvision reads the uncompressed files (.gz name minus its extension) from raw/.
    return [os.path.splitext(os.path.basename(f))[0] for f, _ in cls.resources]


def load_mnist(root: Path, download: bool) -> dict[str, Any]:
    """MNIST: 60000 train / 10000 test, 1x28x28, 10 classes (``root/MNIST/raw``)."""
    root = Path(root)
    return _mnist_like(
        "mnist",
        lambda train, dl: tvd.MNIST(str(root), train=train, download=dl),
        root / "MNIST" / "raw",
        _mnist_files(tvd.MNIST),
        root,
        download,
    )


#: System folders searched, in order, for the original Fashion-MNIST files when ``--data-dir``
#: has none; the first is where the Debian package ``dataset-fashion-mnist`` puts them.
FASHIONMNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

_FASHION_APT = "apt-get install dataset-fashion-mnist"


def _system_files(names: Sequence[str], dirs: Sequence[Path]) -> list[Path] | None:
    """The files ``names`` (each gzipped or plain) from the first folder that has them all."""
    for d in dirs:
        found = []
        for name in names:
            hit = next((d / f for f in (f"{name}.gz", name) if (d / f).is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def read_idx(path: Path) -> np.ndarray:
    """A uint8 array from an IDX file (LeCun's MNIST format), gzipped when it ends in .gz.

    The header is two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions
    and one big-endian uint32 per dimension; the data follow in C order. A file that breaks the
    format raises DatasetUnavailable naming it.
    """
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            blob = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetUnavailable(f"{path}: cannot be read ({err})") from err
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] != 0x08 or blob[3] == 0:
        raise DatasetUnavailable(
            f"{path}: not an unsigned-byte IDX file (header {blob[:4].hex() or 'empty'}, "
            "expected 000008 followed by the number of dimensions)"
        )
    ndim = blob[3]
    if len(blob) < 4 + 4 * ndim:
        raise DatasetUnavailable(f"{path}: IDX header is cut short")
    shape = struct.unpack(f">{ndim}I", blob[4 : 4 + 4 * ndim])
    data = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetUnavailable(
            f"{path}: IDX header announces shape {shape} ({int(np.prod(shape))} bytes) but "
            f"{data.size} bytes follow (truncated or corrupted file)"
        )
    return data.reshape(shape).copy()  # frombuffer arrays are read-only views of the bytes


def _read_fashion_system(files: Sequence[Path]) -> dict[str, Any]:
    classes = [str(c) for c in tvd.FashionMNIST.classes]
    out: dict[str, Any] = {}
    for split, (images, labels) in (("train", files[:2]), ("test", files[2:])):
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetUnavailable(
                f"{images}, {labels}: expected [N, H, W] images and [N] labels, got shapes "
                f"{list(x.shape)} and {list(y.shape)}"
            )
        if len(y) and int(y.max()) >= len(classes):
            raise DatasetUnavailable(f"{labels}: label {int(y.max())} is not a Fashion-MNIST class")
        out[f"{split}_x"] = _images(x, "NHW")
        out[f"{split}_y"] = _labels(y)
    out["classes"] = classes
    return out


def load_fashionmnist(root: Path, download: bool) -> dict[str, Any]:
    """Fashion-MNIST: 60000 / 10000, 1x28x28, 10 classes.

    Search order: ``root/FashionMNIST/raw`` (torchvision's layout), then the system folders in
    :data:`FASHIONMNIST_SYSTEM_DIRS` (read in place, no network), then a download into ``root``
    when ``download`` is true.
    """
    root = Path(root)
    data_dir = root / "FashionMNIST" / "raw"
    files = _mnist_files(tvd.FashionMNIST)
    if not all((data_dir / f).is_file() for f in files):
        found = _system_files(files, FASHIONMNIST_SYSTEM_DIRS)
        if found is not None:
            return _read_fashion_system(found)
    try:
        return _mnist_like(
            "fashionmnist",
            lambda train, dl: tvd.FashionMNIST(str(root), train=train, download=dl),
            data_dir,
            files,
            root,
            download,
        )
    except DatasetUnavailable as err:
        where = ", ".join(str(d) for d in FASHIONMNIST_SYSTEM_DIRS) or "no system folder"
        raise DatasetUnavailable(
            f"{err} The files were not in the system dataset folders either ({where}); on "
            f"Debian or Ubuntu `{_FASHION_APT}` installs them there for offline use."
        ) from err.__cause__


def load_emnist(root: Path, download: bool, split: str = "balanced") -> dict[str, Any]:
    """EMNIST ``split`` (default 'balanced': 112800 / 18800, 47 classes), 1x28x28, upright.

    Labels and ``classes`` follow torchvision: for the 'letters' split labels are 1..26 and
    ``classes[0]`` is the placeholder 'N/A'.
    """
    if split not in tvd.EMNIST.splits:
        raise ValueError(
            f"Unknown EMNIST split {split!r}; valid splits: {', '.join(tvd.EMNIST.splits)}"
        )
    root = Path(root)
    files = [
        f"emnist-{split}-{part}-{kind}-ubyte"
        for part in ("train", "test")
        for kind in ("images-idx3", "labels-idx1")
    ]
    return _mnist_like(
        f"emnist ({split} split)",
        lambda train, dl: tvd.EMNIST(str(root), split=split, train=train, download=dl),
        root / "EMNIST" / "raw",
        files,
        root,
        download,
        transpose=True,
    )


def load_stl10(root: Path, download: bool, unlabeled: bool = False) -> dict[str, Any]:
    """STL-10 labelled train (5000) and test (8000) splits, 3x96x96, 10 classes.

    With ``unlabeled=True`` the 100000-image 'unlabeled' split is added as ``unlabeled_x``
    (2.76 GB as uint8, and about twice that at peak while it is made contiguous), which is why
    it is opt-in. torchvision verifies all files, including ``unlabeled_X.bin``, even when only
    the labelled splits are read.
    """
    root = Path(root)
    cls = tvd.STL10
    data_dir = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list]

    def opened(split: str, dl: bool) -> tvd.STL10:
        return _open(
            "stl10", root, data_dir, files, download, lambda: cls(str(root), split, download=dl)
        )

    # One archive holds every split (see _cifar for why later calls pass download=False).
    train = opened("train", download)
    test = opened("test", False)
    out: dict[str, Any] = {
        "train_x": _images(train.data, "NCHW"),
        # On disk labels are 1..10; torchvision already shifted them to 0..9.
        "train_y": _labels(train.labels),
        "test_x": _images(test.data, "NCHW"),
        "test_y": _labels(test.labels),
        "classes": [str(c) for c in getattr(train, "classes", _STL10_CLASSES)],
    }
    if unlabeled:
        extra = opened("unlabeled", False)
        out["unlabeled_x"] = _images(extra.data, "NCHW")
    return out


TV_LOADERS: dict[str, Callable[..., dict[str, Any]]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "mnist": load_mnist,
    "fashionmnist": load_fashionmnist,
    "emnist": load_emnist,
    "stl10": load_stl10,
}
