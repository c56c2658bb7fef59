"""``flatlens train``: train one run (QAT or float) into a run directory, or resume it."""

from __future__ import annotations

import argparse
from pathlib import Path

from flatlens.commands import path_arg
from flatlens.config import config_to_toml, describe_options, load_config


HELP = "train a model (DomainBed-style leave-one-domain-out)"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP,
                       description="Train one run. Config = defaults <- --config TOML <- --set overrides.")
    p.add_argument("--config", help="TOML config file (sections data, model, optim, train, quant)")
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=300 quant.bits=4 (repeatable)")
    p.add_argument("--out", type=path_arg, help="run directory to create (or to resume with --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (starts it if nothing was saved yet); "
                        "without --config/--set the stored config is used")
    p.add_argument("--overwrite", action="store_true", help="delete the run files in --out and start over")
    p.add_argument("--show", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key, its default and meaning")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlens.errors import ConfigError

    if args.help_config:
        for key, tp, default, doc in describe_options():
            print(f"{key:<26} {tp:<14} {default:<22} {doc}")
        return 0
    overrides = [item for group in args.overrides for item in group]
    config_path = args.config
    if args.resume and args.out and not config_path:
        stored = Path(args.out) / "config.toml"
        if stored.exists():  # --set on --resume changes the stored config (where/how fast keys only)
            config_path = stored
    cfg = load_config(config_path, overrides)
    if args.show:
        print(config_to_toml(cfg), end="")
        return 0
    if not args.out:
        raise ConfigError("--out is required: the run directory to write (e.g. --out runs/erm)")
    from flatlens.engine.loop import train

    train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, verbose=not args.quiet)
    return 0
