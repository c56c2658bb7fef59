"""Figures and exports from flatlens HDF5 files: loss landscapes as curves, contours and surfaces.

Reads the analysis file only (h5py + numpy; nothing of the engine or of torch) and draws with
matplotlib's object API on Agg canvases (no pyplot state, no backend switch, works headless), so it
runs the same in scripts, tests and notebooks. Works on numpy >= 2, matplotlib >= 3.8 and SciPy >= 1.14,
where the reference tool's plotters break (``Axes3D(fig)`` attaches no axes on current matplotlib and
gives a blank 3-D figure; ``interp2d`` is gone from SciPy).

* :func:`plot_1d` -- loss (± its standard error) and accuracy along a line, linear and log scale;
* :func:`plot_2d` -- contour lines, filled contours with labelled levels, and a 3-D surface;
* :func:`plot_spectrum` -- Hessian spectral densities (``/hessian/density``) with the top eigenvalues;
* :func:`plot_compare` -- several surfaces (e.g. a float and a QAT checkpoint) on shared axes and one
  colour scale: overlaid curves in 1-D, side-by-side panels with one colour bar in 2-D;
* :func:`export_loss_landscape` -- tomgoldstein/loss-landscape's surface + direction files;
* :func:`export_vtp` -- VTK XML PolyData (``.vtp``, binary or ASCII) for ParaView.

A surface still being computed is drawn from its finest complete coarse-to-fine level (the title says
so), never from a half-filled grid.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flatlens.density_curve import gaussian_mixture
from flatlens.errors import FlatlensError, StoreError
from flatlens import store
from flatlens.store import _decode  # one HDF5 attribute decoder for the whole package

FORMATS = ("png", "pdf", "svg")
GROUP_PREFIX = "landscape"


# -- reading --------------------------------------------------------------------------------------

@dataclass
class SurfaceData:
    """One ``/landscape/<name>`` group: coordinates, values (NaN where not done), and attributes."""

    file: Path
    name: str
    dims: int
    x: np.ndarray
    y: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    loss_stderr: np.ndarray
    done: np.ndarray
    level: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def finest_complete(self) -> "SurfaceData":
        """The finest coarse-to-fine level whose points are all done (the whole grid when complete)."""
        if self.complete:
            return self
        strides = json.loads(self.attrs.get("level_strides", "[[1, 1]]"))
        best = None
        for k, (sx, sy) in enumerate(strides):
            if bool(self.done[self.level <= k].all()):
                best = (k, sx, sy)
            else:
                break
        if best is None:
            raise FlatlensError(f"{self.file}:/{GROUP_PREFIX}/{self.name} has no complete level yet "
                                f"({int(self.done.sum())}/{self.done.size} points); wait or resume it")
        k, sx, sy = best
        if self.dims == 1:
            sl: tuple = (slice(None, None, sx),)
            y = None
        else:
            sl = (slice(None, None, sy), slice(None, None, sx))
            y = self.y[::sy]
        return replace(self, x=self.x[::sx], y=y, loss=self.loss[sl], accuracy=self.accuracy[sl],
                       loss_stderr=self.loss_stderr[sl], done=self.done[sl], level=self.level[sl],
                       attrs={**self.attrs, "_partial": f"level {k + 1}/{len(strides)}, "
                                                        f"{int(self.done.sum())}/{self.done.size} points"})


def _checkpoint_of(path: str | Path) -> str:
    """The checkpoint an analysis file was measured on (its root ``checkpoint`` attribute, quoted for a
    shell), for the command a message suggests; ``CKPT`` when the file does not say."""
    import shlex

    try:
        with store.open_h5(Path(path), "r") as f:
            ckpt = _decode(f.attrs.get("checkpoint", ""))
    except (OSError, StoreError):
        ckpt = ""
    return shlex.quote(str(ckpt)) if ckpt else "CKPT"


def list_surfaces(path: str | Path) -> list[str]:
    """Names of the landscape groups in an analysis file."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"analysis file not found: {p}")
    try:
        with store.open_h5(p, "r") as f:
            g = f.get(GROUP_PREFIX)
            return sorted(k for k in g.keys() if "done" in g[k]) if g is not None else []
    except OSError as exc:
        raise StoreError(f"{p} is not a readable HDF5 file ({store._one_line(exc)}); give an analysis .h5 file "
                         "written by flatlens sharpness or landscape") from None


