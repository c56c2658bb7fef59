"""The ``flatlens`` command: a thin layer over the Python API.

Each subcommand lives in its own module under :mod:`flatlens.commands` with ``add_parser(subparsers)``
(which sets ``func`` on its parser). User errors (:class:`flatlens.errors.FlatlensError`) are printed
as one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flatlens import __version__
from flatlens.errors import FlatlensError

COMMANDS = {
    "train": "flatlens.commands.train",
    "collect": "flatlens.commands.collect",
    "info": "flatlens.commands.info",
    "export": "flatlens.commands.export",
    "ensemble": "flatlens.commands.ensemble",
    "sharpness": "flatlens.commands.sharpness",
    "landscape": "flatlens.commands.landscape",
    "plot": "flatlens.commands.plot",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flatlens", description="Train QAT / DG models and measure their loss surface.")
    parser.add_argument("--version", action="version", version=f"flatlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except FlatlensError as exc:
        print(f"flatlens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flatlens {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
