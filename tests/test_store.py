"""HDF5 store: schema, atomic group writes, resumable grids, and a file that survives SIGKILL."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import REPO
from flatlens import store
from flatlens.atomic import atomic_write_text
from flatlens.errors import StoreError

PROV = {"checkpoint_sha256": "a" * 64, "checkpoint": "/x/model.pt", "config": {"train": {"steps": 3}}}


def test_schema_roundtrip_and_group_replacement(tmp_path):
    p = tmp_path / "analysis.h5"
    store.ensure_file(p, PROV)
    store.write_group(p, "hessian", {"eigenvalues": np.array([3.0, 2.0]), "density": {"grid": np.arange(4.0),
                                     "attrs": {"sigma": 0.5}}}, {"measure": "hessian", "param_names": ["a.weight"]})
    store.write_group(p, "other", {"x": np.ones(2)}, {"measure": "other"})
    store.write_group(p, "hessian", {"eigenvalues": np.array([5.0])}, {"measure": "hessian", "n_hvp": 7})
    r = store.read(p)
    assert r["attrs"]["format"] == "flatlens-analysis" and r["attrs"]["schema_version"] == 1
    assert r["attrs"]["checkpoint_sha256"] == "a" * 64 and '"steps": 3' in r["attrs"]["config"]
    assert r["hessian"]["eigenvalues"].tolist() == [5.0] and "density" not in r["hessian"]
    assert r["hessian"]["attrs"]["n_hvp"] == 7 and r["other"]["x"].tolist() == [1.0, 1.0]
    assert store.read(p, "other")["attrs"]["measure"] == "other"
    assert sorted(store.groups(p)) == ["hessian", "other"]
    with pytest.raises(StoreError, match="has no /missing"):
        store.read(p, "missing")
    with pytest.raises(StoreError, match="already holds /other"):
        store.write_group(p, "other", {}, replace=False)
    assert not list(tmp_path.glob(".*.tmp"))


def test_refuses_foreign_files_and_other_checkpoints(tmp_path):
    p = tmp_path / "a.h5"
    store.ensure_file(p, PROV)
    with pytest.raises(StoreError, match="holds results of another checkpoint"):
        store.ensure_file(p, {**PROV, "checkpoint_sha256": "b" * 64})
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a flatlens analysis file; choose another --out"):
        store.ensure_file(tmp_path / "foreign.h5", PROV)
    # a reader is told to give an analysis file, not to choose an --out it never passed
    with pytest.raises(StoreError, match="not a flatlens analysis file; give an analysis .h5 file written by"):
        store.read(tmp_path / "foreign.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(StoreError, match=r"not a readable HDF5 file \(.*\); give an analysis .h5 file written by"):
        store.read(tmp_path / "text.h5")


def test_unwritable_out_paths_give_one_line_errors(tmp_path):
    """--out naming a directory, or a path under a regular file, fails at once with one line, no traceback."""
    (tmp_path / "runs").mkdir()
    with pytest.raises(StoreError, match="is a directory; give --out a file path such as") as ei:
        store.ensure_file(tmp_path / "runs", PROV)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(StoreError, match="cannot write .*; choose another --out") as ej:
        store.ensure_file(tmp_path / "plain" / "a.h5", PROV)
    with pytest.raises(StoreError, match="not a readable HDF5 file") as ek:  # h5py's message spans lines
        store.check_file(tmp_path / "runs")
    for e in (ei, ej, ek):
        assert "\n" not in str(e.value)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plain", "runs"]  # nothing half-written



def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    """An analysis file (and any atomically written file) is created with 0666 less the umask (like any file the user writes), and a
    rewrite keeps the mode the user gave it; mkstemp's private 0600 used to survive the rename."""
    old = os.umask(0o022)
    try:
        p = tmp_path / "analysis.h5"
        store.ensure_file(p, PROV)
        assert p.stat().st_mode & 0o777 == 0o644
        os.chmod(p, 0o640)
        store.write_group(p, "hessian", {"eigenvalues": np.array([1.0])}, {"measure": "hessian"})
        assert p.stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        q = tmp_path / "sub" / "b.h5"  # a new directory too
        store.ensure_file(q, PROV)
        assert q.stat().st_mode & 0o777 == 0o664
        t = tmp_path / "done"  # run-directory files and checkpoints take the same path
        atomic_write_text(t, "x")
        assert t.stat().st_mode & 0o777 == 0o664
        os.chmod(t, 0o600)
        atomic_write_text(t, "y")
        assert t.stat().st_mode & 0o777 == 0o600 and t.read_text() == "y"
    finally:
        os.umask(old)

def test_grid_datasets_resume(tmp_path):
    p = tmp_path / "a.h5"
    store.ensure_file(p, PROV)
    grid = store.GridDatasets(p, "landscape/random")
    grid.create((3, 5), ["loss", "accuracy"], {"xcoordinates": np.linspace(-1, 1, 3)}, {"measure": "landscape"})
    assert grid.exists() and not grid.done().any()
    grid.write_block((1, slice(0, 5)), {"loss": np.arange(5.0), "accuracy": np.ones(5)})
    done = grid.done()
    assert done[1].all() and not done[0].any() and not done[2].any()
    r = store.read(p, "landscape/random")
    assert np.isnan(r["loss"][0]).all() and r["loss"][1].tolist() == [0, 1, 2, 3, 4]
    grid.set_attrs({"cost_seconds": 1.5})
    assert grid.attrs()["cost_seconds"] == 1.5


