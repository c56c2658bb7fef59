"""Errors a user can act on.

Every error that is the user's to fix (a bad config key, missing data, an unreadable checkpoint, a
resume with a different config) is a :class:`FlatlensError`. Its message is one line that names the
problem and the fix; the CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class FlatlensError(Exception):
    """Base class of all user-facing flatlens errors (one-line, actionable message)."""


class ConfigError(FlatlensError):
    """A config file, key, value or ``--set`` override is invalid."""


class DataError(FlatlensError):
    """A dataset is missing, malformed, or a split request cannot be satisfied."""


class CheckpointError(FlatlensError):
    """A checkpoint is missing, unreadable, foreign (not written by flatlens) or incompatible."""


class ResumeError(FlatlensError):
    """A run cannot be resumed (nothing to resume, or the config differs from the stored one)."""


class RunDirError(FlatlensError):
    """The output directory is in a state that the requested command must not overwrite."""


class StoreError(FlatlensError):
    """An HDF5 analysis file is missing, foreign, or holds results incompatible with the request."""


class DistributedError(FlatlensError):
    """torch.distributed is misconfigured for the requested run."""
