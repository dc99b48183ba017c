"""The experiment runner: validate everything, then run every experiment over every seed.

For each experiment and seed: build the split from the base checkpoint's recorded split
settings, find or train the retrain oracle for exactly that forget set, compute the saliency
mask if asked, unlearn, evaluate the unlearned, base and oracle models with one pass per split,
and write ``metrics.json``, the model and the mask atomically into the run folder. A rerun with
the same ``--out`` skips finished runs.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import metrics as M
from core.errors import UserError, did_you_mean
from core.io import atomic_write_text
from datasets import (
    DeviceData,
    ForgetSpec,
    RawData,
    Split,
    indices_hash,
    make_forget_spec,
    make_split,
)
from evaluation.replacement import relabelled, replacement_metrics
from methods import MethodContext, Monitor, copy_model
from models import build_model
from running.config import ExperimentConfig
from running.tables import summarize, to_csv, to_markdown
from running.wandb_log import WandbLogger
from training.checkpoints import checkpoint_exists, load_checkpoint, read_meta, save_checkpoint
from training.config import TrainConfig
from training.loop import EVAL_BATCH
from training.mask import SaliencyMask
from training.recipe import checkpoint_stem, load_data, resolved_model, train_checkpoint
from unlearning import method_spec

SPLITS = ("forget", "retain", "test", "test_forget", "val")


@dataclass
class Job:
    """One experiment, resolved: where its base checkpoint is and which data it uses."""

    index: int
    cfg: ExperimentConfig
    base_path: Path
    base_train: TrainConfig | None  # set when the base checkpoint must be trained first
    dataset: str
    dataset_args: dict[str, Any]
    split_seed: int
    val_fraction: float
    classes: list[int] | None = None  # the base model's trained class subset; None = all

    @property
    def folder(self) -> str:
        return f"{self.index:02d}_{self.cfg.name}"


def _train_cfg_key(cfg: TrainConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_json(), sort_keys=True).encode()).hexdigest()[:8]


class Runner:
    def __init__(
        self,
        experiments: list[ExperimentConfig],
        *,
        source: str,
        nexp: int,
        base_seed: int,
        device: torch.device,
        out: Path,
        ckpt_dir: Path,
        data_dir: Path | None,
        wandb_mode: str,
        project: str = "unlearning",
        quiet: bool = False,
    ) -> None:
        self.experiments = experiments
        self.source = source
        self.nexp = nexp
        self.base_seed = base_seed
        self.device = device
        self.out = out
        self.ckpt_dir = ckpt_dir
        self.data_dir = data_dir
        self.quiet = quiet
        self.wandb = WandbLogger(wandb_mode, project, out)
        self._raw: dict[str, RawData] = {}
        self._dev: dict[str, DeviceData] = {}
        self._models: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
        self._outs: dict[tuple[str, str], dict[str, M.Outputs]] = {}
        # base and oracle reports: experiments sharing a base model and forget set share them
        self._reports: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.jobs: list[Job] = []

    # -- validation ------------------------------------------------------------------------

    def raw(self, dataset: str, dataset_args: dict[str, Any]) -> RawData:
        key = json.dumps([dataset, dataset_args], sort_keys=True)
        if key not in self._raw:
            self._raw[key] = load_data(
                TrainConfig(dataset=dataset, dataset_args=dataset_args), self.data_dir
            )
        return self._raw[key]

    def device_data(self, dataset: str, dataset_args: dict[str, Any]) -> DeviceData:
        key = json.dumps([dataset, dataset_args], sort_keys=True)
        if key not in self._dev:
            self._dev[key] = DeviceData(self.raw(dataset, dataset_args), self.device)
        return self._dev[key]

    def spec_for(self, job: Job, seed: int) -> ForgetSpec:
        c = job.cfg
        where = f"{self.source}: experiment {job.index}: "
        if c.replace_class is not None:  # forget `old`; `new` takes its output slot
            return ForgetSpec(classes=(c.replace_class["old"],), replace=c.replace_class["new"],
                              seed=seed)  # fmt: skip
        return make_forget_spec(c.class_to_forget, c.unlearning_rate, c.idxs_to_forget, seed, where)

    def job_data(self, job: Job) -> DeviceData:
        """The job's data; in class replacement, with `new` relabelled to `old` (scenarios)."""
        data = self.device_data(job.dataset, job.dataset_args)
        rc = job.cfg.replace_class
        if rc is None:
            return data
        key = json.dumps([job.dataset, job.dataset_args, rc], sort_keys=True)
        if key not in self._dev:
            self._dev[key] = relabelled(data, rc["old"], rc["new"])
        return self._dev[key]

    def resolve(self) -> list[Job]:
        """Check every experiment against its checkpoint and data before anything trains."""
        jobs = []
        for i, cfg in enumerate(self.experiments):
            where = f"{self.source}: experiment {i}: "
            if isinstance(cfg.checkpoint, TrainConfig):
                t = cfg.checkpoint
                stem = f"{checkpoint_stem(t, ForgetSpec())}_{_train_cfg_key(t)}"
                model_name = resolved_model(t)
                job = Job(i, cfg, self.ckpt_dir / stem, t, t.dataset, t.dataset_args,
                          t.split_seed, t.val_fraction, t.classes)  # fmt: skip
            else:
                meta = read_meta(cfg.checkpoint)
                if meta.get("kind") == "retrain":
                    print(
                        f"warning: {where}checkpoint {cfg.checkpoint} is a retrain oracle, "
                        "not a base model",
                        file=sys.stderr,
                    )
                model_name = meta["model"]
                job = Job(i, cfg, Path(cfg.checkpoint), None, meta["dataset"],
                          meta.get("dataset_args", {}), meta["split"]["split_seed"],
                          meta["split"]["val_fraction"],
                          meta["split"].get("classes"))  # fmt: skip
            raw = self.raw(job.dataset, job.dataset_args)
            cf = cfg.class_to_forget
            for c in cf if isinstance(cf, list) else ([cf] if cf is not None else []):
                if c >= raw.num_classes:
                    raise UserError(
                        f"{where}key 'class_to_forget': {c} is outside the checkpoint's classes "
                        f"0..{raw.num_classes - 1}"
                    )
            for k in range(self.nexp):
                try:
                    make_split(raw, self.spec_for(job, self.base_seed + k), job.split_seed,
                               job.val_fraction, job.classes)  # fmt: skip
                except UserError as e:
                    key = "key 'replace_class': " if cfg.replace_class is not None else ""
                    raise UserError(f"{where}{key}{e}") from None
            if cfg.load_mask is not None or cfg.frozen:
                self._check_model_keys(cfg, build_model(model_name, raw.num_classes,
                                                        raw.in_chans), model_name, where)  # fmt: skip
            jobs.append(job)
        self.jobs = jobs
        return jobs

    @staticmethod
    def _check_model_keys(cfg: ExperimentConfig, model: nn.Module, name: str, where: str) -> None:
        """A mask file and the frozen prefixes must fit the model (an untrained skeleton)."""
        if cfg.load_mask is not None:
            try:
                SaliencyMask.load(cfg.load_mask, model)
            except UserError as e:
                raise UserError(f"{where}key 'load_mask': {e}") from None
        params = [n for n, _ in model.named_parameters()]
        for prefix in cfg.frozen:
            if not any(n == prefix or n.startswith(prefix + ".") for n in params):
                modules = [n for n, _ in model.named_modules() if n]
                raise UserError(
                    f"{where}key 'frozen': {prefix!r} matches no parameter of {name}"
                    f"{did_you_mean(prefix, modules + params)}"
                )

    # -- checkpoints -----------------------------------------------------------------------

    def base_model(self, job: Job) -> tuple[nn.Module, dict[str, Any]]:
        key = str(job.base_path)
        if key not in self._models:
            if job.base_train is not None and not checkpoint_exists(job.base_path):
                train_checkpoint(
                    job.base_train,
                    ForgetSpec(),
                    self.ckpt_dir,
                    device=self.device,
                    data=self.device_data(job.dataset, job.dataset_args),
                    raw=self.raw(job.dataset, job.dataset_args),
                    stem=job.base_path.name,
                    quiet=self.quiet,
                )
            model, meta = load_checkpoint(job.base_path, self.device)
            self._models[key] = (model.eval(), meta)
        return self._models[key]

    def oracle(
        self, job: Job, base_meta: dict[str, Any], spec: ForgetSpec, split: Split
    ) -> tuple[nn.Module, dict[str, Any], Path]:
        """The retrain oracle for this base checkpoint and exactly this forget set."""
        base_stem = Path(str(job.base_path)).name.removesuffix(".safetensors")
        digest = indices_hash(split.forget)[:16]
        # a replacement oracle also learns `new` in `old`'s slot: not the forget-only oracle
        kind = "RF" if spec.replace is None else f"RP{spec.replace}"
        path = self.ckpt_dir / "oracles" / f"{base_stem}__{kind}_{digest}"
        key = str(path)
        if key not in self._models:
            if not checkpoint_exists(path):
                if not self.quiet:
                    print(f"building retrain oracle {path.name}", file=sys.stderr)
                train_checkpoint(
                    TrainConfig.from_json(base_meta["train"]),
                    spec,
                    path.parent,
                    device=self.device,
                    data=self.job_data(job),
                    raw=self.raw(job.dataset, job.dataset_args),
                    stem=path.name,
                    extra_meta={"base_checkpoint": str(job.base_path), "forget_sha256": digest},
                    quiet=self.quiet,
                )
            model, meta = load_checkpoint(path, self.device)
            self._models[key] = (model.eval(), meta)
        model, meta = self._models[key]
        return model, meta, path

    # -- evaluation ------------------------------------------------------------------------

    def outputs(
        self, model: nn.Module, data: DeviceData, split: Split, cache_key: str | None = None
    ) -> dict[str, M.Outputs]:
        key = self._outputs_key(split, cache_key)
        if cache_key is not None and key in self._outs:
            return self._outs[key]
        outs = {}
        for name in SPLITS:
            idx = getattr(split, name)
            source = "test" if name.startswith("test") else "train"
            outs[name] = M.collect_outputs(model, data.batches(idx, EVAL_BATCH, source=source))
        if cache_key is not None:
            self._outs[key] = outs
        return outs

    @staticmethod
    def _outputs_key(split: Split, cache_key: str | None) -> tuple[str, str]:
        return (cache_key or "", indices_hash(split.forget) + str(split.spec.classes)
                + str(split.spec.replace))  # fmt: skip

    def reference(
        self, model: nn.Module, data: DeviceData, split: Split, cache_key: str, seed: int
    ) -> tuple[dict[str, M.Outputs], dict[str, Any]]:
        """Outputs and report of a base model or oracle, computed once per split and seed."""
        outs = self.outputs(model, data, split, cache_key)
        key = (*self._outputs_key(split, cache_key), seed)
        if key not in self._reports:
            self._reports[key] = M.model_report(outs, seed, data.num_classes)
        return outs, self._reports[key]

    # -- running ---------------------------------------------------------------------------

    def run_dir(self, job: Job, k: int) -> Path:
        return self.out / "runs" / job.folder / f"seed{self.base_seed + k}"

    def run_all(self) -> list[dict[str, Any]]:
        total = len(self.jobs) * self.nexp
        done = 0
        bar = tqdm(total=total, desc="runs", unit="run", disable=None)
        try:
            for job in self.jobs:
                for k in range(self.nexp):
                    d = self.run_dir(job, k)
                    if (d / "metrics.json").is_file():
                        if not self.quiet:
                            print(f"skip {job.folder} seed {self.base_seed + k}: finished",
                                  file=sys.stderr)  # fmt: skip
                    else:
                        self.run_one(job, k)
                    done += 1
                    bar.update(1)
        finally:
            bar.close()
            results = self.collect()
            self.write_summary(results)
        return results

    def run_one(self, job: Job, k: int) -> dict[str, Any]:
        seed = self.base_seed + k
        cfg = job.cfg
        label = f"{job.folder} seed {seed}"
        if not self.quiet:
            print(f"== {label}: {cfg.method} on {job.dataset}", file=sys.stderr)
        base, base_meta = self.base_model(job)
        data = self.job_data(job)
        spec = self.spec_for(job, seed)
        split = make_split(data.raw, spec, job.split_seed, job.val_fraction, job.classes)
        oracle, oracle_meta, oracle_path = self.oracle(job, base_meta, spec, split)

        torch.manual_seed(seed)
        model = copy.deepcopy(base).train()
        original = copy_model(base)
        recipe = TrainConfig.from_json(base_meta["train"])
        ctx = MethodContext(data, split, seed, original, recipe, base_meta["model"])
        run_name = f"{job.folder}_s{seed}"
        self.wandb.start(run_name, job.folder, cfg.to_json() | {"seed": seed})
        monitor = Monitor(self.wandb.log, quiet=self.quiet)

        start = time.perf_counter()
        mask = None
        if cfg.load_mask:
            mask = SaliencyMask.load(cfg.load_mask, model)
        elif cfg.use_mask:
            mask = SaliencyMask.compute(model, data, split.forget, cfg.mask_thr, cfg.batch_size)
        mask_seconds = time.perf_counter() - start
        spec_m = method_spec(cfg.method)
        model = spec_m.fn(model, ctx, cfg.settings(), mask, monitor)
        # the per-epoch monitoring is bookkeeping, not unlearning work
        unlearn_seconds = time.perf_counter() - start - monitor.excluded_seconds
        model.eval()

        eval_start = time.perf_counter()
        outs = self.outputs(model, data, split)
        base_outs, base_report = self.reference(base, data, split, str(job.base_path), seed)
        oracle_outs, oracle_report = self.reference(oracle, data, split, str(oracle_path), seed)
        nc = data.num_classes
        report = M.model_report(outs, seed, nc)
        gaps = M.oracle_comparison(report, oracle_report, outs, oracle_outs)
        l2 = M.l2_distance(model, original)
        result: dict[str, Any] = {
            "experiment": job.folder,
            "index": job.index,
            "name": cfg.name,
            "method": cfg.method,
            "seed": seed,
            "forget": spec.to_json()
            | {"n": len(split.forget), "sha256": indices_hash(split.forget)},
            "metrics": report | {"l2_to_base": l2},
            "oracle": oracle_report | {"l2_to_base": M.l2_distance(oracle, original)},
            "base": base_report,
            "gaps": gaps,
            "times": M.time_efficiency(unlearn_seconds, float(oracle_meta["train_seconds"]))
            | {"mask_time": mask_seconds},
            "mask_kept": mask.kept_fraction() if mask is not None else None,
            "oracle_checkpoint": str(oracle_path),
            "base_checkpoint": str(job.base_path),
        }
        if cfg.frozen:
            moved = M.changed_parameters(model, original, cfg.frozen)
            result["frozen_changed"] = moved
            if moved:
                raise RuntimeError(
                    f"{label}: method '{cfg.method}' changed frozen parameters: {', '.join(moved)}"
                )
        if spec.replace is not None:
            result["replacement"] = {
                "unlearned": replacement_metrics(outs, data.raw, spec, split, nc),
                "base": replacement_metrics(base_outs, data.raw, spec, split, nc),
                "oracle": replacement_metrics(oracle_outs, data.raw, spec, split, nc),
            }
        elif spec.classes:
            result["challenge"] = M.challenge_score(
                report["forget_acc"], report["retain_acc"], l2, report["kl_uniform_forget"],
                frozen_changed=result.get("frozen_changed", []),
            )  # fmt: skip
        result["times"]["eval_time"] = time.perf_counter() - eval_start

        d = self.run_dir(job, k)
        save_checkpoint(
            d / "model",
            model,
            base_meta
            | {
                "kind": "unlearned",
                "method": cfg.method,
                "experiment": cfg.to_json(),
                "seed": seed,
                "base_checkpoint": str(job.base_path),
                "split": base_meta["split"] | {"forget": spec.to_json()},
            },
            split.forget,
        )
        if mask is not None:
            mask.save(d / "mask.safetensors")
        atomic_write_text(d / "metrics.json", json.dumps(_clean(result), indent=2))
        flat = _flat(result)
        self.wandb.finish(flat)
        if not self.quiet:
            r, g = report, gaps
            print(
                f"   {label}: forget {r['forget_acc']:.4f} (oracle {oracle_report['forget_acc']:.4f})"
                f"  retain {r['retain_acc']:.4f}  test {r['test_acc']:.4f}"
                f"  MIA {r['mia_efficacy']:.4f}  avg gap {g['avg_gap']:.2f}"
                f"  time {unlearn_seconds:.1f}s",
                file=sys.stderr,
            )
            if "replacement" in result:
                rp = result["replacement"]["unlearned"]
                print(f"   {label}: replacement: new in old's slot {rp['new_acc']:.4f}  old still "
                      f"there {rp['old_acc']:.4f}  untouched {rp['untouched_acc']:.4f} (test)",
                      file=sys.stderr)  # fmt: skip
        return result

    # -- results ---------------------------------------------------------------------------

    def collect(self) -> list[dict[str, Any]]:
        results = []
        for job in self.jobs:
            for k in range(self.nexp):
                p = self.run_dir(job, k) / "metrics.json"
                if p.is_file():
                    results.append(json.loads(p.read_text()))
        return results

    def write_summary(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = summarize(results, [j.folder for j in self.jobs])
        if not rows:
            return rows
        atomic_write_text(self.out / "summary.csv", to_csv(rows))
        md = to_markdown(rows)
        atomic_write_text(self.out / "summary.md", md + "\n")
        return rows


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write null instead, so every tool can read the file."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _flat(result: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for sect in ("metrics", "gaps", "times"):
        for k, v in result.get(sect, {}).items():
            flat[f"{sect}/{k}"] = v
    for k, v in result.get("oracle", {}).items():
        flat[f"oracle/{k}"] = v
    if "challenge" in result:
        flat["challenge/score"] = result["challenge"]["score"]
    return flat


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


__all__ = ["Runner", "timestamp"]
