"""Derived seeds and explicit generators.

Every random number in flatlens comes from a ``torch.Generator`` seeded from a tuple such as
``(base_seed, "batch", step, domain)`` through :func:`seed_hash` (DomainBed's md5 construction), so a
value depends only on what it is for, never on how much randomness was drawn before it. This is what
makes minibatches, augmentation and dropout pure functions of the step, and resumed runs bitwise equal
to uninterrupted ones.
"""

from __future__ import annotations

import hashlib

import torch


def seed_hash(*parts: object) -> int:
    """A 31-bit seed from any tuple of printable parts (md5 of their repr, as DomainBed does)."""
    digest = hashlib.md5(repr(parts).encode("utf-8")).hexdigest()
    return int(digest, 16) % (2**31)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``seed_hash(*parts)``; draw on CPU, then move to the device."""
    return torch.Generator(device="cpu").manual_seed(seed_hash(*parts))
