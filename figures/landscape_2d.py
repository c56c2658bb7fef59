"""2-D loss-landscape figures (contour lines, filled contours with labelled levels, 3-D surface) from an
analysis file. Reads the HDF5 file only; a surface still being computed is drawn from its finest
complete coarse-to-fine level.

    python figures/landscape_2d.py runs/demo/landscape.h5 --out docs/figures --format png,pdf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlens import plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="analysis HDF5 file")
    p.add_argument("--group", default=None, help="one landscape name (default: every 2-D one)")
    p.add_argument("--out", default="figures/out", help="output directory")
    p.add_argument("--format", default="png,pdf", help="comma-separated: png, pdf, svg")
    p.add_argument("--kinds", default="contour,contourf,surface", help="which of contour, contourf, surface")
    p.add_argument("--vmin", type=float, default=None)
    p.add_argument("--vmax", type=float, default=None)
    p.add_argument("--levels", type=int, default=20)
    args = p.parse_args(argv)
    formats = [f for f in args.format.split(",") if f]
    path = Path(args.file)

    def draw() -> list[Path]:
        written = []
        for s in plot.surfaces_of_dims(path, 2, args.group):
            written += plot.plot_2d(s, Path(args.out) / f"{path.stem}_{s.name}", formats, kinds=args.kinds.split(","),
                                    vmin=args.vmin, vmax=args.vmax, n_levels=args.levels)
        return written

    return plot.run_figure_script(draw)


if __name__ == "__main__":
    sys.exit(main())
