"""BYOL self-supervised pretraining (Grill et al. 2020, "Bootstrap Your Own Latent").

An online network (the model as encoder, a projector MLP, a predictor MLP) learns to predict a
target network's projection of another view of the same image; the target (a copy of encoder
and projector) follows the online weights as an exponential moving average whose rate tau
rises from ``tau_base`` to 1 along a cosine (paper, section 3.2):

    tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2,   k = 0..K optimiser steps.

The loss is the symmetric normalised MSE ``2 - 2 cos(q, z')`` of the online prediction of each
view against the target projection of the other (paper, eq. 2 plus its symmetrised twin).

Views are made per batch on the device from DeviceData's batches, like supervised training's
crop and flip, with the paper's table 6 augmentations:

* colour images: random resized crop (area 8-100%, aspect 3/4-4/3 where the image allows
  it), horizontal flip where the dataset allows it, colour jitter with p=0.8 (brightness 0.4,
  contrast 0.4, saturation 0.2, hue 0.1, applied in that fixed order; hue rotates the chroma in
  YIQ space), grayscale with p=0.2, Gaussian blur with p=1.0 / 0.1 for view 1 / 2,
  solarisation with p=0.0 / 0.2.
* single-channel images (digits, letters, Fashion-MNIST), a documented subset: random resized
  crop of area 60-100% (smaller crops of a 28-px digit lose the digit: after 10 epochs on the
  mnist5k LeNet a linear probe reaches 92.3% with 60-100%, 91.2% with 40-100%, 89.8% with
  80-100%), flip where the dataset allows it, brightness and contrast jitter with p=0.8.
  Saturation, hue and grayscale have nothing to act on, and solarisation would turn a digit's
  bright strokes dark on its dark background, erasing it.
* blur: the paper's sigma of 0.1-2.0 px on 224-px images, scaled to the image size; below
  56 px its largest sigma is under half a pixel and changes nothing, so it is skipped there (as
  CIFAR-scale BYOL setups do).

Both views go through each network as one batch (one forward pass; BatchNorm statistics span
both views). The target runs in training mode (batch statistics, as in the paper); only its
parameters follow the EMA. The model's classifier (``get_classifier()``) is neither trained nor
changed: pretraining shapes ``forward_head(..., pre_logits=True)`` features only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import UserError
from datasets import DeviceData
from training.loop import EVAL_BATCH, make_optimizer, make_scheduler

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass(frozen=True)
class ByolConfig:
    """How BYOL pretrains an encoder.

    The defaults on the mnist5k LeNet (3,600 pool images, 30 epochs, 76 s on one CPU thread):
    a linear probe on the frozen features scores 94.2% on the test set (the same LeNet at
    initialisation: 79.5%), the kNN monitor 94.3% on validation.
    """

    epochs: int = 30
    lr: float = 2e-3
    optimizer: str = "adamw"  # adamw | sgd (SGD with Nesterov momentum, as training.loop)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # learning rate: onecycle | cosine | constant, per step
    tau_base: float = 0.99
    projector: tuple[int, int] = (512, 128)  # hidden, out (paper: 4096, 256)
    predictor_hidden: int = 512  # paper: 4096
    batch_size: int = 256
    seed: int = 0
    # random-resized-crop area range; None: (0.08, 1) for colour images, (0.6, 1) otherwise
    crop_scale: tuple[float, float] | None = None
    knn_k: int = 20  # neighbours of the kNN monitor
    knn_every: int = 1  # epochs between kNN monitor evaluations; 0 disables the monitor

    def __post_init__(self) -> None:
        # JSON gives lists; one value, one config
        object.__setattr__(self, "projector", tuple(self.projector))
        if self.crop_scale is not None:
            object.__setattr__(self, "crop_scale", tuple(self.crop_scale))

    def check(self, where: str = "") -> None:
        def bad(key: str, value: Any, allowed: str) -> UserError:
            return UserError(f"{where}pretrain.{key} = {value!r} is invalid; {allowed}")

        if self.epochs < 1:
            raise bad("epochs", self.epochs, "use a positive integer")
        if not self.lr > 0:
            raise bad("lr", self.lr, "use a positive number")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", self.momentum, "use a value in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "use a value >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"use one of {', '.join(SCHEDULES)}")
        if not 0 <= self.tau_base <= 1:
            raise bad("tau_base", self.tau_base, "use a value in [0, 1]")
        if len(self.projector) != 2 or min(self.projector) < 1:
            raise bad("projector", list(self.projector), "use [hidden, out], positive integers")
        if self.predictor_hidden < 1:
            raise bad("predictor_hidden", self.predictor_hidden, "use a positive integer")
        if self.batch_size < 2:
            raise bad("batch_size", self.batch_size, "use an integer >= 2")
        s = self.crop_scale
        if s is not None and (len(s) != 2 or not 0 < s[0] <= s[1] <= 1):
            raise bad("crop_scale", list(s), "use [low, high] with 0 < low <= high <= 1")
        if self.knn_k < 1:
            raise bad("knn_k", self.knn_k, "use a positive integer")
        if self.knn_every < 0:
            raise bad("knn_every", self.knn_every, "use an integer >= 0 (0 disables)")

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "") -> ByolConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"{where}unknown pretrain key '{unknown[0]}'; valid keys: {', '.join(sorted(known))}"
            )
        for f in fields(cls):
            if f.name in d and not _json_type_ok(f.default, d[f.name]):
                raise UserError(
                    f"{where}pretrain.{f.name} = {d[f.name]!r} is invalid; use a value like "
                    f"the default {f.default!r}"
                )
        cfg = cls(**d)
        cfg.check(where)
        return cfg

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["projector"] = list(self.projector)
        d["crop_scale"] = list(self.crop_scale) if self.crop_scale is not None else None
        return d


def _json_type_ok(default: Any, value: Any) -> bool:
    """Whether a JSON value has the type of a ByolConfig field's default."""
    if isinstance(value, bool):
        return isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, str):
        return isinstance(value, str)
    if value is None:
        return default is None
    # projector (integers) and crop_scale (numbers, default None) are pairs
    kind = int if isinstance(default, tuple) else (int, float)
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    )


