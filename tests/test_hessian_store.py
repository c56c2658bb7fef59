"""The /hessian group: the issue's schema, merge semantics between measures, atomic writes, kill safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import flatlens as fl
from conftest import REPO
from flatlens import store
from flatlens.errors import FlatlensError
from test_hessian import CASES, _bn_cnn, _data

from flatlens.measure.objective import Objective

ISSUE_DATASETS = {"eigenvalues", "eigenvalue_residuals", "trace", "trace_samples", "trace_stderr", "layer_traces",
                  "layer_names"}
ISSUE_ATTRS = {"split", "n_samples", "space", "seed", "eigenvalue_tol", "trace_rtol", "n_hvp", "seconds"}
ALL_DATASETS = {
    "eigenvalues", "eigenvalue_residuals", "eigenvalue_rel_error_bound", "eigenvalue_converged", "ritz_values",
    "eigenvalue_gap_rel_error_estimate", "bottom_eigenvalues", "bottom_eigenvalue_residuals",
    "bottom_eigenvalue_converged", "bottom_eigenvalue_gap_error_estimate",
    "trace", "trace_samples", "trace_stderr", "trace_ci", "layer_names", "layer_traces", "layer_trace_stderr",
    "layer_trace_ci", "layer_trace_exact", "layer_trace_samples", "layer_trace_converged", "layer_numel", "density",
}


@pytest.fixture(scope="module")
def results(one_thread):
    obj = CASES["bn_cnn"]()
    eig = fl.hessian.eigenvalues(obj, k=3, k_bottom=1, seed=2)
    eig0 = fl.hessian.eigenvalues(obj, k=2, seed=2)
    tr = fl.hessian.trace(obj, rtol=0.05, seed=2)
    dens = fl.hessian.density(obj, n_probes=2, n_steps=8, seed=2)
    return obj, eig, eig0, tr, dens


def test_schema_keys_and_read_back(tmp_path, results):
    obj, eig, _, tr, dens = results
    p = fl.hessian.write(tmp_path / "a.h5", eig, tr, dens)
    with h5py.File(p, "r") as f:
        assert f.attrs["format"] == "flatlens-analysis" and f.attrs["schema_version"] == store.SCHEMA_VERSION
        assert "flatlens_version" in f.attrs and "checkpoint_sha256" in f.attrs and "config" in f.attrs
        g = f["hessian"]
        assert set(g.keys()) == ALL_DATASETS
        assert set(g["density"].keys()) == {"grid", "values", "nodes", "weights", "trace_samples"}
        assert g["eigenvalues"].shape == (3,) and g["eigenvalue_residuals"].shape == (3,) and g["trace"].shape == ()
        assert g["trace_samples"].shape == (tr.samples.numel(),) and g["trace_stderr"].shape == ()
        assert g["layer_traces"].shape == (2,) and g["density/grid"].shape == g["density/values"].shape
        assert ISSUE_ATTRS <= set(g.attrs) and g.attrs["measure"] == "hessian"
        assert g.attrs["n_hvp"] == eig.n_hvp + tr.n_hvp + dens.n_hvp
        assert g.attrs["seconds"] == pytest.approx(eig.seconds + tr.seconds + dens.seconds)
    r = fl.hessian.read(p)
    assert ISSUE_DATASETS <= set(r) and np.array_equal(r["eigenvalues"], eig.values.numpy())
    assert r["trace"] == tr.estimate and r["layer_names"] == tr.layers.names
    assert np.array_equal(r["density"]["values"], dens.values.numpy()) and r["density"]["attrs"]["n_probes"] == 2
    a = r["attrs"]
    assert a["measures"] == ["hessian", "trace", "density"] and a["seed"] == 2 and a["space"] == "latent"
    assert a["split"] == "custom" and a["n_samples"] == 50 and a["eigenvalue_tol"] == 1e-3 and a["trace_rtol"] == 0.05
    assert a["differentiated"] == "float model" and a["bn_mode"] == "eval" and a["param_names"] == obj.space.names
    assert a["trace_method"] == "krylov" and a["eigenvalue_hvp_kernel"] == "double_backward"
    assert a["eigenvalue_torch_threads"] == a["density_torch_threads"] == torch.get_num_threads() >= 1
    assert "torch_threads" not in a  # per measure: the measures of one group may run on other thread counts
    assert store.groups(p) == ["hessian"]


def test_second_write_merges_or_replaces(tmp_path, results):
    obj, eig, eig0, tr, dens = results
    p = tmp_path / "a.h5"
    fl.hessian.write(p, eig, tr)
    store.write_group(p, "landscape/x", {"loss": np.ones(3)}, {"measure": "landscape"})
    before = fl.hessian.read(p)
    fl.hessian.write(p, dens)  # adds the density, keeps the rest
    fl.hessian.write(p, eig0)  # replaces eigenvalues: bottom ones gone, trace untouched
    r = fl.hessian.read(p)
    assert r["eigenvalues"].shape == (2,) and "bottom_eigenvalues" not in r and "density" in r
    assert r["attrs"]["eigenvalue_k_bottom"] == 0 and r["attrs"]["eigenvalue_bottom_norm_tol"] == "null"
    for key in ("trace", "trace_samples", "layer_traces", "layer_trace_samples"):
        assert np.array_equal(r[key], before[key]), key
    assert r["attrs"]["trace_seconds"] == before["attrs"]["trace_seconds"]
    assert r["attrs"]["n_hvp"] == eig0.n_hvp + tr.n_hvp + dens.n_hvp
    assert store.read(p, "landscape/x")["loss"].tolist() == [1, 1, 1]
    # other data (shared provenance differs): the whole group is replaced, which would drop the
    # eigenvalues and the density of the first data; refused (file untouched) unless replace=True
    other = Objective(_bn_cnn(), batches=_data(seed=9), kernel="double_backward")
    t2 = fl.hessian.trace(other, rtol=0.1, seed=2)
    held = p.read_bytes()
    with pytest.raises(FlatlensError, match=r"a.h5:/hessian holds hessian, density measured on another setup "
                                            r"\(subset_sha256: .*; one group holds one setup, so this write would "
                                            r"drop them: pass replace=True to replace the group, or write to another file$"):
        fl.hessian.write(p, t2)
    assert p.read_bytes() == held
    fl.hessian.write(p, t2, replace=True)
    r = fl.hessian.read(p)
    assert "eigenvalues" not in r and "density" not in r and r["trace"] == t2.estimate
    assert r["attrs"]["measures"] == ["trace"] and r["attrs"]["n_hvp"] == t2.n_hvp
    assert "landscape" in h5py.File(p, "r")
    # another seed is other provenance too
    t3 = fl.hessian.trace(other, rtol=0.1, seed=3)
    fl.hessian.write(p, fl.hessian.eigenvalues(other, seed=2))
    with pytest.raises(FlatlensError, match=r"holds hessian measured on another setup \(seed: 2 vs 3\)"):
        fl.hessian.write(p, t3)
    fl.hessian.write(p, t3, replace=True)
    assert "eigenvalues" not in fl.hessian.read(p)
    fl.hessian.write(p, fl.hessian.eigenvalues(other, seed=2), t2)  # every measure it holds, again: no loss
    assert fl.hessian.read(p)["attrs"]["seed"] == 2
    with pytest.raises(FlatlensError, match="got no results"):
        fl.hessian.write(p)
    with pytest.raises(FlatlensError, match="cannot store a PowerResult"):
        fl.hessian.write(p, fl.hessian.power_iteration(other))
    # within ONE write, results of two setups (or two of a kind) used to replace each other silently:
    # write(p, eig_on_A, trace_on_B) left only B's trace
    before = fl.hessian.read(p)
    with pytest.raises(FlatlensError, match=r"the EigenResult and the TraceEstimate were measured on different "
                                            r"setups \(subset_sha256: .*write them to different files"):
        fl.hessian.write(p, eig, t2)
    with pytest.raises(FlatlensError, match="seed: 2 vs 3"):
        fl.hessian.write(p, fl.hessian.eigenvalues(other, seed=2), t3)
    with pytest.raises(FlatlensError, match="got EigenResult more than once"):
        fl.hessian.write(tmp_path / "new.h5", eig, eig0)
    assert not (tmp_path / "new.h5").exists()
    after = fl.hessian.read(p)
    assert after["trace"] == before["trace"] and after["attrs"]["seed"] == before["attrs"]["seed"]


def test_failed_merge_leaves_the_file_untouched(tmp_path, results):
    _, eig, _, tr, _ = results
    p = fl.hessian.write(tmp_path / "a.h5", eig, tr)
    raw = p.read_bytes()

    def boom(group):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.merge_group(p, "hessian", {"eigenvalues": np.zeros(1)}, {"split": "custom"}, match=("split",),
                          drop=("trace",), finalize=boom)
    assert p.read_bytes() == raw and not list(tmp_path.glob(".*.tmp"))


WRITER = """
import sys, numpy as np
from flatlens import store
p = sys.argv[1]
for i in range(100000):
    store.merge_group(p, "hessian", {"eigenvalues": np.full(50000, float(i)), "eigenvalue_residuals": np.full(3, float(i))},
                      {"split": "custom", "eigenvalue_i": i}, match=("split",), drop=("eigenvalues",),
                      drop_attr_prefixes=("eigenvalue_",))
    print(i, flush=True)
