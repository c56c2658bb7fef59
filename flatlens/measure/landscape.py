"""Loss landscapes: 1-D and 2-D surfaces around a checkpoint, resumable and distributed.

``surface(obj, ...)`` evaluates ``L(θ + α·d_x + β·d_y)`` (loss, accuracy and the standard error of the
loss) on a grid, for directions from :mod:`flatlens.measure.directions`: seeded random ones
(filter/layer/none-normalized), the line towards another checkpoint (and beyond), the plane through
three checkpoints, or the principal plane of a training trajectory.

How it is made fast, exact and safe:

* the evaluation batches are cached tensors (the :class:`~flatlens.measure.objective.Objective`), the
  directions live on the device, and each point sets ``θ = origin + α d_x + β d_y`` in place with
  ``torch._foreach`` ops from the cached origin (never a state-dict load, never cumulative stepping);
  the point (0, 0) is the unperturbed model bit for bit, and the model is verified bit-identical
  afterwards (``ParamSpace.guard``);
* points are visited coarse to fine (:mod:`flatlens.measure.grid`) in blocks; with ``out=`` every block
  is written in place into NaN-pre-allocated datasets with a ``done`` mask and flushed, so a killed run
  keeps a complete coarser grid and rerunning the same call resumes, recomputing at most the block that
  was in flight. Every setting that defines the surface is stored; a rerun with another one is refused;
* under torch.distributed with an unsharded Objective (``shard=False``: every rank holds all samples),
  blocks are claimed dynamically from an atomic counter in the process group's store, so a slow rank
  does not hold the others up; results travel to rank 0 through the store and rank 0 alone writes.
  Each point is computed by one rank on the same data in the same order, so the file equals the
  one-process file. With a sharded Objective (``flatlens sharpness`` under torchrun) every rank takes
  part in every point instead;
* a warm-up times the evaluation and the predicted forward passes and ETA are logged before the grid
  starts; the actual counts and seconds are stored (cumulative over resumed sessions).

HDF5 layout of ``/landscape/<name>`` (see README.md, "The HDF5 layout"): ``xcoordinates`` (nx),
``ycoordinates`` (ny, 2-D only), ``loss``, ``accuracy``, ``loss_stderr`` and ``done`` of shape (nx,) or
(ny, nx) with ``[j, i] = f(x_i, y_j)``, ``level`` (coarse-to-fine level of each point),
``directions/x|y/<parameter name>``, ``param_names``, ``model_param_names``/``model_param_shapes``
(for the export to the reference tool's layout), kind-specific datasets (``points``, ``trajectory``,
``explained_variance_ratio``...), and attributes: the settings (``settings`` JSON plus each one flat),
direction provenance (seed, norm, cosine...), Objective provenance, costs, ``origin_loss``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from flatlens import distributed as D
from flatlens.errors import FlatlensError, StoreError
from flatlens.measure.directions import (
    Directions, checkpoint_directions, landscape_parameters, load_values, pca_directions, random_directions,
    trajectory_checkpoints,
)
from flatlens.measure.grid import Axis, Schedule, parse_range, schedule
from flatlens.measure.params import ParamSpace, update_sha256
from flatlens.seeding import check_seed

GROUP_PREFIX = "landscape"
VALUE_NAMES = ("loss", "accuracy", "loss_stderr")
DEFAULT_RANGES = {"random": "-1:1:51", "interpolation": "-0.5:1.5:41", "plane": "-0.5:1.5:21", "pca": None}
PCA_POINTS = 21
MAX_POINTS = 1_000_000
"""Points of one surface at most: a million loss evaluations is hours even for a small model."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
"""A landscape name is one HDF5 group under /landscape and a figure file stem: no '/', no spaces."""
WARMUP_POINTS = 3
"""Timed evaluations before the grid (after one unperturbed pass); their median predicts the ETA."""


@dataclass
class Surface:
    """A computed (or partly computed) surface: coordinates, values, done mask and its attributes.

    Arrays are (nx,) for a line and (ny, nx) for a plane (rows are y). On ranks other than 0 of a
    distributed run the values are incomplete (rank 0 holds them all).
    """

    name: str
    dims: int
    x: np.ndarray
    y: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    loss_stderr: np.ndarray
    done: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def group(self) -> str:
        return f"{GROUP_PREFIX}/{self.name}"

    def summary(self) -> list[tuple[str, str]]:
        """Rows for a summary table."""
        lo = float(np.nanmin(self.loss)) if np.isfinite(self.loss).any() else float("nan")
        hi = float(np.nanmax(self.loss)) if np.isfinite(self.loss).any() else float("nan")
        shape = "x".join(str(s) for s in reversed(self.loss.shape))
        return [(f"{self.name}: grid", f"{shape} ({int(self.done.sum())}/{self.done.size} done)"),
                (f"{self.name}: origin loss", f"{self.attrs.get('origin_loss', float('nan')):.6f}"),
                (f"{self.name}: loss range", f"{lo:.4f} .. {hi:.4f}")]


