"""``bad_teacher``: distil from a competent teacher on retain and an incompetent one on forget.

Chundawat et al., "Can Bad Teaching Induce Forgetting? Unlearning in Deep Networks Using an
Incompetent Teacher", AAAI 2023. The student (the model being unlearned) is trained on a
shuffled mix of the forget set and a random ``retain_fraction`` of the retain set (their code
keeps 30%); its tempered softmax is pulled by KL towards the competent teacher
(``ctx.original``) on retain samples and towards a randomly initialised copy of the
architecture (seeded with the run's seed) on forget samples (their ``UnlearnerLoss``; here the
KL is averaged per sample, ``batchmean``, rather than per logit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from methods import MethodContext, Monitor, Settings, Trainer, copy_model, register, run_epochs
from training.mask import SaliencyMask


@dataclass(frozen=True)
class BadTeacherArgs:
    # KL temperature of both teachers and the student (paper: 1)
    temperature: float = field(default=1.0, metadata={"search": ("log", 0.5, 8.0)})
    # share of the retain set mixed with forget (paper: 0.3)
    retain_fraction: float = field(default=0.3, metadata={"search": ("float", 0.1, 1.0)})

    def check(self, where: str) -> None:
        if not self.temperature > 0:
            raise UserError(f"{where}temperature = {self.temperature!r}; use a number > 0")
        if not 0 < self.retain_fraction <= 1:
            raise UserError(
                f"{where}retain_fraction = {self.retain_fraction!r}; use a fraction in (0, 1]"
            )


def incompetent_teacher(ctx: MethodContext) -> nn.Module:
    """A randomly initialised model of the base architecture, seeded with the run's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        model = ctx.new_model()
    return copy_model(model)


@register(
    "bad_teacher",
    args=BadTeacherArgs,
    search={"lr": ("log", 1e-5, 1e-2), "epochs": ("int", 1, 5)},
)
def bad_teacher(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Competent teacher on retain, random teacher on forget (Chundawat et al., AAAI 2023)."""
    a = cfg.args
    good, bad = ctx.original, incompetent_teacher(ctx)
    T = a.temperature
    retain = ctx.split.retain
    n_keep = max(1, round(a.retain_fraction * len(retain))) if len(retain) else 0
    keep = retain[torch.randperm(len(retain), generator=ctx.generator)[:n_keep]]
    mixed = torch.cat([ctx.split.forget, keep])

    def loss_fn(x: Tensor, _: Tensor, idx: Tensor) -> Tensor:
        with torch.no_grad():
            forget = ctx.is_forget[idx].unsqueeze(1)
            target = torch.where(forget, F.softmax(bad(x) / T, 1), F.softmax(good(x) / T, 1))
        return F.kl_div(F.log_softmax(model(x) / T, 1), target, reduction="batchmean")

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        return {"kl": tr.pass_over(ctx.batches(mixed, cfg.batch_size), loss_fn)}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)
