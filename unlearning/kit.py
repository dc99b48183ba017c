"""Run unlearning functions written for the NeurIPS 2023 Machine Unlearning Challenge kit.

The kit's contract is one function::

    def unlearning(net, retain_loader, forget_loader, val_loader) -> net

that changes ``net`` in place (or returns it) using ``torch.utils.data.DataLoader`` objects
yielding ``(images, labels)`` batches. :func:`register_challenge_method` wraps such a function
into this project's method signature ``fn(model, ctx, cfg, mask, monitor) -> model`` and registers it in
``methods.METHODS``, so the runner, the experiment files and the tests use it unchanged::

    from unlearning.kit import register_challenge_method

    def unlearning(net, retain_loader, forget_loader, val_loader):
        ...  # kit code, unchanged
        return net

    register_challenge_method("my_kit_method", unlearning)

Put the module in ``unlearning/`` (every module there is imported automatically); see
``unlearning/kit_ft.py`` for the kit's own example. What the adapter provides:

* three real ``DataLoader`` objects over ``ctx.split.retain``, ``.forget`` and ``.val``, batch
  size ``cfg.batch_size``, shuffled on every pass from generators seeded by the run's seed
  (so a run is reproducible), yielding ``(images, labels)`` pairs: float images normalised
  with the dataset's mean and std, and int64 labels, both already on ``ctx.device`` (kit code
  that calls ``.to(DEVICE)`` keeps working; use the net's device rather than a hard-coded
  ``'cuda'``). ``len(loader)`` is the number of batches, as the kit's iteration budgets expect.
  No augmentation unless ``augment=True`` (the kit's hidden-data loaders had none);
* ``args``: an optional frozen dataclass (``method_args`` in experiment files); its fields
  are passed to the function as keyword arguments, e.g. ``epochs`` or ``lr``. The kit
  function owns its optimiser and schedule, so every kit method declares that it ignores the
  experiment's ``lr``, ``epochs`` and ``optimizer`` (an experiment that sets them fails);
* the SalUn mask and the ``frozen`` prefixes: gradient hooks zero the gradients of weights
  that may not change while the function runs, and afterwards those weights are copied back
  from the model before unlearning, so they end bit-identical even when the function's
  weight decay or momentum moved them. Frozen normalisation layers keep their running
  statistics (``methods.unlearn`` runs them in eval mode even when the function calls
  ``net.train()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from methods import MethodContext, Monitor, NoArgs, Settings, register
from training.mask import SaliencyMask
from unlearning._constraints import allowed_mask, restore_disallowed

KitFunction = Callable[..., Any]
# a kit function sees only loaders and its own args: the shared optimiser settings never reach it
KIT_IGNORES = ("lr", "epochs", "optimizer")


class PoolBatches(Dataset):
    """Normalised images and labels of pool indices, fetched a whole batch at a time.

    Indexed by a list of positions (a batch from a ``BatchSampler``), so a loader with
    ``batch_size=None`` yields ready batches straight from the device-resident tensors.
    """

    def __init__(
        self, ctx: MethodContext, idx: Tensor, augment: bool, generator: torch.Generator
    ) -> None:
        self.ctx = ctx
        self.idx = idx.to(ctx.device)
        self.augment = augment
        self.generator = generator

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        bi = self.idx[torch.as_tensor(positions, device=self.ctx.device)]
        return self.ctx.samples(bi, self.augment, self.generator)


def make_loader(
    ctx: MethodContext, idx: Tensor, batch_size: int, seed: int, augment: bool = False
) -> DataLoader:
    """A shuffled DataLoader of ``(images, labels)`` batches over pool indices ``idx``."""
    g = torch.Generator().manual_seed(seed)
    ds = PoolBatches(ctx, idx, augment, g)
    sampler = BatchSampler(RandomSampler(ds, generator=g), batch_size, drop_last=False)
    return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=_as_is)


def _as_is(batch: Any) -> Any:
    """Keep the ``(images, labels)`` tuple (the default conversion would make it a list)."""
    return batch


def challenge_loaders(
    ctx: MethodContext, batch_size: int, augment: bool = False
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """The kit's ``retain_loader, forget_loader, val_loader`` for this run."""
    seeds = torch.randint(0, 2**62, (3,), generator=ctx.generator).tolist()
    s = ctx.split
    return tuple(  # type: ignore[return-value]
        make_loader(ctx, idx, batch_size, seed, augment)
        for idx, seed in zip((s.retain, s.forget, s.val), seeds, strict=True)
    )


def register_challenge_method(
    name: str,
    fn: KitFunction,
    *,
    args: type | None = None,
    supports_mask: bool = True,
    augment: bool = False,
) -> KitFunction:
    """Register a kit-style ``unlearning(net, retain, forget, val, **args) -> net`` as ``name``.

    ``args`` is an optional frozen dataclass whose fields (defaults, or the experiment's
    ``method_args``) are passed as keyword arguments; a ``check(self, where)`` method on it
    validates them like any method's. ``supports_mask=False`` makes experiments with
    ``use_mask`` fail validation. ``augment`` turns on the dataset's training augmentation in
    the retain and forget loaders. The method is registered as ignoring the experiment's
    ``lr``, ``epochs`` and ``optimizer`` (``KIT_IGNORES``): the function never sees them. The
    first line of ``fn``'s docstring becomes the method's description. Returns ``fn`` unchanged, so it can also be used as a decorator through
    :func:`challenge_method`.
    """

    def method(
        model: nn.Module,
        ctx: MethodContext,
        cfg: Settings,
        mask: SaliencyMask | None,
        monitor: Monitor,
    ) -> nn.Module:
        limit = allowed_mask(model, cfg, mask)
        before: dict[str, Tensor] = {}
        hooks = []
        if limit is not None:
            for n, p in model.named_parameters():
                m = limit.masks.get(n)
                if m is not None and not bool(m.all()):
                    before[n] = p.detach().clone()
                    hooks.append(p.register_hook(lambda g, m=m: g * m))
        retain, forget, val = challenge_loaders(ctx, cfg.batch_size, augment)
        kwargs = dataclasses.asdict(cfg.args) if args is not None else {}
        try:
            out = fn(model, retain, forget, val, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        net = model if out is None else out
        restore_disallowed(net, before, limit)
        return net

    method.__doc__ = fn.__doc__ or f"NeurIPS 2023 kit method {fn.__name__}"
    method.__name__ = f"challenge_{name}"
    register(name, args=args or NoArgs, supports_mask=supports_mask, ignores=KIT_IGNORES)(method)
    return fn


def challenge_method(
    name: str, *, args: type | None = None, supports_mask: bool = True, augment: bool = False
) -> Callable[[KitFunction], KitFunction]:
    """Decorator form of :func:`register_challenge_method`."""

    def wrap(fn: KitFunction) -> KitFunction:
        return register_challenge_method(
            name, fn, args=args, supports_mask=supports_mask, augment=augment
        )

    return wrap


__all__ = [
    "KIT_IGNORES",
    "challenge_loaders",
    "challenge_method",
    "make_loader",
    "register_challenge_method",
]