"""


def test_writes_survive_sigkill(tmp_path, results):
    _, _, _, tr, _ = results
    p = tmp_path / "a.h5"
    fl.hessian.write(p, tr)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(p)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    for _ in range(5):  # let a few writes complete, then kill in the middle of one
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = fl.hessian.read(p)  # still a valid file: the old or the new group, never a half-written one
    i = r["attrs"]["eigenvalue_i"]
    assert np.all(r["eigenvalues"] == i) and np.all(r["eigenvalue_residuals"] == i) and i >= 4
    assert r["trace"] == tr.estimate  # the merge kept the other measure
    store.ensure_file(p, {})  # removes the temporary copy a killed writer may leave
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_write_of_several_results_is_one_transaction(tmp_path, results, monkeypatch):
    """write(path, eig, tr, dens) merged each result in its own atomic write: a kill between them (the shared
    run writes its eigenvalues and density together, before the trace probes) kept the eigenvalues without
    the density. One transaction now, holding what the writes one by one held."""
    obj, eig, eig0, tr, dens = results
    apart = tmp_path / "apart.h5"
    for r in (eig, tr, dens):
        fl.hessian.write(apart, r)
    calls = []
    real = store.merge_group
    monkeypatch.setattr(store, "merge_group", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    together = tmp_path / "together.h5"
    fl.hessian.write(together, eig, tr, dens)
    assert calls == ["hessian"]

    def flat(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}/")
            elif not k.endswith("written"):  # timestamps
                yield f"{prefix}{k}", v

    a, b = dict(flat(fl.hessian.read(apart))), dict(flat(fl.hessian.read(together)))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
