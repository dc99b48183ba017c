"""Per-sample outputs of a model: one evaluation pass keeps logits, labels, losses, indices.

Every metric (``metrics.py``) and every saved ``outputs.safetensors`` is built from these, so
nothing is ever computed from batch means. Training uses :func:`accuracy` for validation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAN = float("nan")

#: Floor for log-probabilities: log(1e-30), as SalUn's code clamps probabilities at 1e-30.
LOG_EPS: float = math.log(1e-30)

# --------------------------------------------------------------------------------------------
# Per-sample outputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """Per-sample outputs of one model on one split, all on CPU.

    ``logits`` float32 [N, C], ``labels`` int64 [N], ``losses`` float32 [N] (per-sample
    cross-entropy), ``indices`` int64 [N] (dataset indices, in the order the batches gave them).
    An empty split has ``logits`` of shape [0, 0].
    """

    logits: Tensor
    labels: Tensor
    losses: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of output units C (0 for an empty split)."""
        return int(self.logits.shape[1]) if self.logits.dim() == 2 else 0

    @property
    def log_probs(self) -> Tensor:
        """log-softmax of the logits, float32 [N, C], floored at :data:`LOG_EPS` (no -inf)."""
        return F.log_softmax(self.logits.float(), dim=1).clamp(min=LOG_EPS)

    @property
    def probs(self) -> Tensor:
        """Softmax probabilities, float32 [N, C], computed as exp(log_softmax)."""
        return F.log_softmax(self.logits.float(), dim=1).exp()

    @property
    def preds(self) -> Tensor:
        """Predicted labels (argmax of the logits), int64 [N]."""
        if len(self) == 0:
            return torch.empty(0, dtype=torch.long)
        return self.logits.argmax(dim=1)

    @property
    def correct(self) -> Tensor:
        """Boolean [N]: prediction equals label."""
        return self.preds == self.labels


def _empty_outputs() -> Outputs:
    return Outputs(
        logits=torch.empty(0, 0),
        labels=torch.empty(0, dtype=torch.long),
        losses=torch.empty(0),
        indices=torch.empty(0, dtype=torch.long),
    )


def collect_outputs(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor]]) -> Outputs:
    """Run one evaluation pass and keep per-sample logits, labels, losses and indices.

    ``batches`` yields ``(x, y, idx)`` already normalised and on the model's device (no
    augmentation). The model is put in eval mode under ``torch.inference_mode()``; the train/eval
    flag of every submodule is restored afterwards. Results are concatenated in the given order
    and moved to CPU. The loss is the per-sample cross-entropy (``reduction="none"``) as in the
    NeurIPS 2023 starting kit's ``compute_losses``.
    """
    modes = [(m, m.training) for m in model.modules()]
    logits_l: list[Tensor] = []
    labels_l: list[Tensor] = []
    losses_l: list[Tensor] = []
    idx_l: list[Tensor] = []
    model.eval()
    try:
        with torch.inference_mode():
            for x, y, idx in batches:
                out = model(x).float()
                y = y.long()
                loss = F.cross_entropy(out, y, reduction="none")
                logits_l.append(out.cpu())
                labels_l.append(y.cpu())
                losses_l.append(loss.cpu())
                idx_l.append(torch.as_tensor(idx).long().cpu())
    finally:
        for m, mode in modes:
            m.training = mode
    if not logits_l:
        return _empty_outputs()
    # torch.cat outside inference mode yields ordinary (non-inference) tensors.
    return Outputs(
        logits=torch.cat(logits_l).clone(),
        labels=torch.cat(labels_l).clone(),
        losses=torch.cat(losses_l).clone(),
        indices=torch.cat(idx_l).clone(),
    )


def concat_outputs(*outs: Outputs | None) -> Outputs:
    """Concatenate outputs of several splits (``None`` and empty ones are skipped)."""
    parts = [o for o in outs if o is not None and len(o) > 0]
    if not parts:
        return _empty_outputs()
    return Outputs(
        logits=torch.cat([o.logits for o in parts]),
        labels=torch.cat([o.labels for o in parts]),
        losses=torch.cat([o.losses for o in parts]),
        indices=torch.cat([o.indices for o in parts]),
    )


def accuracy(o: Outputs) -> float:
    """Top-1 accuracy over the samples (SalUn RA/TA, 1 - UA; seed 001 Psi/Phi). NaN if empty."""
    if len(o) == 0:
        return NAN
    return float(o.correct.double().mean())