def surfaces_of_dims(path: str | Path, dims: int, group: str | None = None) -> list[SurfaceData]:
    """The landscapes of ``path`` with ``dims`` axes (only ``group`` when given), or a one-line error
    naming what the file holds and how to add one (a figure script must not succeed drawing nothing)."""
    names = [group] if group else list_surfaces(path)
    surfaces = [load_surface(path, name) for name in names]
    chosen = [s for s in surfaces if s.dims == dims]
    if not chosen:
        held = ", ".join(f"{s.name} ({s.dims}-D)" for s in surfaces) or "none"
        raise FlatlensError(f"{path} holds no {dims}-D landscape{f' named {group!r}' if group else ''} (landscapes: "
                            f"{held}); add one with: flatlens landscape {_checkpoint_of(path)} --dim {dims} --out {path}")
    return chosen


def run_figure_script(draw: Callable[[], Sequence[Path]]) -> int:
    """Body of a ``figures/*.py`` script: print each file ``draw()`` writes and return 0; a FlatlensError
    (missing file, no such landscape...) is one line ``error: ...`` on stderr and status 2."""
    try:
        written = list(draw())
    except FlatlensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


def load_surface(path: str | Path, name: str | None = None, label: str | None = None) -> SurfaceData:
    """Read ``/landscape/<name>`` (the only one when ``name`` is None) without its directions."""
    p = Path(path)
    names = list_surfaces(p)
    if name is None:
        if len(names) != 1:
            raise StoreError(f"{p} holds {len(names)} landscapes ({', '.join(names) or 'none'}); choose one with --group")
        name = names[0]
    if name not in names:
        raise StoreError(f"{p} has no landscape {name!r}; it holds: {', '.join(names) or 'none'}")
    with store.open_h5(p, "r") as f:
        g = f[f"{GROUP_PREFIX}/{name}"]
        attrs = {k: _decode(v) for k, v in g.attrs.items()}
        dims = int(attrs.get("dims", g["loss"].ndim))
        extras = {k: _decode(g[k][()]) for k in ("points", "point_labels", "trajectory", "trajectory_steps",
                                                 "trajectory_off_plane", "explained_variance_ratio") if k in g}
        data = SurfaceData(p, name, dims, g["xcoordinates"][()], g["ycoordinates"][()] if "ycoordinates" in g else None,
                           g["loss"][()], g["accuracy"][()], g["loss_stderr"][()], g["done"][()].astype(bool),
                           g["level"][()], attrs, extras, label or "")
    if not data.label:
        ckpt = str(attrs.get("checkpoint", ""))
        data.label = f"{Path(ckpt).parent.name}/{Path(ckpt).name}" if ckpt else p.stem
    return data


# -- drawing helpers ------------------------------------------------------------------------------

def _figure(width: float = 6.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, stem: Path, formats: Sequence[str]) -> list[Path]:
    out = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        if fmt not in FORMATS:
            raise FlatlensError(f"unknown figure format {fmt!r}; choose from {', '.join(FORMATS)}")
        path = stem.with_name(f"{stem.name}.{fmt}")
        tmp = path.with_name(path.name + ".tmp")  # never a half-written figure under the real name
        fig.savefig(tmp, format=fmt)
        tmp.replace(path)
        out.append(path)
    return out


def _title(s: SurfaceData) -> str:
    a = s.attrs
    kind = a.get("kind", "")
    bits = [s.label, kind]
    if kind == "random":
        bits.append(f"norm={a.get('norm', '?')}, seed={a.get('direction_seed', '?')}")
    bits.append(f"{a.get('split', '')}, n={a.get('n_samples', '?')}")
    if a.get("space") and a.get("quantized"):
        bits.append(f"space={a['space']}")
    if "_partial" in a:
        bits.append(f"PARTIAL: {a['_partial']}")
    return " | ".join(str(b) for b in bits if b != "")


