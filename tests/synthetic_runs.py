"""A run folder written by hand, in the runner's formats, for tests of the figures and report.

No model is trained: per-sample logits are drawn from seeded generators, and ``metrics.json``
holds hand-chosen numbers, so the report's figures, intervals and pages can be checked against
known answers in a second. Three experiments x two seeds: ft and ft + mask forgetting class 3,
ga forgetting a random 10% of the pool. Used with
``from synthetic_runs import make_run_folder``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from running.results import OUTPUTS_FILE, RunResult, reference_path, save_outputs, save_reference
from training.outputs import Outputs

NC, PER_CLASS_POOL, PER_CLASS_TEST = 10, 40, 20
FORGET = 3
META = {"dataset": "synthetic", "num_classes": NC, "classes": [str(c) for c in range(NC)]}

# experiment -> (method, masked, class-wise?, forget acc per seed, avg gap per seed,
#                time ratio per seed)
EXPERIMENTS = {
    "00_ft_cf3": ("ft", False, True, (0.40, 0.50), (12.0, 14.0), (0.20, 0.30)),
    "01_ft+mask_cf3": ("ft", True, True, (0.10, 0.20), (4.0, 6.0), (0.25, 0.35)),
    "02_ga_unlr0.1": ("ga", False, False, (0.97, 0.95), (1.0, 3.0), (0.05, 0.08)),
}


def _outputs(labels: np.ndarray, indices: np.ndarray, correct: float, rng: np.random.Generator,
             avoid: int | None = None) -> Outputs:  # fmt: skip
    """Logits that predict the true label with probability `correct` (else another class;
    never `avoid`, the class a retrained model has not seen)."""
    n = len(labels)
    pred = labels.copy()
    wrong = rng.random(n) > correct
    pred[wrong] = (labels[wrong] + rng.integers(1, NC, wrong.sum())) % NC
    if avoid is not None:
        pred[pred == avoid] = (avoid + 1) % NC
    logits = rng.normal(0, 0.5, (n, NC)).astype(np.float32)
    logits[np.arange(n), pred] += 6.0
    lt, yt = torch.from_numpy(logits), torch.from_numpy(labels).long()
    losses = F.cross_entropy(lt, yt, reduction="none")
    return Outputs(lt, yt, losses, torch.from_numpy(indices).long())


def _report(forget_acc: float, per_class: list[float], test_acc: float, mia: float) -> dict:
    return {
        "forget_acc": forget_acc, "UA": 1 - forget_acc, "retain_acc": 0.99, "RA": 0.99,
        "test_acc": test_acc, "TA": test_acc, "per_class_test_acc": per_class,
        "mia_efficacy": mia, "loss_mia_acc": 0.5 + mia / 2,
    }  # fmt: skip


def make_run_folder(root: Path, sample_passes: bool = False) -> Path:
    """Write ``root/run`` (runs, config.json) and ``root/ck`` (base and oracle outputs)."""
    run, ck = root / "run", root / "ck"
    pool_y = np.repeat(np.arange(NC), PER_CLASS_POOL)
    test_y = np.repeat(np.arange(NC), PER_CLASS_TEST)
    pool_i, test_i = np.arange(len(pool_y)), np.arange(len(test_y))
    val = pool_i[pool_i % PER_CLASS_POOL < 4]  # four validation samples per class

    def reference(stem: Path, seed: int, avoid: int | None) -> None:
        rng = np.random.default_rng(seed)
        pool = _outputs(pool_y, pool_i, 0.97, rng, avoid)
        test = _outputs(test_y, test_i, 0.97, rng, avoid)
        save_reference(reference_path(stem), pool, test, META)

    reference(ck / "base", 100, None)
    reference(ck / "oracle_cf3", 101, FORGET)
    experiments = []
    for index, (name, (method, masked, classwise, fa, gap, ratio)) in enumerate(
        EXPERIMENTS.items()
    ):
        experiments.append({"method": method, "use_mask": masked})
        for seed in (0, 1):
            rng = np.random.default_rng(1000 * index + seed)
            train = np.setdiff1d(pool_i, val)
            if classwise:
                forget = train[pool_y[train] == FORGET]
                oracle = ck / "oracle_cf3"
            else:
                forget = np.sort(rng.choice(train, len(train) // 10, replace=False))
                oracle = ck / f"oracle_r{seed}"
                reference(oracle, 200 + seed, None)
            retain = np.setdiff1d(train, forget)
            test_mask = test_y != FORGET if classwise else np.ones(len(test_y), bool)
            splits = {
                "forget": _outputs(pool_y[forget], forget, fa[seed], rng),
                "retain": _outputs(pool_y[retain], retain, 0.99, rng),
                "val": _outputs(pool_y[val], val, 0.97, rng),
                "test": _outputs(test_y[test_mask], test_i[test_mask], 0.97, rng),
            }
            if classwise:
                tf = test_i[~test_mask]
                splits["test_forget"] = _outputs(test_y[tf], tf, fa[seed], rng)
            d = run / "runs" / name / f"seed{seed}"
            d.mkdir(parents=True)
            save_outputs(d / OUTPUTS_FILE, splits, META)
            pc_u = [fa[seed] if (classwise and c == FORGET) else 0.97 for c in range(NC)]
            pc_o = [0.0 if (classwise and c == FORGET) else 0.96 for c in range(NC)]
            times = {
                "unlearn_time": 2.0 * ratio[seed],
                "oracle_time": 2.0,
                "time_ratio": ratio[seed],
            }
            if sample_passes:
                times["sample_pass_ratio"] = ratio[seed] / 2
            RunResult(
                experiment=name, index=index, name=name[3:], method=method, seed=seed,
                forget={"classes": [FORGET] if classwise else [],
                        "fraction": None if classwise else 0.1, "index_file": None, "seed": seed,
                        "n": len(forget), "sha256": "0" * 64},
                metrics=_report(fa[seed], pc_u, 0.97, 0.5),
                oracle=_report(0.0 if classwise else 0.95, pc_o, 0.96, 1.0 if classwise else 0.1),
                base=_report(0.99, [0.98] * NC, 0.98, 0.01),
                gaps={"gap_UA": -gap[seed], "gap_RA": 0.0, "gap_TA": 1.0, "gap_mia_efficacy": 0.0,
                      "avg_gap": gap[seed]},
                times=times, mask_kept=0.5 if masked else None,
                oracle_checkpoint=str(oracle), base_checkpoint=str(ck / "base"),
            ).write(d)  # fmt: skip
    config = {"source": "exp/synthetic.json", "nexp": 2, "seed": 0, "device": "cpu",
              "experiments": experiments}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    return run
