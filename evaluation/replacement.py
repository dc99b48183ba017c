"""Scenario support: class replacement (seed 002) on top of a model trained on a class subset.

Class replacement, as in seed 002's notebook: the base model was trained on a subset of the
classes; class ``old`` (in the subset) is replaced by class ``new`` (outside it), which takes
``old``'s place, i.e. its output slot. In the seed, ``list_classes[index(old)] = new``: after
replacement the slot that answered ``old`` answers ``new``, and ``old`` samples are
"to forget" (label -1 in the seed's loaders, penalised by the unlearning term).

Here labels keep their dataset ids (output slot k = dataset class k), so the replacement is the
relabelling ``new -> old`` of the training labels: :func:`relabelled` gives the run a view of the
data in which every sample of ``new`` carries label ``old``. The split (``datasets.make_split``
with ``ForgetSpec(classes=(old,), replace=new)``) has ``forget`` = ``old``'s training samples and
``retain`` = the untouched classes plus ``new``'s training samples (``split.new``), so every
method sees the relabelled ``new`` samples as part of the data to keep and ``old`` as the data
to forget; the retrain oracle is trained from scratch on exactly that retain set.

:func:`replacement_report` measures the outcome on the held-out test samples of the subset plus
``new``: how often ``new`` lands in ``old``'s slot (its accuracy), how often ``old`` samples
still land there, the accuracy on the untouched classes, the mean confidence and the confusion
matrix of true dataset classes against output slots.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import metrics as M
from datasets import DeviceData, ForgetSpec, RawData, Split


def relabelled(data: DeviceData, old: int, new: int) -> DeviceData:
    """A view of `data` whose samples of class `new` carry label `old` (images are shared)."""
    twin = copy.copy(data)
    twin.y = {k: torch.where(y == new, torch.full_like(y, old), y) for k, y in data.y.items()}
    return twin


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if len(x) else float("nan")


def replacement_report(
    outs: M.Outputs,
    true: Tensor,
    old: int,
    new: int,
    classes: Sequence[int],
    num_classes: int,
) -> dict[str, Any]:
    """Replacement metrics of one model from its outputs and the samples' dataset classes.

    ``outs`` are the model's outputs on the evaluated samples (their labels are ignored),
    ``true`` the original dataset class of each; ``classes`` the base model's trained subset.

    * ``new_acc``: share of ``new`` samples predicted in ``old``'s slot (the goal: high);
    * ``old_acc``: share of ``old`` samples still predicted in ``old``'s slot (goal: low);
    * ``untouched_acc``: accuracy on the other trained classes (goal: unchanged);
    * ``mean_confidence``: mean max softmax probability over all samples, and per group in
      ``confidence`` (``new``, ``old``, ``untouched``);
    * ``confusion``: ``rows`` (true dataset classes: the subset plus ``new``), ``cols`` (output
      slots 0..C-1) and ``matrix`` (row-normalised shares), plus the raw ``counts``.
    """
    preds = outs.preds
    conf = outs.probs.max(dim=1).values if len(outs) else torch.empty(0)
    is_new, is_old = true == new, true == old
    untouched = torch.zeros_like(is_new)
    for c in classes:
        if c != old:
            untouched |= true == c
    rows = sorted(set(classes) | {new})
    counts = torch.zeros(len(rows), num_classes, dtype=torch.long)
    for r, c in enumerate(rows):
        sel = preds[true == c]
        if len(sel):
            counts[r] = torch.bincount(sel, minlength=num_classes)
    totals = counts.sum(dim=1, keepdim=True).clamp_min(1)
    return {
        "old": old,
        "new": new,
        "n": len(outs),
        "new_acc": _mean(preds[is_new] == old),
        "old_acc": _mean(preds[is_old] == old),
        "untouched_acc": _mean(preds[untouched] == true[untouched]),
        "mean_confidence": _mean(conf),
        "confidence": {
            "new": _mean(conf[is_new]),
            "old": _mean(conf[is_old]),
            "untouched": _mean(conf[untouched]),
        },
        "confusion": {
            "rows": rows,
            "cols": list(range(num_classes)),
            "matrix": (counts.double() / totals).tolist(),
            "counts": counts.tolist(),
        },
    }


def replacement_metrics(
    outs: dict[str, M.Outputs], raw: RawData, spec: ForgetSpec, split: Split, num_classes: int
) -> dict[str, Any]:
    """:func:`replacement_report` on the test set (subset + ``new``), plus the training-set
    ``new_acc`` / ``old_acc`` / ``untouched_acc`` / ``mean_confidence`` under ``train``."""
    old, new = spec.classes[0], spec.replace
    assert new is not None and split.classes is not None
    test = M.concat_outputs(outs["test"], outs["test_forget"])
    report = replacement_report(test, raw.test_y[test.indices], old, new, split.classes,
                                num_classes)  # fmt: skip
    train = M.concat_outputs(outs["forget"], outs["retain"])
    tr = replacement_report(train, raw.train_y[train.indices], old, new, split.classes,
                            num_classes)  # fmt: skip
    report["train"] = {k: tr[k] for k in ("n", "new_acc", "old_acc", "untouched_acc",
                                          "mean_confidence")}  # fmt: skip
    return report


def confusion_markdown(report: dict[str, Any]) -> str:
    """The confusion matrix of :func:`replacement_report` as a Markdown table (percent)."""
    conf = report["confusion"]
    old, new = report["old"], report["new"]
    cols = [f"{c}" + (f" (={new})" if c == old else "") for c in conf["cols"]]
    lines = ["| true \\ slot | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r, row in zip(conf["rows"], conf["matrix"], strict=True):
        cells = [f"{100 * v:.0f}%" if v else "" for v in row]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["confusion_markdown", "relabelled", "replacement_metrics", "replacement_report"]
