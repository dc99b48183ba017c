"""``prune_reinit``: prune almost every weight, re-initialise it, and fine-tune on retain.

A method of the NeurIPS 2023 Machine Unlearning Challenge starter kit (the notebook of seed
000, after Sebastian Oleszko). Its details, kept here:

* ``prune.global_unstructured`` with ``L1Unstructured`` over the weights *and biases* of every
  ``Conv2d`` and ``Linear`` layer: the ``amount`` (0.995) smallest in magnitude, ranked
  globally, are set to zero; batch norm is left alone;
* every zero *weight* (not bias) of those layers is re-drawn uniformly in
  ``[-sqrt(1/fan_in), sqrt(1/fan_in)]``, ``fan_in = in_channels * kernel area`` (conv) or
  ``in_features`` (linear), PyTorch's default init range; pruned biases stay zero;
* fine-tuning on retain with ``CE(outputs, y, weight=class_weights)`` plus
  ``MSE(H(model(x)), H(original(x)))``, the squared difference of the prediction entropies of
  the model and the original model, sample by sample; the class weights are the retain class
  counts to the power ``class_weight_power`` (the kit: ``class_weights ** -0.1``);
* SGD, momentum 0.9, weight decay 5e-4, constant learning rate (the experiment's optimiser
  defaults) for an iteration budget of ``int(len(retain_loader) * epochs)`` batches, where
  the kit uses 3.5 epochs (``budget_epochs``) at lr 5e-4 and batch size 64 on its ResNet-18.

On mnist5k LeNet the re-initialised network needs a larger learning rate and more epochs to
recover (exp/compare.json uses lr 0.05, 8 epochs, batch size 64).

With a saliency mask or ``frozen`` layers, only weights allowed to change are ranked, pruned and
re-drawn; the others keep their values, and the fine-tuning guard keeps them there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from methods import MethodContext, Monitor, Settings, Trainer, register, run_epochs
from training.mask import SaliencyMask
from unlearning._constraints import allowed, allowed_mask


@dataclass(frozen=True)
class PruneReinitArgs:
    # share of conv/linear weights and biases pruned (the kit: 0.995)
    amount: float = field(default=0.995, metadata={"search": ("float", 0.5, 0.995)})
    class_weight_power: float = -0.1  # CE class weights = retain class counts ** power
    # weight of the entropy MSE term (the kit: 1)
    entropy_weight: float = field(default=1.0, metadata={"search": ("log", 0.1, 10.0)})
    # iteration budget in (possibly fractional) passes over retain; 0 = the experiment's epochs
    budget_epochs: float = 0.0

    def check(self, where: str) -> None:
        if not 0 <= self.amount < 1:
            raise UserError(f"{where}amount = {self.amount!r}; use a fraction in [0, 1)")
        if not self.entropy_weight >= 0:
            raise UserError(f"{where}entropy_weight = {self.entropy_weight!r}; use a number >= 0")
        if not self.budget_epochs >= 0:
            raise UserError(f"{where}budget_epochs = {self.budget_epochs!r}; use a number >= 0")


def prunable(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def prune_and_reinit(
    model: nn.Module, amount: float, limit: SaliencyMask | None, generator: torch.Generator
) -> int:
    """Global L1 pruning of conv/linear weights and biases, then re-drawing the zero weights.

    Only entries that ``limit`` allows are ranked and changed. Returns how many were pruned.
    """
    entries: list[tuple[Tensor, Tensor]] = []  # (parameter, allowed entries)
    for mname, m in prunable(model):
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if p is not None:
                entries.append((p, allowed(limit, f"{mname}.{pname}" if mname else pname, p)))
    if not entries:
        return 0
    scores = torch.cat([p.abs()[ok] for p, ok in entries])
    k = round(amount * scores.numel())  # as torch.nn.utils.prune rounds the amount
    prune = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        prune[torch.topk(scores, k, largest=False).indices] = True
    start = 0
    for p, ok in entries:
        n = int(ok.sum())
        cut = torch.zeros_like(ok)
        cut[ok] = prune[start : start + n]
        start += n
        p.masked_fill_(cut, 0.0)
    for mname, m in prunable(model):
        w = m.weight
        ok = allowed(limit, f"{mname}.weight" if mname else "weight", w)
        bound = math.sqrt(1.0 / w[0].numel())
        draw = (torch.rand(w.shape, generator=generator) - 0.5) * 2 * bound
        w.copy_(torch.where((w == 0) & ok, draw.to(w.device, w.dtype), w))
    return k


def entropy(logits: Tensor) -> Tensor:
    return -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1)


@register(
    "prune_reinit",
    args=PruneReinitArgs,
    search={"lr": ("log", 1e-3, 0.2), "epochs": ("int", 1, 10)},
)
def prune_reinit(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Prune 99.5%, re-initialise, fine-tune with entropy matching (NeurIPS 2023 starter kit)."""
    a = cfg.args
    original = ctx.original
    prune_and_reinit(model, a.amount, allowed_mask(model, cfg, mask), ctx.generator)

    retain_y = ctx.labels(ctx.split.retain)
    counts = torch.bincount(retain_y, minlength=ctx.num_classes).float().clamp_min(1)
    class_weights = counts**a.class_weight_power

    steps_per_epoch = ctx.num_batches(len(ctx.split.retain), cfg.batch_size)
    budget_epochs = a.budget_epochs or cfg.epochs
    budget = int(steps_per_epoch * budget_epochs)

    def loss_fn(x: Tensor, y: Tensor, _: Tensor) -> Tensor:
        with torch.no_grad():
            target = entropy(original(x))
        out = model(x)
        return F.cross_entropy(out, y, weight=class_weights) + a.entropy_weight * F.mse_loss(
            entropy(out), target
        )

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        batches = ctx.batches(ctx.split.retain, cfg.batch_size)
        return {"loss": tr.pass_over(islice(batches, max(budget - tr.steps, 0)), loss_fn)}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch, epochs=math.ceil(budget_epochs))
