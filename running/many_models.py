"""Verdicts over many models: the NeurIPS 2023 competition's per-example epsilon, and U-LiRA.

One unlearned model and one oracle say little (issue 12); the field judges unlearning per forget
example over many models (Triantafillou et al. 2024, the NeurIPS 2023 Machine Unlearning
competition; Hayes et al. 2024). An experiment with ``"evaluate": {"models": N}`` (or
``main.py --eval-models N``) adds, beside its runs, these tasks of the sweep graph
(running/graph.py), for the run seed s = ``--seed``:

* ``model-oracle`` (N): retrain oracles with training seeds s..s+N-1, all on the forget set of
  seed s (for random forgetting: one draw, the same for all N). Cache entries beside the
  ordinary oracles, named ``<oracle>_t<seed>``; the one whose seed is the base recipe's is the
  ordinary oracle itself (task ``oracle:``, trained once). Each saves its whole-pool outputs.
* ``model-run`` (N): the experiment's method on the same base model and forget set with
  unlearning seeds s..s+N-1 (exactly what a run with that seed does, without its evaluation):
  ``runs/<experiment>/epsilon/members/unlearned_s<seed>.safetensors`` keeps the forget-set
  outputs, the retain and test accuracies and the work done.
* ``epsilon`` (1): the logit-scaled confidences of all 2N models on the forget set and the
  per-example epsilon, forgetting quality F and score of evaluation/epsilon.py:
  ``runs/<experiment>/epsilon/confidences.safetensors`` (float64 ``unlearned`` and
  ``retrained``, [N, |S|], forget examples in pool-index order) and ``epsilon.json``.

With ``"ulira": {"shadows": K}`` also (evaluation/ulira.py):

* ``shadow-base`` (K): base models trained on random halves of the pool's training part (each
  example in K/2 of them; training seed s+k), cached in ``<checkpoints>/shadows/`` and shared
  by every experiment with the same base recipe, K and seed;
* ``shadow`` (K): each shadow unlearns, with the experiment's method and seed s+k, the
  evaluated forget set's examples in its half, topped up with other examples of its half to the
  evaluated forget set's size, and keeps its confidences on the evaluated forget set:
  ``runs/<experiment>/epsilon/ulira/shadow<k>.safetensors``;
* ``ulira`` (1): per-example Gaussians fitted on the shadows ("unlearned" and "never trained
  on"), the attack on the N unlearned models (positives) and the N oracles (negatives):
  ``runs/<experiment>/epsilon/ulira.json`` (accuracy, AUC, TPR at 1% and 0.1% FPR; a perfect
  method leaves 0.5, 0.5, 0.01, 0.001). With fewer than 64 shadows the Gaussians share one
  variance per hypothesis (LiRA's choice for few shadows). The targets are full-pool models and
  the shadows half-pool ones, as in LiRA's offline setting; a shift between them favours the
  "never trained on" side.

U-LiRA is for random (or listed) forget sets only: in class-wise forgetting every shadow trained
on the class, so its "never trained on" examples come from models that unlearned the class,
not from models that never saw it, as the oracles; the epsilon score covers that case.

Cost, in trainings of the base recipe: N oracles + N unlearning runs for the epsilon score; K
half-pool trainings (shared across experiments) + K unlearning runs for U-LiRA.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.errors import UserError
from core.io import atomic_path, dumps, write_json
from datasets import ForgetSpec, Split, indices_hash
from evaluation.epsilon import (
    CONFIDENCES_FILE,
    EPSILON_FILE,
    Accuracies,
    confidence_matrix,
    logit_confidence,
    write_epsilon,
)
from evaluation.ulira import shadow_masks, ulira
from running.graph import EPSILON, MODEL_ORACLE, MODEL_RUN, ORACLE, SHADOW, SHADOW_BASE, ULIRA, Task
from running.results import RunResult, select_splits, source_of
from training.checkpoints import build_once, checkpoint_problem, read_meta
from training.config import TrainConfig
from training.cost import sidecar_cost
from training.loop import EVAL_BATCH
from training.outputs import Outputs, accuracy, collect_outputs
from training.pretrain import ENCODERS
from training.recipe import train_checkpoint

if TYPE_CHECKING:
    from running.runner import Checkpoint, Job, Runner

KINDS = (MODEL_ORACLE, MODEL_RUN, EPSILON, SHADOW_BASE, SHADOW, ULIRA)
EPSILON_DIR = "epsilon"
MEMBERS = "members"
ULIRA_DIR = "ulira"
ULIRA_FILE = "ulira.json"
SHADOW_DIR = "shadows"  # in --checkpoints: the shadow base models
FIXED_VARIANCE_BELOW = 64  # shadows; LiRA pools the variance with fewer
FORMAT = "1"


# ---------------------------------------------------------------------------------------------
# Names


def models_of(job: Job) -> int:
    """N of the experiment's many-model evaluation (0: none)."""
    ev = job.cfg.evaluate
    return ev.models if ev is not None and ev.models is not None else 0


