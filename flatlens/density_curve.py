"""The Gaussian-smoothed spectral density of SLQ quadrature rules, in numpy alone.

One job: evaluate ``(1/p) sum_i sum_j w_ij N(x; theta_ij, sigma)`` on a grid. :func:`flatlens.measure.linalg.slq_density`
stores it on its grid, and the figure scripts (which import no torch) re-evaluate it from the stored nodes
and weights where the stored grid is too coarse for its ``sigma``.
"""

from __future__ import annotations

import math

import numpy as np

_CHUNK = 1 << 15
"""Grid points per block: (grid x nodes) at once was GBs for a fine grid."""


def gaussian_mixture(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The smoothed density on ``grid`` from ``p`` quadrature rules (``nodes``, ``weights``: ``p x m``, NaN
    nodes ignored), each rule weighted ``1/p``."""
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    g = np.asarray(grid, dtype=np.float64)
    dens = np.zeros_like(g)
    for th_all, w_all in zip(nodes, weights):
        ok = np.isfinite(th_all)
        th, w = th_all[ok], w_all[ok]
        for s in range(0, g.size, _CHUNK):
            gs = g[s:s + _CHUNK]
            dens[s:s + gs.size] += (w[None, :] * np.exp(-0.5 * ((gs[:, None] - th[None, :]) / sigma) ** 2)).sum(axis=1)
    return dens * (1.0 / (sigma * math.sqrt(2.0 * math.pi)) / max(len(nodes), 1))
