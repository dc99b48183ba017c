"""Experiment configuration: frozen dataclasses whose annotations pydantic validates.

Keys follow the SalUn DeepDive experiment files (``checkpoint``, ``class_to_forget``,
``unlearning_rate``, ``idxs_to_forget``, ``use_mask``, ``mask_thr``, ``lr``, ``epochs``,
``method``, ``tag``) plus shared training settings (``batch_size``, ``optimizer``) and a
``method_args`` object for method-specific settings. Pydantic checks each key against the
annotations below (strict types, ranges, finite numbers, no unknown keys); the checks that
involve several keys or the file system follow in :func:`check_experiment`. Every error is one
line naming the file, the experiment, the key, the bad value and what is allowed;
``exp/schema.json`` (running/schema.py) is generated from the same annotations.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import timm
from pydantic import Strict, with_config

from core.errors import UserError
from core.io import dumps
from core.userfiles import describe_missing, read_json
from core.validation import (
    CONFIG,
    NAME_RULE,
    Bool,
    OneOf,
    PathText,
    Range,
    Rule,
    Seed,
    Text,
    safe_name,
    validate,
    validate_plain,
)
from datasets import dataset_info
from methods import OptimizerSettings, Settings
from models import MODELS, build_model
from training.checkpoints import checkpoint_problem, checkpoint_stem
from training.config import (
    PRETRAIN_ORACLES,
    SCHEDULES,
    BatchSize,
    ClassIndex,
    Epochs,
    Fraction,
    NonNegative,
    Positive,
    TrainConfig,
)
from unlearning import method_spec

OPTIMIZERS = ("sgd", "adam")


def _distinct(cf: list[int]) -> bool:
    return len(cf) > 0 and len(set(cf)) == len(cf)


def _old_new(rc: dict[str, int]) -> bool:
    return sorted(rc) == ["new", "old"]


@with_config(CONFIG)
@dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser of the unlearning run (shared by all methods that take gradient steps)."""

    name: Annotated[str, OneOf(OPTIMIZERS)] = "sgd"
    momentum: Fraction = 0.9
    weight_decay: NonNegative = 5e-4
    schedule: Annotated[str, OneOf(SCHEDULES)] = "constant"
    nesterov: Bool = True


MAX_EVAL_MODELS = 1024  # models of each kind in a many-model evaluation
MAX_SHADOWS = 1024  # U-LiRA shadow models


@with_config(CONFIG)
@dataclass(frozen=True)
class UliraConfig:
    """U-LiRA (Hayes et al. 2024; evaluation/ulira.py): K shadow models on halves of the pool."""

    shadows: Annotated[int, Range(2, MAX_SHADOWS)] = 16


@with_config(CONFIG)
@dataclass(frozen=True)
class EvaluateConfig:
    """Verdicts over many models (running/many_models.py): N oracles and N unlearned models
    scored per forget example (evaluation/epsilon.py), and optionally U-LiRA."""

    models: Annotated[int, Range(2, MAX_EVAL_MODELS)] | None = None
    ulira: UliraConfig | None = None


MAX_TRIALS = 10_000


@with_config(CONFIG)
@dataclass(frozen=True)
class TuneConfig:
    """Tuning against the retrain oracle (running/tune.py): Optuna's TPE over the method's
    declared search space, minimising Avg. Gap on a forget set that is not the evaluated one."""

    trials: Annotated[int, Range(1, MAX_TRIALS)] = 20
    # class-wise: the class(es) tuned on (None: the next class after the evaluated ones)
    forget: (
        ClassIndex
        | Annotated[
            list[ClassIndex], Rule(_distinct, "use a class index >= 0 or a list of distinct ones")
        ]  # fmt: skip
        | None
    ) = None
    seed: Seed = 100  # the sampler's, the trial runs' and the random tuning draw's seed
    # recipe seeds of the base models tuned on (mean Avg. Gap); None: the experiment's base
    base_seeds: Annotated[list[Seed], Rule(_distinct, "use a list of distinct seeds")] | None = None


