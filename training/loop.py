"""The shared training loop: base models, retrain oracles, and the steps every method takes.

SGD with momentum and weight decay under a one-cycle or cosine schedule, best-on-validation
checkpointing with patience, reproducible from one seed (data order, augmentation, init).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import UserError
from core.progress import inner_bars_disabled
from datasets import DeviceData
from training.config import TrainConfig
from training.cost import Work, count_work
from training.mask import MaskGuard
from training.outputs import accuracy, collect_outputs
from training.precision import (
    autocast,
    channels_last,
    contiguous,
    grad_scaler,
    loss_accumulator,
)

EVAL_BATCH = 512


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]]
    # what the training computed (training/cost.py): its backward passes are the samples the
    # loop drew, its forward-only passes the validation passes
    work: Work = field(default_factory=Work)


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
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One optimiser step; the guard keeps masked and frozen weights exactly where they were.
    With a float16 gradient `scaler` (training.precision) the loss is scaled before backward."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if guard is not None:
        guard.before_step()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
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
    """Train on `train_idx` with cross-entropy; keep the weights of the best validation epoch.

    On CUDA the steps run in mixed precision and a conv net in channels_last layout
    (training.precision); the epoch's loss is summed on the device and read once per epoch.
    The result's ``work`` counts the samples trained on, the validation passes (forward only)
    and the optimiser steps (training/cost.py).
    """
    if len(train_idx) == 0:
        raise UserError(f"{desc}: nothing to train on (the training set is empty)")
    scaler = grad_scaler(data.device)
    nhwc = channels_last(model, data.device)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    steps = data.num_batches(len(train_idx), cfg.batch_size)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs * steps)
    best_acc, best_epoch, best_state = -1.0, 0, None
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", disable=inner_bars_disabled(),
               leave=False)  # fmt: skip
    with count_work() as work:
        for epoch in bar:
            model.train()
            total, n = loss_accumulator(data.device), 0
            batches = data.batches(
                train_idx, cfg.batch_size, shuffle=True, augment=cfg.augment, generator=g
            )
            inner = tqdm(batches, total=steps, desc="batches", disable=inner_bars_disabled(),
                         leave=False)  # fmt: skip
            for x, y, bi in inner:
                if on_batch is not None:
                    on_batch(bi)
                with autocast(data.device):
                    loss = F.cross_entropy(model(x), y)
                step(loss, opt, sched=sched, scaler=scaler)
                total += loss.detach().to(total.dtype) * len(y)  # no host sync per step
                n += len(y)
            train_loss = float(total) / n
            val_acc = eval_accuracy(model, data, val_idx)
            row = {"epoch": epoch, "train_loss": train_loss, "val_acc": val_acc}
            history.append(row)
            if log is not None:
                log(row)
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_acc:.3f}")
            if math.isnan(val_acc) or val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif cfg.patience and epoch - best_epoch >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    if nhwc:
        contiguous(model)
    return FitResult(
        best_epoch=best_epoch,
        best_val_acc=best_acc,
        epochs_run=len(history),
        seconds=work.wall_seconds,
        history=history,
        work=work,
    )
