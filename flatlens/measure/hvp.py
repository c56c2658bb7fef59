"""Hessian-vector products of a sample-weighted mean loss over a list of batches.

The object differentiated here is

    ``L(theta) = sum_b S_b(theta) / sum_b N_b``,

where ``S_b`` is the *sum* of the per-sample losses of batch ``b`` (``N_b`` samples) and ``theta`` is a
dict name -> tensor of ONLY the parameters being differentiated (everything else in the model --
frozen parameters and buffers -- is held fixed). A ragged last batch is therefore weighted by its
sample count, exactly as if all samples were in one batch. The functional form is a
:data:`LossFn`, ``loss_fn(params, batch) -> (S_b, N_b)``; :func:`make_loss_fn` builds one from an
``nn.Module`` with ``torch.func.functional_call``.

Three kernels compute the same ``H v`` (``H`` = Hessian of ``L`` with respect to ``theta``):

* ``"graph_reuse"`` -- once per batch, a forward pass and ``g_b = grad(S_b, create_graph=True)``; the
  graphs are KEPT, and each probe then costs one backward through them (``grad(g_b . v)``). The
  cheapest exact HVP (about 1.4x a gradient per probe on CPU in the reference notes), but it holds,
  for every batch at once, the forward activations plus the first backward's graph: roughly 2-3x the
  memory of one training step per batch, times the number of batches. Offered for the in-memory
  evaluation sets flatlens measures on (a few thousand samples). If a differentiated parameter is
  modified in place (its version counter moves), the graphs are rebuilt on the next HVP; a parameter
  *replaced* by assignment (``p.data = ...``) is not seen by any kernel -- build a new engine then.
* ``"double_backward"`` -- per batch and per call: forward, ``grad(create_graph=True)``, then one
  backward per probe column; the graph is freed after each batch (memory of one batch). For a block
  of ``b`` probes the first backward is shared by the ``b`` columns.
* ``"forward_over_reverse"`` -- ``torch.func.jvp(torch.func.grad(S_b), (theta,), (v,))``, per batch.
  Needs forward-mode AD formulas for every op (``torch.ao`` fake-quant and LSQ have none) and eval-
  mode BatchNorm (or :func:`make_loss_fn`'s ``allow_training`` buffer copies); often the fastest on
  GPUs, the slowest on CPUs for single probes.

:func:`select_kernel` times the kernels on one batch (median of a few repeats), checks that they
agree, and picks the fastest; :class:`HessianVectorProduct` uses it for ``kernel="auto"`` and takes
an explicit kernel name as an override.

No side effects: gradients are taken with ``torch.autograd.grad`` / ``torch.func`` on detached aliases
of the parameters, so no parameter's ``.grad``, ``requires_grad`` or value changes; ``training`` flags
are never touched; buffers are not written (eval mode is required unless ``allow_training=True``, in
which case buffers are passed as copies); the global RNG is never drawn from.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .linalg import SymmetricOperator
from .memory import _bytes, available_bytes

__all__ = [
    "LossFn",
    "KERNELS",
    "check_kernel",
    "make_loss_fn",
    "make_forward_fn",
    "HessianVectorProduct",
    "KernelSelection",
    "NoKernelError",
    "select_kernel",
    "flatten",
    "unflatten",
]

LossFn = Callable[[Mapping[str, Tensor], Any], "tuple[Tensor, int | Tensor]"]
"""``loss_fn(params, batch) -> (sum of the batch's per-sample losses, number of samples)``."""

KERNELS = ("graph_reuse", "double_backward", "forward_over_reverse")


class NoKernelError(ValueError):
    """:func:`select_kernel` found no kernel that works for the model (each one's reason in the message)."""


# --------------------------------------------------------------------------------------------------
# Building a functional loss from a module
# --------------------------------------------------------------------------------------------------


def _default_unpack(batch: Any) -> tuple[tuple, Any, int]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        raise ValueError(
            f"batch is a {type(batch).__name__}, not an (inputs, targets) pair; pass unpack=... to make_loss_fn."
        )
    n = int(y.shape[0]) if isinstance(y, Tensor) and y.ndim > 0 else int(x.shape[0])
    return (x,), y, n


def check_kernel(kernel: str) -> str:
    """``kernel`` is ``"auto"`` or one of :data:`KERNELS` (ValueError otherwise); returns it."""
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; pass 'auto' or one of {', '.join(KERNELS)}.")
    return kernel


def make_forward_fn(model: nn.Module, *, allow_training: bool = False) -> Callable[[Mapping[str, Tensor], tuple], Any]:
    """``forward(params, inputs) -> model(*inputs)`` with the parameters named in ``params`` swapped in.

    Parameters not in ``params`` enter as detached aliases (constants: no graph is built through them);
    buffers are the module's own. A module in training mode is refused unless ``allow_training``, in
    which case buffers are passed as fresh copies so the module is not modified. This is the one place
    that calls the model functionally; :func:`make_loss_fn` and the per-sample Gauss-Newton passes
    (:mod:`flatlens.measure.gauss_newton`) both go through it, so it is also where LSQ quantizers run
    without their step-size gradient scale (:func:`flatlens.quant.gradient_scale_off`): every derivative
    in a step size, in every measure, is the loss's own, not LSQ's ``g``-preconditioned one. It is also
    where the ops whose second derivatives PyTorch gets wrong or lacks (fused attention, weight
    normalisation, hard sigmoid, cuDNN RNNs) are routed through formulas that differentiate twice
    (:func:`flatlens.measure.twice.twice_differentiable`).
    """
    from flatlens.measure.twice import needs, twice_differentiable, uncompiled
    from flatlens.quant.lsq import gradient_scale_off

    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}; pass a torch.nn.Module.")
    model = uncompiled(model)
    param_names = [name for name, _ in model.named_parameters()]
    buffer_names = [name for name, _ in model.named_buffers()]
    model_needs = needs(model)

    def forward(params: Mapping[str, Tensor], inputs: tuple) -> Any:
        training = [name for name, m in model.named_modules() if m.training]
        if training and not allow_training:
            where = training[0] or "<root>"
            raise ValueError(
                f"module {where!r} is in training mode; call model.eval() first (or pass allow_training=True)."
            )
        own = dict(model.named_parameters())
        merged: dict[str, Tensor] = {name: own[name].detach() for name in param_names if name not in params}
        unknown = [k for k in params if k not in own]
        if unknown:
            raise ValueError(f"parameter {unknown[0]!r} is not in the model; pass names from model.named_parameters().")
        merged.update(params)
        if allow_training and training:
            merged.update({name: b.clone() for name, b in model.named_buffers() if name in buffer_names})
        # step-size derivatives of the loss, not LSQ's g-scaled ones; right second derivatives
        with gradient_scale_off(model), twice_differentiable(model_needs):
            return torch.func.functional_call(model, merged, inputs)

    return forward


