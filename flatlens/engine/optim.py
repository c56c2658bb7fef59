"""Optimizer and learning-rate schedule, built AFTER quantizers are attached.

Parameters are split into named groups: ``weights`` (every trainable parameter that is not a
quantizer's) and ``quant_scales`` (LSQ step sizes: no weight decay, their own learning rate). Building
the optimizer after quantizer attachment is what keeps every trainable tensor in it; the released
QT-DoG code swaps modules after building Adam and silently stops training them
(:func:`flatlens.quant.assert_all_trainable_in_optimizer` guards against that).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flatlens.config import Config


def _quantizer_param_names(model: nn.Module) -> set[str]:
    from flatlens.quant import quantizer_parameter_names

    return set(quantizer_parameter_names(model))


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The base optimizer over named parameter groups (see module docstring)."""
    qnames = _quantizer_param_names(model)
    weights, scales = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if name in qnames else weights).append(p)
    o = cfg.optim
    groups: list[dict] = [{"params": weights, "name": "weights", "weight_decay": o.weight_decay}]
    if scales:
        scale_lr = cfg.quant.scale_lr if cfg.quant.scale_lr > 0 else o.lr
        groups.append({"params": scales, "name": "quant_scales", "weight_decay": 0.0, "lr": scale_lr})
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def lr_multiplier(step: int, total: int, scheduler: str, warmup: int) -> float:
    """Factor on every group's base lr after ``step`` completed updates."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if scheduler == "cosine":
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    if scheduler == "step":
        return 0.1 ** (int(step >= total // 2) + int(step >= (3 * total) // 4))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    total, kind, warmup = cfg.train.steps, cfg.optim.scheduler, cfg.optim.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, kind, warmup))
