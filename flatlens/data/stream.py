"""Training minibatches and evaluation batches.

Training (DomainBed semantics): every step draws ``batch_size`` samples with replacement from the
``in`` split of every training domain. The draw for step ``t`` comes from a generator seeded by
``(seed, "batch", t, domain)``, so a minibatch is a pure function of the step: a resumed run reads
exactly the batches the uninterrupted run would have read, with no sampler state to save. Under
torch.distributed each rank takes positions ``rank::world_size`` of every domain's global batch, so
the global batch is the same whatever the number of processes.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from flatlens.data.base import Domain, MultiDomainDataset, TensorDomain
from flatlens.data.splits import Splits
from flatlens.errors import ConfigError
from flatlens.seeding import generator

Minibatches = list[tuple[Tensor, Tensor]]


class TrainBatches:
    """One minibatch per training domain per step, a pure function of ``(seed, step)``."""

    def __init__(self, dataset: MultiDomainDataset, splits: Splits, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, augment: bool = True, num_workers: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size = {batch_size} must be divisible by the world size {world_size} "
                              "(each process takes an equal share of every domain's batch)")
        self.dataset = dataset
        self.splits = splits
        self.envs = splits.train_envs
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.augment = augment
        self.num_workers = num_workers
        self.device = torch.device(device)

    def spec(self, step: int) -> list[tuple[int, Tensor, Tensor]]:
        """(domain, sample indices, augmentation seeds) of this rank's share of step ``step``."""
        out = []
        for env in self.envs:
            in_idx = self.splits.domains[env].in_idx
            g = generator(self.seed, "batch", step, env)
            pos = torch.randint(len(in_idx), (self.batch_size,), generator=g)
            aug = torch.randint(2**31 - 1, (self.batch_size,), generator=g)
            sl = slice(self.rank, None, self.world_size)
            out.append((env, in_idx[pos[sl]], aug[sl]))
        return out

    def load(self, step: int) -> Minibatches:
        """This rank's minibatches of step ``step`` (on CPU for folder data, on the domain's device for tensors)."""
        return [self.dataset.domains[env].load(idx, aug if self.augment else None) for env, idx, aug in self.spec(step)]

    def iterate(self, start: int, stop: int) -> Iterator[Minibatches]:
        """Minibatches of steps ``start .. stop-1`` on ``self.device``; folder data are read by workers."""
        if self.num_workers > 0 and not all(isinstance(self.dataset.domains[e], TensorDomain) for e in self.envs):
            loader = torch.utils.data.DataLoader(
                _StepDataset(self), batch_size=None, sampler=range(start, stop), num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda", persistent_workers=False, prefetch_factor=2,
            )
            source: Iterator[Minibatches] = iter(loader)
        else:
            source = (self.load(step) for step in range(start, stop))
        for batches in source:
            yield [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in batches]


class _StepDataset(torch.utils.data.Dataset):
    """Maps a step number to that step's minibatches, so DataLoader workers read whole steps ahead."""

    def __init__(self, stream: TrainBatches) -> None:
        self.stream = stream

    def __len__(self) -> int:  # pragma: no cover - the sampler decides
        return 2**62

    def __getitem__(self, step: int) -> Minibatches:
        return self.stream.load(step)


def iter_eval_batches(domain: Domain, indices: Tensor, batch_size: int, num_workers: int = 0,
                      device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """Un-augmented batches of ``indices`` of ``domain``, in order, on ``device``."""
    chunks = list(torch.split(indices, batch_size))
    if num_workers > 0 and not isinstance(domain, TensorDomain) and len(chunks) > 1:
        loader = torch.utils.data.DataLoader(_ChunkDataset(domain, chunks), batch_size=None,
                                             num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
        source = iter(loader)
    else:
        source = (domain.load(chunk) for chunk in chunks)
    for x, y in source:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class _ChunkDataset(torch.utils.data.Dataset):
    def __init__(self, domain: Domain, chunks: list[Tensor]) -> None:
        self.domain, self.chunks = domain, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.domain.load(self.chunks[i])
