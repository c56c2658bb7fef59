"""Quantization-noise statistics per quantized layer, and matched / uniform noise samplers.

QT-DoG (arXiv 2410.06020, Fig. 2/8) models the weight quantization error ``n = w_q - w`` as
``U(-s/2, s/2)`` and reports KL(noise histogram || uniform) per layer; QGen uses ``sigma_q = s/sqrt(12)``
as the noise level of its bound. :func:`layer_noise_stats` computes those numbers for one layer:

* ``step_size`` and ``sigma_q = s/sqrt(12)`` per channel (and their layer mean);
* ``clip_fraction``: fraction of weights outside the representable range ``[-Q_N*s, Q_P*s]`` (their
  STE gradient is zero and their error is not a half-step rounding error);
* the histogram of the *normalized* noise ``n / s`` (``s`` of the weight's own channel) of the weights
  inside the range, on ``bins`` equal bins over ``[-1/2, 1/2]`` -- every channel shares this support;
* ``kl_to_uniform``: the plug-in estimator ``sum_k p_k log(p_k / q_k)`` with ``p_k = count_k / n`` and
  ``q_k = 1/bins`` (the uniform density integrated over each bin); empty bins contribute 0
  (``0 log 0 = 0``), and ``q_k > 0`` everywhere, so the estimate is finite and >= 0. Even for exactly
  uniform noise it is biased upwards by about ``(bins - 1) / (2 n)`` (Miller-Madow), reported as
  ``kl_baseline`` so that a value can be read against it;
* mean / std of the noise (absolute units, all weights, per channel and per layer).

The samplers draw every random number from an explicit CPU ``torch.Generator`` (bitwise reproducible
across devices), then move the result to the target tensor's device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .lsq import LSQQuantizer
from .modules import QUANT_MODULE_TYPES


@dataclass
class QuantNoiseStats:
    """Noise statistics of one quantized layer (plain numbers and numpy arrays, ready for HDF5)."""

    name: str
    bits: int
    signed: bool
    narrow: bool
    q_n: int
    q_p: int
    per_channel: bool
    enabled: bool
    numel: int
    step_size: np.ndarray  # (C,) effective (eps-clamped) step sizes
    sigma_q: np.ndarray  # (C,) s / sqrt(12)
    sigma_q_mean: float
    clip_fraction: float
    clip_fraction_per_channel: np.ndarray  # (C,)
    noise_mean: float  # mean of w_q - w over all weights
    noise_std: float
    noise_mean_per_channel: np.ndarray  # (C,)
    noise_std_per_channel: np.ndarray  # (C,)
    normalized_noise_std: float  # std of n/s over in-range weights; 1/sqrt(12) = 0.2887 if uniform
    n_in_range: int
    hist_counts: np.ndarray  # (bins,) int64, normalized noise n/s of in-range weights
    hist_edges: np.ndarray  # (bins+1,) in units of s, from -0.5 to 0.5
    kl_to_uniform: float
    kl_baseline: float  # expected plug-in KL for exactly uniform noise, (bins-1)/(2 n_in_range)

    def as_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{field: numpy array}`` (scalars as 0-d arrays; ``name`` left out) for ``/quant/<name>/``."""
        return {k: np.asarray(v) for k, v in asdict(self).items() if k != "name"}


