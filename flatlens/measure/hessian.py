"""Hessian analysis of an Objective: extreme eigenvalues, traces (total, per layer, QGen noise terms), density.

The notebook API (every function takes an :class:`~flatlens.measure.objective.Objective` and returns a
small result object with values, error bars, costs and provenance)::

    import flatlens as fl
    obj = fl.Objective(fl.load_checkpoint("runs/qat/model.pt"), split="target", samples=1024, space="dequant")
    eig = fl.hessian.eigenvalues(obj, k=5, k_bottom=1, tol=1e-3)   # Lanczos, certified by residuals
    tr = fl.hessian.trace(obj, rtol=0.01)                           # krylov, with a 95 % CI + per-layer traces
    dens = fl.hessian.density(obj, n_probes=3, n_steps=30)          # SLQ, Gaussian-smoothed
    fl.hessian.write("analysis.h5", eig, tr, dens)                  # the /hessian group `flatlens sharpness` writes
    sp = fl.hessian.spectrum(obj, 3, 30, k=5)                       # the three sharing the SLQ runs; sp.write(path)
    stored = fl.hessian.read("analysis.h5")

What each function does (the maths and error statements are in :mod:`flatlens.measure.linalg` and
:mod:`flatlens.measure.trace_estimators`):

* :func:`eigenvalues` -- the ``k`` largest and ``k_bottom`` smallest eigenvalues in ONE Lanczos run with
  full reorthogonalisation. It stops when every Ritz residual satisfies ``r <= tol |theta| / (1 + tol)``
  (bottom values: or ``r <= tol max|theta|``, since the bottom of a Hessian spectrum is a bulk near zero),
  so each returned value is within ``r`` of an eigenvalue: the relative error ``r / (|theta| - r)`` is
  *certified* to be at most ``tol``.
* :func:`power_iteration` -- PyHessian's deflated power iteration, step for step, for comparisons
  (uncertified: it stops when the Rayleigh quotient changes by less than ``tol``).
* :func:`trace` -- Krylov-deflated Hutchinson (``krylov``, default), Hutch++, XTrace or Hutchinson with a
  95 % confidence interval and a stopping rule on its relative half-width; all but XTrace also give the
  per-layer traces ``tr(H_ll)`` (diagonal blocks) from the same probes at no extra HVP, and for quantized layers the
  QGen noise term ``E[delta^T H_ll delta] / 2 = sum_c (s_c^2 / 24) tr(H_cc)`` for uniform rounding
  noise ``delta_i ~ U(-s_c/2, s_c/2)`` with the layer's (per-channel) LSQ step sizes ``s_c`` -- exact in
  expectation for the quadratic model (per-channel diagonal blocks, no approximation of the step).
  ``method="gauss-newton"``: all of these EXACTLY for piecewise-linear networks, from ``diag(H) =
  diag(GGN)`` with per-sample backward passes and no probe (:mod:`flatlens.measure.gauss_newton`).
* :func:`layer_traces` -- :func:`trace` with a stopping rule on every layer's interval.
* :func:`density` -- stochastic Lanczos quadrature (``n_probes`` x ``n_steps`` HVPs, all probes of a
  step in one data pass) smoothed with a Gaussian kernel; works on torch 2.x (PyHessian 0.1's does not).
* :func:`spectrum` -- all three from the density's Lanczos runs: certified eigenvalues from its first
  probe (continued if needed), and a trace whose exact part is that probe's Krylov space, so every
  trace HVP goes to residual probes (``flatlens sharpness`` runs this when they are requested together).

What is differentiated is recorded in every result (``provenance["differentiated"]``): the float
model; for a quantized model in ``latent`` space the *straight-through surrogate* (the true loss is
piecewise constant in the latent weights; the HVP is the float Hessian at ``w_q`` restricted to the
unclipped weights), in ``dequant`` space the float copy holding ``w_q``, in ``scales`` space the
surrogate's Hessian in the LSQ step sizes (``J^T H J`` with ``J = d w_hat / d s``; LSQ's gradient scale, a
training preconditioner, is off while measuring). BatchNorm is in eval mode. The ``flatlens sharpness``
options of these measures live in :mod:`flatlens.measure.hessian_cli`.

Randomness: every start and probe vector comes from a CPU generator seeded by
``flatlens.seeding.generator(seed, <measure>, 0)`` (``"hessian"``, ``"trace"``, ``"density"``,
``"power_iteration"``), so a seed gives bitwise the same result on the same device, HVP kernel and
torch thread count (CPU kernels sum in a thread-dependent order; ``<prefix>torch_threads`` is stored).
No side effects: the model state (parameters, buffers, ``.grad``, ``requires_grad``, training flags) is
verified bit-identical after every call and the global RNG is never drawn from.

Storage (``write``/``read``; layout in README.md, "The ``/hessian`` group"): the three measures share the ONE
group ``/hessian``. A write replaces only the datasets and the prefixed attributes (``eigenvalue_*``,
``trace_*``/``layer_*``/``quant_*``, ``density_*``) of its own measure and keeps the others, unless the
shared provenance (split, samples, parameter set, space, checkpoint, seed -- :data:`SHARED_KEYS`)
differs, in which case the whole group is replaced. Writes are atomic (copy, fsync, rename).

Besides an Objective, every function accepts a
:class:`~flatlens.measure.hvp.HessianVectorProduct`, a
:class:`~flatlens.measure.linalg.SymmetricOperator` or a dense symmetric tensor (tests, custom losses);
per-layer and quantization terms then need ``blocks=``/are not available.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from flatlens import store
from flatlens.errors import FlatlensError
from flatlens.measure import linalg as L
from flatlens.measure import memory
from flatlens.measure import trace_estimators as T
from flatlens.measure.params import SideEffectError
from flatlens.seeding import check_seed, generator as seeded_generator

__all__ = [
    "EigenResult", "PowerResult", "TraceEstimate", "LayerTraces", "QuantNoise", "DensityResult",
    "SpectrumResult", "EIG_STARTS", "eigenvalues", "power_iteration", "trace", "layer_traces", "density", "spectrum",
    "write", "read", "GROUP", "SHARED_KEYS",
]

GROUP = "hessian"
"""The HDF5 group every Hessian measure writes into."""

SHARED_KEYS = (
    "split", "n_samples", "subset_sha256", "space", "param_names", "param_shapes", "dtype", "bn_mode",
    "differentiated", "checkpoint_sha256", "select_include", "select_select", "select_exclude", "seed",
)
"""Attributes of ``/hessian`` that all its measures share; a write with other values replaces the group."""

_PER_MEASURE = ("hvp_kernel", "world_size", "device", "torch_threads", "replayed_hvp")
"""Provenance that may differ between the measures of one group: stored as ``<prefix><key>``."""

Progress = Callable[[int], Any]
"""``progress(n)``: called with the number of HVPs just spent (for progress bars)."""


# --------------------------------------------------------------------------------------------------
# Sources: an Objective, or any symmetric operator
# --------------------------------------------------------------------------------------------------


def summary_repr(name: str, rows: Sequence[tuple[str, str]]) -> str:
    """``name`` over the summary ``rows`` (label, value), one per line, labels aligned."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join([name] + [f"  {label:<{width}}  {value}" for label, value in rows])


