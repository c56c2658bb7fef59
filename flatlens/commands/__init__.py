"""One module per ``flatlens`` subcommand; each defines ``add_parser(subparsers)``. Their parsers share
:class:`HelpFormatter`."""

from __future__ import annotations

import argparse
import re


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help only where it tells the reader something.

    argparse's own formatter appends it to every option, so the help read "(default: all) (default:
    None)" where the text already named the default, "(default: None)" for an option whose absence
    means "computed" and "(default: True)" for a ``--no-...`` switch. Here an option gets the suffix
    only when its default is a value (not None, not a flag's True/False) and its help does not
    already say "default".
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS:
            return text
        if "default" in text.lower() or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def seed_arg(text: str) -> int:
    """argparse ``type`` of ``--seed``: an int that a result file can record (64 bits), checked before any
    work (a seed of 10**20 used to fail in h5py after the whole measurement)."""
    from flatlens.errors import FlatlensError
    from flatlens.seeding import check_seed

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    try:
        return check_seed(value)
    except FlatlensError:
        raise argparse.ArgumentTypeError(f"{value} does not fit in 64 bits; pass one in [-2**63, 2**63)") from None


def path_arg(text: str) -> str:
    """argparse ``type`` of a path option: refuses an empty value, which ``Path("")`` would silently
    turn into the current directory (or a falsy test into "not given", i.e. the default path)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a file or directory name")
    return text


_NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.eE+-]*:")


def accept_negative_ranges(parser: argparse.ArgumentParser) -> None:
    """Let ``--range -1:1:51`` (and ``--landscape-range -1:1:51``) through as a value.

    argparse takes any word that starts with ``-`` and is not a plain negative number for an option, so
    a range starting at a negative coordinate needed ``--range=-1:1:51``. The parser's negative-number
    matcher is widened to ``MIN:...`` words (none of our options looks like one).
    """
    parser._negative_number_matcher = _NEGATIVE_VALUE