@with_config(CONFIG)
@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment of a list; every run of it uses seed base + i."""

    method: Text = "rl_split"
    # a base checkpoint (.safetensors with its .json) or the recipe of one to train (train.py)
    checkpoint: PathText | TrainConfig = field(default_factory=TrainConfig)
    class_to_forget: (
        ClassIndex
        | Annotated[
            list[ClassIndex], Rule(_distinct, "use a class index >= 0 or a list of distinct ones")
        ]  # fmt: skip
        | None
    ) = None
    unlearning_rate: (
        Annotated[
            float, Range(0, 1, lo_open=True, hi_open=True, allowed="use a fraction in (0, 1)")
        ]  # fmt: skip
        | None
    ) = None
    idxs_to_forget: PathText | None = None
    use_mask: Bool = False
    mask_thr: Annotated[
        float, Range(0, 1, lo_open=True, allowed="use the fraction of weights kept, in (0, 1]")
    ] = 0.5
    load_mask: PathText | None = None
    mask_augment: Bool = False
    lr: Positive = 0.01
    epochs: Epochs = 5
    batch_size: BatchSize = 128
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    method_args: Any = None  # the method's own frozen dataclass, defaults filled in
    frozen: list[Text] = field(default_factory=list)
    replace_class: (
        Annotated[
            dict[Text, ClassIndex],
            Rule(_old_new, 'use {"old": <trained class>, "new": <untrained class>}'),
        ]
        | None
    ) = None
    # a self-supervised base model's retrain oracle (training/pretrain.py): "shared" reuses
    # the base model's encoder, an approximation flagged in metrics.json
    pretrain_oracle: Annotated[str, OneOf(PRETRAIN_ORACLES)] = "exact"
    representation: Bool = True  # the repr section of metrics.json (evaluation/repr_eval.py)
    evaluate: EvaluateConfig | None = None  # many-model epsilon and U-LiRA (many_models.py)
    tune: TuneConfig | None = None  # tune lr, epochs, method_args first (running/tune.py)
    tag: Annotated[str, Strict(), Rule(safe_name, NAME_RULE)] = ""

    @property
    def name(self) -> str:
        if self.tag:
            return self.tag
        parts = [self.method + ("+mask" if self.use_mask or self.load_mask else "")]
        if self.class_to_forget is not None:
            cf = self.class_to_forget
            parts.append("cf" + ("-".join(map(str, cf)) if isinstance(cf, list) else str(cf)))
        elif self.unlearning_rate is not None:
            parts.append(f"unlr{self.unlearning_rate:g}")
        elif self.idxs_to_forget is not None:
            parts.append("itf-" + Path(self.idxs_to_forget).stem)
        elif self.replace_class is not None:
            parts.append(f"rp{self.replace_class.get('old')}by{self.replace_class.get('new')}")
        return "_".join(parts)

    def settings(self) -> Settings:
        """What the method receives: shared training settings plus its own arguments."""
        o = self.optimizer
        return Settings(
            method=self.method,
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=OptimizerSettings(
                o.name, o.momentum, o.weight_decay, o.schedule, nesterov=o.nesterov
            ),
            frozen=tuple(self.frozen),
            args=self.method_args,
            mask_augment=self.mask_augment,
        )

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["checkpoint"] = (
            self.checkpoint.to_json()
            if isinstance(self.checkpoint, TrainConfig)
            else self.checkpoint
        )
        d["optimizer"] = dataclasses.asdict(self.optimizer)
        d["method_args"] = (
            dataclasses.asdict(self.method_args) if self.method_args is not None else {}
        )
        if self.evaluate is not None:
            d["evaluate"] = {k: v for k, v in dataclasses.asdict(self.evaluate).items()
                             if v is not None}  # fmt: skip
        if self.tune is not None:
            d["tune"] = {k: v for k, v in dataclasses.asdict(self.tune).items() if v is not None}
        for key, default in (("pretrain_oracle", "exact"), ("representation", True),
                             ("evaluate", None), ("tune", None)):  # fmt: skip
            if d[key] == default:  # records made before these keys resume unchanged
                del d[key]
        return d


PATH_KEYS = ("idxs_to_forget", "load_mask")  # and `checkpoint` when it is a string


def _check_names(cfg: TrainConfig, where: str) -> None:
    """The dataset and model of a checkpoint object exist, so a typo fails before any training."""
    try:
        dataset_info(cfg.dataset)
    except UserError as e:
        raise UserError(f"{where}key 'checkpoint.dataset': {e}") from None
    if cfg.model is not None and cfg.model not in MODELS and not timm.is_model(cfg.model):
        try:
            build_model(cfg.model, 1, 1)  # unknown: raises the UserError with a did-you-mean
        except UserError as e:
            raise UserError(f"{where}key 'checkpoint.model': {e}") from None
    cfg.check_dataset_args(f"{where}checkpoint.")


def parse_experiment(obj: Any, where: str) -> ExperimentConfig:
    """Parse and check one experiment object (everything that does not need the data)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}an experiment must be a JSON object, got {type(obj).__name__}")
    obj = dict(obj)
    raw_args = obj.pop("method_args", {})
    if not isinstance(raw_args, dict):
        raise UserError(f"{where}key 'method_args': {raw_args!r} is invalid; expected an object")
    cfg: ExperimentConfig = validate(ExperimentConfig, obj, where)
    spec = method_spec(cfg.method, where)
    ignored = [k for k in getattr(spec, "ignores", ()) if k in obj]
    if ignored:
        k = ignored[0]
        raise UserError(
            f"{where}key '{k}': {obj[k]!r} is invalid; method '{cfg.method}' does not use "
            f"{', '.join(spec.ignores)}: remove the key"
        )
    if not dataclasses.fields(spec.args) and raw_args:
        raise UserError(
            f"{where}unknown key 'method_args.{next(iter(raw_args))}': method '{cfg.method}' "
            "takes no method_args"
        )
    args = validate_plain(spec.args, raw_args, where, prefix="method_args")
    if isinstance(cfg.checkpoint, TrainConfig):
        _check_names(cfg.checkpoint, where)
    cfg = dataclasses.replace(cfg, method_args=args)
    check_experiment(cfg, where)
    return cfg


