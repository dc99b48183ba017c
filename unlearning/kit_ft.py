"""``kit_ft``: the NeurIPS 2023 unlearning challenge kit's example, run through the kit adapter.

The starter kit's baseline (Triantafillou et al., NeurIPS 2023 Machine Unlearning Challenge):
fine-tune on the retain set with cross-entropy, SGD (momentum 0.9, weight decay 5e-4) and a
cosine schedule, written in the kit's style (``unlearning(net, retain_loader, forget_loader,
val_loader)``, its own optimiser and loop) and registered with
:func:`unlearning.kit.register_challenge_method`, so it exercises the adapter. The experiment's
lr, epochs and optimizer do not apply (declared: setting them is an error); ``method_args``
``epochs`` and ``lr`` do (kit defaults: 5, 0.001).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn, optim

from core.errors import UserError
from unlearning.kit import register_challenge_method


@dataclass(frozen=True)
class KitFTArgs:
    # passes over retain (the kit: 5)
    epochs: int = field(default=5, metadata={"search": ("int", 1, 10)})
    # SGD learning rate, cosine-annealed to 0 (the kit: 0.001)
    lr: float = field(default=0.001, metadata={"search": ("log", 1e-4, 0.1)})

    def check(self, where: str) -> None:
        if self.epochs < 0:
            raise UserError(f"{where}epochs = {self.epochs!r}; use an integer >= 0")
        if not self.lr > 0:
            raise UserError(f"{where}lr = {self.lr!r}; use a number > 0")


def unlearning(net, retain, forget, validation, epochs=5, lr=0.001):
    """Fine-tune on retain, the NeurIPS 2023 kit's example, via the challenge adapter."""
    device = next(net.parameters()).device
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    net.train()
    for _ in range(epochs):
        for inputs, targets in retain:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
        scheduler.step()
    net.eval()
    return net


register_challenge_method("kit_ft", unlearning, args=KitFTArgs)
