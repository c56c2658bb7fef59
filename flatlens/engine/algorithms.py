"""Training algorithms: one class each, one ``update(minibatches, step)``.

DomainBed's interface: ``update`` receives one ``(x, y)`` minibatch per training domain, takes one
optimizer step and returns a dict of scalars (floats or 0-dim tensors, so no device sync per step) that the loop averages into the next results record.
The algorithm owns the optimizer and schedule; ``self.model`` is the plain model (what checkpoints
hold) and ``self.network`` the module to call forward on (the DDP wrapper under torchrun).
New algorithms subclass :class:`Algorithm` and register with :func:`register_algorithm`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from flatlens.config import Config, register_choices
from flatlens.data.stream import Minibatches
from flatlens.distributed import DistContext
from flatlens.engine.optim import build_optimizer, build_scheduler

ALGORITHMS: dict[str, type["Algorithm"]] = {}


def register_algorithm(name: str) -> Callable[[type["Algorithm"]], type["Algorithm"]]:
    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        ALGORITHMS[name] = cls
        cls.name = name
        register_choices("train.algorithm", name)
        return cls

    return deco


class Algorithm:
    """Base class: model + optimizer + schedule; subclasses define :meth:`update`."""

    name = "base"

    def __init__(self, model: nn.Module, cfg: Config, ctx: DistContext) -> None:
        self.model = model
        self.cfg = cfg
        self.ctx = ctx
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # quantizer step sizes get no gradient while quantization is off (before q_step, matched_noise)
            from flatlens.quant import quantizer_parameter_names

            unused = cfg.quant.enabled and bool(quantizer_parameter_names(model))
            self.network: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=unused)
        else:
            self.network = model
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


@register_algorithm("erm")
class ERM(Algorithm):
    """Empirical risk minimisation over the concatenated minibatches of all training domains."""

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.network(x), y)
        self._step(loss)
        return {"loss": loss.detach()}


def build_algorithm(model: nn.Module, cfg: Config, ctx: DistContext) -> Algorithm:
    return ALGORITHMS[cfg.train.algorithm](model, cfg, ctx)
