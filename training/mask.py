"""SalUn's weight-saliency mask, and the guard that makes any mask a hard constraint.

Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
Image Classification and Generation", ICLR 2024. The saliency of a weight is the magnitude of
the forget-loss gradient, accumulated over the forget set; the top ``mask_thr`` fraction of all
weights (ranked globally) may change, the rest stay exactly at their original values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import UserError
from datasets import DeviceData
from models import name_under


class SaliencyMask:
    """Boolean tensors by parameter name: True where the weight may change."""

    def __init__(self, masks: Mapping[str, Tensor], threshold: float | None = None) -> None:
        self.masks = {k: v.bool() for k, v in masks.items()}
        self.threshold = threshold

    @classmethod
    def compute(
        cls,
        model: nn.Module,
        data: DeviceData,
        forget_idx: Tensor,
        threshold: float,
        batch_size: int = 256,
    ) -> SaliencyMask:
        """Rank weights by |d forget-loss / d w| (model in eval mode) and keep the top fraction."""
        if not 0 < threshold <= 1:
            raise UserError(f"mask_thr = {threshold!r} is invalid; use a fraction in (0, 1]")
        if len(forget_idx) == 0:
            raise UserError("cannot compute a saliency mask: the forget set is empty")
        was_training = model.training
        model.eval()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for x, y, _ in tqdm(
            data.batches(forget_idx, batch_size), desc="saliency", disable=None, leave=False
        ):
            model.zero_grad(set_to_none=True)
            # sum, not mean: the saliency is the gradient of the loss over the whole forget set
            (-F.cross_entropy(model(x), y, reduction="sum")).backward()
            for n, p in params.items():
                if p.grad is not None:
                    grads[n] += p.grad
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        scores = torch.cat([g.abs().flatten() for g in grads.values()])
        k = max(1, round(threshold * scores.numel()))
        # the k-th largest score; ties at the cut are all kept, as in the SalUn code
        cut = torch.topk(scores, k, sorted=True).values[-1]
        return cls({n: g.abs() >= cut for n, g in grads.items()}, threshold)

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
        names = set(self.masks) | set(other.masks)
        out = {}
        for n in names:
            a, b = self.masks.get(n), other.masks.get(n)
            out[n] = a & b if a is not None and b is not None else (a if b is None else b)
        return SaliencyMask(out, self.threshold)

    def kept_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threshold": str(self.threshold)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: m.contiguous().cpu() for n, m in self.masks.items()}, str(tmp), meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> SaliencyMask:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: mask file not found")
        try:
            masks = load_file(str(p))
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"{p}: not a safetensors mask file ({e})") from None
        try:
            threshold: float | None = float(meta.get("threshold", ""))
        except ValueError:  # saved without one ("None"), or not written by save()
            threshold = None
        if model is not None:
            shapes = {n: p.shape for n, p in model.named_parameters()}
            for n, m in masks.items():
                if n not in shapes or shapes[n] != m.shape:
                    raise UserError(f"{p}: mask entry '{n}' does not match the model's parameters")
        return cls(masks, threshold)

    def to(self, device: torch.device) -> SaliencyMask:
        return SaliencyMask({n: m.to(device) for n, m in self.masks.items()}, self.threshold)


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