def _axis_labels(s: SurfaceData) -> tuple[str, str]:
    kind = s.attrs.get("kind", "")
    if kind == "interpolation":
        return "α (0 = origin, 1 = target)", ""
    if kind == "plane":
        return "α (towards B)", "β (towards C)"
    if kind == "pca":
        r = s.extras.get("explained_variance_ratio")
        if r is not None and len(np.atleast_1d(r)) >= 1:
            r = np.atleast_1d(r)
            return f"PC1 ({100 * r[0]:.1f} %)", (f"PC2 ({100 * r[1]:.1f} %)" if len(r) > 1 else "")
    return "x direction", "y direction"


def color_levels(values: Sequence[np.ndarray], vmin: float | None = None, vmax: float | None = None,
                 n: int = 20) -> tuple[np.ndarray, bool]:
    """Contour levels shared by ``values``: linear, or log-spaced when the range spans > 20x.

    Returns ``(levels, log)``.
    """
    finite = np.concatenate([np.asarray(v, dtype=np.float64)[np.isfinite(v)].ravel() for v in values])
    if finite.size == 0:
        raise FlatlensError("no finite loss values to draw")
    lo = float(finite.min()) if vmin is None else float(vmin)
    hi = float(finite.max()) if vmax is None else float(vmax)
    if not hi > lo:
        hi = lo + max(abs(lo) * 1e-3, 1e-6)
    if lo > 0 and hi / lo > 20:
        return np.geomspace(lo, hi, n), True
    return np.linspace(lo, hi, n), False


