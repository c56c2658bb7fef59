"""The exact Hessian diagonal (hence trace, per-layer traces, QGen noise terms) of piecewise-linear networks.

Why this is exact. For the mean cross-entropy ``L = (1/N) sum_i l(f(x_i; theta), y_i)``,

    H = G + R,   G = (1/N) sum_i J_i^T A_i J_i,   R = (1/N) sum_i sum_c r_ic  d^2 f_c(x_i) / d theta^2,

with ``J_i`` the Jacobian of the logits, ``A_i = diag(p_i) - p_i p_i^T`` the softmax Hessian and
``r_i = p_i - e_{y_i}``. In a network built from conv/linear layers, ReLU (or leaky ReLU), max/average
pooling, residual additions and BatchNorm in eval mode (an affine map), the logits are -- almost
everywhere -- a *linear* function of any single parameter tensor when all the others are held fixed
(every path from input to output passes each layer once, and ReLU masks are locally constant). So every
diagonal block ``d^2 f_c / d theta_t^2`` is zero, ``H_tt = G_tt`` for every tensor ``t`` (Botev et al.
2017, "Practical Gauss-Newton optimisation"), and

    diag(H) = diag(G) = (1/N) sum_i sum_j lambda_ij (J_i^T u_ij)^2        (A_i = sum_j lambda_ij u_ij u_ij^T)

is computed *exactly* with ``C - 1`` backward passes per sample (the softmax Hessian has rank ``C - 1``),
with no random probe and no confidence interval: the trace of the Hessian to floating-point rounding.
Hutchinson-type estimators need ``O(1/eps^2)`` HVPs for a relative error ``eps``, and many more when the
spectrum is dominated by a few large eigenvalues (ResNet-18 on 16 samples: +-6 % after 100 HVPs).

When it is not exact: GroupNorm/LayerNorm/BatchNorm in *train* mode (they normalise by the weights'
own output scale), tanh/GELU/sigmoid/softmax-attention activations, weight-normalised or factorised
layers (two tensors multiplied inside one layer do not break it; one tensor entering twice does).
:func:`check_piecewise_linear` verifies the identity numerically before the diagonal is computed: for
every tensor it draws a Rademacher direction ``D_t`` and compares ``D_t^T R_tt D_t`` (the HVP of
``phi = sum_i r_i . f(x_i)`` with ``r`` held fixed) with ``D_t^T G_tt D_t = D_t^T H_tt D_t - D_t^T
R_tt D_t`` on a few samples. For a piecewise-linear network the first is zero up to rounding; otherwise
it is of the order of the second and the check fails with a one-line error naming the tensor.

The Objective's loss (mean cross-entropy, eval mode, the cached samples, the ParamSpace's tensors in
its space) is the function whose Hessian diagonal is returned; in ``latent`` space of a quantized model
the per-sample gradients and the check both go through the straight-through estimator, so the result is
the diagonal of the same surrogate Hessian the HVPs differentiate.

Cost: one batch-1 forward and ``C - 1`` batch-1 backward passes per sample (plus the check: ``2 x``
tensors backward passes on ``check_samples`` samples). On CPU that is typically 10-30 HVPs' worth of
time; it is exact, so it replaces thousands of HVPs when a trace to 1 % is wanted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flatlens import distributed as D
from flatlens.errors import FlatlensError
from flatlens.measure.hvp import make_forward_fn, sync_device
from flatlens.seeding import check_seed, generator as seeded_generator

__all__ = ["PiecewiseLinearCheck", "GaussNewtonDiagonal", "check_piecewise_linear", "hessian_diagonal",
           "softmax_hessian_factor", "predicted_seconds"]


@dataclass
class PiecewiseLinearCheck:
    """Per tensor: ``q_R = D^T R_tt D`` and ``q_G = D^T G_tt D`` on ``n_samples`` samples, and the verdict.

    ``ratio = |q_R| / max(q_G, 1e-6 max(q_G))``; ``passed`` when every ratio is ``<= rtol``.
    """

    names: list[str]
    q_r: Tensor
    q_g: Tensor
    ratio: Tensor
    rtol: float
    n_samples: int
    seed: int

    @property
    def passed(self) -> bool:
        return bool((self.ratio <= self.rtol).all())

    @property
    def max_ratio(self) -> float:
        return float(self.ratio.max()) if self.ratio.numel() else 0.0

    @property
    def worst(self) -> str:
        return self.names[int(torch.argmax(self.ratio))] if self.names else ""


@dataclass
class GaussNewtonDiagonal:
    """``diag(H)`` (flat, float64, on the Objective's device) of the mean loss, exact for piecewise-linear nets."""

    diagonal: Tensor
    check: PiecewiseLinearCheck | None
    n_backward: int  # per-sample vector-Jacobian products, one per kept column (all ranks)
    n_samples: int
    seconds: float
    per_sample: str = "loop"  # how they were formed: "vmap", "loop" or "loop (vmap failed: ...)"
    selection: str = ""  # per_sample="auto": the per-sample times it chose by
    resumed_samples: int = 0  # samples a killed run had summed, taken from its journal (Objective.journal)

    @property
    def trace(self) -> float:
        return float(self.diagonal.sum())


def softmax_hessian_factor(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(U sqrt(lambda), keep)``: per sample, columns ``b_j`` with ``sum_j b_j b_j^T = diag(p) - p p^T``.

    From an eigendecomposition in float64 (``logits``: ``n x C``, eigenvalues ascending). ``keep``
    (``n x C`` bool) drops the smallest eigenvalue, which is exactly zero (``A 1 = p - p (p^T 1) =
    0``: the ones vector), and eigenvalues at rounding level (``<= C eps max lambda``: zero in exact
    arithmetic, e.g. classes whose probability underflowed); the rest are kept, however small. So at
    most ``C - 1`` backward passes per sample.
    """
    p = torch.softmax(logits.detach().double(), dim=1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    lam, U = torch.linalg.eigh(A)
    floor = lam.shape[1] * torch.finfo(torch.float64).eps * lam.abs().amax(dim=1, keepdim=True)
    keep = lam > floor
    keep[:, 0] = False
    return U * lam.clamp_min(0).sqrt()[:, None, :], keep


def _leaves(obj: Any) -> dict[str, Tensor]:
    return {n: p.detach().requires_grad_(True) for n, p in zip(obj.space.names, obj.space.params)}


def _sample_squares(forward: Callable[..., Tensor], leaves: dict[str, Tensor], x1: Tensor,
                    acc: list[Tensor]) -> int:
    """``acc`` (zeroed first) = ``sum_j (J^T b_j)^2`` per tensor for the one sample ``x1`` (batch of 1).

    One forward; the softmax-Hessian factor from its own logits; one backward per kept column.
    Returns the number of backward passes.
    """
    for a in acc:
        a.zero_()
    params = list(leaves.values())
    with torch.enable_grad():
        out = forward(leaves, (x1,))
        B, keep = softmax_hessian_factor(out.detach())
        cols = torch.nonzero(keep[0]).flatten().tolist()
        for j, c in enumerate(cols):
            cot = B[0, :, c].to(dtype=out.dtype, device=out.device)[None]
            grads = torch.autograd.grad(out, params, grad_outputs=cot, retain_graph=j < len(cols) - 1,
                                        allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.addcmul_(g, g)
    return len(cols)


PER_SAMPLE_MODES = ("auto", "vmap", "loop")
"""How :func:`hessian_diagonal` forms the per-sample products: ``vmap`` (``torch.func``, a chunk of samples
at a time), ``loop`` (one batch-1 backward per sample and column) or ``auto`` (both timed on the first
samples, the faster kept; ``loop`` where the model has an op ``torch.func.vmap`` cannot batch)."""

_CHUNK_BYTES = 256 << 20
"""Memory the vmap path may spend on per-sample gradients per chunk (two parameter-sized tensors each)."""


def _columns(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, keep)``: the softmax-Hessian factor of each sample as ``n x C x (C - 1)`` columns, the dropped
    ones zeroed (they add exactly 0), and the ``n x (C - 1)`` mask of the kept columns."""
    B, keep = softmax_hessian_factor(logits)
    B = (B * keep[:, None, :]).to(dtype=logits.dtype, device=logits.device)
    return B[:, :, 1:].contiguous(), keep[:, 1:]


def _vmap_squares(forward: Callable[..., Tensor], params: dict[str, Tensor], X: Tensor,
                  acc: list[Tensor]) -> int:
    """``acc`` (zeroed first) = ``sum_i sum_j (J_i^T b_ij)^2`` per tensor over the samples of ``X``, batched
    with ``torch.func``.

    One batched forward for the logits (hence the factors), then ``vmap`` over the samples of a function
    that runs the sample's forward once (``torch.func.vjp``) and pulls back its ``C - 1`` columns one by one,
    summing the squares: per sample two parameter-sized tensors, whatever ``C``. The same products as
    :func:`_sample_squares` (to rounding), with batched kernels instead of ``n (C - 1)`` batch-1 passes.
    Returns the number of kept columns (per-sample vector-Jacobian products that count).
    """
    with torch.no_grad():
        logits = forward(params, (X,))
    B, keep = _columns(logits)

    def one(x1: Tensor, b1: Tensor) -> dict[str, Tensor]:
        _, pull = torch.func.vjp(lambda p: forward(p, (x1.unsqueeze(0),))[0], params)
        sq = {k: torch.zeros_like(v) for k, v in params.items()}
        for j in range(b1.shape[1]):
            (g,) = pull(b1[:, j])
            sq = {k: sq[k] + g[k] * g[k] for k in sq}
        return sq

    out = torch.func.vmap(one)(X, B)
    for a, k in zip(acc, params):
        torch.sum(out[k], dim=0, out=a)
    return int(keep.sum())


def _chunk_size(params: dict[str, Tensor], chunk: int | None) -> int:
    """Samples per vmap chunk: ``chunk`` if given, else what fits :data:`_CHUNK_BYTES` (at least 1)."""
    if chunk is not None:
        if int(chunk) < 1:
            raise FlatlensError(f"chunk={chunk}; pass a positive number of samples per vmap chunk")
        return int(chunk)
    per_sample = 2 * sum(p.numel() * p.element_size() for p in params.values())
    return max(1, min(64, _CHUNK_BYTES // max(per_sample, 1)))


def check_piecewise_linear(obj: Any, *, n_samples: int = 2, rtol: float = 1e-3, seed: int = 0) -> PiecewiseLinearCheck:
    """Verify ``H_tt = G_tt`` for every tensor of ``obj.space`` on a random direction (see the module doc).

    Uses the first ``n_samples`` samples of this rank's first batch; under torch.distributed the forms
    are summed over ranks so every rank reaches the same verdict. Costs ``2 (1 + tensors)`` backward
    passes on those samples.
    """
    if n_samples < 1:
        raise FlatlensError(f"check_samples={n_samples}; pass at least 1")
    forward = make_forward_fn(obj.model)
    leaves = _leaves(obj)
    names = list(leaves)
    gen = seeded_generator(check_seed(seed), "gauss-newton-check", 0)
    dirs = [(torch.randint(0, 2, tuple(p.shape), generator=gen).to(p.dtype) * 2 - 1).to(p.device) for p in leaves.values()]
    q_h = torch.zeros(len(names), dtype=torch.float64, device=obj.device)
    q_r = torch.zeros_like(q_h)
    used = 0
    with obj._eval():
        if obj.batches and int(obj.batches[0][1].shape[0]) > 0:
            x, y = obj.batches[0]
            x, y = x[:n_samples], y[:n_samples]
            used = int(y.shape[0])
            with torch.enable_grad():
                out = forward(leaves, (x,))
                r = (torch.softmax(out.detach(), dim=1) - F.one_hot(y, out.shape[1]).to(out.dtype))
                loss = F.cross_entropy(out, y, reduction="sum")
                phi = (out * r).sum()
                params = list(leaves.values())
                for scalar, q in ((loss, q_h), (phi, q_r)):
                    grads = torch.autograd.grad(scalar, params, create_graph=True, allow_unused=True)
                    for t, (g, d, p) in enumerate(zip(grads, dirs, params)):
                        if g is None or not g.requires_grad:
                            continue
                        (hd,) = torch.autograd.grad((g * d).sum(), p, retain_graph=True, allow_unused=True)
                        if hd is not None:
                            q[t] = (hd.double() * d.double()).sum()
                    del grads
    summed = torch.cat([q_h, q_r, torch.tensor([float(used)], dtype=torch.float64, device=obj.device)])
    D.all_reduce_sum(obj.ctx, summed)  # one collective: both forms and the sample count
    summed = summed.cpu()
    q_h, q_r, used_t = summed[:len(names)], summed[len(names):-1], summed[-1]
    q_g = q_h - q_r
    scale = torch.maximum(q_g.abs(), 1e-6 * q_g.abs().max().clamp_min(1e-300))
    ratio = torch.where(q_r == 0, torch.zeros_like(q_r), q_r.abs() / scale)
    return PiecewiseLinearCheck(names=names, q_r=q_r, q_g=q_g, ratio=ratio, rtol=float(rtol),
                                n_samples=int(used_t), seed=seed)


def _not_piecewise_linear(check: PiecewiseLinearCheck) -> FlatlensError:
    return FlatlensError(
        f"the Gauss-Newton trace is exact only for piecewise-linear networks, and here tensor {check.worst!r} has "
        f"curvature of its own (|D'R D| / D'G D = {check.max_ratio:.2g} > {check.rtol:g}; GroupNorm/LayerNorm, "
        "smooth activations and weight normalisation do this); use trace method 'krylov'")


class _Steps:
    """The per-sample step of :func:`hessian_diagonal`, and for ``auto`` the choice between its two forms.

    ``auto`` runs ``vmap`` on two chunks and ``loop`` on two samples (the first of each warms up; all of
    them count towards the result) and keeps whichever took less time per sample in its second run.
    Which wins depends on the model and the device: on a 2-core CPU ``vmap`` was 3x faster for a small
    BN-CNN and about 5x slower for ResNet-18, whose per-sample conv weight gradients vmap batches poorly.
    A ``vmap`` failure before any chunk succeeded (an op it cannot batch) leaves ``loop``, saying why.
    """

    def __init__(self, obj: Any, per_sample: str, chunk: int | None) -> None:
        if per_sample not in PER_SAMPLE_MODES:
            raise FlatlensError(f"per_sample={per_sample!r}; pass one of {', '.join(PER_SAMPLE_MODES)}")
        self.forward = make_forward_fn(obj.model)
        self.leaves = _leaves(obj)
        self.params = _detached(self.leaves)  # the same tensors without autograd, for torch.func
        self.size = _chunk_size(self.leaves, chunk)
        self.part = [torch.zeros_like(p) for p in self.leaves.values()]  # one step's squares, model dtype
        self.asked = per_sample
        forms = ["vmap", "loop"] if per_sample == "auto" else [per_sample]
        self.trials = [f for f in forms for _ in range(2)]  # each form twice; the second run is timed
        self.mode = forms[0]
        self.per_sample_s: dict[str, float] = {}
        self.columns = 0  # kept columns of the last step
        self.columns_per_sample = 1.0
        self.vmapped = False
        self.failed = ""

    RESUMED = ("trials", "mode", "per_sample_s", "columns_per_sample", "vmapped", "failed")
    """What a resumed diagonal restores, so the remaining samples go through the forms the killed run chose."""

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RESUMED}

    def restore(self, state: dict[str, Any]) -> None:
        for k in self.RESUMED:
            setattr(self, k, state[k])

    @property
    def used(self) -> str:
        """The form the bulk of the samples went through (what is stored as ``per_sample``)."""
        return f"loop (vmap failed: {self.failed})" if self.failed else self.mode

    @property
    def selection(self) -> str:
        """How ``auto`` chose (empty unless it timed both forms)."""
        if len(self.per_sample_s) < 2:
            return ""
        return "timed: " + ", ".join(f"{k} {1e3 * v:.3g} ms/sample" for k, v in sorted(self.per_sample_s.items()))

    def run(self, x: Tensor, start: int) -> int:
        """Squares of the samples from ``x[start]`` on into ``self.part``; returns how many samples were done."""
        while True:
            mode = self.trials[0] if self.trials else self.mode
            X = x[start:start + (self.size if mode == "vmap" else 1)]
            if self.trials:  # timed: on a GPU, wait for the work queued before and inside the call
                sync_device(X.device)
            t0 = time.perf_counter()
            try:
                self.columns = (_vmap_squares(self.forward, self.params, X, self.part) if mode == "vmap"
                                else _sample_squares(self.forward, self.leaves, X, self.part))
            except (RuntimeError, NotImplementedError) as err:
                if mode == "loop":
                    raise
                if self.asked == "vmap" or self.vmapped:
                    raise FlatlensError(f"per_sample='vmap' failed on this model ({_first_line(err)}); "
                                        "pass per_sample='loop'") from err
                self.failed, self.mode = _first_line(err), "loop"
                self.trials = [t for t in self.trials if t == "loop"]
                continue
            if self.trials:
                sync_device(X.device)
            seconds = time.perf_counter() - t0
            self.vmapped |= mode == "vmap"
            self.columns_per_sample = max(1.0, self.columns / X.shape[0])
            if self.trials:
                self.trials.pop(0)
                if mode not in self.trials:  # the second (warm) run of this form
                    self.per_sample_s[mode] = seconds / X.shape[0]
                if not self.trials:  # timing done: the faster form does the rest
                    self.mode = min(self.per_sample_s, key=self.per_sample_s.__getitem__)
            return int(X.shape[0])


SAVE_EVERY = 30.0
"""Seconds between saves of the partial diagonal to an open journal (a save writes one float64 vector)."""


def hessian_diagonal(obj: Any, *, check: bool = True, check_samples: int = 2, check_rtol: float = 1e-3, seed: int = 0,
                     per_sample: str = "auto", chunk: int | None = None,
                     progress: Callable[[int], Any] | None = None, save_every: float | None = None) -> GaussNewtonDiagonal:
    """The exact Hessian diagonal of ``obj`` (an :class:`~flatlens.measure.objective.Objective`) via ``diag(G)``.

    Args:
        check: run :func:`check_piecewise_linear` first and raise if the identity does not hold (pass
            ``False`` only for a network known to be piecewise linear; the result is then ``diag(G)``).
        check_samples, check_rtol: samples and tolerance of that check.
        seed: seeds the check's directions (the diagonal itself uses no randomness).
        per_sample: one of :data:`PER_SAMPLE_MODES`: ``vmap`` batches the per-sample products with
            ``torch.func``, ``loop`` runs batch-1 backward passes, ``auto`` (default) times both on the
            first samples and keeps the faster (see :class:`_Steps`). The result is the same to rounding.
        chunk: samples per ``vmap`` chunk (default: what fits 256 MiB of per-sample gradients).
        progress: called with the number of samples just done (for a progress bar over samples).
        save_every: inside :meth:`Objective.journal <flatlens.measure.objective.Objective.journal>`, seconds
            (default :data:`SAVE_EVERY`) between saves of the partial sum (one float64 parameter-sized
            vector) to the journal; a rerun in the same journal goes on from the last saved sample, in the
            forms (vmap/loop) the killed run chose, so the diagonal is the uninterrupted run's bitwise.
            Under torch.distributed every rank saves and resumes its own partial sum (its own samples until
            the final all-reduce), so the folder must be one every rank reaches (a shared file system); a
            rank that finds no state of its own sums its samples afresh.

    Under torch.distributed each rank does its own samples and the diagonal is all-reduced.
    """
    from flatlens.checkpoint import Run
    from flatlens.measure.objective import Objective, require_objective

    if not isinstance(obj, (Objective, torch.nn.Module, Run)):
        raise FlatlensError("the Gauss-Newton diagonal needs an Objective (a model, its samples and the "
                            "cross-entropy); for an operator use trace method 'krylov'")
    require_objective(obj, "the Gauss-Newton diagonal")
    steps = _Steps(obj, per_sample, chunk)
    t0 = time.perf_counter()
    pl = None
    if check:
        pl = check_piecewise_linear(obj, n_samples=check_samples, rtol=check_rtol, seed=seed)
        if not pl.passed:
            raise _not_piecewise_linear(pl)
    diag = torch.zeros(obj.space.numel, dtype=torch.float64, device=obj.device)  # summed in float64
    n_backward = 0
    at = (0, 0)  # (batch, first sample not yet in diag)
    journal = getattr(obj, "_journal", None)
    per_rank = obj.ctx.distributed  # each rank sums its own samples until the final all-reduce
    key = {"n_samples": obj.n_samples, "numel": obj.space.numel, "per_sample": per_sample, "size": steps.size,
           "batches": [int(y.shape[0]) for _, y in obj.batches], "rank": obj.ctx.rank, "world": obj.ctx.world_size}
    saved = journal.load_state("gauss_newton", per_rank=per_rank) if journal is not None else None
    resumed = 0
    if saved is not None and saved.get("key") == key:  # a killed run's partial sum: go on from its last sample
        diag.copy_(saved["diag"])
        n_backward, at, resumed = int(saved["n_backward"]), tuple(saved["at"]), int(saved["done"])
        steps.restore(saved["steps"])
        if progress is not None and resumed:
            progress(resumed)

    def save(done: int) -> None:
        journal.save_state("gauss_newton", {"key": key, "diag": diag.cpu(), "n_backward": n_backward,
                                            "at": list(at), "done": done, "steps": steps.state()}, per_rank=per_rank)

    save_every = SAVE_EVERY if save_every is None else save_every
    done_total, last_save = resumed, time.monotonic()
    with obj._eval():
        for b in range(at[0], len(obj.batches)):
            x = obj.batches[b][0]
            start = at[1] if b == at[0] else 0
            while start < x.shape[0]:
                done = steps.run(x, start)
                n_backward += steps.columns
                diag += torch.cat([a.reshape(-1) for a in steps.part]).double()
                start += done
                done_total += done
                at = (b, start) if start < x.shape[0] else (b + 1, 0)
                if journal is not None and time.monotonic() - last_save >= save_every:
                    save(done_total)
                    last_save = time.monotonic()
                if progress is not None:
                    progress(done)
    D.all_reduce_sum(obj.ctx, diag)
    nb = torch.tensor([float(n_backward), float(resumed)], dtype=torch.float64, device=obj.device)
    D.all_reduce_sum(obj.ctx, nb)  # over all ranks: backward passes, and samples taken from saved states
    diag /= obj.n_samples
    if not math.isfinite(float(diag.sum())):
        raise FlatlensError("the Gauss-Newton diagonal is not finite (the model produced inf/nan logits); "
                            "check the checkpoint")
    return GaussNewtonDiagonal(diagonal=diag, check=pl, n_backward=int(nb[0]), n_samples=obj.n_samples,
                               seconds=time.perf_counter() - t0, per_sample=steps.used, selection=steps.selection,
                               resumed_samples=int(nb[1]))


def _detached(leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    """The parameters as plain tensors for ``torch.func`` (which tracks its own gradients)."""
    return {k: v.detach() for k, v in leaves.items()}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def predicted_seconds(obj: Any, *, per_sample: str = "auto", chunk: int | None = None) -> float:
    """Predicted wall-clock of :func:`hessian_diagonal` on ``obj``: its per-sample step timed, times this
    rank's samples.

    Runs the timing :func:`hessian_diagonal` starts with (each form twice on the first samples; ``auto``
    both forms) and scales the faster per-sample time; adds the check's ``2 (1 + tensors)`` backward
    passes at the timed cost per sample and column.
    """
    steps = _Steps(obj, per_sample, chunk)
    x = obj.batches[0][0]
    with obj._eval():
        start = 0
        while steps.trials:
            start = 0 if start >= x.shape[0] else start
            start += steps.run(x, start)
    best = min(steps.per_sample_s.values())
    return best * obj.n_local + 2 * (1 + len(steps.part)) * best / steps.columns_per_sample


