"""LSQ fake-quantizer (Esser et al., "Learned Step Size Quantization", ICLR 2020), exactly.

Forward (integer range [-Q_N, Q_P], learned step size ``s``)::

    v_bar = round(clip(v / s, -Q_N, Q_P))        # integer codes
    v_hat = v_bar * s                            # fake-quantized value

Backward (straight-through estimator, STE):

* ``d v_hat / d v = 1`` where ``-Q_N <= v/s <= Q_P`` (clamp passes its gradient on the closed
  interval), else 0;
* ``d v_hat / d s = round(v/s) - v/s`` inside the range, ``-Q_N`` below it, ``Q_P`` above it;
* the step-size gradient is multiplied by ``g = 1 / sqrt(N * Q_P)``.

Ranges: signed ``Q_N = 2^(b-1), Q_P = 2^(b-1) - 1``; signed narrow ``Q_N = Q_P = 2^(b-1) - 1``;
unsigned ``Q_N = 0, Q_P = 2^b - 1``. Init ``s0 = 2 * mean|v| / sqrt(Q_P)`` (per channel: the mean over
each channel). ``N`` in ``g`` is either the whole tensor's element count (``grad_scale_n="tensor"``, what
lsq-net, QT-DoG and PyTorch's learnable fake-quant do even for per-channel step sizes) or the element
count of one channel (``"channel"``, a ``sqrt(C)`` larger step-size gradient for C channels).

PyTorch's ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (a test oracle) agree with
this except in the half-step bands just beyond the range ends (``Q_P < v/s < Q_P + 1/2`` and the
mirror below ``-Q_N``): their kernels mask on ``round(v/s)``, so there they pass ``dv`` and give
``round(v/s) - v/s`` for ``ds``; LSQ (and this module) treat those values as clipped.

Implementation: the step size goes through plain autograd ops (``clamp_min`` and
``grad_scale(s, g) = s.detach() + (s*g - (s*g).detach())`` -- value exactly ``s``, bitwise, gradient
``g``); the elementwise part is one ``torch.autograd.Function`` (:class:`_LSQFakeQuant`) because the
equivalent chain of plain ops (``x/s``, ``clamp``, ``round_pass``, ``*s`` and their backward) costs
about twice as many passes over the weights, which dominated the QAT step on CPU. Its forward computes
``y = x/s``, ``q = round(clamp(y))``, ``q*s`` (the same float ops as before, so the value is bitwise
unchanged and equal to :meth:`LSQQuantizer.dequantize` of :meth:`LSQQuantizer.quantize_int`) plus the
in-range mask and ``r = d v_hat / d s`` that the backward needs. It stays differentiable to any order,
because the Hessian tools differentiate twice through this module: the backward is plain
differentiable ops on the saved mask and ``r``, which are constants of ``(x, s)`` to every order in the
plain-op form too (its ``d r / d(x, s)`` cancels to 0), so double backward gives the same HVPs as
before (checked to 1e-15); forward-mode AD has its own ``jvp`` rule; ``torch.func`` transforms
(``grad``, ``jvp``, ``vmap``) are supported (``setup_context``, ``generate_vmap_rule``).
``round_pass(y) = y + (round(y) - y).detach()`` is kept as a helper (value exactly ``round(y)``,
gradient 1). On CPU the forward and the first-order backward of large contiguous tensors (a layer's
weights) run as single numba loops (:mod:`flatlens.quant.kernels`: same values bitwise, buffers reused
between steps); the double backward, CUDA and the ``torch.func`` transforms use the torch ops.

What an HVP through this quantizer means: it is the Hessian of the *straight-through surrogate*, not
of the (piecewise-constant in the weights) quantized loss. The surrogate replaces the quantizer by its
linearisation at the current point, ``v_hat ~ v_hat0 + inside * dv + r * ds`` (``inside`` and ``r``
are constants to every order, see above), so its Hessian is ``J^T H J`` with ``J = [diag(inside), r]``
and ``H`` the float Hessian at the fake-quantized point ``w_q``: symmetric, the weight block masked to
the unclipped weights, the step-size block ``r^T H r``. LSQ's gradient scale ``g`` is a preconditioner
of the step-size *update*, not part of the loss; through it the step-size blocks came out scaled by
``g_l g_m`` (1e-4 to 1e-5 for 4-bit convolutions). The measures therefore run with it switched off
(:func:`gradient_scale_off`, used by :func:`flatlens.measure.hvp.make_forward_fn`); values are
bitwise the same either way.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from flatlens.quant import kernels

GradScaleN = Literal["tensor", "channel"]

MIN_BITS = 2
MAX_BITS = 8


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in value (bitwise), multiply the gradient by ``scale`` (any order of AD)."""
    xs = x * scale
    return x.detach() + (xs - xs.detach())


