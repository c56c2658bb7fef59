"""A measure killed part-way resumes from its HVP journal and returns what the uninterrupted run returns.

Before the journal, a kill during a measure lost every HVP it had spent (only finished measures were kept):
on ResNet-18 at 512 samples a trace is an hour of CPU time.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import flatlens as fl
from flatlens.measure.journal import HvpJournal, input_sha256


class _Killed(Exception):
    pass


class _KillAfter:
    """A progress callback that stops the measure after ``n`` operator applications (as a kill would)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def __call__(self, k: int) -> None:
        self.seen += k
        if self.seen >= self.n:
            raise _Killed


def _objective(run, samples: int = 48, **kw):
    return fl.Objective(fl.load_checkpoint(run / "model.pt"), samples=samples, kernel="double_backward", **kw)


MEASURES = {
    "eigenvalues": (lambda obj, **kw: fl.hessian.eigenvalues(obj, k=3, tol=1e-6, max_iter=30, **kw), 9),
    "trace": (lambda obj, **kw: fl.hessian.trace(obj, rtol=None, max_hvp=24, **kw), 13),
    "density": (lambda obj, **kw: fl.hessian.density(obj, n_probes=2, n_steps=8, **kw), 5),  # blocks of 2 columns
    "hutchpp": (lambda obj, **kw: fl.hessian.trace(obj, "hutchpp", rtol=None, max_hvp=24, **kw), 13),
    "xtrace": (lambda obj, **kw: fl.hessian.trace(obj, "xtrace", rtol=None, max_hvp=24, **kw), 13),
    "spectrum": (lambda obj, **kw: fl.hessian.spectrum(obj, 2, 8, k=2, rtol=None, max_hvp=20, **kw), 13),
}


def _values(res) -> list[np.ndarray]:
    if hasattr(res, "results"):  # spectrum(): its three results
        return [v for r in res.results for v in _values(r)]
    keys = ("eigenvalues", "eigenvalue_residuals", "trace", "trace_samples", "trace_stderr", "layer_traces",
            "density/values")
    datasets, attrs = res.to_store()
    return [np.asarray(datasets[k]) for k in keys if k in datasets] + [np.asarray(res.n_hvp)]


@pytest.mark.parametrize("name", list(MEASURES))
def test_a_killed_measure_resumes_from_its_journal_with_the_uninterrupted_result(tiny_run, tmp_path, name):
    measure, kill_at = MEASURES[name]
    whole = _objective(tiny_run)
    reference = measure(whole)
    spent = whole.n_hvp
    assert spent > kill_at

    obj = _objective(tiny_run)
    jdir = tmp_path / "j"
    with pytest.raises(_Killed):
        with obj.journal(jdir):
            measure(obj, progress=_KillAfter(kill_at))
    assert jdir.is_dir() and 0 < len(list(jdir.glob("hvp_*.pt"))) <= kill_at
    if name in ("eigenvalues", "trace"):  # one column per call
        assert len(list(jdir.glob("hvp_*.pt"))) == kill_at
    assert obj.n_hvp_replayed == 0

    again = _objective(tiny_run)  # a new process would build a new Objective
    with again.journal(jdir) as jr:
        resumed = measure(again)
    assert jr.replayed == jr.found > 0
    # bitwise the uninterrupted result, including its HVP count; only the missing products were computed
    for a, b in zip(_values(reference), _values(resumed)):
        assert np.array_equal(a, b), name
    assert again.n_hvp_replayed >= kill_at and again.n_hvp + again.n_hvp_replayed == spent
    for res, ref in zip(getattr(resumed, "results", [resumed]), getattr(reference, "results", [reference])):
        prefix = {"EigenResult": "eigenvalue_", "TraceEstimate": "trace_", "DensityResult": "density_"}[type(res).__name__]
        assert res.to_store()[1][f"{prefix}replayed_hvp"] == again.n_hvp_replayed
        assert ref.to_store()[1][f"{prefix}replayed_hvp"] == 0 and "replayed" in repr(res)
    assert not jdir.exists()  # finished: removed


