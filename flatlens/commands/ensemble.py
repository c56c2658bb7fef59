"""``flatlens ensemble CKPT...``: EoQ -- evaluate an ensemble of checkpoints on every domain split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flatlens.commands import path_arg

HELP = "evaluate an ensemble (EoQ) of checkpoints on every domain split"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble", help=HELP,
        description="Average the members' logits (QT-DoG's EoQ, Eq. 6; default) or probabilities and report "
                    "per-member and ensemble accuracy on every env{i}_in/out split, plus the ensemble's size "
                    "relative to one float model. Members must share dataset, splits and label space.")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (e.g. runs/qat_s0/model.pt) or run directories "
                                                  "(their model.pt is used)")
    p.add_argument("--combine", choices=("logits", "probs"), default="logits",
                   help="average logits (QT-DoG Eq. 6, default) or softmax probabilities (EoA-style)")
    p.add_argument("--out", type=path_arg, help="also write the full result as JSON to this file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--data-root", type=path_arg, default=None, metavar="DIR",
                   help="folder datasets: where the dataset lives now, if not at the data.root stored in the checkpoint "
                        "(checked against the stored fingerprints)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for folder datasets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlens.atomic import atomic_write_text
    from flatlens.distributed import resolve_device
    from flatlens.engine.ensemble import evaluate_ensemble, format_result, load_members
    from flatlens.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    runs = load_members(args.checkpoints, device=device, data_root=args.data_root)
    result = evaluate_ensemble(runs, combine=args.combine, batch_size=args.batch_size, num_workers=args.num_workers)
    print(format_result(result), end="")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    return 0
