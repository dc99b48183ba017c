"""Tuning an experiment's settings against the retrain oracle (``"tune"``, ``main.py --tune T``).

Optuna (Akiba et al., *Optuna: A Next-generation Hyperparameter Optimization Framework*, KDD
2019) with its TPE sampler (Bergstra et al., *Algorithms for Hyper-Parameter Optimization*,
NeurIPS 2011) minimises SalUn's Avg. Gap (Fan et al., *SalUn*, ICLR 2024): the mean absolute
gap between the unlearned model and the retrain oracle in UA, RA, TA and MIA-Efficacy.

* **Search space**: what the method declares. ``lr`` (log-uniform) and ``epochs`` in
  ``register(..., search={...})``; the method's own settings next to their dataclass fields,
  ``field(default=1.0, metadata={"search": ("log", 0.1, 10.0)})``. A range is ``("log", lo,
  hi)``, ``("float", lo, hi)``, ``("int", lo, hi)`` or ``("choice", a, b, ...)``. A method that
  reads lr or epochs without declaring a range is searched around the experiment's value
  (lr / 10 .. lr * 10, epochs 1 .. 2 x epochs).
* **The evaluated forget set never informs the settings.** Class-wise, the trials forget another
  class (``tune.forget``; by default the next class after the evaluated ones). Random or index
  forgetting: the trials forget a second draw of the same size, drawn with ``tune.seed`` from
  the pool outside validation and outside every evaluated forget set of the sweep's seeds
  (written to ``tune/<experiment>_forget.json``). Either way the trials have their own oracle.
* **Trials are experiments of an ordinary sweep** (same caches of base models and oracles, same
  task graph and worker processes): each batch of trials, as many as there are workers, is one
  sweep into ``tune/<experiment>/``. Each trial runs once per base model (``tune.base_seeds``:
  the recipe's seed replaced, the mean Avg. Gap is the objective) with run seed ``tune.seed``.
* **Trial 0 is the experiment's own settings** (the defaults), so the report compares them.
* **Resumable and deterministic**: the study lives in ``tune/<experiment>.db`` (SQLite). The
  sampler of trial n is seeded with ``tune.seed + n``, so its proposal depends only on the
  trials before it: an interrupted tuning resumes (a trial asked but not told is run again
  with its stored settings; its finished runs are read back) and gives the same study.

Results: ``tune/<experiment>.json`` (space, tuning forget set, every trial, defaults and best)
and ``tune/best_<experiment>.json``, the experiment with the best settings, ready for
``main.py -L``; ``main.py`` also runs it next to the experiment (tag ``<experiment>_tuned``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from core.errors import UserError
from core.io import atomic_write_text, dumps, write_json
from core.locks import locked
from datasets import read_index_file
from methods import SEARCH_KINDS, SEARCHABLE, method_spec
from running.config import ExperimentConfig, TuneConfig, absolute_paths, parse_experiment
from running.runner import Backend, Runner, RunnerOptions, minimal_json
from training.config import TrainConfig

PENALTY = 100.0  # the objective of a trial whose Avg. Gap is not finite (diverged): the worst
ARGS = "method_args."  # prefix of a method's own settings among the parameters


@dataclass(frozen=True)
class Dim:
    """One searched setting: ``lr``, ``epochs`` or ``method_args.<field>``, and its range."""

    name: str
    kind: str  # one of SEARCH_KINDS
    bounds: tuple[Any, ...]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.bounds))
        lo, hi = self.bounds
        if self.kind == "int":
            return trial.suggest_int(self.name, lo, hi)
        return trial.suggest_float(self.name, lo, hi, log=self.kind == "log")


def parse_range(r: Any, where: str) -> tuple[str, tuple[Any, ...]]:
    """A declared range as (kind, bounds); a malformed one is a programming error."""
    if not isinstance(r, tuple) or not r or r[0] not in SEARCH_KINDS:
        raise ValueError(
            f"{where}: search range {r!r}; use (kind, ...) with kind in {SEARCH_KINDS}"
        )
    kind, bounds = r[0], tuple(r[1:])
    if kind == "choice":
        if not bounds:
            raise ValueError(f"{where}: search range {r!r} offers no choice")
        return kind, bounds
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ValueError(f"{where}: search range {r!r}; use (kind, lo, hi) with lo < hi")
    if kind == "int" and not all(isinstance(b, int) for b in bounds):
        raise ValueError(f"{where}: search range {r!r}; int bounds must be integers")
    if kind == "log" and bounds[0] <= 0:
        raise ValueError(f"{where}: search range {r!r}; a log range needs lo > 0")
    return kind, bounds


def search_space(cfg: ExperimentConfig) -> list[Dim]:
    """The settings tuned for `cfg`'s method, in a fixed order (shared settings first)."""
    spec = method_spec(cfg.method)
    dims: list[Dim] = []
    for key in SEARCHABLE:
        if key in spec.ignores:
            continue
        r = spec.search.get(key)
        if r is None:  # undeclared: around the experiment's own value
            r = (
                ("log", cfg.lr / 10, cfg.lr * 10)
                if key == "lr"
                else ("int", 1, 2 * max(cfg.epochs, 1))
            )
        dims.append(Dim(key, *parse_range(r, f"method '{cfg.method}' {key}")))
    for f in dataclasses.fields(spec.args):
        r = f.metadata.get("search")
        if r is not None:
            dims.append(Dim(ARGS + f.name, *parse_range(r, f"{spec.args.__name__}.{f.name}")))
    return dims