@contextmanager
def gradient_scale_off(model: nn.Module) -> Iterator[None]:
    """Every LSQ quantizer of ``model`` without its step-size gradient scale for the duration.

    Derivatives with respect to step sizes are then those of the loss (of the straight-through
    surrogate), not LSQ's preconditioned training gradient ``g * dL/ds``; derivatives with respect to
    anything else, and every value, are bitwise unchanged. Each quantizer's setting is put back on exit.
    """
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    before = [q.gradient_scale_on for q in quantizers]
    for q in quantizers:
        q.gradient_scale_on = False
    try:
        yield
    finally:
        for q, on in zip(quantizers, before):
            q.gradient_scale_on = on


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in value (half to even, like ``torch.round``), identity gradient (STE)."""
    return x + (torch.round(x) - x).detach()


def quant_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """Return ``(Q_N, Q_P)`` for a ``bits``-bit signed / signed-narrow / unsigned integer grid."""
    if signed:
        q_p = 2 ** (bits - 1) - 1
        q_n = q_p if narrow else 2 ** (bits - 1)
    else:
        q_n, q_p = 0, 2**bits - 1
    return q_n, q_p


class _LSQFakeQuant(torch.autograd.Function):
    """``v_hat = round(clamp(x/s, -Q_N, Q_P)) * s`` with LSQ's straight-through gradients, fused.

    ``s`` is the effective step size, already broadcastable to ``x`` (its gradient scale and eps clamp
    are applied outside by plain autograd). Outputs ``(v_hat, r, inside)``: ``inside`` is the in-range
    mask ``-Q_N <= x/s <= Q_P`` as 0./1. in ``x/s``'s dtype, ``r = d v_hat / d s`` elementwise
    (``round(x/s) - x/s`` inside the range, ``-Q_N`` / ``Q_P`` outside); both are non-differentiable
    by-products kept for the backward (``setup_context`` may only save inputs and outputs).

    Backward ``dx = g * inside``, ``ds = sum(g * r)`` over the broadcast dimensions; forward mode
    ``dv_hat = inside * dx + r * ds``. ``r`` and ``inside`` are constants of ``(x, s)`` to every
    order, exactly as in the plain-op form ``round_pass(clamp(x/s)) * s`` (there ``d r / d(x, s)`` is
    ``inside/s - inside/s = 0`` inside the range and 0 outside), so double backward and
    forward-over-reverse give the same HVPs as that form. Kernel choices (CPU, measured): a float mask
    via ``eq(out=)`` and an in-place ``addcmul_`` instead of a bool mask with ``where`` (about 3x
    cheaper), no zero-filled gradients for the by-products (``set_materialize_grads(False)``), as few
    fresh allocations as possible (first-touch page faults on large tensors cost as much as a pass).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int):  # type: ignore[override]
        y = x / s
        q = torch.clamp(y, -q_n, q_p)
        try:  # 1. where the clamp changed nothing, else 0. (one pass; a bool mask + cast costs two)
            inside = torch.eq(y, q, out=torch.empty_like(y))
            vmapped = False
        except RuntimeError:  # torch.vmap has no batching rule for out= variants (nor for addcmul_)
            inside = (y == q).to(y.dtype)
            vmapped = True
        q = q.round_()
        out = q * s
        if vmapped:
            r = torch.addcmul(q, y, inside, value=-1)
        else:
            r = q.addcmul_(y, inside, value=-1)  # in place (q is no longer needed): q - y inside, q outside
        return out, r, inside

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: D401 - torch hook
        _, s, _, _ = inputs
        _, r, inside = output
        ctx.mark_non_differentiable(r, inside)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the by-products r, inside
        ctx.save_for_backward(r, inside)
        ctx.save_for_forward(r, inside)
        ctx.s_shape = s.shape

    @staticmethod
    def backward(ctx, g: torch.Tensor, _gr: torch.Tensor | None, _gi: torch.Tensor | None):  # type: ignore[override]
        r, inside = ctx.saved_tensors
        if g is None:  # only the by-products were used downstream
            return None, None, None, None
        return (*_lsq_backward(g, r, inside, ctx.s_shape, ctx.needs_input_grad), None, None)

    @staticmethod
    def jvp(ctx, x_t: torch.Tensor | None, s_t: torch.Tensor | None, _qn: None, _qp: None):  # type: ignore[override]
        r, inside = ctx.saved_tensors  # the save_for_forward tensors
        return _lsq_jvp(x_t, s_t, r, inside), None, None


