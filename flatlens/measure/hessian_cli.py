"""``flatlens sharpness --measures hessian,trace,density``: the three Hessian measures' options, checks,
cost estimates and runs, registered with :mod:`flatlens.measure.registry`.

The measures themselves are :mod:`flatlens.measure.hessian`'s API; this module only turns parsed options
into its calls and its results into the ``/hessian`` group and summary rows. Options are checked before
the checkpoint is read (:attr:`~flatlens.measure.registry.Measure.check_args`), with the API's own
argument checks, their messages naming the flags. Requested together with ``density``, ``hessian`` and
``trace`` run as one :class:`~flatlens.measure.registry.Joint` (:func:`~flatlens.measure.hessian.spectrum`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

from flatlens.errors import FlatlensError
from flatlens.measure import linalg as L
from flatlens.measure.gauss_newton import PER_SAMPLE_MODES
from flatlens.measure.hessian import (EIG_STARTS, GROUP, TRACE_METHODS, _check_trace_args, _Stored, density,
                                      eigenvalues, resolved_start, spectrum, trace, write)


def _add_hessian_args(g: Any) -> None:
    g.add_argument("--k", type=int, default=1, help="how many largest eigenvalues")
    g.add_argument("--k-bottom", type=int, default=0, help="how many smallest eigenvalues (negative curvature)")
    g.add_argument("--tol", type=float, default=1e-3, help="certified relative error of each eigenvalue, in (0, 1)")
    g.add_argument("--eig-max-iter", type=int, default=None, help="most Lanczos steps (HVPs); default max(50, 4k+20)")
    g.add_argument("--eig-stop", default="residual", choices=("residual", "gap"),
                   help="residual: certified r <= tol|theta|/(1+tol); gap: the sharper uncertified r^2/gap estimate")
    g.add_argument("--eig-start", default="auto", choices=EIG_STARTS,
                   help="Lanczos start: gradient (+ random), random, or auto (gradient unless --k-bottom asks for "
                        "the bottom too); with density the shared run starts from the density's first probe unless "
                        "this is gradient")


def _add_trace_args(g: Any) -> None:
    g.add_argument("--trace-method", default="krylov", choices=TRACE_METHODS,
                   help="trace estimator; krylov: probes deflated by a Lanczos basis of max-hvp/3 steps (tighter "
                        "than hutchpp's sketch at the same HVPs); gauss-newton: exact for piecewise-linear nets (ReLU, "
                        "pooling, eval BatchNorm), checked first, C-1 per-sample vector-Jacobian products (batched with torch.func), no HVPs")
    g.add_argument("--gauss-newton-per-sample", default="auto", choices=PER_SAMPLE_MODES,
                   help="gauss-newton: per-sample products batched by torch.func (vmap), one by one (loop), or "
                        "whichever is faster on the first samples (auto)")
    g.add_argument("--trace-rtol", type=float, default=0.01, help="stop at this relative 95%% CI half-width (0: spend --max-hvp)")
    g.add_argument("--max-hvp", type=int, default=100, help="most HVPs for the trace")
    g.add_argument("--trace-level", type=float, default=0.95, help="confidence level of the interval")
    g.add_argument("--layers", default="layer", choices=("layer", "tensor", "none"),
                   help="per-layer/per-tensor traces from the same probes (krylov, hutchpp, hutchinson)")
    g.add_argument("--layer-rtol", type=float, default=None,
                   help="also stop only when every layer's CI half-width is within this fraction")


def _add_density_args(g: Any) -> None:
    g.add_argument("--density-probes", type=int, default=3, help="SLQ probes (start vectors)")
    g.add_argument("--density-steps", type=int, default=30, help="Lanczos steps per probe")
    g.add_argument("--density-grid", type=int, default=1001, help="grid points of the smoothed density")
    g.add_argument("--density-sigma", type=float, default=None, help="Gaussian width (default: node range / 100)")
    g.add_argument("--no-shared-krylov", dest="shared_krylov", action="store_false",
                   help="run hessian and trace apart from density; by default, requested together, they reuse the "
                        "density's first Lanczos run (certified eigenvalues; exact trace part, --max-hvp residual probes)")


_CLI_FLAGS = {"k_top": "--k", "k_bottom": "--k-bottom", "tol": "--tol", "max_iter": "--eig-max-iter",
              "rtol": "--trace-rtol", "layer_rtol": "--layer-rtol", "level": "--trace-level", "max_hvp": "--max-hvp",
              "n_probes": "--density-probes", "n_steps": "--density-steps", "grid": "--density-grid",
              "sigma": "--density-sigma"}
"""The API argument behind each command-line flag, for error messages in the flags' names."""

