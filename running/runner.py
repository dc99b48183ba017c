"""The experiment runner: validate everything, then run every experiment over every seed.

A run (:meth:`Runner.run_one`) is four steps:

1. prepare: the base model (trained first when the experiment gives a recipe), the data, the
   split from the base checkpoint's recorded split settings, and the retrain oracle of exactly
   that forget set (from the cache, else trained);
2. unlearn: the saliency mask if asked, then the method, timed without its monitoring;
3. evaluate: one pass of the unlearned model per split; the base model's and the oracle's
   outputs are a selection by index from their whole-pool outputs, computed once per cache
   entry and saved with the checkpoint (``running/results.py``);
4. persist: model, mask, ``outputs.safetensors`` and ``metrics.json``, each atomically,
   ``metrics.json`` last.

A rerun with the same ``--out`` skips the runs whose manifest verifies and redoes the others;
several processes may share one ``--out`` (each run and each cache entry has a lock, see
``running/rundir.py`` and :func:`training.checkpoints.build_once`).

The sweep is a task graph (``running/graph.py``: base models, oracles, runs, summary);
:meth:`Runner.execute` does one task in this process, :meth:`Runner.run_all` all of them one
after the other, and ``running/workers.py`` the same tasks on a pool of worker processes, each
rebuilding its runner from :meth:`Runner.arguments` (a JSON string). Every task sets its thread
count first (``running/threads.py``) and records it in what it writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import numbers
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import metrics as M
from core import rng
from core.errors import UserError, did_you_mean
from core.io import atomic_write_text, dumps, strict
from core.locks import locked, try_locked
from datasets import (
    DeviceData,
    ForgetSpec,
    RawData,
    Split,
    indices_hash,
    make_forget_spec,
    make_split,
    pick_device,
)
from evaluation.replacement import relabelled, replacement_metrics
from evaluation.repr_eval import FeatureCapture, ReprCache
from methods import MethodContext, Monitor, copy_model
from models import build_model
from running import many_models
from running.config import ExperimentConfig, parse_experiment
from running.graph import (
    BASE,
    DONE,
    HELD,
    ORACLE,
    RUN,
    SKIPPED,
    SUMMARY,
    Graph,
    Progress,
    Task,
    expand,
    run_in_order,
)
from running.results import (
    METRICS_FILE,
    OUTPUTS_FILE,
    RunResult,
    load_reference,
    reference_path,
    save_outputs,
    save_reference,
    select_splits,
    source_of,
)
from running.rundir import run_finished, run_problem, unfinish, write_manifest
from running.tables import summarize, to_csv, to_markdown
from running.threads import DEFAULT_THREADS, apply_threads, execution_record, made_with
from running.wandb_log import WandbLogger
from training.checkpoints import (
    build_once,
    checkpoint_problem,
    checkpoint_stem,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
    versions,
)
from training.config import TrainConfig
from training.cost import Work, count_work, machine, sidecar_cost
from training.loop import EVAL_BATCH
from training.mask import SaliencyMask
from training.outputs import Outputs, collect_outputs
from training.precision import channels_last, contiguous, set_amp
from training.pretrain import ENCODERS, oracle_approximation, shares_encoder
from training.recipe import (
    base_checkpoint_name,
    load_data,
    oracle_checkpoint_name,
    resolved_model,
    train_checkpoint,
)
from unlearning import unlearn as run_method  # (Runner.unlearn is the step around it)

# base and oracle reports shared by the processes of a sweep: <out>/references/<key hash>.json
REFERENCES = "references"
# the splits a run evaluates and saves (empty ones give NaN metrics and are not saved)
SPLITS = ("forget", "retain", "val", "val_forget", "test", "test_forget")
# what the unlearned model's sidecar (model.json) takes from the base model's: how to build it
MODEL_KEYS = ("model", "dataset", "dataset_args", "num_classes", "in_chans", "img_size")
# the unlearned model's own numbers in its sidecar
SIDECAR_METRICS = (
    "forget_acc", "retain_acc", "val_acc", "test_acc", "test_forget_acc", "mia_efficacy",
)  # fmt: skip


@dataclass(frozen=True)
class RunnerOptions:
    """How to run: where the experiments came from, where results and checkpoints go, how
    many seeds from which one, on which device, and W&B logging."""

    source: str  # names the experiment list in messages ("exp/x.json", "command line")
    out: Path
    ckpt_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    nexp: int = 1
    base_seed: int = 0
    data_dir: Path | None = None
    wandb_mode: str = "disabled"
    project: str = "unlearning"
    quiet: bool = False
    verbose: bool = False  # a line per epoch (quiet wins)
    threads: int = DEFAULT_THREADS  # CPU threads of every task (running/threads.py)
    amp: bool = True  # mixed precision on CUDA (training/precision.py)
    representation: bool = True  # the repr section of metrics.json (main.py --no-repr: off)

    def to_json(self) -> dict[str, Any]:
        """Plain values only: what a worker process receives (:meth:`Runner.arguments`)."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for key in ("out", "ckpt_dir", "data_dir", "device"):
            out[key] = None if out[key] is None else str(out[key])
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunnerOptions:
        values = dict(obj)
        for key in ("out", "ckpt_dir", "data_dir"):
            values[key] = None if values[key] is None else Path(values[key])
        # as main.py picks it: on CUDA this also puts cuDNN in deterministic mode
        values["device"] = pick_device(values["device"])
        return cls(**values)


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