def current(cfg: ExperimentConfig, dims: Sequence[Dim]) -> dict[str, Any]:
    """The experiment's own value of every searched setting (trial 0)."""
    return {
        d.name: getattr(cfg.method_args, d.name[len(ARGS) :])
        if d.name.startswith(ARGS)
        else getattr(cfg, d.name)
        for d in dims
    }


def with_params(cfg: ExperimentConfig, params: dict[str, Any], **changes: Any) -> ExperimentConfig:
    """`cfg` with the searched settings `params` (and other keys) replaced, parsed again so
    every check of an experiment file applies."""
    args = {k[len(ARGS) :]: v for k, v in params.items() if k.startswith(ARGS)}
    shared = {k: v for k, v in params.items() if not k.startswith(ARGS)}
    margs = dataclasses.replace(cfg.method_args, **args) if args else cfg.method_args
    new = dataclasses.replace(cfg, method_args=margs, **shared, **changes)
    return parse_experiment(minimal_json(new), f"{changes.get('tag', cfg.name)}: ")


def check_tunable(experiments: Sequence[ExperimentConfig], source: str) -> None:
    """Every experiment with ``tune`` has something to tune; before anything trains."""
    for i, cfg in enumerate(experiments):
        if cfg.tune is not None and not search_space(cfg):
            raise UserError(f"{source}: experiment {i}: key 'tune': method '{cfg.method}' has no "
                            "setting to tune (it declares no search range); drop tune")  # fmt: skip


def with_trials(experiments: Sequence[ExperimentConfig], trials: int) -> list[ExperimentConfig]:
    """``main.py --tune T``: every experiment tuned with T trials (its other tune keys kept)."""
    if not 1 <= trials <= 10_000:
        raise UserError(f"--tune {trials} is invalid; use a number of trials in 1..10000")
    return [dataclasses.replace(e, tune=dataclasses.replace(e.tune or TuneConfig(), trials=trials))
            for e in experiments]  # fmt: skip


# -- the optimisation loop, independent of what a trial runs ---------------------------------------