@dataclass
class ByolResult:
    epochs_run: int
    seconds: float  # wall time, monitor included
    train_seconds: float  # optimisation steps only (augmentation included)
    images_per_s: float  # training images (each seen as two views) per second of train_seconds
    knn_acc: float  # last kNN monitor accuracy (NaN when the monitor is off)
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# EMA target and loss


def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """The EMA rate after ``step`` of ``total_steps``: tau_base at 0, rising to 1 at the end."""
    if total_steps <= 0:
        return 1.0
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau * xi + (1 - tau) * theta over the parameters of two same-shaped modules."""
    t: list[Tensor] = list(target.parameters())
    o: list[Tensor] = list(online.parameters())
    if len(t) != len(o) or any(a.shape != b.shape for a, b in zip(t, o, strict=True)):
        raise ValueError("target and online networks differ in their parameters")
    torch._foreach_lerp_(t, o, 1.0 - tau)


def regression_loss(p: Tensor, z: Tensor) -> Tensor:
    """Per-sample normalised MSE ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)."""
    return 2.0 - 2.0 * F.cosine_similarity(p, z, dim=-1, eps=1e-12)


def byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric BYOL loss: view 1's prediction against view 2's target projection and back."""
    return regression_loss(p1, z2.detach()).mean() + regression_loss(p2, z1.detach()).mean()


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """BYOL's projector / predictor: linear, batch norm, ReLU, linear."""
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, d_out),
    )


def represent(model: nn.Module, x: Tensor) -> Tensor:
    """The encoder's representation: pre-logits features, flattened."""
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)  # type: ignore[operator]


class _Encoder(nn.Module):
    """The model up to its pre-logits features, with a projector on top."""

    def __init__(self, model: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.projector = projector

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(represent(self.model, x))


# ---------------------------------------------------------------------------------------------
# Views, made on the device


@dataclass(frozen=True)
class ViewAugment:
    """The augmentations of the two views; see the module docstring for the choices."""

    crop_scale: tuple[float, float]
    flip: bool
    colour: bool  # saturation, hue and grayscale (images with 3 channels)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.0, 0.0)  # in pixels of this image size; 0 = no blur
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.0)


def view_augment(data: DeviceData, crop_scale: tuple[float, float] | None = None) -> ViewAugment:
    raw = data.raw
    colour = raw.in_chans == 3
    h = min(raw.img_size)
    sigma = (0.1 * h / 224, 2.0 * h / 224)
    return ViewAugment(
        crop_scale=crop_scale or ((0.08, 1.0) if colour else (0.6, 1.0)),
        flip=raw.info.flip,
        colour=colour,
        blur_sigma=sigma if sigma[1] >= 0.5 else (0.0, 0.0),
        solarize_p=(0.0, 0.2) if colour else (0.0, 0.0),
    )


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> Tensor:
    return (low + (high - low) * torch.rand(n, generator=g)).to(device)


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) if x.shape[1] == 3 else x


