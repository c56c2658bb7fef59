"""Directions of a loss landscape: seeded random (filter/layer/none-normalized), towards other
checkpoints, and principal components of a training trajectory.

A direction is one tensor per perturbed parameter, keyed by parameter *name* (never by position), in
the order of the :class:`~flatlens.measure.params.ParamSpace` it moves.

Random directions (Li et al. 2018, arXiv:1712.09913):

* every parameter's Gaussian entries come from its own CPU ``torch.Generator`` seeded from
  ``(seed + repeat, "landscape", axis, parameter name)``, drawn in float32 -- so a direction is a pure
  function of the seed, axis, name and shape (identical on every host and device, and unchanged when
  other parameters join or leave the selection); repeat ``k`` uses seed ``base + k`` (the reference
  tool's ``--idx`` reused one hard-wired seed);
* ``filter`` normalization scales each output filter (slice along dim 0: a conv's ``in × k × k``
  kernel, a Linear's row of weights into one unit) to the Frobenius norm of the same filter of the
  weights, ``d_i <- d_i · ‖w_i‖ / ‖d_i‖``, exactly (the reference adds 1e-10 to the denominator); a
  filter whose weights are all zero gets a zero direction (its scale is 0; the count is recorded).
  One-dimensional parameters (biases, norm affine parameters, when not ignored) are normalized as a
  whole, like ``layer``. ``layer`` scales each tensor to the norm of its weights; ``none`` keeps the
  raw Gaussian. Normalization runs in float64 on the CPU, then the result is cast to the parameter's
  dtype;
* optional Gram-Schmidt of y against x after normalization (which then slightly breaks y's filter
  norms); the cosine before and after is recorded.

Checkpoint directions are differences of parameter values, unnormalized: ``θ_B − θ_A`` (interpolation,
also beyond the ends), ``θ_B − θ_A`` and ``θ_C − θ_A`` (the plane through three checkpoints), and the
first principal components of ``θ_t − θ_A`` over a run's saved checkpoints (explained variance, the
checkpoints' plane coordinates and their distance from the plane are recorded).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flatlens.errors import FlatlensError
from flatlens.measure.params import parameter_groups, update_sha256
from flatlens.seeding import check_seed, generator

NORMS = ("filter", "layer", "none")
KINDS = ("random", "interpolation", "plane", "pca")
IGNORE_POLICIES = ("none", "biasbn", "bias", "norm", "scales")
AXES = ("x", "y")


@dataclass
class Directions:
    """The directions of a surface: one list of tensors per axis, in the order of ``names``.

    ``buffer_names`` / ``buffer_axes``: BatchNorm running statistics moved along with the parameters
    (checkpoint directions with ``bn_stats="interpolate"``), so that the point (1, 0) is exactly the
    other checkpoint. ``info`` holds attributes to record, ``datasets`` extra arrays (trajectory,
    marked points, explained variance).
    """

    kind: str
    names: list[str]
    axes: list[list[Tensor]]
    info: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    buffer_names: list[str] = field(default_factory=list)
    buffer_axes: list[list[Tensor]] = field(default_factory=list)
    suggested_ranges: list[tuple[float, float]] | None = None

    @property
    def dims(self) -> int:
        return len(self.axes)

    def sha256(self) -> str:
        """Hash of every direction tensor (names, dtypes, shapes, bytes): the identity checked on resume."""
        h = hashlib.sha256()
        for axis, (tensors, buffers) in enumerate(zip(self.axes, self.buffer_axes or [[]] * self.dims)):
            for name, t in list(zip(self.names, tensors)) + list(zip(self.buffer_names, buffers)):
                h.update(f"{axis}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
                update_sha256(h, t)
        return h.hexdigest()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> list[list[Tensor]]:
        """The axes' tensors on ``device`` (what ``ParamSpace.set_offset`` takes)."""
        return [[t.to(device=device, dtype=dtype or t.dtype) for t in axis] for axis in self.axes]


# -- parameter selection --------------------------------------------------------------------------