WRITER = r"""
import sys, numpy as np
from flatlens import store
from flatlens.atomic import atomic_write_text
p = sys.argv[1]
store.ensure_file(p, {"checkpoint_sha256": "a" * 64})
grid = store.GridDatasets(p, "grid")
if not grid.exists():
    grid.create((200, 64), ["loss"], {}, {"measure": "grid"})
i = 0
while True:
    big = np.full((200_000,), float(i))
    store.write_group(p, f"g{i % 3}", {"data": big, "tail": np.array([float(i)])}, {"measure": "g", "i": i})
    row = i % 200
    grid.write_block((row, slice(None)), {"loss": np.full(64, float(row))})
    i += 1
"""


def test_file_stays_valid_when_the_writer_is_killed(tmp_path):
    p = tmp_path / "a.h5"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(p)], env=env)
        time.sleep(rng.uniform(1.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = store.read(p)  # must open and read completely
        for name in ("g0", "g1", "g2"):
            if name in r:  # every group present is complete and self-consistent
                assert r[name]["data"].shape == (200_000,)
                assert (r[name]["data"] == r[name]["tail"][0]).all() and r[name]["attrs"]["i"] == r[name]["tail"][0]
        done = r["grid"]["done"]
        loss = r["grid"]["loss"]
        for row in np.flatnonzero(done.all(axis=1)):
            assert (loss[row] == row).all()  # rows marked done hold their values
    store.ensure_file(p, {"checkpoint_sha256": "a" * 64})  # the next run cleans temp copies a kill left
    assert not list(tmp_path.glob(".*.tmp"))


CONCURRENT_WRITER = r"""
import sys
import numpy as np
from flatlens import store
path, tag = sys.argv[1], sys.argv[2]
store.ensure_file(path, {"checkpoint_sha256": "a" * 64, "config": {}})
if tag == "grid":  # a landscape job: pre-allocated grid, blocks written in place
    g = store.GridDatasets(path, "landscape/x")
    if not g.exists():
        g.create((20, 4), ["loss"], {}, {"measure": "landscape"})
    for row in range(20):
        g.write_block((row, slice(None)), {"loss": np.full(4, float(row))})
else:  # a sharpness job: whole groups, copy-on-write
    for i in range(15):
        store.write_group(path, f"{tag}{i}", {"x": np.arange(2000.0) + i}, {"measure": tag, "i": i})
"""


def test_concurrent_writers_of_one_file_lose_nothing(tmp_path):
    """A sharpness job and a landscape job on one checkpoint both write analysis.h5 beside it. Without a
    lock, one writer's rename dropped the other's group (40 of 80 groups survived two such loops) and
    ensure_file's clean-up of 'stale' temporary copies deleted the other's copy in flight
    (FileNotFoundError / 'can't retrieve stat info' from h5py). Every write transaction now holds a
    per-file lock."""
    p = tmp_path / "analysis.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(p), tag], env=env,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b", "grid")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    r = store.read(p)
    for tag in ("a", "b"):
        for i in range(15):
            assert r[f"{tag}{i}"]["x"][0] == i and r[f"{tag}{i}"]["attrs"]["i"] == i
    grid = r["landscape"]["x"]
    assert grid["done"].all() and (grid["loss"] == np.arange(20.0)[:, None]).all()
    assert not list(tmp_path.glob(".*.tmp"))


GRID_WRITER = r"""
import sys, time
import numpy as np
from flatlens import store
store.HDF5_LOCK_WAIT = float(sys.argv[3])
g = store.GridDatasets(sys.argv[1], "landscape/x")
for round_ in range(int(sys.argv[2])):
    for row in range(20):
        g.write_points((np.full(20, row), np.arange(20)), {"loss": np.full(20, float(row))}, {"n_done": row})
print("written")
"""


def test_readers_and_in_place_writers_do_not_collide(tmp_path):
    """HDF5 locks an open file: a read while a landscape block was written in place failed ('unable to
    lock file', reported as 'not a readable HDF5 file'), and a reader holding the file made the writer
    fail with a BlockingIOError traceback. flatlens' readers take the lock shared; a file held open by
    another program (a notebook's h5py.File) is waited for, then a one-line error says what holds it."""
    p = tmp_path / "a.h5"
    store.ensure_file(p, {"checkpoint_sha256": "a" * 64, "config": {}})
    store.GridDatasets(p, "landscape/x").create((20, 20), ["loss"], {}, {"measure": "landscape"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, "-c", GRID_WRITER, str(p), "40", "60"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads = 0
    while writer.poll() is None:
        r = store.read(p, "landscape/x")  # must never fail mid-write
        assert r["done"].shape == (20, 20)
        reads += 1
    out, err = writer.communicate()
    assert writer.returncode == 0 and "written" in out, err
    assert reads > 0
    held = h5py.File(p, "r")  # a notebook keeps the file open
    try:
        blocked = subprocess.run([sys.executable, "-c", GRID_WRITER, str(p), "1", "1"], env=env, capture_output=True,
                                 text=True, timeout=120)
    finally:
        held.close()
    assert blocked.returncode != 0
    assert "is held open by another program (HDF5 file lock), e.g. a notebook's h5py.File(...); close it, then " \
           "rerun (the run resumes)" in blocked.stderr
    again = subprocess.run([sys.executable, "-c", GRID_WRITER, str(p), "1", "1"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr


def _no_locks_here(monkeypatch):
    """Make this process see a file system without locks (an NFS mount without lockd): ``flock`` and HDF5's own
    lock fail with ENOLCK, as h5py reports it there (h5py issues #1082, #1101)."""
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    real = h5py.File

    def File(name, mode="r", *args, locking=None, **kwargs):
        if locking is not False:
            raise OSError(errno.ENOLCK, "Unable to synchronously open file (unable to lock file, errno = 37, "
                                        "error message = 'No locks available')")
        return real(name, mode, *args, locking=locking, **kwargs)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(h5py, "File", File)
    monkeypatch.setattr(store, "_WARNED_NO_LOCKS", set(), raising=False)
    monkeypatch.setattr(store, "HDF5_LOCK_WAIT", 0.2)


def test_a_file_system_without_locks_is_written_and_read_with_one_warning(tmp_path, monkeypatch):
    """On NFS without lockd every flock and every HDF5 open failed: flatlens' own lock raised an OSError
    traceback, and HDF5's 'unable to lock file, errno = 37' was taken for a file held by another program
    (a minute's wait, then a wrong message). Both locks are now skipped there, with one warning per folder."""
    _no_locks_here(monkeypatch)
    p = tmp_path / "a.h5"
    with pytest.warns(UserWarning, match="has no file locks") as caught:
        store.ensure_file(p, PROV)
        store.write_group(p, "hessian", {"eigenvalues": np.array([3.0, 2.0])}, {"measure": "hessian"})
        store.write_group(p, "other", {"x": np.arange(3.0)}, {"measure": "other"})
        grid = store.GridDatasets(p, "landscape/x")
        grid.create((2, 4), ["loss"], {}, {"measure": "landscape"})
        grid.write_block((0, slice(None)), {"loss": np.arange(4.0)})
        got = store.read(p)
        with store.new_h5(tmp_path / "export.h5") as f:
            f["x"] = np.arange(2.0)
    assert [str(w.message).count("has no file locks") for w in caught] == [1]
    assert "run one writer per file at a time" in str(caught[0].message)
    np.testing.assert_array_equal(got["hessian"]["eigenvalues"], [3.0, 2.0])
    np.testing.assert_array_equal(got["other"]["x"], np.arange(3.0))
    np.testing.assert_array_equal(got["landscape"]["x"]["loss"][0], np.arange(4.0))
    monkeypatch.undo()
    assert store.read(p)["hessian"]["attrs"]["measure"] == "hessian"  # a valid file for any reader
    with h5py.File(tmp_path / "export.h5", "r") as f:
        assert f["x"][()].tolist() == [0.0, 1.0]


def test_an_old_hdf5_without_per_file_locking_says_what_to_set(tmp_path, monkeypatch):
    """h5py refuses ``locking=False`` when its HDF5 is older than 1.10.7 / 1.12.1: a one-line error names the
    environment variable that works there."""
    _no_locks_here(monkeypatch)
    fake = h5py.File

    def File(name, mode="r", *args, locking=None, **kwargs):
        if locking is False:
            raise ValueError("HDF5 version >= 1.12.1 or 1.10.x >= 1.10.7 required for file locking options.")
        return fake(name, mode, *args, locking=locking, **kwargs)

    monkeypatch.setattr(h5py, "File", File)
    with pytest.warns(UserWarning, match="has no file locks"), pytest.raises(StoreError) as err:
        store.ensure_file(tmp_path / "a.h5", PROV)
    assert "set HDF5_USE_FILE_LOCKING=FALSE in the environment and rerun" in str(err.value)
    assert "\n" not in str(err.value)


def test_other_lock_errors_still_raise(tmp_path, monkeypatch):
    """Only a file system that has no locks is let through: a lock another process holds is waited for and
    named (``test_readers_and_in_place_writers_do_not_collide``), and any other error is not hidden."""
    import fcntl

    def flock(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError, match="Input/output error"):
        store.ensure_file(tmp_path / "a.h5", PROV)


def test_an_export_killed_part_way_leaves_no_file(tmp_path):
    """``new_h5`` (the loss-landscape exports) writes a whole file or none: an error inside leaves nothing."""
    p = tmp_path / "export.h5"
    with pytest.raises(RuntimeError):
        with store.new_h5(p) as f:
            f["x"] = np.arange(3.0)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