def shadows_of(job: Job) -> int:
    """K of the experiment's U-LiRA (0: none)."""
    ev = job.cfg.evaluate
    return ev.ulira.shadows if ev is not None and ev.ulira is not None else 0


def epsilon_dir(runner: Runner, job: Job) -> Path:
    return runner.opts.out / "runs" / job.folder / EPSILON_DIR


def base_recipe(job: Job) -> TrainConfig:
    return job.base_train or TrainConfig.from_json(read_meta(job.base_path)["train"])


def seeds(runner: Runner, job: Job) -> list[int]:
    s = runner.opts.base_seed
    return list(range(s, s + models_of(job)))


def model_oracle_path(runner: Runner, job: Job, spec: ForgetSpec, split: Split, seed: int) -> Path:
    """The oracle of training seed `seed`: the ordinary oracle when it is the recipe's seed."""
    path = runner.oracle_path(job, spec, split)
    return path if seed == base_recipe(job).seed else path.with_name(f"{path.name}_t{seed}")


def member_path(runner: Runner, job: Job, seed: int) -> Path:
    return epsilon_dir(runner, job) / MEMBERS / f"unlearned_s{seed}.safetensors"


def shadow_base_path(runner: Runner, job: Job, k: int) -> Path:
    base = job.base_path.name.removesuffix(".safetensors")
    name = f"{base}__H{shadows_of(job)}s{runner.opts.base_seed}k{k}"
    return runner.opts.ckpt_dir / SHADOW_DIR / name


def shadow_path(runner: Runner, job: Job, k: int) -> Path:
    return epsilon_dir(runner, job) / ULIRA_DIR / f"shadow{k}.safetensors"


def _split(runner: Runner, job: Job) -> tuple[ForgetSpec, Split]:
    """The forget set of the whole evaluation: the split of run seed s."""
    return runner.split_for(job, runner.job_data(job).raw, runner.opts.base_seed)


# ---------------------------------------------------------------------------------------------
# Tasks


