"""Evaluation metrics for machine-unlearning experiments.

Every metric is computed from one evaluation pass per model and split
(:func:`collect_outputs`), which stores the per-sample logits, labels, cross-entropy losses and
dataset indices. Nothing is computed from batch means.

Sources
-------
* SalUn -- Fan, Liu, Zhang, Wei, Wong, Liu. "SalUn: Empowering Machine Unlearning via
  Gradient-based Weight Saliency in Both Image Classification and Generation", ICLR 2024.
  UA (unlearning accuracy = 1 - forget accuracy), RA, TA, MIA-Efficacy (SVC shadow attack, taken
  from Jia et al., "Model Sparsity Can Simplify Machine Unlearning", NeurIPS 2023), Avg. Gap to
  the retrained oracle and run-time efficiency.
* Song & Mittal. "Systematic Evaluation of Privacy Risks of Machine Learning Models",
  USENIX Security 2021: the confidence / entropy / modified-entropy MIA features.
* NeurIPS 2023 Machine Unlearning Challenge starting kit (seed 000): loss-based MIA, a logistic
  regression on per-sample losses, forget set vs test set, cross-validated.
* Fashion-MNIST LeNet unlearning challenge (seed 001): forget accuracy Psi, remaining accuracy
  Phi, L2 distance to the base weights, KL(p || uniform) on the forgotten class, the 0-100
  score with its hard fails, and the frozen-last-layer (``fc2``) rule.

The attacks themselves live in evaluation/mia.py (one implementation): the report's
MIA-Efficacy is the mean over R = 10 seeded shadow draws, with its interval and flags, and in
class-wise forgetting the forgotten class's test samples join the shadow non-members. SalUn's
run-time efficiency becomes three ratios (:func:`time_efficiency`): backward sample passes,
optimiser steps, and wall time only where the oracle's machine and thread count are the run's.

All accuracies and attack rates are fractions in [0, 1]; gaps to the oracle are in percentage
points. Undefined values (empty or too small sets, non-finite model outputs) are ``NaN``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluation.mia import (
    DEFAULT_DRAWS,
    MIA_DEFAULT_FEATURE,
    MIA_FEATURES,
    mia_features,
    stable_loss_mia,
    stable_salun_flat,
    stable_salun_mia,
)
from models import name_under
from training.outputs import (
    LOG_EPS,
    NAN,
    Outputs,
    _empty_outputs,
    accuracy,
    collect_outputs,
    concat_outputs,
)

__all__ = [
    "CHALLENGE_HARD_FAILS",
    "CHALLENGE_THRESHOLDS",
    "CHALLENGE_WEIGHTS",
    "GAP_METRICS",
    "LOG_EPS",
    "MIA_DEFAULT_FEATURE",
    "MIA_FEATURES",
    "Outputs",
    "accuracy",
    "agreement",
    "challenge_score",
    "changed_parameters",
    "collect_outputs",
    "concat_outputs",
    "kl_divergence",
    "kl_to_uniform",
    "l2_distance",
    "loss_mia",
    "mia_features",
    "model_report",
    "name_under",
    "oracle_comparison",
    "per_class_accuracy",
    "salun_mia",
    "time_efficiency",
]


#: Metrics entering SalUn's Avg. Gap.
GAP_METRICS: tuple[str, ...] = ("UA", "RA", "TA", "mia_efficacy")

# Seed 001 ("NIE ZMIENIAJ TEJ KOMÓRKI" cell with compute_final_score):
#   WEIGHTS = [0.25, 0.25, 0.25, 0.25]            # order: kl, acc_rest, l2, acc_target
#   acc_forget_thresholds = [0.09, 0.3]           # minimised
#   acc_other_thresholds = [0.87, 0.90]           # maximised
#   dist_thresholds = [1.3, 3.0]                  # minimised
#   d_kl_thresholds = [0.2, 0.5]                  # minimised
#   acc_forget_absolute_threshold = 0.5           # hard fail if acc_target_after > 0.5
#   acc_target_absolute_threshold = 0.75          # (sic) hard fail if acc_rest_after < 0.75
#   distance_absolute_threshold = 8.0             # hard fail if l2_dist > 8.0
#   dkl_absolute_threshold = 1.75                 # hard fail if kl_after > 1.75
CHALLENGE_WEIGHTS: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)
CHALLENGE_THRESHOLDS: dict[str, tuple[float, float]] = {
    "forget": (0.09, 0.3),
    "retain": (0.87, 0.90),
    "l2": (1.3, 3.0),
    "kl": (0.2, 0.5),
}
CHALLENGE_HARD_FAILS: dict[str, float] = {
    "forget": 0.5,  # fail if forget_acc > 0.5
    "retain": 0.75,  # fail if retain_acc < 0.75
    "l2": 8.0,  # fail if l2 > 8.0
    "kl": 1.75,  # fail if kl > 1.75
}


def _align(a: Outputs, b: Outputs) -> tuple[Outputs, Outputs]:
    """Return ``a`` and ``b`` ordered by the same dataset indices (they must hold the same set)."""
    if len(a) != len(b):
        raise ValueError(f"outputs cover different samples ({len(a)} vs {len(b)})")
    if torch.equal(a.indices, b.indices):
        return a, b
    ia, ib = torch.argsort(a.indices), torch.argsort(b.indices)
    if not torch.equal(a.indices[ia], b.indices[ib]):
        raise ValueError("outputs cover different dataset indices")

    def take(o: Outputs, order: Tensor) -> Outputs:
        return Outputs(o.logits[order], o.labels[order], o.losses[order], o.indices[order])

    return take(a, ia), take(b, ib)


# --------------------------------------------------------------------------------------------
# Accuracies (SalUn: UA, RA, TA; seed 001: Psi, Phi)
# --------------------------------------------------------------------------------------------


def per_class_accuracy(o: Outputs, num_classes: int) -> list[float]:
    """Accuracy restricted to each true class (seed 001's Psi_i per class); NaN for absent ones."""
    result: list[float] = []
    correct = o.correct
    for c in range(num_classes):
        mask = o.labels == c
        n = int(mask.sum())
        result.append(float(correct[mask].double().mean()) if n else NAN)
    return result


# --------------------------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------------------------


def salun_mia(
    retain: Outputs,
    test: Outputs,
    forget: Outputs,
    seed: int,
    features: Sequence[str] = MIA_FEATURES,
    max_per_side: int = 5000,
    n_jobs: int | None = None,
    draws: int = DEFAULT_DRAWS,
    test_forget: Outputs | None = None,
) -> dict[str, Any]:
    """MIA-Efficacy as SalUn reports it, made stable: the attack of
    :func:`evaluation.mia.salun_draw` over `draws` shadow draws (seeds
    ``stream(seed, "attack/salun/<r>")``, the same for every model of a run).

    SalUn's feature, ``confidence``, gets every draw: ``mia_efficacy`` (= ``mia_confidence``)
    is the mean over the draws, with ``_std``, the 95% interval ``_low``/``_high``, counts of
    degenerate and single-verdict draws and ``_flags`` (``degenerate``, ``single``,
    ``unstable``; evaluation/mia.py). The other features of `features` (Song & Mittal) get draw
    0 only, ``mia_<feature>`` each: R draws of all four cost four times as much.

    `test_forget` (the test samples of the forgotten classes, class-wise forgetting) join the
    shadow non-members: without them the attack has never seen a non-member of the forgotten
    class and its verdict on a class-wise oracle flips between 0 and 1 (evaluation/mia.py).
    NaN when a set is empty or a feature is not finite. Results do not depend on ``n_jobs``.
    """
    tf = test_forget if test_forget is not None and len(test_forget) > 0 else None
    main = stable_salun_mia(retain, test, forget, seed, draws, (MIA_DEFAULT_FEATURE,),
                            max_per_side, n_jobs, test_forget=tf)  # fmt: skip
    result = stable_salun_flat(main)
    # 1 when the attack itself failed (degenerate draws) or its draws disagree (unstable)
    flags = set(result.get("mia_efficacy_flags", []))
    result["mia_efficacy_flagged"] = float(bool(flags & {"degenerate", "unstable"}))
    others = [k for k in dict.fromkeys(features) if k != MIA_DEFAULT_FEATURE]
    if others:
        once = stable_salun_mia(retain, test, forget, seed, 1, others, max_per_side, n_jobs,
                                test_forget=tf)  # fmt: skip
        result.update({f"mia_{k}": f.interval.mean for k, f in once.items()})
    return result


def loss_mia(
    forget: Outputs, test: Outputs, seed: int, n_splits: int = 10, draws: int = DEFAULT_DRAWS
) -> dict[str, Any]:
    """The NeurIPS 2023 starting kit's loss attack (:func:`evaluation.mia.loss_draw`) over
    `draws` draws: ``loss_mia_acc`` (mean fold accuracy, 0.5 = the attacker cannot tell forget
    from test samples) and ``loss_mia_auc``, each the mean over the draws with ``_std``,
    ``_low``, ``_high`` (95% interval); NaN with fewer than 2 samples per side."""
    return stable_loss_mia(forget, test, seed, draws, n_splits)


# --------------------------------------------------------------------------------------------
# Distance and uniformity (seed 001)
# --------------------------------------------------------------------------------------------


def _state(original: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return original.state_dict() if isinstance(original, nn.Module) else original


def l2_distance(model: nn.Module, original: nn.Module | Mapping[str, Tensor]) -> float:
    """L2 distance to the original weights, exactly as seed 001's ``measure_l2_distance``.

    sqrt(sum over ``model.named_parameters()`` with ``requires_grad`` of
    sum((param - initial[name]) ** 2)), where ``initial`` is the original's state dict. Buffers
    (e.g. BatchNorm running statistics) and parameters with ``requires_grad=False`` are not
    counted. Each tensor's sum is taken in its own dtype and accumulated as a Python float, as in
    the seed. ``original`` may be a module or a state dict.
    """
    initial = _state(original)
    total = 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                init = initial[name].to(param.device)
                total += torch.sum((param - init) ** 2).item()
    return total**0.5


def kl_to_uniform(o: Outputs) -> float:
    """Mean KL(p || uniform) over the samples, as seed 001's ``measure_target_uniformity``.

    Per sample sum_c p_c log p_c + log C (= log C - H(p)), with p = exp(log_softmax(logits)) and
    C the number of outputs; then the mean over samples. 0 for a uniform output, log C for a
    one-hot one. The seed evaluates it on the samples of the forgotten class. NaN if empty.
    """
    if len(o) == 0:
        return NAN
    log_p = F.log_softmax(o.logits.float(), dim=1)
    p = log_p.exp()
    per_sample = (p * log_p.clamp(min=LOG_EPS)).sum(dim=1) + math.log(o.num_classes)
    return float(per_sample.double().mean())


def _bit_identical(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a = a.detach().cpu().contiguous().reshape(-1)
    b = b.detach().cpu().contiguous().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def changed_parameters(
    model: nn.Module, original: nn.Module | Mapping[str, Tensor], prefixes: Sequence[str]
) -> list[str]:
    """Names of parameters/buffers under ``prefixes`` that are not bit-identical to the original.

    Implements seed 001's rule that the last layer (``fc2``) stays untouched (its check is
    ``has_same_last_layer``: ``torch.equal`` on ``fc2.parameters()``); here buffers are checked
    too, comparison is bitwise (so -0.0 vs 0.0 counts as a change and an unchanged NaN does not),
    and a tensor missing on either side or changed in shape/dtype counts as changed. A prefix
    ``"fc2"`` matches ``fc2`` and ``fc2.*`` but not ``fc20.*``. Empty list = rule respected.
    """
    initial = _state(original)
    current = model.state_dict(keep_vars=True)
    changed: list[str] = []
    for name, tensor in current.items():
        if not name_under(name, prefixes):
            continue
        if name not in initial or not _bit_identical(tensor, initial[name]):
            changed.append(name)
    changed.extend(n for n in initial if name_under(n, prefixes) and n not in current)
    return changed


# --------------------------------------------------------------------------------------------
# Challenge score (seed 001)
# --------------------------------------------------------------------------------------------


def _metric_score(value: float, thresholds: tuple[float, float], maximize: bool) -> float:
    """Seed 001 ``compute_metric_score``, verbatim in logic and operation order."""
    if maximize:
        if value >= thresholds[1]:
            return 100.0
        elif value <= thresholds[0]:
            return 0.0
        else:
            return 100 * (value - thresholds[0]) / (thresholds[1] - thresholds[0])
    else:
        if value <= thresholds[0]:
            return 100.0
        elif value >= thresholds[1]:
            return 0.0
        else:
            return 100 * (thresholds[1] - value) / (thresholds[1] - thresholds[0])


def challenge_score(
    forget_acc: float,
    retain_acc: float,
    l2: float,
    kl: float,
    *,
    frozen_changed: Sequence[str] = (),
) -> dict[str, float | list[str]]:
    """The Fashion-MNIST LeNet challenge score of seed 001 (``compute_final_score``).

    Sub-scores in [0, 100], linear between the thresholds:
    forget accuracy Psi (lower is better) 100 at <= 0.09, 0 at >= 0.3;
    remaining accuracy Phi (higher is better) 0 at <= 0.87, 100 at >= 0.90;
    L2 (lower is better) 100 at <= 1.3, 0 at >= 3.0; KL (lower is better) 100 at <= 0.2,
    0 at >= 0.5. ``score = 0.25*kl + 0.25*retain + 0.25*l2 + 0.25*forget`` (seed's order).
    Hard fails (strict inequalities, as in the seed) set ``score`` to 0: ``retain_acc < 0.75``,
    ``forget_acc > 0.5``, ``l2 > 8.0``, ``kl > 1.75``; also, optionally, any name passed in
    ``frozen_changed`` (see :func:`changed_parameters`; the seed's "last layer modified" rule).
    The sub-scores are returned even on a hard fail (the seed returns 0 before computing them).
    NaN inputs propagate to NaN, as they would in the seed.
    """
    fails: list[str] = []
    # Seed: `if acc_rest_after < acc_target_absolute_threshold or acc_target_after >
    #   acc_forget_absolute_threshold or l2_dist > distance_absolute_threshold or
    #   kl_after > dkl_absolute_threshold: return 0`
    if retain_acc < CHALLENGE_HARD_FAILS["retain"]:
        fails.append(f"retain_acc < {CHALLENGE_HARD_FAILS['retain']}")
    if forget_acc > CHALLENGE_HARD_FAILS["forget"]:
        fails.append(f"forget_acc > {CHALLENGE_HARD_FAILS['forget']}")
    if l2 > CHALLENGE_HARD_FAILS["l2"]:
        fails.append(f"l2 > {CHALLENGE_HARD_FAILS['l2']}")
    if kl > CHALLENGE_HARD_FAILS["kl"]:
        fails.append(f"kl > {CHALLENGE_HARD_FAILS['kl']}")
    if frozen_changed:
        fails.append("frozen parameters changed: " + ", ".join(frozen_changed))

    kl_score = _metric_score(kl, CHALLENGE_THRESHOLDS["kl"], maximize=False)
    retain_score = _metric_score(retain_acc, CHALLENGE_THRESHOLDS["retain"], maximize=True)
    l2_score = _metric_score(l2, CHALLENGE_THRESHOLDS["l2"], maximize=False)
    forget_score = _metric_score(forget_acc, CHALLENGE_THRESHOLDS["forget"], maximize=False)
    w = CHALLENGE_WEIGHTS
    total = w[0] * kl_score + w[1] * retain_score + w[2] * l2_score + w[3] * forget_score
    return {
        "score": 0.0 if fails else float(total),
        "score_forget": float(forget_score),
        "score_retain": float(retain_score),
        "score_l2": float(l2_score),
        "score_kl": float(kl_score),
        "hard_fails": fails,
    }


# --------------------------------------------------------------------------------------------
# Full report of one model
# --------------------------------------------------------------------------------------------


def model_report(
    outs: Mapping[str, Outputs], seed: int, num_classes: int, draws: int = DEFAULT_DRAWS
) -> dict[str, Any]:
    """All per-model metrics from the outputs of one model on its splits.

    ``outs`` keys: ``forget``, ``retain``, ``test`` (test WITHOUT the forgotten classes in
    class-wise forgetting), optionally ``test_forget`` (test samples of the forgotten classes)
    and ``val``. Accuracies follow SalUn (UA = 1 - forget accuracy, RA, TA); MIA from
    :func:`salun_mia` (with ``test_forget`` among the non-members) and :func:`loss_mia`, both
    over `draws` shadow draws seeded from `seed`; ``kl_uniform_forget`` from
    :func:`kl_to_uniform`. Missing or empty splits give NaN, never an exception. The attacks
    use as many threads as PyTorch may (the task's thread count, running/threads.py).
    """
    empty = _empty_outputs()
    forget = outs.get("forget") or empty
    retain = outs.get("retain") or empty
    test = outs.get("test") or empty
    test_forget = outs.get("test_forget")
    val = outs.get("val")

    forget_acc = accuracy(forget)
    retain_acc = accuracy(retain)
    test_acc = accuracy(test)
    report: dict[str, Any] = {
        "forget_acc": forget_acc,
        "UA": 1.0 - forget_acc,
        "retain_acc": retain_acc,
        "RA": retain_acc,
        "test_acc": test_acc,
        "TA": test_acc,
        "test_forget_acc": accuracy(test_forget) if test_forget is not None else NAN,
        "val_acc": accuracy(val) if val is not None else NAN,
        "per_class_test_acc": per_class_accuracy(concat_outputs(test, test_forget), num_classes),
    }
    threads = torch.get_num_threads()
    report.update(salun_mia(retain, test, forget, seed, draws=draws, n_jobs=threads,
                            test_forget=test_forget))  # fmt: skip
    report.update(loss_mia(forget, test, seed, draws=draws))
    report["kl_uniform_forget"] = kl_to_uniform(forget)
    report.update(
        {
            "n_forget": float(len(forget)),
            "n_retain": float(len(retain)),
            "n_test": float(len(test)),
            "n_test_forget": float(len(test_forget)) if test_forget is not None else 0.0,
            "n_val": float(len(val)) if val is not None else 0.0,
        }
    )
    return report


# --------------------------------------------------------------------------------------------
# Against the retrained oracle (SalUn)
# --------------------------------------------------------------------------------------------


def agreement(a: Outputs, b: Outputs) -> float:
    """Share of samples on which two models predict the same label (aligned by index)."""
    if len(a) == 0 and len(b) == 0:
        return NAN
    a, b = _align(a, b)
    return float((a.preds == b.preds).double().mean())


def kl_divergence(p_outs: Outputs, q_outs: Outputs) -> float:
    """Mean per-sample KL(p || q) = sum_c p_c (log p_c - log q_c), samples aligned by index."""
    if len(p_outs) == 0 and len(q_outs) == 0:
        return NAN
    p_outs, q_outs = _align(p_outs, q_outs)
    log_p = F.log_softmax(p_outs.logits.double(), dim=1)
    log_q = F.log_softmax(q_outs.logits.double(), dim=1).clamp(min=LOG_EPS)
    per_sample = (log_p.exp() * (log_p.clamp(min=LOG_EPS) - log_q)).sum(dim=1)
    return float(per_sample.mean())


def _as_float(value: object) -> float:
    return float(value) if isinstance(value, (int, float, np.floating)) else NAN


def oracle_comparison(
    report: Mapping[str, object],
    oracle_report: Mapping[str, object],
    outs: Mapping[str, Outputs],
    oracle_outs: Mapping[str, Outputs],
) -> dict[str, float]:
    """Differences to the retrain-from-scratch oracle.

    SalUn: ``gap_<m>`` = 100 * (unlearned - oracle) in percentage points (signed) for
    m in UA, RA, TA, mia_efficacy, and ``avg_gap`` = mean of their absolute values (NaN if any is
    NaN). Agreement: ``agree_forget`` / ``agree_test`` = share of forget / test samples with the
    same predicted label; ``kl_oracle_forget`` = mean over forget samples of
    KL(p_oracle || p_unlearned), i.e. the oracle's output distribution is the reference.
    """
    result: dict[str, float] = {}
    for m in GAP_METRICS:
        result[f"gap_{m}"] = 100.0 * (_as_float(report[m]) - _as_float(oracle_report[m]))
    result["avg_gap"] = float(np.mean([abs(result[f"gap_{m}"]) for m in GAP_METRICS]))
    result["agree_forget"] = agreement(outs["forget"], oracle_outs["forget"])
    result["agree_test"] = agreement(outs["test"], oracle_outs["test"])
    result["kl_oracle_forget"] = kl_divergence(oracle_outs["forget"], outs["forget"])
    return result


def _cost_ratio(a: Any, b: Any) -> float:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b <= 0:
        return NAN
    return float(a) / float(b)


def _machine_difference(unlearn: Mapping[str, Any], oracle: Mapping[str, Any]) -> str:
    """Why two wall times are not comparable ("" when they are): host, device, threads."""
    why = []
    for key, what in (("host", "host"), ("device", "device"), ("threads", "CPU threads")):
        u, o = unlearn.get(key), oracle.get(key)
        if o is None or u is None:
            why.append(f"the {'oracle' if o is None else 'run'} records no {what}")
        elif u != o:
            why.append(f"the oracle was trained with {what} {o}, this run used {u}")
    return "; ".join(why)


def time_efficiency(unlearn: Mapping[str, Any], oracle: Mapping[str, Any]) -> dict[str, Any]:
    """Run-time efficiency (SalUn's RTE) as three ratios of unlearning to oracle training.

    `unlearn` and `oracle` are cost records (training/cost.py: ``backward_samples``,
    ``forward_samples``, ``steps``, ``wall_seconds``, ``cpu_seconds``, and where the work ran:
    ``host``, ``device``, ``threads``). Returns both sides' numbers (``unlearn_time`` and
    ``oracle_time`` are the wall times) and

    * ``sample_pass_ratio``: backward sample passes, unlearning / oracle. It depends on the
      code and data only, never on the machine or its load: the headline on CPU.
    * ``step_ratio``: optimiser steps, unlearning / oracle.
    * ``time_ratio``: wall time, unlearning / oracle, only when both ran on the same host and
      device with the same thread count; else None, with ``time_ratio_note`` saying why (a
      cached oracle's wall time measured its own machine and load).

    A ratio whose oracle records no count (a sidecar written before work was counted) is NaN,
    and ``cost_note`` says so.
    """
    out: dict[str, Any] = {
        "unlearn_time": float(unlearn.get("wall_seconds") or 0.0),
        "oracle_time": float(oracle.get("wall_seconds") or 0.0),
        "unlearn_cpu_time": _cost_value(unlearn.get("cpu_seconds")),
        "oracle_cpu_time": _cost_value(oracle.get("cpu_seconds")),
    }
    for who, rec in (("unlearn", unlearn), ("oracle", oracle)):
        for key in ("backward_samples", "forward_samples", "steps"):
            out[f"{who}_{key}"] = _cost_value(rec.get(key))
    out["sample_pass_ratio"] = _cost_ratio(
        unlearn.get("backward_samples"), oracle.get("backward_samples")
    )
    out["step_ratio"] = _cost_ratio(unlearn.get("steps"), oracle.get("steps"))
    if not isinstance(oracle.get("backward_samples"), int):
        out["cost_note"] = (
            "the oracle's sidecar records no work counts (trained before they were counted); "
            "train it again for the sample-pass and step ratios"
        )
    note = _machine_difference(unlearn, oracle)
    out["time_ratio"] = None if note else _cost_ratio(out["unlearn_time"], out["oracle_time"])
    out["time_ratio_note"] = note
    return out


def _cost_value(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else NAN