def sampler(seed: int, trials: int, number: int) -> optuna.samplers.TPESampler:
    """The sampler of trial `number`: seeded by the trial, so a resumed study continues as an
    uninterrupted one; a quarter of the trials (3..10) are random before TPE models them."""
    with warnings.catch_warnings():  # multivariate TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=(seed + number) % 2**32,
            n_startup_trials=min(10, max(3, trials // 4)),
            multivariate=True,
        )


def optimize(
    db: Path,
    name: str,
    dims: Sequence[Dim],
    defaults: dict[str, Any],
    trials: int,
    seed: int,
    evaluate: Callable[[list[tuple[int, dict[str, Any]]]], list[float]],
    batch: int = 1,
    on_trial: Callable[[int, dict[str, Any], float], None] | None = None,
) -> optuna.Study:
    """Minimise `evaluate` over `dims` until the study in `db` holds `trials` finished trials.

    `evaluate` gets a batch of (trial number, settings) and returns one value each; a value
    that is not finite counts as PENALTY. Trial 0 is `defaults`.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}",
                                direction="minimize", load_if_exists=True)  # fmt: skip
    names = [d.name for d in dims]
    if not study.trials:
        study.enqueue_trial(defaults)
    state = optuna.trial.TrialState
    while True:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        if len(finished) >= trials:
            return study
        # asked but never told (an interrupted tuning): run again with the stored settings
        todo = [
            (t.number, dict(t.params))
            for t in study.get_trials(deepcopy=False, states=(state.RUNNING,))
        ]
        for number, params in list(todo):
            if sorted(params) != sorted(names):  # interrupted while asking
                study.tell(number, state=state.FAIL)
                todo.remove((number, params))
        todo = todo[: trials - len(finished)]
        while len(todo) < min(batch, trials - len(finished)):
            study.sampler = sampler(seed, trials, len(study.trials))
            trial = study.ask()
            todo.append((trial.number, {d.name: d.suggest(trial) for d in dims}))
        values = evaluate(todo)
        for (number, params), value in zip(todo, values, strict=True):
            value = value if math.isfinite(value) else PENALTY
            study.tell(number, value)
            if on_trial is not None:
                on_trial(number, params, value)


# -- tuning one experiment of a sweep ----------------------------------------------------------


@dataclass
class Tuned:
    """The outcome of tuning one experiment: its tuned twin and the report."""

    experiment: ExperimentConfig  # the evaluated experiment with the best settings
    report: dict[str, Any]
    best_file: Path


def _other_class(cfg: ExperimentConfig, num_classes: int, classes: list[int] | None) -> list[int]:
    cf = cfg.class_to_forget
    evaluated = cf if isinstance(cf, list) else [cf] if cf is not None else []
    allowed = classes if classes is not None else list(range(num_classes))
    start = max(evaluated, default=-1)
    for step in range(1, num_classes + 1):
        c = (start + step) % num_classes
        if c in allowed and c not in evaluated:
            return [c]
    raise UserError(f"{cfg.name}: key 'tune': no class other than {evaluated} to tune on")


class Tuner:
    """Tunes the experiments of one sweep (same options, checkpoints and workers)."""

    def __init__(self, opts: RunnerOptions, backend: Backend | None = None, batch: int = 1) -> None:
        self.opts = opts
        self.backend = backend
        self.batch = max(batch, 1)
        self.folder = opts.out / "tune"

    def forget_keys(self, cfg: ExperimentConfig, index: int) -> dict[str, Any]:
        """The experiment keys of the tuning forget set (never the evaluated one)."""
        t = cfg.tune
        assert t is not None
        runner = Runner([cfg], dataclasses.replace(self.opts, quiet=True))
        job = runner.resolve()[0]
        raw = runner.raw(job.dataset, job.dataset_args)
        none = {"class_to_forget": None, "unlearning_rate": None, "idxs_to_forget": None}
        if cfg.class_to_forget is not None:
            if t.forget is None:
                forget = _other_class(cfg, raw.num_classes, job.classes)
            else:
                forget = t.forget if isinstance(t.forget, list) else [t.forget]
            return none | {"class_to_forget": forget[0] if len(forget) == 1 else forget}
        splits = [
            runner.split_for(job, raw, self.opts.base_seed + k)[1] for k in range(self.opts.nexp)
        ]
        evaluated = torch.unique(torch.cat([s.forget for s in splits]))
        outside = splits[0].train  # pool outside validation: forget + retain
        free = outside[~torch.isin(outside, evaluated)]
        n = len(splits[0].forget)
        if n > len(free):
            raise UserError(f"{self.opts.source}: experiment {index}: key 'tune': the forget set "
                            f"({n} samples) is larger than the {len(free)} pool samples outside "
                            "validation and the evaluated forget sets; it cannot be drawn again "
                            "disjointly to tune on")  # fmt: skip
        path = self.folder / f"{cfg.name}_forget.json"
        if path.is_file():  # a resumed tuning keeps its forget set (and its study's meaning)
            drawn = torch.tensor(read_index_file(path), dtype=torch.long)
            if torch.isin(drawn, evaluated).any():
                last = self.opts.base_seed + self.opts.nexp - 1
                raise UserError(f"{path}: this tuning forget set overlaps an evaluated forget "
                                f"set of seeds {self.opts.base_seed}..{last}; use a new --out "
                                "to tune again")  # fmt: skip
        else:
            g = torch.Generator().manual_seed(t.seed)
            drawn = torch.sort(free[torch.randperm(len(free), generator=g)[:n]]).values
            atomic_write_text(path, dumps(drawn.tolist(), indent=None) + "\n")
        return none | {"idxs_to_forget": str(path.resolve())}

    def tune(self, cfg: ExperimentConfig, index: int) -> Tuned:
        t = cfg.tune
        assert t is not None
        name = cfg.name
        dims = search_space(cfg)
        keys = self.forget_keys(cfg, index)
        bases: list[int | None] = list(t.base_seeds) if t.base_seeds is not None else [None]
        trial_opts = dataclasses.replace(
            self.opts, out=self.folder / name, nexp=1, base_seed=t.seed, representation=False,
            quiet=True, verbose=False, wandb_mode="disabled",
        )  # fmt: skip

        def experiment(number: int, params: dict[str, Any], base: int | None) -> ExperimentConfig:
            tag = f"t{number:03d}" + (f"_b{base}" if base is not None else "")
            ckpt = cfg.checkpoint
            if base is not None and isinstance(ckpt, TrainConfig):
                ckpt = dataclasses.replace(ckpt, seed=base)
            return with_params(cfg, params, tag=tag, checkpoint=ckpt, tune=None, evaluate=None,
                               **keys)  # fmt: skip

        def evaluate(todo: list[tuple[int, dict[str, Any]]]) -> list[float]:
            exps = [experiment(n, p, b) for n, p in todo for b in bases]
            runner = Runner(exps, trial_opts)
            runner.resolve()
            gaps = {r.name: _number(r.gaps.get("avg_gap")) for r in runner.run_all(self.backend)}
            k = len(bases)  # a trial's runs are consecutive, one per base model
            return [sum(gaps.get(e.name, math.nan) for e in exps[i * k : (i + 1) * k]) / k
                    for i in range(len(todo))]  # fmt: skip

        def show(number: int, params: dict[str, Any], value: float) -> None:
            if not self.opts.quiet:
                print(f"tune {name}: trial {number + 1}/{t.trials}: {_params_text(params)} -> "
                      f"avg gap {value:.2f}", file=sys.stderr)  # fmt: skip

        db = self.folder / f"{name}.db"
        with locked(db, f"tuning {name}"):  # one process tunes an experiment at a time
            defaults = current(cfg, dims)
            study = optimize(db, name, dims, defaults, t.trials, t.seed, evaluate, self.batch, show)
        return self._write(cfg, study, dims, defaults, keys, bases)

    def _write(
        self,
        cfg: ExperimentConfig,
        study: optuna.Study,
        dims: list[Dim],
        defaults: dict[str, Any],
        keys: dict[str, Any],
        bases: list[int | None],
    ) -> Tuned:
        name = cfg.name
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = min(done, key=lambda t: (t.value, t.number))
        first = next((t for t in done if t.number == 0), None)
        tuned = with_params(cfg, best.params, tag=f"{name}_tuned", tune=None)
        best_file = self.folder / f"best_{name}.json"
        write_json(best_file, [absolute_paths(minimal_json(tuned))])
        report = {
            "experiment": name,
            "objective": "Avg. Gap to the retrain oracle on the tuning forget set"
            + (f", mean over base seeds {bases}" if bases != [None] else ""),
            "tuning_forget": {k: v for k, v in keys.items() if v is not None},
            "seed": cfg.tune.seed if cfg.tune else None,
            "space": {d.name: [d.kind, *d.bounds] for d in dims},
            "defaults": {"params": defaults, "avg_gap": first.value if first else None},
            "best": {"trial": best.number, "params": best.params, "avg_gap": best.value},
            "trials": [
                {"trial": t.number, "state": t.state.name, "params": t.params, "avg_gap": t.value}
                for t in study.trials
            ],  # fmt: skip
            "best_file": str(best_file),
        }
        write_json(self.folder / f"{name}.json", report)
        return Tuned(tuned, report, best_file)


def _number(v: Any) -> float:
    """A metric as read from metrics.json, where an undefined one (NaN) is null."""
    return float(v) if isinstance(v, (int, float)) else math.nan


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _params_text(params: dict[str, Any]) -> str:
    return "  ".join(f"{k.removeprefix(ARGS)} {_fmt(v)}" for k, v in params.items())


def report_text(report: dict[str, Any]) -> str:
    """The tuned settings next to the defaults, and the Avg. Gap of each on the tuning set."""
    forget = ", ".join(f"{k} {v}" for k, v in report["tuning_forget"].items())
    lines = [f"tuned {report['experiment']} ({len(report['trials'])} trials; {report['objective']}"
             f": {forget}):", f"  {'setting':<22} {'default':>10} {'tuned':>10}"]  # fmt: skip
    for key, value in report["defaults"]["params"].items():
        lines.append(f"  {key.removeprefix(ARGS):<22} {_fmt(value):>10} "
                     f"{_fmt(report['best']['params'][key]):>10}")  # fmt: skip
    d, b = report["defaults"]["avg_gap"], report["best"]["avg_gap"]
    lines.append(
        f"  {'avg gap (tuning set)':<22} {_fmt(d) if d is not None else '-':>10} {_fmt(b):>10}"
    )
    lines.append(f"  ready to run: {report['best_file']}")
    return "\n".join(lines)


def tune_experiments(
    experiments: Sequence[ExperimentConfig],
    opts: RunnerOptions,
    backend: Backend | None = None,
    batch: int = 1,
) -> list[ExperimentConfig]:
    """Tune every experiment that has ``tune``; return their tuned twins, in order."""
    tuner = Tuner(opts, backend, batch)
    twins = []
    for i, cfg in enumerate(experiments):
        if cfg.tune is not None:
            tuned = tuner.tune(cfg, i)
            print(report_text(tuned.report), file=sys.stderr)
            twins.append(tuned.experiment)
    return twins


__all__ = [
    "Dim",
    "PENALTY",
    "Tuned",
    "Tuner",
    "check_tunable",
    "current",
    "optimize",
    "parse_range",
    "report_text",
    "search_space",
    "tune_experiments",
    "with_params",
    "with_trials",
]
