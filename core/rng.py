"""Independent random streams: one seed per purpose, derived from the run seed by name.

Two draws that use the same integer seed share their random numbers: a forget set drawn with
``randperm(seed)`` and a feature sample drawn with the same ``randperm(seed)`` start with the
same indices (issue 12: seed 0's t-SNE sample held all 400 forget samples). Every purpose
therefore gets its own seed, derived as

    stream(seed, purpose) = int.from_bytes(sha256(f"{seed}/{purpose}")[:8], "big") >> 1

a 63-bit integer (it fits ``torch.manual_seed``, ``torch.Generator.manual_seed`` and
``numpy.random.default_rng``). ``stream(seed, purpose, bits=32)`` keeps the top 32 bits instead
(``>> 32``), for APIs limited to 32-bit seeds (``numpy.random.RandomState``, scikit-learn's
``random_state``). SHA-256 makes seeds for different purposes, and for the same
purpose under different run seeds, behave as unrelated; the derivation is fixed, so a run is
reproducible from its seed alone. Purposes are short names with ``/`` as a separator,
e.g. ``"forget"``, ``"data-order"``, ``"mia/salun/draw3"``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

#: Purposes in use; a new purpose needs no registration, these names only keep spellings equal.
FORGET = "forget"
DATA_ORDER = "data-order"
LABELS = "labels"
AUGMENT = "augment"
ATTACK = "attack"
FEATURES = "features"


def stream(seed: int, purpose: str, bits: int = 63) -> int:
    """The `bits`-bit seed (63 or 32) of `purpose` under the run seed (see the module docstring)."""
    if not purpose:
        raise ValueError("a random stream needs a non-empty purpose name")
    if bits not in (32, 63):
        raise ValueError(f"bits must be 63 or 32, got {bits}")
    digest = hashlib.sha256(f"{int(seed)}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)


def generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream`."""
    g = torch.Generator()
    g.manual_seed(stream(seed, purpose))
    return g


def numpy_rng(seed: int, purpose: str) -> np.random.Generator:
    """A ``numpy.random.Generator`` seeded with :func:`stream`."""
    return np.random.default_rng(stream(seed, purpose))
