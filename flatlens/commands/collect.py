"""``flatlens collect``: DomainBed-style tables (mean ± s.e. over trials) from run directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from flatlens.commands import path_arg

HELP = "tabulate target-domain accuracy over runs"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help=HELP,
                       description="Read every results.jsonl under DIR and print per-target-domain accuracy under "
                                   "training-domain validation, oracle and last-checkpoint selection. Quantized runs "
                                   "(quant.select_quantized_only) are selected among checkpoints taken after q_step "
                                   "and get a second row, '<label> (any checkpoint)', selected over all checkpoints.")
    p.add_argument("dir", help="folder holding run directories (searched recursively)")
    p.add_argument("--format", choices=("text", "markdown", "latex", "csv"), default="text")
    p.add_argument("--selection", default="training_domain_val,oracle,last",
                   help="comma-separated methods: training_domain_val, oracle, last")
    p.add_argument("--out", type=path_arg, help="also write the tables to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlens.atomic import atomic_write_text
    from flatlens.engine.collect import build_tables, find_runs, format_tables
    from flatlens.engine.selection import TABLE_METHODS
    from flatlens.errors import FlatlensError

    methods = [m.strip() for m in args.selection.split(",") if m.strip()]
    bad = [m for m in methods if m not in TABLE_METHODS]
    if bad:
        raise FlatlensError(f"--selection {','.join(bad)} unknown; choose from {', '.join(TABLE_METHODS)}")
    runs = find_runs(args.dir)
    if not runs:
        raise FlatlensError(f"no flatlens runs (results.jsonl) under {args.dir}; train some with `flatlens train`")
    text = format_tables(build_tables(runs, methods), args.format)
    print(text, end="")
    if args.out:
        atomic_write_text(Path(args.out), text)
    return 0
