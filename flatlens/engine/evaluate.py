"""Accuracy and loss of a model on every domain's in/out split (DomainBed's per-checkpoint evaluation).

The model runs in eval mode under ``torch.no_grad`` and its training flags are restored afterwards.
Under torch.distributed each rank evaluates indices ``rank::world_size`` of every split and the
(loss sum, correct, count) triples are all-reduced, so no sample is counted twice (a
DistributedSampler would pad and double-count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatlens.data.base import MultiDomainDataset
from flatlens.data.splits import Splits
from flatlens.data.stream import iter_eval_batches
from flatlens.distributed import DistContext, all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, dataset: MultiDomainDataset, splits: Splits, ctx: DistContext,
             batch_size: int = 256, num_workers: int = 0, keys: list[str] | None = None) -> dict[str, float]:
    """``{env{i}_{in,out}_{acc,loss}: value}`` for every split (or just ``keys``)."""
    keys = keys if keys is not None else splits.names()
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        sums = torch.zeros(len(keys), 3, dtype=torch.float64, device=ctx.device)
        for k, key in enumerate(keys):
            env, idx = splits.indices(key)
            idx = idx[ctx.rank::ctx.world_size]
            for x, y in iter_eval_batches(dataset.domains[env], idx, batch_size, num_workers, ctx.device):
                logits = model(x)
                sums[k, 0] += F.cross_entropy(logits, y, reduction="sum").double()
                sums[k, 1] += (logits.argmax(1) == y).sum().double()
                sums[k, 2] += y.numel()
        all_reduce_sum(ctx, sums)
    finally:
        for m, flag in was_training.items():
            m.training = flag
    out: dict[str, float] = {}
    for k, key in enumerate(keys):
        loss_sum, correct, count = sums[k].tolist()
        out[f"{key}_acc"] = correct / count
        out[f"{key}_loss"] = loss_sum / count
    return out