@dataclass
class _Source:
    op: L.SymmetricOperator
    provenance: dict[str, Any]
    root: dict[str, Any]
    obj: Any = None

    def __post_init__(self) -> None:
        # bitwise reproducibility holds per thread count (CPU kernels sum in a thread-dependent order)
        self.provenance.setdefault("torch_threads", torch.get_num_threads())

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Verify afterwards: model state bit-identical (Objective only) and the global RNG untouched."""
        rng = torch.get_rng_state()
        ctx = self.obj.space.guard() if self.obj is not None else nullcontext()
        replayed = getattr(self.obj, "n_hvp_replayed", 0)
        with ctx:
            yield
        # products a resumed run took from its journal (Objective.journal); counted in n_hvp like the others
        self.provenance["replayed_hvp"] = getattr(self.obj, "n_hvp_replayed", 0) - replayed
        if not torch.equal(torch.get_rng_state(), rng):
            raise SideEffectError("a Hessian measure drew from the global RNG; please report this bug")


def _root_provenance(obj: Any) -> dict[str, Any]:
    return store.checkpoint_provenance(getattr(obj, "run", None))


def _source(obj: Any, *, hvp: bool = True) -> _Source:
    """The operator and provenance of ``obj``. ``hvp=False``: a measure that spends no HVP (the
    Gauss-Newton trace), so an Objective's HVP engine is not built (no kernel selection) and no
    ``hvp_kernel`` is recorded."""
    from flatlens.measure.hvp import HessianVectorProduct
    from flatlens.measure.objective import Objective

    if isinstance(obj, Objective):
        if hvp:
            obj.hvp_engine  # build the engine (kernel selection) outside the timed part
        prov = obj.describe()
        if not hvp:
            prov.pop("hvp_kernel", None)
        return _Source(obj.operator(), prov, _root_provenance(obj), obj)
    if isinstance(obj, HessianVectorProduct):
        prov = {"source": "HessianVectorProduct", "hvp_kernel": obj.kernel, "n_params": obj.n,
                "dtype": str(obj.dtype).replace("torch.", ""), "param_names": list(obj.names),
                "param_shapes": [list(s) for s in obj.shapes]}
        return _Source(obj.as_operator(), prov, _root_provenance(None))
    from flatlens.checkpoint import Run

    if isinstance(obj, (torch.nn.Module, Run)):  # a notebook's first try: say how to wrap it
        from flatlens.measure.objective import require_objective

        require_objective(obj, "a Hessian measure", " (or an operator: an HVP engine, a SymmetricOperator, a "
                          "symmetric matrix)")
    try:
        op = L.as_operator(obj)
    except ValueError as exc:
        raise FlatlensError(f"cannot measure a {type(obj).__name__}: {exc}") from None
    prov = {"source": "operator", "n_params": op.n, "dtype": str(op.dtype).replace("torch.", "")}
    return _Source(op, prov, _root_provenance(None))


class _Counted(L.SymmetricOperator):
    """Wraps an operator to report progress after every application."""

    def __init__(self, op: L.SymmetricOperator, progress: Progress | None) -> None:
        def mv(v: Tensor) -> Tensor:
            out = op.matvec(v)
            if progress is not None:
                progress(1)
            return out

        def mm(V: Tensor) -> Tensor:
            out = op.matmat(V)
            if progress is not None:
                progress(V.shape[1])
            return out

        super().__init__(mv, op.n, dtype=op.dtype, device=op.device, matmat=mm, name=op.name)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Argument errors of the algorithms (ValueError) become one-line FlatlensErrors."""
    try:
        yield
    except ValueError as exc:
        raise FlatlensError(str(exc).splitlines()[0]) from None


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class _Stored:
    """Common fields of the results written to ``/hessian``: costs and provenance."""

    n_hvp: int
    seconds: float
    seed: int
    provenance: dict[str, Any] = field(repr=False)
    root: dict[str, Any] = field(repr=False)
    shared_hvp: int = 0
    """HVPs of another measure this result reused (:func:`spectrum`: the density's first Lanczos run);
    not counted in ``n_hvp``, which holds only this measure's own."""
    options: str = field(default="", repr=False)
    """Set by ``flatlens sharpness``: the JSON fingerprint of its settings
    (:attr:`flatlens.measure.registry.RunContext.fingerprint`), stored as ``<prefix>options`` with the summary
    rows as ``<prefix>summary``, so that a rerun with the same settings can skip this measure."""

    MEASURE: ClassVar[str] = ""
    PREFIXES: ClassVar[tuple[str, ...]] = ()
    OWNED: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        """The rows ``flatlens sharpness`` prints, which a notebook shows for a result (the numbers are the
        attributes: ``.values``, ``.estimate``, ``.grid``...; the dataclass repr ran to 3,600 characters)."""
        return summary_repr(type(self).__name__, self.summary())

    def _shared(self) -> dict[str, Any]:
        attrs = {k: v for k, v in self.provenance.items() if k not in _PER_MEASURE}
        for k in SHARED_KEYS:
            attrs.setdefault(k, "")
        attrs["seed"] = self.seed
        attrs["measure"] = GROUP
        return attrs

    def _reused(self) -> str:
        """For a summary's cost row: the density's HVPs this result reused (a bare "0 HVPs" read as free)."""
        return f" (+ {self.shared_hvp} of the density's, reused)" if self.shared_hvp else ""

    def _replayed(self) -> str:
        """For a summary's cost row: how many HVPs the run that made this result (for measures run together: the
        shared run) replayed from its journal."""
        k = int(self.provenance.get("replayed_hvp", 0))
        return f" ({k} of the run's replayed from a journal)" if k else ""

    def _costs(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}n_hvp": int(self.n_hvp), f"{prefix}seconds": float(self.seconds),
                f"{prefix}seed": int(self.seed), f"{prefix}hvp_kernel": str(self.provenance.get("hvp_kernel", "")),
                f"{prefix}world_size": int(self.provenance.get("world_size", 1)),
                f"{prefix}device": str(self.provenance.get("device", "")),
                f"{prefix}torch_threads": int(self.provenance.get("torch_threads", 0)),
                f"{prefix}shared_hvp": int(self.shared_hvp),
                f"{prefix}replayed_hvp": int(self.provenance.get("replayed_hvp", 0)),
                f"{prefix}written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def to_store(self) -> tuple[dict[str, Any], dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self) -> list[tuple[str, str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, path: str | Path, *, replace: bool = False) -> Path:
        """Write (merge) this result into ``path:/hessian``; see :func:`write`."""
        return write(path, self, replace=replace)


@dataclass(repr=False)
class EigenResult(_Stored):
    """Extreme eigenvalues from one Lanczos run.

    ``values``: the ``k`` largest (descending); ``bottom``: the ``k_bottom`` smallest (ascending).
    ``residuals``: Ritz residual norms ``||H y - theta y||``; some eigenvalue lies within each residual
    of its value (the certificate); ``rel_error_bound = r / (|theta| - r)``. ``converged``: the
    stopping rule (``r <= tol |theta| / (1 + tol)``; bottom values also ``r <= tol max|theta|``) held.
    ``gap_rel_error_estimate`` (top values) and ``bottom_gap_error_estimate`` (bottom values, absolute):
    the sharper ``r^2 / gap`` error *estimate*, ``gap`` taken from the other Ritz values. It is what
    ``stop="gap"`` stops on, and not a certificate: Lanczos cannot bound the gap from the right side.
    """

    values: Tensor = None  # type: ignore[assignment]
    residuals: Tensor = None  # type: ignore[assignment]
    rel_error_bound: Tensor = None  # type: ignore[assignment]
    converged: Tensor = None  # type: ignore[assignment]
    bottom: Tensor = None  # type: ignore[assignment]
    bottom_residuals: Tensor = None  # type: ignore[assignment]
    bottom_converged: Tensor = None  # type: ignore[assignment]
    ritz_values: Tensor = None  # type: ignore[assignment]
    gap_rel_error_estimate: Tensor = None  # type: ignore[assignment]
    bottom_gap_error_estimate: Tensor = None  # type: ignore[assignment]
    tol: float = 1e-3
    bottom_norm_tol: float | None = None
    iterations: int = 0
    restarts: int = 0
    max_iter: int | None = None
    stop: str = "residual"
    method: str = "lanczos"
    start: str = "random"
    """Lanczos start vector: ``random``, ``gradient`` (unit gradient + Rademacher) or the density's probe."""
    n_grad: int = 0
    """Gradient passes spent on the start vector (0 under ``graph_reuse``, where it comes with the graphs)."""

    MEASURE = "hessian"
    PREFIXES = ("eigenvalue_",)
    OWNED = ("eigenvalues", "eigenvalue_residuals", "eigenvalue_rel_error_bound", "eigenvalue_converged",
             "eigenvalue_gap_rel_error_estimate", "bottom_eigenvalues", "bottom_eigenvalue_residuals",
             "bottom_eigenvalue_converged", "bottom_eigenvalue_gap_error_estimate", "ritz_values")

    @property
    def k(self) -> int:
        return int(self.values.numel())

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all()) and bool(self.bottom_converged.all())

    def to_store(self) -> tuple[dict[str, Any], dict[str, Any]]:
        ds: dict[str, Any] = {
            "eigenvalues": _f64(self.values), "eigenvalue_residuals": _f64(self.residuals),
            "eigenvalue_rel_error_bound": _f64(self.rel_error_bound),
            "eigenvalue_converged": self.converged.cpu().numpy().astype(bool),
            "eigenvalue_gap_rel_error_estimate": _f64(self.gap_rel_error_estimate),
            "ritz_values": _f64(self.ritz_values),
        }
        if self.bottom.numel():
            ds.update(bottom_eigenvalues=_f64(self.bottom), bottom_eigenvalue_residuals=_f64(self.bottom_residuals),
                      bottom_eigenvalue_converged=self.bottom_converged.cpu().numpy().astype(bool),
                      bottom_eigenvalue_gap_error_estimate=_f64(self.bottom_gap_error_estimate))
        attrs = {**self._shared(), **self._costs("eigenvalue_"), "eigenvalue_method": self.method,
                 "eigenvalue_tol": float(self.tol), "eigenvalue_k": self.k, "eigenvalue_k_bottom": int(self.bottom.numel()),
                 "eigenvalue_bottom_norm_tol": self.bottom_norm_tol, "eigenvalue_stop": self.stop,
                 "eigenvalue_iterations": int(self.iterations), "eigenvalue_restarts": int(self.restarts),
                 "eigenvalue_max_iter": self.max_iter, "eigenvalue_all_converged": self.all_converged,
                 "eigenvalue_start": self.start, "eigenvalue_n_grad": int(self.n_grad)}
        return ds, attrs

    @property
    def at_rounding_floor(self) -> bool:
        """True when a top value was accepted at the noise floor ``100 eps max|theta|`` (Lanczos' default
        ``atol``), not at ``tol``: its certified bound is then above ``tol`` (e.g. ``tol=1e-6`` on a
        float32 model, whose floor is ~1e-5 relative). Only the residual rule compares bounds with tol."""
        return (self.stop == "residual" and self.rel_error_bound.numel() > 0
                and float(self.rel_error_bound.max()) > self.tol * (1 + 1e-9))

    def summary(self) -> list[tuple[str, str]]:
        rows = []
        gap = self.stop == "gap"  # then also show the estimate it stopped on
        for i, (v, e, g) in enumerate(zip(self.values.tolist(), self.rel_error_bound.tolist(),
                                          self.gap_rel_error_estimate.tolist())):
            est = f"rel. error ~ {g:.1e} estimated (r^2/gap), <= {e:.1e} certified" if gap else \
                f"rel. error <= {e:.1e} certified"
            rows.append((f"lambda_{i + 1}", f"{v:.6g}  ({est})"))
        for i, (v, r, g) in enumerate(zip(self.bottom.tolist(), self.bottom_residuals.tolist(),
                                          self.bottom_gap_error_estimate.tolist())):
            est = f"± {g:.1e} estimated (r^2/gap), ± {r:.1e} certified" if gap else f"± {r:.1e} certified"
            rows.append((f"lambda_min{'' if i == 0 else f'+{i}'}", f"{v:.6g}  ({est})"))
        state = "converged" if self.all_converged else "NOT converged (raise --eig-max-iter or --tol)"
        if self.all_converged and self.at_rounding_floor:
            state = ("converged to the rounding floor 100 eps max|theta| of the model's dtype, which is above "
                     "tol: the HVPs cannot certify a smaller error (float64 can: --dtype float64, or dtype= of the Objective)")
        grad = f" + {self.n_grad} gradient" if self.n_grad else ""
        rows.append(("eigenvalue cost", f"{self.n_hvp} HVPs{self._reused()}{self._replayed()}{grad}, {self.seconds:.2f} s, tol {self.tol:g}, "
                                        f"{self.start} start, {state}"))
        return rows


@dataclass
class PowerResult:
    """PyHessian-style power iteration (uncertified; for comparisons only, never written)."""

    values: Tensor
    iterations: list[int]
    converged: Tensor
    n_hvp: int
    seconds: float
    seed: int
    tol: float
    max_iter: int
    provenance: dict[str, Any] = field(repr=False, default_factory=dict)
    method: str = "power_iteration"