def tasks(runner: Runner, job: Job) -> list[Task]:
    """The many-model and U-LiRA tasks of one experiment (none without ``"evaluate"``)."""
    n, shadows = models_of(job), shadows_of(job)
    if not n:
        return []
    base = runner.base_key(job)
    spec, split = runner.split_for(job, runner.raw(job.dataset, job.dataset_args),
                                   runner.opts.base_seed)  # fmt: skip
    recipe_seed = base_recipe(job).seed
    out: list[Task] = []
    for i, seed in enumerate(seeds(runner, job)):
        path = model_oracle_path(runner, job, spec, split, seed)
        kind = ORACLE if seed == recipe_seed else MODEL_ORACLE  # the ordinary one: k = 0
        # keys as running/graph.py names cache entries: the kind and the path
        out.append(Task(f"{kind}:{path}", kind, str(path), (base,), job.index,
                        0 if kind == ORACLE else i))  # fmt: skip
    for i, seed in enumerate(seeds(runner, job)):
        key = f"{MODEL_RUN}:{job.folder}/s{seed}"
        out.append(Task(key, MODEL_RUN, str(member_path(runner, job, seed)), (base,), job.index, i))
    eps_key = f"{EPSILON}:{job.folder}"
    d = epsilon_dir(runner, job)
    out.append(Task(eps_key, EPSILON, str(d / EPSILON_FILE), tuple(t.key for t in out),
                    job.index))  # fmt: skip
    if shadows:
        shadow_keys = []
        for k in range(shadows):
            bpath = shadow_base_path(runner, job, k)
            bkey = f"{SHADOW_BASE}:{bpath}"
            out.append(Task(bkey, SHADOW_BASE, str(bpath), (), job.index, k))
            skey = f"{SHADOW}:{job.folder}/{k}"
            out.append(Task(skey, SHADOW, str(shadow_path(runner, job, k)), (bkey,), job.index, k))
            shadow_keys.append(skey)
        out.append(Task(f"{ULIRA}:{job.folder}", ULIRA, str(d / ULIRA_FILE),
                        (eps_key, *shadow_keys), job.index))  # fmt: skip
    return out


def task_done(runner: Runner, task: Task) -> bool:
    """Whether a task's output is present and readable."""
    path = Path(task.path)
    if task.kind == MODEL_ORACLE:
        return runner.task_done(dataclasses.replace(task, kind=ORACLE))
    if task.kind == SHADOW_BASE:
        return checkpoint_problem(path) is None
    if task.kind in (MODEL_RUN, SHADOW):
        try:
            _read(path)
        except UserError:
            return False
        return True
    if task.kind == EPSILON:
        return _json(path) is not None and (path.parent / CONFIDENCES_FILE).is_file()
    return task.kind == ULIRA and _json(path) is not None


def execute(runner: Runner, task: Task) -> str:
    """Do one many-model or U-LiRA task in this process; the line it reports."""
    job = runner.jobs[task.job]
    if task.kind == MODEL_ORACLE:
        model_oracle(runner, job, task.k)
        return ""
    if task.kind == MODEL_RUN:
        model_run(runner, job, task.k)
        return ""
    if task.kind == SHADOW_BASE:
        shadow_base(runner, job, task.k)
        return ""
    if task.kind == SHADOW:
        shadow_run(runner, job, task.k)
        return ""
    if task.kind == EPSILON:
        e = epsilon(runner, job)
        return (f"== {job.folder}: eps score {e['score']:.4f} (F {e['forgetting_quality']:.4f}) "
                f"over {e['n_models']} models")  # fmt: skip
    if task.kind == ULIRA:
        u = run_ulira(runner, job)
        return (f"== {job.folder}: U-LiRA over {int(u['n_shadows'])} shadows: acc "
                f"{u['acc']:.3f}, AUC {u['auc']:.3f}, TPR@1% {u['tpr_1pct']:.3f}")  # fmt: skip
    raise ValueError(f"task {task.key}: not a many-model task")


# ---------------------------------------------------------------------------------------------
# Files


def _write(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = {"format": FORMAT} | {k: dumps(v, indent=None) for k, v in meta.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=text)


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "format"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"{path}: not readable ({e})") from None
    return tensors, meta


def _json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _outputs(tensors: dict[str, Tensor], prefix: str) -> Outputs:
    return Outputs(*(tensors[f"{prefix}.{k}"] for k in ("logits", "labels", "losses", "indices")))


# ---------------------------------------------------------------------------------------------
# The N oracles and N unlearned models


