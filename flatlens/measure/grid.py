"""Landscape grids: ``min:max:num`` axes, nested coarse-to-fine levels, and the block schedule.

A surface is evaluated on the grid ``x (nx) × y (ny)``, stored row-major as ``values[j, i] = f(x_i, y_j)``
(rows are y), which is what ``plt.contour(X, Y, Z)`` with ``X, Y = np.meshgrid(x, y)`` expects for any
grid shape (the reference tool declares ``(nx, ny)`` and fills it x-fastest, which is only right for
square grids).

Points are visited coarse to fine so that a run stopped at any moment already holds a complete coarser
grid. Level ``l`` of an axis with ``n`` points is the uniform sub-grid of every ``s_l``-th index, where
every stride divides ``n - 1`` and the next coarser one, so each level contains the previous one and
ends exactly at both ends of the range. The first division is by 2 where possible, so level 1 already
holds the centre (the origin of a symmetric range); later ones go by the smallest prime factors, so the
early levels stay small. For 51 points: strides 50, 25, 5, 1 -> 2, 3, 11, 51 points. A 2-D grid
combines the two axes level by level (the shorter chain repeats its coarsest stride). A level's new
points are split into blocks, in row-major order; a block is the unit of work (of a rank) and of writing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from flatlens.errors import FlatlensError

_RANGE = re.compile(r"^\s*([-+]?[\d.eE+-]+)\s*:\s*([-+]?[\d.eE+-]+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Axis:
    """One grid axis: ``num`` evenly spaced values from ``start`` to ``stop`` (both included)."""

    start: float
    stop: float
    num: int

    @property
    def values(self) -> np.ndarray:
        """``np.linspace`` values; those within 1e-9 steps of an integer are snapped to it, so that 0
        (the origin) and 1 (another checkpoint) are hit exactly whenever they lie on the grid."""
        v = np.linspace(self.start, self.stop, self.num, dtype=np.float64)
        step = (self.stop - self.start) / max(self.num - 1, 1) or 1.0
        near = np.abs(v - np.round(v)) < 1e-9 * abs(step)
        v[near] = np.round(v[near])
        return v

    @property
    def spec(self) -> str:
        return f"{self.start:g}:{self.stop:g}:{self.num}"

    def as_list(self) -> list[float]:
        return [float(self.start), float(self.stop), int(self.num)]


MAX_COORDINATE = 1e6
"""Largest |coordinate| of a grid: far beyond any meaningful loss surface (at 1e6 the weights are
swamped by a direction of their own size), and well inside float32 once multiplied by a direction."""


def parse_range(text: str | Axis, what: str = "--range") -> Axis:
    """``"-1:1:51"`` -> Axis(-1, 1, 51). Ends may be 0 (``0:1:11`` is fine, unlike the reference tool)."""
    if isinstance(text, Axis):
        return text
    m = _RANGE.match(str(text))
    if not m:
        raise FlatlensError(f"{what} {text!r} is not MIN:MAX:NUM (e.g. -1:1:51; write {what}=-1:1:51 on the "
                            "command line when MIN is negative)")
    try:
        start, stop, num = float(m.group(1)), float(m.group(2)), int(m.group(3))
    except ValueError:
        raise FlatlensError(f"{what} {text!r} is not MIN:MAX:NUM with numbers (e.g. -1:1:51)") from None
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise FlatlensError(f"{what} {text!r}: MIN and MAX must be finite")
    if max(abs(start), abs(stop)) > MAX_COORDINATE:  # 1e308 overflowed float32 inside the perturbation
        raise FlatlensError(f"{what} {text!r}: coordinates are multiples of the direction (of the weights' size, "
                            f"or the distance to another checkpoint); keep MIN and MAX within ±{MAX_COORDINATE:g}")
    if num < 1:
        raise FlatlensError(f"{what} {text!r}: NUM must be >= 1")
    if num > 1 and not stop > start:
        raise FlatlensError(f"{what} {text!r}: MAX must be greater than MIN")
    if num == 1 and stop != start:
        raise FlatlensError(f"{what} {text!r}: one point needs MIN == MAX (e.g. 0:0:1)")
    return Axis(start, stop, num)


def _prime_factors(m: int) -> list[int]:
    out, p = [], 2
    while p * p <= m:
        while m % p == 0:
            out.append(p)
            m //= p
        p += 1
    if m > 1:
        out.append(m)
    return out


def stride_chain(num: int) -> list[int]:
    """Index strides of the nested levels of one axis, coarsest first, ending with 1 (see module doc)."""
    if num <= 2:
        return [1]
    m = num - 1
    factors = _prime_factors(m)
    if 2 in factors:
        factors.remove(2)
        factors = [2] + factors  # halve first: level 1 = both ends + the centre
    chain, s = [m], m
    for p in factors:
        s //= p
        chain.append(s)
    return chain


@dataclass
class Schedule:
    """The coarse-to-fine visiting order of a grid.

    ``strides[l]`` = (sx, sy) of level ``l``; ``level[j, i]`` = the level at which point (i, j) first
    appears; ``order`` = flat indices (``j * nx + i``) of all points, level by level, row-major within
    a level.
    """

    shape: tuple[int, int]
    strides: list[tuple[int, int]]
    level: np.ndarray
    order: np.ndarray

    def level_sizes(self) -> list[int]:
        return [int((self.level == k).sum()) for k in range(len(self.strides))]

    def complete_level(self, done: np.ndarray) -> int:
        """The finest level all of whose points are done (-1 if none)."""
        done = np.asarray(done, dtype=bool).reshape(self.shape)
        best = -1
        for k in range(len(self.strides)):
            if bool(done[self.level <= k].all()):
                best = k
            else:
                break
        return best

    def blocks(self, done: np.ndarray, block_size: int) -> list[np.ndarray]:
        """Flat indices of the points still to do, in order, cut into blocks that never span two levels."""
        done_flat = np.asarray(done, dtype=bool).reshape(-1)
        lev = self.level.reshape(-1)
        out: list[np.ndarray] = []
        for k in range(len(self.strides)):
            todo = self.order[(lev[self.order] == k) & ~done_flat[self.order]]
            for i in range(0, len(todo), max(1, block_size)):
                out.append(todo[i:i + block_size])
        return out


def schedule(nx: int, ny: int = 1) -> Schedule:
    """Coarse-to-fine schedule of an ``nx × ny`` grid (``ny = 1`` for a line)."""
    cx, cy = stride_chain(nx), stride_chain(ny)
    n_levels = max(len(cx), len(cy))
    cx = [cx[0]] * (n_levels - len(cx)) + cx
    cy = [cy[0]] * (n_levels - len(cy)) + cy
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    level = np.full((ny, nx), n_levels - 1, dtype=np.int16)
    for k in range(n_levels - 1, -1, -1):
        level[(ii % cx[k] == 0) & (jj % cy[k] == 0)] = k
    flat = level.reshape(-1)
    order = np.concatenate([np.flatnonzero(flat == k) for k in range(n_levels)])
    return Schedule(shape=(ny, nx), strides=list(zip(cx, cy)), level=level, order=order)
