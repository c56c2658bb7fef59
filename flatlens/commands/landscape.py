"""``flatlens landscape CKPT``: a 1-D or 2-D loss surface around a checkpoint, into an HDF5 file.

Random filter-normalized directions by default (Li et al.'s method: ``--norm filter``, biases and norm
parameters ignored, quantizer step sizes excluded), or the line towards another checkpoint (``--to``),
the plane through three checkpoints (``--plane B C``) or the principal plane of a run's trajectory
(``--pca RUN_DIR``). The predicted number of forward passes and an ETA are printed first; the grid is
written block by block to ``/landscape/<name>`` of ``--out`` (default ``analysis.h5`` next to the
checkpoint), and running the same command again resumes an interrupted surface. Under ``torchrun`` the
grid points are shared out over the ranks (each rank holds all evaluation samples) and rank 0 writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flatlens.commands import HelpFormatter, accept_negative_ranges, path_arg, seed_arg


HELP = "1D/2D loss surfaces (random, interpolation, plane, PCA) -> HDF5"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("landscape", help=HELP,
                       description=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    accept_negative_ranges(p)
    p.add_argument("checkpoint", help="a checkpoint written by flatlens train (e.g. runs/erm/model.pt): the origin")
    g = p.add_argument_group("directions")
    g.add_argument("--dim", type=int, choices=(1, 2), default=None,
                   help="1 (line) or 2 (plane); default 1 for random directions and --to, 2 for --plane and --pca")
    g.add_argument("--range", default=None,
                   help="MIN:MAX:NUM of the x axis; default -1:1:51 (random), -0.5:1.5:41 (--to), "
                        "-0.5:1.5:21 (--plane), around the trajectory with 21 points (--pca)")
    g.add_argument("--y-range", default=None, help="MIN:MAX:NUM of the y axis (default: as --range)")
    g.add_argument("--norm", default=None, choices=("filter", "layer", "none"),
                   help="normalization of random directions (default filter; checkpoint directions: none)")
    g.add_argument("--ignore", default=None,
                   help="parameters left out of the directions, comma-separated: none | biasbn | bias | norm | scales "
                        "| a regular expression on names (default: biasbn for random/PCA, none for --to/--plane)")
    g.add_argument("--to", default=None, metavar="CKPT2", help="interpolate from CKPT to CKPT2 (and beyond)")
    g.add_argument("--plane", nargs=2, default=None, metavar=("CKPT2", "CKPT3"), help="the plane through three checkpoints")
    g.add_argument("--pca", default=None, metavar="RUN_DIR",
                   help="principal plane of the checkpoints a run saved (train.keep_checkpoints=true)")
    g.add_argument("--seed", type=seed_arg, default=0, help="base seed of random directions (and of the sample subset)")
    g.add_argument("--repeat", type=int, default=0, help="repeat k of a random surface uses seed --seed + k")
    g.add_argument("--orthogonalize", action="store_true", help="Gram-Schmidt the y direction against x")
    g.add_argument("--bn-stats", default=None, choices=("interpolate", "origin"),
                   help="BN running statistics along checkpoint directions (default interpolate: the far end is "
                        "exactly the other checkpoint); random/PCA surfaces keep the origin's")
    o = p.add_argument_group("what is evaluated")
    from flatlens.measure.objective import SPLITS_HELP

    o.add_argument("--split", default="source-val", help=SPLITS_HELP)
    o.add_argument("--samples", type=int, default=None, help="seeded random subset of this many samples (default: all)")
    o.add_argument("--space", default="latent", choices=("latent", "dequant"),
                   help="quantized models: latent float weights through the quantizers, or a float copy holding "
                        "the quantized weights")
    o.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    o.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    o.add_argument("--dtype", default=None, choices=("float32", "float64"),
                   help="evaluate a copy of the model and the samples in this dtype (default: the checkpoint's, "
                        "float32; float64 resolves loss differences below float32's ~1e-7 relative rounding, e.g. "
                        "small --range values near a minimum)")
    o.add_argument("--data-root", type=path_arg, default=None, metavar="DIR",
                   help="folder datasets: where the dataset lives now, if not at the data.root stored in the checkpoint "
                        "(checked against the stored fingerprints)")
    w = p.add_argument_group("output")
    w.add_argument("--out", default=None, type=path_arg, help="analysis file (default: analysis.h5 beside model.pt; <stem>_analysis.h5 beside any other checkpoint)")
    w.add_argument("--name", default=None, help="group /landscape/NAME (default: random_1d, random_2d, interpolation, "
                                                "plane, pca_2d; _rK for repeat K)")
    w.add_argument("--block", type=int, default=0, help="points per block written (0: about one second of work)")
    w.add_argument("--overwrite", action="store_true", help="recompute the group even if it holds other settings")
    w.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import flatlens as fl
    from flatlens import distributed as D
    from flatlens import store
    from flatlens.errors import FlatlensError
    from flatlens.measure.landscape import surface
    from flatlens.measure.objective import Objective
    from flatlens.progress import Progress

    if args.samples is not None and args.samples < 1:
        raise FlatlensError(f"--samples must be >= 1, got {args.samples}")
    if args.batch_size < 1:
        raise FlatlensError(f"--batch-size must be >= 1, got {args.batch_size}")
    ctx = D.setup(args.device)
    finished = False
    try:
        device = D.resolve_device(args.device, ctx.local_rank)
        run_ = fl.load_checkpoint(args.checkpoint, device=device, data_root=args.data_root)
        # every rank holds all samples: ranks share out grid points, not samples
        obj = Objective(run_, split=args.split, samples=args.samples, space=args.space, seed=args.seed,
                        batch_size=args.batch_size, device=device, shard=False, dtype=args.dtype)
        out = Path(args.out) if args.out else store.default_path(args.checkpoint)
        say = print if ctx.is_main else (lambda *a, **k: None)
        say(f"{run_.path}: {obj.n_samples} samples of split '{obj.split}' on {device}"
            + (f", in {args.dtype}" if args.dtype else "")
            + (f", {ctx.world_size} ranks sharing the grid" if ctx.distributed else ""))

        def progress(total: int, desc: str) -> Progress:
            return Progress(total, 0, desc=desc, enabled=ctx.is_main and not args.quiet, every_seconds=15)

        surf = surface(obj, args.dim, args.range, args.y_range, norm=args.norm, ignore=args.ignore, seed=args.seed,
                       repeat=args.repeat, orthogonalize=args.orthogonalize, to=args.to, plane=args.plane,
                       pca=args.pca, bn_stats=args.bn_stats, out=out, name=args.name, overwrite=args.overwrite,
                       block_size=args.block, log=say, progress=progress)
        if ctx.is_main:
            for label, value in surf.summary():
                print(f"  {label:<28} {value}")
        finished = True
    finally:
        D.teardown(ctx, finished)
    return 0
