"""A real ERM run on RotatedDigits: run directory, records, selection, checkpoints, load_checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import flatlens as fl
from flatlens.checkpoint import read_checkpoint, save_checkpoint
from flatlens.config import load_config
from flatlens.distributed import DistContext
from flatlens.engine.evaluate import evaluate
from flatlens.engine.selection import mean_acc
from flatlens.errors import CheckpointError, DataError


def _records(run):
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_run_directory_layout(erm_run):
    for name in ("config.toml", "env.json", "results.jsonl", "train.log", "init.pt", "last.pt", "model.pt", "done"):
        assert (erm_run / name).is_file(), name
    assert sorted(p.name for p in (erm_run / "checkpoints").iterdir()) == [
        "step_000050.pt", "step_000100.pt", "step_000150.pt"]
    cfg = load_config(erm_run / "config.toml")
    assert cfg.train.steps == 150 and cfg.data.test_envs == [0]
    env = json.loads((erm_run / "env.json").read_text())
    assert {"torch", "python", "flatlens", "git_commit", "device", "world_size"} <= set(env)
    assert not list(erm_run.glob(".*.tmp"))  # no temp files left behind


def test_records_follow_domainbed_semantics(erm_run):
    recs = _records(erm_run)
    assert [r["step"] for r in recs] == [50, 100, 150]
    first = recs[0]
    assert first["config"]["train"]["steps"] == 150 and "versions" in first and "data_fingerprint" in first
    for r in recs:
        for i in range(6):
            for part in ("in", "out"):
                assert 0.0 <= r[f"env{i}_{part}_acc"] <= 1.0 and r[f"env{i}_{part}_loss"] >= 0.0
        assert {"loss", "lr", "epoch", "step_time", "eval_time", "quantized", "run"} <= set(r)
        assert r["run"]["label"] == "erm" and r["run"]["domains"][0] == "0"
    assert recs[-1]["loss"] < recs[0]["loss"]
    # the held-out 0-degree domain is clearly better than chance (10%) after 150 steps
    assert recs[-1]["env0_in_acc"] > 0.3, recs[-1]["env0_in_acc"]


def test_selection_init_and_last_checkpoints(erm_run):
    recs = _records(erm_run)
    best = max(recs, key=lambda r: (mean_acc(r, [1, 2, 3, 4, 5], "out"), -r["step"]))
    sel = read_checkpoint(erm_run / "model.pt")
    assert sel["kind"] == "selected" and sel["step"] == best["step"]
    assert sel["selection"]["method"] == "training_domain_val"
    init, last = read_checkpoint(erm_run / "init.pt"), read_checkpoint(erm_run / "last.pt")
    assert init["step"] == 0 and last["step"] == 150 and "train_state" in last
    w = "featurizer.0.weight"
    assert not torch.equal(init["model"][w], last["model"][w])
    step100 = read_checkpoint(erm_run / "checkpoints" / "step_000100.pt")
    assert step100["metrics"]["step"] == 100
    # every file is plain data: loadable with weights_only=True
    for p in erm_run.rglob("*.pt"):
        torch.load(p, weights_only=True)


def test_load_checkpoint_rebuilds_model_and_splits(erm_run):
    run = fl.load_checkpoint(erm_run / "model.pt")
    assert run.kind == "selected" and not run.model.training and len(run.sha256) == 64
    metrics = evaluate(run.model, run.dataset, run.splits, DistContext(), 256)
    for key, value in metrics.items():
        assert value == pytest.approx(run.metrics[key], abs=1e-6), key
    assert [i for i, _ in run.split_data("train")] == [1, 2, 3, 4, 5]
    (t, idx), = run.split_data("target")
    assert t == 0 and len(idx) == len(run.dataset.domains[0])
    assert run.split_data("env3_out")[0][0] == 3
    with pytest.raises(DataError, match="unknown split 'val'"):
        run.split_data("val")
    light = fl.load_checkpoint(erm_run / "init.pt", data=False)
    assert light.dataset is None and light.step == 0


def test_load_checkpoint_refuses_changed_data(erm_run, tmp_path):
    ckpt = read_checkpoint(erm_run / "model.pt")
    ckpt["config"]["data"]["data_seed"] = 5  # the config now builds other domains than were trained on
    path = tmp_path / "tampered.pt"
    save_checkpoint(path, {k: v for k, v in ckpt.items() if not k.startswith("format")})
    with pytest.raises(DataError, match="differ from the data it was trained on"):
        fl.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a flatlens checkpoint"):
        torch.save({"model": {}}, tmp_path / "foreign.pt")
        fl.load_checkpoint(tmp_path / "foreign.pt")


def test_collect_reads_real_runs(erm_run, tmp_path):
    from flatlens.engine.collect import build_tables, find_runs, format_tables

    shutil.copytree(erm_run, tmp_path / "a" / "erm")
    runs = find_runs(tmp_path)
    assert len(runs) == 1
    text = format_tables(build_tables(runs), "markdown")
    assert "| erm |" in text and "training-domain validation" in text


def test_freeze_bn_is_applied_during_training(tmp_path):
    from conftest import tiny_config
    from flatlens.engine.loop import train

    train(tiny_config("model.freeze_bn=true", "train.steps=10", "train.eval_every=10"), tmp_path / "fz", verbose=False)
    init, last = read_checkpoint(tmp_path / "fz" / "init.pt"), read_checkpoint(tmp_path / "fz" / "last.pt")
    for key in init["model"]:
        if "running" in key:
            assert torch.equal(init["model"][key], last["model"][key]), key
    assert not torch.equal(init["model"]["featurizer.1.weight"], last["model"]["featurizer.1.weight"])  # BN affine trains


def test_resume_with_other_torch_threads_warns_that_it_is_not_bitwise(tmp_path):
    """CPU kernels sum in a thread-dependent order, so a resume on another thread count cannot be bitwise."""
    import json
    import warnings

    from conftest import tiny_config
    from flatlens.engine.loop import train
    from flatlens.engine.rundir import resume_differences

    assert resume_differences({"torch_threads": 2, "torch": "2.14.1"}, {"torch_threads": 1, "torch": "2.14.1"}) == \
        ["torch_threads (2 -> 1)"]
    assert resume_differences({}, {"torch_threads": 1}) == []  # an env.json without the key says nothing
    cfg = tiny_config("train.steps=4", "train.eval_every=2")
    out = tmp_path / "run"
    train(cfg, out, verbose=False)
    (out / "done").unlink()  # as if killed after the last checkpoint
    env = json.loads((out / "env.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same environment resumes silently
        train(cfg, out, resume=True, verbose=False)
    (out / "done").unlink()
    env["torch_threads"] = torch.get_num_threads() + 3
    (out / "env.json").write_text(json.dumps(env))
    with pytest.warns(RuntimeWarning, match=r"torch_threads \(\d+ -> \d+\).*OMP_NUM_THREADS"):
        train(cfg, out, resume=True, verbose=False)
