"""1-D loss-landscape figures (loss ± standard error and accuracy; linear and log loss axis) from an
analysis file. Reads the HDF5 file only.

    python figures/landscape_1d.py runs/demo/landscape.h5 --out docs/figures --format png,pdf
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
    p.add_argument("--group", default=None, help="one landscape name (default: every 1-D one)")
    p.add_argument("--out", default="figures/out", help="output directory")
    p.add_argument("--format", default="png,pdf", help="comma-separated: png, pdf, svg")
    args = p.parse_args(argv)
    formats = [f for f in args.format.split(",") if f]
    path = Path(args.file)

    def draw() -> list[Path]:
        written = []
        for s in plot.surfaces_of_dims(path, 1, args.group):
            stem = Path(args.out) / f"{path.stem}_{s.name}"
            written += plot.plot_1d(s, stem, formats) + plot.plot_1d(s, stem.with_name(stem.name + "_log"), formats,
                                                                      log=True)
        return written

    return plot.run_figure_script(draw)


if __name__ == "__main__":
    sys.exit(main())
