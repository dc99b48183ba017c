"""The training recipe of a base model or oracle: every setting, stored in every sidecar."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core.errors import UserError

SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """How a base model (or its retrain oracle) is trained; stored in every checkpoint sidecar."""

    model: str | None = None  # None: the dataset's default model
    dataset: str = "mnist5k"
    dataset_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    patience: int = 0  # epochs without validation improvement before stopping; 0 = never
    augment: bool = True
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.1
    # train on these classes only (labels keep their dataset ids; None = all classes)
    classes: list[int] | None = None

    def __post_init__(self) -> None:
        if self.classes is not None and all(isinstance(c, int) for c in self.classes):
            object.__setattr__(self, "classes", sorted(self.classes))  # one name per subset

    def check(self, where: str = "") -> None:
        def bad(key: str, value: Any, allowed: str) -> UserError:
            return UserError(f"{where}{key} = {value!r} is invalid; {allowed}")

        if self.epochs < 1:
            raise bad("epochs", self.epochs, "use a positive integer")
        if not self.lr > 0:
            raise bad("lr", self.lr, "use a positive number")
        if self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "use a positive integer")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", self.momentum, "use a value in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "use a value >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"use one of {', '.join(SCHEDULES)}")
        if self.patience < 0:
            raise bad("patience", self.patience, "use an integer >= 0 (0 disables)")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", self.val_fraction, "use a value in [0, 1)")
        c = self.classes
        if c is not None and (len(c) < 2 or len(set(c)) != len(c) or min(c) < 0):
            raise bad("classes", c, "use at least two distinct class indices >= 0")

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
        return d
