"""``scrub``: SCalable Remembering and Unlearning unBound, teacher-student unlearning.

Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023. The student (the model
being unlearned) starts as a copy of the teacher (``ctx.original``). Every epoch first takes,
while ``epoch <= msteps``, a *max* pass over the forget set that maximises
``KL(teacher || student)`` at temperature ``T``, then a *min* pass over the retain set on
``gamma * CE + alpha * KL(teacher || student)`` (the paper's Eq. 3 and the weights of its code:
gamma 0.99, alpha 0.001, kd_T 4, msteps 2, a smaller forget batch than retain batch). The KL is
scaled by ``T**2`` as in their ``DistillKL``.

The max step is unbounded: on LeNet (unnormalised linear layers) SGD makes the logits explode
(about x3 per step at lr 1e-3, collapse to one class); use Adam, e.g. lr 2e-4 with
``"optimizer": {"name": "adam", "weight_decay": 0}`` on mnist5k (exp/compare.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from methods import MethodContext, Monitor, Settings, Trainer, register, run_epochs
from training.mask import SaliencyMask


@dataclass(frozen=True)
class SCRUBArgs:
    T: float = 4.0  # distillation temperature (kd_T)
    # weight of KL(teacher || student) in the min step on retain
    alpha: float = field(default=0.001, metadata={"search": ("log", 1e-4, 1.0)})
    gamma: float = 0.99  # weight of the cross-entropy in the min step on retain
    # the first msteps epochs also take the max step on forget
    msteps: int = field(default=2, metadata={"search": ("int", 1, 5)})
    forget_batch_size: int = 32  # batch size of the max step (their del_batch_size); 0 = batch_size

    def check(self, where: str) -> None:
        if not self.T > 0:
            raise UserError(f"{where}T = {self.T!r}; use a temperature > 0")
        for k in ("alpha", "gamma"):
            if not getattr(self, k) >= 0:
                raise UserError(f"{where}{k} = {getattr(self, k)!r}; use a number >= 0")
        if self.msteps < 0:
            raise UserError(f"{where}msteps = {self.msteps!r}; use an integer >= 0")
        if self.forget_batch_size < 0:
            raise UserError(
                f"{where}forget_batch_size = {self.forget_batch_size!r}; use an integer >= 0"
            )


def distill_kl(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """KL(teacher || student) of the tempered softmaxes, per sample, times T**2 (DistillKL)."""
    return (
        F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), log_target=True,
                 reduction="batchmean") * T**2
    )  # fmt: skip


@register("scrub", args=SCRUBArgs, search={"lr": ("log", 1e-5, 1e-2), "epochs": ("int", 1, 10)})
def scrub(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Teacher-student max steps on forget, min steps on retain (Kurmanji et al., NeurIPS 2023)."""
    a = cfg.args
    teacher = ctx.original
    fbs = a.forget_batch_size or cfg.batch_size

    def kl(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            t = teacher(x)
        s = model(x)
        return distill_kl(s, t, a.T), s

    def min_loss(x: Tensor, y: Tensor, _: Tensor) -> Tensor:
        d, s = kl(x)
        return a.gamma * F.cross_entropy(s, y) + a.alpha * d

    def epoch(tr: Trainer, e: int) -> dict[str, float]:
        stats = {}
        if e <= a.msteps:
            stats["forget_kl"] = -tr.pass_over(
                ctx.batches(ctx.split.forget, fbs), lambda x, y, _: -kl(x)[0]
            )
        stats["retain_loss"] = tr.pass_over(ctx.batches(ctx.split.retain, cfg.batch_size), min_loss)
        return stats

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)
