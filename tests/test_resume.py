"""Kill -9 a training subprocess mid-run, resume it, and get exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import REPO, flatlens_cmd
from flatlens.checkpoint import read_checkpoint
from flatlens.engine.loop import TIMING_KEYS

# dropout (global RNG), a warm-up + cosine schedule and BN buffers all have to survive the resume
ARGS = ["--set", "model.width=8", "model.dropout=0.2", "train.batch_size=16", "train.steps=60",
        "train.eval_every=10", "optim.scheduler=cosine", "optim.warmup_steps=8"]


def _n_records(out: Path) -> int:
    p = out / "results.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _start(out: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flatlens", "train", *ARGS, "--out", str(out), "--quiet"]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it finished first."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and k != "versions"} for r in records]


def _final(out: Path):
    ckpt = read_checkpoint(out / "last.pt")
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return ckpt, records


def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path):
    ref = tmp_path / "ref"
    done = flatlens_cmd("train", *ARGS, "--out", str(ref), "--quiet")
    assert done.returncode == 0, done.stderr
    ref_ckpt, ref_records = _final(ref)

    out = tmp_path / "killed"
    rng = random.Random(0)
    # 1st kill: mid-run, right after the second checkpoint landed (between checkpoint files)
    killed = _kill_when(_start(out), lambda: _n_records(out) >= 2)
    # 2nd kill: at a random moment of the resumed process (possibly before it saved anything new)
    delay = rng.uniform(0.3, 3.0)
    t0 = time.monotonic()
    killed2 = _kill_when(_start(out, resume=True), lambda: time.monotonic() - t0 > delay)
    # 3rd kill: while it is between two checkpoints again
    n = _n_records(out)
    killed3 = _kill_when(_start(out, resume=True), lambda: _n_records(out) >= n + 1)
    assert killed, "the first run finished before it could be killed; make it longer"
    assert not (out / "done").exists() or not (killed2 or killed3)
    final = _start(out, resume=True)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()

    ckpt, records = _final(out)
    assert ckpt["step"] == ref_ckpt["step"] == 60
    for key, value in ref_ckpt["model"].items():
        assert torch.equal(value, ckpt["model"][key]), key  # bitwise, BN buffers included
    ref_opt, opt = ref_ckpt["train_state"]["algorithm"], ckpt["train_state"]["algorithm"]
    assert opt["scheduler"]["last_epoch"] == ref_opt["scheduler"]["last_epoch"]
    for sid, state in ref_opt["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt["optimizer"]["state"][sid]["exp_avg_sq"])
    assert _comparable(records) == _comparable(ref_records)
    assert torch.equal(read_checkpoint(out / "model.pt")["model"]["classifier.weight"],
                       read_checkpoint(ref / "model.pt")["model"]["classifier.weight"])
    assert (out / "done").exists()

    again = flatlens_cmd("train", *ARGS, "--out", str(out), "--resume")
    assert again.returncode == 0 and "already finished" in again.stdout


def test_resume_after_the_data_moved(tmp_path):
    """--resume rebuilt its config from the defaults when any --set was given, so no key could be changed
    on a resume (RESUME_SAFE_KEYS was unreachable from the CLI), and a folder dataset moved since the
    start made the run unresumable. --set now applies on top of the stored config; data.root is
    resume-safe, checked against the data fingerprints in last.pt, and kept in config.toml."""
    import shutil

    from test_data import _make_tree

    domains, classes = ["sketch", "photo", "cartoon", "art_painting"], ["dog", "horse"]
    _make_tree(tmp_path / "old", "PACS", domains, classes, n=4)
    _make_tree(tmp_path / "other", "PACS", domains, classes, n=5)  # same names, other images
    run = tmp_path / "run"
    start = flatlens_cmd("train", "--set", "data.dataset=PACS", f"data.root={tmp_path / 'old'}", "data.image_size=16",
                         "model.width=8", "train.steps=4", "train.eval_every=2", "train.batch_size=4", "--out", str(run),
                         "--quiet")
    assert start.returncode == 0, start.stderr
    (run / "done").unlink()  # as if killed after its last checkpoint
    shutil.move(str(tmp_path / "old"), str(tmp_path / "new"))
    lost = flatlens_cmd("train", "--out", str(run), "--resume", "--quiet")
    assert lost.returncode == 2 and "PACS not found at" in lost.stderr
    wrong = flatlens_cmd("train", "--out", str(run), "--resume", "--set", f"data.root={tmp_path / 'other'}", "--quiet")
    assert wrong.returncode == 2 and "differ from the ones this run trained on" in wrong.stderr
    moved = flatlens_cmd("train", "--out", str(run), "--resume", "--set", f"data.root={tmp_path / 'new'}", "--quiet")
    assert moved.returncode == 0, moved.stderr
    assert (run / "done").exists() and f'root = "{tmp_path / "new"}"' in (run / "config.toml").read_text()
    other = flatlens_cmd("train", "--out", str(run), "--resume", "--set", "train.steps=8", "--quiet")
    assert other.returncode == 2 and "train.steps (4 -> 8)" in other.stderr and "--set may change only" in other.stderr
