"""Models by name: the project's small-image models, else any timm model.

Every model exposes timm's ``forward_features`` / ``forward_head(x, pre_logits=...)`` split, so
feature extraction works the same way for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import timm
import torch
from torch import Tensor, nn

from core.errors import UserError, did_you_mean

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        MODELS[name] = fn
        return fn

    return wrap


class LeNet(nn.Module):
    """The LeNet of the Fashion-MNIST unlearning challenge (seed 001), parameter names included.

    Two conv blocks (conv-BN-ReLU-maxpool) and three linear layers ``fc``, ``fc1``, ``fc2``;
    the challenge forbids changing ``fc2``, which the ``frozen`` experiment key reproduces.
    Built for 28x28 inputs (latent 16x4x4 = 256).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5, stride=1, padding=0),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(6, 16, kernel_size=5, stride=1, padding=0),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.fc = nn.Linear(256, 120)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(120, 84)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(84, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        return self.block2(self.block1(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.relu1(self.fc1(self.relu(self.fc(x.reshape(x.size(0), -1)))))
        return x if pre_logits else self.fc2(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc2


class SmallCNN(nn.Module):
    """A small conv net for tiny images (scikit-learn's 8x8 digits and similar)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(2 * width, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


@register("lenet")
def lenet(num_classes: int, in_chans: int) -> nn.Module:
    return LeNet(num_classes, in_chans)


@register("smallcnn")
def smallcnn(num_classes: int, in_chans: int) -> nn.Module:
    return SmallCNN(num_classes, in_chans)


@register("resnet18_cifar")
def resnet18_cifar(num_classes: int, in_chans: int) -> nn.Module:
    """ResNet-18 adapted to 32x32 images as in the SalUn code: 3x3 stride-1 stem, no max-pool."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    """A fresh model: one of MODELS, else a timm architecture (never pretrained weights)."""
    if name in MODELS:
        return MODELS[name](num_classes, in_chans)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    known = list(MODELS) + timm.list_models()
    raise UserError(
        f"unknown model '{name}'{did_you_mean(name, known)}; valid models: "
        f"{', '.join(sorted(MODELS))} or any timm architecture (timm.list_models())"
    )


@torch.no_grad()
def features(model: nn.Module, x: Tensor) -> Tensor:
    """Penultimate-layer features (timm's forward_features + pre-logits head)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]


def name_under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether a parameter name lies under one of the prefixes: `fc2` matches `fc2.weight`,
    not `fc20.weight`; a trailing dot on a prefix is ignored."""
    for prefix in prefixes:
        p = prefix.rstrip(".")
        if name == p or name.startswith(p + "."):
            return True
    return False