@dataclass
class QuantNoise:
    """QGen's second-order quantization-noise term per quantized layer.

    For rounding noise ``delta_i ~ U(-s_c/2, s_c/2)`` (independent; ``s_c`` the LSQ step of the output
    channel holding weight ``i``), ``E[delta^T H_ll delta] / 2 = sum_c (s_c^2 / 24) tr(H_cc)`` with
    ``H_cc`` the per-channel diagonal blocks of the layer's weight Hessian: ``noise_terms`` (estimated
    from the same probes as the traces, with ``stderr`` and a 95 % CI). ``weight_traces``: ``tr(H_ww)``
    of the weight tensor; ``step_rms``: ``sqrt(mean_c s_c^2)``, so a per-tensor step gives
    ``noise = step_rms^2 / 24 * weight_trace`` exactly.
    """

    names: list[str]
    weights: list[str]
    noise_terms: Tensor
    stderr: Tensor
    ci_low: Tensor
    ci_high: Tensor
    weight_traces: Tensor
    step_rms: Tensor
    bits: list[int]
    per_channel: list[bool]
    enabled: list[bool]

    @property
    def total(self) -> float:
        return float(self.noise_terms.sum())


@dataclass
class LayerTraces:
    """Traces of the diagonal blocks ``tr(H_ll)`` (one per layer or per parameter tensor).

    ``estimates = exact + mean(samples)`` (Hutch++: ``exact`` is the low-rank part of the block, the
    samples are the block's share of the deflated residual; Hutchinson: ``exact`` = 0). CIs are
    Student-t over the probes. ``estimates.sum()`` equals the total trace estimate.
    """

    names: list[str]
    by: str
    numel: list[int]
    estimates: Tensor
    stderr: Tensor
    ci_low: Tensor
    ci_high: Tensor
    exact: Tensor
    samples: Tensor
    converged: Tensor
    rtol: float | None
    quant: QuantNoise | None = None


@dataclass(repr=False)
class TraceEstimate(_Stored):
    """A trace estimate with a confidence interval (and per-layer traces when available).

    ``estimate = exact_part + mean(samples)`` for Hutch++ (``samples`` the deflated residual samples)
    and Hutchinson (``exact_part`` = 0); for XTrace the mean of its exchangeable estimates.
    ``converged``: the CI half-width met ``rtol`` (and every layer's ``layer_rtol`` when given).
    """

    estimate: float = math.nan
    stderr: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    level: float = 0.95
    samples: Tensor = None  # type: ignore[assignment]
    method: str = "krylov"
    rtol: float | None = 0.01
    max_hvp: int = 100
    converged: bool = False
    exact_part: float = 0.0
    sketch_size: int = 0
    layers: LayerTraces | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """Method-specific facts, stored as ``trace_<key>`` attributes (gauss-newton: its check, backward passes)."""

    MEASURE = "trace"
    PREFIXES = ("trace_", "layer_", "quant_")
    OWNED = ("trace", "trace_samples", "trace_stderr", "trace_ci", "layer_names", "layer_traces",
             "layer_trace_stderr", "layer_trace_ci", "layer_trace_exact", "layer_trace_samples",
             "layer_trace_converged", "layer_numel", "quant_layer_names", "quant_weight_names", "quant_noise_terms",
             "quant_noise_stderr", "quant_noise_ci", "quant_weight_traces", "quant_step_rms")

    @property
    def half_width(self) -> float:
        return 0.5 * (self.ci_high - self.ci_low)

    @property
    def rel_half_width(self) -> float:
        if self.half_width == 0:  # an exact trace, 0 included (0/0 would read as an infinite error)
            return 0.0
        return self.half_width / abs(self.estimate) if self.estimate else math.inf

    def to_store(self) -> tuple[dict[str, Any], dict[str, Any]]:
        ds: dict[str, Any] = {"trace": np.float64(self.estimate), "trace_samples": _f64(self.samples),
                              "trace_stderr": np.float64(self.stderr),
                              "trace_ci": np.array([self.ci_low, self.ci_high], dtype=np.float64)}
        attrs = {**self._shared(), **self._costs("trace_"), "trace_method": self.method, "trace_rtol": self.rtol,
                 "trace_level": float(self.level), "trace_max_hvp": int(self.max_hvp),
                 "trace_converged": bool(self.converged), "trace_exact_part": float(self.exact_part),
                 "trace_sketch_size": int(self.sketch_size), "trace_rel_half_width": float(self.rel_half_width),
                 **{f"trace_{k}": v for k, v in self.details.items()}}
        lt = self.layers
        if lt is not None:
            ds.update(layer_names=list(lt.names), layer_traces=_f64(lt.estimates), layer_trace_stderr=_f64(lt.stderr),
                      layer_trace_ci=np.stack([_f64(lt.ci_low), _f64(lt.ci_high)], axis=1),
                      layer_trace_exact=_f64(lt.exact), layer_trace_samples=_f64(lt.samples),
                      layer_trace_converged=lt.converged.cpu().numpy().astype(bool),
                      layer_numel=np.asarray(lt.numel, dtype=np.int64))
            attrs.update(layer_by=lt.by, layer_rtol=lt.rtol)
            q = lt.quant
            if q is not None and q.names:
                ds.update(quant_layer_names=list(q.names), quant_weight_names=list(q.weights),
                          quant_noise_terms=_f64(q.noise_terms), quant_noise_stderr=_f64(q.stderr),
                          quant_noise_ci=np.stack([_f64(q.ci_low), _f64(q.ci_high)], axis=1),
                          quant_weight_traces=_f64(q.weight_traces), quant_step_rms=_f64(q.step_rms))
                attrs.update(quant_bits=list(q.bits), quant_per_channel=[int(x) for x in q.per_channel],
                             quant_enabled=[int(x) for x in q.enabled], quant_total_noise_term=q.total,
                             quant_noise_model="uniform rounding noise U(-s/2, s/2), independent: sum_c s_c^2/24 tr(H_cc)")
        return ds, attrs

    def summary(self) -> list[tuple[str, str]]:
        pct = 100 * self.rel_half_width
        state = "" if self.converged else f"; rtol {self.rtol} NOT met within {self.max_hvp} HVPs"
        if self.method == "gauss-newton":
            d = self.details
            check = (f"checked: max |D'RD|/D'GD {d['check_max_ratio']:.1e} <= {d['check_rtol']:g}"
                     if d.get("check") else "NOT checked")
            rows = [("trace", f"{self.estimate:.6g} (exact: Gauss-Newton identity of a piecewise-linear net; {check})")]
        else:
            rows = [("trace", f"{self.estimate:.6g} ± {self.half_width:.3g} ({100 * self.level:.0f}% CI, "
                              f"±{pct:.2f}%){state}")]
        if self.layers is not None:
            lt = self.layers
            top = int(torch.argmax(lt.estimates.abs())) if lt.estimates.numel() else 0
            rows.append((f"{lt.by} traces", f"{len(lt.names)} {lt.by}s; largest {lt.names[top]}: "
                         f"{float(lt.estimates[top]):.4g} ± {float(lt.ci_high[top] - lt.estimates[top]):.2g}"))
            if lt.quant is not None and lt.quant.names:
                rows.append(("QGen noise term", f"sum_l s_l^2/24 tr(H_l) = {lt.quant.total:.4g} over {len(lt.quant.names)} "
                             "quantized layers"))
        extra = (f", {self.details['n_backward']} per-sample vector-Jacobian products ({self.details.get('per_sample')})"
                 if "n_backward" in self.details else "")
        if self.details.get("resumed_samples"):
            extra += f" ({self.details['resumed_samples']} samples from a killed run's journal)"
        rows.append(("trace cost", f"{self.n_hvp} HVPs{self._reused()}{self._replayed()}{extra}, {self.seconds:.2f} s, {self.method}"))
        return rows


@dataclass(repr=False)
class DensityResult(_Stored):
    """Spectral density by SLQ: ``values`` on ``grid``, from quadrature ``nodes``/``weights``.

    The curve integrates to 1 when the grid resolves the kernel (the default: 1001 points, spacing about
    ``sigma / 9``) and covers the nodes; :attr:`grid_mass` says how well this one does.
    """

    grid: Tensor = None  # type: ignore[assignment]
    values: Tensor = None  # type: ignore[assignment]
    nodes: Tensor = None  # type: ignore[assignment]
    weights: Tensor = None  # type: ignore[assignment]
    sigma: float = math.nan
    n_probes: int = 0
    n_steps: int = 0
    spectrum_bounds: tuple[float, float] = (math.nan, math.nan)
    trace_samples: Tensor = None  # type: ignore[assignment]
    method: str = "slq"

    MEASURE = "density"
    PREFIXES = ("density_",)
    OWNED = ("density",)

    def to_store(self) -> tuple[dict[str, Any], dict[str, Any]]:
        sub = {"grid": _f64(self.grid), "values": _f64(self.values), "nodes": _f64(self.nodes),
               "weights": _f64(self.weights), "trace_samples": _f64(self.trace_samples),
               "attrs": {"sigma": float(self.sigma), "n_probes": int(self.n_probes), "n_steps": int(self.n_steps),
                         "spectrum_min": float(self.spectrum_bounds[0]), "spectrum_max": float(self.spectrum_bounds[1])}}
        attrs = {**self._shared(), **self._costs("density_"), "density_method": self.method,
                 "density_sigma": float(self.sigma), "density_n_probes": int(self.n_probes),
                 "density_n_steps": int(self.n_steps), "density_spectrum_min": float(self.spectrum_bounds[0]),
                 "density_spectrum_max": float(self.spectrum_bounds[1])}
        return {"density": sub}, attrs

    @property
    def grid_mass(self) -> float:
        """The smoothed curve's integral over the grid (trapezoid rule): 1 up to ~1e-6 on the default grid;
        less on a grid coarser than ``sigma`` or one that leaves out part of the spectrum."""
        if self.grid.numel() < 2:
            return math.nan
        return float(torch.trapezoid(self.values.double(), self.grid.double()))

    def summary(self) -> list[tuple[str, str]]:
        lo, hi = self.spectrum_bounds
        rows = [("spectrum", f"[{lo:.4g}, {hi:.4g}] ({self.n_probes} probe{'s' if self.n_probes != 1 else ''} x {self.n_steps} steps, sigma {self.sigma:.3g})")]
        mass = self.grid_mass
        if not abs(mass - 1.0) <= 0.01:
            h = float((self.grid[1:] - self.grid[:-1]).abs().max()) if self.grid.numel() > 1 else math.nan
            rows.append(("density curve", f"integrates to {mass:.3g} on this grid (spacing up to {h:.3g}, sigma "
                         f"{self.sigma:.3g}): refine --density-grid or widen --density-sigma; the stored nodes and "
                         "weights are exact"))
        rows.append(("density cost", f"{self.n_hvp} HVPs{self._replayed()}, {self.seconds:.2f} s"))
        return rows


