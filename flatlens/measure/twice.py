"""Forward passes whose second derivatives are right: the ops where PyTorch's are wrong or missing.

Every gradient and HVP flatlens takes runs the model inside :func:`twice_differentiable` (through
:func:`flatlens.measure.hvp.make_forward_fn`). These need it:

* **Fused attention.** ``scaled_dot_product_attention`` picks a fused kernel (flash, memory-efficient)
  wherever it can; ``nn.MultiheadAttention(..., need_weights=False)``, as in torchvision's ViT, always
  gets one. Those kernels have no derivative of their backward, so every HVP failed with "derivative
  for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". Inside the
  context attention runs on PyTorch's ``math`` kernel: the same function, from ops that differentiate
  twice.
* **torch.compile.** A compiled module's backward refuses ``create_graph`` ("This backward function was
  compiled with non-empty donated buffers which requires create_graph=False"). :func:`uncompiled`
  measures a ``torch.compile``'d model through its original module (the same parameters, eagerly);
  a compiled submodule is refused in one line.
* **Weight normalisation.** ``torch.nn.utils.parametrizations.weight_norm`` (and the older
  ``torch.nn.utils.weight_norm``) compute the weight with ``torch._weight_norm``, whose fused kernel's
  double backward is wrong (torch 2.14, CPU): the Hessian it gives is not even symmetric (0.35 off
  on a 3x4 layer, where finite differences of gradients agree with the composite formula to 1e-10),
  while the gradient is right, so nothing fails. Inside the context, for models that hold such a
  layer, ``torch._weight_norm(v, g, dim)`` is computed as ``v * (g / norm_except_dim(v, 2, dim))``,
  the formula ATen itself falls back to, whose derivatives are those of plain ops.
* **Hard sigmoid.** ``hardsigmoid_backward`` has no derivative ("derivative for
  aten::hardsigmoid_backward is not implemented"): every HVP of a MobileNetV3 (whose squeeze-excitation
  blocks use ``nn.Hardsigmoid``) failed. For models that hold one it is computed as
  ``clamp(x / 6 + 1/2, 0, 1)``, the same piecewise-linear function.
* **cuDNN RNNs.** cuDNN provides no double backward for its fused RNN kernels ("Double backwards is not
  supported for CuDNN RNNs due to limitations in the CuDNN API"), so on a GPU every HVP of a model with
  an LSTM/GRU/RNN would fail. For such models the forward runs with cuDNN off (PyTorch's own RNN
  kernels, whose backward differentiates; other cuDNN settings kept). No effect on CPU; untested on a
  GPU here.

Ops that no composite covers fail in one line naming the op (:class:`flatlens.measure.objective.Objective`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


class _Composites(TorchFunctionMode):
    """Routes ``torch._weight_norm`` and ``F.hardsigmoid`` through composite formulas (module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        if func is F.hardsigmoid:  # in place or not, the module uses what it returns
            return torch.clamp(args[0] / 6.0 + 0.5, 0.0, 1.0)
        return func(*args, **kwargs)


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is what ``torch.compile(m)`` returns (checked without importing torch._dynamo)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def uncompiled(model: nn.Module) -> nn.Module:
    """``model``, or the original module of a ``torch.compile``'d one (its parameters are the same tensors,
    named without the ``_orig_mod.`` prefix). A compiled submodule is a ValueError naming it: it cannot be
    swapped for its original without changing the caller's model."""
    while _compiled(model):
        model = model._orig_mod
    inner = next((name for name, m in model.named_modules() if _compiled(m)), None)
    if inner is not None:
        raise ValueError(f"module {inner!r} is torch.compile'd, and compiled graphs cannot be differentiated twice; "
                         "build the model without torch.compile for the measurement (compile the whole model "
                         "instead, which flatlens measures through its original module)")
    return model


def needs(model: nn.Module) -> frozenset[str]:
    """What :func:`twice_differentiable` must do for ``model``, decided once per model (the composites'
    mode costs a Python call per op): ``"composites"`` when a module computes a weight with
    ``torch._weight_norm`` (either API) or is an ``nn.Hardsigmoid`` (a functional ``F.hardsigmoid`` in a
    forward is not seen here, and fails in one line); ``"no_cudnn"`` when it holds an RNN/LSTM/GRU."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    out = set()
    for module in model.modules():
        if isinstance(module, (_WeightNorm, nn.Hardsigmoid)) or any(
                isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values()):
            out.add("composites")
        if isinstance(module, nn.RNNBase):
            out.add("no_cudnn")
    return frozenset(out)


@contextmanager
def twice_differentiable(model_needs: frozenset[str] = frozenset()) -> Iterator[None]:
    """Attention on the ``math`` kernel and, as :func:`needs` says, weight normalisation and hard sigmoid
    by composite formulas and RNNs without cuDNN."""
    with ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if "composites" in model_needs:
            stack.enter_context(_Composites())
        if "no_cudnn" in model_needs:
            stack.enter_context(_cudnn_off())
        yield


@contextmanager
def _cudnn_off() -> Iterator[None]:
    """cuDNN off, and back as it was (``torch.backends.cudnn.flags`` would also reset the settings it is
    not given, such as the caller's TF32 precision)."""
    from torch.backends import cudnn

    was = cudnn.enabled
    cudnn.enabled = False
    try:
        yield
    finally:
        cudnn.enabled = was
