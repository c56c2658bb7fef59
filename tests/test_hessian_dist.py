"""2 gloo processes (each holding half the samples, HVPs all-reduced) give the 1-process eigenvalues
(random and gradient start), traces (Hutch++ and the exact Gauss-Newton one), density and spectrum() within 1e-5; the CLI under torchrun writes the same /hessian group (slow test)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import flatlens as fl
from conftest import REPO, flatlens_cmd
from flatlens.measure.objective import Objective
from test_hessian import _bn_cnn, _data


def _measure(obj):
    eig = fl.hessian.eigenvalues(obj, k=3, k_bottom=1, tol=1e-8, max_iter=120)
    tr = fl.hessian.trace(obj, rtol=None, max_hvp=45, seed=1)
    dens = fl.hessian.density(obj, n_probes=2, n_steps=6, seed=1)
    top1 = fl.hessian.eigenvalues(obj, k=1, tol=1e-8, max_iter=60)  # gradient start: an all-reduced gradient
    sp = fl.hessian.spectrum(obj, 2, 6, k=1, rtol=None, max_hvp=20, layers="none", seed=1)
    gn = fl.hessian.trace(obj, "gauss-newton", seed=1)  # per-rank samples, all-reduced diagonal and check
    return {"gn": gn.estimate, "gn_layers": gn.layers.estimates, "gn_backward": gn.details["n_backward"],
            "gn_check_samples": gn.details["check_samples"],"top": eig.values, "bottom": eig.bottom, "eig_hvp": eig.n_hvp, "trace": tr.estimate,
            "stderr": tr.stderr, "layers": tr.layers.estimates, "nodes": dens.nodes,
            "top1": top1.values, "top1_start": top1.start, "top1_hvp": top1.n_hvp,
            "sp_top": sp.eigen.values, "sp_trace": sp.trace.estimate, "sp_nodes": sp.density.nodes,
            "world": eig.provenance["world_size"], "n": obj.n_samples}


def _worker(rank: int, world: int, init: str, model, batches, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        obj = Objective(model, batches=batches[rank::world], kernel="graph_reuse")
        res = _measure(obj)
        if rank == 0:
            torch.save(res, out)
        dist.barrier()  # both ranks done before either tears down its gloo connections
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    model = _bn_cnn().float()
    batches = [(x.float(), y) for x, y in _data(n=64, bs=16)]
    one = _measure(Objective(model, batches=batches, kernel="graph_reuse"))
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", model, batches, out), nprocs=2, join=True)
    two = torch.load(out)
    assert two["world"] == 2 and one["world"] == 1 and two["n"] == one["n"] == 64
    assert one["top1_start"] == two["top1_start"] == "gradient" and one["top1_hvp"] == two["top1_hvp"]
    assert two["gn_backward"] == one["gn_backward"] and two["gn_check_samples"] == 2 * one["gn_check_samples"]
    assert two["gn"] == pytest.approx(one["gn"], rel=1e-5)
    for key in ("top", "bottom", "layers", "top1", "sp_top", "gn_layers"):
        assert torch.allclose(two[key], one[key], rtol=1e-5, atol=1e-5 * float(one["top"][0])), key
    assert two["trace"] == pytest.approx(one["trace"], rel=1e-5)
    assert two["sp_trace"] == pytest.approx(one["sp_trace"], rel=1e-5)
    assert torch.allclose(two["sp_nodes"], one["sp_nodes"], rtol=1e-4, atol=1e-5 * float(one["top"][0]))
    assert two["stderr"] == pytest.approx(one["stderr"], rel=1e-4)
    assert torch.allclose(two["nodes"], one["nodes"], rtol=1e-4, atol=1e-5 * float(one["top"][0]))


@pytest.mark.slow
def test_sharpness_cli_under_torchrun_matches_one_process(tmp_path, tiny_run):
    args = ["sharpness", str(tiny_run / "model.pt"), "--measures", "hessian,trace", "--k", "2", "--tol", "1e-6",
            "--trace-rtol", "0", "--max-hvp", "30", "--samples", "120", "--kernel", "graph_reuse"]
    one = flatlens_cmd(*args, "--out", str(tmp_path / "one.h5"))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "flatlens", *args, "--out", str(tmp_path / "two.h5")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = fl.hessian.read(tmp_path / "one.h5"), fl.hessian.read(tmp_path / "two.h5")
    assert r2["attrs"]["trace_world_size"] == 2 and r1["attrs"]["trace_world_size"] == 1
    assert r1["attrs"]["subset_sha256"] == r2["attrs"]["subset_sha256"]
    assert torch.allclose(torch.as_tensor(r2["eigenvalues"]), torch.as_tensor(r1["eigenvalues"]), rtol=1e-5)
    assert r2["trace"] == pytest.approx(r1["trace"], rel=1e-5)
    assert two.stdout.count("summary") == 1  # rank 0 alone prints and writes
    # a rerun skips what is stored: rank 0 reads the file and every rank follows its decision
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "flatlens", *args, "--out", str(tmp_path / "two.h5")],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (--recompute") == 2 and "predicted cost" not in again.stdout
    # the number of processes changes rounding, not what is measured: one process skips it too
    alone = flatlens_cmd(*args, "--out", str(tmp_path / "two.h5"))
    assert alone.returncode == 0 and alone.stdout.count("skipped (--recompute") == 2, alone.stderr