# -- helpers --------------------------------------------------------------------------------------

def _weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer value (what the surface is a function of)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        update_sha256(h, t)
    return h.hexdigest()


def _names_sha256(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


class _BufferMover:
    """Moves BN running statistics along checkpoint directions and puts them back bit for bit.

    Running means move linearly; running variances geometrically (their directions hold differences
    of logarithms), so they stay positive however far the grid extrapolates.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], axes: Sequence[Sequence[Tensor]]) -> None:
        from flatlens.measure.directions import VAR_FLOOR

        bufs = dict(model.named_buffers())
        self.live = [bufs[n] for n in names]
        self.origin = [b.detach().clone() for b in self.live]
        self.axes = [[t.to(b.device, b.dtype) for t, b in zip(axis, self.live)] for axis in axes]
        self.is_var = [n.endswith("running_var") for n in names]
        self.base = [o.clamp_min(VAR_FLOOR).log() if v else o for o, v in zip(self.origin, self.is_var)]

    @torch.no_grad()
    def set(self, coefficients: Sequence[float]) -> None:
        if not self.live:
            return
        if all(c == 0.0 for c in coefficients):
            torch._foreach_copy_(self.live, self.origin)
            return
        torch._foreach_copy_(self.live, self.base)
        for d, c in zip(self.axes, coefficients):
            if c != 0.0:
                torch._foreach_add_(self.live, d, alpha=float(c))
        for b, v in zip(self.live, self.is_var):
            if v:
                b.exp_()

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.origin)


def _first_difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    for key in sorted(set(stored) | set(wanted)):
        if json.dumps(stored.get(key), sort_keys=True) != json.dumps(wanted.get(key), sort_keys=True):
            return key
    return None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- directions -----------------------------------------------------------------------------------

def make_directions(obj, names: Sequence[str], kind: str, dims: int, norm: str, seed: int = 0, repeat: int = 0,
                    orthogonal: bool = False, to: str | None = None, plane: Sequence[str] | None = None,
                    pca: str | None = None, bn_stats: str = "origin") -> Directions:
    """Build the directions of a surface for the parameters ``names`` of ``obj.model``."""
    params = dict(obj.model.named_parameters())
    origin = [params[n].detach().cpu() for n in names]
    space = obj.space.space
    if kind == "random":
        return random_directions(names, origin, dims, norm, seed, repeat, orthogonal)
    if kind == "interpolation":
        return checkpoint_directions(obj.model, names, origin, [load_values(to, space)], bn_stats=bn_stats)
    if kind == "plane":
        targets = [load_values(p, space) for p in plane]
        return checkpoint_directions(obj.model, names, origin, targets, orthogonal=orthogonal, bn_stats=bn_stats)
    trajectory = [load_values(p, space) for p in trajectory_checkpoints(pca)]
    return pca_directions(names, origin, trajectory, dims)


def _surface_kind(to: Any, plane: Any, pca: Any) -> str:
    """``random``, ``interpolation`` (``to``), ``plane`` or ``pca``: at most one of the three may be given."""
    kinds = [k for k, v in (("interpolation", to), ("plane", plane), ("pca", pca)) if v]
    if len(kinds) > 1:
        raise FlatlensError("give at most one of --to, --plane and --pca")
    return kinds[0] if kinds else "random"


def _check_name(name: Any) -> None:
    """``name`` becomes ``/landscape/<name>`` and figure stems: ``a/b`` made a nested group that no reader
    listed, ``""`` pointed at ``/landscape`` itself."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise FlatlensError(f"--name {name!r} is not a landscape name; use letters, digits and _ . + - "
                            "(e.g. random_2d_fine), starting with a letter or digit")


