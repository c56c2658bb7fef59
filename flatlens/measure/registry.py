"""The registry of measures that `flatlens sharpness` runs.

A measure is a :class:`Measure`: a name, its own command-line options, a cost estimate printed before
it starts, and a ``run`` that asks an :class:`~flatlens.measure.objective.Objective` its questions and
returns a :class:`MeasureOutput` (the HDF5 group to write, with datasets, attributes and summary rows).
New measures register themselves with :func:`register`; :func:`builtin_measures` imports the modules
that define flatlens's own.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

MEASURE_MODULES = (
    "flatlens.measure.hessian",
    "flatlens.measure.landscape",
)
"""Modules whose import registers measures (later measures add themselves here)."""


@dataclass
class Estimate:
    """Predicted cost of a measure, printed before it runs."""

    n_hvp: int = 0
    n_forward: int = 0
    n_grad: int = 0
    note: str = ""


@dataclass
class MeasureOutput:
    """What a measure produced: the group to write and the rows of the final summary table."""

    group: str
    datasets: dict[str, Any]
    attrs: dict[str, Any]
    summary: list[tuple[str, str]] = field(default_factory=list)
    written: bool = False
    """True when the measure wrote its group itself (e.g. resumable grids)."""


@dataclass
class Measure:
    name: str
    help: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    estimate: Callable[[Any, argparse.Namespace], Estimate]
    run: Callable[[Any, argparse.Namespace, "RunContext"], MeasureOutput]


@dataclass
class RunContext:
    """What a measure may use besides the Objective: where to write, progress, and whether it is rank 0."""

    out: Any  # Path of the analysis file
    is_main: bool
    progress: Callable[..., Any]
    log: Callable[[str], None]


REGISTRY: dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    REGISTRY[measure.name] = measure
    return measure


def builtin_measures() -> dict[str, Measure]:
    for module in MEASURE_MODULES:
        importlib.import_module(module)
    return REGISTRY
