"""Build the network a config describes: the model, with LSQ quantizers attached when asked.

Shared by the training engine and :func:`flatlens.load_checkpoint`, so a checkpoint's state_dict
(including quantizer step sizes and ``enabled`` flags) always fits the rebuilt module tree.
Quantizers are attached here, before any optimizer exists, and start disabled; the engine switches
them on at ``quant.q_step``.
"""

from __future__ import annotations

from torch import nn

from flatlens.config import Config
from flatlens.errors import ConfigError
from flatlens.models import build_model


def build_network(cfg: Config, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    model = build_model(cfg.model, input_shape, num_classes)
    if cfg.quant.enabled and cfg.quant.mode not in ("uniform_noise", "freeze_without_quant"):
        from flatlens.quant import attach_quantizers

        q = cfg.quant
        try:
            attach_quantizers(model, quantize=list(q.quantize), keep_float=list(q.keep_float), bits=q.bits,
                              per_channel=q.per_channel, signed=q.signed, narrow=q.narrow,
                              grad_scale_n=q.grad_scale_n, activations=q.activations, act_bits=q.act_bits,
                              enabled=False)
        except ValueError as exc:
            raise ConfigError(f"quant: {exc}") from None
    return model