def test_a_journal_never_replays_a_product_of_another_input_or_another_hessian(tiny_run, tmp_path):
    jdir = tmp_path / "j"
    obj = _objective(tiny_run)
    with pytest.raises(_Killed):
        with obj.journal(jdir):
            fl.hessian.trace(obj, rtol=None, max_hvp=16, progress=_KillAfter(10))
    # another seed: the first probe differs, nothing is replayed, and the result is that seed's own
    other = _objective(tiny_run)
    with other.journal(jdir) as jr:
        seeded = fl.hessian.trace(other, rtol=None, max_hvp=16, seed=1)
    assert jr.found == 10 and jr.replayed == 0 and other.n_hvp == 16
    plain = fl.hessian.trace(_objective(tiny_run), rtol=None, max_hvp=16, seed=1)
    assert seeded.estimate == plain.estimate

    # another sample subset is another Hessian: the journal is discarded when opened
    obj = _objective(tiny_run)
    with pytest.raises(_Killed):
        with obj.journal(jdir):
            fl.hessian.trace(obj, rtol=None, max_hvp=16, progress=_KillAfter(6))
    subset = _objective(tiny_run, samples=40)
    with subset.journal(jdir) as jr:
        fl.hessian.trace(subset, rtol=None, max_hvp=16)
    assert jr.found == 0 and jr.replayed == 0

    # a model of one's own changed between two runs of a notebook cell (same data, names and seeded first probe)
    from test_hessian import _bn_cnn, _data

    model = _bn_cnn().float()
    batches = [(x.float(), y) for x, y in _data(n=32, bs=16)]
    own = fl.Objective(model, batches=batches, kernel="double_backward")
    with pytest.raises(_Killed):
        with own.journal(jdir):
            fl.hessian.eigenvalues(own, k=1, max_iter=10, progress=_KillAfter(3))
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # trained further
    changed = fl.Objective(model, batches=batches, kernel="double_backward")
    with changed.journal(jdir) as jr:
        res = fl.hessian.eigenvalues(changed, k=1, max_iter=10)
    assert jr.found == 0 and jr.replayed == 0
    assert res.values[0] == fl.hessian.eigenvalues(fl.Objective(model, batches=batches, kernel="double_backward"),
                                                   k=1, max_iter=10).values[0]

    # a recorded output is only used for the input it was recorded for
    jr = HvpJournal(tmp_path / "k", {"x": 1})
    v = torch.arange(4.0)
    out, replayed = jr.apply(v, lambda u: 2 * u)
    assert not replayed and torch.equal(out, 2 * v)
    v.add_(1)  # the caller reuses its tensors in place: the entry holds the values of the call
    out.zero_()
    jr.flush()  # entries are written by a thread
    v.sub_(1)
    again = HvpJournal(tmp_path / "k", {"x": 1})
    assert again.found == 1
    out, replayed = again.apply(v + 1e-7, lambda u: 3 * u)
    assert not replayed and torch.equal(out, 3 * (v + 1e-7))
    again.flush()
    out, replayed = HvpJournal(tmp_path / "k", {"x": 1}).apply(v + 1e-7, lambda u: 4 * u)
    assert replayed and torch.equal(out, 3 * (v + 1e-7))  # the rewritten entry, recorded for this input
    assert input_sha256(v) != input_sha256(v.double()) and input_sha256(v) != input_sha256(v.reshape(2, 2))
    assert HvpJournal(tmp_path / "k", {"x": 2}).found == 0  # another identity: discarded