_API_NAME = re.compile(r"(?<![\w-])(" + "|".join(sorted(_CLI_FLAGS, key=len, reverse=True)) + r")(?=\s*(?:=|>=|<|\+))"
                       r"|(?<=\+ )(" + "|".join(_CLI_FLAGS) + r")\b")


_CLI_HINTS = {"or None for a fixed budget": "or 0 for a fixed budget (spend --max-hvp)",
              "or None for the default": "or leave it out for the default"}
"""API hints whose ``None`` is written differently on the command line."""


@contextmanager
def _flag_errors() -> Iterator[None]:
    """The API's argument checks, run on the command line's values: a ValueError becomes a one-line
    FlatlensError in which each argument (``k_bottom=-1``) is named by its flag (``--k-bottom=-1``)."""
    try:
        yield
    except ValueError as exc:
        line = _API_NAME.sub(lambda m: _CLI_FLAGS[m.group(1) or m.group(2)], str(exc).splitlines()[0])
        for api, cli in _CLI_HINTS.items():
            line = line.replace(api, cli)
        raise FlatlensError(line) from None


def _check_hessian_cli(args: Any, names: list[str]) -> None:
    with _flag_errors():
        L.check_eigen_args(2**62, args.k, args.k_bottom, tol=args.tol, max_iter=args.eig_max_iter, stop=args.eig_stop)


def _check_density_cli(args: Any, names: list[str]) -> None:
    with _flag_errors():
        L.check_density_args(args.density_probes, args.density_steps, grid=args.density_grid, sigma=args.density_sigma)


def _cli_progress(ctx: Any, total: int, desc: str):
    bar = ctx.progress(total, desc)
    return bar, (lambda n: bar.update(n))


def _tagged(results: Any, ctx: Any) -> list[_Stored]:
    """``results`` carrying the step's settings fingerprint, stored with them (see :func:`_stored_rows`)."""
    for r in results:
        r.options = ctx.fingerprint
    return list(results)


def _output(*results: _Stored, ctx: Any):
    from flatlens.measure.registry import MeasureOutput

    if ctx.is_main:
        write(ctx.out, *_tagged(results, ctx), replace=True)  # checked before the run (--replace)
    rows = [(r.MEASURE, label, value) for r in results for label, value in r.summary()]
    return MeasureOutput(group=GROUP, datasets={}, attrs={}, summary=rows, written=True)


_GROUP_MEASURES = ("hessian", "trace", "density")
"""The measures that share ``/hessian``."""


def _setup(obj: Any, args: Any) -> dict[str, Any]:
    """The shared attributes this command's results get (the Objective's provenance and --seed)."""
    return {**obj.describe(), "seed": args.seed}


def _drops_others(obj: Any, args: Any, out: Any, names: list[str]) -> str | None:
    """Why this run would drop measures ``out:/hessian`` holds for another setup (see
    :attr:`flatlens.measure.registry.Measure.conflicts`), or None."""
    from flatlens.measure.hessian import describe_drop, dropped_by

    setup = _setup(obj, args)
    lost, differ = dropped_by(out, setup, [n for n in names if n in _GROUP_MEASURES])
    return describe_drop(out, setup, lost, differ) if lost else None


def _stored_rows(obj: Any, args: Any, out: Any, fingerprint: str, members: list[str]) -> list[tuple[str, ...]] | None:
    """The stored summary rows of ``members`` when ``out:/hessian`` holds every one of them with this
    ``fingerprint`` (flatlens version, step, options) on this Objective's setup (:data:`SHARED_KEYS`: split,
    sample subset, parameters, space, checkpoint, seed), else None. Device, kernel, batch size and thread
    count are not compared: they change rounding, not what is measured."""
    import json

    from flatlens import store
    from flatlens.measure.hessian import _COST_PREFIXES, SHARED_KEYS, stored_attrs

    stored = stored_attrs(out)
    if stored is None or store.differing_attrs(_setup(obj, args), stored, SHARED_KEYS):
        return None
    rows: list[tuple[str, ...]] = []
    for m in sorted(members, key=list(_COST_PREFIXES).index):  # the order a run prints its results in
        prefix = _COST_PREFIXES[m]
        if stored.get(f"{prefix}options") != fingerprint or f"{prefix}summary" not in stored:
            return None
        rows += [tuple(r) for r in json.loads(stored[f"{prefix}summary"])]
    return rows


def lanczos_vector_passes(steps: int) -> int:
    """Vector passes of ``steps`` Lanczos steps with full reorthogonalisation: two Gram-Schmidt passes of a
    dot and an axpy against ``j + 1`` vectors at step ``j``, plus the step's own (~15; calibrated on 11 M
    parameters: 2,336 passes measured for 30 steps, 2,310 by this count)."""
    return sum(4 * (j + 1) + 15 for j in range(steps))


