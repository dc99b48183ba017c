"""Unlearning methods, one registry, one signature: ``fn(model, ctx, cfg, mask=None) -> model``.

``ctx`` (:class:`MethodContext`) carries the data, the split, the run's seeded generator and the
original model; ``cfg`` is the experiment (shared settings plus ``cfg.args``, the
method's own dataclass); ``mask`` is a SalUn saliency mask or None. The epoch loop, optimiser,
mask guard and logging live in :func:`run_epochs`, so a method only says what one epoch does.

Core methods as in the SalUn DeepDive study (seed 003) and the SalUn paper (Fan et al., 2024):
``ft`` (fine-tune on retain), ``ga`` / ``ga_small`` (gradient ascent on forget, with or without
descent on retain; Thudi et al. 2022, Graves et al. 2021), ``rl`` / ``rl_split`` (random
labels on forget; Golatkar et al. 2020, the variant SalUn uses), ``retrain`` (exact unlearning).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import UserError, choices, did_you_mean
from datasets import DeviceData, Split
from models import build_model
from training.config import TrainConfig
from training.loop import eval_accuracy, fit, make_optimizer, make_scheduler, step
from training.mask import MaskGuard, SaliencyMask

Method = Callable[..., nn.Module]


@dataclass(frozen=True)
class NoArgs:
    """This method has no method-specific settings."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Method
    args: type
    supports_mask: bool
    doc: str


METHODS: dict[str, MethodSpec] = {}


def register(
    name: str, args: type = NoArgs, supports_mask: bool = True
) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        METHODS[name] = MethodSpec(name, fn, args, supports_mask, doc)
        return fn

    return wrap


