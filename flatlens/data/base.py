"""Domains: the unit of a domain-generalization dataset.

A :class:`MultiDomainDataset` is a list of :class:`Domain` objects that share a label space and an
input shape. A domain knows its labels and how to load a set of its samples, optionally with
training augmentation seeded per sample (so augmentation is a pure function of the seed, whatever
the number of DataLoader workers or processes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


class Domain:
    """One environment of a DG dataset."""

    name: str
    labels: Tensor  # (n,) int64, every sample's class

    def __len__(self) -> int:
        return int(self.labels.numel())

    def load(self, indices: Tensor, aug_seeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inputs and labels of ``indices``; ``aug_seeds`` (one per index) asks for augmentation."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of the domain's content identity (labels and what identifies the inputs)."""
        return hashlib.sha256(self.labels.numpy().tobytes()).hexdigest()[:16]


class TensorDomain(Domain):
    """A domain held in memory as tensors (the embedded digits datasets). No augmentation."""

    def __init__(self, name: str, images: Tensor, labels: Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError("images and labels must have the same length")
        self.name = name
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def load(self, indices: Tensor, aug_seeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        idx = indices.to(self.images.device)
        return self.images[idx], self.labels.to(self.images.device)[idx]

    def to(self, device: torch.device | str) -> "TensorDomain":
        """The same domain with its tensors on ``device`` (digits are small: keep them there)."""
        return TensorDomain(self.name, self.images.to(device), self.labels.to(device))

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.labels.cpu().numpy().tobytes())
        h.update(self.images.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class MultiDomainDataset:
    """A list of domains with a shared label space."""

    name: str
    domains: list[Domain]
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def __len__(self) -> int:
        return len(self.domains)

    def fingerprint(self) -> str:
        """Hash over every domain's fingerprint: a checkpoint checks the rebuilt data against it."""
        h = hashlib.sha256()
        for d in self.domains:
            h.update(f"{d.name}:{len(d)}:{d.fingerprint()};".encode())
        return h.hexdigest()[:16]


def domain_sizes(domains: Sequence[Domain]) -> list[int]:
    return [len(d) for d in domains]
