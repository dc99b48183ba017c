"""SalUn's weight-saliency mask, and the guard that makes any mask a hard constraint.

Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
Image Classification and Generation", ICLR 2024. The saliency of a weight is the magnitude of
the forget-loss gradient, accumulated over the forget set; exactly ``int(N * mask_thr)`` of the
N weights, ranked globally, may change, the rest stay exactly at their original values. The
``frozen`` prefixes of an experiment fix whole layers the same way, and
:func:`frozen_statistics` keeps the running statistics of frozen normalisation layers too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import UserError
from core.io import atomic_write_bytes
from datasets import DeviceData
from models import name_under


class SaliencyMask:
    """Boolean tensors by parameter name: True where the weight may change.

    ``base_sha256`` is the sha256 of the weights file of the base model the mask was computed
    on (None when unknown); :meth:`save` records it and :meth:`load` checks it.
    """

    def __init__(
        self,
        masks: Mapping[str, Tensor],
        threshold: float | None = None,
        base_sha256: str | None = None,
    ) -> None:
        self.masks = {k: v.bool() for k, v in masks.items()}
        self.threshold = threshold
        self.base_sha256 = base_sha256

    @classmethod
    def compute(
        cls,
        model: nn.Module,
        data: DeviceData,
        forget_idx: Tensor,
        threshold: float,
        batch_size: int = 256,
        *,
        augment: bool = False,
        seed: int = 0,
        base_sha256: str | None = None,
    ) -> SaliencyMask:
        """Rank weights by |d forget-loss / d w| (model in eval mode) and keep the top fraction.

        Exactly ``int(N * threshold)`` of the N weights are kept, ranked over all parameters
        together, as in SalUn's ``generate_mask.py``; equal scores (many are exactly 0) are
        ranked by their position in the concatenation of the parameters, so the mask is
        deterministic and its size never depends on ties. ``augment`` applies the dataset's
        training augmentation to the forget batches (SalUn's forget loader does), drawn from a
        generator seeded with ``seed``. ``base_sha256`` names the base weights ``model`` was
        loaded from, so the saved mask can be checked against them.
        """
        if not 0 < threshold <= 1:
            raise UserError(f"mask_thr = {threshold!r} is invalid; use a fraction in (0, 1]")
        if len(forget_idx) == 0:
            raise UserError("cannot compute a saliency mask: the forget set is empty")
        was_training = model.training
        model.eval()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        g = torch.Generator().manual_seed(seed) if augment else None
        batches = data.batches(forget_idx, batch_size, augment=augment, generator=g)
        for x, y, _ in tqdm(batches, desc="saliency", disable=None, leave=False):
            model.zero_grad(set_to_none=True)
            # sum, not mean: the saliency is the gradient of the loss over the whole forget set
            (-F.cross_entropy(model(x), y, reduction="sum")).backward()
            for n, p in params.items():
                if p.grad is not None:
                    grads[n] += p.grad
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        scores = {n: g.abs() for n, g in grads.items()}
        return cls(top_fraction(scores, threshold), threshold, base_sha256)

    @classmethod
    def frozen(cls, model: nn.Module, prefixes: Sequence[str]) -> SaliencyMask:
        """A mask that fixes every parameter under the given name prefixes."""
        return cls(
            {
                n: torch.full_like(p, not name_under(n, prefixes), dtype=torch.bool)
                for n, p in model.named_parameters()
            }
        )

    def combine(self, other: SaliencyMask | None) -> SaliencyMask:
        if other is None:
            return self
        out = dict(self.masks)
        for n, m in other.masks.items():
            out[n] = out[n] & m if n in out else m
        return SaliencyMask(out, self.threshold, self.base_sha256)

    def kept_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def save(self, path: str | Path, base_sha256: str | None = None) -> None:
        """Write the mask atomically as safetensors (one bool tensor per parameter: names and
        shapes), recording the threshold and the sha256 of the base model's weights file
        (``base_sha256``, else the mask's own)."""
        meta = {"format": MASK_FORMAT, "threshold": str(self.threshold)}
        sha = base_sha256 or self.base_sha256
        if sha:
            meta["base_sha256"] = sha
        tensors = {n: m.contiguous().cpu() for n, m in self.masks.items()}
        atomic_write_bytes(path, save_bytes(tensors, meta))

    @classmethod
    def load(
        cls, path: str | Path, model: nn.Module | None = None, base_sha256: str | None = None
    ) -> SaliencyMask:
        """Read a mask written by :meth:`save`; with ``model`` its entries must be the model's
        trainable parameters, shape for shape; with ``base_sha256`` it must have been made for
        that base model (a mask saved without a base hash cannot be checked and is accepted)."""
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: mask file not found")
        try:
            masks = load_file(str(p))
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"{p}: not a safetensors mask file ({e})") from None
        for n, m in masks.items():
            if m.dtype != torch.bool:
                raise UserError(f"{p}: not a mask file: entry '{n}' is {m.dtype}, not bool")
        made_for = meta.get("base_sha256")
        if base_sha256 and made_for and made_for != base_sha256:
            raise UserError(
                f"{p}: mask was made for another base model (weights sha256 {made_for[:12]}, "
                f"this base {base_sha256[:12]}); recompute it with use_mask"
            )
        try:
            threshold: float | None = float(meta.get("threshold", ""))
        except ValueError:  # saved without one ("None"), or not written by save()
            threshold = None
        if model is not None:
            check_fits(p, masks, model)
        return cls(masks, threshold, made_for or None)

    def to(self, device: torch.device) -> SaliencyMask:
        masks = {n: m.to(device) for n, m in self.masks.items()}
        return SaliencyMask(masks, self.threshold, self.base_sha256)


MASK_FORMAT = "saliency-mask/1"


def kept_count(n: int, fraction: float) -> int:
    """floor(n * fraction), the SalUn code's ``int(len(all_elements) * i)``, except that a
    product a hair below an integer through float rounding (44470 * 0.7 = 31128.999...) counts
    as that integer, so the kept fraction is within 1/n of ``fraction`` at every threshold."""
    x = n * fraction
    return round(x) if abs(x - round(x)) < 1e-6 else math.floor(x)


def top_fraction(scores: Mapping[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """True on exactly ``int(N * fraction)`` of the N scores: the largest, ranked over all
    tensors together; ties go to the lower position in the concatenation (a stable sort)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = kept_count(flat.numel(), fraction)
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:k]] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return out


def check_fits(path: Path, masks: Mapping[str, Tensor], model: nn.Module) -> None:
    """Every entry is a parameter of `model` with its shape, every trainable one has an entry."""
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in params or params[n].shape != m.shape:
            raise UserError(f"{path}: mask entry '{n}' does not match the model's parameters")
    for n, q in params.items():
        if q.requires_grad and n not in masks:
            raise UserError(f"{path}: mask has no entry for the model's parameter '{n}'")


def constraint(
    model: nn.Module, mask: SaliencyMask | None, frozen: Sequence[str]
) -> SaliencyMask | None:
    """The weights a method may change: the saliency mask combined with the ``frozen``
    prefixes; None when nothing is fixed."""
    fixed = SaliencyMask.frozen(model, frozen) if frozen else None
    return mask.combine(fixed) if mask is not None else fixed


def running_stat_modules(model: nn.Module, prefixes: Sequence[str]) -> list[nn.Module]:
    """Modules under the prefixes that keep running statistics (BatchNorm and the like): in
    training mode their forward pass moves those buffers, so a frozen one must run in eval."""
    return [
        m
        for n, m in model.named_modules()
        if n
        and name_under(n, prefixes)
        and any(b.startswith("running_") for b, _ in m.named_buffers(recurse=False))
    ]


def _stay_in_eval(module: nn.Module, _: object) -> None:
    module.training = False


@contextlib.contextmanager
def frozen_statistics(model: nn.Module, prefixes: Sequence[str]) -> Iterator[None]:
    """While active, normalisation layers under ``prefixes`` run in eval mode whatever
    ``model.train()`` says, so their running statistics stay bit-identical (issue: a frozen
    BatchNorm layer moved with every forward pass in training mode)."""
    modules = running_stat_modules(model, prefixes) if prefixes else []
    hooks = [m.register_forward_pre_hook(_stay_in_eval) for m in modules]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in modules:
            m.training = model.training


class MaskGuard:
    """Keeps masked weights bit-identical: gradients are masked before each step, then the
    weights and every optimiser state tensor (momentum, Adam moments) are restored after it,
    so weight decay and momentum cannot move them either."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mask: SaliencyMask):
        self.optimizer = optimizer
        self.entries: list[tuple[nn.Parameter, Tensor, Tensor]] = []
        params = dict(model.named_parameters())
        for n, m in mask.masks.items():
            if n not in params:
                raise UserError(f"mask entry '{n}' is not a parameter of the model")
            p = params[n]
            m = m.to(p.device)
            if not bool(m.all()):
                self.entries.append((p, m, p.detach().clone()))

    def before_step(self) -> None:
        for p, m, _ in self.entries:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def after_step(self) -> None:
        for p, m, orig in self.entries:
            p.copy_(torch.where(m, p, orig))
            for s in self.optimizer.state.get(p, {}).values():
                if isinstance(s, Tensor) and s.shape == p.shape:
                    s.mul_(m)
