"""The ``repr`` section of a run's metrics.json: forgetting measured in the representation.

"The class is gone from the logits" says little about whether it is gone from the features a
head could be re-fitted on (Alignment Calibration, arXiv 2406.03603; Wang & Chen 2024 on
self-supervised encoders). For the unlearned, base and oracle models of a run, from frozen
penultimate features (``forward_features`` + ``forward_head(pre_logits=True)``, one pass per
model; the base model's and the oracle's are computed once per checkpoint and kept):

* ``probe_forget_acc`` / ``probe_test_forget_acc`` / ``probe_test_acc``: a linear probe
  (Alain & Bengio 2016; evaluation/representation.py) fitted on held-out labelled data that
  includes the forgotten classes (``val`` + ``val_forget``), scored on the forget set, on the
  forgotten classes' test samples and on the other test samples. High on the forget set: a new
  head recovers what the model's own head no longer shows.
* ``knn_forget_acc``: weighted cosine kNN (k = 20, Wu et al. 2018) of the forget samples
  against the retain set as bank, plus ``val_forget``: in class-wise forgetting the retain set
  holds no sample of the forgotten class, so without those held-out samples the answer would
  be 0 for every model by construction.
* ``cka_oracle`` / ``cka_base``: linear CKA (Kornblith et al. 2019) of the model's features
  with the oracle's / the base model's on the run's test samples (``test`` + ``test_forget``).

The unlearned model's features come from the run's own evaluation pass (:class:`FeatureCapture`
records the input of the classifier, which is the pre-logits feature vector), so measuring
them costs no extra forward pass; where that is not possible, one pass over the run's splits.

``gaps`` are unlearned minus oracle and ``base_gaps`` base minus oracle, in percentage points
(signed, as SalUn's gaps), with ``avg_gap`` the mean of their absolute values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from datasets import DeviceData, Split, indices_hash
from evaluation.representation import fit_linear_probe, knn_accuracy, linear_cka
from models import features
from training.loop import EVAL_BATCH

KNN_K = 20
PROBE_L2 = 1e-3
# L-BFGS iterations of the probe: on the base, oracle and unlearned LeNets of
# exp/byol_mnist5k.json its accuracies after 50 and after 200 iterations differ by at most 0.3
# points (after 25: 1 point); 200 would cost 0.5 s a run on one CPU thread, 50 cost 0.12 s.
PROBE_ITER = 50
ACC_KEYS = ("probe_forget_acc", "probe_test_forget_acc", "probe_test_acc", "knn_forget_acc")
GAP_KEYS = ("probe_forget_acc", "probe_test_forget_acc", "knn_forget_acc")
REPR_SPLITS = ("val", "val_forget", "forget", "retain", "test", "test_forget")


@torch.no_grad()
def encode(model: nn.Module, data: DeviceData, idx: Tensor, source: str) -> Tensor:
    """Penultimate features of ``idx`` in eval mode, float32 on the data's device, [len, D]."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        parts = [
            features(model, x).flatten(1).float()
            for x, _, _ in data.batches(idx, EVAL_BATCH, source=source)
        ]
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(parts) if parts else torch.zeros(0, 0, device=data.device)


class FeatureCapture:
    """The pre-logits features of every forward pass of a model while it is on: a forward
    pre-hook records the input of the model's classifier (``get_classifier()``), which is what
    ``forward_head(x, pre_logits=True)`` returns (timm models and the registered ones)."""

    def __init__(self, model: nn.Module) -> None:
        self.parts: list[Tensor] = []
        get = getattr(model, "get_classifier", None)
        head = get() if callable(get) else None
        self._handle = (
            head.register_forward_pre_hook(self._record) if isinstance(head, nn.Module) else None
        )

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            self.parts.append(args[0].detach().flatten(1).float())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self, sizes: dict[str, int]) -> dict[str, Tensor] | None:
        """The recorded rows cut into consecutive splits of these sizes (in order); None when
        the model has no classifier layer or other passes were recorded too."""
        self.stop()
        rows = sum(len(p) for p in self.parts)
        if not self.parts or rows != sum(sizes.values()):
            return None
        cut = torch.cat(self.parts).split(list(sizes.values()))
        self.parts = []
        return dict(zip(sizes, cut, strict=True))


@dataclass
class Whole:
    """A model's features on the whole pool and the whole test set (a base model or oracle)."""

    pool: Tensor
    test: Tensor

    def select(self, split: Split) -> dict[str, Tensor]:
        return {n: (self.test if n.startswith("test") else self.pool)[
            getattr(split, n).to(self.pool.device)] for n in REPR_SPLITS}  # fmt: skip


def whole_features(model: nn.Module, data: DeviceData) -> Whole:
    return Whole(
        pool=encode(model, data, torch.arange(len(data.y["train"])), "train"),
        test=encode(model, data, torch.arange(len(data.y["test"])), "test"),
    )