def _mark_points(ax, s: SurfaceData, two_d: bool) -> None:
    pts, labels = s.extras.get("points"), s.extras.get("point_labels")
    if pts is not None and labels is not None:
        for (px, py), lab in zip(np.asarray(pts), labels):
            if two_d:
                ax.plot([px], [py], marker="o", color="k", ms=5)
                ax.annotate(lab, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
            else:
                ax.axvline(px, color="0.6", lw=0.8, ls=":")
    elif two_d:
        ax.plot([0], [0], marker="+", color="k", ms=9)
    traj = s.extras.get("trajectory")
    if two_d and traj is not None and np.asarray(traj).ndim == 2 and np.asarray(traj).shape[1] >= 2:
        t = np.asarray(traj)
        ax.plot(t[:, 0], t[:, 1], "-o", color="crimson", ms=3, lw=1, label="trajectory")


# -- 1-D ------------------------------------------------------------------------------------------

def plot_1d(s: SurfaceData, stem: str | Path, formats: Sequence[str] = ("png", "pdf"), log: bool = False) -> list[Path]:
    """Loss (with a ±1 standard-error band) and accuracy along a line; ``log`` puts loss on a log axis."""
    if s.dims != 1:
        raise FlatlensError(f"{s.name} is {s.dims}-D; plot_1d draws lines")
    v = s.finest_complete()
    fig = _figure()
    ax = fig.add_subplot()
    ax.fill_between(v.x, v.loss - v.loss_stderr, v.loss + v.loss_stderr, color="tab:blue", alpha=0.2, lw=0)
    ax.plot(v.x, v.loss, "-", color="tab:blue", marker="." if len(v.x) <= 60 else None, label="loss")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(_axis_labels(v)[0])
    ax.set_ylabel("loss (mean cross-entropy)" + (", log scale" if log else ""), color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(v.x, 100 * v.accuracy, "--", color="tab:red", label="accuracy")
    ax2.set_ylabel("accuracy (%)", color="tab:red")
    ax2.set_ylim(0, 100)
    _mark_points(ax, v, two_d=False)
    ax.set_title(_title(v), fontsize=8)
    return _save(fig, Path(stem), formats)


# -- 2-D ------------------------------------------------------------------------------------------

def plot_2d(s: SurfaceData, stem: str | Path, formats: Sequence[str] = ("png", "pdf"),
            kinds: Sequence[str] = ("contour", "contourf", "surface"), vmin: float | None = None,
            vmax: float | None = None, n_levels: int = 20) -> list[Path]:
    """Contour lines (``<stem>_contour``), filled contours with labelled levels (``_contourf``) and a
    3-D surface (``_surface``; log10 of the loss when the levels are logarithmic)."""
    from matplotlib import colors

    if s.dims != 2:
        raise FlatlensError(f"{s.name} is {s.dims}-D; plot_2d draws planes")
    v = s.finest_complete()
    X, Y = np.meshgrid(v.x, v.y)
    Z = np.ma.masked_invalid(v.loss)
    levels, log = color_levels([v.loss], vmin, vmax, n_levels)
    norm = colors.LogNorm(levels[0], levels[-1]) if log else colors.Normalize(levels[0], levels[-1])
    xl, yl = _axis_labels(v)
    stem = Path(stem)
    written: list[Path] = []
    for kind in kinds:
        fig = _figure(6.0, 5.0)
        if kind == "surface":
            import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)

            ax = fig.add_subplot(projection="3d")
            Zs = np.clip(np.asarray(v.loss, dtype=np.float64), levels[0], levels[-1])
            Zs = np.log10(Zs) if log else Zs
            ax.plot_surface(X, Y, np.ma.masked_invalid(Zs), cmap="coolwarm", linewidth=0, antialiased=True,
                            rstride=1, cstride=1)
            ax.set_zlabel("log10 loss" if log else "loss")
        else:
            ax = fig.add_subplot()
            if kind == "contour":
                cs = ax.contour(X, Y, Z, levels=levels, cmap="viridis", norm=norm, linewidths=1)
                ax.clabel(cs, cs.levels[::2], inline=True, fontsize=7, fmt="%.3g")
            elif kind == "contourf":
                cf = ax.contourf(X, Y, Z, levels=levels, cmap="viridis", norm=norm, extend="max")
                cs = ax.contour(X, Y, Z, levels=levels[::2], colors="k", linewidths=0.5)
                ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
                fig.colorbar(cf, ax=ax, label="loss", format="%.3g")
            else:
                raise FlatlensError(f"unknown 2-D plot kind {kind!r}; choose contour, contourf or surface")
            _mark_points(ax, v, two_d=True)
            ax.set_aspect("auto")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(_title(v), fontsize=8)
        written += _save(fig, stem.with_name(f"{stem.name}_{kind}"), formats)
    return written


# -- comparisons ----------------------------------------------------------------------------------

def plot_compare(surfaces: Sequence[SurfaceData], stem: str | Path, formats: Sequence[str] = ("png", "pdf"),
                 log: bool = False, vmin: float | None = None, vmax: float | None = None,
                 n_levels: int = 20) -> list[Path]:
    """Several surfaces of the same dimension on shared axes and one colour scale."""
    from matplotlib import colors

    if len(surfaces) < 2:
        raise FlatlensError("a comparison needs at least two surfaces")
    dims = {s.dims for s in surfaces}
    if len(dims) != 1:
        raise FlatlensError("compare surfaces of the same dimension (all 1-D or all 2-D)")
    views = [s.finest_complete() for s in surfaces]
    if dims == {1}:
        fig = _figure(9.0, 4.0)
        ax, ax2 = fig.subplots(1, 2)
        for k, v in enumerate(views):
            c = f"C{k}"
            ax.fill_between(v.x, v.loss - v.loss_stderr, v.loss + v.loss_stderr, color=c, alpha=0.15, lw=0)
            ax.plot(v.x, v.loss, color=c, label=v.label)
            ax2.plot(v.x, 100 * v.accuracy, color=c, label=v.label)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(_axis_labels(views[0])[0])
        ax2.set_xlabel(_axis_labels(views[0])[0])
        ax.set_ylabel("loss")
        ax2.set_ylabel("accuracy (%)")
        ax2.set_ylim(0, 100)
        ax.legend(fontsize=7)
        fig.suptitle(f"{views[0].name}: " + " vs ".join(v.label for v in views), fontsize=9)
        return _save(fig, Path(stem), formats)
    levels, is_log = color_levels([v.loss for v in views], vmin, vmax, n_levels)
    norm = colors.LogNorm(levels[0], levels[-1]) if is_log else colors.Normalize(levels[0], levels[-1])
    fig = _figure(4.2 * len(views) + 1.0, 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(views), sharex=True, sharey=True))
    cf = None
    for ax, v in zip(axes, views):
        X, Y = np.meshgrid(v.x, v.y)
        cf = ax.contourf(X, Y, np.ma.masked_invalid(v.loss), levels=levels, cmap="viridis", norm=norm, extend="max")
        cs = ax.contour(X, Y, np.ma.masked_invalid(v.loss), levels=levels[::2], colors="k", linewidths=0.5)
        ax.clabel(cs, inline=True, fontsize=6, fmt="%.3g")
        _mark_points(ax, v, two_d=True)
        ax.set_title(v.label + (f"\nPARTIAL: {v.attrs['_partial']}" if "_partial" in v.attrs else ""), fontsize=8)
        ax.set_xlabel(_axis_labels(v)[0])
    axes[0].set_ylabel(_axis_labels(views[0])[1])
    fig.colorbar(cf, ax=list(axes), label="loss (shared scale)", format="%.3g")
    return _save(fig, Path(stem), formats)


