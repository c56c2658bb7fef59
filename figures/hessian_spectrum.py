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

from flatlens import plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="analysis HDF5 files with /hessian/density")
    p.add_argument("--labels", nargs="+", default=None, help="one label per file (default: run directory names)")
    p.add_argument("--out", default="figures/out", help="output directory")
    p.add_argument("--name", default="hessian_spectrum", help="file name stem")
    p.add_argument("--format", default="png,pdf", help="comma-separated: png, pdf, svg")
    args = p.parse_args(argv)
    labels = args.labels or [Path(f).parent.name or Path(f).stem for f in args.files]
    if len(labels) != len(args.files):
        p.error("give one label per file")
    return plot.run_figure_script(lambda: plot.plot_spectrum(args.files, labels, Path(args.out) / args.name,
                                                             args.format.split(",")))


if __name__ == "__main__":
    sys.exit(main())