def _resolve(kind: str, dims: int | None, norm: str | None, ignore: str | None, bn_stats: str | None,
             orthogonalize: bool) -> tuple[int, str, str, str]:
    if dims is None:
        dims = {"random": 1, "interpolation": 1, "plane": 2, "pca": 2}[kind]
    if dims not in (1, 2):
        raise FlatlensError(f"--dim must be 1 or 2, got {dims}")
    if kind == "interpolation" and dims != 1:
        raise FlatlensError("--to gives a line (--dim 1); for a plane give two checkpoints with --plane B C")
    if kind == "plane" and dims != 2:
        raise FlatlensError("--plane gives a plane (--dim 2); for a line use --to B")
    if norm is None:
        norm = "filter" if kind == "random" else "none"
    elif kind != "random" and norm != "none":
        raise FlatlensError(f"--norm {norm} applies to random directions; directions between checkpoints are "
                            "their differences (use --norm none or leave it out)")
    if ignore is None:
        ignore = "none" if kind in ("interpolation", "plane") else "biasbn"
    if bn_stats not in (None, "interpolate", "origin"):
        raise FlatlensError(f"--bn-stats must be interpolate or origin, got {bn_stats!r}")
    if bn_stats is None:
        bn_stats = "interpolate" if kind in ("interpolation", "plane") else "origin"
    elif bn_stats == "interpolate" and kind not in ("interpolation", "plane"):
        raise FlatlensError("--bn-stats interpolate needs checkpoint directions (--to or --plane); random and PCA "
                            "surfaces keep the origin's running statistics")
    if orthogonalize and (kind == "interpolation" or (kind == "random" and dims == 1)):
        raise FlatlensError("--orthogonalize needs two directions (--dim 2 or --plane)")
    return dims, norm, ignore, bn_stats


# -- the surface ----------------------------------------------------------------------------------

