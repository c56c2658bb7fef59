"""`flatlens landscape` as a user runs it: CLI, resume after SIGKILL, 2-process gloo = 1 process."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from conftest import REPO, flatlens_cmd

GROUP = "landscape/random_2d"


def _arrays(path, group=GROUP):
    with h5py.File(path, "r") as f:
        g = f[group]
        out = {k: g[k][()] for k in ("loss", "accuracy", "loss_stderr", "done", "level", "xcoordinates", "ycoordinates")}
        for axis in g["directions"]:
            for n in g["directions"][axis]:
                out[f"directions/{axis}/{n}"] = g["directions"][axis][n][()]
        out["settings"] = g.attrs["settings"]
        out["directions_sha256"] = g.attrs["directions_sha256"]
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_cli_computes_resumes_and_refuses_changed_settings(tiny_run, tmp_path):
    out = tmp_path / "a.h5"
    args = ["landscape", str(tiny_run / "model.pt"), "--dim", "2", "--range", "-1:1:5", "--y-range=-0.5:0.5:3",
            "--samples", "64", "--split", "target", "--out", str(out)]
    r = flatlens_cmd(*args)
    assert r.returncode == 0, r.stderr
    assert "predicted 15 forward passes over 64 samples" in r.stdout and "≈" in r.stdout
    with h5py.File(out, "r") as f:
        g = f[GROUP]
        assert g["loss"].shape == (3, 5) and g["done"][()].all()
        assert g.attrs["norm"] == "filter" and g.attrs["setting_ignore"] == "biasbn" and g.attrs["cost_n_forward"] == 15
        assert abs(g["loss"][1, 2] - g.attrs["origin_loss"]) <= 1e-6 * g.attrs["origin_loss"]
    again = flatlens_cmd(*args)
    assert again.returncode == 0 and "0 to do" in again.stdout
    bad = flatlens_cmd(*args, "--norm", "layer")
    assert bad.returncode == 2 and "norm='filter'" in bad.stderr and "--overwrite" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    sys.path.insert(0, {repo!r})
    from flatlens.measure.objective import Objective
    from flatlens.measure.landscape import surface

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 6, 6, generator=g), torch.randint(0, 4, (48,), generator=g)
    obj = Objective(net, batches=[(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)])
    delay = float(sys.argv[2])
    real = obj.loss_and_accuracy

    def counted():
        value = real()
        time.sleep(delay)
        print("point", flush=True)
        return value

    obj.loss_and_accuracy = counted
    surface(obj, 2, "-1:1:9", "-1:1:9", seed=3, out=sys.argv[1], block_size=4)
    print("finished", flush=True)
""")


def test_sigkill_mid_surface_resumes_to_the_uninterrupted_file(tmp_path):
    script = tmp_path / "surf.py"
    script.write_text(_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, delay):
        return subprocess.run([sys.executable, str(script), str(out), str(delay)], capture_output=True, text=True,
                              env=env, timeout=300)

    ref = run(tmp_path / "ref.h5", 0)
    assert ref.returncode == 0, ref.stderr
    killed = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.04"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    n_done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                with h5py.File(killed, "r", locking=False) as f:
                    n_done = int(f[GROUP]["done"][()].sum()) if GROUP in f else 0
            except (OSError, KeyError):
                continue
            if n_done >= 12:
                break
        assert proc.poll() is None, "the surface finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "finished" not in stdout
    computed = stdout.count("point") - 4  # minus the warm-up passes
    with h5py.File(killed, "r") as f:  # a valid file with whole blocks
        g = f[GROUP]
        done_at_kill = int(g["done"][()].sum())
        assert done_at_kill >= 12 and np.isfinite(g["loss"][()][g["done"][()]]).all()
        assert np.isnan(g["loss"][()][~g["done"][()]]).all()
    assert 0 <= computed - done_at_kill <= 4  # at most one block (4 points) of work lost
    resumed = run(killed, 0)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("point") - 4 == 81 - done_at_kill  # only the missing points
    _assert_same(_arrays(killed), _arrays(tmp_path / "ref.h5"))
    with h5py.File(killed, "r") as f:
        assert int(f[GROUP].attrs["sessions"]) == 2 and int(f[GROUP].attrs["complete_level"]) == 3


def test_two_process_gloo_run_equals_one_process(tiny_run, tmp_path):
    args = ["landscape", str(tiny_run / "model.pt"), "--dim", "2", "--range=-1:1:7", "--y-range=-1:1:5",
            "--samples", "64", "--split", "target", "--block", "2"]
    env = {"OMP_NUM_THREADS": "1"}
    one = flatlens_cmd(*args, "--out", str(tmp_path / "one.h5"), env=env)
    assert one.returncode == 0, one.stderr
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "flatlens", *args, "--out", str(tmp_path / "two.h5")],
                         capture_output=True, text=True, env=full_env, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 ranks sharing the grid" in two.stdout
    _assert_same(_arrays(tmp_path / "one.h5"), _arrays(tmp_path / "two.h5"))
    with h5py.File(tmp_path / "two.h5", "r") as f:
        g = f[GROUP]
        assert int(g.attrs["last_session_world_size"]) == 2 and int(g.attrs["cost_n_forward"]) == 35


