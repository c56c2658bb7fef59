"""Resume of quantized / ablation runs is bitwise exact: a real `flatlens train` process killed with
SIGKILL before q_step and resumed across it, and an in-process interruption for every quant.mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, tiny_config
from flatlens.checkpoint import read_checkpoint
from flatlens.config import load_config
from flatlens.engine import loop as L
from flatlens.engine.loop import TIMING_KEYS, train


def strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and k != "versions"} for r in records]


def assert_same_final_state(a: Path, b: Path) -> None:
    ca, cb = read_checkpoint(a / "last.pt"), read_checkpoint(b / "last.pt")
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    oa, ob = ca["train_state"]["algorithm"]["optimizer"], cb["train_state"]["algorithm"]["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert ca["train_state"]["hooks"] == cb["train_state"]["hooks"]
    ra = [json.loads(x) for x in (a / "results.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "results.jsonl").read_text().splitlines()]
    assert strip_timing(ra) == strip_timing(rb)
    sa, sb = read_checkpoint(a / "model.pt"), read_checkpoint(b / "model.pt")
    assert sa["step"] == sb["step"] and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_qat_run_killed_with_sigkill_before_q_step_resumes_bitwise(tmp_path):
    """A real process, SIGKILLed right after its first checkpoint (step 5 < q_step 20), resumed with
    `flatlens train --resume` across q_step: final weights, step sizes, optimizer state, records and
    model.pt equal an uninterrupted run's bit for bit."""
    overrides = [*TINY, "train.steps=30", "train.eval_every=5", "quant.enabled=true", "quant.q_step=20",
                 "quant.bits=4"]
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flatlens", "train", "--quiet", "--set", *overrides, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        results = killed / "results.jsonl"
        while not (results.exists() and results.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 300 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = read_checkpoint(killed / "last.pt")["step"]
    assert 5 <= stopped_at < 20 and not (killed / "done").exists()

    res = subprocess.run([sys.executable, "-m", "flatlens", "train", "--resume", "--out", str(killed)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"resuming {killed} at step {stopped_at}/30" in res.stdout

    ref = tmp_path / "ref"
    train(load_config(None, overrides), ref, verbose=False)
    assert_same_final_state(killed, ref)
    recs = [json.loads(x) for x in (killed / "results.jsonl").read_text().splitlines()]
    assert [r["quantized"] for r in recs] == [r["step"] > 20 for r in recs]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode, extra", [
    ("qat", ["quant.activations=true"]),
    ("quantize_and_freeze", ["quant.activations=true"]),
    ("freeze_without_quant", []),
    ("uniform_noise", ["quant.noise_a=0.01"]),
    ("matched_noise", []),
])
def test_every_mode_resumes_bitwise_across_q_step(tmp_path, monkeypatch, mode, extra):
    overrides = ["train.steps=20", "train.eval_every=5", "quant.enabled=true", "quant.q_step=8",
                 f"quant.mode={mode}", *extra]
    ref = tmp_path / "ref"
    train(tiny_config(*overrides), ref, verbose=False)

    out = tmp_path / "resumed"
    original = L.Trainer._checkpoint
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):  # die right after the 1st checkpoint written by this process
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise Interrupt

    monkeypatch.setattr(L.Trainer, "_checkpoint", interrupted)
    with pytest.raises(Interrupt):
        train(tiny_config(*overrides), out, verbose=False)
    monkeypatch.setattr(L.Trainer, "_checkpoint", original)
    assert read_checkpoint(out / "last.pt")["step"] == 5  # before q_step
    # resumed across q_step, interrupted again after it (step 10), resumed to the end
    calls["n"] = 0
    monkeypatch.setattr(L.Trainer, "_checkpoint", interrupted)
    with pytest.raises(Interrupt):
        train(tiny_config(*overrides), out, resume=True, verbose=False)
    monkeypatch.setattr(L.Trainer, "_checkpoint", original)
    assert read_checkpoint(out / "last.pt")["step"] == 10
    train(tiny_config(*overrides), out, resume=True, verbose=False)
    assert_same_final_state(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["qat", "quantize_and_freeze", "matched_noise"])
def test_ddp_two_gloo_processes_cross_q_step(tmp_path, mode):
    """torchrun, 2 CPU processes: step sizes without gradients before q_step (find_unused_parameters),
    the switch, the freeze and the noise stay identical on both ranks; the run finishes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "flatlens", "train", "--quiet", "--set", *TINY, "train.steps=20", "train.eval_every=10",
                          "quant.enabled=true", "quant.q_step=10", f"quant.mode={mode}", "--out", str(out)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["before_q", "after_q"]
    assert [r["quantized"] for r in recs] == [False, mode != "matched_noise"]
