"""The registry of measures that `flatlens sharpness` runs.

A measure is a :class:`Measure`: a name, its own command-line options, a cost estimate printed before
it starts, and a ``run`` that asks an :class:`~flatlens.measure.objective.Objective` its questions and
returns a :class:`MeasureOutput` (the HDF5 group to write, with datasets, attributes and summary rows).
New measures register themselves with :func:`register`; :func:`builtin_measures` imports the modules
that define flatlens's own. Measures that can share work when requested together (the density's
Lanczos runs also give eigenvalues and a deflated trace) register a :class:`Joint`; :func:`plan`
turns the requested names into the steps to run.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

MEASURE_MODULES = (
    "flatlens.measure.hessian_cli",
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
    seconds: float | None = None
    """Set when the cost is not in passes (e.g. per-sample backward passes): the measured prediction."""
    n_vector: int = 0
    """Passes over one parameter-sized vector besides the HVPs and draws (a dot or an axpy of the Krylov
    orthogonalisations, a probe's projections and products). On an 11 M-parameter ResNet-18 with 64 samples
    they and the draws took as long as the HVPs themselves, and an estimate without them was 2.3x short."""
    n_draw: int = 0
    """Random parameter-sized vectors drawn (probes, start and restart vectors; timed apart: a draw is made on
    CPU, ~20 vector passes there, and moved to the device)."""
    state_bytes: int = 0
    """Disk a resumable step that spends no HVPs keeps in its journal (the Gauss-Newton diagonal's partial sum):
    with it, ``flatlens sharpness --journal`` considers such a step too."""
    gradient_start: bool = False
    """The measure starts Lanczos from the gradient: one forward+backward more, unless the HVP kernel is
    ``graph_reuse``, whose retained graphs hold the gradient already. The kernel is chosen after the estimate,
    so the command adds that gradient to ``n_grad`` once it knows the kernel."""
    at_most: bool = False
    """The counts are a budget the measure may stop short of (a trace that stops at its CI target): the cost
    line then says "at most" and "<=" instead of "≈" (a README run predicted ≈ 53 s and took 16 s)."""


@dataclass
class MeasureOutput:
    """What a measure produced: the group to write and the rows of the final summary table."""

    group: str
    datasets: dict[str, Any]
    attrs: dict[str, Any]
    summary: list[tuple[str, ...]] = field(default_factory=list)
    """Rows ``(label, value)``, or ``(measure, label, value)`` when one step answers several measures."""
    written: bool = False
    """True when the measure wrote its group itself (e.g. resumable grids)."""


@dataclass
class Measure:
    name: str
    help: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    estimate: Callable[[Any, argparse.Namespace], Estimate]
    run: Callable[[Any, argparse.Namespace, "RunContext"], MeasureOutput]
    check_args: Callable[[argparse.Namespace, list[str]], None] | None = None
    """Called with the parsed options and the requested measures before the checkpoint is loaded: raises
    a one-line FlatlensError naming the flag of a bad value, so it fails in a second, not after loading
    the model and timing the HVP kernels."""
    completed: Callable[[Any, argparse.Namespace, Any, str], "list[tuple[str, ...]] | None"] | None = None
    """``completed(obj, args, out, fingerprint)``: the summary rows of this measure's result in the analysis
    file ``out`` when it is stored there with these settings (the same ``fingerprint``, see
    :attr:`RunContext.fingerprint`, and the same Objective), else None. ``flatlens sharpness`` then skips
    the measure (a rerun after a kill does not pay again for what was finished). None: never skipped
    (e.g. a measure that resumes its own work)."""
    conflicts: Callable[[Any, argparse.Namespace, Any, list[str]], "str | None"] | None = None
    """``conflicts(obj, args, out, names)``: why running this measure with the others requested (``names``)
    would drop results the analysis file ``out`` holds and this run does not measure again (e.g. a group
    of another setup, which a write replaces whole), or None. ``flatlens sharpness`` asks every requested
    measure before the first one runs, and stops unless ``--replace``."""


@dataclass
class RunContext:
    """What a measure may use besides the Objective: where to write, progress, and whether it is rank 0."""

    out: Any  # Path of the analysis file
    is_main: bool
    progress: Callable[..., Any]
    log: Callable[[str], None]
    fingerprint: str = ""
    """JSON of what decides this step's numbers besides the Objective: the flatlens version, the step (which
    measures share it) and the option values of its measures. A measure that can be skipped on a rerun
    stores it beside its results and compares it in ``completed``."""


@dataclass
class Joint:
    """One run that answers several measures at once (e.g. ``hessian``, ``trace`` and ``density`` from
    the same Lanczos runs). ``covers(args, requested)`` names the requested measures it would run (it
    is used only when that is two or more); ``estimate`` and ``run`` get that list too."""

    name: str
    covers: Callable[[argparse.Namespace, list[str]], list[str]]
    estimate: Callable[[Any, argparse.Namespace, list[str]], Estimate]
    run: Callable[[Any, argparse.Namespace, "RunContext", list[str]], MeasureOutput]
    completed: Callable[[Any, argparse.Namespace, Any, str, list[str]], "list[tuple[str, ...]] | None"] | None = None
    """As :attr:`Measure.completed`, for all the measures it covers (given last) at once."""


@dataclass
class Step:
    """One entry of a :func:`plan`: the measures it answers and how to estimate and run it."""

    label: str
    members: list[str]
    estimate: Callable[[Any, argparse.Namespace], Estimate]
    run: Callable[[Any, argparse.Namespace, "RunContext"], MeasureOutput]
    completed: Callable[[Any, argparse.Namespace, Any, str], "list[tuple[str, ...]] | None"] | None = None
    """``completed(obj, args, out, fingerprint)``: see :attr:`Measure.completed`."""


REGISTRY: dict[str, Measure] = {}
JOINTS: list[Joint] = []


def register(measure: Measure) -> Measure:
    REGISTRY[measure.name] = measure
    return measure


def register_joint(joint: Joint) -> Joint:
    JOINTS[:] = [j for j in JOINTS if j.name != joint.name] + [joint]
    return joint


def plan(names: list[str], args: argparse.Namespace) -> list[Step]:
    """The steps that run the requested measures ``names`` (in their order): a :class:`Joint` wherever
    it covers two or more of them, the measures alone otherwise."""
    steps: list[tuple[int, Step]] = []
    taken: set[str] = set()
    for j in JOINTS:
        cov = [n for n in j.covers(args, list(names)) if n in names and n not in taken]
        if len(cov) < 2:
            continue
        taken.update(cov)
        done = None if j.completed is None else (
            lambda obj, a, out, fp, j=j, cov=cov: j.completed(obj, a, out, fp, cov))
        steps.append((min(names.index(n) for n in cov), Step(
            "+".join(cov), cov, lambda obj, a, j=j, cov=cov: j.estimate(obj, a, cov),
            lambda obj, a, ctx, j=j, cov=cov: j.run(obj, a, ctx, cov), done)))
    for i, n in enumerate(names):
        if n not in taken:
            m = REGISTRY[n]
            steps.append((i, Step(n, [n], m.estimate, m.run, m.completed)))
    return [s for _, s in sorted(steps, key=lambda t: t[0])]


def builtin_measures() -> dict[str, Measure]:
    for module in MEASURE_MODULES:
        importlib.import_module(module)
    return REGISTRY
