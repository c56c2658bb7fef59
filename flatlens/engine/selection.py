"""Model selection over results records (DomainBed's ``model_selection.py``, plus SWAD's in-run oracle).

Inside one run (which checkpoint becomes ``model.pt``, ``train.selection``):

* ``training_domain_val`` — the checkpoint with the best mean accuracy over the training domains'
  ``out`` splits (DomainBed's ``IIDAccuracySelectionMethod``); ties go to the earlier checkpoint.
* ``test_domain_val`` — the best mean target ``out`` accuracy over checkpoints (SWAD's "oracle" row;
  DomainBed's oracle only looks at the last checkpoint, see :func:`select_across_hparams`).
* ``last`` — the final checkpoint.

Across runs that differ only in hyper-parameters (``flatlens collect``), DomainBed's rules:
training-domain validation picks the best (run, checkpoint) by that score; the oracle looks at each
run's LAST checkpoint and picks the run with the best target ``out`` accuracy; ``last`` picks the run
whose last checkpoint has the best training-domain validation score. The reported value is the
target ``in`` accuracy (DomainBed reports ``env{t}_in_acc``).

When a run has ``quant.enabled`` and ``quant.select_quantized_only`` (the default), only checkpoints
taken after ``q_step`` are candidates -- the quantized ones in ``qat`` / ``quantize_and_freeze`` (the
released QT-DoG selection could return a float checkpoint); ``flatlens collect`` also reports the
unrestricted choice for such runs.
"""

from __future__ import annotations

from typing import Any, Sequence

Record = dict[str, Any]

IN_RUN_METHODS = ("training_domain_val", "test_domain_val", "last")
TABLE_METHODS = ("training_domain_val", "oracle", "last")
METHOD_TITLES = {
    "training_domain_val": "training-domain validation",
    "test_domain_val": "test-domain validation (best checkpoint)",
    "oracle": "test-domain validation (oracle, last checkpoint)",
    "last": "last checkpoint",
}


def mean_acc(record: Record, envs: Sequence[int], part: str) -> float:
    return sum(record[f"env{i}_{part}_acc"] for i in envs) / len(envs)


def score(record: Record, method: str, train_envs: Sequence[int], test_envs: Sequence[int]) -> float:
    """The validation score a method maximises for one record."""
    if method in ("training_domain_val", "last"):
        return mean_acc(record, train_envs, "out")
    if method in ("test_domain_val", "oracle"):
        return mean_acc(record, test_envs, "out")
    raise ValueError(f"unknown selection method {method!r}")


def is_candidate(record: Record, quantized_only: bool) -> bool:
    """Whether a record may be selected: any record, or with ``quantized_only`` (``quant.enabled`` and
    ``quant.select_quantized_only``) only those taken after ``q_step`` -- ``phase == "after_q"``, which
    for ``qat`` / ``quantize_and_freeze`` means quantized and for the ablation modes (freeze, noise)
    under their treatment. Records without a phase fall back to their ``quantized`` flag."""
    if not quantized_only:
        return True
    if "phase" in record:
        return record["phase"] == "after_q"
    return bool(record.get("quantized"))


def candidates(records: Sequence[Record], quantized_only: bool = False) -> list[Record]:
    """Records eligible for selection (see :func:`is_candidate`)."""
    return [r for r in records if is_candidate(r, quantized_only)]


def select_in_run(records: Sequence[Record], method: str, train_envs: Sequence[int], test_envs: Sequence[int],
                  quantized_only: bool = False) -> Record | None:
    """The selected record of one run, or None when there is no eligible record."""
    pool = candidates(records, quantized_only)
    if not pool:
        return None
    if method == "last":
        return pool[-1]
    best = pool[0]
    for r in pool[1:]:
        if score(r, method, train_envs, test_envs) > score(best, method, train_envs, test_envs):
            best = r
    return best


def select_across_hparams(runs: Sequence[Sequence[Record]], method: str, train_envs: Sequence[int],
                          test_envs: Sequence[int], quantized_only: bool = False) -> Record | None:
    """DomainBed's sweep-level choice among runs of one trial (see module docstring)."""
    chosen: list[Record] = []
    for records in runs:
        if method == "training_domain_val":
            r = select_in_run(records, "training_domain_val", train_envs, test_envs, quantized_only)
        else:  # oracle and last both look at each run's last eligible checkpoint
            r = select_in_run(records, "last", train_envs, test_envs, quantized_only)
        if r is not None:
            chosen.append(r)
    if not chosen:
        return None
    key = "oracle" if method == "oracle" else "training_domain_val"
    best = chosen[0]
    for r in chosen[1:]:
        if score(r, key, train_envs, test_envs) > score(best, key, train_envs, test_envs):
            best = r
    return best


def test_accuracy(record: Record, test_envs: Sequence[int]) -> float:
    """What tables report: mean target ``in`` accuracy (DomainBed's ``env{t}_in_acc``)."""
    return mean_acc(record, test_envs, "in")
