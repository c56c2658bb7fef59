"""Integer export of a fake-quantized model, its exact inverse, and the ``dequant`` analysis copy.

:func:`export_integer` flattens a model into ``{key: numpy array}`` (no pickles; ``np.savez`` /
HDF5-ready):

* ``quant/<module>.weight/codes`` -- the integer codes ``round(clip(w/s, -Q_N, Q_P))`` in the smallest
  numpy integer dtype that holds ``[-Q_N, Q_P]`` (int8 / uint8 for 2..8 bits);
* ``quant/<module>.weight/step_size`` -- the effective (eps-clamped) step sizes, in the weight's dtype,
  plus ``bits``, ``signed``, ``narrow``, ``q_n``, ``q_p``, ``per_channel``, ``channel_dim``, ``enabled``;
* ``act/<module>/...`` -- the input-activation quantizer's step size and settings, when present;
* ``float/<key>`` -- every other ``state_dict`` entry (biases, float layers, BN parameters and
  buffers), quantizer buffers excluded;
* ``meta/format`` -- the format tag.

``codes * step_size`` reproduces the fake-quantized weight bitwise (same dtype, same single
multiplication as :meth:`LSQQuantizer.dequantize`), so :func:`verify_export` returns exactly 0 on CPU.
"""

from __future__ import annotations

import copy
import os
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .lsq import LSQQuantizer
from .modules import QUANT_MODULE_TYPES

EXPORT_FORMAT = "flatlens-int-export-v1"
_SETTINGS = ("bits", "signed", "narrow", "q_n", "q_p", "per_channel", "channel_dim")


def _int_dtype(q_n: int, q_p: int) -> np.dtype:
    """Smallest numpy integer dtype holding ``[-q_n, q_p]``."""
    for dt in ((np.uint8, np.uint16, np.uint32) if q_n == 0 else (np.int8, np.int16, np.int32)):
        info = np.iinfo(dt)
        if info.min <= -q_n and q_p <= info.max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()


def _quantizer_meta(q: LSQQuantizer) -> dict[str, np.ndarray]:
    meta = {k: np.asarray(getattr(q, k)) for k in _SETTINGS}
    meta["enabled"] = np.asarray(q.is_enabled())
    return meta


@torch.no_grad()
def export_integer(model: nn.Module) -> dict[str, np.ndarray]:
    """Integer codes + step sizes of every quantized weight, float arrays for everything else."""
    out: dict[str, np.ndarray] = {"meta/format": np.asarray(EXPORT_FORMAT)}
    skip: set[str] = set()
    for name, m in model.named_modules():
        if not isinstance(m, QUANT_MODULE_TYPES):
            continue
        prefix = f"{name}." if name else ""
        q = m.weight_quantizer
        if not q.is_initialized():
            raise ValueError(f"weight quantizer of {name!r} is not initialized; nothing to export")
        key = f"quant/{prefix}weight"
        codes = q.quantize_int(m.weight)
        out[f"{key}/codes"] = _to_numpy(codes).astype(_int_dtype(q.q_n, q.q_p))
        out[f"{key}/step_size"] = _to_numpy(q.step_size.clamp_min(q.eps))
        out.update({f"{key}/{k}": v for k, v in _quantizer_meta(q).items()})
        skip.add(f"{prefix}weight")
        for sub in ("weight_quantizer", "act_quantizer"):
            for k in ("step_size", "enabled", "initialized"):
                skip.add(f"{prefix}{sub}.{k}")
        a = m.act_quantizer
        if a is not None:
            akey = f"act/{name}"
            out[f"{akey}/step_size"] = _to_numpy(a.step_size.clamp_min(a.eps))
            out.update({f"{akey}/{k}": v for k, v in _quantizer_meta(a).items()})
            out[f"{akey}/initialized"] = np.asarray(a.is_initialized())
    for key, value in model.state_dict().items():
        if key not in skip:
            out[f"float/{key}"] = _to_numpy(value)
    return out