@dataclass
class Checkpoint:
    """A loaded base model or oracle: the model (eval mode), its sidecar and its path."""

    model: nn.Module
    meta: dict[str, Any]
    path: Path


@dataclass
class Prepared:
    """Step 1's result: everything a run starts from."""

    data: DeviceData
    spec: ForgetSpec
    split: Split
    base: Checkpoint
    oracle: Checkpoint


@dataclass
class Unlearned:
    """Step 2's result: the unlearned model, the model before, the mask and the times."""

    model: nn.Module
    original: nn.Module
    mask: SaliencyMask | None
    mask_seconds: float
    unlearn_seconds: float
    work: Work = field(default_factory=Work)  # mask and method (training/cost.py)


# -- a run folder's files and its record of them ---------------------------------------------------


def _run_finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` is verified finished (a rerun skips it); a damaged one is
    named in one line and redone."""
    return run_finished(run_dir)


def _persist(
    run_dir: Path,
    result: RunResult,
    model: nn.Module,
    sidecar: dict[str, Any],
    forget: Tensor,
    outs: dict[str, Outputs],
    outputs_meta: dict[str, Any],
    mask: SaliencyMask | None,
) -> None:
    """Write a run's files, each atomically, then metrics.json, then the manifest of their
    hashes, which marks the run finished."""
    unfinish(run_dir)
    save_checkpoint(run_dir / "model", model, strict(sidecar), forget)
    files = ["model.safetensors", "model.json", "model_forget.json", OUTPUTS_FILE, METRICS_FILE]
    if mask is not None:
        mask.save(run_dir / "mask.safetensors")
        files.append("mask.safetensors")
    save_outputs(run_dir / OUTPUTS_FILE, outs, outputs_meta)
    result.write(run_dir)
    write_manifest(run_dir, files)


# -- the runner ----------------------------------------------------------------------------------

# executes a sweep's tasks: (runner, graph, progress) -> None
Backend = Callable[["Runner", Graph, Progress], None]


class Runner:
    def __init__(self, experiments: list[ExperimentConfig], opts: RunnerOptions) -> None:
        self.experiments = experiments
        self.opts = opts
        self.wandb = WandbLogger(opts.wandb_mode, opts.project, opts.out)
        self._raw: dict[str, RawData] = {}
        self._dev: dict[str, DeviceData] = {}
        self._models: dict[str, Checkpoint] = {}
        self._whole: dict[str, dict[str, Outputs]] = {}  # whole-pool/test outputs per checkpoint
        # base and oracle reports: experiments sharing a base model and forget set share them
        self._reports: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._repr = ReprCache()  # base-model and oracle features, once per checkpoint
        self.jobs: list[Job] = []

    # -- data --------------------------------------------------------------------------------

    def raw(self, dataset: str, dataset_args: dict[str, Any]) -> RawData:
        key = dumps([dataset, dataset_args], indent=None)
        if key not in self._raw:
            cfg = TrainConfig(dataset=dataset, dataset_args=dataset_args)
            self._raw[key] = load_data(cfg, self.opts.data_dir)
        return self._raw[key]

    def device_data(self, dataset: str, dataset_args: dict[str, Any]) -> DeviceData:
        key = dumps([dataset, dataset_args], indent=None)
        if key not in self._dev:
            self._dev[key] = DeviceData(self.raw(dataset, dataset_args), self.opts.device)
        return self._dev[key]

    def job_data(self, job: Job) -> DeviceData:
        """The job's data; in class replacement, with `new` relabelled to `old` (scenarios)."""
        data = self.device_data(job.dataset, job.dataset_args)
        rc = job.cfg.replace_class
        if rc is None:
            return data
        key = dumps([job.dataset, job.dataset_args, rc], indent=None)
        if key not in self._dev:
            self._dev[key] = relabelled(data, rc["old"], rc["new"])
        return self._dev[key]

    def spec_for(self, job: Job, seed: int) -> ForgetSpec:
        c = job.cfg
        where = f"{self.opts.source}: experiment {job.index}: "
        if c.replace_class is not None:  # forget `old`; `new` takes its output slot
            return ForgetSpec(classes=(c.replace_class["old"],), replace=c.replace_class["new"],
                              seed=seed)  # fmt: skip
        return make_forget_spec(c.class_to_forget, c.unlearning_rate, c.idxs_to_forget, seed, where)

    def split_for(self, job: Job, raw: RawData, seed: int) -> tuple[ForgetSpec, Split]:
        spec = self.spec_for(job, seed)
        return spec, make_split(raw, spec, job.split_seed, job.val_fraction, job.classes)

    # -- validation --------------------------------------------------------------------------

    def resolve(self) -> list[Job]:
        """Check every experiment against its checkpoint and data before anything trains."""
        self.jobs = [self._check(self._job(i, cfg)) for i, cfg in enumerate(self.experiments)]
        return self.jobs

    def _job(self, i: int, cfg: ExperimentConfig) -> Job:
        if isinstance(cfg.checkpoint, TrainConfig):
            t = cfg.checkpoint
            return Job(i, cfg, self.opts.ckpt_dir / base_checkpoint_name(t), t, t.dataset,
                       t.dataset_args, t.split_seed, t.val_fraction, t.classes)  # fmt: skip
        meta = verify_checkpoint(cfg.checkpoint)  # weights and sidecar, before anything runs
        if meta.get("kind") == "retrain":
            print(f"warning: {self.opts.source}: experiment {i}: checkpoint {cfg.checkpoint} "
                  "is a retrain oracle, not a base model", file=sys.stderr)  # fmt: skip
        s = meta["split"]
        return Job(i, cfg, Path(cfg.checkpoint), None, meta["dataset"],
                   meta.get("dataset_args", {}), s["split_seed"], s["val_fraction"],
                   s.get("classes"))  # fmt: skip

    def _check(self, job: Job) -> Job:
        cfg, where = job.cfg, f"{self.opts.source}: experiment {job.index}: "
        raw = self.raw(job.dataset, job.dataset_args)
        wrong = [c for c in job.classes or [] if c >= raw.num_classes]
        if wrong and job.base_train is not None:
            raise UserError(f"{where}key 'checkpoint.classes': {wrong[0]} is outside "
                            f"{job.dataset}'s classes 0..{raw.num_classes - 1}")  # fmt: skip
        cf = cfg.class_to_forget
        for c in cf if isinstance(cf, list) else ([cf] if cf is not None else []):
            if c >= raw.num_classes:
                raise UserError(f"{where}key 'class_to_forget': {c} is outside the "
                                f"checkpoint's classes 0..{raw.num_classes - 1}")  # fmt: skip
        for k in range(self.opts.nexp):
            try:
                self.split_for(job, raw, self.opts.base_seed + k)
            except UserError as e:
                key = "key 'replace_class': " if cfg.replace_class is not None else ""
                raise UserError(f"{where}{key}{e}") from None
        if cfg.load_mask is not None or cfg.frozen:
            bt = job.base_train
            name = resolved_model(bt) if bt is not None else read_meta(job.base_path)["model"]
            model = build_model(name, raw.num_classes, raw.in_chans)
            _check_model_keys(cfg, model, name, where)
        return job

    # -- checkpoints -------------------------------------------------------------------------

    def base_model(self, job: Job) -> Checkpoint:
        key = str(job.base_path)
        if key not in self._models:
            recipe = job.base_train
            if recipe is not None:  # a cache entry: built once, rebuilt if damaged
                build_once(job.base_path, lambda: train_checkpoint(
                    recipe,
                    ForgetSpec(),
                    self.opts.ckpt_dir,
                    device=self.opts.device,
                    data=self.device_data(job.dataset, job.dataset_args),
                    raw=self.raw(job.dataset, job.dataset_args),
                    stem=job.base_path.name,
                    quiet=self.opts.quiet,
                    verbose=self.opts.verbose,
                    data_dir=self.opts.data_dir,
                    encoder_dir=self.opts.ckpt_dir / ENCODERS,
                ))  # fmt: skip
            model, meta = load_checkpoint(job.base_path, self.opts.device)
            self._models[key] = Checkpoint(model.eval(), meta, job.base_path)
        return self._models[key]

    def load_model(self, path: Path) -> Checkpoint:
        """A checkpoint loaded on the device, in eval mode (not kept)."""
        model, meta = load_checkpoint(path, self.opts.device)
        return Checkpoint(model.eval(), meta, path)

    def evaluation_tasks(self, job: Job) -> list[Task]:
        """The graph tasks of the experiment's ``"evaluate"`` (running/many_models.py)."""
        return many_models.tasks(self, job)

    def base_key(self, job: Job) -> str:
        """The graph key of the job's base model: its checkpoint's path without the ending
        (two folders may hold checkpoints of the same name)."""
        return f"{BASE}:{checkpoint_stem(job.base_path)}"

    def oracle_path(self, job: Job, spec: ForgetSpec, split: Split) -> Path:
        """Where the retrain oracle of the job's base model and this forget set is cached."""
        recipe = job.base_train or TrainConfig.from_json(read_meta(job.base_path)["train"])
        shared = shares_encoder(recipe, job.cfg.pretrain_oracle)  # a self-supervised base
        name = oracle_checkpoint_name(checkpoint_stem(job.base_path).name, spec, split.forget,
                                      shared)  # fmt: skip
        return self.opts.ckpt_dir / "oracles" / name

    def oracle_needs_base(self, job: Job) -> bool:
        """Whether building the job's oracles needs its base model first. An oracle is trained
        from scratch with the base recipe, so a supervised recipe's oracles can train while
        the base model trains; a base checkpoint given as a file is read for its recipe, and a
        self-supervised recipe's oracle may reuse the encoder that the base's training made."""
        return job.base_train is None or job.base_train.pretrain is not None

    def oracle(
        self, job: Job, base: Checkpoint | None, spec: ForgetSpec, split: Split
    ) -> Checkpoint:
        """The retrain oracle for this base checkpoint and exactly this forget set (`base`
        may be None where :meth:`oracle_needs_base` says it is not needed)."""
        path = self.oracle_path(job, spec, split)
        key = str(path)
        if key not in self._models:
            if base is not None:
                recipe = TrainConfig.from_json(base.meta["train"])
            elif job.base_train is not None and not self.oracle_needs_base(job):
                recipe = job.base_train
            else:
                raise ValueError(f"{path}: this oracle needs its base model")

            def build() -> None:
                digest = indices_hash(split.forget)[:16]
                train_checkpoint(
                    recipe,
                    spec,
                    path.parent,
                    device=self.opts.device,
                    data=self.job_data(job),
                    raw=self.raw(job.dataset, job.dataset_args),
                    stem=path.name,
                    extra_meta={"base_checkpoint": str(job.base_path), "forget_sha256": digest},
                    quiet=self.opts.quiet,
                    verbose=self.opts.verbose,
                    data_dir=self.opts.data_dir,
                    encoder_dir=self.opts.ckpt_dir / ENCODERS,
                    pretrain_oracle=job.cfg.pretrain_oracle,
                )

            build_once(path, build)  # a cache entry: built once, rebuilt if damaged
            model, meta = load_checkpoint(path, self.opts.device)
            self._models[key] = Checkpoint(model.eval(), meta, path)
        return self._models[key]

    # -- outputs of base models and oracles ----------------------------------------------------

    def whole_outputs(self, ck: Checkpoint, job: Job) -> dict[str, Outputs]:
        """A checkpoint's outputs on the whole pool and test set (raw labels): from the file
        saved with it when made from these weights, else computed once and saved."""
        key = str(ck.path)
        if key not in self._whole:
            path = reference_path(ck.path)
            sha = _weights_sha256(ck.meta)
            outs = _reusable_reference(path, sha)
            if outs is None:
                data = self.device_data(job.dataset, job.dataset_args)
                outs = {part: collect_outputs(ck.model, data.batches(
                            torch.arange(len(data.y[src])), EVAL_BATCH, source=src))
                        for part, src in (("pool", "train"), ("test", "test"))}  # fmt: skip
                meta = _outputs_meta(data) | {"checkpoint": checkpoint_stem(ck.path).name,
                                              "weights_sha256": sha}  # fmt: skip
                try:
                    save_reference(path, outs["pool"], outs["test"], meta)
                except OSError as e:  # a read-only checkpoint folder: keep them in memory
                    print(f"warning: {path}: not saved ({e.strerror})", file=sys.stderr)
            self._whole[key] = outs
        return self._whole[key]

    def reference(
        self, ck: Checkpoint, job: Job, prep: Prepared, seed: int
    ) -> tuple[dict[str, Outputs], dict[str, Any]]:
        """Outputs of a base model or oracle on the run's splits, and its report (computed once
        per checkpoint, forget set and seed)."""
        data, split = prep.data, prep.split
        idx = {name: getattr(split, name) for name in SPLITS}
        labels = {n: data.y[source_of(n)][i].cpu() for n, i in idx.items()}
        outs = select_splits(self.whole_outputs(ck, job), idx, labels)
        key = (str(ck.path), indices_hash(split.forget) + str(split.spec.classes)
               + str(split.spec.replace), seed)  # fmt: skip
        if key not in self._reports:
            self._reports[key] = self._shared_report(
                key, _weights_sha256(ck.meta), lambda: M.model_report(outs, seed, data.num_classes)
            )
        return outs, self._reports[key]

    def _shared_report(
        self, key: tuple[str, str, int], sha: str | None, compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """A base model's or oracle's report, computed once per sweep and kept in
        ``<out>/references/`` for the other processes of the sweep (workers, cluster jobs):
        its MIA attacks cost as much as a run's own. Floats are stored exactly (as hex), so
        a report read back gives the numbers a computed one gives."""
        digest = hashlib.sha256(dumps([*key, sha], indent=None).encode()).hexdigest()[:32]
        path = self.opts.out / REFERENCES / f"{digest}.json"
        with locked(path, f"computing the report in {path}"):
            if path.is_file():
                try:
                    return _exact_decode(json.loads(path.read_text()))
                except (ValueError, TypeError, KeyError, AttributeError):
                    pass  # damaged: computed again and rewritten
            report = compute()
            try:
                text = json.dumps(_exact_encode(report))
            except TypeError:  # a value JSON cannot hold exactly: not shared
                return report
            atomic_write_text(path, text)
            return report

    # -- running -----------------------------------------------------------------------------

    def run_dir(self, job: Job, k: int) -> Path:
        return self.opts.out / "runs" / job.folder / f"seed{self.opts.base_seed + k}"

    # -- the task graph ----------------------------------------------------------------------

    def graph(self, *, report: bool = False) -> Graph:
        """The sweep's tasks (after :meth:`resolve`), those already finished marked done."""
        graph = expand(self, report=report)
        graph.check(self.task_done)
        return graph

    def task_done(self, task: Task) -> bool:
        """Whether a task's output is present and verifies (nothing is printed)."""
        path = Path(task.path)
        if task.kind == RUN:
            return run_problem(path) is None
        if task.kind in (BASE, ORACLE):
            if checkpoint_problem(path) is not None:
                return False
            sha = _weights_sha256(read_meta(path))
            return _reusable_reference(reference_path(path), sha) is not None
        if task.kind in many_models.KINDS:
            return many_models.task_done(self, task)
        return False

    def skipped_lines(self, graph: Graph) -> list[str]:
        """One line per run found finished before the sweep started."""
        return [self._skip_line(t) for t in graph.layer(RUN) if t.key in graph.done]

    def _skip_line(self, task: Task) -> str:
        return f"skip {self.jobs[task.job].folder} seed {self.opts.base_seed + task.k}: finished"

    def execute(self, task: Task, wait: bool = True) -> tuple[str, str]:
        """Do one task in this process: (status, the line it reports, maybe empty).

        The status is ``done``, ``skipped`` (a run found finished under its lock) or, without
        `wait`, ``held`` (another process holds the run; nothing was done).
        """
        apply_threads(self.opts.threads)
        set_amp(self.opts.amp)
        if task.kind == SUMMARY:
            self.write_summary(self.collect())
            return DONE, ""
        if task.kind in many_models.KINDS:  # an experiment's "evaluate" (many_models.py)
            return DONE, many_models.execute(self, task)
        if task.kind not in (BASE, ORACLE, RUN):
            raise ValueError(f"task {task.key}: the runner does not execute {task.kind} tasks")
        job = self.jobs[task.job]
        if task.kind == BASE:
            self.whole_outputs(self.base_model(job), job)
            return DONE, ""
        if task.kind == ORACLE:
            if self.oracle_needs_base(job):
                oracle = self.prepare(job, self.opts.base_seed + task.k).oracle
            else:  # trained alongside its base model (graph.expand gives it no dependency)
                data = self.job_data(job)
                spec, split = self.split_for(job, data.raw, self.opts.base_seed + task.k)
                oracle = self.oracle(job, None, spec, split)
            self.whole_outputs(oracle, job)
            return DONE, ""
        run_dir = Path(task.path)

        def attempt() -> tuple[str, str]:
            if _run_finished(run_dir):
                return SKIPPED, self._skip_line(task)
            result = self.run_one(job, task.k)
            return DONE, run_line(job, result)

        with try_locked(run_dir) as mine:  # a run's lock is "<run folder>.lock" beside it
            if mine:
                return attempt()
        if not wait:
            return HELD, ""
        with locked(run_dir, f"running {run_dir}"):
            return attempt()

    def arguments(self) -> str:
        """The sweep as one JSON string of plain values: with a task key, everything a fresh
        process needs to execute that task (:func:`running.workers.run_task`)."""
        experiments = [minimal_json(e) for e in self.experiments]
        return dumps({"options": self.opts.to_json(), "experiments": experiments}, indent=None)

    @classmethod
    def from_arguments(cls, text: str) -> Runner:
        """The runner of :meth:`arguments`, resolved (its checks run again here)."""
        obj = json.loads(text)
        opts = RunnerOptions.from_json(obj["options"])
        where = f"{opts.source}: experiment "
        exps = [parse_experiment(e, f"{where}{i}: ") for i, e in enumerate(obj["experiments"])]
        runner = cls(exps, opts)
        runner.resolve()
        return runner

    # -- running -----------------------------------------------------------------------------

    def run_all(self, backend: Backend | None = None) -> list[RunResult]:
        """Every task of the sweep, then the summary (written also when a run fails or the
        sweep is interrupted). `backend(runner, graph, progress)` executes the tasks (a pool of
        worker processes: running/workers.py); by default one after the other in this process.
        """
        graph = self.graph()
        progress = Progress(graph, self.opts.quiet)
        for line in self.skipped_lines(graph):
            progress.line(line)
        try:
            if backend is None:  # runs another process holds come last, once it let go of them
                run_in_order(graph, self.execute, progress)
            else:
                backend(self, graph, progress)
        finally:
            progress.close()
            results = self.collect()
            self.write_summary(results)
        return results

    def run_one(self, job: Job, k: int) -> RunResult:
        """One run: prepare, unlearn, evaluate, persist, log."""
        seed = self.opts.base_seed + k
        prep = self.prepare(job, seed)
        unl = self.unlearn(job, prep, seed)
        result, outs = self.evaluate(job, prep, unl, seed)
        _persist(self.run_dir(job, k), result, unl.model, self.sidecar(job, prep, result),
                 prep.split.forget, outs, _outputs_meta(prep.data), unl.mask)  # fmt: skip
        self.wandb.finish(result.flat())
        return result

    def prepare(self, job: Job, seed: int) -> Prepared:
        base = self.base_model(job)
        data = self.job_data(job)
        spec, split = self.split_for(job, data.raw, seed)
        return Prepared(data, spec, split, base, self.oracle(job, base, spec, split))

    def unlearn(self, job: Job, prep: Prepared, seed: int) -> Unlearned:
        return self.unlearn_from(job, prep.data, prep.split, prep.base, seed)

    def unlearn_from(
        self, job: Job, data: DeviceData, split: Split, base: Checkpoint, seed: int,
        log: bool = True,
    ) -> Unlearned:  # fmt: skip
        """Unlearn `split`'s forget set from `base` with the experiment's method and `seed`
        (also the many-model evaluation's models and U-LiRA's shadows: ``log=False``, no W&B
        run of their own)."""
        cfg = job.cfg
        torch.manual_seed(seed)
        model = copy.deepcopy(base.model).train()
        original = copy_model(base.model)
        recipe = TrainConfig.from_json(base.meta["train"])
        ctx = MethodContext(data, split, seed, original, recipe, base.meta["model"])
        if log:
            self.wandb.start(f"{job.folder}_s{seed}", job.folder, cfg.to_json() | {"seed": seed})
        monitor = Monitor(self.wandb.log if log else None,
                          quiet=self.opts.quiet or not self.opts.verbose or not log)  # fmt: skip

        settings = cfg.settings()
        base_sha = _weights_sha256(base.meta)  # a mask file names the base weights it fits
        start = time.perf_counter()
        mask = None
        with count_work() as work:  # the mask's saliency pass is unlearning work too
            if cfg.load_mask:
                mask = SaliencyMask.load(cfg.load_mask, model, base_sha256=base_sha)
            elif cfg.use_mask:
                mask = SaliencyMask.compute(
                    model, data, split.forget, cfg.mask_thr, cfg.batch_size,
                    augment=settings.mask_augment, seed=rng.stream(seed, "mask/augment"),
                    base_sha256=base_sha,
                )  # fmt: skip
            mask_seconds = time.perf_counter() - start
            channels_last(model, self.opts.device)  # a conv net on CUDA (training/precision.py)
            model = run_method(model, ctx, settings, mask, monitor)
            contiguous(model)  # as saved
        # the per-epoch monitoring is bookkeeping, not unlearning work
        unlearn_seconds = time.perf_counter() - start - monitor.excluded_seconds
        return Unlearned(model.eval(), original, mask, mask_seconds, unlearn_seconds, work)

    def evaluate(
        self, job: Job, prep: Prepared, unl: Unlearned, seed: int
    ) -> tuple[RunResult, dict[str, Outputs]]:
        """Every metric of the run; its outputs per split. A method that moved a frozen
        parameter fails the run here, before anything is written."""
        eval_start = time.perf_counter()
        capture = FeatureCapture(unl.model) if self.wants_repr(job) else None  # the repr section
        outs = {
            n: collect_outputs(unl.model, prep.data.batches(getattr(prep.split, n), EVAL_BATCH,
                                                            source=source_of(n)))
            for n in SPLITS
        }  # fmt: skip
        base_outs, base_report = self.reference(prep.base, job, prep, seed)
        oracle_outs, oracle_report = self.reference(prep.oracle, job, prep, seed)
        report = M.model_report(outs, seed, prep.data.num_classes)
        forget = prep.split.forget
        here = machine(self.opts.device)
        unlearn_cost = unl.work.to_json() | here | {"wall_seconds": unl.unlearn_seconds}
        result = RunResult(
            experiment=job.folder,
            index=job.index,
            name=job.cfg.name,
            method=job.cfg.method,
            seed=seed,
            forget=prep.spec.to_json() | {"n": len(forget), "sha256": indices_hash(forget)},
            metrics=report | {"l2_to_base": M.l2_distance(unl.model, unl.original)},
            oracle=oracle_report | {"l2_to_base": M.l2_distance(prep.oracle.model, unl.original)},
            base=base_report,
            gaps=M.oracle_comparison(report, oracle_report, outs, oracle_outs),
            times=M.time_efficiency(unlearn_cost, sidecar_cost(prep.oracle.meta))
            | {"mask_time": unl.mask_seconds},
            mask_kept=unl.mask.kept_fraction() if unl.mask is not None else None,
            oracle_checkpoint=str(prep.oracle.path),
            base_checkpoint=str(job.base_path),
        )
        # how this run computed, and what made the cached base model and oracle it used
        result.extra["execution"] = execution_record(self.opts.device) | {
            "base": made_with(prep.base.meta),
            "oracle": made_with(prep.oracle.meta),
        }
        self._representation(result, job, prep, unl, capture, {n: len(outs[n]) for n in SPLITS})
        all_outs = {"unlearned": outs, "base": base_outs, "oracle": oracle_outs}
        self._scenario_metrics(result, job, prep, unl, all_outs)
        result.times["eval_time"] = time.perf_counter() - eval_start
        return result, outs

    def wants_repr(self, job: Job) -> bool:
        return self.opts.representation and job.cfg.representation

    def _representation(
        self,
        result: RunResult,
        job: Job,
        prep: Prepared,
        unl: Unlearned,
        capture: FeatureCapture | None,
        sizes: dict[str, int],
    ) -> None:
        """The repr section (evaluation/repr_eval.py) from the features the evaluation pass
        recorded, unless turned off; and the flag of an oracle fine-tuned from the base
        model's encoder (training/pretrain.py)."""
        approx = oracle_approximation(prep.oracle.meta)
        if approx is not None:
            result.extra["oracle_approximation"] = approx
        if capture is None:
            return
        start = time.perf_counter()
        base, oracle = prep.base, prep.oracle
        result.extra["repr"] = self._repr.section(
            unl.model, (str(base.path), base.model), (str(oracle.path), oracle.model),
            prep.data, prep.split, capture.take(sizes),
        )  # fmt: skip
        result.times["repr_time"] = time.perf_counter() - start

    def _scenario_metrics(
        self,
        result: RunResult,
        job: Job,
        prep: Prepared,
        unl: Unlearned,
        outs: dict[str, dict[str, Outputs]],
    ) -> None:
        """The frozen-layer check, and the replacement or challenge numbers of the scenario."""
        cfg, spec = job.cfg, prep.spec
        if cfg.frozen:
            result.frozen_changed = M.changed_parameters(unl.model, unl.original, cfg.frozen)
            if result.frozen_changed:
                raise RuntimeError(
                    f"{job.folder} seed {result.seed}: method '{cfg.method}' changed frozen "
                    f"parameters: {', '.join(result.frozen_changed)}"
                )
        if spec.replace is not None:
            raw, nc = prep.data.raw, prep.data.num_classes
            result.replacement = {
                who: replacement_metrics(o, raw, spec, prep.split, nc) for who, o in outs.items()
            }
        elif spec.classes:
            m = result.metrics
            result.challenge = M.challenge_score(
                m["forget_acc"], m["retain_acc"], m["l2_to_base"], m["kl_uniform_forget"],
                frozen_changed=result.frozen_changed or [],
            )  # fmt: skip

    def sidecar(self, job: Job, prep: Prepared, result: RunResult) -> dict[str, Any]:
        """The unlearned model's model.json: what it is and its own numbers; nothing of the
        base model's but its architecture, data, split settings and training recipe (which a
        retrain oracle of this model re-runs)."""
        bm, split = prep.base.meta, prep.split
        keep = {k: bm["split"][k] for k in ("split_seed", "val_fraction", "classes")
                if k in bm["split"]}  # fmt: skip
        return {k: bm[k] for k in MODEL_KEYS if k in bm} | {
            "kind": "unlearned",
            "method": job.cfg.method,
            "experiment": job.cfg.to_json(),
            "experiment_folder": job.folder,
            "seed": result.seed,
            "base_checkpoint": str(job.base_path),
            "base_sha256": _weights_sha256(bm),
            "oracle_checkpoint": str(prep.oracle.path),
            "split": keep | {"forget": prep.spec.to_json(), "sizes": split.summary()},
            "train": bm["train"],
            "metrics": {k: result.metrics[k] for k in SIDECAR_METRICS}
            | {"l2_to_base": result.metrics["l2_to_base"]},
            **execution_record(self.opts.device),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }

    # -- results -----------------------------------------------------------------------------

    def collect(self) -> list[RunResult]:
        """The finished runs, with their experiment's eps score and U-LiRA numbers."""
        return many_models.attach(self, [
            RunResult.read(self.run_dir(job, k))
            for job in self.jobs
            for k in range(self.opts.nexp)
            if run_problem(self.run_dir(job, k)) is None  # verified, without a word
        ])  # fmt: skip

    def write_summary(self, results: list[RunResult]) -> list[dict[str, Any]]:
        rows = summarize(results, [j.folder for j in self.jobs])
        if rows:
            atomic_write_text(self.opts.out / "summary.csv", to_csv(rows))
            atomic_write_text(self.opts.out / "summary.md", to_markdown(rows) + "\n")
        return rows


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


def _weights_sha256(meta: dict[str, Any]) -> str | None:
    """The sha256 of a checkpoint's weights as its sidecar records it, if it does."""
    record = (meta.get("files") or {}).get("weights") or {}
    sha = record.get("sha256") if isinstance(record, dict) else None
    return sha if isinstance(sha, str) else None


def _exact_encode(obj: Any) -> Any:
    """JSON values with every float as ``{"float": <hex>}``: exact, NaN included, strict JSON."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, float):
        return {"float": obj.hex()}
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {k: _exact_encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_exact_encode(v) for v in obj]
    raise TypeError(f"{type(obj).__name__} is not stored exactly")


def _exact_decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"float"}:
            return float.fromhex(obj["float"])
        return {k: _exact_decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_exact_decode(v) for v in obj]
    return obj


def _reusable_reference(path: Path, sha: str | None) -> dict[str, Outputs] | None:
    """The saved whole-pool outputs at `path` if they were made from the weights `sha`."""
    if sha is None or not path.is_file():
        return None
    try:
        outs, meta = load_reference(path)
    except UserError:
        return None  # damaged: computed again and rewritten
    return outs if meta.get("weights_sha256") == sha else None


def _outputs_meta(data: DeviceData) -> dict[str, Any]:
    """What the plots need to know about the outputs without loading the data."""
    return {
        "dataset": data.raw.name,
        "num_classes": data.num_classes,
        "classes": list(data.raw.classes),
    }


def run_line(job: Job, r: RunResult) -> str:
    """The one line a finished run reports: ``== <folder> seed <N>: <method> on <dataset> |``
    and its main numbers (accuracies in %)."""
    m, o = r.metrics, r.oracle

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    line = (
        f"== {job.folder} seed {r.seed}: {job.cfg.method} on {job.dataset} | forget "
        f"{pct(m['forget_acc'])} (oracle {pct(o['forget_acc'])}), retain {pct(m['retain_acc'])}, "
        f"test {pct(m['test_acc'])}, MIA {pct(m['mia_efficacy'])}, "
        f"avg gap {r.gaps['avg_gap']:.2f}, {r.times['unlearn_time']:.1f} s"
    )
    if r.replacement is not None:
        rp = r.replacement["unlearned"]
        line += (f"; on test: new in old's slot {pct(rp['new_acc'])}, old still there "
                 f"{pct(rp['old_acc'])}, untouched {pct(rp['untouched_acc'])}")  # fmt: skip
    return line


def minimal_json(cfg: ExperimentConfig) -> dict[str, Any]:
    """An experiment as the keys that differ from the defaults (and its method): what
    :func:`running.config.parse_experiment` reads back into the same experiment (``to_json``
    also lists defaults, such as ``lr`` for ``retrain``, which the parser refuses)."""
    defaults = ExperimentConfig().to_json()
    return {k: v for k, v in cfg.to_json().items() if k == "method" or defaults.get(k) != v}


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


__all__ = ["Job", "Runner", "RunnerOptions", "minimal_json", "run_line", "timestamp"]
