"""Side-by-side loss landscapes of several checkpoints (e.g. float vs QAT) on shared axes and one colour
scale: for every landscape name the files share, overlaid curves (1-D) or panels with one colour bar
(2-D). Reads the HDF5 files only.

    python figures/compare.py runs/erm/analysis.h5 runs/qat/analysis.h5 --labels float QAT --out docs/figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlens import plot  # noqa: E402
from flatlens.errors import FlatlensError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="two or more analysis HDF5 files")
    p.add_argument("--labels", nargs="+", default=None, help="one label per file")
    p.add_argument("--group", default=None, help="one landscape name (default: every shared one)")
    p.add_argument("--out", default="figures/out", help="output directory")
    p.add_argument("--format", default="png,pdf", help="comma-separated: png, pdf, svg")
    p.add_argument("--log", action="store_true", help="log loss axis (1-D)")
    args = p.parse_args(argv)
    if len(args.files) < 2:
        p.error("give at least two files")
    if args.labels and len(args.labels) != len(args.files):
        p.error("give one label per file")
    formats = [f for f in args.format.split(",") if f]

    def draw() -> list[Path]:
        held = [plot.list_surfaces(f) for f in args.files]
        shared = sorted(set(held[0]).intersection(*held[1:]))
        if not (args.group or shared):
            raise FlatlensError("the files share no landscape name (" + "; ".join(
                f"{f}: {', '.join(h) or 'none'}" for f, h in zip(args.files, held)) + "); compute the same "
                "landscape (flatlens landscape ... --name NAME) into each")
        written = []
        for name in [args.group] if args.group else shared:
            surfaces = [plot.load_surface(f, name, args.labels[k] if args.labels else None)
                        for k, f in enumerate(args.files)]
            written += plot.plot_compare(surfaces, Path(args.out) / f"compare_{name}", formats, log=args.log)
        return written

    return plot.run_figure_script(draw)


if __name__ == "__main__":
    sys.exit(main())