# --------------------------------------------------------------------------------------------------
# Eigenvalues
# --------------------------------------------------------------------------------------------------


def eigenvalues(obj: Any, k: int = 1, k_bottom: int = 0, *, tol: float = 1e-3, seed: int = 0,
                max_iter: int | None = None, stop: str = "residual", bottom_norm_tol: float | None = None,
                start: str = "auto", progress: Progress | None = None) -> EigenResult:
    """The ``k`` largest and ``k_bottom`` smallest Hessian eigenvalues, certified, in one Lanczos run.

    Stops when every wanted Ritz residual is ``<= tol * |theta| / (1 + tol)``, so the certified relative
    error ``r / (|theta| - r)`` is at most ``tol`` (the true error is usually ~``r^2 / gap``, far
    smaller); the ``k_bottom`` values also accept
    ``r <= bottom_norm_tol * max|theta|`` (default ``tol``). ``max_iter`` caps the HVPs (default
    ``max(50, 4 (k + k_bottom) + 20)``; the Lanczos basis holds that many parameter-sized vectors).
    ``stop="gap"`` stops on the sharper but uncertified ``r^2 / gap`` estimate.

    ``start`` picks the Lanczos start vector: ``"random"`` (Rademacher), ``"gradient"`` (the unit
    gradient plus that Rademacher vector, normalised) or ``"auto"`` (``"gradient"`` when top
    eigenvalues alone are asked for from an Objective, ``"random"`` when ``k_bottom`` asks for the
    bottom too or ``obj`` is a bare operator). Near a minimum the gradient is about
    ``H (theta - theta*)``, one free power step towards the top of the spectrum, so the top
    eigenvalues are certified in fewer HVPs (measured for k = 1, 3, 5, 10 in README); the random half
    keeps every eigendirection in the start.
    The gradient costs nothing under the ``graph_reuse`` kernel (it comes with the retained graphs)
    and one forward+backward otherwise (``n_grad``). Same certificate either way.
    """
    seed = check_seed(seed)
    src = _source(obj)
    if bottom_norm_tol is None and k_bottom:
        bottom_norm_tol = tol
    op = _Counted(src.op, progress)
    with src.guard(), _user_errors():
        t0 = time.perf_counter()
        gen = seeded_generator(seed, "hessian", 0)
        v0, start, n_grad = _start_vector(src, start, k, k_bottom, gen)
        res = L.lanczos_eigenvalues(op, k_top=k, k_bottom=k_bottom, tol=tol, max_iter=max_iter, stop=stop,
                                    generator=gen, v0=v0, bottom_norm_tol=bottom_norm_tol)
        seconds = time.perf_counter() - t0
    return _eigen_result(res, src, op.n_matvec, seconds, seed, tol, bottom_norm_tol, max_iter, stop, start=start,
                         n_grad=n_grad)


EIG_STARTS = ("auto", "random", "gradient")
"""Start vectors :func:`eigenvalues` can use."""


def resolved_start(start: str, k_bottom: int, *, has_objective: bool = True) -> str:
    """The start ``auto`` stands for: ``gradient`` for top eigenvalues only (measured in the README's "Starting
    from the gradient"), ``random`` with ``k_bottom`` (it favours no end of the spectrum) or without an Objective
    (a bare operator has no gradient). Other starts are returned as they are."""
    if start == "auto":
        return "gradient" if has_objective and k_bottom == 0 else "random"
    return start


def _start_vector(src: _Source, start: Any, k: int, k_bottom: int,
                  gen: torch.Generator) -> tuple[Tensor | None, str, int]:
    """(v0 for Lanczos or None for its own Rademacher start, the start used, gradient passes spent).

    The Rademacher part is the very vector Lanczos would draw from ``gen``, so ``"gradient"`` is the
    random start plus the unit gradient, and restarts draw from the same stream either way.
    """
    if start not in EIG_STARTS:
        raise FlatlensError(f"start={start!r} is not a start vector; pass one of {', '.join(EIG_STARTS)}")
    start = resolved_start(start, k_bottom, has_objective=src.obj is not None)
    if start == "random":
        return None, start, 0
    if src.obj is None:
        raise FlatlensError("start='gradient' needs an Objective (a loss to differentiate); pass start='random' "
                            "for a bare operator")
    n = src.op.n
    g, spent = src.obj.hvp_gradient()
    z = L.rademacher(n, 1, gen, src.op.dtype, src.op.device)[:, 0] / math.sqrt(n)
    g = g.to(dtype=z.dtype, device=z.device)
    gn = L._norm(g)
    if not (gn > 0 and math.isfinite(gn)):  # at a stationary point (or a broken loss) the gradient says nothing
        return z, "random (zero or non-finite gradient)", int(spent)
    return z + g / gn, "gradient", int(spent)


def _eigen_result(res: L.LanczosResult, src: _Source, n_hvp: int, seconds: float, seed: int, tol: float,
                  bottom_norm_tol: float | None, max_iter: int | None, stop: str, **extra: Any) -> EigenResult:
    kt = res.k_top
    return EigenResult(
        n_hvp=n_hvp, seconds=seconds, seed=seed, provenance=src.provenance, root=src.root,
        values=res.values[:kt], residuals=res.residuals[:kt], rel_error_bound=res.rel_error_bound[:kt],
        converged=res.converged[:kt], bottom=res.values[kt:], bottom_residuals=res.residuals[kt:],
        bottom_converged=res.converged[kt:], ritz_values=res.ritz_values, tol=float(tol),
        gap_rel_error_estimate=res.gap_rel_error_bound[:kt], bottom_gap_error_estimate=res.gap_error_estimate[kt:],
        bottom_norm_tol=bottom_norm_tol, iterations=res.iterations, restarts=res.restarts, max_iter=max_iter, stop=stop,
        **extra)


def power_iteration(obj: Any, k: int = 1, *, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                    progress: Progress | None = None) -> PowerResult:
    """PyHessian 0.1's ``eigenvalues(maxIter, tol, top_n)`` (deflated power iteration), for comparisons.

    Uncertified: it stops when the Rayleigh quotient changes by less than ``tol`` (relative), and it
    converges to the largest-*magnitude* eigenvalue. Use :func:`eigenvalues` for measurements.
    """
    seed = check_seed(seed)
    src = _source(obj)
    op = _Counted(src.op, progress)
    with src.guard(), _user_errors():
        t0 = time.perf_counter()
        res = L.power_iteration(op, k, tol=tol, max_iter=max_iter, generator=seeded_generator(seed, "power_iteration", 0))
        seconds = time.perf_counter() - t0
    return PowerResult(values=res.values, iterations=list(res.iterations), converged=res.converged, n_hvp=op.n_matvec,
                       seconds=seconds, seed=seed, tol=float(tol), max_iter=int(max_iter), provenance=src.provenance)


# --------------------------------------------------------------------------------------------------
# Traces with per-block parts
# --------------------------------------------------------------------------------------------------


@dataclass
class _Blocks:
    """How the flat parameter vector splits: tensors, their grouping into layers, quantized weights."""

    numels: list[int]
    layer_names: list[str]
    layer_members: list[list[int]]
    by: str
    quant: list[dict[str, Any]] = field(default_factory=list)  # tensor index, channels, weights (C,), info


def _blocks_for(src: _Source, by: str, blocks: Sequence[tuple[str, int]] | None) -> _Blocks | None:
    """Blocks from the Objective's parameter space (``by`` = ``layer`` | ``tensor``), or explicit
    ``blocks`` = ``[(name, numel), ...]`` partitioning the vector in order."""
    if blocks is not None:
        names = [str(b[0]) for b in blocks]
        numels = [int(b[1]) for b in blocks]
        if sum(numels) != src.op.n or any(n < 1 for n in numels):
            raise FlatlensError(f"blocks cover {sum(numels)} entries, the operator has {src.op.n}; "
                                "pass (name, numel) pairs that partition the parameters in order")
        return _Blocks(numels, names, [[i] for i in range(len(names))], "block")
    obj = src.obj
    if obj is None or by == "none":
        return None
    if by not in ("layer", "tensor"):
        raise FlatlensError(f"layers={by!r}; pass 'layer', 'tensor' or 'none'")
    space = obj.space
    numels = [p.numel() for p in space.params]
    if by == "tensor":
        names, members = list(space.names), [[i] for i in range(len(numels))]
    else:
        names, members = [], []
        for i, name in enumerate(space.names):
            layer = name.rpartition(".")[0] or name
            if layer in names:
                members[names.index(layer)].append(i)
            else:
                names.append(layer)
                members.append([i])
    out = _Blocks(numels, names, members, by)
    from flatlens.quant import LSQQuantizer

    modules = dict(obj.model.named_modules())
    for i, name in enumerate(space.names):
        mname, _, leaf = name.rpartition(".")
        q = getattr(modules.get(mname), "weight_quantizer", None)
        if leaf != "weight" or not isinstance(q, LSQQuantizer) or not q.is_initialized():
            continue
        step = q.step_size.detach().clamp_min(q.eps).double().cpu().reshape(-1)
        p = space.params[i]
        if q.per_channel and (q.channel_dim % p.dim() != 0 or step.numel() != p.shape[0]):
            continue  # only output-channel step sizes (what attach_quantizers builds) are supported
        out.quant.append({"tensor": i, "layer": mname, "weight": name, "channels": step.numel(),
                          "w": step**2 / 24.0, "step_rms": float(step.pow(2).mean().sqrt()), "bits": q.bits,
                          "per_channel": bool(q.per_channel), "enabled": q.is_enabled()})
    return out


