"""The training recipe of a base model or oracle: every setting, stored in every sidecar.

The field annotations are the rules (see core/validation.py): pydantic checks a recipe from an
experiment file or from train.py's flags against them, and writes them into exp/schema.json.

A recipe may start with self-supervised pretraining (``pretrain``, BYOL: Grill et al. 2020,
"Bootstrap Your Own Latent", training/byol.py) and then fine-tune on the labelled pool, the
whole model (``finetune: "full"``) or only its classifier on the frozen encoder (``"linear"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any

from pydantic import AliasChoices, Field, with_config

from core.errors import UserError
from core.validation import (
    CONFIG,
    INT_MAX,
    Bool,
    OneOf,
    Range,
    Rule,
    Seed,
    Text,
    validate,
)
from datasets import DATASETS, check_dataset_args, has_unlabeled

SCHEDULES = ("onecycle", "cosine", "constant")
MAX_EPOCHS = 10_000  # more is a typo (10**30 epochs would never finish)
MAX_BATCH = 1_000_000

Epochs = Annotated[int, Range(0, MAX_EPOCHS)]
BatchSize = Annotated[int, Range(1, MAX_BATCH)]
ClassIndex = Annotated[int, Range(0, INT_MAX, allowed="use a class index >= 0")]
Fraction = Annotated[float, Range(0, 1, hi_open=True, allowed="use a value in [0, 1)")]
Positive = Annotated[float, Range(0, None, lo_open=True)]
NonNegative = Annotated[float, Range(0, None)]


def _distinct(c: list[int]) -> bool:
    return len(c) >= 2 and len(set(c)) == len(c)


PRETRAIN_METHODS = ("byol",)
# "pool": the images the model is fine-tuned on (the training part of the pool, so a retrain
# oracle's pretraining leaves its forget set out too); "unlabeled": the dataset's unlabeled
# split (STL-10), disjoint from the labelled pool
PRETRAIN_DATA = ("pool", "unlabeled")
FINETUNE = ("full", "linear")
# a self-supervised base model's retrain oracle: its encoder pretrained again without the
# forget set ("exact"), or the base model's encoder reused ("shared", an approximation)
PRETRAIN_ORACLES = ("exact", "shared")
BYOL_OPTIMIZERS = ("adamw", "sgd")
Width = Annotated[int, Range(1, INT_MAX)]
CropArea = Annotated[float, Range(0, 1, lo_open=True, allowed="use a value in (0, 1]")]


def _pair(v: list[int]) -> bool:
    return len(v) == 2


def _crop_range(s: list[float]) -> bool:
    return len(s) == 2 and s[0] <= s[1]


@with_config(CONFIG)
@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining of the encoder before fine-tuning (``pretrain`` of a recipe).

    The BYOL settings and their defaults are training.byol.ByolConfig's (a test keeps them
    equal); ``tau`` is accepted for ``tau_base``, as the BYOL paper names it.
    """

    method: Annotated[str, OneOf(PRETRAIN_METHODS)] = "byol"
    data: Annotated[str, OneOf(PRETRAIN_DATA)] = "pool"
    epochs: Annotated[int, Range(1, MAX_EPOCHS)] = 30
    lr: Positive = 2e-3
    optimizer: Annotated[str, OneOf(BYOL_OPTIMIZERS)] = "adamw"
    momentum: Fraction = 0.9
    weight_decay: NonNegative = 1e-4
    schedule: Annotated[str, OneOf(SCHEDULES)] = "cosine"
    tau_base: Annotated[
        float, Range(0, 1), Field(validation_alias=AliasChoices("tau_base", "tau"))
    ] = 0.99
    projector: Annotated[list[Width], Rule(_pair, "use [hidden, out], two positive integers")] = (
        field(default_factory=lambda: [512, 128])
    )
    predictor_hidden: Width = 512
    batch_size: Annotated[int, Range(2, MAX_BATCH)] = 256
    seed: Seed | None = None  # None: the recipe's seed
    crop_scale: (
        Annotated[list[CropArea], Rule(_crop_range, "use [low, high] with 0 < low <= high <= 1")]
        | None
    ) = None
    knn_k: Width = 20
    knn_every: Annotated[int, Range(0, MAX_EPOCHS, allowed="use an integer >= 0 (0 = off)")] = 1

    def __post_init__(self) -> None:
        # tuples given in code compare equal to the lists read back from JSON
        object.__setattr__(self, "projector", list(self.projector))
        if self.crop_scale is not None:
            object.__setattr__(self, "crop_scale", list(self.crop_scale))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PretrainConfig:
        """The pretraining recipe stored in a sidecar (unknown keys ignored, as TrainConfig)."""
        known = {f.name for f in fields(cls)}
        d = {"tau_base": d["tau"]} | d if "tau" in d else d
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@with_config(CONFIG)
@dataclass(frozen=True)
class TrainConfig:
    """How a base model (or its retrain oracle) is trained; stored in every checkpoint sidecar."""

    model: Text | None = None  # None: the dataset's default model
    dataset: Text = "mnist5k"
    dataset_args: dict[Text, Any] = field(default_factory=dict)
    epochs: Annotated[int, Range(1, MAX_EPOCHS)] = 20
    lr: Positive = 0.05
    batch_size: BatchSize = 128
    momentum: Fraction = 0.9
    weight_decay: NonNegative = 5e-4
    schedule: Annotated[str, OneOf(SCHEDULES)] = "onecycle"
    # epochs without validation improvement before stopping; 0 = never
    patience: Annotated[int, Range(0, MAX_EPOCHS, allowed="use an integer >= 0 (0 disables)")] = 0
    augment: Bool = True
    seed: Seed = 0
    split_seed: Seed = 0
    val_fraction: Fraction = 0.1
    # train on these classes only (labels keep their dataset ids; None = all classes)
    classes: (
        Annotated[
            list[ClassIndex],
            Rule(_distinct, "use at least two distinct class indices >= 0"),
        ]
        | None
    ) = None
    # self-supervised pretraining of the encoder first; None: supervised training only
    pretrain: PretrainConfig | None = None
    # after pretraining: train the whole model, or only the classifier on the frozen encoder
    finetune: Annotated[str, OneOf(FINETUNE)] = "full"

    def __post_init__(self) -> None:
        if self.classes is not None and all(isinstance(c, int) for c in self.classes):
            object.__setattr__(self, "classes", sorted(self.classes))  # one name per subset
        if isinstance(self.pretrain, dict):  # a recipe read back from a sidecar
            object.__setattr__(self, "pretrain", PretrainConfig.from_json(self.pretrain))

    @classmethod
    def parse(cls, obj: Any, where: str = "", prefix: str = "") -> TrainConfig:
        """A recipe from a JSON object; errors name ``key '<prefix>.<key>'``."""
        cfg: TrainConfig = validate(cls, obj, where, prefix)
        cfg.check_dataset_args(f"{where}{prefix}." if prefix else where)
        return cfg

    def check(self, where: str = "", flags: dict[str, str] | None = None) -> None:
        """Check a recipe built in code: ``{where}<key> = <value> is invalid``, naming the
        command-line flag of a key (``flags``) where its spelling differs."""
        flags = flags or {}

        def label(key: str) -> str:
            flag = flags.get(key, f"--{key}")
            return f"{key} =" if flag == f"--{key}" else f"{key} ({flag}) ="

        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.pretrain is not None:
            data["pretrain"] = self.pretrain.to_json()
        validate(type(self), data, where, label=label)
        self.check_dataset_args(where)

    def check_dataset_args(self, where: str = "") -> None:
        if self.dataset in DATASETS:
            check_dataset_args(self.dataset, self.dataset_args, where)
        self.check_pretrain(where)

    def check_pretrain(self, where: str = "") -> None:
        """What involves the pretraining object and other keys of the recipe."""
        p = self.pretrain
        if p is None:
            if self.finetune != "full":
                raise UserError(
                    f"{where}finetune = {self.finetune!r} is invalid without a pretrain object; "
                    'a linear head on a random encoder is no base model (add "pretrain" or '
                    'drop "finetune")'
                )
            return
        if p.data == "unlabeled" and self.dataset in DATASETS and not has_unlabeled(self.dataset):
            with_split = [n for n in DATASETS if has_unlabeled(n)]
            raise UserError(
                f"{where}pretrain.data = 'unlabeled' is invalid for dataset {self.dataset!r}; "
                f"only {', '.join(with_split) or 'none'} has an unlabeled split (use 'pool')"
            )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """The recipe stored in a sidecar; keys it does not know (e.g. a resolved model) are
        ignored, so sidecars written by other versions still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.classes is None:
            del d["classes"]  # sidecars and cache names of all-class models stay as they were
        if self.pretrain is None:
            del d["pretrain"], d["finetune"]  # likewise for supervised-only models
        else:
            d["pretrain"] = self.pretrain.to_json()
        return d
