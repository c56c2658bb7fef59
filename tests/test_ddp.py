"""torchrun with 2 gloo processes trains the same run as 1 process (within float tolerance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, flatlens_cmd

# no dropout (its masks are drawn per rank) and frozen BN (per-rank batch statistics would differ):
# with these, the 2-process global batch and gradient equal the 1-process ones up to summation order.
ARGS = ["--set", "model.width=8", "model.freeze_bn=true", "train.batch_size=16", "train.steps=30",
        "train.eval_every=10", "--quiet"]


def _records(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    one = flatlens_cmd("train", *ARGS, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "flatlens", "train", *ARGS, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [10, 20, 30]
    assert r2[0]["versions"]["world_size"] == 2 and r1[0]["versions"]["world_size"] == 1
    for a, b in zip(r1, r2):
        # measured: |difference| ~1e-7 (float summation order of the gradient all-reduce)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for key in a:
            if key.endswith("_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
            elif key.endswith("_acc"):
                assert b[key] == pytest.approx(a[key], abs=1e-9), key
    # the same run directory layout, written once (by rank 0)
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(tmp_path / "one") == names(tmp_path / "two")
