"""Experiment configuration: one frozen dataclass tree, built once from JSON and validated there.

Keys follow the SalUn DeepDive experiment files (``checkpoint``, ``class_to_forget``,
``unlearning_rate``, ``idxs_to_forget``, ``use_mask``, ``mask_thr``, ``lr``, ``epochs``,
``method``, ``tag``) plus shared training settings (``batch_size``, ``optimizer``) and a
``method_args`` object for method-specific settings. Every error names the file, the
experiment, the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError, did_you_mean
from datasets import dataset_info
from methods import OptimizerSettings, Settings
from models import MODELS, build_model
from training.checkpoints import checkpoint_exists
from training.config import SCHEDULES, TrainConfig
from unlearning import method_spec

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser of the unlearning run (shared by all methods that take gradient steps)."""

    name: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"

    def check(self, where: str) -> None:
        if self.name not in OPTIMIZERS:
            raise UserError(
                f"{where}key 'optimizer.name': {self.name!r} is invalid; use one of "
                f"{', '.join(OPTIMIZERS)}{did_you_mean(self.name, OPTIMIZERS)}"
            )
        if not 0 <= self.momentum < 1:
            raise UserError(f"{where}key 'optimizer.momentum': {self.momentum!r} not in [0, 1)")
        if self.weight_decay < 0:
            raise UserError(f"{where}key 'optimizer.weight_decay': {self.weight_decay!r} < 0")
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"{where}key 'optimizer.schedule': {self.schedule!r} is invalid; use one of "
                f"{', '.join(SCHEDULES)}"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment of a list; every run of it uses seed base + i."""

    method: str = "rl_split"
    checkpoint: str | TrainConfig = field(default_factory=TrainConfig)
    class_to_forget: int | list[int] | None = None
    unlearning_rate: float | None = None
    idxs_to_forget: str | None = None
    use_mask: bool = False
    mask_thr: float = 0.5
    load_mask: str | None = None
    lr: float = 0.01
    epochs: int = 5
    batch_size: int = 128
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    method_args: Any = None  # the method's own frozen dataclass, defaults filled in
    frozen: list[str] = field(default_factory=list)
    replace_class: dict[str, int] | None = None
    tag: str = ""

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
            optimizer=OptimizerSettings(o.name, o.momentum, o.weight_decay, o.schedule),
            frozen=tuple(self.frozen),
            args=self.method_args,
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
        return d


# ---------------------------------------------------------------------------------------------
# Generic, strict parsing of JSON objects into frozen dataclasses


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "object"
    if dataclasses.is_dataclass(tp):
        return "object"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, where: str, key: str) -> Any:
    """Return `value` as type `tp`, or raise UserError naming the key and the allowed type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where, key)
            except UserError as e:
                last = e
                # a nested object that failed inside deserves its own message
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise
        raise UserError(
            f"{where}key '{key}': {value!r} is invalid; expected {_type_name(tp)}"
        ) from last
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp)
            return [_convert(v, inner, where, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, inner = typing.get_args(tp)
            return {k: _convert(v, inner, where, f"{key}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return parse_dataclass(tp, value, where, prefix=f"{key}.")
    raise UserError(f"{where}key '{key}': {value!r} is invalid; expected {_type_name(tp)}")


def parse_dataclass(cls: type, obj: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build `cls` from a JSON object: unknown keys fail with a did-you-mean, types are strict."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in obj:
        if k not in names:
            raise UserError(
                f"{where}unknown key '{prefix}{k}'{did_you_mean(k, names)}; "
                f"valid keys: {', '.join(names)}"
            )
    kwargs = {k: _convert(v, hints[k], where, prefix + k) for k, v in obj.items()}
    return cls(**kwargs)


def parse_train_config(obj: dict[str, Any], where: str, key: str = "checkpoint") -> TrainConfig:
    cfg = parse_dataclass(TrainConfig, obj, where, prefix=f"{key}.")
    cfg.check(f"{where}{key}: ")
    return cfg


def _check_names(cfg: TrainConfig, where: str) -> None:
    """The dataset and model of a checkpoint object exist, so a typo fails before any training."""
    import timm

    try:
        dataset_info(cfg.dataset)
    except UserError as e:
        raise UserError(f"{where}key 'checkpoint.dataset': {e}") from None
    if cfg.model is not None and cfg.model not in MODELS and not timm.is_model(cfg.model):
        try:
            build_model(cfg.model, 1, 1)  # unknown: raises the UserError with a did-you-mean
        except UserError as e:
            raise UserError(f"{where}key 'checkpoint.model': {e}") from None


def parse_experiment(obj: Any, where: str) -> ExperimentConfig:
    """Parse and check one experiment object (everything that does not need the data)."""

    if not isinstance(obj, dict):
        raise UserError(f"{where}an experiment must be a JSON object, got {type(obj).__name__}")
    obj = dict(obj)
    method = obj.get("method", ExperimentConfig.method)
    if not isinstance(method, str):
        raise UserError(f"{where}key 'method': {method!r} is invalid; expected a string")
    spec = method_spec(method, where)
    raw_args = obj.pop("method_args", {})
    if not isinstance(raw_args, dict):
        raise UserError(f"{where}key 'method_args': {raw_args!r} is invalid; expected an object")
    ckpt = obj.pop("checkpoint", {})
    if isinstance(ckpt, dict):
        ckpt_cfg: str | TrainConfig = parse_train_config(ckpt, where)
        _check_names(ckpt_cfg, where)
    elif isinstance(ckpt, str):
        ckpt_cfg = ckpt
    else:
        raise UserError(
            f"{where}key 'checkpoint': {ckpt!r} is invalid; expected a path or an object "
            "of train.py settings"
        )
    cfg = parse_dataclass(ExperimentConfig, obj, where)
    args = parse_dataclass(spec.args, raw_args, where, prefix="method_args.")
    cfg = dataclasses.replace(cfg, checkpoint=ckpt_cfg, method_args=args)
    check_experiment(cfg, where)
    return cfg


def check_experiment(cfg: ExperimentConfig, where: str) -> None:

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
        if sorted(rc) != ["new", "old"]:
            raise bad("replace_class", 'use {"old": <trained class>, "new": <untrained class>}')
        if min(rc.values()) < 0 or rc["old"] == rc["new"]:
            raise bad("replace_class", "old and new must be two different class indices >= 0")
    cf = cfg.class_to_forget
    if cf is not None:
        cls = cf if isinstance(cf, list) else [cf]
        if not cls or any(c < 0 for c in cls) or len(set(cls)) != len(cls):
            raise bad("class_to_forget", "use a class index >= 0 or a list of distinct ones")
    if cfg.unlearning_rate is not None and not 0 < cfg.unlearning_rate < 1:
        raise bad("unlearning_rate", "use a fraction in (0, 1)")
    if cfg.idxs_to_forget is not None and not Path(cfg.idxs_to_forget).is_file():
        raise bad("idxs_to_forget", "file not found")
    if not 0 < cfg.mask_thr <= 1:
        raise bad("mask_thr", "use the fraction of weights kept, in (0, 1]")
    if cfg.load_mask is not None and not Path(cfg.load_mask).is_file():
        raise bad("load_mask", "file not found")
    if not cfg.lr > 0:
        raise bad("lr", "use a positive number")
    if cfg.epochs < 0:
        raise bad("epochs", "use an integer >= 0")
    if cfg.batch_size < 1:
        raise bad("batch_size", "use a positive integer")
    if isinstance(cfg.checkpoint, str) and not _checkpoint_exists(cfg.checkpoint):
        raise bad("checkpoint", "file not found (give a .safetensors checkpoint with its .json)")
    cfg.optimizer.check(where)
    spec = method_spec(cfg.method, where)
    if (cfg.use_mask or cfg.load_mask) and not spec.supports_mask:
        raise bad("use_mask", f"method '{cfg.method}' takes no gradient steps to mask")
    if cfg.frozen and not spec.supports_mask:
        raise bad("frozen", f"method '{cfg.method}' takes no gradient steps to constrain")
    if hasattr(cfg.method_args, "check"):
        cfg.method_args.check(f"{where}key 'method_args': ")


def _checkpoint_exists(path: str) -> bool:

    return checkpoint_exists(path)


def load_experiments(path: str | Path) -> list[ExperimentConfig]:
    """Read and validate a whole experiment list before anything trains."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: experiment file not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(
            f"{p}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{p}: expected a non-empty JSON list of experiment objects")
    return [parse_experiment(obj, f"{p}: experiment {i}: ") for i, obj in enumerate(data)]