def probe_vector_passes(basis: int) -> int:
    """Vector passes of one residual probe after a basis of ``basis`` vectors (its draw apart): the projections
    of the probe and of its image (a dot and an axpy each against the basis, ~6 passes per basis vector as
    one unblocked product) and the products, sums and variance terms (~28). Calibrated on 11 M parameters:
    94 passes measured without a basis, 263 with 30 vectors (the draw included)."""
    return 6 * basis + 28


def _trace_vector_passes(args: Any, n: int, basis: int | None = None) -> int:
    """Vector passes of a trace of ``args.max_hvp`` HVPs (``basis``: a shared Krylov basis of that size)."""
    if args.trace_method == "gauss-newton":
        return 0
    budget = args.max_hvp
    if basis is not None:  # spectrum(): residual probes after the density's basis, or the exact basis
        return lanczos_vector_passes(min(n, budget)) if n <= budget else budget * probe_vector_passes(basis)
    if args.trace_method == "krylov":
        k = n if n <= budget else budget // 3
        return lanczos_vector_passes(k) + max(budget - k, 0) * probe_vector_passes(k)
    if args.trace_method == "hutchpp":
        k = min(n, budget // 3)
        return 4 * k * k + 6 * k + max(budget - 2 * k, 0) * probe_vector_passes(k)  # sketch, its QR, the probes
    if args.trace_method == "xtrace":
        k = min(n, budget // 2)
        return 8 * k * k + 10 * k  # the sketch's QR and its leave-one-out downdates
    return budget * probe_vector_passes(0)


def _register() -> None:
    from flatlens.measure.registry import Estimate, Joint, Measure, register, register_joint

    def est_hessian(obj: Any, args: Any) -> Estimate:
        k = args.k + args.k_bottom
        cap = args.eig_max_iter or max(50, 4 * k + 20)
        # typical counts: ~3 steps per top value; the bottom of a Hessian spectrum is a bulk near zero, which
        # takes ~15-25 steps for the first value (tiny CNNs on the digits, tol 1e-3)
        typical = 3 * args.k + 3 + (12 + 3 * args.k_bottom if args.k_bottom else 0)
        rule = "its r^2/gap estimate meets" if args.eig_stop == "gap" else "certified to"
        return Estimate(n_hvp=min(cap, typical), n_vector=lanczos_vector_passes(min(cap, typical)), n_draw=1,
                        gradient_start=resolved_start(args.eig_start, args.k_bottom) == "gradient",
                        note=f"typical; Lanczos stops when {rule} --tol {args.tol:g}; at most {cap}")

    def run_hessian(obj: Any, args: Any, ctx: Any):
        k = args.k + args.k_bottom
        bar, prog = _cli_progress(ctx, args.eig_max_iter or max(50, 4 * k + 20), "hessian")
        try:
            res = eigenvalues(obj, args.k, args.k_bottom, tol=args.tol, seed=args.seed, max_iter=args.eig_max_iter,
                              stop=args.eig_stop, start=args.eig_start, progress=prog)
        finally:
            bar.close()
        return _output(res, ctx=ctx)

    def est_trace(obj: Any, args: Any) -> Estimate:
        if args.trace_method == "gauss-newton":
            from flatlens.measure.gauss_newton import predicted_seconds

            return Estimate(seconds=predicted_seconds(obj, per_sample=args.gauss_newton_per_sample),
                            state_bytes=8 * obj.space.numel, note="exact Gauss-Newton diagonal: C-1 per-sample "
                            f"vector-Jacobian products for each of {obj.n_local} samples, timed on the first ones")
        return Estimate(n_hvp=args.max_hvp, n_vector=_trace_vector_passes(args, obj.space.numel), n_draw=args.max_hvp,
                        at_most=bool(args.trace_rtol or args.layer_rtol),
                        note=(f"stops at ±{args.trace_rtol:g} relative" if args.trace_rtol else "a fixed budget")
                        + f" ({args.trace_method})")

    def run_trace(obj: Any, args: Any, ctx: Any):
        gn = args.trace_method == "gauss-newton"
        bar, prog = _cli_progress(ctx, obj.n_local if gn else args.max_hvp, "trace (samples)" if gn else "trace")
        try:
            res = trace(obj, args.trace_method, rtol=args.trace_rtol or None, max_hvp=args.max_hvp, seed=args.seed,
                        level=args.trace_level, layers=args.layers if args.trace_method != "xtrace" else "none",
                        layer_rtol=args.layer_rtol, per_sample=args.gauss_newton_per_sample, progress=prog)
        finally:
            bar.close()
        return _output(res, ctx=ctx)

    def est_density(obj: Any, args: Any) -> Estimate:
        return Estimate(n_hvp=args.density_probes * args.density_steps,
                        n_vector=args.density_probes * lanczos_vector_passes(args.density_steps),
                        n_draw=args.density_probes,
                        note=f"{args.density_probes} probe{'s' if args.density_probes != 1 else ''} x {args.density_steps} Lanczos steps")

    def run_density(obj: Any, args: Any, ctx: Any):
        bar, prog = _cli_progress(ctx, args.density_probes * args.density_steps, "density")
        try:
            res = density(obj, args.density_probes, args.density_steps, grid=args.density_grid,
                          sigma=args.density_sigma, seed=args.seed, progress=prog)
        finally:
            bar.close()
        return _output(res, ctx=ctx)

    def check_trace(args: Any, names: list[str]) -> None:
        if args.trace_method == "gauss-newton":  # exact: no stopping rule, no HVP budget
            return
        if args.trace_method == "xtrace" and args.layer_rtol is not None:
            raise FlatlensError("--layer-rtol needs per-layer traces, which --trace-method xtrace does not give; "
                                "use krylov, hutchpp or hutchinson")
        shared = "trace" in covers_spectrum(args, names)  # residual probes after the shared runs: 1 is enough
        with _flag_errors():
            _check_trace_args(args.trace_rtol, args.layer_rtol, args.trace_level, 2, 1, 0.0)
            L._check_int("max_hvp", args.max_hvp, 1 if shared else 2, "pass the most HVPs the estimate may use")

    def completed(name: str):
        return lambda obj, args, out, fingerprint: _stored_rows(obj, args, out, fingerprint, [name])

    register(Measure("hessian", "top-k / bottom-k Hessian eigenvalues (Lanczos, certified)", _add_hessian_args,
                     est_hessian, run_hessian, _check_hessian_cli, completed("hessian"), _drops_others))
    register(Measure("trace", "Hessian trace with a 95% CI (krylov, Hutch++, XTrace, Hutchinson) or exact "
                     "(gauss-newton), per-layer traces, QGen noise terms", _add_trace_args, est_trace, run_trace,
                     check_trace, completed("trace"), _drops_others))
    register(Measure("density", "spectral density (stochastic Lanczos quadrature)", _add_density_args,
                     est_density, run_density, _check_density_cli, completed("density"), _drops_others))

    def covers_spectrum(args: Any, names: list[str]) -> list[str]:
        if not getattr(args, "shared_krylov", True) or "density" not in names:
            return []
        return [n for n in names if n == "density" or (n == "hessian" and getattr(args, "eig_start", "auto") != "gradient")
                or (n == "trace" and args.trace_method in ("hutchpp", "krylov"))]  # others (gauss-newton...) run apart

    def est_spectrum(obj: Any, args: Any, members: list[str]) -> Estimate:
        dens = args.density_probes * args.density_steps
        extra = args.max_hvp if "trace" in members else 0
        n_vector = args.density_probes * lanczos_vector_passes(args.density_steps)
        if extra:
            n_vector += _trace_vector_passes(args, obj.space.numel, basis=args.density_steps)
        note = f"{dens} SLQ HVPs shared by {', '.join(members)}" + (
            f"; at most {extra} trace residual probes, stops at ±{args.trace_rtol:g}" if extra else "")
        return Estimate(n_hvp=dens + extra, n_vector=n_vector, n_draw=args.density_probes + extra, note=note,
                        at_most=bool(extra and (args.trace_rtol or args.layer_rtol)))

    def run_spectrum(obj: Any, args: Any, ctx: Any, members: list[str]):
        bar, prog = _cli_progress(ctx, est_spectrum(obj, args, members).n_hvp, "+".join(members))
        try:
            res = spectrum(obj, args.density_probes, args.density_steps, eigen="hessian" in members, k=args.k,
                           k_bottom=args.k_bottom, tol=args.tol, eig_max_iter=args.eig_max_iter, stop=args.eig_stop,
                           trace="trace" in members, rtol=args.trace_rtol or None, max_hvp=args.max_hvp,
                           level=args.trace_level, layers=args.layers, layer_rtol=args.layer_rtol,
                           grid=args.density_grid, sigma=args.density_sigma, seed=args.seed, progress=prog,
                           on_ready=(lambda done: write(ctx.out, *_tagged(done, ctx), replace=True)) if ctx.is_main else None)
        finally:
            bar.close()
        return _output(*res.results, ctx=ctx)

    register_joint(Joint("spectrum", covers_spectrum, est_spectrum, run_spectrum, _stored_rows))


_register()