def make_loss_fn(
    model: nn.Module,
    criterion: Callable[[Tensor, Any], Tensor] | None = None,
    *,
    reduction: str = "mean",
    unpack: Callable[[Any], tuple[tuple, Any, int]] | None = None,
    allow_training: bool = False,
) -> LossFn:
    """A :data:`LossFn` for ``model``: ``(params, batch) -> (summed loss, n_samples)``.

    Args:
        model: the module. Parameters named in ``params`` at call time replace the module's (via
            ``torch.func.functional_call``); every other parameter enters as a detached alias (so it is
            a constant and no graph is built through it); buffers are the module's own.
        criterion: ``criterion(output, target)`` (default ``torch.nn.functional.cross_entropy``).
        reduction: what ``criterion`` returns: ``"mean"`` over the batch (multiplied back by the
            batch size), ``"sum"``, or ``"none"`` (per-sample losses, summed here). A module criterion
            such as ``nn.CrossEntropyLoss()`` uses ``"mean"`` unless built with another reduction.
        unpack: ``batch -> (inputs tuple, target, n_samples)``; default takes ``(x, y)`` with ``n =
            len(y)``.
        allow_training: by default a module in training mode is refused (BatchNorm would update its
            running statistics and dropout would make the Hessian random). With ``True`` the
            buffers are passed as fresh copies on every call, so the module is still not modified
            (train-mode BN then normalises with batch statistics -- a different Hessian; all three
            kernels support it, since the copies are made inside the differentiated call).

    Convention: for a least-squares model ``f(x) = x^T w`` with ``criterion = 0.5 * (f - y)^2`` per
    sample (``reduction="none"``), the objective is ``0.5 ||X w - y||^2 / N`` and its Hessian is
    ``X^T X / N``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}; pass 'mean', 'sum' or 'none' (what criterion returns).")
    if criterion is None:
        criterion = torch.nn.functional.cross_entropy
    unpack = unpack or _default_unpack
    forward = make_forward_fn(model, allow_training=allow_training)

    def loss_fn(params: Mapping[str, Tensor], batch: Any) -> tuple[Tensor, int]:
        inputs, target, n = unpack(batch)
        loss = criterion(forward(params, inputs), target)
        if reduction == "mean":
            loss = loss * n
        elif reduction == "none":
            loss = loss.sum()
        return loss, n

    return loss_fn


# --------------------------------------------------------------------------------------------------
# Flat <-> dict
# --------------------------------------------------------------------------------------------------


def flatten(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (dict values in insertion order) into one flat vector."""
    vals = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    return torch.cat([t.reshape(-1) for t in vals]) if vals else torch.zeros(0)


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into views shaped like ``like``'s values (same keys, same order)."""
    out: dict[str, Tensor] = {}
    i = 0
    for name, t in like.items():
        k = t.numel()
        out[name] = vector[i : i + k].view(t.shape)
        i += k
    if i != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries but the parameters have {i}; pass a matching vector.")
    return out


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class HessianVectorProduct:
    """``v -> H v`` for the sample-weighted mean loss over ``batches`` w.r.t. the tensors in ``params``.

    Args:
        loss_fn: a :data:`LossFn` (e.g. from :func:`make_loss_fn`).
        params: dict name -> tensor of the parameters to differentiate (the model's own parameters
            are fine: they are used through detached aliases and never modified). All must share one
            dtype and device.
        batches: a sequence of batches (cached tensors; iterated once per HVP pass, so it must be
            re-iterable and deterministic).
        kernel: ``"auto"`` (time them with :func:`select_kernel` on the first batch), or one of
            :data:`KERNELS`.
        batched: for blocks of probes, vectorise the per-probe backward (``is_grads_batched``) or the
            jvp (``torch.func.vmap``) instead of looping; falls back to the loop if the model's ops
            do not support it.
        candidates: kernels ``"auto"`` may choose from.

    ``hvp(v)`` takes a flat vector (returns flat) or a dict (returns a dict); ``hvp_batched(V)`` takes
    ``n x b``. ``n_hvp`` counts probe applications, ``n_passes`` data passes. ``as_operator()`` wraps it
    as a :class:`~flatlens.measure.linalg.SymmetricOperator` for the algorithms in ``linalg``.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Mapping[str, Tensor],
        batches: Sequence[Any],
        *,
        kernel: str = "auto",
        batched: bool = False,
        candidates: Sequence[str] = KERNELS,
    ) -> None:
        if not callable(loss_fn):
            raise ValueError("loss_fn is not callable; pass loss_fn(params, batch) -> (summed loss, n).")
        if not isinstance(params, Mapping) or len(params) == 0:
            raise ValueError("params must be a non-empty dict name -> tensor; pass the parameters to differentiate.")
        dtypes = {p.dtype for p in params.values()}
        devices = {p.device for p in params.values()}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"params mix dtypes {sorted(map(str, dtypes))} / devices {sorted(map(str, devices))}; "
                "pass parameters of one dtype on one device."
            )
        if not next(iter(dtypes)).is_floating_point:
            raise ValueError("params are not floating point; pass floating-point parameters.")
        if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence):
            batches = list(batches)
        if len(batches) == 0:
            raise ValueError("batches is empty; pass at least one batch.")
        check_kernel(kernel)
        self.loss_fn = loss_fn
        self.names = list(params.keys())
        self._primal = {k: v.detach() for k, v in params.items()}
        self.shapes = [tuple(v.shape) for v in self._primal.values()]
        self.numels = [v.numel() for v in self._primal.values()]
        self.n = int(sum(self.numels))
        self.dtype = next(iter(dtypes))
        self.device = next(iter(devices))
        self.batches = batches
        self.batched = batched
        self.n_hvp = 0
        self.n_passes = 0
        self.n_samples: int | None = None
        self.selection: KernelSelection | None = None
        self._graphs: list[tuple[list[Tensor], list[int], int]] | None = None
        self._leaves: list[Tensor] | None = None
        self._versions: list[int] | None = None
        self._grad: Tensor | None = None
        self._vector_ok = True
        if kernel == "auto":
            self.selection = select_kernel(loss_fn, params, batches[0], candidates=candidates, n_batches=len(batches))
            kernel = self.selection.kernel
        self.kernel = kernel

    # -- helpers ----------------------------------------------------------------------------------

    def _fresh_leaves(self) -> list[Tensor]:
        return [p.detach().requires_grad_(True) for p in self._primal.values()]

    def _as_dict(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.names, tensors))

    def _split(self, flat: Tensor) -> list[Tensor]:
        """Flat ``n`` (or ``n x b``) -> per-parameter pieces (``shape`` or ``b x shape``)."""
        if flat.ndim == 1:
            return [c.view(s) for c, s in zip(torch.split(flat, self.numels), self.shapes)]
        b = flat.shape[1]
        return [c.T.reshape((b,) + s) for c, s in zip(torch.split(flat, self.numels, dim=0), self.shapes)]

    def _record_n(self, total: int) -> int:
        if total <= 0:
            raise ValueError("the batches hold no samples; pass batches with at least one sample.")
        if self.n_samples is not None and total != self.n_samples:
            raise ValueError(
                f"the batches held {total} samples in this pass but {self.n_samples} before; pass a fixed, "
                "re-iterable list of cached batches."
            )
        self.n_samples = total
        return total

    @staticmethod
    def _n(n: Any) -> int:
        return int(n.item()) if isinstance(n, Tensor) else int(n)

    def _zeros_like_params(self, b: int | None) -> list[Tensor]:
        if b is None:
            return [torch.zeros(s, dtype=self.dtype, device=self.device) for s in self.shapes]
        return [torch.zeros((b,) + s, dtype=self.dtype, device=self.device) for s in self.shapes]

    # -- graph reuse --------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Build and keep the per-batch gradient graphs (``graph_reuse``); idempotent."""
        if self._graphs is not None:
            return
        leaves = self._fresh_leaves()
        graphs = []
        total = 0
        gsum = [torch.zeros_like(p) for p in leaves]
        with torch.enable_grad():
            for batch in self.batches:
                loss, n = self.loss_fn(self._as_dict(leaves), batch)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                graphs.append(([grads[i] for i in idx], idx, self._n(n)))
                for a, g in zip(gsum, grads):
                    if g is not None:
                        a.add_(g.detach())
                total += self._n(n)
        total = self._record_n(total)
        self._leaves = leaves
        self._graphs = graphs
        self._versions = self._param_versions()
        self._grad = flatten([a / total for a in gsum])

    def _ensure_graphs(self) -> None:
        """Build the retained graphs, rebuilding them if a parameter changed in place since."""
        if self._graphs is not None and self._param_versions() != self._versions:
            self.release()
        self.prepare()

    def gradient(self) -> Tensor:
        """Flat mean gradient. Under ``graph_reuse`` it is a by-product of building the retained graphs,
        which the HVPs need anyway (no extra pass); other kernels spend one forward+backward."""
        if self.kernel != "graph_reuse":
            return self.loss_and_grad()[1]
        self._ensure_graphs()
        assert self._grad is not None
        return self._grad.clone()

    def _param_versions(self) -> list[int]:
        return [p._version for p in self._primal.values()]

    def release(self) -> None:
        """Free the retained graphs of ``graph_reuse`` (they are rebuilt on the next HVP)."""
        self._graphs = None
        self._leaves = None
        self._versions = None
        self._grad = None

    def _second_backward(self, gsel: list[Tensor], idx: list[int], leaves: list[Tensor], v: list[Tensor],
                         b: int | None, retain: bool) -> list[Tensor]:
        """``d(g . v)/d theta`` for one probe (``b is None``) or a block (``v`` pieces are ``b x shape``)."""
        if not gsel:
            return self._zeros_like_params(b)
        outs = [v[i] for i in idx]
        if b is None:
            res = torch.autograd.grad(gsel, leaves, grad_outputs=outs, retain_graph=retain, allow_unused=True)
            return [torch.zeros_like(p) if r is None else r for r, p in zip(res, leaves)]
        if self.batched and self._vector_ok:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = torch.autograd.grad(gsel, leaves, grad_outputs=outs, retain_graph=retain,
                                              allow_unused=True, is_grads_batched=True)
                return [torch.zeros((b,) + p.shape, dtype=p.dtype, device=p.device) if r is None else r
                        for r, p in zip(res, leaves)]
            except RuntimeError:
                self._vector_ok = False
        cols = []
        for j in range(b):
            res = torch.autograd.grad(gsel, leaves, grad_outputs=[o[j] for o in outs],
                                      retain_graph=True if j < b - 1 else retain, allow_unused=True)
            cols.append([torch.zeros_like(p) if r is None else r for r, p in zip(res, leaves)])
        return [torch.stack([c[i] for c in cols]) for i in range(len(leaves))]

    def _hvp_graph_reuse(self, v: list[Tensor], b: int | None) -> tuple[list[Tensor], int]:
        self._ensure_graphs()
        assert self._graphs is not None and self._leaves is not None
        acc = self._zeros_like_params(b)
        total = 0
        for gsel, idx, n in self._graphs:
            hv = self._second_backward(gsel, idx, self._leaves, v, b, retain=True)
            for a, h in zip(acc, hv):
                a.add_(h)
            total += n
        return acc, total

    # -- double backward ---------------------------------------------------------------------------

    def _hvp_double_backward(self, v: list[Tensor], b: int | None) -> tuple[list[Tensor], int]:
        acc = self._zeros_like_params(b)
        total = 0
        with torch.enable_grad():
            for batch in self.batches:
                leaves = self._fresh_leaves()
                loss, n = self.loss_fn(self._as_dict(leaves), batch)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                hv = self._second_backward([grads[i] for i in idx], idx, leaves, v, b, retain=False)
                for a, h in zip(acc, hv):
                    a.add_(h)
                total += self._n(n)
                del loss, grads, hv
        return acc, total

    # -- forward over reverse ----------------------------------------------------------------------

    def _hvp_forward_over_reverse(self, v: list[Tensor], b: int | None) -> tuple[list[Tensor], int]:
        # torch.func's forward-mode rules for some ops (batch norm among them) are scripted lazily inside
        # torch and emit torch.jit.script's FutureWarning on first use: torch's business, not the user's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            return self._hvp_forward_over_reverse_unfiltered(v, b)

    def _hvp_forward_over_reverse_unfiltered(self, v: list[Tensor], b: int | None) -> tuple[list[Tensor], int]:
        acc = self._zeros_like_params(b)
        total = 0
        primal = dict(self._primal)
        for batch in self.batches:

            def f(p: Mapping[str, Tensor], batch: Any = batch) -> tuple[Tensor, Tensor]:
                loss, n = self.loss_fn(p, batch)
                return loss, torch.as_tensor(n)

            gfn = torch.func.grad(f, has_aux=True)

            def jvp1(t: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
                _, hv, n = torch.func.jvp(gfn, (primal,), (t,), has_aux=True)
                return hv, n

            if b is None:
                hv, n = jvp1(self._as_dict(v))
                hv_list = [hv[k] for k in self.names]
            else:
                hv_list = None
                if self.batched and self._vector_ok:
                    try:
                        hvb, nb = torch.func.vmap(jvp1, in_dims=(0,), out_dims=(0, 0))(self._as_dict(v))
                        hv_list = [hvb[k] for k in self.names]
                        n = nb[0]
                    except RuntimeError:
                        self._vector_ok = False
                if hv_list is None:
                    cols = []
                    for j in range(b):
                        hv, n = jvp1({k: t[j] for k, t in zip(self.names, v)})
                        cols.append([hv[k] for k in self.names])
                    hv_list = [torch.stack([c[i] for c in cols]) for i in range(len(self.names))]
            for a, h in zip(acc, hv_list):
                a.add_(h.detach())
            total += self._n(n)
        return acc, total

    # -- public ------------------------------------------------------------------------------------

    def _apply(self, pieces: list[Tensor], b: int | None) -> list[Tensor]:
        pieces = [p.detach().to(dtype=self.dtype, device=self.device) for p in pieces]
        kern = {
            "graph_reuse": self._hvp_graph_reuse,
            "double_backward": self._hvp_double_backward,
            "forward_over_reverse": self._hvp_forward_over_reverse,
        }[self.kernel]
        acc, total = kern(pieces, b)
        total = self._record_n(total)
        self.n_hvp += 1 if b is None else b
        self.n_passes += 1
        return [a.div_(total) for a in acc]

    def hvp(self, v: Tensor | Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """``H v`` for one probe: a flat vector of length ``n`` (returns flat) or a dict (returns a dict)."""
        if isinstance(v, Mapping):
            missing = [k for k in self.names if k not in v]
            if missing:
                raise ValueError(f"probe dict lacks {missing[0]!r}; pass one tensor per differentiated parameter.")
            pieces = [v[k].reshape(s) for k, s in zip(self.names, self.shapes)]
            return self._as_dict(self._apply(pieces, None))
        if not isinstance(v, Tensor) or v.shape != (self.n,):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"probe has shape {got}, expected ({self.n},); pass a flat vector or a dict.")
        return flatten(self._apply(self._split(v), None))

    def hvp_batched(self, V: Tensor) -> Tensor:
        """``H V`` for an ``n x b`` block of probes (one data pass for the whole block)."""
        if not isinstance(V, Tensor) or V.ndim != 2 or V.shape[0] != self.n:
            got = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(f"probe block has shape {got}, expected ({self.n}, b); pass an n x b tensor.")
        b = V.shape[1]
        if b == 0:
            return V.new_zeros((self.n, 0))
        out = self._apply(self._split(V), b)
        return torch.cat([o.reshape(b, -1) for o in out], dim=1).T

    def loss_and_grad(self) -> tuple[float, Tensor]:
        """Mean loss and its flat gradient over all batches (one forward+backward per batch)."""
        leaves = self._fresh_leaves()
        acc = [torch.zeros_like(p) for p in leaves]
        tot_loss = 0.0
        total = 0
        with torch.enable_grad():
            for batch in self.batches:
                loss, n = self.loss_fn(self._as_dict(leaves), batch)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g)
                tot_loss += float(loss.detach())
                total += self._n(n)
        total = self._record_n(total)
        return tot_loss / total, flatten([a / total for a in acc])

    def as_operator(self) -> SymmetricOperator:
        """This Hessian as a :class:`SymmetricOperator` (flat vectors; ``matmat`` = :meth:`hvp_batched`)."""
        return SymmetricOperator(
            self.hvp, self.n, dtype=self.dtype, device=self.device, matmat=self.hvp_batched, name="hessian"
        )

    def flatten(self, d: Mapping[str, Tensor]) -> Tensor:
        return flatten([d[k] for k in self.names])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        return unflatten(v, self._primal)

    def __repr__(self) -> str:
        return (f"HessianVectorProduct(kernel={self.kernel!r}, n={self.n}, batches={len(self.batches)}, "
                f"dtype={self.dtype}, device={self.device})")


