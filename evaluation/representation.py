"""Forgetting measured in the representation: linear probe, kNN accuracy and linear CKA.

All three read frozen penultimate features (``models.features`` / ``training.byol.encode``):

* linear probe (Alain & Bengio 2016): a multinomial logistic regression fitted on given
  features and labels, scored on other sets. A class whose features an unlearned model has
  moved onto another class's scores near 0 even though the probe was fitted on that class.
* kNN accuracy: weighted cosine k-nearest-neighbour vote against a bank of labelled features
  (Wu et al. 2018, the usual self-supervised monitor); :func:`training.byol.knn_accuracy`.
* linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations
  Revisited"): similarity of two feature matrices of the same samples, invariant to
  orthogonal transforms and isotropic scaling; 1 for identical representations.

Everything is computed in float64 on the CPU, so the numbers do not depend on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.byol import knn_accuracy, knn_predict

__all__ = ["LinearProbe", "fit_linear_probe", "knn_accuracy", "knn_predict", "linear_cka"]
__all__ += ["linear_probe"]


@dataclass(frozen=True)
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features."""

    mean: Tensor  # [D] feature means of the fitting set
    scale: Tensor  # [D] their standard deviations (1 where a feature is constant)
    weight: Tensor  # [C, D]
    bias: Tensor  # [C]

    def logits(self, x: Tensor) -> Tensor:
        z = (x.detach().double().cpu() - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Share of samples predicted as their label; NaN for an empty set."""
        if len(y) == 0:
            return math.nan
        return float((self.predict(x) == y.cpu()).double().mean())


def fit_linear_probe(
    x: Tensor,
    y: Tensor,
    num_classes: int | None = None,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit softmax regression: mean cross-entropy + l2/2 ||W||^2 on standardised features.

    Full-batch L-BFGS (strong Wolfe line search) from zero weights, float64 on the CPU, so the
    same features give the same probe. ``num_classes`` defaults to the largest label + 1.
    """
    if len(y) == 0:
        raise ValueError("a linear probe needs at least one labelled sample")
    xd, yd = x.detach().double().cpu(), y.detach().long().cpu()
    c = int(num_classes if num_classes is not None else int(yd.max()) + 1)
    mean = xd.mean(0)
    scale = xd.std(0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    z = (xd - mean) / scale
    w = torch.zeros(c, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, yd) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(mean=mean, scale=scale, weight=w.detach(), bias=b.detach())


def linear_probe(
    x_fit: Tensor,
    y_fit: Tensor,
    evals: Mapping[str, tuple[Tensor, Tensor]],
    num_classes: int | None = None,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> dict[str, float]:
    """Fit a probe on (x_fit, y_fit) and return its accuracy on each named (features, labels)."""
    probe = fit_linear_probe(x_fit, y_fit, num_classes, l2, max_iter)
    return {name: probe.accuracy(fx, fy) for name, (fx, fy) in evals.items()}


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature matrices [N, D1] and [N, D2] of the same N samples.

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc (the
    equivalent Gram-matrix form is used when N is smaller than the feature widths). NaN when
    either representation is constant.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same samples: {x.shape[0]} != {y.shape[0]} rows")
    xc = x.detach().double().cpu().flatten(1)
    yc = y.detach().double().cpu().flatten(1)
    xc, yc = xc - xc.mean(0), yc - yc.mean(0)
    if xc.shape[0] < max(xc.shape[1], yc.shape[1]):
        kx, ky = xc @ xc.T, yc @ yc.T
        hsic, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        hsic = (yc.T @ xc).pow(2).sum()
        nx, ny = (xc.T @ xc).norm(), (yc.T @ yc).norm()
    if nx == 0 or ny == 0:
        return math.nan
    return float(hsic / (nx * ny))
