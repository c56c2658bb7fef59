"""`flatlens collect`: DomainBed-style result tables from the results.jsonl files under a folder.

Runs are grouped by dataset and run label (``train.name``, else the algorithm plus the quantization
mode), then by target domain: a run with several test domains counts for each of them, as in
DomainBed. Inside a cell, runs of the same trial (same ``trial_seed`` and ``seed``) that differ in
hyper-parameters compete under each selection method (:mod:`flatlens.engine.selection`); the cell
shows the mean ± standard error over trials of the selected target ``in`` accuracy, in percent, with
DomainBed's standard error ``std / sqrt(n)`` (population std). ``Avg`` is the mean over target
domains, shown only when every domain has a value.

Runs whose in-run selection was restricted to quantized (``after_q``) checkpoints
(``quant.enabled`` and ``quant.select_quantized_only``) get a second row, ``<label> (any checkpoint)``,
selected over every checkpoint -- the choice the released QT-DoG code would make.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flatlens.engine.selection import METHOD_TITLES, TABLE_METHODS, select_across_hparams
from flatlens.errors import FlatlensError

ANY_CHECKPOINT = "(any checkpoint)"
"""Suffix of the extra row of a run label whose selection was restricted to checkpoints taken after
``q_step`` (``quant.select_quantized_only``): the same runs, selected over every checkpoint."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of one results.jsonl (a torn last line from a foreign writer is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


@dataclass
class RunRecords:
    """The records of one run directory plus what identifies it."""

    path: Path
    records: list[dict[str, Any]]
    dataset: str
    label: str
    test_envs: list[int]
    train_envs: list[int]
    trial: tuple[int, int]
    hparams_id: str
    domains: list[str]
    quantized_only: bool


def load_run(path: Path) -> RunRecords | None:
    records = read_records(path)
    if not records or "run" not in records[0]:
        return None
    run = records[0]["run"]
    cfg = records[0].get("config", {})
    quant = cfg.get("quant", {})
    domains = list(run["domains"])
    test_envs = list(run["test_envs"])
    return RunRecords(
        path=path.parent, records=records, dataset=run["dataset"], label=run["label"], test_envs=test_envs,
        train_envs=[i for i in range(len(domains)) if i not in test_envs],
        trial=(int(run["trial_seed"]), int(run["seed"])), hparams_id=run.get("hparams_id", ""), domains=domains,
        quantized_only=bool(quant.get("enabled", False) and quant.get("select_quantized_only", True)),
    )


def find_runs(root: str | Path) -> list[RunRecords]:
    """Every flatlens run (a results.jsonl with run metadata) under ``root``, sorted by path."""
    root = Path(root)
    if not root.exists():
        raise FlatlensError(f"{root} does not exist; give the folder that holds your run directories")
    files = [root] if root.is_file() else sorted(root.rglob("results.jsonl"))
    runs = [r for r in (load_run(p) for p in files) if r is not None]
    return runs


@dataclass
class Cell:
    values: list[float]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def stderr(self) -> float:
        n = len(self.values)
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / n) / math.sqrt(n)


@dataclass
class Table:
    title: str
    dataset: str
    method: str
    columns: list[str]
    rows: list[tuple[str, list[Cell | None]]] = field(default_factory=list)

    def average(self, cells: Sequence[Cell | None]) -> float | None:
        if not cells or any(c is None for c in cells):
            return None
        return sum(c.mean for c in cells if c is not None) / len(cells)