def landscape_parameters(model: nn.Module, ignore: str = "biasbn", kind: str = "random", space: str = "latent",
                         restrict: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters a surface moves, after the ``ignore`` policy.

    The candidates are the layers' weights, their biases and the norm layers' affine parameters (random
    and PCA directions; parameters of group ``other`` only when ``restrict`` names them, i.e. when the
    Objective's selection includes them, as the Objective warns), or every trainable parameter
    including quantizer step sizes (interpolation and plane: so that the far end is exactly the other
    checkpoint); ``space="scales"`` moves only step sizes. ``ignore`` is a comma-separated list of
    ``none``, ``biasbn`` (= ``bias`` + ``norm``), ``bias``, ``norm``, ``scales``, or regular expressions
    on parameter names. ``restrict`` (optional) keeps only these names (an Objective's own selection).
    """
    groups = parameter_groups(model)
    if space == "scales":
        base = list(groups["scales"])
    elif kind in ("interpolation", "plane"):
        base = list(groups["all"])
    else:
        chosen = set(groups["weights"]) | set(groups["biases"]) | set(groups["norm"])
        chosen |= set(groups["other"]) & set(restrict or ())
        base = [n for n in groups["all"] if n in chosen]
    drop: set[str] = set()
    for token in [t.strip() for t in str(ignore).split(",") if t.strip()]:
        if token == "none":
            continue
        if token in ("biasbn", "bias"):
            drop |= set(groups["biases"])
        if token in ("biasbn", "norm"):
            drop |= set(groups["norm"])
        if token == "scales":
            drop |= set(groups["scales"])
        if token in IGNORE_POLICIES:
            continue
        try:
            pattern = re.compile(token)
        except re.error:
            pattern = None
        hits = {n for n in groups["all"] if pattern is not None and pattern.search(n)}
        if not hits:
            raise FlatlensError(f"--ignore {token!r} is neither a policy ({', '.join(IGNORE_POLICIES)}) nor a regular "
                                "expression matching a parameter name, e.g. " + ", ".join(groups["all"][:3]))
        drop |= hits
    names = [n for n in base if n not in drop]
    if restrict is not None:
        keep = set(restrict)
        names = [n for n in names if n in keep]
    if not names:
        raise FlatlensError(f"--ignore {ignore!r} leaves no parameter to move (candidates: "
                            + ", ".join(base[:5]) + (" ..." if len(base) > 5 else "") + ")")
    return names


# -- random directions ----------------------------------------------------------------------------

def gaussian(names: Sequence[str], shapes: Sequence[Sequence[int]], seed: int, axis: str, repeat: int = 0) -> list[Tensor]:
    """Standard normal float32 CPU tensors, one per parameter, each from its own seeded generator."""
    return [torch.randn(tuple(shape), generator=generator(int(seed) + int(repeat), "landscape", axis, name),
                        dtype=torch.float32) for name, shape in zip(names, shapes)]


def normalize(d: Tensor, w: Tensor, norm: str) -> tuple[Tensor, int]:
    """``d`` rescaled to the weights ``w`` (``filter``/``layer``/``none``); float64 on the CPU.

    Returns the direction and the number of zero-norm weight filters (which get a zero direction).
    """
    if norm not in NORMS:
        raise FlatlensError(f"unknown normalization {norm!r}; choose from {', '.join(NORMS)}")
    d = d.detach().to("cpu", torch.float64)
    w = w.detach().to("cpu", torch.float64)
    if norm == "none":
        return d, 0
    if norm == "filter" and d.dim() >= 2:
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
        return d * scale.view(-1, *([1] * (d.dim() - 1))), int((wn == 0).sum())
    dn, wn = d.norm(), w.norm()
    if float(dn) == 0.0 or float(wn) == 0.0:
        return torch.zeros_like(d), int(float(wn) == 0.0)
    return d * (wn / dn), 0


def flat_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    na, nb = math.sqrt(flat_dot(a, a)), math.sqrt(flat_dot(b, b))
    return flat_dot(a, b) / (na * nb) if na > 0 and nb > 0 else 0.0


def orthogonalize(x: Sequence[Tensor], y: Sequence[Tensor]) -> list[Tensor]:
    """``y`` minus its projection on ``x`` (Gram-Schmidt over the whole flattened vector)."""
    xx = flat_dot(x, x)
    c = flat_dot(x, y) / xx if xx > 0 else 0.0
    return [(yi.double() - c * xi.double()).to(yi.dtype) for xi, yi in zip(x, y)]


def random_directions(names: Sequence[str], origin: Sequence[Tensor], dims: int = 2, norm: str = "filter",
                      seed: int = 0, repeat: int = 0, orthogonal: bool = False) -> Directions:
    """Seeded Gaussian directions normalized to the weights ``origin`` (see module doc)."""
    if dims not in (1, 2):
        raise FlatlensError(f"--dim must be 1 or 2, got {dims}")
    if repeat < 0:
        raise FlatlensError(f"--repeat must be >= 0, got {repeat}")
    seed = check_seed(seed)
    check_seed(seed + int(repeat), "seed + repeat")  # the direction seed, recorded
    shapes = [tuple(w.shape) for w in origin]
    axes, zero_filters = [], 0
    for axis in AXES[:dims]:
        tensors = []
        for d, w in zip(gaussian(names, shapes, seed, axis, repeat), origin):
            nd, zeros = normalize(d, w, norm)
            zero_filters += zeros if axis == "x" else 0
            tensors.append(nd.to(w.dtype))
        axes.append(tensors)
    info: dict[str, Any] = {"direction_seed": int(seed) + int(repeat), "base_seed": int(seed), "repeat": int(repeat),
                            "norm": norm, "zero_norm_filters": zero_filters, "orthogonalized": bool(orthogonal)}
    if dims == 2:
        info["cosine"] = info["cosine_raw"] = cosine(axes[0], axes[1])
        if orthogonal:
            axes[1] = orthogonalize(axes[0], axes[1])
            info["cosine"] = cosine(axes[0], axes[1])
    return Directions("random", list(names), axes, info)


# -- checkpoint directions ------------------------------------------------------------------------

@dataclass
class CheckpointValues:
    """Parameter and BN-statistic values of another checkpoint, by name, in the analysed space."""

    path: str
    sha256: str
    step: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    quantizers: dict[str, bool] = field(default_factory=dict)
    """Each quantizer's name and whether it is on, in the analysed space (the function B computes)."""


def quantizer_states(model: nn.Module) -> dict[str, bool]:
    """``{quantizer name: enabled}`` of a model (empty for a float model)."""
    from flatlens.quant import iter_quantizers

    return {name: q.is_enabled() for name, q in iter_quantizers(model)}


def _describe_quantizers(states: dict[str, bool]) -> str:
    on = sum(states.values())
    if not states:
        return "no quantizers"
    return f"{len(states)} quantizers, " + ("all on" if on == len(states) else "all off" if on == 0 else f"{on} on")


def _check_same_function(model: nn.Module, target: CheckpointValues) -> None:
    """The moving model evaluates every point with its own quantizers; unless the target's are the same
    and in the same state, coordinate 1 is B's weights seen through the origin's quantizer state, not B.
    (Interpolating a QAT run's init.pt, quantizers off, to its model.pt used to end at model.pt's latent
    weights without quantization: another loss than model.pt's.)"""
    mine = quantizer_states(model)
    if target.quantizers == mine:
        return
    if not mine or not target.quantizers:
        fix = "a float and a quantized model cannot share one line; compare them through two files (flatlens plot --compare)"
    elif set(mine) == set(target.quantizers) and not any(n.endswith("act_quantizer") for n in mine):
        fix = ("use --space dequant: both ends then hold their own quantized weights with the quantizers off, so the "
               "line ends exactly at B")
    else:
        fix = "choose checkpoints whose quantizers match"
    raise FlatlensError(f"{target.path} computes with {_describe_quantizers(target.quantizers)}, the analysed model "
                        f"with {_describe_quantizers(mine)}: the line would not end at B's function; {fix}")


def _bn_buffer_names(model: nn.Module) -> list[str]:
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [f"{mname}.running_mean" if mname else "running_mean", f"{mname}.running_var" if mname else "running_var"]
    return out


def load_values(path: str | Path, space: str = "latent") -> CheckpointValues:
    """Rebuild checkpoint ``path`` (no data) and take its parameters and BN statistics by name.

    In the ``dequant`` space the values are those of its dequantized copy (weights = w_q).
    """
    from flatlens.checkpoint import load_checkpoint

    run = load_checkpoint(path, device="cpu", data=False)
    model = run.model
    if space == "dequant":
        from flatlens.quant import dequantized_copy, iter_quantizers

        if not any(True for _ in iter_quantizers(model)):
            raise FlatlensError(f"{path} has no quantizers, so it has no dequantized weights; use --space latent")
        model = dequantized_copy(model)
    bufs = dict(model.named_buffers())
    return CheckpointValues(str(path), run.sha256, run.step,
                            {n: p.detach().clone() for n, p in model.named_parameters()},
                            {n: bufs[n].detach().clone() for n in _bn_buffer_names(model) if n in bufs},
                            quantizer_states(model))


def _difference(names: Sequence[str], origin: Sequence[Tensor], other: CheckpointValues) -> list[Tensor]:
    out = []
    for name, w in zip(names, origin):
        if name not in other.params:
            raise FlatlensError(f"{other.path} has no parameter {name!r} (another architecture?); leave it out with "
                                f"--ignore, e.g. --ignore scales")
        v = other.params[name]
        if tuple(v.shape) != tuple(w.shape):
            raise FlatlensError(f"{other.path}: parameter {name!r} has shape {tuple(v.shape)}, the analysed model "
                                f"{tuple(w.shape)}; the checkpoints must share an architecture")
        out.append(v.to("cpu", w.dtype) - w.detach().cpu())
    return out


VAR_FLOOR = 1e-30


def _buffer_difference(model: nn.Module, other: CheckpointValues) -> tuple[list[str], list[Tensor]]:
    """BN statistics of ``other`` minus the model's: running means linearly, running variances as the
    difference of their logarithms (they move geometrically, so they stay positive beyond the ends)."""
    bufs = dict(model.named_buffers())
    names = [n for n in _bn_buffer_names(model) if n in other.buffers]
    out = []
    for n in names:
        a, b = bufs[n].detach().cpu(), other.buffers[n].to("cpu", bufs[n].dtype)
        if n.endswith("running_var"):
            out.append(b.clamp_min(VAR_FLOOR).log() - a.clamp_min(VAR_FLOOR).log())
        else:
            out.append(b - a)
    return names, out


def checkpoint_directions(model: nn.Module, names: Sequence[str], origin: Sequence[Tensor],
                          targets: Sequence[CheckpointValues], orthogonal: bool = False,
                          bn_stats: str = "interpolate") -> Directions:
    """Interpolation (one target) or the plane through the origin and two targets (unnormalized).

    ``bn_stats="interpolate"`` moves the BN running statistics along with the parameters, so that
    coordinates (1, 0) and (0, 1) are the targets: means linearly, variances geometrically
    (``log var`` linearly), so that extrapolated variances stay positive -- the reference tool's
    ``states`` directions move them linearly, and beyond the ends they turn negative and give NaN.
    ``"origin"`` keeps the origin's statistics.
    """
    if bn_stats not in ("interpolate", "origin"):
        raise FlatlensError(f"--bn-stats must be interpolate or origin, got {bn_stats!r}")
    for t in targets:
        _check_same_function(model, t)
    axes = [_difference(names, origin, t) for t in targets]
    kind = "interpolation" if len(targets) == 1 else "plane"
    buffer_names, buffer_axes = [], []
    if bn_stats == "interpolate":
        for t in targets:
            buffer_names, diff = _buffer_difference(model, t)
            buffer_axes.append(diff)
    norms = [math.sqrt(flat_dot(a, a)) for a in axes]
    if any(n == 0 for n in norms):
        raise FlatlensError("a target checkpoint has exactly the origin's parameters (zero direction); "
                            "choose different checkpoints")
    info: dict[str, Any] = {"norm": "none", "targets": [t.path for t in targets], "target_sha256": [t.sha256 for t in targets],
                            "target_steps": [t.step for t in targets], "bn_stats": bn_stats,
                            "direction_norms": norms, "orthogonalized": bool(orthogonal)}
    labels = ["origin", "B"] if kind == "interpolation" else ["A (origin)", "B", "C"]
    points = [[0.0, 0.0], [1.0, 0.0]] + ([[0.0, 1.0]] if kind == "plane" else [])
    if kind == "plane":
        info["cosine"] = info["cosine_raw"] = cosine(axes[0], axes[1])
        if orthogonal:
            c = flat_dot(axes[0], axes[1]) / flat_dot(axes[0], axes[0])
            axes[1] = orthogonalize(axes[0], axes[1])
            if buffer_axes:
                buffer_axes[1] = [b1 - c * b0 for b0, b1 in zip(buffer_axes[0], buffer_axes[1])]
            info["cosine"] = cosine(axes[0], axes[1])
            points[2] = [c, 1.0]
    datasets = {"points": np.asarray(points, dtype=np.float64), "point_labels": labels}
    return Directions(kind, list(names), axes, info, datasets, buffer_names, buffer_axes)


def trajectory_checkpoints(run_dir: str | Path) -> list[Path]:
    """``<run_dir>/checkpoints/step_NNNNNN.pt`` in step order (written with train.keep_checkpoints=true)."""
    d = Path(run_dir)
    if d.is_file():
        d = d.parent
    found = sorted((d / "checkpoints").glob("step_*.pt"))
    if len(found) < 3:
        raise FlatlensError(f"{d} holds {len(found)} saved checkpoints in checkpoints/; PCA directions need at least 3 "
                            "(train with --set train.keep_checkpoints=true)")
    return found


def pca_directions(names: Sequence[str], origin: Sequence[Tensor], trajectory: Sequence[CheckpointValues],
                   dims: int = 2) -> Directions:
    """The top principal components of ``θ_t − θ_origin`` over a trajectory (mean-centred, like
    sklearn's PCA used by the reference tool), as unit vectors; the sign of each makes the largest
    loading of its left singular vector positive (sklearn's ``svd_flip``)."""
    rows = [torch.cat([d.reshape(-1).double() for d in _difference(names, origin, t)]) for t in trajectory]
    M = torch.stack(rows)  # T x n
    Mc = M - M.mean(0, keepdim=True)
    G = Mc @ Mc.T
    evals, evecs = torch.linalg.eigh(G)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    if float(evals[dims - 1]) <= 0:
        raise FlatlensError(f"the trajectory spans fewer than {dims} directions; save more checkpoints")
    sizes = [int(w.numel()) for w in origin]
    axes, comps = [], []
    for k in range(dims):
        u = evecs[:, k]
        u = u * (1.0 if float(u[u.abs().argmax()]) >= 0 else -1.0)
        s = math.sqrt(float(evals[k]))
        v = (Mc.T @ u) / s
        comps.append(v)
        axes.append([p.reshape(w.shape).to(w.dtype) for p, w in zip(torch.split(v, sizes), origin)])
    V = torch.stack(comps, 1)  # n x dims, orthonormal
    coords = M @ V  # projection of theta_t - theta_origin on the plane
    off = (M - coords @ V.T).norm(dim=1)
    total = float(evals.sum())
    T = M.shape[0]
    info = {"norm": "none", "trajectory": [t.path for t in trajectory], "trajectory_sha256": [t.sha256 for t in trajectory],
            "explained_variance_ratio": [float(evals[k]) / total for k in range(dims)]}
    datasets = {"explained_variance": (evals[:dims] / max(T - 1, 1)).numpy(),
                "explained_variance_ratio": (evals[:dims] / total).numpy(),
                "singular_values": evals[:dims].sqrt().numpy(),
                "trajectory": coords.numpy(), "trajectory_steps": np.asarray([t.step for t in trajectory]),
                "trajectory_off_plane": off.numpy()}
    ranges = []
    for k in range(dims):
        lo, hi = float(min(coords[:, k].min(), 0.0)), float(max(coords[:, k].max(), 0.0))
        pad = 0.25 * (hi - lo) if hi > lo else 1.0
        ranges.append((lo - pad, hi + pad))
    return Directions("pca", list(names), axes, info, datasets, suggested_ranges=ranges)