def _lsq_backward(g: torch.Tensor, r: torch.Tensor, inside: torch.Tensor, s_shape: torch.Size,
                  needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LSQ's ``(dx, ds)`` from the upstream gradient and the by-products (differentiable in ``g``)."""
    gx = g * inside if needs[0] else None
    gs = (g * r).sum_to_size(s_shape) if needs[1] else None
    return gx, gs


def _lsq_jvp(x_t: torch.Tensor | None, s_t: torch.Tensor | None, r: torch.Tensor,
             inside: torch.Tensor) -> torch.Tensor:
    """Forward-mode derivative ``inside * dx + r * ds``."""
    out_t = x_t * inside if x_t is not None else None
    if s_t is not None:
        out_t = r * s_t if out_t is None else torch.addcmul(out_t, r, s_t)
    return out_t if out_t is not None else torch.zeros_like(r)


class _LSQFakeQuantFused(torch.autograd.Function):
    """The op of :class:`_LSQFakeQuant` through the numba CPU kernels of :mod:`flatlens.quant.kernels`.

    Used for plain CPU tensors where :func:`kernels.applicable` holds (a layer's weights). The forward
    writes only ``v_hat`` (bitwise equal to the eager op) and saves ``(x, s)``; the first-order backward
    recomputes the in-range mask and ``r`` inside its one pass over ``(g, x)``, so no weight-sized
    by-products are stored between forward and backward (5 memory streams per step instead of 8).
    A differentiable backward (``create_graph``, the Hessian tools) and forward mode recompute ``r``
    and the mask with the eager ops, as constants, and then apply the same formulas as
    :class:`_LSQFakeQuant`, so HVPs are unchanged. ``pool``: the quantizer's reusable buffers.
    """

    @staticmethod
    def forward(x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int,  # type: ignore[override]
                pool: kernels.BufferPool | None):
        out = kernels.forward(x, s, q_n, q_p, pool)
        if out is None:  # kernels busy in another thread: the eager ops, same values
            out = _LSQFakeQuant.forward(x, s, q_n, q_p)[0]
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: D401 - torch hook
        x, s, q_n, q_p, pool = inputs
        ctx.save_for_backward(x, s)
        ctx.save_for_forward(x, s)
        ctx.q_range = (q_n, q_p)
        ctx.pool = pool

    @staticmethod
    def _byproducts(ctx, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            _, r, inside = _LSQFakeQuant.forward(x.detach(), s.detach(), *ctx.q_range)
        return r, inside

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, s = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not torch.is_grad_enabled():  # first-order backward: one fused pass
            fused = kernels.backward(g, x, s, *ctx.q_range, needs[0], needs[1], ctx.pool)
            if fused is not None:
                return fused[0], fused[1], None, None, None
        r, inside = _LSQFakeQuantFused._byproducts(ctx, x, s)
        return (*_lsq_backward(g, r, inside, s.shape, needs), None, None, None)

    @staticmethod
    def jvp(ctx, x_t: torch.Tensor | None, s_t: torch.Tensor | None, _qn: None, _qp: None, _pool: None):  # type: ignore[override]
        x, s = ctx.saved_tensors
        r, inside = _LSQFakeQuantFused._byproducts(ctx, x, s)
        return _lsq_jvp(x_t, s_t, r, inside)


class LSQQuantizer(nn.Module):
    """LSQ fake-quantizer with a learned step size ``step_size`` (per tensor or per channel).

    State (all in ``state_dict``, hence in checkpoints):

    * ``step_size`` -- ``nn.Parameter`` of shape ``(num_channels,)`` per channel or ``(1,)`` per tensor;
    * ``enabled`` -- bool buffer; when False, ``forward`` returns its input unchanged (and the step
      size gets no gradient). Change it only through :meth:`set_enabled` (or ``load_state_dict``):
      ``forward`` reads a Python mirror of it to avoid a device sync per call;
    * ``initialized`` -- bool buffer; False until :meth:`init_from` ran. An uninitialized quantizer
      initializes itself from the first tensor it sees in training mode (the LSQ recipe for
      activations) and raises in eval mode.

    The step size is clamped to ``eps`` in the forward pass (``s_eff = max(s, eps)``), so a step size
    pushed to <= 0 by an optimizer cannot produce inf/nan; while clamped it gets no gradient (the clamp
    is a pathology guard, not part of LSQ). All randomness-free; no global state is touched.

    Under ``torch.func.functional_call`` / ``grad`` / ``jvp`` the quantizer must already be
    initialized (the lazy init writes ``step_size`` in place), which holds for any model in eval mode.
    """

    step_size: nn.Parameter
    enabled: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self,
        bits: int = 8,
        *,
        signed: bool = True,
        narrow: bool = False,
        per_channel: bool = False,
        num_channels: int | None = None,
        channel_dim: int = 0,
        grad_scale_n: GradScaleN = "tensor",
        eps: float = 1e-8,
        enabled: bool = True,
        dist_sync_init: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build an uninitialized quantizer; call :meth:`init_from` (weights) or let the first
        training batch initialize it (activations).

        ``num_channels`` is required when ``per_channel`` (the step-size shape must be known up front
        so that a checkpoint loads into a freshly built model). ``dist_sync_init``: when the lazy
        (first-batch) init runs under an initialized ``torch.distributed`` process group, the
        per-rank ``s0`` is averaged over ranks so that DDP replicas start from the same step size.
        """
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"LSQ bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        if narrow and not signed:
            raise ValueError("LSQ narrow=True applies only to signed ranges; use narrow=False with signed=False")
        if grad_scale_n not in ("tensor", "channel"):
            raise ValueError(f"LSQ grad_scale_n must be 'tensor' or 'channel', got {grad_scale_n!r}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"LSQ eps must be a finite positive float, got {eps!r}")
        if per_channel:
            if num_channels is None or isinstance(num_channels, bool) or int(num_channels) < 1:
                raise ValueError(f"LSQ per_channel=True needs num_channels >= 1, got {num_channels!r}")
            num_channels = int(num_channels)
        else:
            num_channels = 1
        self.bits = int(bits)
        self.signed = bool(signed)
        self.narrow = bool(narrow)
        self.per_channel = bool(per_channel)
        self.num_channels = num_channels
        self.channel_dim = int(channel_dim)
        self.grad_scale_n: GradScaleN = grad_scale_n
        self.eps = float(eps)
        self.dist_sync_init = bool(dist_sync_init)
        self._q_n, self._q_p = quant_range(self.bits, self.signed, self.narrow)
        self.step_size = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        self.register_buffer("enabled", torch.tensor(bool(enabled), device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self._enabled = bool(enabled)
        self._initialized = False
        self.gradient_scale_on = True
        """Multiply the step-size gradient by :meth:`grad_factor` (LSQ's rule, for training). Measures of
        the loss surface switch it off (:func:`gradient_scale_off`): it changes no value, only the
        step-size derivatives."""
        self._pool = kernels.BufferPool()  # reused output buffers of the fused CPU kernel

    # ------------------------------------------------------------------ range
    @property
    def q_n(self) -> int:
        """Magnitude of the most negative integer code (0 for unsigned)."""
        return self._q_n

    @property
    def q_p(self) -> int:
        """Largest integer code."""
        return self._q_p

    # ------------------------------------------------------------------ state
    def set_enabled(self, flag: bool) -> None:
        """Switch fake quantization on or off (updates the persistent buffer and its mirror)."""
        self.enabled.fill_(bool(flag))
        self._enabled = bool(flag)

    def is_enabled(self) -> bool:
        """Whether ``forward`` quantizes."""
        return self._enabled

    def is_initialized(self) -> bool:
        """Whether the step size has been initialized (by :meth:`init_from` or a training batch)."""
        return self._initialized

    def reset_initialization(self) -> None:
        """Mark the step size uninitialized: the next training-mode forward re-runs the LSQ init."""
        self.initialized.fill_(False)
        self._initialized = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: D401 - torch hook
        """Load as usual, then refresh the Python mirrors of the ``enabled``/``initialized`` buffers."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._enabled = bool(self.enabled)
        self._initialized = bool(self.initialized)

    # ------------------------------------------------------------------ init
    def _channel_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped to ``(C, -1)`` with the quantized channel first."""
        dim = self._dim(x)
        return x.movedim(dim, 0).reshape(x.shape[dim], -1)

    def _dim(self, x: torch.Tensor) -> int:
        if x.dim() == 0:
            raise ValueError("LSQ per-channel quantization needs a tensor with at least one dimension")
        nd = x.dim()
        if not -nd <= self.channel_dim < nd:
            raise ValueError(
                f"LSQ channel_dim={self.channel_dim} is out of range for a tensor of shape {tuple(x.shape)}")
        dim = self.channel_dim % nd
        if x.shape[dim] != self.num_channels:
            raise ValueError(
                f"LSQ quantizer has {self.num_channels} channels but the tensor has {x.shape[dim]} "
                f"along dim {dim} (shape {tuple(x.shape)})")
        return dim

    @torch.no_grad()
    def compute_init(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ init ``s0 = 2*mean|x|/sqrt(Q_P)`` (per channel when per-channel), shape of ``step_size``.

        A channel (or tensor) whose mean is 0 falls back to the tensor-wide ``s0``, and that to
        ``eps``, so the step size is always positive.
        """
        x = x.detach()
        whole = 2.0 * x.abs().mean() / math.sqrt(self._q_p)
        if self.per_channel:
            s0 = 2.0 * self._channel_view(x).abs().mean(dim=1) / math.sqrt(self._q_p)
            s0 = torch.where(s0 > 0, s0, whole)
        else:
            s0 = whole.reshape(1)
        return s0.clamp_min(self.eps)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, *, sync: bool = False) -> None:
        """Set ``step_size`` to the LSQ init computed from ``x`` (in place: optimizer identity kept).

        ``sync=True`` averages ``s0`` over ``torch.distributed`` ranks when a process group is
        initialized (used by the lazy first-batch init so DDP replicas agree).
        """
        s0 = self.compute_init(x).to(self.step_size.dtype)
        if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            s0 = s0.to(self.step_size.device)
            dist.all_reduce(s0)
            s0 /= dist.get_world_size()
        self.step_size.copy_(s0.to(self.step_size.device))
        self.initialized.fill_(True)
        self._initialized = True

    # ------------------------------------------------------------------ math
    def grad_factor(self, x: torch.Tensor) -> float:
        """The LSQ gradient scale ``g = 1/sqrt(N * Q_P)`` for an input like ``x``."""
        n = x.numel()
        if self.grad_scale_n == "channel" and self.per_channel:
            n = n // self.num_channels
        return 1.0 / math.sqrt(max(n, 1) * self._q_p)

    def _broadcast_shape(self, x: torch.Tensor) -> list[int]:
        if not self.per_channel:
            return [1] * x.dim() if x.dim() > 0 else []
        shape = [1] * x.dim()
        shape[self._dim(x)] = self.num_channels
        return shape

    def effective_step(self, x: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
        """Step size as used on ``x``: clamped to ``eps``, grad-scaled (value unchanged), broadcastable.

        Every path (forward, :meth:`quantize_int`, :meth:`dequantize`) uses this, so their values agree
        bitwise.
        """
        s = self.step_size.clamp_min(self.eps)
        if scaled and self.gradient_scale_on:
            s = grad_scale(s, self.grad_factor(x))
        return s.reshape(self._broadcast_shape(x))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ fake quantization of ``x`` regardless of ``enabled`` (the quantizer must be initialized)."""
        s = self.effective_step(x)
        # always the Function, also under no_grad: forward-mode AD (jvp) is active under no_grad too
        if kernels.applicable(x, s):  # a layer's weights on CPU: one fused pass (bitwise the same values)
            return _LSQFakeQuantFused.apply(x, s, self._q_n, self._q_p, self._pool)
        return _LSQFakeQuant.apply(x, s, self._q_n, self._q_p)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` when enabled (lazy LSQ init on the first training batch), else identity."""
        if not self._enabled:
            return x
        if not self._initialized:
            if not self.training:
                raise RuntimeError(
                    "LSQQuantizer is enabled but uninitialized in eval mode; run one training-mode "
                    "forward first or call init_from(tensor)")
            self.init_from(x, sync=self.dist_sync_init)
            if not self.signed and bool((x < 0).any()):
                import warnings

                warnings.warn(
                    f"unsigned LSQ quantizer initialized from a batch with negative values "
                    f"(min {float(x.min()):.3g}); they are clipped to 0 -- use signed=True for this input",
                    stacklevel=2)
        return self.fake_quantize(x)

    @torch.no_grad()
    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes ``round(clip(x/s, -Q_N, Q_P))`` as ``torch.int32`` (same float ops as forward)."""
        s = self.effective_step(x, scaled=False)
        return torch.round(torch.clamp(x / s, -self._q_n, self._q_p)).to(torch.int32)

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes * s`` in the step size's dtype; bitwise equal to ``fake_quantize`` of the source."""
        s = self.effective_step(codes, scaled=False)
        return codes.to(s.dtype) * s

    def extra_repr(self) -> str:
        gran = f"per_channel(C={self.num_channels}, dim={self.channel_dim})" if self.per_channel else "per_tensor"
        kind = "signed" + ("_narrow" if self.narrow else "") if self.signed else "unsigned"
        return (f"bits={self.bits}, {kind} [{-self._q_n}, {self._q_p}], {gran}, "
                f"grad_scale_n={self.grad_scale_n}, enabled={self._enabled}, initialized={self._initialized}")
