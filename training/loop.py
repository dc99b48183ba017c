"""The shared training loop: base models, retrain oracles, and the steps every method takes.

SGD with momentum and weight decay under a one-cycle or cosine schedule, best-on-validation
checkpointing with patience, reproducible from one seed (data order, augmentation, init).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import UserError
from datasets import DeviceData
from training.config import TrainConfig
from training.mask import MaskGuard
from training.outputs import accuracy, collect_outputs

EVAL_BATCH = 512


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]]


def make_optimizer(
    params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
    )


def make_scheduler(
    opt: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total_steps = max(total_steps, 1)
    if schedule == "onecycle":
        lr = opt.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total_steps, pct_start=0.25, anneal_strategy="linear"
        )
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def eval_accuracy(model: nn.Module, data: DeviceData, idx: Tensor, source: str = "train") -> float:
    if len(idx) == 0:
        return math.nan
    return accuracy(collect_outputs(model, data.batches(idx, EVAL_BATCH, source=source)))


def step(
    loss: Tensor,
    opt: torch.optim.Optimizer,
    guard: MaskGuard | None = None,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """One optimiser step; the guard keeps masked and frozen weights exactly where they were."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if guard is not None:
        guard.before_step()
    opt.step()
    if guard is not None:
        guard.after_step()
    if sched is not None:
        sched.step()


def fit(
    model: nn.Module,
    data: DeviceData,
    train_idx: Tensor,
    val_idx: Tensor,
    cfg: TrainConfig,
    *,
    desc: str = "train",
    on_batch: Callable[[Tensor], None] | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train on `train_idx` with cross-entropy; keep the weights of the best validation epoch."""
    if len(train_idx) == 0:
        raise UserError(f"{desc}: nothing to train on (the training set is empty)")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    steps = data.num_batches(len(train_idx), cfg.batch_size)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs * steps)
    best_acc, best_epoch, best_state = -1.0, 0, None
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", disable=None, leave=False)
    for epoch in bar:
        model.train()
        total, n = 0.0, 0
        batches = data.batches(
            train_idx, cfg.batch_size, shuffle=True, augment=cfg.augment, generator=g
        )
        for x, y, bi in tqdm(batches, total=steps, desc="batches", disable=None, leave=False):
            if on_batch is not None:
                on_batch(bi)
            loss = F.cross_entropy(model(x), y)
            step(loss, opt, sched=sched)
            total += loss.item() * len(y)
            n += len(y)
        val_acc = eval_accuracy(model, data, val_idx)
        row = {"epoch": epoch, "train_loss": total / n, "val_acc": val_acc}
        history.append(row)
        if log is not None:
            log(row)
        bar.set_postfix(loss=f"{total / n:.3f}", val=f"{val_acc:.3f}")
        if math.isnan(val_acc) or val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif cfg.patience and epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(
        best_epoch=best_epoch,
        best_val_acc=best_acc,
        epochs_run=len(history),
        seconds=time.perf_counter() - start,
        history=history,
    )