def model_oracle(runner: Runner, job: Job, i: int) -> Path:
    """Train (or find cached) the oracle of training seed s + i, with its whole-pool outputs."""
    spec, split = _split(runner, job)
    seed = runner.opts.base_seed + i
    path = model_oracle_path(runner, job, spec, split, seed)
    recipe = dataclasses.replace(base_recipe(job), seed=seed)
    digest = indices_hash(split.forget)[:16]
    build_once(path, lambda: train_checkpoint(
        recipe, spec, path.parent, device=runner.opts.device, data=runner.job_data(job),
        raw=runner.raw(job.dataset, job.dataset_args), stem=path.name,
        extra_meta={"base_checkpoint": str(job.base_path), "forget_sha256": digest},
        quiet=runner.opts.quiet, verbose=runner.opts.verbose, data_dir=runner.opts.data_dir,
        encoder_dir=runner.opts.ckpt_dir / ENCODERS, pretrain_oracle=job.cfg.pretrain_oracle,
    ))  # fmt: skip
    runner.whole_outputs(_checkpoint(runner, path), job)
    return path


def _checkpoint(runner: Runner, path: Path) -> Checkpoint:
    return runner.load_model(path)


def model_run(runner: Runner, job: Job, i: int) -> Path:
    """Unlearn the evaluation's forget set from the base model with seed s + i; keep the
    forget-set outputs, the retain and test accuracies and the work."""
    seed = runner.opts.base_seed + i
    data = runner.job_data(job)
    spec, split = _split(runner, job)
    unl = runner.unlearn_from(job, data, split, runner.base_model(job), seed, log=False)

    def outputs(name: str) -> Outputs:
        idx = getattr(split, name)
        return collect_outputs(unl.model, data.batches(idx, EVAL_BATCH, source=source_of(name)))

    forget = outputs("forget")
    meta = {
        "kind": "unlearned",
        "experiment": job.folder,
        "method": job.cfg.method,
        "seed": seed,
        "forget_sha256": indices_hash(split.forget),
        "retain_acc": accuracy(outputs("retain")),
        "test_acc": accuracy(outputs("test")),
        "cost": unl.work.to_json() | {"wall_seconds": unl.unlearn_seconds},
    }
    path = member_path(runner, job, seed)
    tensors = {f"forget.{k}": getattr(forget, k) for k in ("logits", "labels", "losses", "indices")}
    _write(path, tensors, meta)
    return path


def _oracle_parts(runner: Runner, job: Job, path: Path, split: Split) -> dict[str, Outputs]:
    """An oracle's forget, retain and test outputs, from its saved whole-pool outputs."""
    whole = runner.whole_outputs(_checkpoint(runner, path), job)
    data = runner.job_data(job)
    idx = {n: getattr(split, n) for n in ("forget", "retain", "test")}
    labels = {n: data.y[source_of(n)][i].cpu() for n, i in idx.items()}
    return select_splits(whole, idx, labels)


def epsilon(runner: Runner, job: Job) -> dict[str, Any]:
    """The epsilon task: confidences of all 2N models, per-example epsilon and the score."""
    spec, split = _split(runner, job)
    members = [_read(member_path(runner, job, s)) for s in seeds(runner, job)]
    u_conf, indices = confidence_matrix([_outputs(t, "forget") for t, _ in members])
    oracles = [model_oracle_path(runner, job, spec, split, s) for s in seeds(runner, job)]
    parts = [_oracle_parts(runner, job, p, split) for p in oracles]
    r_conf, r_indices = confidence_matrix([o["forget"] for o in parts])
    if not torch.equal(indices, r_indices):
        raise RuntimeError(f"{job.folder}: the oracles and unlearned models cover other examples")
    acc = Accuracies.from_models(
        [m["retain_acc"] for _, m in members],
        [m["test_acc"] for _, m in members],
        [accuracy(o["retain"]) for o in parts],
        [accuracy(o["test"]) for o in parts],
    )
    u_cost = [m["cost"] for _, m in members]
    r_cost = [sidecar_cost(read_meta(p)) for p in oracles]
    extra = {
        "experiment": job.folder,
        "method": job.cfg.method,
        "seeds": seeds(runner, job),
        "forget": spec.to_json() | {"n": len(split.forget), "sha256": indices_hash(split.forget)},
        "oracles": [str(p) for p in oracles],
        "per_model": {
            "retain_acc_unlearned": [m["retain_acc"] for _, m in members],
            "test_acc_unlearned": [m["test_acc"] for _, m in members],
            "retain_acc_retrained": [accuracy(o["retain"]) for o in parts],
            "test_acc_retrained": [accuracy(o["test"]) for o in parts],
        },
        "cost": {"unlearned": _total(u_cost), "retrained": _total(r_cost)},
    }
    d = epsilon_dir(runner, job)
    write_epsilon(d, u_conf, r_conf, acc, indices.tolist(), extra)
    result = _json(d / EPSILON_FILE)
    assert result is not None
    return result


