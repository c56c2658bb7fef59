"""Fused CPU kernels for the LSQ fake-quantizer (numba), used by :class:`flatlens.quant.lsq._LSQFakeQuantFused`.

Why: on CPU the QAT step of a parameter-heavy net (ResNet-18 at small batch) is bound by passes over
the weights. The eager LSQ forward is six elementwise torch ops (``x/s``, ``clamp``, ``eq``,
``round_``, ``*s``, ``addcmul_``: about 15 memory streams, and two weight-sized by-products, the
in-range mask and ``r = d v_hat / d s``, kept for the backward), its backward two more ops plus a
reduction; with a per-channel step size torch's broadcasting kernels are also slow. Here the forward
is one loop that reads ``x`` and writes ``v_hat`` (2 streams); the backward is one loop that reads the
upstream gradient ``g`` and ``x``, recomputes the mask and ``r`` on the fly, writes ``dx`` and sums
``ds`` per channel (3 streams). Nothing weight-sized is stored between forward and backward.

Exactness: both loops do the eager op's IEEE float operations in its order (``y = x / s``, clamp,
``y == clamp(y)``, round half to even, ``q * s``, ``q - y * inside``), so ``v_hat`` and ``dx`` are
bitwise equal to the eager ones (tested); ``ds`` is summed in float64 per block and then per channel,
a different (more accurate) order than torch's float32 reduction, so it agrees to rounding.

When they run (:func:`applicable`): numba importable, CPU float32/float64 tensors of at least
:data:`MIN_NUMEL` elements, contiguous ``x``, a step size per tensor or per channel along dim 0, plain
tensors (not inside ``torch.func``/``vmap`` transforms), and not called concurrently from another
Python thread (a lock is taken -- numba's threading layers do not all allow concurrent launches --
and a contended call uses the eager ops). Everything else -- CUDA, other channel dims, a
differentiable backward (``create_graph``), forward-mode AD -- uses the eager ops of
:mod:`flatlens.quant.lsq`. ``FLATLENS_FUSED_LSQ=0`` disables the kernels. The kernels use as many
threads as ``torch.get_num_threads()``. The first call compiles them (seconds; cached on disk by
numba afterwards).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

try:  # numba is a dependency; a broken install (e.g. a numpy it does not support) must not break QAT
    import numba
    from numba import njit, prange

    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        # numba's own thread pool, not a second OpenMP runtime beside torch's (with the "omp" layer, a
        # later in-process training run was not bitwise reproducible); the lock below serializes launches
        numba.config.THREADING_LAYER = "workqueue"
except Exception:  # noqa: BLE001 - any import failure means "no fused kernels"
    numba = None

BLOCK = 16384
"""Elements per parallel work item (each lies inside one channel)."""

MIN_NUMEL = 8192
"""Below this size the eager ops are as fast (kernel launch and numpy views cost a few microseconds)."""

_lock = threading.Lock()
_enabled = os.environ.get("FLATLENS_FUSED_LSQ", "1") not in ("0", "false", "False", "")


if numba is not None:

    @njit(inline="always")
    def _quant(x, sc, q_n, q_p, magic, one, zero):  # pragma: no cover - compiled
        """``(q, y, inside)`` of one element: the eager op's float operations, in its order.

        q_n, q_p, magic come in x's dtype so every operation stays in it (and vectorizes). Round half
        to even without a libm call: ``(q + magic) - magic`` with ``magic = 1.5 * 2^(p-1)`` (p mantissa
        bits) rounds exactly like rint for ``|q| < 2^(p-2)`` (here ``|q| <= 2^8``)."""
        y = x / sc
        q = y
        q = -q_n if q < -q_n else q
        q = q_p if q > q_p else q
        ins = one if q == y else zero
        return (q + magic) - magic, y, ins

    @njit(inline="always")
    def _block(t, nb, k):  # pragma: no cover - compiled
        """Work item ``t``: channel ``c`` and its element range ``[lo, hi)`` (``nb`` items per channel of ``k``)."""
        c = t // nb
        lo = c * k + (t - c * nb) * BLOCK
        return c, lo, min(lo + BLOCK, (c + 1) * k)

    @njit(parallel=True, cache=True, nogil=True, error_model="numpy")
    def _forward(x, s, k, q_n, q_p, magic, out):  # pragma: no cover - compiled
        nb = (k + BLOCK - 1) // BLOCK
        one = magic - magic + 1
        zero = magic - magic
        for t in prange(s.size * nb):
            c, lo, hi = _block(t, nb, k)
            sc = s[c]
            xs, os_ = x[lo:hi], out[lo:hi]
            for j in range(hi - lo):
                qr, _, _ = _quant(xs[j], sc, q_n, q_p, magic, one, zero)
                os_[j] = qr * sc

    @njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
    def _backward(g, x, s, k, q_n, q_p, magic, gx, partial, want_gx, want_gs):  # pragma: no cover
        # dx = g * inside; ds = sum(g * r) per channel with r = round(q) - y inside, round(q) outside
        nb = (k + BLOCK - 1) // BLOCK
        one = magic - magic + 1
        zero = magic - magic
        for t in prange(s.size * nb):
            c, lo, hi = _block(t, nb, k)
            sc = s[c]
            acc = 0.0
            gs_, xs = g[lo:hi], x[lo:hi]
            if want_gx:
                gxs = gx[lo:hi]
                for j in range(hi - lo):
                    qr, y, ins = _quant(xs[j], sc, q_n, q_p, magic, one, zero)
                    gj = gs_[j]
                    gxs[j] = gj * ins
                    acc += gj * (qr - y * ins)
            elif want_gs:
                for j in range(hi - lo):
                    qr, y, ins = _quant(xs[j], sc, q_n, q_p, magic, one, zero)
                    acc += gs_[j] * (qr - y * ins)
            partial[t] = acc


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _is_plain(t: torch.Tensor) -> bool:
    """A real tensor or Parameter (not a functorch wrapper, not batched by vmap, no other subclass)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and (_is_wrapped is None or not _is_wrapped(t))


