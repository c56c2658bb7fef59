"""How to split the spectral density's HVPs: probes x steps, against a reference, and what spectrum() costs.

flatlens' ``hessian.density`` defaults to 3 probes x 30 Lanczos steps; PyHessian's ``density()`` to 1 x 100
(it raises on torch 2.x after its Lanczos steps). The Hessian benchmark's wall-clock goal (G7) sets the two
side by side, so this measures whether they are equally accurate, and what other splits give.

For each model (``bench_hessian.make_data`` / ``make_model``: the same seeds and one-thread training, all
parameters, ``graph_reuse``):

* reference: the exact spectrum (``eigvalsh`` of the dense Hessian) for the small MLP (``mlp``, 1,210
  parameters), else SLQ with ``--ref`` (probes x steps, default 4 x 200);
* each split of ``--splits`` over ``--repeats`` seeds (medians): the Wasserstein-1 distance between its SLQ
  node measure and the reference's, over the reference's spectral range (``scipy.stats.wasserstein_distance``),
  and the L1 distance between the two Gaussian-smoothed curves at sigma = range/100 (flatlens' default) and
  range/1000 (a finer plot) on a common grid;
* with ``--spectrum``: ``hessian.spectrum`` (top-1, trace to +-1 % within ``--max-hvp`` residual probes, density)
  with each split: its HVPs, the trace's half-width and its seconds (the vector work of the full
  reorthogonalisation grows with the square of the steps; on an 11 M-parameter ResNet-18 it outweighs the
  HVPs a long run saves).

    python benchmarks/bench_density.py --quick                  # smoke run, < 1 min
    python benchmarks/bench_density.py                          # MNIST-CNN 64 (16x16) and the dense MLP
    python benchmarks/bench_density.py --configs resnet18:16 --spectrum --splits 3x30,1x60,1x100

Measured on the 2-core VM (2026-12-03; benchmarks/RESULTS-hessian.md, "How the density's HVPs are split"):
at the default sigma every split of ~100 HVPs is within L1 1e-3 of the reference on MNIST-CNN; at range/1000
3 x 30 was 2.6 % off and 1 x 100 0.1 %; on the dense MLP 3 x 30 was the closest in W1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import wasserstein_distance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_hessian as B  # noqa: E402

import flatlens as fl  # noqa: E402
from flatlens.measure import linalg as L  # noqa: E402
from flatlens.measure.objective import Objective  # noqa: E402

SHAPES = {"mnist_cnn": 16, "resnet18": 32, "mlp": 8}


def parse_splits(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"--splits {text!r}: pass probes x steps, comma-separated, e.g. 3x30,1x100") from None
    if any(len(s) != 2 or min(s) < 1 for s in out):
        raise SystemExit(f"--splits {text!r}: pass probes x steps, comma-separated, e.g. 3x30,1x100")
    return out  # type: ignore[return-value]


def make_objective(arch: str, n: int, seed: int, steps: int) -> tuple[Objective, torch.Tensor | None, str]:
    """The measured Objective, the dense Hessian when it is small enough to be the reference, a description."""
    if arch == "mlp":  # bench_hessian.dense_study's model: its exact Hessian is the reference
        net, x, y = B.dense_mlp(seed, n)
        obj = Objective(net, batches=B.batches_of(x, y, 256), include=("all",), kernel="graph_reuse")
        dense = torch.stack([obj.hvp(e) for e in torch.eye(obj.space.numel, dtype=torch.float64)], 1)
        return obj, 0.5 * (dense + dense.T), f"MLP 64-16-10 (tanh), {n} digits at 8x8, exact Hessian"
    size = SHAPES[arch]
    shape = (1, size, size) if arch == "mnist_cnn" else (3, size, size)
    x, y = B.make_data("digits", n, shape, seed)
    model = B.make_model(arch, shape, x, y, steps, seed)
    obj = Objective(model, batches=B.batches_of(x, y, 256), include=("all",), kernel="graph_reuse")
    return obj, None, f"{arch}, {n} digits at {'x'.join(map(str, shape))}, model {B.model_hash(model)}"


def node_measure(op, probes: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SLQ nodes and weights of all probes as one probability measure."""
    r = L.slq_density(op, probes, steps, generator=torch.Generator().manual_seed(seed))
    nodes, w = r.nodes.double().numpy().ravel(), r.weights.double().numpy().ravel()
    keep = np.isfinite(nodes) & (w > 0)
    return nodes[keep], w[keep] / w[keep].sum()