def resized_crop(x: Tensor, scale: tuple[float, float], flip: bool, g: torch.Generator) -> Tensor:
    """Per-sample random resized crop (and flip) at the input size, by bilinear resampling."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, scale[0], scale[1], g, dev)
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), g, dev))
    # a side longer than the image is cut to the image and the other one stretched, so the
    # crop keeps its area (the aspect ratio gives way): area 1 is always the whole image
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = (area / w).clamp(max=1.0)
    w = area / h
    cx, cy = _uniform(n, -1, 1, g, dev), _uniform(n, -1, 1, g, dev)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(_uniform(n, 0, 1, g, dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx * (1 - w)
    theta[:, 1, 1], theta[:, 1, 2] = h, cy * (1 - h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: Tensor, aug: ViewAugment, g: torch.Generator) -> Tensor:
    n, dev = x.shape[0], x.device
    on = _uniform(n, 0, 1, g, dev) < aug.jitter_p

    def factor(s: float) -> Tensor:
        return torch.where(on, _uniform(n, 1 - s, 1 + s, g, dev), 1.0).view(n, 1, 1, 1)

    b, c, s, hue = aug.jitter
    x = (x * factor(b)).clamp(0, 1)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - m) * factor(c) + m).clamp(0, 1)
    if not aug.colour:
        return x
    gray = _gray(x)
    x = ((x - gray) * factor(s) + gray).clamp(0, 1)
    angle = torch.where(on, _uniform(n, -hue, hue, g, dev), 0.0) * 2 * math.pi
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev
    )
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(n, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mat = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [n, 3, 3], identity where angle is 0
    x = torch.einsum("nij,njhw->nihw", mat, x).clamp(0, 1)
    to_gray = _uniform(n, 0, 1, g, dev) < aug.gray_p
    return torch.where(to_gray.view(n, 1, 1, 1), _gray(x).expand_as(x), x)


def gaussian_blur(x: Tensor, sigma: tuple[float, float], p: float, g: torch.Generator) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma, applied to a random share p."""
    n, ch, hh, ww = x.shape
    dev = x.device
    on = _uniform(n, 0, 1, g, dev) < p
    s = _uniform(n, sigma[0], sigma[1], g, dev)
    r = max(1, math.ceil(3 * sigma[1]))
    taps = torch.arange(-r, r + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-(taps[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(ch, dim=0)  # one kernel per (sample, channel)
    y = F.pad(x.reshape(1, n * ch, hh, ww), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(n * ch, 1, 1, -1), groups=n * ch)
    y = F.conv2d(y, k.view(n * ch, 1, -1, 1), groups=n * ch).view(n, ch, hh, ww)
    return torch.where(on.view(n, 1, 1, 1), y, x)


def make_view(x: Tensor, aug: ViewAugment, which: int, g: torch.Generator) -> Tensor:
    """One augmented view (``which`` 0 or 1: the asymmetric blur/solarise) of [0, 1] images."""
    x = resized_crop(x, aug.crop_scale, aug.flip, g)
    x = colour_jitter(x, aug, g)
    if aug.blur_sigma[1] > 0 and aug.blur_p[which] > 0:
        x = gaussian_blur(x, aug.blur_sigma, aug.blur_p[which], g)
    if aug.solarize_p[which] > 0:
        on = (_uniform(x.shape[0], 0, 1, g, x.device) < aug.solarize_p[which]).view(-1, 1, 1, 1)
        x = torch.where(on & (x >= 0.5), 1.0 - x, x)
    return x


def two_views(
    data: DeviceData, x: Tensor, aug: ViewAugment, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Two normalised views of a normalised batch (as DeviceData.batches yields it)."""
    x01 = (x * data.std + data.mean).clamp(0, 1)
    v1, v2 = make_view(x01, aug, 0, g), make_view(x01, aug, 1, g)
    return (v1 - data.mean) / data.std, (v2 - data.mean) / data.std


# ---------------------------------------------------------------------------------------------
# kNN monitor


@torch.no_grad()
def encode(model: nn.Module, data: DeviceData, idx: Tensor, source: str = "train") -> Tensor:
    """Representations of ``idx`` (eval mode, no augmentation), float32 on the data's device."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        parts = [
            represent(model, x).float() for x, _, _ in data.batches(idx, EVAL_BATCH, source=source)
        ]
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(parts) if parts else torch.zeros(0, 0, device=data.device)


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> Tensor:
    """Weighted cosine kNN (Wu et al. 2018): each of the k most similar bank samples votes for
    its label with weight exp(cos / temperature); the label with the largest total wins."""
    c = int(num_classes if num_classes is not None else int(bank_labels.max()) + 1)
    k = min(k, len(bank))
    b = F.normalize(bank.float(), dim=1)
    preds = []
    for q in F.normalize(query.float(), dim=1).split(1024):
        sim, nn_idx = (q @ b.T).topk(k, dim=1)
        votes = torch.zeros(len(q), c, device=q.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[nn_idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=query.device)


def knn_accuracy(
    query: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Share of queries whose weighted cosine kNN label (see knn_predict) is their own."""
    if len(query) == 0:
        return math.nan
    n = int(max(int(bank_labels.max()), int(query_labels.max())) + 1)
    pred = knn_predict(query, bank, bank_labels.to(bank.device), k, temperature, n)
    return float((pred.cpu() == query_labels.cpu()).double().mean())


# ---------------------------------------------------------------------------------------------
# The pretraining loop


def _seeded_mlps(d: int, cfg: ByolConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    # a fixed seed for the heads' initialisation that leaves the global generator alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        hidden, out = cfg.projector
        projector = mlp(d, hidden, out)
        predictor = mlp(out, cfg.predictor_hidden, out)
    return projector.to(device), predictor.to(device)


def _trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return (p for p in model.parameters() if id(p) not in skip and p.requires_grad)


def pretrain_byol(
    model: nn.Module,
    data: DeviceData,
    train_idx: Tensor,
    val_idx: Tensor,
    cfg: ByolConfig,
    *,
    source: str = "train",
    bank_idx: Tensor | None = None,
    desc: str = "byol",
    on_batch: Callable[[Tensor], None] | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> ByolResult:
    """Pretrain ``model`` in place with BYOL on the images ``train_idx`` of ``source``.

    Labels are never used for training: only the kNN monitor reads them (``val_idx`` queries
    against the bank ``bank_idx``, both in the labelled pool; the bank defaults to ``train_idx``
    when ``source`` is the labelled "train" set; the monitor is skipped when ``val_idx`` or the
    bank is empty or ``knn_every`` is 0). ``on_batch`` sees the indices of every training batch.
    The model is left in training mode, as after ``training.loop.fit``.
    """
    cfg.check()
    if len(train_idx) < 2:
        raise UserError(f"{desc}: BYOL needs at least 2 training images, got {len(train_idx)}")
    dev = data.device
    if bank_idx is None:
        bank_idx = train_idx if source == "train" else train_idx[:0]
    monitor = cfg.knn_every > 0 and len(val_idx) > 0 and len(bank_idx) > 0
    g = torch.Generator().manual_seed(cfg.seed)
    aug = view_augment(data, cfg.crop_scale)
    d = encode(model, data, train_idx[:2], source).shape[1]
    projector, predictor = _seeded_mlps(d, cfg, dev)
    online = _Encoder(model, projector)
    target = copy.deepcopy(online).requires_grad_(False)
    params = list(_trainable(model)) + list(projector.parameters()) + list(predictor.parameters())
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = make_optimizer(params, cfg.lr, cfg.momentum, cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = data.num_batches(len(train_idx), cfg.batch_size)
    total = cfg.epochs * steps
    sched = make_scheduler(opt, cfg.schedule, total)
    history: list[dict[str, float]] = []
    knn = math.nan
    k = 0
    start = time.perf_counter()
    train_s = 0.0
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", disable=None, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        for net in (online, predictor, target):
            net.train()
        loss_sum, n = 0.0, 0
        for x, _, bi in data.batches(
            train_idx, cfg.batch_size, source=source, shuffle=True, generator=g
        ):
            if on_batch is not None:
                on_batch(bi)
            v1, v2 = two_views(data, x, aug, g)
            z = online(torch.cat([v1, v2]))
            p1, p2 = predictor(z).chunk(2)
            with torch.no_grad():
                t1, t2 = target(torch.cat([v1, v2])).chunk(2)
            loss = byol_loss(p1, p2, t1, t2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            k += 1
            ema_update(target, online, tau_at(k, total, cfg.tau_base))
            loss_sum += loss.item() * len(bi)
            n += len(bi)
        train_s += time.perf_counter() - t0
        row = {"epoch": float(epoch), "loss": loss_sum / n, "tau": tau_at(k, total, cfg.tau_base)}
        if monitor and (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
            labels = data.y["train"]
            knn = knn_accuracy(
                encode(model, data, val_idx),
                labels[val_idx.to(dev)],
                encode(model, data, bank_idx),
                labels[bank_idx.to(dev)],
                cfg.knn_k,
            )
            row["knn_acc"] = knn
        history.append(row)
        if log is not None:
            log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", knn=f"{knn:.3f}")
    model.train()
    return ByolResult(
        epochs_run=len(history),
        seconds=time.perf_counter() - start,
        train_seconds=train_s,
        images_per_s=cfg.epochs * len(train_idx) / max(train_s, 1e-9),
        knn_acc=knn,
        history=history,
    )