class _Accumulator:
    """Per-tensor, per-layer and per-quantized-layer sums of coordinate products ``x_i y_i``."""

    def __init__(self, blocks: _Blocks) -> None:
        self.b = blocks

    def __call__(self, P: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``P`` (n x c): returns (layers x c, quant layers x c) float64 sums over each block's coordinates."""
        c = P.shape[1]
        chunks = torch.split(P, self.b.numels, dim=0)
        per_t = [ch.double().sum(dim=0) for ch in chunks]
        layers = torch.stack([sum((per_t[i] for i in m), torch.zeros(c, dtype=torch.float64, device=P.device))
                              for m in self.b.layer_members])
        quant = []
        for q in self.b.quant:
            ch = chunks[q["tensor"]].double().reshape(q["channels"], -1, c).sum(dim=1)  # C x c
            quant.append((ch * q["w"].to(ch.device)[:, None]).sum(dim=0))
        qs = torch.stack(quant) if quant else torch.zeros((0, c), dtype=torch.float64)
        tensors = torch.stack([per_t[q["tensor"]] for q in self.b.quant]) if self.b.quant else \
            torch.zeros((0, c), dtype=torch.float64)
        return layers.cpu().numpy(), torch.cat([qs.cpu(), tensors.cpu()]).numpy()


def _student(exact: np.ndarray, M: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-column estimate ``exact + mean``, stderr and Student-t interval from the sample rows of ``M``."""
    m = M.shape[0]
    est = exact + (M.mean(axis=0) if m else 0.0)
    if m >= 2:
        se = M.std(axis=0, ddof=1) / math.sqrt(m)
        hw = T._t_quantile(level, m - 1) * se
    elif m == 0:  # everything exact (the sketch spans the space)
        se = np.zeros_like(exact)
        hw = se
    else:
        se = np.full_like(exact, np.inf)
        hw = se
    return est, se, est - hw, est + hw


def _exact_parts(Q: Tensor, image: Callable[[int, int], Tensor], acc: _Accumulator | None, nl: int, nq: int,
                 chunk: int = 8) -> tuple[float, np.ndarray, np.ndarray]:
    """The deflated part of the trace, exactly: ``tr(Q^T H Q)`` and its per-block shares.

    ``Q`` (``n x k``, orthonormal columns) spans the deflation space; ``image(c0, c1)`` returns the
    columns ``c0:c1`` of ``H Q`` (HVPs for a Hutch++ sketch, the Lanczos relation for a Krylov basis).
    With ``P = I - Q Q^T``, ``H = Q Q^T H + P H Q Q^T + P H P``; the first two terms' block traces are
    the block sums of ``rowsum(Q * (2 HQ - Q Q^T H Q))``.
    """
    exact = 0.0
    d = torch.zeros(Q.shape[0], dtype=Q.dtype, device=Q.device) if acc is not None else None
    for c0 in range(0, Q.shape[1], chunk):
        c1 = min(c0 + chunk, Q.shape[1])
        Qc, AQ = Q[:, c0:c1], image(c0, c1)
        exact += float((Qc * AQ).double().sum())
        if d is not None:
            d += (Qc * (2.0 * AQ - Q @ (Q.T @ AQ))).sum(dim=1)
        del AQ
    if acc is None:
        return exact, np.zeros(nl), np.zeros(nq)
    el, eq = acc(d[:, None])
    return exact, el[:, 0], eq[:, 0]


def _sketched_trace(op: L.SymmetricOperator, blocks: _Blocks | None, *, method: str, rtol: float | None,
                    layer_rtol: float | None, layer_floor: float, max_hvp: int, sketch_size: int | None,
                    min_samples: int, block_size: int, level: float, gen: torch.Generator) -> dict[str, Any]:
    """Hutch++ (``method="hutchpp"``) or Hutchinson (``"hutchinson"``) with per-block traces.

    Total: exactly the estimator and formula CI of :func:`trace_estimators.hutchpp` / :func:`trace_estimators.hutchinson`
    (same probe order; the sketch is applied in blocks of 8 columns to bound memory). Blocks: the
    deflated part is exact per block (:func:`_exact_parts`) and the residual ``P H P`` is estimated by
    ``g_b^T (P H P g)_b`` for the same Rademacher ``g`` as the total (``E[g g^T] = I``), so every block
    gets an unbiased estimate with its own Student-t interval at no extra HVP.
    """
    n, dtype, device = op.n, op.dtype, op.device
    k = 0 if method == "hutchinson" else min(n, max_hvp // 3 if sketch_size is None else sketch_size)
    if method == "hutchpp" and k < 1:
        raise FlatlensError(f"max_hvp={max_hvp} is too small for Hutch++ (needs >= 4); raise --max-hvp")
    if k and k < n and max_hvp - 2 * k < 2:
        raise FlatlensError(f"max_hvp={max_hvp} leaves {max_hvp - 2 * k} residual probes after a sketch of {k}; "
                            f"pass max_hvp >= {2 * k + 2} or a smaller sketch_size")
    chunk = 8
    Q = None
    if k:
        with _user_errors():  # Y, and Q with the QR's workspace
            memory.require_memory((n, k), dtype, device, f"the Hutch++ sketch of {k:,} vectors",
                             "lower --max-hvp (the sketch has max_hvp // 3 vectors) or use --trace-method hutchinson",
                             copies=3)
        Y = torch.empty((n, k), dtype=dtype, device=device)
        for c0 in range(0, k, chunk):
            c = min(chunk, k - c0)
            S = L.rademacher(n, c, gen, dtype, device)
            Y[:, c0:c0 + c] = op.matvec(S[:, 0])[:, None] if c == 1 else op.matmat(S)
            del S
        Q, _ = torch.linalg.qr(Y)
        del Y

    def image(c0: int, c1: int) -> Tensor:
        assert Q is not None
        return op.matvec(Q[:, c0])[:, None] if c1 - c0 == 1 else op.matmat(Q[:, c0:c1])

    return _deflated_hutchinson(op, blocks, Q, image, rtol=rtol, layer_rtol=layer_rtol, layer_floor=layer_floor,
                                max_hvp=max_hvp, spent=2 * k, min_samples=min_samples, block_size=block_size,
                                level=level, gen=gen)


def _krylov_trace(op: L.SymmetricOperator, blocks: _Blocks | None, *, rtol: float | None, layer_rtol: float | None,
                  layer_floor: float, max_hvp: int, sketch_size: int | None, min_samples: int, block_size: int,
                  level: float, seed: int, gen: torch.Generator) -> dict[str, Any]:
    """``method="krylov"``: a Lanczos basis of ``sketch_size`` steps, then :func:`_deflated_hutchinson`.

    The basis starts from the ``"trace-krylov"`` stream and the residual probes come from ``gen`` (the
    ``"trace"`` stream), so they are independent of it and the estimate is unbiased given the basis.
    ``tr(Q^T H Q)`` is exact from the tridiagonal (per block from the Lanczos relation, no HVP).
    """
    if sketch_size is None:  # a space of at most max_hvp dimensions: the basis spans it, the trace is exact
        k = op.n if op.n <= max_hvp else max_hvp // 3
    else:
        k = min(op.n, int(sketch_size))
    if k < 1 or (k < op.n and max_hvp - k < 2):
        raise FlatlensError(f"max_hvp={max_hvp} leaves {max_hvp - k} residual probes after a Lanczos basis of {k}; "
                            f"pass max_hvp >= {max(k, 1) + 2} or a smaller sketch_size")
    st = L.krylov_basis(op, k, generator=seeded_generator(seed, "trace-krylov", 0))
    return _deflated_hutchinson(op, blocks, st.basis.T, st.image, rtol=rtol, layer_rtol=layer_rtol,
                                layer_floor=layer_floor, max_hvp=max_hvp, spent=st.m, min_samples=min_samples,
                                block_size=block_size, level=level, gen=gen)


def _deflated_hutchinson(op: L.SymmetricOperator, blocks: _Blocks | None, Q: Tensor | None,
                         image: Callable[[int, int], Tensor], *, rtol: float | None, layer_rtol: float | None,
                         layer_floor: float, max_hvp: int, spent: int, min_samples: int, block_size: int,
                         level: float, gen: torch.Generator) -> dict[str, Any]:
    """``tr(Q^T H Q)`` exactly plus Rademacher probes of ``P H P`` (``P = I - Q Q^T``) until the CI target.

    ``spent`` HVPs count towards ``max_hvp`` already. The interval is the formula CI of
    :func:`trace_estimators.hutchpp` (the quadratic-form variance estimated from the probes and their images).
    """
    n, dtype, device = op.n, op.dtype, op.device
    acc = _Accumulator(blocks) if blocks is not None else None
    nl = len(blocks.layer_names) if blocks is not None else 0
    nq = 2 * len(blocks.quant) if blocks is not None else 0
    k = 0 if Q is None else Q.shape[1]
    exact, exact_layers, exact_quant = (0.0, np.zeros(nl), np.zeros(nq)) if Q is None else \
        _exact_parts(Q, image, acc, nl, nq)
    tot: list[np.ndarray] = []
    rows_l: list[np.ndarray] = []
    rows_q: list[np.ndarray] = []
    qv = T._QuadFormVariance(True)
    est, se, lo, hi = exact, math.inf, -math.inf, math.inf
    converged = False
    done = 0
    if k >= n:
        est, se, lo, hi, converged = exact, 0.0, exact, exact, True
    else:
        while spent < max_hvp:
            b = min(block_size, max_hvp - spent)
            G0 = L.rademacher(n, b, gen, dtype, device)
            G = G0 - Q @ (Q.T @ G0) if Q is not None else G0
            AG = op.matvec(G[:, 0])[:, None] if b == 1 else op.matmat(G)
            Z = AG - Q @ (Q.T @ AG) if Q is not None else AG
            del G, AG
            P = G0 * Z
            tot.append(P.sum(dim=0).double().cpu().numpy())
            qv.add(G0, Z)
            if acc is not None:
                rl, rq = acc(P)
                rows_l.append(rl.T)
                rows_q.append(rq.T)
            del P, Z, G0
            spent += b
            done += b
            if done >= min_samples or spent >= max_hvp:
                s = np.concatenate(tot)
                est, se, lo, hi = T._ci(exact + float(s.mean()), qv.variance(), done, level)
                if done >= min_samples and (rtol is not None or layer_rtol is not None):
                    ok = rtol is None or T._met(est, lo, hi, rtol)
                    if ok and layer_rtol is not None and acc is not None:
                        e_l, _, l_lo, l_hi = _student(exact_layers, np.concatenate(rows_l), level)
                        scale = np.maximum(np.abs(e_l), layer_floor * np.abs(e_l).sum())
                        ok = bool(np.all(0.5 * (l_hi - l_lo) <= layer_rtol * scale))
                    if ok:
                        converged = True
                        break
    if rtol is None and layer_rtol is None:
        converged = True
    out: dict[str, Any] = {
        "estimate": est, "stderr": se, "ci_low": lo, "ci_high": hi, "exact": exact, "sketch": k,
        "samples": np.concatenate(tot) if tot else np.zeros(0), "converged": converged,
    }
    if acc is not None:
        Ml = np.concatenate(rows_l) if rows_l else np.zeros((0, nl))
        Mq = np.concatenate(rows_q) if rows_q else np.zeros((0, nq))
        out["layers"] = (exact_layers, Ml)
        out["quant"] = (exact_quant, Mq)
    return out


def _layer_result(blocks: _Blocks, raw: dict[str, Any], level: float, layer_rtol: float | None,
                  layer_floor: float) -> LayerTraces:
    f64 = torch.float64
    ex, M = raw["layers"]
    est, se, lo, hi = _student(ex, M, level)
    if layer_rtol is not None:
        scale = np.maximum(np.abs(est), layer_floor * np.abs(est).sum())
        conv = 0.5 * (hi - lo) <= layer_rtol * scale
    else:
        conv = np.ones(len(est), dtype=bool)
    quant = None
    if blocks.quant:
        nq = len(blocks.quant)
        qex, qM = raw["quant"]
        q_est, q_se, q_lo, q_hi = _student(qex[:nq], qM[:, :nq], level)
        w_est, _, _, _ = _student(qex[nq:], qM[:, nq:], level)
        quant = QuantNoise(
            names=[q["layer"] for q in blocks.quant], weights=[q["weight"] for q in blocks.quant],
            noise_terms=torch.as_tensor(q_est, dtype=f64), stderr=torch.as_tensor(q_se, dtype=f64),
            ci_low=torch.as_tensor(q_lo, dtype=f64), ci_high=torch.as_tensor(q_hi, dtype=f64),
            weight_traces=torch.as_tensor(w_est, dtype=f64),
            step_rms=torch.tensor([q["step_rms"] for q in blocks.quant], dtype=f64),
            bits=[q["bits"] for q in blocks.quant], per_channel=[q["per_channel"] for q in blocks.quant],
            enabled=[q["enabled"] for q in blocks.quant])
    return LayerTraces(
        names=list(blocks.layer_names), by=blocks.by,
        numel=[sum(blocks.numels[i] for i in m) for m in blocks.layer_members],
        estimates=torch.as_tensor(est, dtype=f64), stderr=torch.as_tensor(se, dtype=f64),
        ci_low=torch.as_tensor(lo, dtype=f64), ci_high=torch.as_tensor(hi, dtype=f64),
        exact=torch.as_tensor(ex, dtype=f64), samples=torch.as_tensor(M, dtype=f64),
        converged=torch.as_tensor(conv, dtype=torch.bool), rtol=layer_rtol, quant=quant)


TRACE_METHODS = ("hutchpp", "krylov", "xtrace", "hutchinson", "gauss-newton")


def trace(obj: Any, method: str = "krylov", *, rtol: float | None = 0.01, max_hvp: int = 100, seed: int = 0,
          level: float = 0.95, sketch_size: int | None = None, min_samples: int = 10, block_size: int = 1,
          layers: str = "layer", layer_rtol: float | None = None, layer_floor: float = 0.01,
          blocks: Sequence[tuple[str, int]] | None = None, per_sample: str = "auto",
          progress: Progress | None = None) -> TraceEstimate:
    """The Hessian trace with a ``level`` confidence interval, stopping when its half-width is ``<= rtol``.

    Args:
        method: ``krylov`` (default: a Lanczos basis of ``sketch_size`` = ``max_hvp // 3`` steps,
            ``tr(Q^T H Q)`` exact from its tridiagonal, then deflated Rademacher probes streamed until the
            CI target; Krylov-aware trace estimation, Chen & Hallman 2023; a space of at most ``max_hvp``
            dimensions, e.g. the step sizes, gets a basis of all of them: the exact trace in ``n`` HVPs,
            with a zero-width interval), ``hutchpp`` (the same second
            phase after a randomized sketch of ``max_hvp // 3`` columns, which costs two HVPs per
            dimension where the Lanczos basis costs one, and sees the top of the spectrum less sharply:
            at 100 HVPs its interval was 1.3-1.5x wider on MNIST-CNN and ResNet-18), ``xtrace`` (exchangeable, test vectors doubling from 10), ``hutchinson``
            (Rademacher, as PyHessian, with a CI) or ``gauss-newton`` (exact for piecewise-linear
            networks, no HVPs: :mod:`flatlens.measure.gauss_newton`).
        rtol: target relative half-width of the CI (``None``: spend ``max_hvp``). Compare estimators at
            their *achieved* CI, never at a "default tolerance".
        max_hvp: most HVPs to spend (the interval is reported either way; ``converged`` says whether
            the target was met).
        layers: ``layer`` (default), ``tensor`` or ``none``: per-block traces from the same probes (Hutch++
            and Hutchinson only), plus QGen's noise term per quantized layer. ``blocks`` gives explicit
            ``(name, numel)`` blocks instead (for operators that are not an Objective).
        layer_rtol: also require every block's half-width ``<= layer_rtol * max(|tr_l|, layer_floor *
            sum_l |tr_l|)`` before stopping (see :func:`layer_traces`).
        block_size: residual probes per operator call (one data pass for all of them).
        per_sample: ``gauss-newton`` only: how the per-sample products are formed (``auto``, ``vmap`` or
            ``loop``; see :func:`flatlens.measure.gauss_newton.hessian_diagonal`). ``auto`` picks by
            timing, so pin the stored ``trace_per_sample`` to repeat a result bit for bit.
    """
    seed = check_seed(seed)
    if method not in TRACE_METHODS:
        raise FlatlensError(f"trace method {method!r} unknown; choose from {', '.join(TRACE_METHODS)}")
    src = _source(obj, hvp=method != "gauss-newton")
    if method == "gauss-newton":
        return _gauss_newton_trace(src, seed, layers=layers, blocks=blocks, per_sample=per_sample, progress=progress)
    op = _Counted(src.op, progress)
    gen = seeded_generator(seed, "trace", 0)
    bl = None
    with src.guard(), _user_errors():
        rtol, layer_rtol, level, min_samples, block_size, layer_floor = _check_trace_args(
            rtol, layer_rtol, level, min_samples, block_size, layer_floor)
        max_hvp = L._check_int("max_hvp", max_hvp, 2, "pass the most HVPs the estimate may use")
        if sketch_size is not None and method in ("krylov", "hutchpp"):
            sketch_size = L._check_int("sketch_size", sketch_size, 1,
                                       "pass the basis size, None for max_hvp // 3, or method='hutchinson' for none")
        t0 = time.perf_counter()
        if method == "xtrace":
            if layer_rtol is not None:
                raise FlatlensError("layer_rtol needs per-layer traces; use method 'krylov', 'hutchpp' or 'hutchinson'")
            r = T.xtrace(op, rtol=rtol, max_matvec=max_hvp, min_samples=min_samples, level=level, generator=gen)
            raw = {"estimate": r.estimate, "stderr": r.stderr, "ci_low": r.ci_low, "ci_high": r.ci_high,
                   "exact": 0.0, "sketch": r.sketch_size, "samples": _f64(r.samples), "converged": r.converged}
        elif method == "krylov":
            bl = _blocks_for(src, layers, blocks)
            raw = _krylov_trace(op, bl, rtol=rtol, layer_rtol=layer_rtol, layer_floor=layer_floor, max_hvp=max_hvp,
                                sketch_size=sketch_size, min_samples=min_samples, block_size=block_size, level=level,
                                seed=seed, gen=gen)
        else:
            bl = _blocks_for(src, layers, blocks)
            raw = _sketched_trace(op, bl, method=method, rtol=rtol, layer_rtol=layer_rtol, layer_floor=layer_floor,
                                  max_hvp=max_hvp, sketch_size=sketch_size, min_samples=min_samples,
                                  block_size=block_size, level=level, gen=gen)
        seconds = time.perf_counter() - t0
    return _trace_estimate(raw, src, bl, op.n_matvec, seconds, seed, method=method, rtol=rtol, max_hvp=max_hvp,
                           level=level, layer_rtol=layer_rtol, layer_floor=layer_floor)


def _gauss_newton_trace(src: _Source, seed: int, *, layers: str, blocks: Sequence[tuple[str, int]] | None,
                        per_sample: str, progress: Progress | None) -> TraceEstimate:
    """:func:`trace` with ``method="gauss-newton"``: the exact diagonal, summed per block (no probes)."""
    from flatlens.measure.gauss_newton import hessian_diagonal

    if src.obj is None:
        raise FlatlensError("trace method 'gauss-newton' needs an Objective (model + samples); use 'krylov'")
    with src.guard(), _user_errors():
        bl = _blocks_for(src, layers, blocks)
        gn = hessian_diagonal(src.obj, seed=seed, per_sample=per_sample, progress=progress)
        tr = gn.trace
        raw: dict[str, Any] = {"estimate": tr, "stderr": 0.0, "ci_low": tr, "ci_high": tr, "exact": tr, "sketch": 0,
                               "samples": np.zeros(0), "converged": True}
        if bl is not None:
            el, eq = _Accumulator(bl)(gn.diagonal[:, None])
            raw["layers"] = (el[:, 0], np.zeros((0, el.shape[0])))
            raw["quant"] = (eq[:, 0], np.zeros((0, eq.shape[0])))
    pl = gn.check
    assert pl is not None  # hessian_diagonal ran its check (the default)
    res = _trace_estimate(raw, src, bl, 0, gn.seconds, seed, method="gauss-newton", rtol=None, max_hvp=0, level=0.95,
                          layer_rtol=None, layer_floor=0.01)
    res.details = {"n_backward": gn.n_backward, "per_sample": gn.per_sample, "per_sample_selection": gn.selection,
                   "resumed_samples": gn.resumed_samples,
                   "check": True, "check_max_ratio": pl.max_ratio, "check_worst": pl.worst, "check_rtol": pl.rtol, "check_samples": pl.n_samples,
                   "identity": "tr(H) = tr(GGN): exact for piecewise-linear networks (per-tensor Hessian blocks "
                               "equal the Gauss-Newton blocks)"}
    return res


def _check_trace_args(rtol: Any, layer_rtol: Any, level: Any, min_samples: Any, block_size: Any,
                      layer_floor: Any) -> tuple[float | None, float | None, float, int, int, float]:
    """The stopping-rule arguments of :func:`trace` and :func:`spectrum`, checked."""
    rtol = T._check_rtol(rtol)
    if layer_rtol is not None:
        layer_rtol = T._check_rtol(layer_rtol, "layer_rtol")
    layer_floor = L._check_pos("layer_floor", layer_floor, "pass a fraction of the absolute trace such as 0.01",
                               allow_zero=True)
    return (rtol, layer_rtol, L._check_level(level), L._check_int("min_samples", min_samples, 2, "pass at least 2"),
            L._check_int("block_size", block_size, 1, "pass how many probes per HVP pass"), layer_floor)


def _trace_estimate(raw: dict[str, Any], src: _Source, blocks: _Blocks | None, n_hvp: int, seconds: float, seed: int,
                    *, method: str, rtol: float | None, max_hvp: int, level: float, layer_rtol: float | None,
                    layer_floor: float, shared_hvp: int = 0) -> TraceEstimate:
    """A :class:`TraceEstimate` from an estimator's raw dict (and its per-block parts when ``blocks``)."""
    lt = _layer_result(blocks, raw, level, layer_rtol, layer_floor) if blocks is not None else None
    return TraceEstimate(
        n_hvp=n_hvp, seconds=seconds, seed=seed, provenance=src.provenance, root=src.root, shared_hvp=shared_hvp,
        estimate=float(raw["estimate"]), stderr=float(raw["stderr"]), ci_low=float(raw["ci_low"]),
        ci_high=float(raw["ci_high"]), level=level, samples=torch.as_tensor(raw["samples"], dtype=torch.float64),
        method=method, rtol=rtol, max_hvp=max_hvp, converged=bool(raw["converged"]), exact_part=float(raw["exact"]),
        sketch_size=int(raw["sketch"]), layers=lt)


def layer_traces(obj: Any, by: str = "layer", *, layer_rtol: float | None = 0.05, rtol: float | None = None,
                 max_hvp: int = 200, method: str = "krylov", seed: int = 0, level: float = 0.95,
                 layer_floor: float = 0.01, sketch_size: int | None = None, block_size: int = 1,
                 blocks: Sequence[tuple[str, int]] | None = None, progress: Progress | None = None) -> TraceEstimate:
    """Per-layer (``by="layer"``) or per-tensor traces ``tr(H_ll)`` with a stopping rule on every block.

    The same estimator as :func:`trace` (the result is a :class:`TraceEstimate`; read ``.layers``), but
    it stops only when every block's CI half-width is ``<= layer_rtol * max(|tr_l|, layer_floor *
    sum_l |tr_l|)`` (blocks holding less than ``layer_floor`` of the absolute trace are held to that
    absolute floor, so a near-zero block cannot keep the run going), and the total's ``rtol`` if given.
    For quantized layers ``.layers.quant`` holds QGen's noise term ``sum_c (s_c^2 / 24) tr(H_cc)``.
    """
    if by not in ("layer", "tensor") and blocks is None:
        raise FlatlensError(f"by={by!r}; pass 'layer' or 'tensor'")
    if method == "xtrace":
        raise FlatlensError("per-layer traces need method 'krylov', 'hutchpp' or 'hutchinson'")
    return trace(obj, method, rtol=rtol, max_hvp=max_hvp, seed=seed, level=level, sketch_size=sketch_size,
                 block_size=block_size, layers=by, layer_rtol=layer_rtol, layer_floor=layer_floor, blocks=blocks,
                 progress=progress)


# --------------------------------------------------------------------------------------------------
# Density
# --------------------------------------------------------------------------------------------------


def density(obj: Any, n_probes: int = 3, n_steps: int = 30, *, grid: int | Tensor = 1001, sigma: float | None = None,
            seed: int = 0, progress: Progress | None = None) -> DensityResult:
    """Spectral density by stochastic Lanczos quadrature (``n_probes * n_steps`` HVPs).

    Each probe runs ``n_steps`` Lanczos steps with full reorthogonalisation from a Rademacher start;
    the probes advance together (one data pass per step for all of them). The quadrature nodes and
    weights (kept raw) are smoothed with a Gaussian of width ``sigma`` (default: the node range / 100)
    onto ``grid`` points spanning the nodes +- 5 sigma. ``spectrum_bounds`` are the extreme nodes
    widened by their residuals (no extra HVPs).

    How to split the HVPs (measured, ``benchmarks/RESULTS-hessian.md``): at the default ``sigma`` the curve
    hardly depends on it (MNIST-CNN, 372 k parameters: 3 x 30, 2 x 50, 1 x 60 and PyHessian's 1 x 100 all
    within L1 1e-3 of a 4 x 200 reference). Finer detail needs longer runs, not more probes: one probe's
    stochastic error shrinks with the dimension (~ sqrt(2 / n)), ``n_steps`` sets the quadrature's
    resolution; at ``sigma`` = range / 1000 the L1 errors were 2.6 % (3 x 30), 0.5 % (2 x 50), 0.2 % (1 x 60)
    and 0.1 % (1 x 100). Only small spaces gain from probes (1,210 parameters: 3 x 30 1.4-2.5x closer than
    1 x 100 in Wasserstein distance, L1 1.8 % against 2.6 % at the default sigma). ``benchmarks/bench_density.py``
    measures this on any of the benchmark models. Long runs cost vector work quadratic in ``n_steps`` (full reorthogonalisation):
    on ResNet-18 (11 M parameters, 16 samples) :func:`spectrum` took 117 s at 3 x 30, 128 s at 1 x 60 (30 HVPs
    fewer) and 201 s at 1 x 100, hence the default.
    """
    seed = check_seed(seed)
    src = _source(obj)
    op = _Counted(src.op, progress)
    with src.guard(), _user_errors():
        t0 = time.perf_counter()
        r = L.slq_density(op, n_probes, n_steps, grid=grid, sigma=sigma, generator=seeded_generator(seed, "density", 0))
        seconds = time.perf_counter() - t0
    return _density_result(r, src, op.n_matvec, seconds, seed)


def _density_result(r: L.SLQResult, src: _Source, n_hvp: int, seconds: float, seed: int) -> DensityResult:
    return DensityResult(
        n_hvp=n_hvp, seconds=seconds, seed=seed, provenance=src.provenance, root=src.root, grid=r.grid,
        values=r.density, nodes=r.nodes, weights=r.weights, sigma=r.sigma, n_probes=r.n_probes, n_steps=r.n_steps,
        spectrum_bounds=r.spectrum_bounds, trace_samples=r.trace_samples)


# --------------------------------------------------------------------------------------------------
# All three from one set of Lanczos runs
# --------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class SpectrumResult:
    """What :func:`spectrum` measured: the density and, from its first Lanczos run, eigenvalues and trace."""

    density: DensityResult
    eigen: EigenResult | None = None
    trace: TraceEstimate | None = None

    @property
    def results(self) -> list[_Stored]:
        return [r for r in (self.eigen, self.trace, self.density) if r is not None]

    @property
    def n_hvp(self) -> int:
        return sum(r.n_hvp for r in self.results)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def write(self, path: str | Path, *, replace: bool = False) -> Path:
        """Write all parts into ``path:/hessian`` (see :func:`write`)."""
        return write(path, *self.results, replace=replace)

    def __repr__(self) -> str:
        return summary_repr(type(self).__name__, self.summary())

    def summary(self) -> list[tuple[str, str]]:
        return [row for r in self.results for row in r.summary()]


def spectrum(obj: Any, n_probes: int = 3, n_steps: int = 30, *, eigen: bool = True, k: int = 1, k_bottom: int = 0,
             tol: float = 1e-3, eig_max_iter: int | None = None, stop: str = "residual",
             bottom_norm_tol: float | None = None, trace: bool = True, rtol: float | None = 0.01, max_hvp: int = 100,
             level: float = 0.95, min_samples: int = 10, block_size: int = 1, layers: str = "layer",
             layer_rtol: float | None = None, layer_floor: float = 0.01,
             blocks: Sequence[tuple[str, int]] | None = None, grid: int | Tensor = 1001, sigma: float | None = None,
             seed: int = 0, progress: Progress | None = None,
             on_ready: Callable[[list[_Stored]], None] | None = None) -> SpectrumResult:
    """Density, extreme eigenvalues and trace from ONE set of Lanczos runs (fewer HVPs than the three apart).

    ``on_ready``, if given, is called with the density and eigenvalue results as soon as they are final,
    before the trace's residual probes (the CLI writes them then, so a run killed during the probes
    keeps them).

    1. :func:`density` exactly as called alone (same seed: bitwise the same result), keeping its first
       probe's Lanczos basis ``Q`` (``n_steps`` vectors) and tridiagonal ``T``.
    2. Eigenvalues: the Ritz pairs of ``T`` with their residuals ``|beta_m s_{m,i}|`` -- the same
       certificate as :func:`eigenvalues`. If the wanted values are not certified to ``tol`` within
       ``n_steps``, that Lanczos run is *continued* (its HVPs are this measure's ``n_hvp``) up to
       ``eig_max_iter`` steps in all (default ``max(50, 4 (k + k_bottom) + 20, n_steps)``).
    3. Trace: ``tr(Q^T H Q) = tr(T)`` (plus the rounding-level ``beta_m q_m^T q_{m+1}``) is exact; the rest,
       ``tr(P H P)`` with ``P = I - Q Q^T``, is estimated by Rademacher probes as in Hutch++'s second
       phase, with the same formula CI, the ``rtol`` stopping rule, and per-layer traces and QGen noise
       terms (the exact part per block from the Lanczos relation ``H Q = Q T + beta_m q_{m+1} e_m^T``,
       no HVP). ``max_hvp`` caps these residual probes. A Krylov basis captures the top of the spectrum
       as well as Hutch++'s sketch of ``max_hvp / 3`` products does, for free here, so every trace HVP
       goes to the residual. The residual probes are drawn from the ``"trace"`` stream and are
       independent of ``Q`` (which comes from the ``"density"`` stream), so the estimate is unbiased.
       A space of at most ``max_hvp`` dimensions gets :func:`trace`'s own ``krylov`` basis of all of them
       instead (the exact trace in at most ``n`` HVPs, none shared), as :func:`trace` alone would.

    Results are :class:`EigenResult`, :class:`TraceEstimate` (``method="krylov"``, ``sketch_size`` = the
    basis dimension) and :class:`DensityResult`; the reused HVPs are recorded as ``shared_hvp`` (stored
    as ``eigenvalue_shared_hvp`` / ``trace_shared_hvp``) and counted once, in the density's ``n_hvp``.
    The eigenvalues come from the density's start vector, so they differ (within their certificates)
    from :func:`eigenvalues` with the same seed.
    """
    seed = check_seed(seed)
    src = _source(obj)
    op = _Counted(src.op, progress)
    with src.guard(), _user_errors():
        max_hvp = L._check_int("max_hvp", max_hvp, 1, "pass the most residual probes the trace may use")
        rtol, layer_rtol, level, min_samples, block_size, layer_floor = _check_trace_args(
            rtol, layer_rtol, level, min_samples, block_size, layer_floor)
        if eigen:  # before the SLQ, so a bad value fails at once, not after the density's HVPs
            L.check_eigen_args(op.n, k, k_bottom, tol=tol, max_iter=eig_max_iter, stop=stop,
                               bottom_norm_tol=bottom_norm_tol)
        n0 = op.n_matvec
        t0 = time.perf_counter()
        r = L.slq_density(op, n_probes, n_steps, grid=grid, sigma=sigma, generator=seeded_generator(seed, "density", 0),
                          keep_basis=True)
        dens = _density_result(r, src, op.n_matvec - n0, time.perf_counter() - t0, seed)
        st = r.state
        assert st is not None
        shared = st.m
        eig_res = tr_res = None
        if eigen:
            kk = k + k_bottom
            cap = eig_max_iter if eig_max_iter is not None else max(50, 4 * kk + 20, st.m)
            bnt = tol if bottom_norm_tol is None and k_bottom else bottom_norm_tol
            n0, t0 = op.n_matvec, time.perf_counter()
            res = L.lanczos_eigenvalues(op, k_top=k, k_bottom=k_bottom, tol=tol, max_iter=cap, stop=stop,
                                        generator=seeded_generator(seed, "hessian", 0), bottom_norm_tol=bnt, init=st)
            eig_res = _eigen_result(res, src, op.n_matvec - n0, time.perf_counter() - t0, seed, tol, bnt, cap, stop,
                                    method="lanczos (density probe 0, continued)" if op.n_matvec > n0 else
                                    "lanczos (density probe 0)", shared_hvp=shared, start="density probe 0")
        if on_ready is not None and trace:
            on_ready([r for r in (eig_res, dens) if r is not None])
        if trace:
            bl = _blocks_for(src, layers, blocks)
            n0, t0 = op.n_matvec, time.perf_counter()
            gen = seeded_generator(seed, "trace", 0)
            exact = op.n <= max_hvp  # the budget covers the space: trace()'s exact basis of every dimension
            if exact:
                raw = _krylov_trace(op, bl, rtol=rtol, layer_rtol=layer_rtol, layer_floor=layer_floor, max_hvp=max_hvp,
                                    sketch_size=None, min_samples=min_samples, block_size=block_size, level=level,
                                    seed=seed, gen=gen)
            else:
                Q = st.basis.T  # n x m, orthonormal columns
                raw = _deflated_hutchinson(op, bl, Q, st.image, rtol=rtol, layer_rtol=layer_rtol,
                                           layer_floor=layer_floor, max_hvp=max_hvp, spent=0, min_samples=min_samples,
                                           block_size=block_size, level=level, gen=gen)
                del Q
            tr_res = _trace_estimate(raw, src, bl, op.n_matvec - n0, time.perf_counter() - t0, seed, method="krylov",
                                     rtol=rtol, max_hvp=max_hvp, level=level, layer_rtol=layer_rtol,
                                     layer_floor=layer_floor, shared_hvp=0 if exact else shared)
    return SpectrumResult(density=dens, eigen=eig_res, trace=tr_res)


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------

_COST_PREFIXES = {"hessian": "eigenvalue_", "trace": "trace_", "density": "density_"}


def _finalize(group: Any) -> None:
    """Totals over the measures present in the group: ``n_hvp``, ``seconds``, ``measures``."""
    present = [m for m, p in _COST_PREFIXES.items() if f"{p}n_hvp" in group.attrs]
    group.attrs["n_hvp"] = int(sum(int(group.attrs[f"{_COST_PREFIXES[m]}n_hvp"]) for m in present))
    group.attrs["seconds"] = float(sum(float(group.attrs[f"{_COST_PREFIXES[m]}seconds"]) for m in present))
    from flatlens.store import attr_value

    group.attrs["measures"] = attr_value(present)


def stored_attrs(path: str | Path) -> dict[str, Any] | None:
    """The attributes of ``path:/hessian`` (decoded), or None when the file or the group is missing."""
    if not Path(path).is_file():
        return None
    with store.open_h5(path, "r") as f:
        if GROUP not in f:
            return None
        return {k: store._decode(v) for k, v in f[GROUP].attrs.items()}


def dropped_by(path: str | Path, setup: Mapping[str, Any], measures: Sequence[str]) -> tuple[list[str], list[str]]:
    """What writing ``measures`` (of ``hessian``, ``trace``, ``density``) measured on ``setup`` (attributes
    with the :data:`SHARED_KEYS`) into ``path:/hessian`` would lose: the stored measures it does not
    write again, when the group holds another setup (whose write replaces the whole group), and the
    shared keys that differ. Both empty when nothing is lost (no group, the same setup: a merge)."""
    stored = stored_attrs(path)
    if stored is None:
        return [], []
    differ = store.differing_attrs(setup, stored, SHARED_KEYS)
    if not differ:
        return [], []
    present = [m for m, prefix in _COST_PREFIXES.items() if f"{prefix}n_hvp" in stored]
    lost = [m for m in present if m not in measures]
    return lost, (differ if lost else [])


def describe_drop(path: str | Path, setup: Mapping[str, Any], lost: list[str], differ: list[str]) -> str:
    """``path:/hessian holds trace, density measured on another setup (n_samples: 256 vs 64)``."""
    stored = stored_attrs(path) or {}
    shown = "; ".join(f"{k}: {_short(stored.get(k))} vs {_short(setup.get(k))}" for k in differ[:3])
    return f"{path}:/{GROUP} holds {', '.join(lost)} measured on another setup ({shown})"


def write(path: str | Path, *results: _Stored, replace: bool = False) -> Path:
    """Write results of :func:`eigenvalues`, :func:`trace`/:func:`layer_traces` and :func:`density` into
    ``path:/hessian`` (created with its root attributes when missing; refused when it belongs to
    another checkpoint).

    Each result replaces only its own datasets and prefixed attributes and keeps the other measures'
    (merge), unless the shared provenance (:data:`SHARED_KEYS`: split, sample subset, parameter set,
    space, checkpoint, seed...) differs from what the group holds: then the whole group is replaced,
    which is refused, unless ``replace``, when it would drop measures of the other setup that this write
    does not hold (a trace measured for an hour, lost to a quick eigenvalue check of other samples).
    Each write is atomic (copy, fsync, rename), so a kill never leaves a broken file.
    """

    if not results:
        raise FlatlensError("write(path) got no results; pass what eigenvalues()/trace()/density() returned")
    for r in results:
        if not isinstance(r, _Stored):
            raise FlatlensError(f"cannot store a {type(r).__name__} in /{GROUP}; pass EigenResult, TraceEstimate "
                                "or DensityResult")
    for r in results:
        if r.root.get("checkpoint_sha256") != results[0].root.get("checkpoint_sha256"):
            raise FlatlensError("results of different checkpoints cannot share one analysis file; write them apart")
    kinds = [type(r).__name__ for r in results]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:
        raise FlatlensError(f"write() got {', '.join(twice)} more than once; the later would replace the earlier "
                            "in the file; pass one result of each kind (write the others to another file)")
    stored = [r.to_store() for r in results]
    for r, (_, attrs) in zip(results, stored):
        if r.options:  # written in the same transaction as the numbers they describe
            prefix = _COST_PREFIXES[r.MEASURE]
            attrs[f"{prefix}options"] = r.options
            attrs[f"{prefix}summary"] = json.dumps([[r.MEASURE, label, value] for label, value in r.summary()])
    for r, (_, attrs) in zip(results[1:], stored[1:]):
        # one group holds one function's measures; a second setup would replace the group (losing the first)
        differ = store.differing_attrs(stored[0][1], attrs, SHARED_KEYS)
        if differ:
            first = stored[0][1]
            shown = "; ".join(f"{k}: {_short(first.get(k))} vs {_short(attrs.get(k))}" for k in differ[:3])
            raise FlatlensError(f"the {kinds[0]} and the {type(r).__name__} were measured on different setups "
                                f"({shown}), and one /{GROUP} group holds one setup; write them to different files")
    p = Path(path)
    store.ensure_file(p, results[0].root)
    lost, differ = dropped_by(p, stored[0][1], [r.MEASURE for r in results])
    if lost and not replace:
        raise FlatlensError(describe_drop(p, stored[0][1], lost, differ) + "; one group holds one setup, so this "
                            "write would drop them: pass replace=True to replace the group, or write to another file")
    # ONE transaction for all results: a kill between per-result writes kept the eigenvalues of a shared run
    # without its density (the measures own disjoint datasets and attribute prefixes, and agree on the rest)
    datasets = {k: v for ds, _ in stored for k, v in ds.items()}
    attrs = {k: v for _, a in stored for k, v in a.items()}
    store.merge_group(p, GROUP, datasets, attrs, match=SHARED_KEYS, drop=[k for r in results for k in r.OWNED],
                      drop_attr_prefixes=[x for r in results for x in r.PREFIXES], finalize=_finalize)
    return p


def _short(value: Any) -> str:
    """A stored attribute for an error message, cut to 40 characters."""
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read(path: str | Path) -> dict[str, Any]:
    """``path:/hessian`` as a dict: every dataset as a numpy array (``density`` a nested dict with its
    own ``attrs``) and the group attributes under ``"attrs"``. Keys are those of the schema in
    README.md, "The ``/hessian`` group" (e.g. ``r["eigenvalues"]``, ``r["trace"]``, ``r["density"]["values"]``,
    ``r["attrs"]["trace_n_hvp"]``); missing measures are simply absent."""

    return store.read(path, GROUP)
