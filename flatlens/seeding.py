"""Derived seeds and explicit generators.

Every random number in flatlens comes from a ``torch.Generator`` seeded from a tuple such as
``(base_seed, "batch", step, domain)`` through :func:`seed_hash` (DomainBed's md5 construction), so a
value depends only on what it is for, never on how much randomness was drawn before it. This is what
makes minibatches, augmentation and dropout pure functions of the step, and resumed runs bitwise equal
to uninterrupted ones.
"""

from __future__ import annotations

import hashlib
import operator
from typing import Any

import numpy as np
import torch

from flatlens.errors import FlatlensError

SEED_RANGE = (-(2**63), 2**63)
"""Seeds are stored as HDF5/JSON 64-bit integers, so they must fit in one."""


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as a plain ``int``, or a one-line FlatlensError.

    Integers of numpy or 0-d integer tensors are accepted and converted, so ``seed=np.int64(3)`` draws
    what ``seed=3`` (and ``--seed 3``) draws; bools, floats and strings are refused rather than hashed
    as whatever their ``repr`` is; a seed outside 64 bits (which no result file could record) too.
    """
    if isinstance(seed, bool):
        raise FlatlensError(f"{name}={seed!r} is not an int; pass e.g. {name}=0")
    try:
        value = operator.index(seed)
    except TypeError:
        raise FlatlensError(f"{name}={seed!r} is not an int; pass e.g. {name}=0") from None
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise FlatlensError(f"{name}={value} does not fit in 64 bits, so no result file could record it; "
                            f"pass one in [-2**63, 2**63)")
    return int(value)


def seed_hash(*parts: object) -> int:
    """A 31-bit seed from any tuple of printable parts (md5 of their repr, as DomainBed does).

    numpy integers count as the Python ints they equal (``repr(np.int64(3))`` is ``np.int64(3)``, which
    would give a different stream than ``3``); Python values hash as before."""
    parts = tuple(int(p) if isinstance(p, np.integer) else p for p in parts)
    digest = hashlib.md5(repr(parts).encode("utf-8")).hexdigest()
    return int(digest, 16) % (2**31)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``seed_hash(*parts)``; draw on CPU, then move to the device."""
    return torch.Generator(device="cpu").manual_seed(seed_hash(*parts))