def method_spec(name: str, where: str = "") -> MethodSpec:
    if name not in METHODS:
        raise UserError(
            f"{where}key 'method': unknown method '{name}'{did_you_mean(name, METHODS)}; "
            f"valid methods: {choices(METHODS)}"
        )
    return METHODS[name]


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimiser of an unlearning run, shared by every method that takes gradient steps."""

    name: str = "sgd"  # sgd or adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"


@dataclass(frozen=True)
class Settings:
    """What the experiment asks of a method: shared training settings plus its own ``args``.

    Built once by the running layer from the validated experiment; a method never changes it
    (a method that needs another epoch count says so in its ``args``).
    """

    method: str
    lr: float = 0.01
    epochs: int = 5
    batch_size: int = 128
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    frozen: tuple[str, ...] = ()
    args: Any = None  # the method's own frozen dataclass (``NoArgs`` when it has none)


class Monitor:
    """The runner's side of a run: per-epoch logging and the time it costs.

    Methods report each epoch through :meth:`epoch`; the seconds spent evaluating and logging
    there are bookkeeping, excluded from the unlearning time (``excluded_seconds``).
    """

    def __init__(
        self, log: Callable[[dict[str, float]], None] | None = None, quiet: bool = True
    ) -> None:
        self.log = log
        self.quiet = quiet
        self.excluded_seconds = 0.0
        self.rows: list[dict[str, float]] = []

    def epoch(self, method: str, model: nn.Module, ctx: MethodContext, row: dict[str, Any]) -> None:
        start = time.perf_counter()
        row = dict(row)
        row["forget_acc"] = eval_accuracy(model, ctx.data, ctx.split.forget)
        row["val_acc"] = eval_accuracy(model, ctx.data, ctx.split.val)
        self.rows.append(row)
        if not self.quiet:
            text = "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
            tqdm.write(f"    {method} {text}", file=sys.stderr)
        if self.log is not None:
            self.log(row)
        self.excluded_seconds += time.perf_counter() - start


@dataclass
class MethodContext:
    """Everything a method may use besides the model and its settings (read-only inputs)."""

    data: DeviceData
    split: Split
    seed: int
    original: nn.Module  # the model before unlearning, frozen, for methods that compare to it
    base_recipe: TrainConfig  # how the base model was trained (retrain reuses it)
    base_model: str  # the base model's registered architecture name
    generator: torch.Generator = field(init=False)
    is_forget: Tensor = field(init=False)  # bool over the pool, on the data's device

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        mask = torch.zeros(len(self.data.raw.train_y), dtype=torch.bool)
        mask[self.split.forget] = True
        self.is_forget = mask.to(self.data.device)

    @classmethod
    def from_sidecar(
        cls, data: DeviceData, split: Split, seed: int, original: nn.Module, meta: dict[str, Any]
    ) -> MethodContext:
        """The context of a run on the base checkpoint described by sidecar `meta`."""
        return cls(data, split, seed, original, TrainConfig.from_json(meta["train"]), meta["model"])

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def device(self) -> torch.device:
        return self.data.device

    def labels(self, idx: Tensor) -> Tensor:
        """Training labels of pool indices, on the data's device."""
        return self.data.y["train"][idx.to(self.data.device)]

    def batches(
        self, idx: Tensor, batch_size: int, augment: bool = True
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """A shuffled, augmented pass over pool indices, drawn from the run's generator."""
        return self.data.batches(
            idx, batch_size, shuffle=True, augment=augment, generator=self.generator
        )

    def cycle(self, idx: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Endless shuffled passes, for pairing a small set with a large one."""
        while True:
            yield from self.batches(idx, batch_size)

    def wrong_labels(self, y: Tensor) -> Tensor:
        """A uniformly random label different from the true one, for every sample."""
        shift = torch.randint(1, self.num_classes, y.shape, generator=self.generator)
        return (y + shift.to(y.device)) % self.num_classes


class Trainer:
    """Optimiser, schedule and mask guard of one unlearning run."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Settings,
        mask: SaliencyMask | None,
        params: list[nn.Parameter] | None = None,
        epochs: int | None = None,
    ) -> None:
        o = cfg.optimizer
        params = params if params is not None else list(model.parameters())
        if o.name == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=cfg.lr, weight_decay=o.weight_decay
            )
        else:
            self.opt = make_optimizer(params, cfg.lr, o.momentum, o.weight_decay)
        self.sched = make_scheduler(
            self.opt, o.schedule, max(cfg.epochs if epochs is None else epochs, 1)
        )
        frozen = SaliencyMask.frozen(model, cfg.frozen) if cfg.frozen else None
        full = mask.combine(frozen) if mask is not None else frozen
        self.guard = MaskGuard(model, self.opt, full) if full is not None else None
        self.steps = 0

    def step(self, loss: Tensor) -> float:
        step(loss, self.opt, self.guard)
        self.steps += 1
        return float(loss.detach())

    def pass_over(
        self, batches: Iterator[tuple[Tensor, Tensor, Tensor]], loss_fn: Callable[..., Tensor]
    ) -> float:
        """One pass: a step per batch; returns the mean loss per sample."""
        total, n = 0.0, 0
        for x, y, idx in batches:
            total += self.step(loss_fn(x, y, idx)) * len(y)
            n += len(y)
        return total / max(n, 1)


def run_epochs(
    model: nn.Module,
    ctx: MethodContext,
    cfg: Settings,
    mask: SaliencyMask | None,
    monitor: Monitor,
    epoch_fn: Callable[[Trainer, int], dict[str, float]],
    params: list[nn.Parameter] | None = None,
    epochs: int | None = None,
) -> nn.Module:
    """The loop every gradient-based method shares: epochs, logging, schedule, mask guard.

    ``epochs`` overrides ``cfg.epochs`` for methods whose budget is set by their own args.
    """
    n = cfg.epochs if epochs is None else epochs
    tr = Trainer(model, cfg, mask, params, epochs=n)
    for epoch in tqdm(range(1, n + 1), desc=cfg.method, disable=None, leave=False):
        model.train()
        stats = epoch_fn(tr, epoch)
        tr.sched.step()
        monitor.epoch(
            cfg.method, model, ctx, {"epoch": epoch, "lr": tr.opt.param_groups[0]["lr"]} | stats
        )
    return model


def ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------------
# Core methods


@register("ft")
def finetune(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
):
    """Fine-tune on the retain set (Warnecke et al. 2023; catastrophic forgetting of forget)."""

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        loss = tr.pass_over(
            ctx.batches(ctx.split.retain, cfg.batch_size), lambda x, y, _: ce(model, x, y)
        )
        return {"retain_loss": loss}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@dataclass(frozen=True)