def test_reachable_as_a_measure_of_flatlens_sharpness(tiny_run, tmp_path):
    from flatlens.cli import COMMANDS

    if "sharpness" not in COMMANDS or importlib.util.find_spec("flatlens.measure.hessian") is None:
        pytest.skip("flatlens sharpness is not wired up in this tree yet")
    out = tmp_path / "s.h5"
    r = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), "--measures", "landscape", "--landscape-range=-1:1:5",
                     "--samples", "64", "--split", "target", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        assert f["landscape/random_1d/loss"].shape == (5,) and f["landscape/random_1d/done"][()].all()
    # a rerun resumes the stored grid (a second session, nothing left to compute); --recompute starts afresh
    for extra, sessions in (([], 2), (["--recompute"], 1)):
        r = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), "--measures", "landscape", "--landscape-range=-1:1:5",
                         "--samples", "64", "--split", "target", *extra, "--out", str(out))
        assert r.returncode == 0, r.stderr
        with h5py.File(out, "r") as f:
            assert int(f["landscape/random_1d"].attrs["sessions"]) == sessions, extra


@pytest.mark.parametrize("extra, message", [
    (["--landscape-range=1:0:5"], "--landscape-range '1:0:5': MAX must be greater than MIN"),
    (["--landscape-dim", "2", "--landscape-y-range=x"],
     "--landscape-y-range 'x' is not MIN:MAX:NUM (e.g. -1:1:51; write --landscape-y-range=-1:1:51"),
    (["--landscape-y-range=-1:1:3"], "--landscape-y-range needs --landscape-dim 2"),
    (["--landscape-range=auto"], "--landscape-range auto is for --landscape-pca surfaces"),
    (["--landscape-pca", "RUN", "--landscape-range=auto:0"], "write auto or auto:NUM with NUM >= 1"),
    (["--landscape-repeat", "-1"], "--landscape-repeat must be an int >= 0, got -1"),
    (["--landscape-block", "-2"], "--landscape-block must be an int >= 0, got -2"),
    (["--landscape-to", "a.pt", "--landscape-pca", "RUN"], "give at most one of --landscape-to, --landscape-plane"),
    (["--landscape-orthogonalize"], "--landscape-orthogonalize needs two directions (--landscape-dim 2 or"),
])
def test_sharpness_landscape_options_fail_early_in_their_own_names(tmp_path, capsys, extra, message):
    """Under `flatlens sharpness` the landscape's options are --landscape-*: bad values are refused before
    the checkpoint is read (this one does not exist) and named as the user wrote them (they said --range,
    --y-range, ... and came after loading the model; a negative block size was taken as 'automatic')."""
    from flatlens.cli import main

    extra = [str(tmp_path) if e == "RUN" else e for e in extra]
    rc = main(["sharpness", str(tmp_path / "missing.pt"), "--measures", "landscape", *extra,
               "--out", str(tmp_path / "a.h5")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "a.h5").exists()


def test_landscape_block_and_repeat_must_be_counts(tiny_run, tmp_path):
    res = flatlens_cmd("landscape", str(tiny_run / "model.pt"), "--block", "-1", "--out", str(tmp_path / "a.h5"))
    assert res.returncode == 2 and "--block must be an int >= 0, got -1" in res.stderr, res.stderr


def test_a_landscape_in_float64_evaluates_a_float64_copy(tiny_run, tmp_path):
    """--dtype float64 (as flatlens sharpness): the surface of the same weights in float64, whose origin is the
    float64 Objective's loss on the same samples; the float32 surface agrees to float32 rounding."""
    import flatlens as fl

    base = ["landscape", str(tiny_run / "model.pt"), "--dim", "1", "--range", "-1:1:3", "--samples", "32"]
    r = flatlens_cmd(*base, "--dtype", "float64", "--out", str(tmp_path / "d.h5"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].endswith(", in float64")
    f32 = flatlens_cmd(*base, "--out", str(tmp_path / "s.h5"))
    assert f32.returncode == 0, f32.stderr
    with h5py.File(tmp_path / "d.h5", "r") as f, h5py.File(tmp_path / "s.h5", "r") as g:
        d, s = f["landscape/random_1d"], g["landscape/random_1d"]
        assert d.attrs["dtype"] == "float64" and s.attrs["dtype"] == "float32"
        truth = fl.Objective(fl.load_checkpoint(tiny_run / "model.pt"), samples=32, dtype="float64").loss()
        assert d.attrs["origin_loss"] == truth and d["loss"][1] == truth
        assert np.allclose(d["loss"][()], s["loss"][()], rtol=1e-5) and not np.array_equal(d["loss"][()], s["loss"][()])