def split_features(model: nn.Module, data: DeviceData, split: Split) -> dict[str, Tensor]:
    """Features of the run's splits: one pass over exactly the samples the metrics read."""
    return {
        n: encode(model, data, getattr(split, n), "test" if n.startswith("test") else "train")
        for n in REPR_SPLITS
    }


def _cat(*xs: Tensor) -> Tensor:
    return torch.cat([x for x in xs if len(x)]) if any(len(x) for x in xs) else xs[0]


def model_block(
    f: dict[str, Tensor],
    labels: dict[str, Tensor],
    num_classes: int,
    oracle_test: Tensor,
    base_test: Tensor,
) -> dict[str, float]:
    """One model's numbers from its split features and the labels of the splits."""
    fit_x, fit_y = _cat(f["val"], f["val_forget"]), _cat(labels["val"], labels["val_forget"])
    probe = fit_linear_probe(fit_x, fit_y, num_classes, l2=PROBE_L2, max_iter=PROBE_ITER)
    bank, bank_y = _cat(f["retain"], f["val_forget"]), _cat(labels["retain"], labels["val_forget"])
    test = _cat(f["test"], f["test_forget"])
    knn = math.nan
    if len(f["forget"]) and len(bank):
        knn = knn_accuracy(f["forget"], labels["forget"], bank, bank_y.to(bank.device), KNN_K)
    return {
        "probe_forget_acc": probe.accuracy(f["forget"], labels["forget"]),
        "probe_test_forget_acc": probe.accuracy(f["test_forget"], labels["test_forget"]),
        "probe_test_acc": probe.accuracy(f["test"], labels["test"]),
        "knn_forget_acc": knn,
        "cka_oracle": linear_cka(test, oracle_test) if len(test) > 1 else math.nan,
        "cka_base": linear_cka(test, base_test) if len(test) > 1 else math.nan,
    }


def gaps(model: dict[str, float], oracle: dict[str, float]) -> dict[str, float]:
    """100 * (model - oracle) per accuracy, and the mean of their absolute values."""
    out = {k: 100.0 * (model[k] - oracle[k]) for k in GAP_KEYS}
    vals = [abs(v) for v in out.values() if not math.isnan(v)]
    out["avg_gap"] = sum(vals) / len(vals) if vals else math.nan
    return out


@dataclass
class ReprCache:
    """The runner's store of base-model and oracle features and blocks, so a checkpoint's
    features are computed once however many runs compare against it."""

    whole: dict[str, Whole] = field(default_factory=dict)
    blocks: dict[tuple[str, ...], dict[str, float]] = field(default_factory=dict)

    def features_of(self, key: str, model: nn.Module, data: DeviceData) -> Whole:
        if key not in self.whole:
            self.whole[key] = whole_features(model, data)
        return self.whole[key]

    def section(
        self,
        unlearned: nn.Module,
        base: tuple[str, nn.Module],
        oracle: tuple[str, nn.Module],
        data: DeviceData,
        split: Split,
        captured: dict[str, Tensor] | None = None,
    ) -> dict[str, Any]:
        """The run's ``repr`` section; ``base`` and ``oracle`` are (cache key, model);
        ``captured``: the unlearned model's features of (at least) REPR_SPLITS, if recorded."""
        labels = {n: data.y["test" if n.startswith("test") else "train"][
            getattr(split, n).to(data.device)].cpu() for n in REPR_SPLITS}  # fmt: skip
        fb = self.features_of(base[0], base[1], data).select(split)
        fo = self.features_of(oracle[0], oracle[1], data).select(split)
        base_test, oracle_test = (
            _cat(fb["test"], fb["test_forget"]),
            _cat(fo["test"], fo["test_forget"]),
        )
        nc = data.num_classes
        run_key = indices_hash(split.forget) + str(split.spec.classes) + str(split.spec.replace)
        refs = []
        for who, f in (("base", fb), ("oracle", fo)):
            key = (who, base[0], oracle[0], run_key)
            if key not in self.blocks:
                self.blocks[key] = model_block(f, labels, nc, oracle_test, base_test)
            refs.append(self.blocks[key])
        fu = captured if captured is not None else split_features(unlearned, data, split)
        mine = model_block(fu, labels, nc, oracle_test, base_test)
        b, o = refs
        return mine | {
            "base": b,
            "oracle": o,
            "gaps": gaps(mine, o),
            "base_gaps": gaps(b, o),
            "sizes": {
                "probe_fit": len(split.val) + len(split.val_forget),
                "knn_bank": len(split.retain) + len(split.val_forget),
                "cka_test": len(split.test) + len(split.test_forget),
            },
            "features_reused": captured is not None,
        }


__all__ = [
    "ACC_KEYS",
    "FeatureCapture",
    "ReprCache",
    "gaps",
    "model_block",
    "split_features",
    "whole_features",
]