class GAArgs:
    ascent_weight: float = 1.0  # scales the ascent step on forget against the descent on retain

    def check(self, where: str) -> None:
        if not self.ascent_weight > 0:
            raise UserError(f"{where}ascent_weight = {self.ascent_weight!r}; use a number > 0")


@register("ga", args=GAArgs)
def gradient_ascent(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
):
    """Gradient ascent on forget and descent on retain in the same step (NegGrad+, Kurmanji 2023).

    Each step pairs a forget batch with the next retain batch and descends on
    ``CE(retain) - ascent_weight * CE(forget)``; one epoch is one pass over the forget set.
    """
    w = cfg.args.ascent_weight

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        retain = ctx.cycle(ctx.split.retain, cfg.batch_size)
        fl, rl, n = 0.0, 0.0, 0
        for x, y, _ in ctx.batches(ctx.split.forget, cfg.batch_size):
            xr, yr, _ = next(retain)
            lf, lr_ = ce(model, x, y), ce(model, xr, yr)
            tr.step(lr_ - w * lf)
            fl, rl, n = fl + lf.item(), rl + lr_.item(), n + 1
        return {"forget_loss": fl / max(n, 1), "retain_loss": rl / max(n, 1)}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("ga_small", args=GAArgs)
def gradient_ascent_small(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
):
    """Gradient ascent on the forget set only (Thudi et al. 2022)."""
    w = cfg.args.ascent_weight

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        loss = tr.pass_over(
            ctx.batches(ctx.split.forget, cfg.batch_size), lambda x, y, _: -w * ce(model, x, y)
        )
        return {"forget_loss": -loss / w}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("rl")
def random_label(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
):
    """Random labels on forget, trained together with retain in one pass (Golatkar et al. 2020)."""
    both = torch.sort(torch.cat([ctx.split.forget, ctx.split.retain])).values

    def loss_fn(x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        y = torch.where(ctx.is_forget[idx], ctx.wrong_labels(y), y)
        return ce(model, x, y)

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        return {"loss": tr.pass_over(ctx.batches(both, cfg.batch_size), loss_fn)}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("rl_split")
def random_label_split(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
):
    """Each epoch: a pass over forget with fresh random labels, then one over retain (SalUn)."""

    def epoch(tr: Trainer, _: int) -> dict[str, float]:
        fl = tr.pass_over(
            ctx.batches(ctx.split.forget, cfg.batch_size),
            lambda x, y, _: ce(model, x, ctx.wrong_labels(y)),
        )
        rl = tr.pass_over(
            ctx.batches(ctx.split.retain, cfg.batch_size), lambda x, y, _: ce(model, x, y)
        )
        return {"forget_loss": fl, "retain_loss": rl}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("retrain", supports_mask=False)
def retrain(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
):
    """Exact unlearning: a fresh model trained on retain with the base model's recipe.

    The run's seed replaces the recipe's, so retrain rows show the seed-to-seed spread of the
    oracle itself. The experiment's lr and epochs are ignored: the recipe is the point.
    """

    tcfg = dataclasses.replace(ctx.base_recipe, seed=ctx.seed)
    torch.manual_seed(ctx.seed)
    fresh = build_model(ctx.base_model, ctx.num_classes, ctx.data.raw.in_chans)
    fresh = fresh.to(ctx.device)
    fit(fresh, ctx.data, ctx.split.retain, ctx.split.val, tcfg, desc="retrain")
    return fresh


def unlearn(
    model: nn.Module,
    ctx: MethodContext,
    settings: Settings,
    mask: SaliencyMask | None = None,
    monitor: Monitor | None = None,
) -> nn.Module:
    """Run the method `settings.method` on `model`: the one call the runner makes."""
    spec = method_spec(settings.method)
    return spec.fn(model, ctx, settings, mask, monitor if monitor is not None else Monitor())


def copy_model(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


__all__ = [
    "METHODS",
    "MethodSpec",
    "NoArgs",
    "Trainer",
    "MethodContext",
    "ce",
    "copy_model",
    "unlearn",
    "method_spec",
    "register",
    "run_epochs",
]
