"""Hessian spectral density (stochastic Lanczos quadrature) of one or several analysis files on shared
axes, with each file's top eigenvalues marked and its trace in the legend -- e.g. float ERM vs QAT.
Reads the HDF5 files only (``/hessian`` written by ``flatlens sharpness --measures ...,density``).

    python figures/hessian_spectrum.py runs/erm/analysis.h5 runs/qat/analysis.h5 --labels float QAT --out docs/figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from flatlens.errors import FlatlensError  # noqa: E402


def load_spectrum(path: str | Path) -> dict:
    """The density curve, top eigenvalues and trace of one file's ``/hessian`` group (keys may be missing)."""
    from flatlens import store

    if "hessian" not in store.groups(path):
        raise FlatlensError(f"{path} has no /hessian group; run: flatlens sharpness CKPT --measures hessian,trace,density --out {path}")
    r = store.read(path, "hessian")
    if "density" not in r:
        raise FlatlensError(f"{path}: /hessian has no density; add it with: flatlens sharpness CKPT --measures density --out {path}")
    out = {"grid": np.asarray(r["density"]["grid"], dtype=float), "values": np.asarray(r["density"]["values"], dtype=float)}
    if "eigenvalues" in r:
        out["eigenvalues"] = np.atleast_1d(np.asarray(r["eigenvalues"], dtype=float))
    if "trace" in r:
        out["trace"] = float(r["trace"])
        out["trace_stderr"] = float(r.get("trace_stderr", np.nan))
    out["attrs"] = r.get("attrs", {})
    return out


def plot_spectra(files: list[str], labels: list[str], stem: Path, formats: list[str]) -> list[Path]:
    """Draw the log-density curves of ``files`` into ``stem.<format>`` and return the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (path, label) in enumerate(zip(files, labels)):
        s = load_spectrum(path)
        colour = f"C{i}"
        floor = max(float(np.max(s["values"])) * 1e-8, 1e-12)
        text = label
        if "trace" in s:
            text += f" (tr H = {s['trace']:.3g})"
        ax.semilogy(s["grid"], np.maximum(s["values"], floor), color=colour, lw=1.4, label=text)
        for lam in s.get("eigenvalues", ()):
            ax.axvline(lam, color=colour, ls=":", lw=1.0)
    ax.set_xlabel("eigenvalue of the loss Hessian")
    ax.set_ylabel("density (SLQ, Gaussian-smoothed)")
    ax.set_title("Hessian spectral density; dotted: top Lanczos eigenvalues")
    ax.legend(frameon=False)
    fig.tight_layout()
    written = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        target = stem.with_suffix("." + fmt)
        tmp = target.with_name(target.name + ".tmp")
        fig.savefig(tmp, format=fmt)
        tmp.replace(target)
        written.append(target)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="analysis HDF5 files with /hessian/density")
    p.add_argument("--labels", nargs="+", default=None, help="one label per file (default: file names)")
    p.add_argument("--out", default="figures/out", help="output directory")
    p.add_argument("--name", default="hessian_spectrum", help="file name stem")
    p.add_argument("--format", default="png,pdf", help="comma-separated: png, pdf, svg")
    args = p.parse_args(argv)
    labels = args.labels or [Path(f).parent.name or Path(f).stem for f in args.files]
    if len(labels) != len(args.files):
        p.error("give one label per file")
    try:
        written = plot_spectra(args.files, labels, Path(args.out) / args.name, args.format.split(","))
    except FlatlensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
