"""Quantized ``Conv2d`` / ``Linear`` built from existing float modules.

``QuantConv2d.from_float(conv, ...)`` returns a module that *reuses the same* ``weight`` and ``bias``
``nn.Parameter`` objects as ``conv`` (so parameter names stay ``...conv1.weight`` / ``...conv1.bias``
and an optimizer built over them keeps training them) and adds

* ``weight_quantizer`` -- an :class:`~flatlens.quant.lsq.LSQQuantizer` on the weight (per output
  channel by default, ``channel_dim=0``), LSQ-initialized from the current weight;
* ``act_quantizer`` (optional, else ``None``) -- an LSQ quantizer on the module's *input*
  activations, unsigned (post-ReLU inputs) and per tensor by default, initialized lazily from the
  first training batch.

Forward is ``F.conv2d`` / ``F.linear`` with the fake-quantized weight (and input). ``to_float()``
returns a plain module sharing the same Parameters. Building does not consume the global RNG (the
new module is created on the ``meta`` device and then given the source's tensors). Hooks registered
on the source module are not carried over.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .lsq import LSQQuantizer

#: defaults of the activation quantizer (post-ReLU inputs)
DEFAULT_ACT_KWARGS: dict[str, Any] = {"bits": 8, "signed": False, "narrow": False, "per_channel": False}
#: defaults of the weight quantizer (QT-DoG: 7 bit, signed, per output channel)
DEFAULT_WEIGHT_KWARGS: dict[str, Any] = {"bits": 7, "signed": True, "narrow": False, "per_channel": True}


def _weight_quantizer(weight: torch.Tensor, kwargs: Mapping[str, Any] | None) -> LSQQuantizer:
    kw = {**DEFAULT_WEIGHT_KWARGS, **(kwargs or {})}
    for key in ("num_channels", "channel_dim", "device", "dtype"):
        if key in kw:
            raise ValueError(f"weight quantizer kwarg {key!r} is set from the module; remove it")
    q = LSQQuantizer(**kw, num_channels=weight.shape[0], channel_dim=0,
                     device=weight.device, dtype=weight.dtype)
    q.init_from(weight)
    return q


def _act_quantizer(weight: torch.Tensor, kwargs: Mapping[str, Any] | None) -> LSQQuantizer | None:
    if kwargs is None:
        return None
    kw = {**DEFAULT_ACT_KWARGS, **kwargs}
    for key in ("device", "dtype"):
        if key in kw:
            raise ValueError(f"activation quantizer kwarg {key!r} is set from the module; remove it")
    if kw.get("per_channel") and "channel_dim" not in kw:
        kw["channel_dim"] = 1
    return LSQQuantizer(**kw, device=weight.device, dtype=weight.dtype)


class _QuantMixin:
    """Shared behaviour of the quantized modules."""

    weight: nn.Parameter
    weight_quantizer: LSQQuantizer
    act_quantizer: LSQQuantizer | None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (fake-quantized when the weight quantizer is enabled)."""
        return self.weight_quantizer(self.weight)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quantizer is None else self.act_quantizer(x)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with an LSQ weight quantizer and an optional input-activation quantizer."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_quantizer_kwargs: Mapping[str, Any] | None = None,
        act_quantizer_kwargs: Mapping[str, Any] | None = None,
    ) -> "QuantConv2d":
        """Wrap ``conv`` (same weight/bias Parameter objects, same device and dtype).

        ``weight_quantizer_kwargs`` / ``act_quantizer_kwargs`` go to :class:`LSQQuantizer`
        (``bits``, ``signed``, ``narrow``, ``per_channel``, ``grad_scale_n``, ``eps``, ``enabled``);
        ``act_quantizer_kwargs=None`` means no activation quantizer, ``{}`` the defaults
        (8-bit unsigned per tensor).
        """
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, QuantConv2d):
            raise ValueError(f"QuantConv2d.from_float needs a float nn.Conv2d, got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.weight_quantizer = _weight_quantizer(conv.weight, weight_quantizer_kwargs)
        new.act_quantizer = _act_quantizer(conv.weight, act_quantizer_kwargs)
        new.weight_quantizer.train(conv.training)
        if new.act_quantizer is not None:
            new.act_quantizer.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution of the (optionally fake-quantized) input with the fake-quantized weight."""
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this module's weight/bias Parameters (no quantization)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with an LSQ weight quantizer and an optional input-activation quantizer."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quantizer_kwargs: Mapping[str, Any] | None = None,
        act_quantizer_kwargs: Mapping[str, Any] | None = None,
    ) -> "QuantLinear":
        """Wrap ``linear`` (same weight/bias Parameter objects); kwargs as in ``QuantConv2d.from_float``.

        A per-channel activation quantizer on a Linear input uses ``channel_dim=-1`` unless given.
        """
        if not isinstance(linear, nn.Linear) or isinstance(linear, QuantLinear):
            raise ValueError(f"QuantLinear.from_float needs a float nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        if act_quantizer_kwargs is not None and act_quantizer_kwargs.get("per_channel"):
            act_quantizer_kwargs = {"channel_dim": -1, **act_quantizer_kwargs}
        new.weight_quantizer = _weight_quantizer(linear.weight, weight_quantizer_kwargs)
        new.act_quantizer = _act_quantizer(linear.weight, act_quantizer_kwargs)
        new.weight_quantizer.train(linear.training)
        if new.act_quantizer is not None:
            new.act_quantizer.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear map of the (optionally fake-quantized) input with the fake-quantized weight."""
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's weight/bias Parameters (no quantization)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin


QUANT_MODULE_TYPES: tuple[type[nn.Module], ...] = (QuantConv2d, QuantLinear)