def save_integer_export(export: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write an export to an uncompressed ``.npz`` (no pickled objects)."""
    np.savez(path, **dict(export))


def load_integer_export(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an export written by :func:`save_integer_export` (``allow_pickle=False``) and check its tag."""
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    if str(out.get("meta/format", "")) != EXPORT_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a flatlens integer export (format {EXPORT_FORMAT!r} expected)")
    return out


def dequantized_state_dict(export: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Float ``state_dict`` of the exported model: quantized weights as ``codes * step_size`` (the
    fake-quantized values, bitwise), all ``float/`` entries as they were. Loads with ``strict=True``
    into the float model, with ``strict=False`` into a quantized one (step sizes are not included).
    """
    sd: dict[str, torch.Tensor] = {}
    for key, value in export.items():
        if key.startswith("float/"):
            sd[key[len("float/"):]] = torch.from_numpy(np.array(value))
        elif key.startswith("quant/") and key.endswith("/codes"):
            base = key[: -len("/codes")]
            codes = torch.from_numpy(np.asarray(value).astype(np.int64))
            step = torch.from_numpy(np.array(export[f"{base}/step_size"]))
            shape = [1] * codes.dim()
            if bool(export[f"{base}/per_channel"]):
                shape[int(export[f"{base}/channel_dim"]) % codes.dim()] = step.numel()
            sd[base[len("quant/"):]] = codes.to(step.dtype) * step.reshape(shape)
    return sd


@torch.no_grad()
def dequantized_copy(model: nn.Module, *, keep_activation_quantizers: bool = True) -> nn.Module:
    """A deep copy whose quantized weights hold their fake-quantized values ``w_q`` and whose weight
    quantizers are disabled -- the ``dequant`` analysis space (perturb ``w_q`` in float).

    Only weights whose quantizer is enabled are rounded: a disabled quantizer (a checkpoint from before
    quantization started, a layer kept in float) does not round its weight in the model's forward, so
    the copy keeps that weight as it is. Parameter names are unchanged (``<module>.weight``). With
    ``keep_activation_quantizers`` (default) input-activation quantizers keep their state, so the copy
    computes exactly the model's function at the centre; pass False to disable them too. ``model`` is
    not modified.
    """
    new = copy.deepcopy(model)
    for _, m in new.named_modules():
        if isinstance(m, QUANT_MODULE_TYPES):
            q = m.weight_quantizer
            if not q.is_enabled():
                continue
            if not q.is_initialized():
                raise ValueError("a weight quantizer is not initialized; cannot build the dequantized copy")
            m.weight.copy_(q.dequantize(q.quantize_int(m.weight)))
            q.set_enabled(False)
            if m.act_quantizer is not None and not keep_activation_quantizers:
                m.act_quantizer.set_enabled(False)
    return new


@torch.no_grad()
def verify_export(model: nn.Module, export: Mapping[str, np.ndarray], inputs: torch.Tensor) -> float:
    """Max |forward(fake-quant model) - forward(float model loaded from the export)| on ``inputs``.

    The reference is a copy of ``model`` with every weight quantizer enabled (activation quantizers as
    they are), the candidate a copy with the export's dequantized weights and weight quantizers
    disabled; both in eval mode. ``model`` itself is not touched. 0.0 means bitwise equal.
    """
    ref = copy.deepcopy(model).eval()
    for _, m in ref.named_modules():
        if isinstance(m, QUANT_MODULE_TYPES):
            m.weight_quantizer.set_enabled(True)
    cand = copy.deepcopy(model).eval()
    sd = dequantized_state_dict(export)
    result = cand.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys if not k.rsplit(".", 1)[-1] in ("step_size", "enabled", "initialized")]
    if bad or result.unexpected_keys:
        raise ValueError(f"export does not fit the model: missing {bad[:5]}, unexpected {result.unexpected_keys[:5]}")
    for _, m in cand.named_modules():
        if isinstance(m, QUANT_MODULE_TYPES):
            m.weight_quantizer.set_enabled(False)
    device = next(iter(model.parameters())).device
    x = inputs.to(device)
    return float((ref(x) - cand(x)).abs().max())
