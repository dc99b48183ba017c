"""Helpers for methods that change weights outside :class:`methods.Trainer` (no module's method).

A method that takes optimiser steps gets the SalUn mask and the ``frozen`` prefixes for free
from ``run_epochs`` / ``Trainer``. Methods that edit weights directly (SSD's dampening, the
pruning of ``prune_reinit``, kit-style functions with their own optimiser) use these helpers to
honour the same constraint: only weights where :func:`allowed_mask` is True may change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods import Settings
from training.mask import SaliencyMask, constraint


def allowed_mask(model: nn.Module, cfg: Settings, mask: SaliencyMask | None) -> SaliencyMask | None:
    """The saliency mask combined with ``cfg.frozen``, on the model's device; None = no limit.

    The same combination (:func:`training.mask.constraint`) :class:`methods.Trainer` guards.
    """
    full = constraint(model, mask, cfg.frozen)
    if full is None:
        return None
    params = dict(model.named_parameters())
    return SaliencyMask(
        {n: m.to(params[n].device) for n, m in full.masks.items() if n in params},
        full.threshold,
    )


def allowed(model_mask: SaliencyMask | None, name: str, like: Tensor) -> Tensor:
    """Boolean tensor shaped like parameter ``name``: True where it may change."""
    if model_mask is None or name not in model_mask.masks:
        return torch.ones_like(like, dtype=torch.bool)
    return model_mask.masks[name]


@torch.no_grad()
def restore_disallowed(
    model: nn.Module, original: dict[str, Tensor], model_mask: SaliencyMask | None
) -> None:
    """Copy the original value back into every weight the mask does not allow to change.

    ``original`` holds the values before the method ran, for (at least) every parameter whose
    mask is not all True; parameters missing from it are left alone.
    """
    if model_mask is None:
        return
    for n, p in model.named_parameters():
        if n in model_mask.masks and n in original:
            p.copy_(torch.where(model_mask.masks[n], p, original[n].to(p.device)))