def surface(obj, dims: int | None = None, grid: str | Axis | None = None, y_grid: str | Axis | None = None, *,
            norm: str | None = None, ignore: str | None = None, seed: int = 0, repeat: int = 0,
            orthogonalize: bool = False, to: str | Path | None = None, plane: Sequence[str | Path] | None = None,
            pca: str | Path | None = None, bn_stats: str | None = None, restrict: Sequence[str] | None = None,
            out: str | Path | None = None, name: str | None = None, overwrite: bool = False, block_size: int = 0,
            log: Callable[[str], None] | None = None, progress: Callable[..., Any] | None = None) -> Surface:
    """Evaluate a 1-D or 2-D loss surface of ``obj`` (an :class:`~flatlens.measure.objective.Objective`).

    Args:
        dims: 1 (line) or 2 (plane); default 1 for random and ``to``, 2 for ``plane`` and ``pca``.
        grid / y_grid: ``"min:max:num"`` per axis (y defaults to x); defaults: random ``-1:1:51``,
            ``to`` ``-0.5:1.5:41``, ``plane`` ``-0.5:1.5:21``, ``pca`` around the trajectory (21 points).
        norm: ``filter`` (default for random directions, Li et al.), ``layer`` or ``none``.
        ignore: parameters left out of the directions (``biasbn`` by default for random/PCA, ``none`` for
            checkpoint directions; see :func:`~flatlens.measure.directions.landscape_parameters`).
        seed, repeat: random directions use seed ``seed + repeat``.
        orthogonalize: Gram-Schmidt the second direction against the first (cosine stored).
        to / plane / pca: another checkpoint; two checkpoints; a run directory with saved checkpoints.
        bn_stats: ``interpolate`` (default for ``to``/``plane``: BN running statistics move too) or
            ``origin`` (kept; always for random/PCA).
        restrict: move only these parameter names (besides the ignore policy).
        out / name: write ``/landscape/<name>`` of this HDF5 file as it goes; rerunning resumes.
        overwrite: recompute from scratch even when the stored settings differ.
        block_size: points per block (0: about one second of work, at most 64).
        log / progress: a line printer; ``progress(total, desc)`` -> object with ``update(n)``/``close()``.
    """
    from flatlens import store
    from flatlens.measure.objective import require_objective

    require_objective(obj, "a loss surface")
    _check_counts(repeat, block_size)
    seed = check_seed(seed)
    say = log or (lambda _m: None)
    world = D.current()
    share = world.distributed and not obj.ctx.distributed  # unsharded Objective: share points over ranks
    is_main = world.is_main
    kind = _surface_kind(to, plane, pca)
    if kind == "plane" and len(plane) != 2:
        raise FlatlensError("--plane takes two checkpoints: --plane B C")
    dims, norm, ignore, bn_stats = _resolve(kind, dims, norm, ignore, bn_stats, orthogonalize)
    names = landscape_parameters(obj.model, ignore, kind, obj.space.space, restrict)
    space = obj.space if list(names) == list(obj.space.names) else ParamSpace(obj.model, names, obj.space.space)
    dirs = make_directions(obj, names, kind, dims, norm, seed, repeat, orthogonalize,
                           str(to) if to else None, [str(p) for p in plane] if plane else None,
                           str(pca) if pca else None, bn_stats)

    # grid
    x_axis = _axis(grid, kind, dirs, 0, "--range")
    if dims == 2:
        y_axis = _axis(y_grid if y_grid is not None else grid, kind, dirs, 1, "--y-range")
    else:
        if y_grid is not None:
            raise FlatlensError("--y-range needs --dim 2")
        y_axis = Axis(0.0, 0.0, 1)
    if x_axis.num * y_axis.num > MAX_POINTS:  # the schedule alone would need (NX*NY) int64s, then the evaluations
        raise FlatlensError(f"the grid has {x_axis.num:,} x {y_axis.num:,} = {x_axis.num * y_axis.num:,} points, more "
                            f"than the {MAX_POINTS:,} one surface may hold; use fewer points (e.g. -1:1:51)")
    sched = schedule(x_axis.num, y_axis.num)
    shape = (y_axis.num, x_axis.num) if dims == 2 else (x_axis.num,)
    xs, ys = x_axis.values, y_axis.values
    if name is None:
        name = {"random": f"random_{dims}d" + (f"_r{repeat}" if repeat else ""), "interpolation": "interpolation",
                "plane": "plane", "pca": f"pca_{dims}d"}[kind]
    _check_name(name)
    group = f"{GROUP_PREFIX}/{name}"

    info = obj.describe()
    settings = {
        "kind": kind, "dims": dims, "x": x_axis.as_list(), "y": y_axis.as_list() if dims == 2 else None,
        "norm": norm, "ignore": ignore, "space": obj.space.space, "param_names_sha256": _names_sha256(names),
        "split": info.get("split"), "n_samples": info.get("n_samples"), "subset_sha256": info.get("subset_sha256"),
        "checkpoint_sha256": info.get("checkpoint_sha256", ""), "model_sha256": _weights_sha256(obj.model),
        "bn_stats": bn_stats, "seed": int(seed) + int(repeat) if kind == "random" else None,
        "orthogonalize": bool(orthogonalize), "targets_sha256": dirs.info.get("target_sha256"),
        "trajectory_sha256": dirs.info.get("trajectory_sha256"),
    }
    dir_sha = dirs.sha256()
    static = _static_attrs(info, space, dirs, settings, dir_sha, dims, sched, shape)

    # the file: create, or check and resume (rank 0), and tell every rank what is left
    done = np.zeros(sched.shape, dtype=bool)
    grid_ds = None
    status: dict[str, Any] = {"error": None, "done": None, "sessions": 0, "prior": {}}
    if out is not None and is_main:
        try:
            status.update(_open_group(obj, out, group, shape, settings, dirs, dir_sha, names, xs, ys, dims,
                                      sched, static, overwrite))
        except FlatlensError as exc:
            status["error"] = str(exc)
    status = D.broadcast_object(world, status) if world.distributed else status
    if status["error"]:
        raise StoreError(status["error"])
    if status["done"] is not None:
        done = np.asarray(status["done"], dtype=bool).reshape(sched.shape)
    if out is not None and is_main:
        grid_ds = store.GridDatasets(out, group)

    loss = np.full(sched.shape, np.nan)
    acc = np.full(sched.shape, np.nan)
    se = np.full(sched.shape, np.nan)
    if status.get("values") is not None:
        loss[:], acc[:], se[:] = (np.asarray(v).reshape(sched.shape) for v in status["values"])

    dirs_dev = dirs.to(obj.device)
    movers = _BufferMover(obj.model, dirs.buffer_names, dirs.buffer_axes)
    timings = {"set": 0.0, "eval": 0.0, "points": 0}

    def point(coeffs: Sequence[float]) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        space.set_offset(dirs_dev, coeffs)
        movers.set(coeffs)
        t1 = time.perf_counter()
        value = obj.loss_and_accuracy()
        timings["set"] += t1 - t0
        timings["eval"] += time.perf_counter() - t1
        timings["points"] += 1
        return value

    def compute(block: np.ndarray) -> np.ndarray:
        vals = np.empty((3, len(block)), dtype=np.float64)
        for t, flat in enumerate(block.tolist()):
            j, i = divmod(int(flat), x_axis.num)
            coeffs = [float(xs[i])] + ([float(ys[j])] if dims == 2 else [])
            vals[:, t] = point(coeffs)
        return vals

    started = time.perf_counter()
    n_pending = int((~done).sum())
    with space.guard():
        try:
            # warm-up: the unperturbed loss (no parameter write at all), then a timed evaluation
            w0 = time.perf_counter()
            origin = obj.loss_and_accuracy()
            w1 = time.perf_counter()
            samples = []
            for _ in range(WARMUP_POINTS):
                t = time.perf_counter()
                point([0.0] * dims)
                samples.append(time.perf_counter() - t)
            t_point = statistics.median(samples)
            for k in timings:
                timings[k] = 0.0 if k != "points" else 0
            first_s = w1 - w0
            # blocks
            if is_main:
                bs = int(block_size) if block_size and block_size > 0 else max(1, min(64, int(1.0 / max(t_point, 1e-6))))
                if share:
                    bs = max(1, min(bs, math.ceil(n_pending / (4 * world.world_size)) if n_pending else 1))
            else:
                bs = 0
            bs = int(D.broadcast_object(world, bs)) if world.distributed else bs
            blocks = sched.blocks(done, bs)
            workers = world.world_size if share else 1
            eta = n_pending * t_point / workers
            say(f"landscape {name}: {kind} {dims}-D, {'x'.join(str(s) for s in reversed(shape))} grid, "
                f"{int(done.sum())} done, {n_pending} to do in {len(blocks)} blocks of <= {bs}; predicted "
                f"{n_pending} forward passes over {obj.n_samples} samples ({t_point:.3g} s each"
                + (f", {workers} ranks" if workers > 1 else "") + f") ≈ {_fmt_seconds(eta)}")

            bar = progress(n_pending, f"landscape {name}") if (progress and is_main) else None
            prior = status.get("prior", {})
            sessions = int(status.get("sessions", 0)) + 1
            if grid_ds is not None:
                grid_ds.set_attrs({"sessions": sessions})  # counts interrupted sessions too

            def cost_attrs() -> dict[str, Any]:
                return {"cost_n_forward": int(prior.get("cost_n_forward", 0)) + timings["points"] * (workers if share else 1),
                        "cost_seconds": float(prior.get("cost_seconds", 0.0)) + time.perf_counter() - started}

            def on_result(block: np.ndarray, vals: np.ndarray) -> None:
                j, i = np.divmod(block, x_axis.num)
                loss[j, i], acc[j, i], se[j, i] = vals
                done[j, i] = True
                if grid_ds is not None:
                    index = (j, i) if dims == 2 else (i,)
                    extra = {"n_done": int(done.sum()), "complete_level": sched.complete_level(done)}
                    if not share:
                        extra.update(cost_attrs())
                    grid_ds.write_points(index, {"loss": vals[0], "accuracy": vals[1], "loss_stderr": vals[2]}, extra)
                if bar is not None:
                    bar.update(len(block))

            if share:
                _share_blocks(world, blocks, compute, on_result)
            else:
                for block in blocks:
                    on_result(block, compute(block))
            if bar is not None:
                bar.close()
        finally:
            movers.restore()
    # costs (summed over ranks when they shared the points)
    counts = torch.tensor([float(timings["points"]), timings["set"], timings["eval"]], dtype=torch.float64)
    if share:
        D.all_reduce_sum(world, counts)
    seconds = time.perf_counter() - started
    n_points = int(counts[0])
    attrs: dict[str, Any] = {
        "origin_loss": origin[0], "origin_accuracy": origin[1], "origin_loss_stderr": origin[2],
        "complete_level": sched.complete_level(done), "n_done": int(done.sum()), "sessions": sessions,
        "cost_n_forward": int(prior.get("cost_n_forward", 0)) + n_points,
        "cost_n_warmup": int(prior.get("cost_n_warmup", 0)) + (1 + WARMUP_POINTS) * (workers if share else 1),
        "cost_seconds": float(prior.get("cost_seconds", 0.0)) + seconds,
        "cost_set_seconds": float(prior.get("cost_set_seconds", 0.0)) + float(counts[1]),
        "cost_eval_seconds": float(prior.get("cost_eval_seconds", 0.0)) + float(counts[2]),
        "last_session_points": n_points, "last_session_seconds": seconds, "last_session_predicted_seconds": eta,
        "last_session_block_size": bs, "last_session_world_size": workers,
        "seconds_per_point": (float(counts[1] + counts[2]) / n_points) if n_points else float("nan"),
        "warmup_first_seconds": first_s, "warmup_seconds_per_point": t_point,
    }
    if grid_ds is not None:
        grid_ds.set_attrs(attrs)
    say(f"landscape {name}: {n_points} points in {_fmt_seconds(seconds)} (predicted {_fmt_seconds(eta)}); "
        f"origin loss {origin[0]:.6f}" + (f" -> {out}:/{group}" if out is not None else ""))
    full_attrs = {**(grid_ds.attrs() if grid_ds is not None else static), **attrs, "param_names": list(names)}
    if dims == 1:
        return Surface(name, 1, xs, None, loss[0], acc[0], se[0], done[0], full_attrs, Path(out) if out else None)
    return Surface(name, 2, xs, ys, loss, acc, se, done, full_attrs, Path(out) if out else None)


