"""Per-step hooks of the training loop: state that changes with the step, outside the algorithm.

A hook sees the algorithm once (:meth:`TrainHook.attach`), is called before and after every update
(:meth:`TrainHook.before_step`, :meth:`TrainHook.after_step`), may add fields to results records, and saves its state in
``last.pt`` so resumed runs continue exactly. Quantization switching on at ``quant.q_step`` (and its
ablation modes) is a hook: quantizers are attached before the optimizer is built and only enabled
here, never swapped in mid-run.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flatlens.config import Config


class TrainHook:
    """Base class: every method is a no-op."""

    def attach(self, algorithm: Any) -> None:
        self.algorithm = algorithm

    def before_step(self, step: int) -> None:
        """Called before update ``step`` (0-based)."""

    def after_step(self, step: int) -> None:
        """Called right after update ``step`` (its optimizer step), before any evaluation/checkpoint."""

    def quantized(self) -> bool:
        """Whether the model currently computes with quantized weights."""
        return False

    def record_fields(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def resolved_q_step(cfg: Config) -> int:
    """``quant.q_step``, with -1 meaning 40% of the run (QT-DoG: step 2000 of 5000)."""
    return cfg.quant.q_step if cfg.quant.q_step >= 0 else int(0.4 * cfg.train.steps)


def build_hooks(cfg: Config, model: nn.Module) -> list[TrainHook]:
    hooks: list[TrainHook] = []
    if cfg.quant.enabled:
        from flatlens.engine.quant_hook import QuantHook

        hooks.append(QuantHook(cfg, model))
    return hooks