def kl_to_uniform(counts: np.ndarray) -> float:
    """Plug-in KL(p || uniform over the same bins) of a histogram; ``nan`` for an empty histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n <= 0:
        return float("nan")
    p = counts[counts > 0] / n
    return float(np.sum(p * np.log(p * counts.size)))


@torch.no_grad()
def layer_noise_stats(weight: torch.Tensor, quantizer: LSQQuantizer, *, bins: int = 100,
                      name: str = "") -> QuantNoiseStats:
    """Noise statistics of quantizing ``weight`` with ``quantizer`` (whether or not it is enabled)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if not quantizer.is_initialized():
        raise ValueError(f"quantizer {name or quantizer!r} is not initialized; no step size to analyse")
    w = weight.detach()
    s_b = quantizer.effective_step(w, scaled=False)
    w_q = quantizer.dequantize(quantizer.quantize_int(w))
    noise = (w_q.double() - w.double())
    ratio = w.double() / s_b.double()
    in_range = (ratio >= -quantizer.q_n) & (ratio <= quantizer.q_p)
    norm = noise / s_b.double()

    if quantizer.per_channel:
        dim = quantizer.channel_dim % w.dim()

        def per_ch(t: torch.Tensor) -> torch.Tensor:
            return t.movedim(dim, 0).reshape(t.shape[dim], -1)
    else:
        def per_ch(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(1, -1)

    noise_c = per_ch(noise)
    step = quantizer.step_size.detach().clamp_min(quantizer.eps).double().cpu().numpy().reshape(-1)
    counts, edges = np.histogram(norm[in_range].cpu().numpy(), bins=bins, range=(-0.5, 0.5))
    n_in = int(in_range.sum())
    norm_in = norm[in_range]
    return QuantNoiseStats(
        name=name, bits=quantizer.bits, signed=quantizer.signed, narrow=quantizer.narrow,
        q_n=quantizer.q_n, q_p=quantizer.q_p, per_channel=quantizer.per_channel,
        enabled=quantizer.is_enabled(), numel=w.numel(),
        step_size=step, sigma_q=step / math.sqrt(12.0), sigma_q_mean=float(step.mean() / math.sqrt(12.0)),
        clip_fraction=float((~in_range).double().mean()),
        clip_fraction_per_channel=(~per_ch(in_range)).double().mean(dim=1).cpu().numpy(),
        noise_mean=float(noise.mean()), noise_std=float(noise.std(unbiased=False)),
        noise_mean_per_channel=noise_c.mean(dim=1).cpu().numpy(),
        noise_std_per_channel=noise_c.std(dim=1, unbiased=False).cpu().numpy(),
        normalized_noise_std=float(norm_in.std(unbiased=False)) if n_in else float("nan"),
        n_in_range=n_in, hist_counts=counts.astype(np.int64), hist_edges=edges,
        kl_to_uniform=kl_to_uniform(counts),
        kl_baseline=(bins - 1) / (2.0 * n_in) if n_in else float("nan"),
    )


def quant_noise_stats(model: nn.Module, *, bins: int = 100) -> dict[str, QuantNoiseStats]:
    """:func:`layer_noise_stats` of every quantized module's weight, keyed by module name."""
    return {name: layer_noise_stats(m.weight, m.weight_quantizer, bins=bins, name=name)
            for name, m in model.named_modules() if isinstance(m, QUANT_MODULE_TYPES)}


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator (e.g. torch.Generator().manual_seed(seed)) for reproducible noise")


def _sample_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _broadcast_step(weight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    step = step.detach()
    if step.dim() == 1 and step.numel() == weight.shape[0] and weight.dim() > 1 and step.numel() > 1:
        return step.reshape([-1] + [1] * (weight.dim() - 1))
    try:
        torch.broadcast_shapes(step.shape, weight.shape)
    except RuntimeError:
        raise ValueError(f"step size of shape {tuple(step.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)}; give (C_out,), (1,) or a broadcastable shape") from None
    return step


@torch.no_grad()
def sample_matched_noise(
    model_or_weights: nn.Module | Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Draw quantization-matched noise ``U(-s/2, s/2)`` for every quantized weight.

    ``model_or_weights`` is a model with quantized modules (keys are the weight parameter names,
    ``"<module>.weight"``, each channel using its own effective step size) or a mapping
    ``name -> (weight, step_size)`` where ``step_size`` is ``(C_out,)`` (per output channel), ``(1,)`` or
    broadcastable to the weight. Draws in order, from ``generator`` only (CPU), in the weight's dtype
    (float32 for non-fp32/fp64 weights), then moved to the weight's device and dtype. Values lie in
    ``[-s/2, s/2)``.
    """
    _check_generator(generator)
    if isinstance(model_or_weights, nn.Module):
        items = [(f"{name}.weight" if name else "weight", m.weight, m.weight_quantizer.effective_step(m.weight, scaled=False))
                 for name, m in model_or_weights.named_modules() if isinstance(m, QUANT_MODULE_TYPES)]
    else:
        items = [(name, w, _broadcast_step(w, s)) for name, (w, s) in model_or_weights.items()]
    out: dict[str, torch.Tensor] = {}
    for name, w, s in items:
        dt = _sample_dtype(w.dtype)
        u = torch.rand(w.shape, generator=generator, dtype=dt, device="cpu")
        out[name] = ((u - 0.5) * s.detach().to("cpu", dt)).to(w.device, w.dtype)
    return out


def sample_uniform_noise(
    shape: Sequence[int] | torch.Size,
    a: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``U(-a, a)`` noise of ``shape`` from ``generator`` (CPU), moved to ``device`` / ``dtype``.

    The QT-DoG Table 15 control (fixed-width uniform weight noise, a in {1e-4, 5e-5, 1e-5, 5e-6}).
    """
    _check_generator(generator)
    if not (a >= 0 and math.isfinite(a)):
        raise ValueError(f"uniform noise half-width a must be a finite number >= 0, got {a!r}")
    dt = _sample_dtype(dtype)
    u = torch.rand(tuple(shape), generator=generator, dtype=dt, device="cpu")
    return ((2.0 * u - 1.0) * a).to(device=device or "cpu", dtype=dtype)
