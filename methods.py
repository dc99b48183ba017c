"""Unlearning methods, one registry, one signature: ``fn(model, ctx, cfg, mask, monitor) -> model``.

``ctx`` (:class:`MethodContext`) carries the data, the split, the run's seeded generators, the
original model and the base recipe, with the helpers a method may use (batches, labels, a fresh
model); ``cfg`` (:class:`Settings`) holds the shared training settings plus ``cfg.args``, the
method's own dataclass; ``mask`` is a SalUn saliency mask or None; ``monitor`` (:class:`Monitor`)
is the runner's per-epoch logging. The epoch loop, optimiser, mask guard and logging live in
:func:`run_epochs`, so a method only says what one epoch does. A method that does not use a
shared setting declares it (``register(..., ignores=("lr", "epochs"))``), so an experiment that
sets it is told so instead of being silently ignored.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from core import rng
from core.errors import UserError, choices, did_you_mean
from core.progress import inner_bars_disabled
from datasets import DeviceData, Split
from models import build_model
from training.config import TrainConfig
from training.cost import Work, count_work, not_counted
from training.loop import eval_accuracy, fit, make_scheduler, step
from training.mask import MaskGuard, SaliencyMask, constraint, frozen_statistics
from training.precision import autocast, grad_scaler, loss_accumulator

Method = Callable[..., nn.Module]


@dataclass(frozen=True)
class NoArgs:
    """This method has no method-specific settings."""


# the shared settings a method may declare it does not use (fields of Settings)
IGNORABLE = ("lr", "epochs", "batch_size", "optimizer")
# the shared settings a method may declare a search range for (running/tune.py); a method's own
# settings declare theirs next to their dataclass fields: field(..., metadata={"search": r})
SEARCHABLE = ("lr", "epochs")
# a range r: ("log", lo, hi) log-uniform float, ("float", lo, hi), ("int", lo, hi), or
# ("choice", a, b, ...); see running/tune.py
SEARCH_KINDS = ("log", "float", "int", "choice")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Method
    args: type
    supports_mask: bool
    doc: str
    ignores: tuple[str, ...] = ()  # shared settings (IGNORABLE) the method never reads
    # tuning ranges of the shared settings (SEARCHABLE): {"lr": ("log", 1e-4, 1e-2), ...}
    search: dict[str, tuple[Any, ...]] = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    args: type = NoArgs,
    supports_mask: bool = True,
    ignores: Sequence[str] = (),
    search: dict[str, tuple[Any, ...]] | None = None,
) -> Callable[[Method], Method]:
    """Register ``fn`` as method ``name``; ``ignores`` names the shared settings it never reads
    (its budget comes from its own ``args`` or from elsewhere), so setting them is an error;
    ``search`` gives the tuning ranges of the shared settings it reads (running/tune.py)."""
    unknown = [k for k in ignores if k not in IGNORABLE]
    if unknown:
        raise ValueError(f"method '{name}': ignores {unknown}; only {IGNORABLE} can be ignored")
    search = dict(search or {})
    bad = [k for k in search if k not in SEARCHABLE or k in ignores]
    if bad:
        raise ValueError(f"method '{name}': search range for {bad}; only for {SEARCHABLE} it reads")

    def wrap(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        METHODS[name] = MethodSpec(name, fn, args, supports_mask, doc, tuple(ignores), search)
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
    # SGD momentum type: Nesterov (this tool's default, which every tuned setting in exp/ and
    # the tests assumes) or plain heavy-ball momentum (False; SalUn's code)
    nesterov: bool = True


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
    # augment the forget batches of the saliency pass that computes the SalUn mask (SalUn's
    # forget loader does); off by default, so a mask depends on the model and forget set only
    mask_augment: bool = False


class Monitor:
    """The runner's side of a run: per-epoch logging and the time it costs.

    Methods report each epoch through :meth:`epoch`; the seconds spent evaluating and logging
    there are bookkeeping, excluded from the unlearning time (``excluded_seconds``) and from
    the counted work. :func:`unlearn` leaves the method's work in ``work`` (training/cost.py).
    """

    def __init__(
        self, log: Callable[[dict[str, float]], None] | None = None, quiet: bool = True
    ) -> None:
        self.log = log
        self.quiet = quiet
        self.excluded_seconds = 0.0
        self.rows: list[dict[str, float]] = []
        self.work: Work | None = None

    def epoch(self, method: str, model: nn.Module, ctx: MethodContext, row: dict[str, Any]) -> None:
        start = time.perf_counter()
        with not_counted():  # its evaluation passes are not the method's work either
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
    # independent streams of the run seed (core/rng.py): data order (and a method's other
    # draws), augmentation, random labels; no two share a permutation
    generator: torch.Generator = field(init=False)
    aug_generator: torch.Generator = field(init=False)
    label_generator: torch.Generator = field(init=False)
    is_forget: Tensor = field(init=False)  # bool over the pool, on the data's device

    def __post_init__(self) -> None:
        self.generator = rng.generator(self.seed, rng.DATA_ORDER)
        self.aug_generator = rng.generator(self.seed, rng.AUGMENT)
        self.label_generator = rng.generator(self.seed, rng.LABELS)
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

    @property
    def retrain_recipe(self) -> TrainConfig:
        """The base model's recipe with the run's seed: how ``retrain`` trains its oracle."""
        return dataclasses.replace(self.base_recipe, seed=self.seed)

    def new_model(self) -> nn.Module:
        """An untrained model of the base architecture on the data's device; its weights are
        drawn from the global RNG (seed it first for a reproducible one)."""
        raw = self.data.raw
        return build_model(self.base_model, raw.num_classes, raw.in_chans).to(self.device)

    def labels(self, idx: Tensor) -> Tensor:
        """Training labels of pool indices, on the data's device."""
        return self.data.y["train"][idx.to(self.data.device)]

    def samples(
        self, idx: Tensor, augment: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Normalised images and labels of pool indices as one batch, in the given order;
        augmentation draws from ``generator``."""
        g = generator if augment else None
        x, y, _ = next(self.data.batches(idx, max(len(idx), 1), augment=augment, generator=g))
        return x, y

    def num_batches(self, n: int, batch_size: int) -> int:
        return self.data.num_batches(n, batch_size)

    def batches(
        self, idx: Tensor, batch_size: int, augment: bool = True
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """A shuffled, augmented pass over pool indices: the order from the run's data-order
        stream, the augmentation from its augmentation stream."""
        return self.data.batches(
            idx, batch_size, shuffle=True, augment=augment, generator=self.generator,
            aug_generator=self.aug_generator,
        )  # fmt: skip

    def in_order(self, idx: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """A pass in index order without augmentation, drawing nothing from the generator:
        for scores and statistics (saliency, Fisher information)."""
        return self.data.batches(idx, batch_size)

    def cycle(
        self, idx: Tensor, batch_size: int, augment: bool = True
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Endless shuffled passes, for pairing a small set with a large one."""
        return self.data.cycle(
            idx, batch_size, augment=augment, generator=self.generator,
            aug_generator=self.aug_generator,
        )  # fmt: skip

    def wrong_labels(self, y: Tensor) -> Tensor:
        """A uniformly random label different from the true one, for every sample."""
        shift = torch.randint(1, self.num_classes, y.shape, generator=self.label_generator)
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
            self.opt = torch.optim.SGD(
                params,
                lr=cfg.lr,
                momentum=o.momentum,
                weight_decay=o.weight_decay,
                nesterov=o.nesterov and o.momentum > 0,
            )
        self.sched = make_scheduler(
            self.opt, o.schedule, max(cfg.epochs if epochs is None else epochs, 1)
        )
        full = constraint(model, mask, cfg.frozen)
        self.guard = MaskGuard(model, self.opt, full) if full is not None else None
        self.steps = 0
        self.device = next(iter(params)).device if params else torch.device("cpu")
        self.scaler = grad_scaler(self.device)  # float16 steps on CUDA only

    def step(self, loss: Tensor) -> Tensor:
        """One step on `loss`; returns it detached, still on the device (reading it with
        ``float()`` waits for the GPU: do that once per epoch, not per step)."""
        step(loss, self.opt, self.guard, scaler=self.scaler)
        self.steps += 1
        return loss.detach()

    def restore_masked(self) -> None:
        """After editing weights directly (a projection, a reset): put the masked and frozen
        weights back to their original values, as after every step."""
        if self.guard is not None:
            self.guard.after_step()

    def pass_over(
        self, batches: Iterator[tuple[Tensor, Tensor, Tensor]], loss_fn: Callable[..., Tensor]
    ) -> float:
        """One pass: a step per batch; returns the mean loss per sample (summed on the
        device, read once)."""
        total, n = loss_accumulator(self.device), 0
        for x, y, idx in batches:
            total += self.step(loss_fn(x, y, idx)).to(total.dtype) * len(y)
            n += len(y)
        return float(total) / max(n, 1)


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
    On CUDA an epoch's forward passes run in mixed precision (training.precision).
    """
    n = cfg.epochs if epochs is None else epochs
    tr = Trainer(model, cfg, mask, params, epochs=n)
    bar = tqdm(range(1, n + 1), desc=cfg.method, disable=inner_bars_disabled(), leave=False)
    for epoch in bar:
        model.train()
        with autocast(ctx.device):
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


@register("ft", search={"lr": ("log", 1e-3, 0.2), "epochs": ("int", 1, 10)})
def finetune(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Fine-tune on the retain set (Warnecke et al. 2023; catastrophic forgetting of forget)."""

    def epoch(tr: Trainer, _epoch: int) -> dict[str, float]:
        loss = tr.pass_over(
            ctx.batches(ctx.split.retain, cfg.batch_size), lambda x, y, _: ce(model, x, y)
        )
        return {"retain_loss": loss}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@dataclass(frozen=True)
class GAArgs:
    # scales the ascent step on forget against the descent on retain
    ascent_weight: float = field(default=1.0, metadata={"search": ("log", 0.1, 10.0)})

    def check(self, where: str) -> None:
        if not self.ascent_weight > 0:
            raise UserError(f"{where}ascent_weight = {self.ascent_weight!r}; use a number > 0")


@register("ga", args=GAArgs, search={"lr": ("log", 1e-5, 1e-2), "epochs": ("int", 1, 10)})
def gradient_ascent(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Gradient ascent on forget and descent on retain in the same step (NegGrad+, Kurmanji 2023).

    Each step pairs a forget batch with the next retain batch and descends on
    ``CE(retain) - ascent_weight * CE(forget)``; one epoch is one pass over the forget set.
    """
    w = cfg.args.ascent_weight

    def epoch(tr: Trainer, _epoch: int) -> dict[str, float]:
        retain = ctx.cycle(ctx.split.retain, cfg.batch_size)
        fl, rl, n = loss_accumulator(ctx.device), loss_accumulator(ctx.device), 0
        for x, y, _ in ctx.batches(ctx.split.forget, cfg.batch_size):
            xr, yr, _ = next(retain)
            lf, lr_ = ce(model, x, y), ce(model, xr, yr)
            tr.step(lr_ - w * lf)
            fl += lf.detach().to(fl.dtype)  # summed on the device: no host sync per step
            rl += lr_.detach().to(rl.dtype)
            n += 1
        return {"forget_loss": float(fl) / max(n, 1), "retain_loss": float(rl) / max(n, 1)}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("ga_small", args=GAArgs, search={"lr": ("log", 1e-5, 1e-2), "epochs": ("int", 1, 10)})
def gradient_ascent_small(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Gradient ascent on the forget set only (Thudi et al. 2022)."""
    w = cfg.args.ascent_weight

    def epoch(tr: Trainer, _epoch: int) -> dict[str, float]:
        loss = tr.pass_over(
            ctx.batches(ctx.split.forget, cfg.batch_size), lambda x, y, _: -w * ce(model, x, y)
        )
        return {"forget_loss": -loss / w}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("rl", search={"lr": ("log", 1e-3, 0.1), "epochs": ("int", 1, 10)})
def random_label(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Random labels on forget, trained together with retain in one pass (Golatkar et al. 2020)."""
    both = torch.sort(torch.cat([ctx.split.forget, ctx.split.retain])).values

    def loss_fn(x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        y = torch.where(ctx.is_forget[idx], ctx.wrong_labels(y), y)
        return ce(model, x, y)

    def epoch(tr: Trainer, _epoch: int) -> dict[str, float]:
        return {"loss": tr.pass_over(ctx.batches(both, cfg.batch_size), loss_fn)}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("rl_split", search={"lr": ("log", 1e-3, 0.1), "epochs": ("int", 1, 10)})
def random_label_split(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Each epoch: a pass over forget with fresh random labels, then one over retain (SalUn)."""

    def epoch(tr: Trainer, _epoch: int) -> dict[str, float]:
        fl = tr.pass_over(
            ctx.batches(ctx.split.forget, cfg.batch_size),
            lambda x, y, _: ce(model, x, ctx.wrong_labels(y)),
        )
        rl = tr.pass_over(
            ctx.batches(ctx.split.retain, cfg.batch_size), lambda x, y, _: ce(model, x, y)
        )
        return {"forget_loss": fl, "retain_loss": rl}

    return run_epochs(model, ctx, cfg, mask, monitor, epoch)


@register("retrain", supports_mask=False, ignores=("lr", "epochs", "batch_size", "optimizer"))
def retrain(
    model: nn.Module, ctx: MethodContext, cfg: Settings, mask: SaliencyMask | None, monitor: Monitor
) -> nn.Module:
    """Exact unlearning: a fresh model trained on retain with the base model's recipe.

    The run's seed replaces the recipe's, so retrain rows show the seed-to-seed spread of the
    oracle itself. The experiment's lr and epochs are ignored: the recipe is the point.
    """

    torch.manual_seed(ctx.seed)
    fresh = ctx.new_model()
    fit(fresh, ctx.data, ctx.split.retain, ctx.split.val, ctx.retrain_recipe, desc="retrain")
    return fresh


def unlearn(
    model: nn.Module,
    ctx: MethodContext,
    settings: Settings,
    mask: SaliencyMask | None = None,
    monitor: Monitor | None = None,
) -> nn.Module:
    """Run the method `settings.method` on `model`: the one call the runner makes.

    Normalisation layers under a ``frozen`` prefix run in eval mode throughout, whatever the
    method does with ``model.train()``, so their running statistics stay bit-identical too.
    """
    spec = method_spec(settings.method)
    monitor = monitor if monitor is not None else Monitor()
    with frozen_statistics(model, settings.frozen), count_work() as work:
        model = spec.fn(model, ctx, settings, mask, monitor)
    monitor.work = work
    return model


def copy_model(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


__all__ = [
    "IGNORABLE",
    "SEARCHABLE",
    "SEARCH_KINDS",
    "METHODS",
    "MethodSpec",
    "Monitor",
    "NoArgs",
    "OptimizerSettings",
    "Settings",
    "Trainer",
    "MethodContext",
    "ce",
    "copy_model",
    "unlearn",
    "method_spec",
    "register",
    "run_epochs",
]