def _total(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Sums of the work records of several models (None where one records no such number)."""
    out: dict[str, float | None] = {}
    for key in ("backward_samples", "forward_samples", "steps", "wall_seconds", "cpu_seconds"):
        vals = [r.get(key) for r in records]
        ok = all(isinstance(v, (int, float)) for v in vals)
        out[key] = float(sum(v for v in vals if isinstance(v, (int, float)))) if ok else None
    return out


# ---------------------------------------------------------------------------------------------
# U-LiRA


def _shadow_masks(runner: Runner, job: Job, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Halves and forget sets of the K shadows over ``split.train`` (positions)."""
    train = split.train.numpy()
    candidates = np.isin(train, split.forget.numpy())
    return shadow_masks(len(train), shadows_of(job), runner.opts.base_seed,
                        forget_size=len(split.forget), candidates=candidates)  # fmt: skip


def shadow_base(runner: Runner, job: Job, k: int) -> Path:
    """Train (or find cached) shadow base model k: the base recipe, training seed s + k, on
    half k of the pool's training part."""
    _, split = _split(runner, job)
    trained, _ = _shadow_masks(runner, job, split)
    out_of_half = split.train[torch.from_numpy(~trained[k])]
    spec = ForgetSpec(indices=tuple(int(i) for i in out_of_half))
    recipe = dataclasses.replace(base_recipe(job), seed=runner.opts.base_seed + k)
    path = shadow_base_path(runner, job, k)
    build_once(path, lambda: train_checkpoint(
        recipe, spec, path.parent, device=runner.opts.device,
        data=runner.device_data(job.dataset, job.dataset_args),
        raw=runner.raw(job.dataset, job.dataset_args), stem=path.name,
        extra_meta={"shadow": {"of": str(job.base_path), "k": k, "shadows": shadows_of(job),
                               "seed": runner.opts.base_seed}},
        quiet=runner.opts.quiet, verbose=runner.opts.verbose, data_dir=runner.opts.data_dir,
        encoder_dir=runner.opts.ckpt_dir / ENCODERS, pretrain_oracle=job.cfg.pretrain_oracle,
    ))  # fmt: skip
    return path


def shadow_run(runner: Runner, job: Job, k: int) -> Path:
    """Shadow k unlearns its forget set with the experiment's method (seed s + k); its
    confidences on the evaluated forget set are kept with the masks of that set."""
    data = runner.job_data(job)
    _, split = _split(runner, job)
    trained, forgotten = _shadow_masks(runner, job, split)
    half = split.train[torch.from_numpy(trained[k])]
    forget = split.train[torch.from_numpy(forgotten[k])]
    retain = half[~torch.isin(half, forget)]
    shadow_split = dataclasses.replace(split, train=half, forget=forget, retain=retain)
    base = _checkpoint(runner, shadow_base_path(runner, job, k))
    seed = runner.opts.base_seed + k
    unl = runner.unlearn_from(job, data, shadow_split, base, seed, log=False)
    target = split.forget
    out = collect_outputs(unl.model, data.batches(target, EVAL_BATCH))
    pos = torch.searchsorted(split.train, target)  # the evaluated examples' positions
    meta = {"kind": "shadow", "experiment": job.folder, "k": k, "seed": seed,
            "cost": unl.work.to_json() | {"wall_seconds": unl.unlearn_seconds}}  # fmt: skip
    tensors = {
        "confidence": logit_confidence(out.logits, out.labels),
        "indices": out.indices,
        "trained": torch.from_numpy(trained[k])[pos],
        "forgotten": torch.from_numpy(forgotten[k])[pos],
    }
    path = shadow_path(runner, job, k)
    _write(path, tensors, meta)
    return path


def run_ulira(runner: Runner, job: Job) -> dict[str, Any]:
    """The ulira task: fit on the K shadows, attack the N unlearned models and N oracles."""
    d = epsilon_dir(runner, job)
    with safe_open(str(d / CONFIDENCES_FILE), "pt") as f:
        unlearned, retrained = f.get_tensor("unlearned"), f.get_tensor("retrained")
    eps = _json(d / EPSILON_FILE) or {}
    indices = torch.tensor(eps.get("forget_indices", []), dtype=torch.long)
    rows = [_read(shadow_path(runner, job, k))[0] for k in range(shadows_of(job))]
    for k, r in enumerate(rows):
        if not torch.equal(r["indices"].sort().values, indices):
            raise RuntimeError(f"{job.folder}: shadow {k} covers other examples")
    order = [torch.argsort(r["indices"]) for r in rows]  # columns in pool-index order
    confs = np.stack([r["confidence"][o].numpy() for r, o in zip(rows, order, strict=True)])
    forgot = np.stack([r["forgotten"][o].numpy() for r, o in zip(rows, order, strict=True)])
    trained = np.stack([r["trained"][o].numpy() for r, o in zip(rows, order, strict=True)])
    targets = torch.cat([unlearned, retrained]).numpy()
    n = len(unlearned)
    is_unlearned = np.zeros(targets.shape, dtype=bool)
    is_unlearned[:n] = True
    k = len(rows)
    result = ulira(confs, forgot, ~trained, targets, is_unlearned, ~is_unlearned,
                   fixed_variance=k < FIXED_VARIANCE_BELOW)  # fmt: skip
    result |= {
        "experiment": job.folder,
        "method": job.cfg.method,
        "n_targets_unlearned": n,
        "n_targets_retrained": len(retrained),
        "fixed_variance": k < FIXED_VARIANCE_BELOW,
        "ideal": {"acc": 0.5, "auc": 0.5, "tpr_1pct": 0.01, "tpr_01pct": 0.001},
    }
    write_json(d / ULIRA_FILE, result)
    return result


# ---------------------------------------------------------------------------------------------
# Summary


SUMMARY_KEYS = {
    "eps_score": (EPSILON_FILE, "score"),
    "eps_quality": (EPSILON_FILE, "forgetting_quality"),
    "eps_models": (EPSILON_FILE, "n_models"),
    "ulira_acc": (ULIRA_FILE, "acc"),
    "ulira_auc": (ULIRA_FILE, "auc"),
    "ulira_tpr_1pct": (ULIRA_FILE, "tpr_1pct"),
    "ulira_tpr_01pct": (ULIRA_FILE, "tpr_01pct"),
}


def attach(runner: Runner, results: list[RunResult]) -> list[RunResult]:
    """Put each experiment's eps score and U-LiRA numbers into its runs' ``extra`` (read by
    the summary tables; metrics.json itself is not rewritten)."""
    for job in runner.jobs:
        if not models_of(job):
            continue
        d = epsilon_dir(runner, job)
        files = {name: _json(d / name) for name in (EPSILON_FILE, ULIRA_FILE)}
        found = {key: (files[f] or {}).get(k) for key, (f, k) in SUMMARY_KEYS.items()}
        for r in results:
            if r.experiment == job.folder:
                r.extra.update({k: v for k, v in found.items() if isinstance(v, (int, float))})
    return results


__all__ = ["KINDS", "attach", "execute", "task_done", "tasks"]