def _auto_points(spec: str | Axis | None, kind: str, what: str) -> int | None:
    """Points of a PCA axis around the trajectory (``auto[:NUM]``, or no spec on a PCA surface); None for a
    ``MIN:MAX:NUM`` axis. ``auto`` on another kind of surface, or a bad NUM, is a FlatlensError."""
    text = str(spec) if spec is not None and not isinstance(spec, Axis) else None
    if not (kind == "pca" and spec is None) and not (text or "").startswith("auto"):
        return None
    if kind != "pca":
        raise FlatlensError(f"{what} auto is for --pca surfaces; give MIN:MAX:NUM")
    if not text or text == "auto":
        return PCA_POINTS
    try:
        num = int(text.split(":", 1)[1])
    except (ValueError, IndexError):
        num = 0
    if num < 1 or text.count(":") != 1:
        raise FlatlensError(f"{what} {text!r}: write auto or auto:NUM with NUM >= 1 (e.g. auto:21)")
    return num


def _axis(spec: str | Axis | None, kind: str, dirs: Directions, k: int, what: str) -> Axis:
    """A grid axis from ``MIN:MAX:NUM``, the kind's default, or (PCA) ``auto[:NUM]`` = around the trajectory."""
    num = _auto_points(spec, kind, what)
    if num is not None:
        lo, hi = dirs.suggested_ranges[k]
        return parse_range(f"{lo:.6g}:{hi:.6g}:{num}", what)
    return parse_range(spec if spec is not None else DEFAULT_RANGES[kind], what)