def plot_file(path: str | Path, out_dir: str | Path | None = None, formats: Sequence[str] = ("png", "pdf"),
              compare: Sequence[str | Path] = (), labels: Sequence[str] | None = None, group: str | None = None,
              vmin: float | None = None, vmax: float | None = None, n_levels: int = 20) -> list[Path]:
    """Every figure of every landscape in ``path`` (or of ``group``); with ``compare`` files, one
    comparison per landscape name they share. Returns the files written."""
    p = Path(path)
    out = Path(out_dir) if out_dir else p.with_name(f"{p.stem}_figures")
    names = [group] if group else list_surfaces(p)
    if not names:
        raise StoreError(f"{p} holds no landscapes; compute one with `flatlens landscape`")
    files = [p, *[Path(c) for c in compare]]
    if labels is not None and len(labels) != len(files):
        raise FlatlensError(f"--labels needs {len(files)} labels (one per file), got {len(labels)}")
    written: list[Path] = []
    for name in names:
        s = load_surface(p, name, labels[0] if labels else None)
        stem = out / f"{p.stem}_{name}"
        if s.dims == 1:
            written += plot_1d(s, stem, formats)
            written += plot_1d(s, stem.with_name(stem.name + "_log"), formats, log=True)
        else:
            written += plot_2d(s, stem, formats, vmin=vmin, vmax=vmax, n_levels=n_levels)
        if compare:
            others = []
            for k, c in enumerate(compare, start=1):
                if name in list_surfaces(c):
                    others.append(load_surface(c, name, labels[k] if labels else None))
            if others:
                written += plot_compare([s, *others], out / f"compare_{name}", formats, vmin=vmin, vmax=vmax,
                                        n_levels=n_levels)
    return written


# -- Hessian spectrum ---------------------------------------------------------------------------

def load_spectrum(path: str | Path) -> dict[str, Any]:
    """The SLQ density curve, top eigenvalues and trace of one file's ``/hessian`` group."""
    if "hessian" not in store.groups(path):
        raise FlatlensError(f"{path} has no /hessian group; run: flatlens sharpness {_checkpoint_of(path)} --measures "
                            f"hessian,trace,density --out {path}")
    r = store.read(path, "hessian")
    if "density" not in r:
        raise FlatlensError(f"{path}: /hessian has no density; add it with: flatlens sharpness {_checkpoint_of(path)} "
                            f"--measures density --out {path}")
    d = r["density"]
    out: dict[str, Any] = {"grid": np.asarray(d["grid"], dtype=float), "values": np.asarray(d["values"], dtype=float)}
    sigma = float(d.get("attrs", {}).get("sigma", math.nan))
    g = out["grid"]
    if g.size > 1 and sigma > 0 and float(np.max(np.diff(g))) > sigma / 2 and "nodes" in d and "weights" in d:
        # a grid too coarse for its kernel (--density-grid 11): the stored curve is a polyline through a few
        # samples of it. The nodes and weights are exact, so the curve is drawn from them on a fine grid
        # over the same range (what the file would hold with a finer --density-grid).
        n = int(min(20001, math.ceil((g[-1] - g[0]) / (sigma / 4)) + 1))
        out["grid"] = np.linspace(g[0], g[-1], n)
        out["values"] = gaussian_mixture(d["nodes"], d["weights"], out["grid"], sigma)
    if "eigenvalues" in r:
        out["eigenvalues"] = np.atleast_1d(np.asarray(r["eigenvalues"], dtype=float))
    if "trace" in r:
        out["trace"] = float(r["trace"])
    return out


