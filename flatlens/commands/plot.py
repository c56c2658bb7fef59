"""``flatlens plot FILE.h5``: figures of the loss landscapes in an analysis file, and exports.

For every ``/landscape/<name>`` group (or ``--group``): 1-D curves on linear and log axes, or 2-D contour
lines, filled contours with labelled levels and a 3-D surface; with ``--compare`` files, the surfaces of
the same name side by side on shared axes and one colour scale. ``--export-loss-landscape`` writes
tomgoldstein/loss-landscape's HDF5 layout, ``--export-vtp`` VTK PolyData for ParaView. Reads the HDF5
file only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flatlens.commands import HelpFormatter, path_arg


HELP = "landscape figures (PNG/PDF) and exports from an analysis file"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help=HELP,
                       description=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("file", help="analysis file written by flatlens landscape / sharpness")
    p.add_argument("--out", default=None, type=path_arg, help="directory for the figures (default: FILE_figures next to FILE)")
    p.add_argument("--format", default="png,pdf", help="comma-separated: png, pdf, svg")
    p.add_argument("--group", default=None, help="only this landscape (name under /landscape)")
    p.add_argument("--compare", nargs="+", default=(), metavar="FILE2", help="draw the same landscapes of these files "
                                                                             "side by side, on one colour scale")
    p.add_argument("--labels", nargs="+", default=None, help="one label per file (FILE first)")
    p.add_argument("--vmin", type=float, default=None, help="lowest contour level (default: data minimum)")
    p.add_argument("--vmax", type=float, default=None, help="highest contour level (default: data maximum)")
    p.add_argument("--levels", type=int, default=20, help="number of contour levels")
    p.add_argument("--export-loss-landscape", default=None, metavar="DIR",
                   help="also write tomgoldstein/loss-landscape surface + direction files into DIR")
    p.add_argument("--export-vtp", default=None, metavar="DIR", help="also write 2-D surfaces as .vtp into DIR")
    p.add_argument("--vtp-log", action="store_true", help="VTK z = log(loss + 0.1), as h52vtp.py --log")
    p.add_argument("--vtp-ascii", action="store_true", help="ASCII instead of base64 binary VTK arrays")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlens import plot
    from flatlens.errors import FlatlensError

    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    if not formats:
        raise FlatlensError("--format is empty; give png, pdf or svg")
    if args.levels < 2:
        raise FlatlensError(f"--levels must be >= 2, got {args.levels}")
    written = plot.plot_file(args.file, args.out, formats, compare=args.compare, labels=args.labels, group=args.group,
                             vmin=args.vmin, vmax=args.vmax, n_levels=args.levels)
    names = [args.group] if args.group else plot.list_surfaces(args.file)
    if args.export_loss_landscape:
        for name in names:
            written += list(plot.export_loss_landscape(args.file, name, args.export_loss_landscape))
    if args.export_vtp:
        for name in names:
            if plot.load_surface(args.file, name).dims == 2:
                written.append(plot.export_vtp(args.file, name, Path(args.export_vtp) / f"{Path(args.file).stem}_{name}.vtp",
                                               log=args.vtp_log, binary=not args.vtp_ascii))
    for path in written:
        print(path)
    return 0