def test_a_resumed_journal_uses_the_killed_runs_kernel_and_stops_recording_on_a_full_disk(tiny_run, tmp_path,
                                                                                         monkeypatch):
    jdir = tmp_path / "j"
    obj = _objective(tiny_run)
    with pytest.raises(_Killed):
        with obj.journal(jdir):
            fl.hessian.eigenvalues(obj, k=2, max_iter=20, progress=_KillAfter(4))
    assert json.loads((jdir / "journal.json").read_text())["kernel"] == "double_backward"
    auto = fl.Objective(fl.load_checkpoint(tiny_run / "model.pt"), samples=48)  # kernel "auto"
    with auto.journal(jdir) as jr:
        assert auto.hvp_engine.kernel == "double_backward" and auto.hvp_engine.selection is None
        fl.hessian.eigenvalues(auto, k=2, max_iter=20)
    assert jr.replayed == 4

    import flatlens.measure.journal as J

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    obj = _objective(tiny_run)
    with obj.journal(jdir) as jr:
        monkeypatch.setattr(J, "atomic_write_bytes", full)
        with pytest.warns(RuntimeWarning, match="stopped recording .No space left on device"):
            res = fl.hessian.eigenvalues(obj, k=2, max_iter=20)
    assert res.all_converged and jr.recorded == 0
    monkeypatch.undo()  # the disk has room again
    # a folder that is not a journal is never cleared (it was rmtree'd: obj.journal("runs/erm") deleted the run)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.pt").write_bytes(b"weights")
    with pytest.raises(fl.FlatlensError, match=r"run exists and is not an HVP journal \(no journal.json\); pass a new"):
        with obj.journal(run_dir):
            pass
    assert (run_dir / "model.pt").read_bytes() == b"weights"
    # and a journal is removed file by file: what else was put in its folder stays
    with obj.journal(tmp_path / "j2") as jr:
        (tmp_path / "j2" / "notes.txt").write_text("mine")
        fl.hessian.eigenvalues(obj, k=1, max_iter=5)
    assert sorted(p.name for p in (tmp_path / "j2").iterdir()) == ["notes.txt"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(fl.FlatlensError, match=r"cannot use .*a-file/j as an HVP journal \(.*\); pass a writable folder"):
        with obj.journal(blocker / "j"):
            pass
    with pytest.raises(fl.FlatlensError, match="already open"):
        with obj.journal(jdir), obj.journal(tmp_path / "other"):
            pass


def test_a_killed_sharpness_command_resumes_its_measure_from_the_journal(tiny_run, tmp_path):
    """``flatlens sharpness`` killed (SIGKILL) during the trace's probes: the rerun of the same command replays the
    recorded HVPs, computes the rest, and stores what an uninterrupted run stores."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import h5py
    from conftest import REPO, flatlens_cmd

    out = tmp_path / "a.h5"
    jroot = tmp_path / "a.h5.journal"
    args = ["sharpness", str(tiny_run / "model.pt"), "--measures", "trace", "--samples", "64", "--kernel",
            "graph_reuse", "--batch-size", "32", "--max-hvp", "300", "--trace-rtol", "0",
            "--progress-every", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "flatlens", *args, "--journal", "on", "--out", str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(list(jroot.glob("trace-*/hvp_*.pt"))) < 20:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()  # still at its probes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    (jdir,) = jroot.glob("trace-*")  # <step>-<setup digest>
    recorded = len(list(jdir.glob("hvp_*.pt")))
    assert 20 <= recorded < 300
    if out.exists():  # created at the start, with no measure in it
        with h5py.File(out, "r") as f:
            assert "hessian" not in f

    # a quick run on another setup into the same file keeps the killed run's journal (its own folder)
    other = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), "--measures", "trace", "--samples", "32",
                         "--max-hvp", "12", "--trace-rtol", "0", "--journal", "on", "--out", str(out))
    assert other.returncode == 0, other.stderr
    assert len(list(jdir.glob("hvp_*.pt"))) == recorded and sorted(jroot.iterdir()) == [jdir]
    with h5py.File(out, "a") as f:  # back to the state the kill left (the quick run stored its trace)
        del f["hessian"]
    info = flatlens_cmd("info", str(out))  # what the killed run left
    assert info.returncode == 0, info.stderr
    assert f"unfinished        trace: {recorded} HVP calls (" in info.stdout and "rerun the same flatlens sharpness" in info.stdout
    assert json.loads(flatlens_cmd("info", str(out), "--json").stdout)["journals"][jdir.name]["hvp_calls"] == recorded
    import shutil

    shutil.copytree(tmp_path / "a.h5.journal", tmp_path / "b.h5.journal")  # for the --journal off run below
    again = flatlens_cmd(*args, "--out", str(out))  # the same command (--journal auto): the journal is resumed
    assert again.returncode == 0, again.stderr
    assert f"resumes the journal of a killed run ({recorded} HVP calls recorded" in again.stdout
    assert "so the time above is what is left)" in again.stdout
    done = [line for line in again.stdout.splitlines() if line.startswith("[trace] done")][0]
    assert "more replayed from the journal)" in done, done
    assert not (tmp_path / "a.h5.journal").exists()

    fresh = flatlens_cmd(*args, "--journal", "off", "--out", str(tmp_path / "b.h5"))  # measured whole
    assert fresh.returncode == 0, fresh.stderr
    assert f"--journal off leaves the journal of a killed run ({recorded} HVP calls) unused" in fresh.stdout
    assert len(list((tmp_path / "b.h5.journal" / jdir.name).glob("hvp_*.pt"))) == recorded  # untouched
    resumed, whole = fl.hessian.read(out), fl.hessian.read(tmp_path / "b.h5")
    for key in ("trace", "trace_samples", "trace_stderr", "layer_traces"):
        assert np.array_equal(resumed[key], whole[key]), key
    assert resumed["attrs"]["trace_n_hvp"] == whole["attrs"]["trace_n_hvp"] == 300
    assert resumed["attrs"]["trace_replayed_hvp"] >= recorded and whole["attrs"]["trace_replayed_hvp"] == 0
    assert "replayed from a journal)" in again.stdout.split("\nsummary", 1)[1]


@contextmanager
def _gloo(rank: int, world: int, init: str):
    """A gloo process group for one spawned test rank (one thread), torn down after a final barrier."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        yield
        dist.barrier()  # every rank done before either tears down its connections
    finally:
        dist.destroy_process_group()


def _run_two(worker, tmp_path, batch_size: int, *args) -> dict:
    """``worker(rank, world, init, model, batches, *args, out)`` on 2 gloo processes; what rank 0 saved to ``out``."""
    import torch.multiprocessing as mp
    from test_hessian import _bn_cnn, _data

    model = _bn_cnn().float()
    batches = [(x.float(), y) for x, y in _data(n=64, bs=batch_size)]
    out = str(tmp_path / "res.pt")
    mp.spawn(worker, args=(2, f"file://{tmp_path / 'pg'}", model, batches, *args, out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def _dist_worker(rank: int, world: int, init: str, model, batches, jdirs, kill_at: int, out: str) -> None:
    from flatlens.measure.objective import Objective

    with _gloo(rank, world, init):
        def obj():
            return Objective(model, batches=batches[rank::world], kernel="graph_reuse")

        def measure(o, **kw):
            return fl.hessian.trace(o, rtol=None, max_hvp=24, seed=3, **kw)

        killed = obj()
        try:
            with killed.journal(jdirs[rank]):  # rank 1's folder is never touched: rank 0 reads and writes
                measure(killed, progress=_KillAfter(kill_at))
        except _Killed:
            pass
        resumed_obj = obj()
        with resumed_obj.journal(jdirs[rank]) as jr:
            resumed = measure(resumed_obj)
        whole = measure(obj())
        if rank == 0:
            torch.save({"resumed": _values(resumed), "whole": _values(whole), "replayed": jr.replayed,
                        "found": jr.found, "n_hvp": resumed_obj.n_hvp, "n_replayed": resumed_obj.n_hvp_replayed}, out)


def test_under_torch_distributed_rank_0_keeps_the_journal_and_broadcasts_the_replay(tmp_path):
    res = _run_two(_dist_worker, tmp_path, 16, [str(tmp_path / "j0"), str(tmp_path / "j1")], 9)
    assert res["found"] == 9 and res["replayed"] == 9 and res["n_replayed"] == 9 and res["n_hvp"] == 24 - 9
    for a, b in zip(res["resumed"], res["whole"]):
        assert np.array_equal(a, b)
    assert not (tmp_path / "j0").exists() and not (tmp_path / "j1").exists()


def test_when_flatlens_sharpness_keeps_a_journal(tmp_path):
    from flatlens.measure.journal import Recorded, decide, write_seconds

    def never() -> float:
        raise AssertionError("timed a write it did not need")

    kw = dict(resumable=None, size=10 * 2**20, free=2**40, hvp_seconds=1.0)
    assert decide("auto", eta_seconds=30, write_time=never, **kw) == (False, "")  # cheaper to run again
    on, why = decide("auto", eta_seconds=600, write_time=lambda: 0.05, **kw)
    assert on and "journal of its HVPs on disk, <= 10.0 MiB" in why
    on, why = decide("auto", eta_seconds=600, write_time=lambda: 0.2, **kw)
    assert not on and "recording a product (0.20 s) would add over 10% to computing it (1.00 s); --journal on" in why
    on, why = decide("auto", eta_seconds=600, write_time=never, **{**kw, "free": 15 * 2**20})
    assert not on and "do not fit in half the free disk (15.0 MiB)" in why
    assert decide("on", eta_seconds=1, write_time=never, **{**kw, "free": 0})[0]
    seven = Recorded(7, "graph_reuse", (), 7)
    on, why = decide("auto", eta_seconds=1, write_time=never, **{**kw, "resumable": seven})  # always resumed
    assert on and "resumes the journal of a killed run (7 HVP calls recorded; replayed where" in why
    assert "(7 HVP calls (21 HVPs) recorded" in decide("auto", eta_seconds=1, write_time=never,
                                                       **{**kw, "resumable": Recorded(7, None, (), 21)})[1]
    on, why = decide("auto", eta_seconds=1, write_time=never,
                     **{**kw, "resumable": Recorded(0, None, ("gauss_newton",), 0, 21)})
    assert on and "(the partial gauss-newton sum (21 samples) recorded; goes on from there)" in why
    assert decide("auto", eta_seconds=600, write_time=never, **{**kw, "hvp_seconds": None})[0]  # no HVPs: a small state
    assert decide("off", eta_seconds=600, write_time=never, **kw) == (False, "")
    assert not decide("off", eta_seconds=600, write_time=never, **{**kw, "resumable": seven})[0]
    assert 0 < write_seconds(tmp_path, 1000, torch.float32) < 60 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("per_sample", ["auto", "loop"])
def test_a_killed_gauss_newton_trace_goes_on_from_its_saved_partial_sum(tiny_run, tmp_path, monkeypatch, per_sample):
    """The exact trace spends no HVPs but C - 1 backward passes per sample (344 on DomainNet): its partial sum is
    saved to the journal, and a rerun goes on from the last saved sample, in the forms the killed run chose."""
    import flatlens.measure.gauss_newton as GN

    monkeypatch.setattr(GN, "SAVE_EVERY", 0.0)  # save after every step (30 s by default)

    def measure(obj, **kw):
        return fl.hessian.trace(obj, "gauss-newton", per_sample=per_sample, **kw)

    def objective():
        return fl.Objective(fl.load_checkpoint(tiny_run / "model.pt"), samples=40, batch_size=16)

    whole = measure(objective())
    obj = objective()
    jdir = tmp_path / "j"
    with pytest.raises(_Killed):
        with obj.journal(jdir):
            measure(obj, progress=_KillAfter(21))
    assert (jdir / "state_gauss_newton.pt").is_file() and not list(jdir.glob("hvp_*.pt"))
    again = objective()
    from flatlens.measure.journal import recorded

    held = recorded(jdir, again.journal_identity())  # what flatlens sharpness reads for its line and time left
    assert held and held.entries == 0 and held.states == ("gauss_newton",) and held.state_done >= 21
    assert f"the partial gauss-newton sum ({held.state_done} samples)" in held.describe()
    seen = []
    with again.journal(jdir):
        resumed = measure(again, progress=seen.append)
    assert again._hvp is None  # no HVP engine (no kernel timing) for a measure without HVPs
    assert seen[0] >= 21 and sum(seen) == 40 and resumed.details["resumed_samples"] == seen[0]
    if per_sample == "loop":  # "auto" chooses vmap or loop by timing, which may differ between the two runs
        assert resumed.estimate == whole.estimate and np.array_equal(resumed.layers.estimates, whole.layers.estimates)
    else:
        assert resumed.estimate == pytest.approx(whole.estimate, rel=1e-6)
    assert resumed.details["n_backward"] == whole.details["n_backward"] and whole.details["resumed_samples"] == 0
    assert resumed.details["per_sample"] in ("vmap", "loop")
    assert f"({seen[0]} samples from a killed run's journal)" in repr(resumed)
    assert resumed.to_store()[1]["trace_resumed_samples"] == seen[0]
    assert not jdir.exists()


def test_the_cli_journals_a_gauss_newton_trace_by_its_partial_sum(tiny_run, tmp_path, capsys):
    from flatlens.cli import main

    out = tmp_path / "g.h5"
    assert main(["sharpness", str(tiny_run / "model.pt"), "--measures", "trace", "--trace-method", "gauss-newton",
                 "--samples", "32", "--journal", "on", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "journal of its partial sum on disk (0.0 MiB, saved every 30 s), removed when done" in said
    assert not (tmp_path / "g.h5.journal").exists() and fl.hessian.read(out)["attrs"]["trace_resumed_samples"] == 0


def _dist_gn_worker(rank: int, world: int, init: str, model, batches, jdir: str, out: str) -> None:
    import flatlens.measure.gauss_newton as GN
    from flatlens.measure.objective import Objective

    GN.SAVE_EVERY = 0.0  # spawned: the parent's monkeypatch does not reach here
    with _gloo(rank, world, init):
        def obj():
            return Objective(model, batches=batches[rank::world], include=("all",))

        def measure(o, **kw):
            return fl.hessian.trace(o, "gauss-newton", per_sample="loop", **kw)

        killed = obj()
        try:
            with killed.journal(jdir):
                measure(killed, progress=_KillAfter(10 + 4 * rank))  # the ranks stop at different samples
        except _Killed:
            pass
        again = obj()
        with again.journal(jdir):
            resumed = measure(again)
        whole = measure(obj())
        if rank == 0:
            torch.save({"resumed": resumed.estimate, "whole": whole.estimate, "layers": resumed.layers.estimates,
                        "whole_layers": whole.layers.estimates, "from_journal": resumed.details["resumed_samples"]},
                       out)


def test_under_torch_distributed_each_rank_resumes_its_own_gauss_newton_sum(tmp_path):
    res = _run_two(_dist_gn_worker, tmp_path, 8, str(tmp_path / "j"))
    assert res["from_journal"] >= 10 + 14  # both ranks' saved samples, all-reduced
    assert res["resumed"] == res["whole"] and torch.equal(res["layers"], res["whole_layers"])
    assert not (tmp_path / "j").exists()
