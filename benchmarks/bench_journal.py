"""What the HVP journal (``Objective.journal``, ``flatlens sharpness --journal``) costs a measure.

The journal writes every Hessian-vector product of a measure in progress to disk so that a killed measure
resumes (README, "Merge, replace, resume"). Its work per product: a copy of the input and of the output,
the input's sha256 and a ``torch.save`` without fsync, on a writer thread that overlaps the next HVP.
On a machine whose cores the HVPs already use, that thread competes for them; ``--journal auto`` keeps a
journal only when the timed cost of one entry is at most 10 % of an HVP.

For each model (the Hessian benchmark's: ``bench_hessian.make_data`` / ``make_model``, all parameters,
batches of 64, ``graph_reuse``), on the same Objective, in one process: ``hessian.eigenvalues(k=1)``
running a fixed ``--steps`` Lanczos steps, without and with a journal in a fresh temporary folder,
interleaved ``--repeats`` times. Prints the medians, their ratio, the cost of one entry as
``journal.write_seconds`` times it, and whether ``--journal auto`` would keep a journal here.

    python benchmarks/bench_journal.py --quick          # smoke run, < 1 min
    python benchmarks/bench_journal.py                  # MNIST-CNN 256 (16x16), ResNet-18 16 and 128 (32x32)

Measured on the shared 2-core VM (torch 2.14.1, CPU, 2026-12-03; medians of 3, two runs): MNIST-CNN 256
samples 1.03x and 0.99x (an entry is 1 % of an HVP), ResNet-18 16 samples 1.13x and 1.15x (an entry 0.11 s,
15 % of a 0.70 s HVP: ``auto`` keeps no journal there), ResNet-18 128 samples 1.05x twice (7 %: kept).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_hessian as B  # noqa: E402

import flatlens as fl  # noqa: E402
from flatlens.measure import journal as J  # noqa: E402
from flatlens.measure.objective import Objective  # noqa: E402

CONFIGS = {"mnist_cnn": (1, 16, 16), "resnet18": (3, 32, 32)}


def timed_run(model, batches, steps: int, journal: bool) -> float:
    obj = Objective(model, batches=batches, kernel="graph_reuse", include="all")
    obj.hvp_engine  # the graphs are built outside the timed part, as in a measure after kernel selection
    t0 = time.perf_counter()
    if journal:
        with tempfile.TemporaryDirectory() as d, obj.journal(Path(d) / "j"):
            fl.hessian.eigenvalues(obj, k=1, tol=1e-12, max_iter=steps)
    else:
        fl.hessian.eigenvalues(obj, k=1, tol=1e-12, max_iter=steps)
    seconds = time.perf_counter() - t0
    obj.release()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="mnist_cnn:256,resnet18:16,resnet18:128", help="arch:samples, comma-separated")
    ap.add_argument("--steps", type=int, default=12, help="Lanczos steps (HVPs) per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="MNIST-CNN on 64 samples, 4 steps, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.configs, args.steps, args.repeats = "mnist_cnn:64", 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} HVPs per run, "
          f"{args.repeats} repeats", flush=True)
    for spec in args.configs.split(","):
        arch, n = spec.split(":")
        shape = CONFIGS[arch]
        x, y = B.make_data("digits", int(n), shape, 0)
        model = B.make_model(arch, shape, x, y, 5, 0).eval()
        batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, int(n), 64)]
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):  # interleaved: a machine phase hits both alike
            for journal in (False, True):
                times[journal].append(timed_run(model, batches, args.steps, journal))
        plain, kept = statistics.median(times[False]), statistics.median(times[True])
        numel = sum(p.numel() for p in model.parameters())
        write = J.write_seconds(Path(tempfile.gettempdir()), numel, torch.float32)
        hvp = plain / args.steps
        auto = write <= J.AUTO_MAX_OVERHEAD * hvp
        print(f"{arch} on {n} samples ({numel:,} parameters): {hvp:.3f} s per HVP; without journal {plain:.2f} s, "
              f"with {kept:.2f} s: {kept / plain:.2f}x; one entry {write:.3f} s "
              f"({write / hvp:.0%} of an HVP): --journal auto would {'keep' if auto else 'not keep'} one", flush=True)


if __name__ == "__main__":
    main()