# --------------------------------------------------------------------------------------------------
# Kernel selection
# --------------------------------------------------------------------------------------------------


@dataclass
class KernelSelection:
    """Outcome of :func:`select_kernel`: the chosen kernel and what was measured.

    ``seconds``: median seconds per probe on the timing batch, per working kernel (``graph_reuse``
    excludes its one-off graph build, reported in ``setup_seconds``); ``gradient_seconds``: median
    seconds of one forward+backward on that batch; ``ratio``: ``seconds / gradient_seconds``;
    ``max_rel_diff``: largest relative difference of each kernel's ``H v`` from the first working one;
    ``errors``: why a kernel was excluded (an exception, or disagreement); ``pruned``: kernels timed
    once only, because that time was already ``prune`` x the best median (their ``seconds`` is that
    one time).
    """

    kernel: str
    seconds: dict[str, float] = field(default_factory=dict)
    setup_seconds: float = math.nan
    gradient_seconds: float = math.nan
    ratio: dict[str, float] = field(default_factory=dict)
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    repeats: int = 3
    block: int = 1
    pruned: list[str] = field(default_factory=list)
    graph_bytes: float = math.nan
    """Bytes of the tensors ``graph_reuse``'s retained graph of the timing batch holds (its saved
    activations); ``graph_reuse`` keeps one such graph per batch for the whole measurement."""


