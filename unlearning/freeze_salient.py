"""``freeze_salient``: seed 002's baseline for class replacement.

"Identify which weights are more involved in the prediction of class old, freeze all the rest,
and train with a loss that favours new while penalising old." The involvement of a weight is
scored on the forget set (the samples of ``old``, labelled ``old``) from the gradient of their
cross-entropy, accumulated over the whole set: ``|w * g|`` (``score: "taylor"``, the first-order
estimate of how much the old-class loss changes if the weight is removed) or ``|g|``
(``score: "grad"``, SalUn's saliency). The top ``keep`` fraction of all weights (ranked globally)
may change; every other weight stays bit-identical (a mask, combined with the SalUn mask when
``use_mask`` is set and with ``frozen``). Each step then minimises

* ``new_weight * CE`` on a batch of ``new`` samples labelled with ``old``'s output slot (their
  labels in a replacement run; see scenarios.py),
* ``old_weight * -log(1 - p_old)`` on a batch of ``old`` samples: the probability of ``old``'s
  slot on them is pushed to 0 (a bounded penalty, unlike gradient ascent),
* ``retain_weight * CE`` on a batch of the untouched classes (retain without ``new``), as in the
  seed's own training loop, which keeps all kept classes in its loader; 0 gives the bare
  baseline that relies on the freezing alone.

An epoch is one pass over the ``new`` samples (over the forget set outside class replacement,
where there is no ``new`` and only the penalty and the retain term remain).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import UserError
from methods import MethodContext, Monitor, Settings, Trainer, register, run_epochs
from training.mask import SaliencyMask

SCORES = ("taylor", "grad")


@dataclass(frozen=True)
class FreezeSalientArgs:
    keep: float = 0.1  # fraction of all weights (most involved in the old class) that may change
    score: str = "taylor"  # involvement of a weight: "taylor" |w * g| or "grad" |g|
    new_weight: float = 1.0  # cross-entropy of new samples in old's output slot
    old_weight: float = 1.0  # penalty -log(1 - p_old) on old samples
    retain_weight: float = 1.0  # cross-entropy on the untouched classes

    def check(self, where: str) -> None:
        if not 0 < self.keep <= 1:
            raise UserError(f"{where}keep = {self.keep!r}; use a fraction in (0, 1]")
        if self.score not in SCORES:
            raise UserError(f"{where}score = {self.score!r}; use one of {', '.join(SCORES)}")
        for k in ("new_weight", "old_weight", "retain_weight"):
            if not getattr(self, k) >= 0:
                raise UserError(f"{where}{k} = {getattr(self, k)!r}; use a number >= 0")


def involvement_mask(
    model: nn.Module, ctx: MethodContext, keep: float, score: str, frozen: Sequence[str], bs: int
) -> SaliencyMask:
    """Keep the `keep` fraction of weights most involved in the forget set's predictions."""
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y, _ in tqdm(ctx.in_order(ctx.split.forget, bs), desc="involvement",
                        disable=None, leave=False):  # fmt: skip
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        for n, p in params.items():
            if p.grad is not None:
                grads[n] += p.grad
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    scores = {
        n: (g * params[n].detach()).abs() if score == "taylor" else g.abs()
        for n, g in grads.items()
    }
    if frozen:
        movable = SaliencyMask.frozen(model, frozen).masks
        for n, s in scores.items():
            s[~movable[n]] = -1.0  # frozen weights never count among the kept ones
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, round(keep * int((flat >= 0).sum())))
    cut = torch.topk(flat, k, sorted=True).values[-1]
    cut = cut.clamp_min(torch.finfo(cut.dtype).tiny) if cut <= 0 else cut
    return SaliencyMask({n: s >= cut for n, s in scores.items()}, keep)


def penalty_old(logits: Tensor, y: Tensor) -> Tensor:
    """Mean -log(1 - p_y): pushes the probability of the label's slot to 0, bounded below."""
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


@register("freeze_salient", args=FreezeSalientArgs)
def freeze_salient(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Train only the weights most involved in the old class: favour new, penalise old."""
    a: FreezeSalientArgs = cfg.args
    split = ctx.split
    if len(split.forget) == 0:
        raise UserError("freeze_salient: the forget set is empty")
    keep = involvement_mask(model, ctx, a.keep, a.score, cfg.frozen, cfg.batch_size)
    full = keep.combine(mask)
    new = split.new
    untouched = split.retain[~torch.isin(split.retain, new)] if len(new) else split.retain

    old_batches = ctx.cycle(split.forget, cfg.batch_size)
    retain_batches = (
        ctx.cycle(untouched, cfg.batch_size) if len(untouched) and a.retain_weight else None
    )
    lead = new if len(new) else split.forget

    def epoch(tr: Trainer, _epoch: int) -> dict[str, float]:
        stats = {"new_loss": 0.0, "old_penalty": 0.0, "retain_loss": 0.0}
        n = 0
        for x, y, _ in ctx.batches(lead, cfg.batch_size):
            xo, yo, _ = next(old_batches)
            parts = [x, xo] if len(new) else [xo]
            if retain_batches is not None:
                xr, yr, _ = next(retain_batches)
                parts.append(xr)
            logits = model(torch.cat(parts))
            sizes = [len(p) for p in parts]
            chunks = list(logits.split(sizes))
            loss = torch.zeros((), device=logits.device)
            if len(new):
                new_loss = F.cross_entropy(chunks.pop(0), y)
                loss = loss + a.new_weight * new_loss
                stats["new_loss"] += float(new_loss.detach())
            pen = penalty_old(chunks.pop(0), yo)
            loss = loss + a.old_weight * pen
            stats["old_penalty"] += float(pen.detach())
            if retain_batches is not None:
                rl = F.cross_entropy(chunks.pop(0), yr)
                loss = loss + a.retain_weight * rl
                stats["retain_loss"] += float(rl.detach())
            tr.step(loss)
            n += 1
        return {k: v / max(n, 1) for k, v in stats.items()}

    return run_epochs(model, ctx, cfg, full, monitor, epoch)