def _file_problem(path: str, key: str, where: str, what: str) -> UserError:
    why = describe_missing(Path(path), what).removeprefix(f"{path}: ")
    return UserError(f"{where}key '{key}': {path!r} is invalid; {why}")


def check_experiment(cfg: ExperimentConfig, where: str) -> None:
    """What involves several keys, the method or the file system (pydantic checked each key)."""

    def bad(key: str, allowed: str) -> UserError:
        return UserError(f"{where}key '{key}': {getattr(cfg, key)!r} is invalid; {allowed}")

    given = [
        k
        for k in ("class_to_forget", "unlearning_rate", "idxs_to_forget")
        if getattr(cfg, k) is not None
    ]
    if len(given) > 1:
        raise UserError(f"{where}two forget specifications at once ({', '.join(given)}); give one")
    if not given and cfg.replace_class is None:
        raise UserError(
            f"{where}no forget set: give one of class_to_forget, unlearning_rate, idxs_to_forget"
        )
    rc = cfg.replace_class
    if rc is not None:
        if given:
            raise UserError(
                f"{where}key 'replace_class': the replaced class is the forget set; "
                f"drop {', '.join(given)}"
            )
        if rc["old"] == rc["new"]:
            raise bad("replace_class", "old and new must be two different class indices >= 0")
    if cfg.idxs_to_forget is not None and not Path(cfg.idxs_to_forget).is_file():
        raise _file_problem(cfg.idxs_to_forget, "idxs_to_forget", where, "a forget-index file")
    if cfg.load_mask is not None and not Path(cfg.load_mask).is_file():
        raise _file_problem(cfg.load_mask, "load_mask", where, "a mask file")
    if isinstance(cfg.checkpoint, str) and (problem := checkpoint_problem(cfg.checkpoint)):
        if Path(cfg.checkpoint).is_dir():
            raise _file_problem(cfg.checkpoint, "checkpoint", where, "a checkpoint")
        stem = checkpoint_stem(cfg.checkpoint)
        if stem.with_name(stem.name + ".safetensors").is_file():  # there, but damaged
            raise bad("checkpoint", f"{problem}; train it again (train.py) or use another one")
        raise bad("checkpoint", "file not found (give a .safetensors checkpoint with its .json)")
    spec = method_spec(cfg.method, where)
    if (cfg.use_mask or cfg.load_mask) and not spec.supports_mask:
        raise bad("use_mask", f"method '{cfg.method}' takes no gradient steps to mask")
    if cfg.frozen and not spec.supports_mask:
        raise bad("frozen", f"method '{cfg.method}' takes no gradient steps to constrain")
    if hasattr(cfg.method_args, "check"):
        cfg.method_args.check(f"{where}key 'method_args': ")
    ev = cfg.evaluate
    if ev is not None and ev.ulira is not None:
        if ev.models is None:
            raise UserError(f"{where}key 'evaluate.ulira': U-LiRA attacks the models of the "
                            'many-model evaluation; add "models": N (e.g. 32) to "evaluate"')  # fmt: skip
        for key in ("load_mask", "replace_class"):
            if getattr(cfg, key) is not None:
                raise UserError(f"{where}key 'evaluate.ulira': not with {key} (the shadow "
                                "models are other base models, trained on halves of the "
                                "pool, with forget sets of their own)")  # fmt: skip
        if cfg.class_to_forget is not None:
            raise UserError(f"{where}key 'evaluate.ulira': not with class_to_forget: U-LiRA "
                            "tells an unlearned example from one never trained on by shadow "
                            "models that trained on its class, which no class-wise oracle "
                            "did; use unlearning_rate or idxs_to_forget (the epsilon score "
                            'of "models" covers class-wise forgetting)')  # fmt: skip
    if cfg.tune is not None:
        _check_tune(cfg, cfg.tune, where)


