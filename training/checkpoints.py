"""Checkpoints: safetensors weights, a JSON sidecar, and the forget-index JSON beside them.

``<stem>.safetensors`` holds the weights, ``<stem>.json`` everything needed to rebuild the
model and its split (model, dataset, split seed, forget specification, training recipe,
accuracies, versions), and ``<stem>_forget.json`` the forget set as a plain JSON list of
training-pool indices, which ``train.py --itf`` accepts back.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from core.errors import UserError
from core.io import atomic_write_text
from datasets import write_index_file
from models import build_model


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that training and evaluation depend on."""
    import numpy
    import scipy
    import sklearn
    import timm
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _stem(path: str | Path) -> Path:
    p = Path(path)
    for suffix in (".safetensors", ".json", ".pt"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def save_checkpoint(
    stem: str | Path, model: nn.Module, meta: dict[str, Any], forget: torch.Tensor
) -> Path:
    """Write weights, sidecar and forget-index JSON atomically; return the weights' path."""
    stem = _stem(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_name(stem.name + ".safetensors")
    forget_path = stem.with_name(stem.name + "_forget.json")
    write_index_file(forget_path, forget)
    tmp = weights.with_name(weights.name + ".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, weights)
    meta = meta | {"weights": weights.name, "forget_file": forget_path.name}
    atomic_write_text(stem.with_name(stem.name + ".json"), json.dumps(meta, indent=2))
    return weights


def read_meta(path: str | Path) -> dict[str, Any]:
    stem = _stem(path)
    side = stem.with_name(stem.name + ".json")
    if not side.is_file():
        raise UserError(f"{path}: checkpoint sidecar {side} not found")
    return json.loads(side.read_text())


def checkpoint_exists(path: str | Path) -> bool:
    stem = _stem(path)
    return (
        stem.with_name(stem.name + ".safetensors").is_file()
        and stem.with_name(stem.name + ".json").is_file()
    )


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its sidecar and load the weights (no pickle is ever executed)."""
    stem = _stem(path)
    weights = stem.with_name(stem.name + ".safetensors")
    if not weights.is_file():
        raise UserError(f"{path}: checkpoint weights {weights} not found")
    meta = read_meta(path)
    model = build_model(meta["model"], meta["num_classes"], meta["in_chans"])
    load_model(model, str(weights), device=str(device))
    return model.to(device), meta


def forget_indices_of(path: str | Path) -> list[int]:
    stem = _stem(path)
    return json.loads(stem.with_name(stem.name + "_forget.json").read_text())