def applicable(x: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether the fused kernels can compute the LSQ op for ``x`` with broadcastable step ``s``."""
    if numba is None or not _enabled or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if s.dtype != x.dtype or s.device != x.device or x.numel() < MIN_NUMEL or not x.is_contiguous():
        return False
    if not (_is_plain(x) and _is_plain(s)):
        return False
    n_s = s.numel()
    if n_s == 1:
        return True
    return x.dim() >= 1 and s.dim() == x.dim() and s.shape[0] == x.shape[0] == n_s


def _threads() -> None:
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _uses(t: torch.Tensor) -> int:
    """How many tensors (and wrappers) hold ``t``'s storage right now."""
    return int(_storage_use_count(t.untyped_storage()._cdata))


class BufferPool:
    """Reusable weight-sized buffers of one quantizer: the forward's ``v_hat`` and the backward's ``dx``,
    one buffer per name.

    Why: a fresh weight-sized tensor is a fresh mapping whose first touch page-faults, and on a VM
    those faults cost more than the kernel itself (ResNet-18, 11 M weights: 66 ms fresh vs 11 ms
    reused). A buffer is handed out again only when nothing but the pool holds its storage (the
    previous step's autograd graph, every returned tensor and a ``.grad`` that took ``dx`` are gone:
    checked with the storage's use count); otherwise a fresh tensor is allocated (and not pooled), so
    overlapping forwards (two forwards before one backward, a kept output or gradient) stay correct.
    Not copied by ``copy.deepcopy`` or pickling.
    """

    def __init__(self) -> None:
        self.sets: dict[str, tuple[tuple, torch.Tensor, int]] = {}

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An empty contiguous tensor like ``like`` (a detached view of pooled storage when free)."""
        if _storage_use_count is None:
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        key = (tuple(like.shape), like.dtype, like.device)
        old = self.sets.get(name)
        if old is not None and old[0] == key and _uses(old[1]) == old[2]:
            return old[1].detach()
        fresh = torch.empty_like(like, memory_format=torch.contiguous_format)
        if old is not None and old[0] == key:
            return fresh  # the pooled buffer is busy: do not pool a second one
        self.sets[name] = (key, fresh, _uses(fresh))
        return fresh.detach()

    def clear(self) -> None:
        """Drop the buffers (memory returns when their last user is gone)."""
        self.sets = {}

    def __deepcopy__(self, memo: dict) -> "BufferPool":
        return BufferPool()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


def _buffer(pool: BufferPool | None, name: str, like: torch.Tensor) -> torch.Tensor:
    return pool.take(name, like) if pool is not None else torch.empty_like(like)


def _scalars(dtype: torch.dtype, q_n: int, q_p: int) -> tuple:
    npt = np.float32 if dtype == torch.float32 else np.float64
    return npt(q_n), npt(q_p), npt(1.5 * 2.0 ** (23 if dtype == torch.float32 else 52))


def forward(x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, pool: BufferPool | None = None
            ) -> torch.Tensor | None:
    """``v_hat`` of the LSQ op (bitwise the eager value), or None (the kernels are busy: use the eager ops)."""
    if not _lock.acquire(blocking=False):
        return None
    try:
        _threads()
        xd = x.detach()
        sd = s.detach().reshape(-1).contiguous()
        out = _buffer(pool, "forward", xd)
        _forward(xd.view(-1).numpy(), sd.numpy(), xd.numel() // sd.numel(), *_scalars(xd.dtype, q_n, q_p),
                 out.view(-1).numpy())
        return out
    finally:
        _lock.release()


def backward(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, want_gx: bool,
             want_gs: bool, pool: BufferPool | None = None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """LSQ's ``(dx, ds)`` for the upstream gradient ``g`` (``ds`` shaped like ``s``), recomputing the
    in-range mask and ``r`` from ``(x, s)`` in the same pass; None: use the eager ops."""
    if not _is_plain(g) or g.dtype != x.dtype or g.shape != x.shape or g.device != x.device:
        return None
    if not _lock.acquire(blocking=False):
        return None
    try:
        _threads()
        g = g.detach().contiguous()
        xd = x.detach()
        sd = s.detach().reshape(-1).contiguous()
        k = xd.numel() // sd.numel()
        nb = (k + BLOCK - 1) // BLOCK
        gx = _buffer(pool, "backward", g) if want_gx else g.new_empty(1)
        partial = np.zeros(sd.numel() * nb, dtype=np.float64)
        _backward(g.view(-1).numpy(), xd.view(-1).numpy(), sd.numpy(), k, *_scalars(xd.dtype, q_n, q_p),
                  gx.view(-1).numpy(), partial, want_gx, want_gs)
        gs = (torch.from_numpy(partial.reshape(sd.numel(), nb).sum(axis=1)).to(s.dtype).reshape(s.shape)
              if want_gs else None)
        return (gx if want_gx else None), gs
    finally:
        _lock.release()
