"""Tests for models.py (architectures, feature split, unknown names) and ckpt.py round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from core.errors import UserError
from core.io import file_record
from models import MODELS, build_model, features
from training.checkpoints import (
    checkpoint_exists,
    forget_indices_of,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)

LENET_PARAMS = {
    "block1.0.weight",
    "block1.0.bias",
    "block1.1.weight",
    "block1.1.bias",
    "block2.0.weight",
    "block2.0.bias",
    "block2.1.weight",
    "block2.1.bias",
    "fc.weight",
    "fc.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
}

# input side and penultimate width of each registered model
SIZES = {"lenet": (28, 84), "smallcnn": (8, 64), "resnet18_cifar": (16, 512)}


def _input(side: int, in_chans: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, in_chans, side, side, generator=torch.Generator().manual_seed(seed))


def test_lenet_keeps_the_seed_parameter_names() -> None:
    m = build_model("lenet", 10, 1)
    assert {n for n, _ in m.named_parameters()} == LENET_PARAMS
    assert m.fc.in_features == 256 and m.fc2.out_features == 10
    assert m.get_classifier() is m.fc2


def test_registered_models() -> None:
    assert {"lenet", "smallcnn", "resnet18_cifar"} <= set(MODELS)


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("in_chans,num_classes", [(1, 10), (3, 7)])
def test_output_shapes_and_penultimate_features(name: str, in_chans: int, num_classes: int) -> None:
    side, width = SIZES[name]
    torch.manual_seed(0)
    m = build_model(name, num_classes, in_chans).eval()
    x = _input(side, in_chans)
    seen: list[torch.Tensor] = []
    hook = m.get_classifier().register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    with torch.no_grad():
        logits = m(x)
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
    hook.remove()
    assert logits.shape == (3, num_classes)
    assert feats.shape == (3, width)
    # pre-logits output is exactly what the classifier layer receives
    assert len(seen) == 1 and torch.equal(seen[0], feats)
    assert torch.equal(features(m, x), feats)
    assert torch.allclose(m.get_classifier()(feats), logits, atol=1e-6)
    assert torch.equal(m.forward_head(m.forward_features(x)), logits)


def test_resnet18_cifar_stem() -> None:
    m = build_model("resnet18_cifar", 10, 3)
    conv = m.conv1
    assert isinstance(conv, nn.Conv2d)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert conv.in_channels == 3 and conv.out_channels == 64
    assert isinstance(m.maxpool, nn.Identity)
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in m.modules())
    with torch.no_grad():  # 16x16 -> 2x2 after the three stride-2 stages (ImageNet stem: 1x1)
        assert m.forward_features(torch.zeros(1, 3, 16, 16)).shape == (1, 512, 2, 2)
    assert build_model("resnet18_cifar", 10, 1).conv1.in_channels == 1


def test_timm_fallback() -> None:
    m = build_model("test_resnet", 5, 1).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
        assert features(m, torch.zeros(2, 1, 32, 32)).shape[0] == 2


def test_unknown_model_lists_valid_ones() -> None:
    with pytest.raises(UserError) as e:
        build_model("nope", 10, 1)
    msg = str(e.value)
    assert "'nope'" in msg and "timm" in msg and "\n" not in msg
    for name in ("lenet", "smallcnn", "resnet18_cifar"):
        assert name in msg
    with pytest.raises(UserError, match="did you mean 'lenet'"):
        build_model("lenett", 10, 1)


# ------------------------------------------------------------------------------ checkpoints


def _perturb_batchnorm(m: nn.Module, x: torch.Tensor) -> None:
    """Move BN running statistics away from their defaults so a lost buffer shows."""
    m.train()
    with torch.no_grad():
        for k in range(3):
            m(x * (k + 2) + k)
    m.eval()


@pytest.mark.parametrize(
    "name,in_chans,side", [("lenet", 1, 28), ("smallcnn", 1, 8), ("resnet18_cifar", 3, 8)]
)
def test_checkpoint_round_trip_is_bit_exact(
    tmp_path: Path, name: str, in_chans: int, side: int
) -> None:
    torch.manual_seed(1)
    m = build_model(name, 10, in_chans)
    x = _input(side, in_chans, n=4, seed=2)
    _perturb_batchnorm(m, x)
    with torch.no_grad():
        want = m(x)
    meta = {"model": name, "num_classes": 10, "in_chans": in_chans, "note": "hello"}
    forget = torch.tensor([2, 5, 11])
    weights = save_checkpoint(tmp_path / "m", m, meta, forget)
    assert weights == tmp_path / "m.safetensors"
    assert checkpoint_exists(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.json",
        "m.safetensors",
        "m_forget.json",
    ]
    forget_file = tmp_path / "m_forget.json"
    assert json.loads(forget_file.read_text()) == [2, 5, 11]
    for given in (tmp_path / "m", tmp_path / "m.safetensors", str(tmp_path / "m.json")):
        loaded, got_meta = load_checkpoint(given)
        # the hashes the sidecar records are checked in tests/test_integrity.py
        files = {"weights": file_record(weights), "forget_file": file_record(forget_file)}
        names = {"weights": "m.safetensors", "forget_file": "m_forget.json", "files": files}
        assert {k: v for k, v in got_meta.items() if k != "sidecar_sha256"} == meta | names
        assert read_meta(given) == got_meta
        assert forget_indices_of(given) == [2, 5, 11]
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
        sd, ld = m.state_dict(), loaded.state_dict()
        assert sd.keys() == ld.keys()
        assert all(torch.equal(sd[k], ld[k]) for k in sd)
    # control: a fresh model of the same architecture does not give these logits
    torch.manual_seed(99)
    with torch.no_grad():
        assert not torch.equal(build_model(name, 10, in_chans).eval()(x), want)


def test_checkpoint_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint weights .* not found"):
        load_checkpoint(tmp_path / "absent")
    save_checkpoint(
        tmp_path / "m", build_model("lenet", 10, 1), {"model": "lenet"}, torch.tensor([1])
    )
    (tmp_path / "m.json").unlink()
    assert not checkpoint_exists(tmp_path / "m")
    with pytest.raises(UserError, match="sidecar .* not found"):
        load_checkpoint(tmp_path / "m.safetensors")
