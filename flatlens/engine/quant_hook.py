"""Quantization during training: switch LSQ quantizers on at ``q_step`` (true QAT)."""

from __future__ import annotations

from typing import Any

from torch import nn

from flatlens.config import Config
from flatlens.engine.hooks import TrainHook, resolved_q_step


class QuantHook(TrainHook):
    """``quant.mode = qat``: quantizers attached at build time are enabled from ``q_step`` on."""

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        self.model = model
        self.q_step = resolved_q_step(cfg)

    def before_step(self, step: int) -> None:
        from flatlens.quant import is_quantization_enabled, set_quantization_enabled

        if step >= self.q_step and not is_quantization_enabled(self.model):
            set_quantization_enabled(self.model, True)

    def quantized(self) -> bool:
        from flatlens.quant import is_quantization_enabled

        return bool(is_quantization_enabled(self.model))

    def record_fields(self) -> dict[str, Any]:
        return {"q_step": self.q_step}
