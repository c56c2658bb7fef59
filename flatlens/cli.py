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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``flatlens`` parser. Only ``command``'s own options are built (some import torch and every
    measure); the other commands appear with their one-line help, which is all ``flatlens --help``
    shows. ``command=None`` builds none of them in full."""
    parser = argparse.ArgumentParser(
        prog="flatlens", description="Train QAT / DG models and measure their loss surface.")
    parser.add_argument("--version", action="version", version=f"flatlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)  # light: heavy imports live inside the functions
        if name == command:
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=module.HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except FlatlensError as exc:
        print(f"flatlens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flatlens {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flatlens info ... | head`: the reader left; stop quietly, as a shell tool does
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