class _SavedBytes:
    """``saved_tensors_hooks`` pair that adds up the distinct storages autograd saves (the
    parameters' own storages excluded: they exist anyway)."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.seen = {p.untyped_storage().data_ptr() for p in params.values()}
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        try:
            ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage (functorch wrapper...)
            ptr, size = None, t.numel() * t.element_size()
        if ptr is None or ptr not in self.seen:
            if ptr is not None:
                self.seen.add(ptr)
            self.bytes += size
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer read without this measures the
    launches, not the work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_bytes(loss_fn: LossFn, params: Mapping[str, Tensor], batch: Any) -> int:
    """Bytes of the tensors autograd saves to differentiate the gradient of ``loss_fn`` on ``batch``
    (a forward plus a ``create_graph`` backward): what every kernel holds for one batch while it
    computes an HVP, and what ``graph_reuse`` keeps per batch. Counted with ``saved_tensors_hooks``
    (distinct storages, the parameters' own excluded)."""
    saved = _SavedBytes(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss, _ = loss_fn(leaves, batch)
        torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    return saved.bytes


def select_kernel(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    candidates: Sequence[str] = KERNELS,
    repeats: int = 3,
    block: int = 1,
    batched: bool = False,
    agree_rtol: float | None = None,
    seed: int = 0,
    prune: float = 1.25,
    n_batches: int = 1,
    memory_fraction: float = 0.8,
) -> KernelSelection:
    """Time each candidate kernel on ONE batch and return the fastest that works and agrees.

    Each kernel computes ``H v`` for the same probe (``block`` probes when ``block > 1``; drawn from a
    CPU generator seeded with ``seed``, so the global RNG is untouched). Every kernel first makes a
    warm-up call, which also checks that it works and agrees; then ``repeats`` rounds time each kernel
    once, in turn, together with one gradient, and the median time per probe is kept. The rounds are
    interleaved so that a change of machine load (another job, a noisy VM) weighs on every kernel
    alike: timed one kernel after the other, a load burst during ``graph_reuse``'s calls once made a 2x
    slower kernel win on ResNet-18. A kernel whose first-round time is already ``prune`` times the
    fastest first-round time is not timed again (it cannot win; on CPU, where ``graph_reuse`` usually
    wins by 1.4x or more, this saves timings). With 2 rounds instead of 3 the choice flipped to a 1.5x
    slower kernel in one of two benchmark runs on a noisy VM, so the default keeps 3. A kernel that
    raises (e.g. no forward-mode AD formula) or whose result differs from the first working kernel's by
    more than ``agree_rtol`` (relative, default ``sqrt(eps) / 10`` of the dtype) is excluded, with the
    reason in ``errors``. All engines live until the end of the timing (``graph_reuse`` keeps its
    retained graph of the one batch meanwhile).

    ``graph_reuse`` keeps one retained graph per batch for the whole measurement: ``n_batches`` times
    the saved tensors of the timing batch's graph (``graph_bytes``, counted with
    ``saved_tensors_hooks``). When that exceeds ``memory_fraction`` of the memory available it is
    excluded, with the figures in ``errors`` (ResNet-50 at 224x224 keeps tens of MB per image, so a
    few thousand images would not fit anywhere, and the fastest kernel on one batch would have been
    OOM-killed on the whole set).
    """
    bad = [c for c in candidates if c not in KERNELS]
    if bad or not candidates:
        raise ValueError(f"unknown kernel {bad[0] if bad else None!r}; pass candidates from {', '.join(KERNELS)}.")
    if repeats < 1 or block < 1:
        raise ValueError("repeats and block must be >= 1; pass e.g. repeats=3, block=1.")
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device
    if agree_rtol is None:
        agree_rtol = math.sqrt(torch.finfo(dtype).eps) / 10.0
    n = sum(p.numel() for p in params.values())
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    V = torch.randn((n, block), generator=g, dtype=torch.float64).to(dtype=dtype).to(device)
    sel = KernelSelection(kernel="", repeats=repeats, block=block)

    def timed(call: Callable[[], Any]) -> float:
        sync_device(device)
        t0 = time.perf_counter()
        call()
        sync_device(device)
        return time.perf_counter() - t0

    def apply(eng: HessianVectorProduct) -> Tensor:
        return eng.hvp(V[:, 0]) if block == 1 else eng.hvp_batched(V)

    def fail(name: str, exc: Exception) -> None:
        sel.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    probe = HessianVectorProduct(loss_fn, params, [batch], kernel="double_backward")
    engines: dict[str, HessianVectorProduct] = {}
    try:
        probe.loss_and_grad()  # warm-up of the gradient reference
        ref: Tensor | None = None
        for name in candidates:  # warm-up, failure and agreement checks, in order
            eng = HessianVectorProduct(loss_fn, params, [batch], kernel=name, batched=batched)
            try:
                if name == "graph_reuse":
                    saved = _SavedBytes(params)
                    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                        sel.setup_seconds = timed(eng.prepare)
                    sel.graph_bytes = float(saved.bytes)  # what graph_bytes() gives, counted in passing
                    need, avail = saved.bytes * max(int(n_batches), 1), available_bytes(device)
                    if avail is not None and need > memory_fraction * avail:
                        sel.errors[name] = (f"its retained graphs of {n_batches} batches would hold ~{_bytes(need)}, "
                                            f"{_bytes(avail)} available")
                        eng.release()
                        continue
                out = apply(eng).reshape(n, -1)
            except Exception as exc:  # noqa: BLE001 - any failure just excludes the kernel
                fail(name, exc)
                eng.release()
                continue
            if ref is None:
                ref = out
                sel.max_rel_diff[name] = 0.0
            else:
                scale = float(ref.abs().max()) or 1.0
                diff = float((out - ref).abs().max()) / scale
                sel.max_rel_diff[name] = diff
                if not diff <= agree_rtol:
                    sel.errors[name] = f"disagrees with {next(iter(engines))} (max rel diff {diff:.2e})"
                    eng.release()
                    continue
            engines[name] = eng
        times: dict[str, list[float]] = {name: [] for name in engines}
        gt = []
        for r in range(repeats):  # interleaved rounds: the gradient, then each kernel still in the race
            gt.append(timed(probe.loss_and_grad))
            for name in [k for k in engines if k not in sel.pruned and k not in sel.errors]:
                try:
                    times[name].append(timed(lambda e=engines[name]: apply(e)) / block)
                except Exception as exc:  # noqa: BLE001
                    fail(name, exc)
            if r == 0:
                first = {k: t[0] for k, t in times.items() if t}  # a kernel that failed has no time
                fastest = min(first, key=first.__getitem__, default=None)
                sel.pruned.extend(k for k, t in first.items() if k != fastest and t >= prune * first[fastest])
    finally:
        probe.release()
        for eng in engines.values():
            eng.release()
    sel.gradient_seconds = statistics.median(gt)
    for name, ts in times.items():
        if ts and name not in sel.errors:
            sel.seconds[name] = statistics.median(ts)
            sel.ratio[name] = sel.seconds[name] / sel.gradient_seconds if sel.gradient_seconds > 0 else math.nan
    if not sel.seconds:
        detail = "; ".join(f"{k}: {v}" for k, v in sel.errors.items())
        raise NoKernelError(f"no HVP kernel works for this model ({detail}); replace the failing op in the model, or "
                            "leave the parameters it depends on out of the selection (--exclude / --params)")
    sel.kernel = min(sel.seconds, key=sel.seconds.__getitem__)
    return sel