def _check_counts(repeat: Any, block_size: Any) -> None:
    """``repeat`` and ``block_size`` are ints >= 0 (a negative block size used to mean "automatic", silently)."""
    for what, value in (("--repeat", repeat), ("--block", block_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise FlatlensError(f"{what} must be an int >= 0, got {value!r}"
                                + (" (0: about one second of work per block)" if what == "--block" else ""))


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _static_attrs(info: dict[str, Any], space: ParamSpace, dirs: Directions, settings: dict[str, Any], dir_sha: str,
                  dims: int, sched: Schedule, shape: tuple[int, ...]) -> dict[str, Any]:
    """The attributes a landscape group starts with (parameter names and shapes go to datasets)."""
    drop = {"param_names", "param_shapes", "param_module_types"}
    attrs: dict[str, Any] = {
        "measure": "landscape", **{k: v for k, v in info.items() if k not in drop},
        **{k: v for k, v in space.describe().items() if k not in drop},
        **dict(dirs.info), **{f"setting_{k}": v for k, v in settings.items()},
        "settings": json.dumps(settings, sort_keys=True), "directions_sha256": dir_sha, "kind": dirs.kind,
        "dims": dims, "axes": "y,x" if dims == 2 else "x",
        "value_layout": "[j, i] = f(x_i, y_j)" if dims == 2 else "[i] = f(x_i)",
        "accuracy_units": "fraction", "loss_name": "mean cross-entropy",
        "level_strides": json.dumps([list(s) for s in sched.strides]), "level_sizes": sched.level_sizes(),
        "n_points": int(np.prod(shape)), "n_done": 0, "complete_level": -1, "sessions": 0,
        "scale_invariance": "filter/BN-rescaling and layer-wise ReLU rescaling" if settings["norm"] == "filter" else
        ("layer-wise rescaling" if settings["norm"] == "layer" else "none"),
    }
    for k in ("cost_n_forward", "cost_n_warmup", "cost_seconds", "cost_set_seconds", "cost_eval_seconds"):
        attrs[k] = 0 if k.endswith(("forward", "warmup")) else 0.0
    return attrs


def _open_group(obj, out, group: str, shape: tuple[int, ...], settings: dict[str, Any], dirs: Directions,
                dir_sha: str, names: Sequence[str], xs: np.ndarray, ys: np.ndarray, dims: int,
                sched: Schedule, attrs: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Create ``group`` (NaN + done mask) or check it against ``settings`` for a resume (rank 0)."""
    from flatlens import store

    path = store.ensure_file(out, store.checkpoint_provenance(obj.run))
    g = store.GridDatasets(path, group)
    with store.open_h5(path, "r") as f:
        present = group in f
        is_grid = present and "done" in f[group] and "settings" in f[group].attrs
    if present and not overwrite:
        if not is_grid:
            raise StoreError(f"{path}:/{group} exists and is not a landscape grid; choose another --name or --out, "
                             "or pass --overwrite")
        stored_attrs = g.attrs()
        stored = json.loads(stored_attrs["settings"])
        key = _first_difference(stored, settings)
        if key is not None:
            raise StoreError(f"{path}:/{group} was computed with {key}={_short(stored.get(key))}, this run asks "
                             f"{key}={_short(settings.get(key))}; write it elsewhere (--out or --name) or recompute "
                             "it with --overwrite")
        if stored_attrs.get("directions_sha256") != dir_sha:
            raise StoreError(f"{path}:/{group}: the regenerated directions differ from the stored ones (another torch "
                             "version?); write it elsewhere (--out or --name) or recompute it with --overwrite")
        with store.open_h5(path, "r") as f:
            gg = f[group]
            done = gg["done"][()]
            values = [gg[k][()] for k in VALUE_NAMES]
        prior = {k: stored_attrs.get(k, 0) for k in ("cost_n_forward", "cost_n_warmup", "cost_seconds",
                                                      "cost_set_seconds", "cost_eval_seconds")}
        return {"done": done, "values": values,
                "sessions": int(stored_attrs.get("sessions", 0)), "prior": prior}
    model_names = [n for n, _ in obj.model.named_parameters()]
    model_shapes = [",".join(str(s) for s in p.shape) for _, p in obj.model.named_parameters()]
    datasets: dict[str, Any] = {
        "xcoordinates": xs, "level": sched.level.reshape(shape) if dims == 2 else sched.level[0],
        "param_names": list(names), "model_param_names": model_names, "model_param_shapes": model_shapes,
        "directions": {axis: {**{n: t.cpu().numpy() for n, t in zip(names, tensors)},
                              "attrs": {"axis": axis, "kind": dirs.kind}}
                       for axis, tensors in zip(("x", "y"), dirs.axes)},
    }
    if dims == 2:
        datasets["ycoordinates"] = ys
    if dirs.buffer_names:
        datasets["buffer_directions"] = {axis: {**{n: t.cpu().numpy() for n, t in zip(dirs.buffer_names, tensors)},
                                                "attrs": {"running_var": "difference of natural logarithms"}}
                                         for axis, tensors in zip(("x", "y"), dirs.buffer_axes)}
    datasets.update(dirs.datasets)
    g.create(shape, VALUE_NAMES, datasets, attrs)
    return {"done": None, "values": None, "sessions": 0, "prior": {}}


def _share_blocks(world: D.DistContext, blocks: list[np.ndarray], compute: Callable[[np.ndarray], np.ndarray],
                  on_result: Callable[[np.ndarray, np.ndarray], None]) -> None:
    """Dynamic work sharing: ranks claim block numbers from an atomic counter in the default store;
    other ranks post their results to the store, rank 0 collects and handles them (writes)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    key = str(D.broadcast_object(world, f"flatlens/landscape/{uuid.uuid4().hex}"))
    n = len(blocks)
    received: set[int] = set()
    mine: set[int] = set()

    def drain() -> None:
        claimed = min(int(store.add(f"{key}/next", 0)), n)
        for k in range(claimed):
            if k in received or k in mine:
                continue
            rk = f"{key}/r{k}"
            if store.check([rk]):
                vals = np.frombuffer(store.get(rk), dtype=np.float64).reshape(3, -1)
                on_result(blocks[k], vals)
                received.add(k)
                store.delete_key(rk)

    while True:
        k = int(store.add(f"{key}/next", 1)) - 1
        if k >= n:
            break
        vals = compute(blocks[k])
        if world.is_main:
            on_result(blocks[k], vals)
            mine.add(k)
            drain()
        else:
            store.set(f"{key}/r{k}", vals.tobytes())
    if world.is_main:
        while len(received) + len(mine) < n:
            drain()
            if len(received) + len(mine) < n:
                time.sleep(0.002)
    dist.barrier()


# -- registration as a measure of `flatlens sharpness` --------------------------------------------

def add_measure_arguments(g) -> None:
    """``--landscape-*`` options of ``flatlens sharpness --measures landscape``."""
    g.add_argument("--landscape-dim", type=int, choices=(1, 2), default=None,
                   help="1 (line) or 2 (plane); default 1 for random/--landscape-to, 2 for plane/PCA")
    g.add_argument("--landscape-range", default=None, help="MIN:MAX:NUM of x, e.g. -1:1:51")
    g.add_argument("--landscape-y-range", default=None, help="MIN:MAX:NUM of y (default: as x)")
    g.add_argument("--landscape-norm", default=None, choices=("filter", "layer", "none"),
                   help="direction normalization (default filter for random directions)")
    g.add_argument("--landscape-ignore", default=None,
                   help="none | biasbn | bias | norm | scales | regex, comma-separated (default biasbn for random)")
    g.add_argument("--landscape-to", default=None, help="interpolate towards this checkpoint")
    g.add_argument("--landscape-plane", nargs=2, default=None, metavar=("B", "C"), help="plane through CKPT, B and C")
    g.add_argument("--landscape-pca", default=None, help="run directory: PCA of its saved checkpoints")
    g.add_argument("--landscape-repeat", type=int, default=0, help="repeat k uses seed --seed + k")
    g.add_argument("--landscape-orthogonalize", action="store_true", help="Gram-Schmidt y against x")
    g.add_argument("--landscape-bn-stats", default=None, choices=("interpolate", "origin"),
                   help="BN running statistics along checkpoint directions")
    g.add_argument("--landscape-name", default=None, help="group name under /landscape (default from the kind)")
    g.add_argument("--landscape-block", type=int, default=0, help="points per block (0: about 1 s of work)")
    g.add_argument("--landscape-overwrite", action="store_true", help="recompute even if stored settings differ")


_COMMAND_FLAGS = ("y-range", "range", "dim", "norm", "ignore", "to", "plane", "pca", "repeat", "orthogonalize",
                  "bn-stats", "name", "block", "overwrite")
_COMMAND_FLAG = re.compile(r"(?<![\w-])--(" + "|".join(_COMMAND_FLAGS) + r")(?![\w-])")


@contextmanager
def _measure_flags() -> Iterator[None]:
    """The landscape code's errors name ``flatlens landscape``'s options (``--range``); under ``flatlens
    sharpness --measures landscape`` the same options are ``--landscape-range`` etc., so rename them."""
    try:
        yield
    except FlatlensError as exc:  # same class (StoreError, CheckpointError, ...), renamed flags
        raise type(exc)(_COMMAND_FLAG.sub(r"--landscape-\1", str(exc))) from None


def _measure_kind(args) -> str:
    return _surface_kind(args.landscape_to, args.landscape_plane, args.landscape_pca)


def check_measure_arguments(args, names: list[str]) -> None:
    """The ``--landscape-*`` values, checked before the checkpoint is read (what :func:`surface` would
    refuse without loading anything), named by their flags."""
    with _measure_flags():
        kind = _measure_kind(args)
        dims = _resolve(kind, args.landscape_dim, args.landscape_norm, args.landscape_ignore, args.landscape_bn_stats,
                        args.landscape_orthogonalize)[0]
        for spec, what in ((args.landscape_range, "--range"), (args.landscape_y_range, "--y-range")):
            if spec is not None and _auto_points(spec, kind, what) is None:
                parse_range(spec, what)
        if args.landscape_y_range is not None and dims != 2:
            raise FlatlensError("--y-range needs --dim 2")
        _check_counts(args.landscape_repeat, args.landscape_block)


def _measure_points(args) -> int:
    kind = _measure_kind(args)
    dims = args.landscape_dim or (2 if kind in ("plane", "pca") else 1)

    def count(spec: str | None, what: str) -> int:
        num = _auto_points(spec, kind, what)
        return num if num is not None else parse_range(spec or DEFAULT_RANGES[kind], what).num

    nx = count(args.landscape_range, "--range")
    ny = count(args.landscape_y_range or args.landscape_range, "--y-range")
    return nx * (ny if dims == 2 else 1)


def _register() -> None:
    from flatlens.measure.registry import Estimate, Measure, MeasureOutput, register

    def estimate(obj, args) -> Estimate:
        with _measure_flags():
            n = _measure_points(args)
        return Estimate(n_forward=n + 1 + WARMUP_POINTS, note=f"{n} grid points + {1 + WARMUP_POINTS} warm-up passes")

    def run(obj, args, ctx) -> MeasureOutput:
        custom = bool(getattr(args, "params", None) or getattr(args, "exclude", None)
                      or getattr(args, "include", "weights") != "weights")
        with _measure_flags():
            surf = surface(obj, args.landscape_dim, args.landscape_range, args.landscape_y_range,
                           norm=args.landscape_norm, ignore=args.landscape_ignore, seed=getattr(args, "seed", 0),
                           repeat=args.landscape_repeat, orthogonalize=args.landscape_orthogonalize,
                           to=args.landscape_to, plane=args.landscape_plane, pca=args.landscape_pca,
                           bn_stats=args.landscape_bn_stats, restrict=obj.space.names if custom else None,
                           out=ctx.out, name=args.landscape_name,
                           overwrite=args.landscape_overwrite or getattr(args, "recompute", False),
                           block_size=args.landscape_block, log=ctx.log, progress=ctx.progress)
        return MeasureOutput(group=surf.group, datasets={}, attrs={}, summary=surf.summary(), written=True)

    register(Measure(name="landscape", help="1D/2D loss surfaces (random filter-normalized, interpolation, plane, PCA)",
                     add_arguments=add_measure_arguments, estimate=estimate, run=run,
                     check_args=check_measure_arguments))


_register()
