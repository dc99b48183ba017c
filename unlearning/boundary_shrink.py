"""``boundary_shrink``: relabel forget samples to their nearest wrong class, then fine-tune.

Chen et al., "Boundary Unlearning: Rapid Forgetting of Deep Networks via Shifting the Decision
Space", CVPR 2023 (Boundary Shrink). For every forget batch, a small L-inf adversarial attack on
the original model (``ctx.original``, frozen) pushes x towards higher loss: ``steps`` signed
gradient steps of size ``eps / steps`` in normalised input space (one step = FGSM; their code
uses 5 PGD steps within 0.1). The original model's prediction on the perturbed input, the true
label excluded, is the nearest wrong class and becomes the new label; the model is then trained
with cross-entropy on the forget set with these labels. Only the forget set is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from methods import MethodContext, Monitor, Settings, Trainer, ce, register, run_epochs
from training.mask import SaliencyMask


@dataclass(frozen=True)
class BoundaryShrinkArgs:
    # L-inf bound of the attack in normalised input units (paper code: 0.1)
    eps: float = field(default=0.1, metadata={"search": ("log", 0.01, 1.0)})
    # attack steps of size eps / steps; 1 = FGSM
    steps: int = field(default=1, metadata={"search": ("int", 1, 5)})

    def check(self, where: str) -> None:
        if not self.eps > 0:
            raise UserError(f"{where}eps = {self.eps!r}; use a number > 0")
        if self.steps < 1:
            raise UserError(f"{where}steps = {self.steps!r}; use an integer >= 1")


def nearest_wrong_label(net: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int) -> Tensor:
    """The class the net predicts after a small loss-increasing attack, never the true one."""
    step = eps / steps
    adv = x.detach().clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(adv), y), adv)
        adv = (x + (adv.detach() + step * g.sign() - x).clamp(-eps, eps)).detach()
    with torch.no_grad():
        logits = net(adv)
    return logits.scatter(1, y.unsqueeze(1), float("-inf")).argmax(1)


@register(
    "boundary_shrink",
    args=BoundaryShrinkArgs,
    search={"lr": ("log", 1e-5, 1e-2), "epochs": ("int", 1, 10)},
)
def boundary_shrink(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Fine-tune forget on nearest-wrong-class labels from an attack (Chen et al., CVPR 2023)."""
    a = cfg.args
    original = ctx.original

    def loss_fn(x: Tensor, y: Tensor, _: Tensor) -> Tensor:
        return ce(model, x, nearest_wrong_label(original, x, y, a.eps, a.steps))

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        return {"forget_loss": tr.pass_over(ctx.batches(ctx.split.forget, cfg.batch_size), loss_fn)}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)