def build_tables(runs: Sequence[RunRecords], methods: Sequence[str] = TABLE_METHODS) -> list[Table]:
    """One table per (dataset, selection method): rows = run labels, columns = target domains."""
    tables = []
    for dataset in sorted({r.dataset for r in runs}):
        ds_runs = [r for r in runs if r.dataset == dataset]
        domains = max((r.domains for r in ds_runs), key=len)
        labels = sorted({r.label for r in ds_runs})
        for method in methods:
            table = Table(f"{dataset}: {METHOD_TITLES[method]}", dataset, method, list(domains))
            for label in labels:
                restricted = any(r.quantized_only for r in ds_runs if r.label == label)
                variants = [(label, None)] + ([(f"{label} {ANY_CHECKPOINT}", False)] if restricted else [])
                for row_label, quantized_only in variants:
                    cells: list[Cell | None] = []
                    for t in range(len(domains)):
                        group = [r for r in ds_runs if r.label == label and t in r.test_envs]
                        values = []
                        for trial in sorted({r.trial for r in group}):
                            trial_runs = [r for r in group if r.trial == trial]
                            chosen = _select(trial_runs, method, t, quantized_only)
                            if chosen is not None:
                                values.append(100.0 * chosen[f"env{t}_in_acc"])
                        cells.append(Cell(values) if values else None)
                    table.rows.append((row_label, cells))
            tables.append(table)
    return tables


def _select(runs: Sequence[RunRecords], method: str, test_env: int,
            quantized_only: bool | None = None) -> dict[str, Any] | None:
    """The record a method selects among runs of one trial; ``quantized_only`` overrides the runs' own
    restriction (``False``: every checkpoint is a candidate)."""
    # Runs of one trial compete; all share train/test envs only when they share test_envs, so
    # select per distinct test_envs set and keep the best by the method's own score.
    by_envs: dict[tuple[int, ...], list[RunRecords]] = {}
    for r in runs:
        by_envs.setdefault(tuple(r.test_envs), []).append(r)
    best = None
    for envs, group in sorted(by_envs.items()):
        train_envs = group[0].train_envs
        restrict = any(r.quantized_only for r in group) if quantized_only is None else quantized_only
        rec = select_across_hparams([r.records for r in group], method, train_envs, [test_env], restrict)
        if rec is not None and (best is None or len(envs) < best[0]):
            best = (len(envs), rec)  # prefer runs with the fewest held-out domains (the standard setting)
    return best[1] if best else None


def _fmt_cell(c: Cell | None) -> str:
    return "X" if c is None else f"{c.mean:.1f} ± {c.stderr:.1f}"


def format_tables(tables: Sequence[Table], fmt: str = "text") -> str:
    """Render tables as ``text`` | ``markdown`` | ``latex`` | ``csv``."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["dataset", "selection", "algorithm", "target", "mean", "stderr", "n_trials"])
        for t in tables:
            for label, cells in t.rows:
                for col, c in zip(t.columns, cells):
                    if c is not None:
                        w.writerow([t.dataset, t.method, label, col, f"{c.mean:.4f}", f"{c.stderr:.4f}", len(c.values)])
                avg = t.average(cells)
                if avg is not None:
                    w.writerow([t.dataset, t.method, label, "Avg", f"{avg:.4f}", "", min(len(c.values) for c in cells if c)])
        return buf.getvalue()
    out = []
    for t in tables:
        header = ["Algorithm", *t.columns, "Avg"]
        body = []
        for label, cells in t.rows:
            avg = t.average(cells)
            n = sorted({len(c.values) for c in cells if c is not None})
            body.append([label, *(_fmt_cell(c) for c in cells), "X" if avg is None else f"{avg:.1f}",
                         "/".join(map(str, n))])
        if fmt == "latex":
            out.append(_latex(t.title, header + ["trials"], body))
        elif fmt == "markdown":
            out.append(f"**{t.title}**\n\n" + _markdown(header + ["trials"], body))
        else:
            out.append(f"== {t.title} ==\n" + text_table(header + ["trials"], body))
    return "\n\n".join(out) + "\n"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned plain-text columns with a dashed rule under the header, no trailing blanks."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _latex(title: str, header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")  # noqa: E731
    lines = [r"\begin{table}[h]", r"\centering", rf"\caption{{{esc(title)}}}",
             r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)
