"""Per-domain in/out holdout splits and leave-one-domain-out, with DomainBed's semantics.

Each domain i is split once from ``(trial_seed, i)``: the first ``int(len * holdout_fraction)`` of a
seeded permutation form ``env{i}_out`` (validation; the target domain's out split is what the oracle
selects on), the rest ``env{i}_in`` (training data for training domains; the reported test accuracy
for target domains). Splits depend on the trial seed alone, so every algorithm in a trial sees the
same splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from flatlens.data.base import MultiDomainDataset
from flatlens.errors import DataError
from flatlens.seeding import generator


@dataclass(frozen=True)
class DomainSplit:
    """Indices into one domain: ``in_idx`` (80% by default) and ``out_idx`` (the holdout)."""

    in_idx: Tensor
    out_idx: Tensor


@dataclass(frozen=True)
class Splits:
    """All domains' splits plus the leave-one-domain-out assignment."""

    domains: list[DomainSplit]
    test_envs: tuple[int, ...]
    holdout_fraction: float
    trial_seed: int

    @property
    def train_envs(self) -> list[int]:
        return [i for i in range(len(self.domains)) if i not in self.test_envs]

    def names(self) -> list[str]:
        """Record keys of every split, in order: env0_in, env0_out, env1_in, ..."""
        return [f"env{i}_{part}" for i in range(len(self.domains)) for part in ("in", "out")]

    def indices(self, key: str) -> tuple[int, Tensor]:
        """(domain index, sample indices) of a key such as ``env3_out``."""
        try:
            env, part = key[3:].split("_")
            i = int(env)
            split = self.domains[i]
        except (ValueError, IndexError):
            raise DataError(f"unknown split {key!r}; valid: {', '.join(self.names())}") from None
        if part not in ("in", "out"):
            raise DataError(f"unknown split {key!r}; valid: {', '.join(self.names())}")
        return i, split.in_idx if part == "in" else split.out_idx

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.domains:
            h.update(s.in_idx.numpy().astype("int64").tobytes())
            h.update(b"|")
            h.update(s.out_idx.numpy().astype("int64").tobytes())
            h.update(b";")
        h.update(repr(self.test_envs).encode())
        return h.hexdigest()[:16]


def make_splits(dataset: MultiDomainDataset, test_envs: list[int] | tuple[int, ...],
                holdout_fraction: float = 0.2, trial_seed: int = 0) -> Splits:
    """Split every domain into in/out parts and check the test domains exist."""
    n_env = len(dataset.domains)
    bad = [t for t in test_envs if not 0 <= t < n_env]
    if bad:
        raise DataError(
            f"data.test_envs {list(test_envs)} names no domain of {dataset.name} "
            f"(it has {n_env}: " + ", ".join(f"{i}={n}" for i, n in enumerate(dataset.domain_names)) + ")")
    if len(test_envs) >= n_env:
        raise DataError(f"data.test_envs {list(test_envs)} leaves no training domain of {dataset.name}")
    out = []
    for i, domain in enumerate(dataset.domains):
        n = len(domain)
        n_out = int(n * holdout_fraction)
        if n_out < 1 or n - n_out < 1:
            raise DataError(f"domain {domain.name!r} has {n} samples: too few for holdout_fraction {holdout_fraction}")
        perm = torch.randperm(n, generator=generator(trial_seed, i, "holdout"))
        out.append(DomainSplit(in_idx=perm[n_out:].sort().values, out_idx=perm[:n_out].sort().values))
    return Splits(domains=out, test_envs=tuple(test_envs), holdout_fraction=holdout_fraction, trial_seed=trial_seed)