def _check_tune(cfg: ExperimentConfig, t: TuneConfig, where: str) -> None:
    """The tuning forget set can be built and differs from the evaluated one (running/tune.py)."""
    if cfg.replace_class is not None:
        raise UserError(f"{where}key 'tune': class replacement cannot be tuned against a "
                        "retrain oracle; drop tune or replace_class")  # fmt: skip
    if t.forget is not None:
        if cfg.class_to_forget is None:
            raise UserError(f"{where}key 'tune.forget': {t.forget!r} is invalid; a tuning class "
                            "is for class-wise forgetting (random and index forget sets are "
                            "tuned on a second draw with tune.seed): drop it")  # fmt: skip
        cf = cfg.class_to_forget
        evaluated = set(cf if isinstance(cf, list) else [cf])
        tuned = set(t.forget if isinstance(t.forget, list) else [t.forget])
        if evaluated & tuned:
            raise UserError(f"{where}key 'tune.forget': {t.forget!r} is invalid; the tuning "
                            f"class must not be an evaluated one ({sorted(evaluated)}), so the "
                            "evaluated forget set never informs the settings")  # fmt: skip
    if t.base_seeds is not None and not isinstance(cfg.checkpoint, TrainConfig):
        raise UserError(f"{where}key 'tune.base_seeds': {t.base_seeds!r} is invalid; base "
                        "seeds need a checkpoint recipe (an object), not a file")  # fmt: skip


def load_experiments(path: str | Path) -> list[ExperimentConfig]:
    """Read and validate a whole experiment list before anything trains."""
    p = Path(path)
    data = read_json(p, "an experiment file")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{p}: expected a non-empty JSON list of experiment objects")
    return [parse_experiment(obj, f"{p}: experiment {i}: ") for i, obj in enumerate(data)]


def absolute_paths(exp: dict[str, Any]) -> dict[str, Any]:
    """An experiment's JSON (``to_json``) with its file paths made absolute, so the same file
    named relatively or absolutely is the same configuration."""
    out = dict(exp)
    for key in (*PATH_KEYS, "checkpoint"):
        if isinstance(out.get(key), str):
            out[key] = str(Path(out[key]).resolve())
    return out


def run_record(source: str, nexp: int, seed: int, experiments: list[ExperimentConfig]) -> dict:
    """What a run folder's ``config.json`` records: the resolved configuration, with absolute
    paths (the experiment file's and every file an experiment names)."""
    return {
        "source": source if source == "command line" else str(Path(source).resolve()),
        "nexp": nexp,
        "seed": seed,
        "experiments": [absolute_paths(e.to_json()) for e in experiments],
    }


_ABSENT = object()


def _show(v: Any) -> str:
    text = "absent" if v is _ABSENT else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: Any, new: Any, key: str = "") -> list[str]:
    """``<key> was <old>, now <new>`` for every leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [
            line
            for k in keys
            for line in differences(
                old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}" if key else k
            )
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [line for i, (a, b) in pairs for line in differences(a, b, f"{key}[{i}]")]
    return [] if old == new else [f"{key} was {_show(old)}, now {_show(new)}"]


def check_same_config(config_path: Path, record: dict[str, Any]) -> None:
    """A rerun into an existing run folder must have the folder's configuration (``--nexp``
    may differ: it only adds or leaves out seeds); otherwise one line says what differs."""
    out = config_path.parent
    try:
        old = read_json(config_path, "a run folder's config.json")
    except UserError as e:
        raise UserError(f"{e}; this run folder's record is damaged: use a new --out") from None
    if not isinstance(old, dict):
        raise UserError(f"{config_path}: not a run folder's configuration; use a new --out")
    if old.get("source") not in (None, "command line"):  # folders written before paths were
        old["source"] = str(Path(old["source"]).resolve())  # recorded absolute
    if isinstance(old.get("experiments"), list):
        old["experiments"] = [absolute_paths(e) if isinstance(e, dict) else e
                              for e in old["experiments"]]  # fmt: skip
    keys = [k for k in record if k != "nexp"]
    new = json.loads(dumps({k: record[k] for k in keys}))
    diff = differences({k: old.get(k, _ABSENT) for k in keys}, new)
    if diff:
        more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise UserError(
            f"{out}: this run folder was made with a different configuration "
            f"({'; '.join(diff[:3])}{more}); use a new --out to start a fresh run"
        )
