"""collect: DomainBed's three selection rules and mean ± s.e. over trials, on hand-made records."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from flatlens.engine.collect import build_tables, find_runs, format_tables

DOMAINS = ["A", "B", "C"]


def _record(step, src_out, tgt_in, tgt_out, test_env=0, quantized=False):
    r = {"step": step, "quantized": quantized}
    for i in range(3):
        if i == test_env:
            r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = tgt_in, tgt_out
        else:
            r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = 0.99, src_out
    return r


def _write(root, name, label, trial_seed, test_env, records, hparams="h", quant=None):
    d = root / name
    d.mkdir(parents=True)
    run = {"dataset": "toy", "algorithm": "erm", "label": label, "test_envs": [test_env], "trial_seed": trial_seed,
           "seed": 0, "hparams_id": hparams, "domains": DOMAINS}
    lines = []
    for k, r in enumerate(records):
        r = {**r, "run": run}
        if k == 0:
            r["config"] = {"quant": quant or {"enabled": False}}
        lines.append(json.dumps(r))
    (d / "results.jsonl").write_text("\n".join(lines) + "\n")


def test_selection_rules_and_stderr(tmp_path):
    # trial 0: two hyper-parameter settings; trial 1: one
    _write(tmp_path, "t0h1", "erm", 0, 0, [_record(1, 0.80, 0.50, 0.90), _record(2, 0.70, 0.60, 0.10)], "h1")
    _write(tmp_path, "t0h2", "erm", 0, 0, [_record(1, 0.85, 0.40, 0.20), _record(2, 0.60, 0.30, 0.30)], "h2")
    _write(tmp_path, "t1h1", "erm", 1, 0, [_record(1, 0.90, 0.70, 0.50), _record(2, 0.95, 0.80, 0.40)], "h1")
    tables = {t.method: t for t in build_tables(find_runs(tmp_path))}
    cell = lambda m: tables[m].rows[0][1][0]  # noqa: E731  (label erm, target A)
    # training-domain validation: best (run, checkpoint) by source out acc -> t0h2@1 (0.85), t1h1@2 (0.95)
    assert sorted(cell("training_domain_val").values) == pytest.approx([40.0, 80.0])
    # oracle: each run's LAST checkpoint, run chosen by target out -> t0: h2 (0.30 > 0.10) -> 30; t1 -> 80
    assert sorted(cell("oracle").values) == pytest.approx([30.0, 80.0])
    # last: last checkpoints, run chosen by source out -> t0: h1 (0.70 > 0.60) -> 60; t1 -> 80
    assert sorted(cell("last").values) == pytest.approx([60.0, 80.0])
    c = cell("training_domain_val")
    assert c.mean == pytest.approx(60.0) and c.stderr == pytest.approx(20.0 / math.sqrt(2))
    assert tables["oracle"].rows[0][1][1] is None  # no run held out domain B
    text = format_tables(list(tables.values()), "text")
    assert "60.0 ± 14.1" in text and "X" in text


def test_quantized_only_selection(tmp_path):
    recs = [_record(1, 0.99, 0.9, 0.9, quantized=False), _record(2, 0.5, 0.2, 0.2, quantized=True)]
    _write(tmp_path, "q", "qat", 0, 0, recs, quant={"enabled": True, "select_quantized_only": True})
    _write(tmp_path, "f", "fp", 0, 0, recs)
    rows = dict(t.rows for t in build_tables(find_runs(tmp_path), ["training_domain_val"]))[0] if False else None
    table = build_tables(find_runs(tmp_path), ["training_domain_val"])[0]
    by_label = {label: cells[0].values for label, cells in table.rows}
    assert by_label["qat"] == [20.0]  # the float checkpoint at step 1 is not eligible
    assert by_label["fp"] == [90.0]
    assert rows is None


@pytest.mark.parametrize("fmt", ["markdown", "latex", "csv"])
def test_formats(tmp_path, fmt):
    for t in (0, 1, 2):
        _write(tmp_path, f"r{t}", "erm", 0, t, [_record(1, 0.8, 0.5 + 0.1 * t, 0.5, test_env=t)])
    out = format_tables(build_tables(find_runs(tmp_path), ["training_domain_val"]), fmt)
    if fmt == "markdown":
        assert "| erm | 50.0 ± 0.0 | 60.0 ± 0.0 | 70.0 ± 0.0 | 60.0 | 1 |" in out
    elif fmt == "latex":
        assert r"\begin{tabular}" in out and r"50.0 $\pm$ 0.0" in out
    else:
        rows = list(csv.DictReader(io.StringIO(out)))
        avg = [r for r in rows if r["target"] == "Avg"][0]
        assert float(avg["mean"]) == pytest.approx(60.0) and len(rows) == 4