def plot_spectrum(files: Sequence[str | Path], labels: Sequence[str], stem: str | Path,
                  formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Log-density curves of several files on shared axes, each file's top eigenvalues dotted."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for i, (path, label) in enumerate(zip(files, labels)):
        s = load_spectrum(path)
        colour = f"C{i}"
        floor = max(float(np.max(s["values"])) * 1e-8, 1e-12)
        text = label + (f" (tr H = {s['trace']:.3g})" if "trace" in s else "")
        ax.semilogy(s["grid"], np.maximum(s["values"], floor), color=colour, lw=1.4, label=text)
        for lam in s.get("eigenvalues", ()):
            ax.axvline(lam, color=colour, ls=":", lw=1.0)
    ax.set_xlabel("eigenvalue of the loss Hessian")
    ax.set_ylabel("density (SLQ, Gaussian-smoothed)")
    ax.set_title("Hessian spectral density; dotted: top Lanczos eigenvalues")
    ax.legend(frameon=False)
    return _save(fig, Path(stem), formats)


# -- exports --------------------------------------------------------------------------------------

def _read_directions(path: Path, name: str) -> tuple[list[str], list[tuple[int, ...]], dict[str, dict[str, np.ndarray]]]:
    with store.open_h5(path, "r") as f:
        g = f[f"{GROUP_PREFIX}/{name}"]
        model_names = _decode(g["model_param_names"][()])
        shapes = [tuple(int(d) for d in str(s).split(",") if d != "") for s in _decode(g["model_param_shapes"][()])]
        dirs = {axis: {k: g["directions"][axis][k][()] for k in g["directions"][axis]} for axis in g["directions"]}
    return list(model_names), shapes, dirs


def export_loss_landscape(path: str | Path, name: str | None = None, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write tomgoldstein/loss-landscape's two files for one surface, so that its ``plot_1D.py``,
    ``plot_2D.py`` and ``h52vtp.py`` can read it.

    * direction file ``<name>_directions.h5``: groups ``xdirection`` (and ``ydirection``) holding
      datasets ``"0"``, ``"1"``, ... in the model's ``parameters()`` order (zeros for parameters the
      surface did not move);
    * surface file ``<name>_surface_[xmin,xmax,nx]x[ymin,ymax,ny].h5``: ``dir_file``, ``xcoordinates``,
      ``ycoordinates``, ``train_loss`` and ``train_acc`` (in percent, as theirs). 2-D arrays are
      (ny, nx) with ``[j, i] = f(x_i, y_j)``, the shape their ``plot_2D.py`` needs for any grid (their
      own writer gets non-square grids wrong). Points not yet computed are NaN (their sentinel was -1).
      The values are whatever split the surface used (the names are theirs). Each file is written whole or
      not at all (a temporary copy renamed over it).
    """
    p = Path(path)
    s = load_surface(p, name)
    out = Path(out_dir) if out_dir else p.parent
    out.mkdir(parents=True, exist_ok=True)
    model_names, shapes, dirs = _read_directions(p, s.name)
    dir_file = out / f"{s.name}_directions.h5"
    with store.new_h5(dir_file) as f:
        for axis in sorted(dirs):
            g = f.create_group(f"{axis}direction")
            for k, (pname, shape) in enumerate(zip(model_names, shapes)):
                g.create_dataset(str(k), data=dirs[axis].get(pname, np.zeros(shape, dtype=np.float32)))
    x = s.x
    rng = f"[{x[0]:g},{x[-1]:g},{len(x)}]" + (f"x[{s.y[0]:g},{s.y[-1]:g},{len(s.y)}]" if s.dims == 2 else "")
    surf_file = out / f"{s.name}_surface_{rng}.h5"
    with store.new_h5(surf_file) as f:
        f["dir_file"] = str(dir_file)
        f["xcoordinates"] = x
        if s.dims == 2:
            f["ycoordinates"] = s.y
        f["train_loss"] = np.asarray(s.loss, dtype=np.float64)
        f["train_acc"] = 100.0 * np.asarray(s.accuracy, dtype=np.float64)
    return surf_file, dir_file


def export_vtp(path: str | Path, name: str | None = None, out: str | Path | None = None, log: bool = False,
               zmax: float | None = None, binary: bool = True) -> Path:
    """A 2-D surface as VTK XML PolyData (``.vtp``) for ParaView, like the reference ``h52vtp.py``:
    points (x, y, z) with point data ``zvalue`` (z = loss, or ``log(loss + 0.1)`` with ``log``, clipped at
    ``zmax``), ``loss``, ``accuracy``, ``done``; quads with cell data ``averaged zvalue`` for every cell
    whose four corners are computed. ``binary`` writes base64 ``binary`` arrays (ASCII otherwise)."""
    s = load_surface(Path(path), name)
    if s.dims != 2:
        raise FlatlensError(f"{s.name} is a 1-D surface; VTK export needs a 2-D one")
    X, Y = np.meshgrid(s.x, s.y)
    loss = np.asarray(s.loss, dtype=np.float64)
    z = np.log(loss + 0.1) if log else loss.copy()
    if zmax is not None:
        z = np.minimum(z, zmax)
    finite = np.isfinite(z)
    fill = float(z[finite].max()) if finite.any() else 0.0
    z = np.where(finite, z, fill)
    ny, nx = z.shape
    pts = np.stack([X.ravel(), Y.ravel(), z.ravel()], 1).astype(np.float32)
    quads, cellz = [], []
    for j in range(ny - 1):
        for i in range(nx - 1):
            ids = [j * nx + i, j * nx + i + 1, (j + 1) * nx + i + 1, (j + 1) * nx + i]
            if all(finite.ravel()[ids]):
                quads.append(ids)
                cellz.append(float(np.mean(z.ravel()[ids])))
    conn = np.asarray(quads, dtype=np.int32).reshape(-1)
    offsets = (4 * np.arange(1, len(quads) + 1)).astype(np.int32)

    def arr(data: np.ndarray, vtype: str, name_: str = "", comps: int = 1) -> str:
        head = f'<DataArray type="{vtype}"' + (f' Name="{name_}"' if name_ else "") + \
               (f' NumberOfComponents="{comps}"' if comps > 1 else "")
        raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False)
        if binary:
            payload = base64.b64encode(struct.pack("<I", raw.nbytes) + raw.tobytes()).decode("ascii")
            return f'{head} format="binary">{payload}</DataArray>'
        return f'{head} format="ascii">' + " ".join(f"{v:.9g}" if raw.dtype.kind == "f" else str(int(v))
                                                  for v in raw.ravel()) + "</DataArray>"

    acc = np.nan_to_num(np.asarray(s.accuracy, dtype=np.float64), nan=-1.0).ravel().astype(np.float32)
    xml = [
        '<?xml version="1.0"?>',
        '<VTKFile type="PolyData" version="0.1" byte_order="LittleEndian" header_type="UInt32">',
        "<PolyData>",
        f'<Piece NumberOfPoints="{nx * ny}" NumberOfVerts="0" NumberOfLines="0" NumberOfStrips="0" '
        f'NumberOfPolys="{len(quads)}">',
        "<Points>", arr(pts, "Float32", "points", 3), "</Points>",
        '<PointData Scalars="zvalue">', arr(z.ravel().astype(np.float32), "Float32", "zvalue"),
        arr(np.nan_to_num(loss, nan=-1.0).ravel().astype(np.float32), "Float32", "loss"),
        arr(acc, "Float32", "accuracy"), arr(s.done.ravel().astype(np.uint8), "UInt8", "done"), "</PointData>",
        '<CellData Scalars="averaged zvalue">', arr(np.asarray(cellz, dtype=np.float32), "Float32", "averaged zvalue"),
        "</CellData>",
        "<Polys>", arr(conn, "Int32", "connectivity"), arr(offsets, "Int32", "offsets"), "</Polys>",
        "</Piece>", "</PolyData>", "</VTKFile>",
    ]
    target = Path(out) if out else Path(path).with_name(f"{Path(path).stem}_{s.name}.vtp")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(xml) + "\n")
    return target