def smoothed(nodes: np.ndarray, w: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    out = np.zeros_like(grid)
    for chunk in range(0, len(nodes), 256):  # bounded memory for long runs
        z = (grid[:, None] - nodes[None, chunk:chunk + 256]) / sigma
        out += (w[None, chunk:chunk + 256] * np.exp(-0.5 * z * z)).sum(1)
    return out / (sigma * np.sqrt(2 * np.pi))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--configs", default="mnist_cnn:64,mlp:512", help="arch:samples, comma-separated (mnist_cnn, "
                    "resnet18, mlp)")
    ap.add_argument("--splits", default="3x30,2x50,1x60,1x100", help="probes x steps, comma-separated")
    ap.add_argument("--ref", default="4x200", help="the reference SLQ split (models without a dense Hessian)")
    ap.add_argument("--repeats", type=int, default=3, help="seeds per split (medians)")
    ap.add_argument("--spectrum", action="store_true", help="also run hessian.spectrum with each split")
    ap.add_argument("--max-hvp", type=int, default=150, help="spectrum(): most trace residual probes")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: MNIST-CNN on 16 8x8 digits, small splits")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs, args.splits, args.ref, args.repeats, args.spectrum = "mnist_cnn:16", "2x6,1x12", "2x24", 1, True
        args.max_hvp = 10
        SHAPES["mnist_cnn"] = 8
    if args.threads:
        torch.set_num_threads(args.threads)
    splits, (ref_p, ref_s) = parse_splits(args.splits), parse_splits(args.ref)[0]
    print(f"bench_density: torch {torch.__version__}, {torch.get_num_threads()} threads")
    t_start = time.perf_counter()
    for cfg in args.configs.split(","):
        arch, n = cfg.split(":")
        if arch not in SHAPES:
            raise SystemExit(f"--configs {cfg!r}: the architecture must be one of {', '.join(SHAPES)}")
        obj, dense, what = make_objective(arch, int(n), args.seed, args.train_steps)
        op = dense if dense is not None else obj.operator()
        obj.hvp_engine  # the kernel's graphs, outside the timed parts
        t0 = time.perf_counter()
        if dense is not None:
            ref_n = torch.linalg.eigvalsh(dense).numpy()
            ref_w = np.full(len(ref_n), 1.0 / len(ref_n))
            ref_what = f"exact spectrum ({len(ref_n)} eigenvalues)"
        else:
            ref_n, ref_w = node_measure(op, ref_p, ref_s, args.seed + 99)
            ref_what = f"SLQ {ref_p} x {ref_s}"
        span = float(ref_n.max() - ref_n.min())
        grid = np.linspace(ref_n.min() - 0.05 * span, ref_n.max() + 0.05 * span, 4001)
        dx = grid[1] - grid[0]
        sigmas = {"range/100": span / 100, "range/1000": span / 1000}
        refs = {k: smoothed(ref_n, ref_w, grid, s) for k, s in sigmas.items()}
        print(f"\n## {what}, {obj.space.numel} parameters\nreference: {ref_what} in {time.perf_counter() - t0:.0f} s; "
              f"spectral range [{ref_n.min():.4g}, {ref_n.max():.4g}]")
        print(f"  {'split':>8} {'HVPs':>5}  {'W1/range':>9}  {'L1 @ range/100':>14}  {'L1 @ range/1000':>15}")
        for p, s in splits:
            w1, l1 = [], {k: [] for k in sigmas}
            for r in range(args.repeats):
                nodes, w = node_measure(op, p, s, args.seed + 1000 * (r + 1))
                w1.append(wasserstein_distance(nodes, ref_n, w, ref_w) / span)
                for k, sig in sigmas.items():
                    l1[k].append(float(np.abs(smoothed(nodes, w, grid, sig) - refs[k]).sum() * dx))
            print(f"  {f'{p}x{s}':>8} {p * s:>5}  {statistics.median(w1):>9.2e}  "
                  f"{statistics.median(l1['range/100']):>14.4f}  {statistics.median(l1['range/1000']):>15.4f}")
        if args.spectrum and dense is None:
            print(f"  spectrum(k=1, rtol=0.01, max_hvp={args.max_hvp}) with each split (medians of {args.repeats}):")
            for p, s in splits:
                runs = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    sp = fl.hessian.spectrum(obj, p, s, k=1, rtol=0.01, max_hvp=args.max_hvp,
                                             seed=args.seed + r, layers="none")
                    runs.append((sp.n_hvp, sp.trace.n_hvp, sp.trace.rel_half_width, time.perf_counter() - t0))
                print(f"  {f'{p}x{s}':>8}: {statistics.median(x[0] for x in runs):.0f} HVPs (trace residual "
                      f"{statistics.median(x[1] for x in runs):.0f}), trace ±{100 * statistics.median(x[2] for x in runs):.2f} %, "
                      f"{statistics.median(x[3] for x in runs):.1f} s")
        obj.release()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
