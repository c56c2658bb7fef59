"""`flatlens sharpness`: predicted cost, progress, summary, the /hessian group, merging reruns, one-line errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import flatlens as fl
from conftest import flatlens_cmd
from flatlens import store
from flatlens.cli import main

FAST = ["--samples", "64", "--kernel", "graph_reuse", "--batch-size", "32"]


ANALYSIS = ["--measures", "hessian,trace,density", *FAST, "--k", "2", "--k-bottom", "1", "--tol", "1e-4",
            "--max-hvp", "30", "--trace-rtol", "0", "--density-probes", "2", "--density-steps", "5"]
"""The options of the ``analysis`` fixture's run."""


@pytest.fixture(scope="module")
def analysis(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp") / "analysis.h5"
    res = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), *ANALYSIS, "--progress-every", "0", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out, res


def test_cli_prints_cost_progress_summary_and_writes_the_schema(analysis, tiny_run):
    out, res = analysis
    lines = res.stdout.splitlines()
    # requested together, the three share the density's Lanczos runs: one step
    joint = "hessian+trace+density"
    cost = next(i for i, line in enumerate(lines) if line.startswith(f"[{joint}] predicted cost:"))
    done = next(i for i, line in enumerate(lines) if line.startswith(f"[{joint}] done"))
    assert any(line.startswith(f"{joint} ") and "/" in line for line in lines[cost:done])  # progress
    assert f"[{joint}] predicted cost: 40 HVPs" in res.stdout and "10 SLQ HVPs shared" in res.stdout
    assert "differentiated: float model" in res.stdout
    summary = res.stdout[res.stdout.index("\nsummary"):]
    for label in ("lambda_1", "lambda_2", "lambda_min", "trace", "layer traces", "spectrum", "density cost"):
        assert label in summary, label
    # the joint step's rows are labelled by the measure they answer
    assert "  hessian  lambda_1" in summary and "  trace    trace cost" in summary and "  density  spectrum" in summary
    # the cost rows say which HVPs were the density's, reused (a bare "0 HVPs" read as free)
    rows = {k: v.strip() for k, v in (line.split(None, 1)[1].split("  ", 1) for line in summary.strip().splitlines()[1:])}
    assert "HVPs (+ 5 of the density's, reused)" in rows["eigenvalue cost"]
    assert rows["trace cost"].startswith("30 HVPs (+ 5 of the density's, reused)")
    assert "Traceback" not in res.stderr
    run = fl.load_checkpoint(tiny_run / "model.pt", data=False)
    with h5py.File(out, "r") as f:
        assert f.attrs["checkpoint_sha256"] == run.sha256 and f.attrs["schema_version"] == 1
        assert json.loads(f.attrs["config"])["model"]["width"] == 8 and "flatlens_version" in f.attrs
    r = fl.hessian.read(out)
    assert r["eigenvalues"].shape == (2,) and r["bottom_eigenvalues"].shape == (1,)
    assert r["trace_samples"].shape == (30,) and r["layer_traces"].shape == (4,) and len(r["layer_names"]) == 4
    assert r["density"]["grid"].shape == (1001,) and r["density"]["nodes"].shape == (2, 5)
    a = r["attrs"]
    assert a["split"] == "source-val" and a["n_samples"] == 64 and a["space"] == "latent" and a["seed"] == 0
    assert a["eigenvalue_tol"] == 1e-4 and a["trace_rtol"] == "null" and a["trace_max_hvp"] == 30
    assert a["trace_method"] == "krylov" and a["trace_shared_hvp"] == 5 and a["eigenvalue_shared_hvp"] == 5
    assert a["n_hvp"] == a["eigenvalue_n_hvp"] + 30 + 10 and sorted(a["measures"]) == ["density", "hessian", "trace"]
    assert a["checkpoint_sha256"] == run.sha256 and a["trace_hvp_kernel"] == "graph_reuse"


def test_cli_runs_the_measures_apart_with_no_shared_krylov(tiny_run, tmp_path):
    out = tmp_path / "apart.h5"
    res = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), "--measures", "hessian,trace,density", *FAST,
                       "--max-hvp", "12", "--trace-rtol", "0", "--density-probes", "2", "--density-steps", "4",
                       "--no-shared-krylov", "--progress-every", "0", "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for name in ("hessian", "trace", "density"):
        cost = next(i for i, line in enumerate(lines) if line.startswith(f"[{name}] predicted cost:"))
        done = next(i for i, line in enumerate(lines) if line.startswith(f"[{name}] done"))
        assert any(line.startswith(f"{name} ") and "/" in line for line in lines[cost:done]), name  # progress
    assert "[density] predicted cost: 8 HVPs" in res.stdout
    a = fl.hessian.read(out)["attrs"]
    assert a["trace_method"] == "krylov" and a["trace_shared_hvp"] == 0 and a["eigenvalue_shared_hvp"] == 0
    assert a["n_hvp"] == a["eigenvalue_n_hvp"] + 12 + 8 and a["measures"] == ["hessian", "trace", "density"]


def test_a_budget_the_trace_may_stop_short_of_is_predicted_as_at_most(tiny_run, tmp_path, capsys):
    """A trace with a CI target stops when it meets it: the README's run predicted "≈ 53.1 s" and took 16 s.
    The cost line says "at most ... <=" for such a budget, and "≈" for one that is spent whole."""
    ckpt = str(tiny_run / "model.pt")
    assert main(["sharpness", ckpt, "--measures", "trace", *FAST, "--max-hvp", "12", "--out", str(tmp_path / "a.h5")]) == 0
    said = capsys.readouterr().out
    assert "[trace] predicted cost: at most 12 HVPs, 0 forward passes <= " in said
    assert "(stops at ±0.01 relative (krylov))" in said
    assert main(["sharpness", ckpt, "--measures", "trace", *FAST, "--max-hvp", "12", "--trace-rtol", "0",
                 "--out", str(tmp_path / "b.h5")]) == 0
    said = capsys.readouterr().out
    assert "[trace] predicted cost: 12 HVPs, 0 forward passes ≈ " in said and "(a fixed budget (krylov))" in said
    assert main(["sharpness", ckpt, "--measures", "hessian,trace,density", *FAST, "--max-hvp", "12",
                 "--density-probes", "1", "--density-steps", "4", "--out", str(tmp_path / "c.h5")]) == 0
    assert "[hessian+trace+density] predicted cost: at most 16 HVPs" in capsys.readouterr().out


def test_second_run_replaces_one_measure_and_keeps_the_others(analysis, tiny_run, tmp_path, capsys):
    out, _ = analysis
    p = tmp_path / "copy.h5"
    p.write_bytes(out.read_bytes())
    store.write_group(p, "landscape/keep", {"loss": np.arange(3.0)}, {"measure": "landscape"})
    before = fl.hessian.read(p)
    rc = main(["sharpness", str(tiny_run / "model.pt"), "--measures", "trace", "--trace-method", "xtrace", *FAST,
               "--max-hvp", "20", "--trace-rtol", "0", "--out", str(p)])
    assert rc == 0
    r = fl.hessian.read(p)
    assert r["attrs"]["trace_method"] == "xtrace" and "layer_traces" not in r and "layer_by" not in r["attrs"]
    assert np.array_equal(r["eigenvalues"], before["eigenvalues"]) and np.array_equal(
        r["density"]["values"], before["density"]["values"])
    assert r["attrs"]["eigenvalue_seconds"] == before["attrs"]["eigenvalue_seconds"]
    assert store.read(p, "landscape/keep")["loss"].tolist() == [0.0, 1.0, 2.0]
    # another split is other provenance: the whole group would be replaced, dropping the trace and the
    # density of the first split; refused before any HVP (the file untouched), and done with --replace
    # (the landscape group is not touched)
    capsys.readouterr()
    held = p.read_bytes()
    args = ["sharpness", str(tiny_run / "model.pt"), "--measures", "hessian", "--split", "env0_out", *FAST,
            "--eig-stop", "gap", "--out", str(p)]
    assert main(args) == 2 and p.read_bytes() == held
    out_err = capsys.readouterr()
    assert "predicted cost" not in out_err.out
    assert out_err.err.strip().endswith(
        "copy.h5:/hessian holds trace, density measured on another setup (split: source-val vs env0_out; "
        "n_samples: 64 vs 60; subset_sha256: " + before["attrs"]["subset_sha256"][:37] + "... vs "
        + fl.Objective(fl.load_checkpoint(tiny_run / "model.pt"), split="env0_out").subset_sha256()[:37]
        + "...); this run would replace that group and drop them: pass --replace to do so, or --out another file")
    rc = main(args + ["--replace"])
    assert rc == 0
    r = fl.hessian.read(p)
    assert r["attrs"]["split"] == "env0_out" and "trace" not in r and "density" not in r
    assert r["attrs"]["measures"] == ["hessian"] and "landscape" in h5py.File(p, "r")
    # --eig-stop gap: the estimate it stopped on is stored and printed beside the certificate
    assert r["attrs"]["eigenvalue_stop"] == "gap" and r["eigenvalue_gap_rel_error_estimate"].shape == (1,)
    assert r["eigenvalue_gap_rel_error_estimate"][0] <= 1e-3 * (1 + 1e-12)
    summary = capsys.readouterr().out.split("\nsummary", 1)[1]
    assert "estimated (r^2/gap)" in summary and "certified" in summary


@pytest.mark.parametrize("extra, message", [
    (["--measures", "hessian,flatness"], "--measures flatness unknown"),
    (["--measures", "hessian,trace,hessian"], "--measures names hessian more than once"),  # ran twice
    (["--split", "nowhere"], "unknown split 'nowhere'"),
    (["--space", "dequant"], "needs a quantized model"),
    (["--out", "FOREIGN"], "not a flatlens analysis file"),
    (["--out", "OTHER"], "holds results of another checkpoint"),
    (["--measures", "trace", "--trace-method", "xtrace", "--layer-rtol", "0.1"], "--layer-rtol needs per-layer"),
    (["--out", "DIR"], "is a directory; give --out a file path"),
    (["--device", "tpu"], "device 'tpu' is not a device"),
    (["--device", "mps"], "device 'mps' is not supported: flatlens runs on cpu or cuda"),  # was a traceback
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--device", "cuda:99"], "device 'cuda:99' asked but"),
    (["--batch-size", "0"], "--batch-size=0 is not an int >= 1"),
    (["--tol", "2"], "must be < 1"),
    (["--measures", "hessian,density", "--k", "0"], "ask for nothing"),
])
def test_bad_input_is_a_one_line_error_exit_2(tiny_run, tmp_path, capsys, extra, message):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    other = tmp_path / "other.h5"
    store.ensure_file(other, {"checkpoint_sha256": "f" * 64, "config": {}})
    extra = [str(foreign) if e == "FOREIGN" else str(other) if e == "OTHER" else str(tmp_path) if e == "DIR" else e
             for e in extra]
    out = ["--out", str(tmp_path / "a.h5")] if "--out" not in extra else []
    rc = main(["sharpness", str(tiny_run / "model.pt"), "--measures", "hessian", *FAST, "--k", "1", *out, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "--k=0 and --k-bottom=0 ask for nothing; pass --k >= 1 or --k-bottom >= 1."),
    (["--k-bottom", "-1"], "--k-bottom=-1 is not an int >= 0"),
    (["--tol", "0"], "--tol=0.0 must be > 0"),
    (["--k", "5", "--eig-max-iter", "3"], "--eig-max-iter=3 < --k + --k-bottom = 5; pass --eig-max-iter >= 5."),
    (["--measures", "trace", "--max-hvp", "1"], "--max-hvp=1 is not an int >= 2"),
    (["--max-hvp", "0"], "--max-hvp=0 is not an int >= 1"),  # shared with density: 1 residual probe is allowed
    (["--measures", "trace", "--trace-level", "1.5"], "--trace-level=1.5 is outside (0, 1)"),
    (["--measures", "trace", "--trace-rtol", "-1"], "--trace-rtol=-1.0 must be > 0; pass a relative CI half-width such "
                                                   "as 0.01, or 0 for a fixed budget (spend --max-hvp)."),
    (["--measures", "trace", "--layer-rtol", "-0.5"], "--layer-rtol=-0.5 must be > 0"),
    (["--measures", "trace", "--trace-method", "xtrace", "--layer-rtol", "0.1"], "--layer-rtol needs per-layer"),
    (["--measures", "density", "--density-steps", "0"], "--density-steps=0 is not an int >= 1"),
    (["--measures", "density", "--density-grid", "1"], "--density-grid=1 is not an int >= 2"),
    (["--measures", "density", "--density-sigma", "0"],
     "--density-sigma=0.0 must be > 0; pass a positive kernel width or leave it out for the default."),
])
def test_bad_measure_options_fail_before_the_checkpoint_is_read(tmp_path, capsys, extra, message):
    """The measures' options are checked first and named by their flags: the checkpoint here does not
    exist, and the error is still about the option. Before, it came after loading the model, timing the
    kernels and printing a predicted cost, in the API's names ('k_top=0 and k_bottom=0 ask for nothing')."""
    measures = [] if "--measures" in extra else ["--measures", "hessian,trace,density"]
    rc = main(["sharpness", str(tmp_path / "missing.pt"), *measures, "--out", str(tmp_path / "a.h5"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "a.h5").exists()


def test_good_measure_options_pass_the_early_check(tmp_path, capsys):
    """The early check accepts the boundary values the measures accept (so the missing checkpoint is what fails):
    --max-hvp 1 when the trace shares the density's runs, --trace-rtol 0 (a fixed budget), one density step."""
    rc = main(["sharpness", str(tmp_path / "missing.pt"), "--max-hvp", "1", "--trace-rtol", "0", "--density-steps", "1",
               "--density-grid", "2", "--k", "0", "--k-bottom", "1", "--out", str(tmp_path / "a.h5")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "checkpoint not found" in err, err
    rc = main(["sharpness", str(tmp_path / "missing.pt"), "--measures", "trace", "--trace-method", "gauss-newton",
               "--max-hvp", "0", "--out", str(tmp_path / "a.h5")])  # exact: no HVP budget to check
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err


def test_more_samples_than_the_split_holds_is_said(tiny_run, tmp_path, capsys):
    """--samples beyond the split's size uses every sample and says so in the header (it was silent)."""
    rc = main(["sharpness", str(tiny_run / "model.pt"), "--measures", "hessian", "--samples", "1000000",
               "--kernel", "graph_reuse", "--out", str(tmp_path / "a.h5")])
    out = capsys.readouterr().out
    n = fl.hessian.read(tmp_path / "a.h5")["attrs"]["n_samples"]
    assert rc == 0 and n < 1000000
    assert f"{n} samples of split 'source-val'" in out and f"(--samples 1000000 asked; the split holds {n}, all are used)" in out


def test_default_measures_do_not_depend_on_import_order(monkeypatch):
    """--measures defaults to hessian,trace,density whichever measure module a process imported first
    (it was the registry's first three: landscape,hessian,trace after an earlier import of the landscape)."""
    from flatlens.cli import build_parser
    from flatlens.measure import registry

    registry.builtin_measures()
    monkeypatch.setattr(registry, "REGISTRY", {"landscape": registry.REGISTRY["landscape"], **registry.REGISTRY})
    assert list(registry.builtin_measures())[0] == "landscape"
    args = build_parser("sharpness").parse_args(["sharpness", "ckpt.pt"])
    assert args.measures == "hessian,trace,density"


def test_header_says_whether_there_is_batchnorm(tiny_run, tmp_path, capsys):
    """The header named 'BatchNorm in eval mode' for every model, also DomainBed's GroupNorm MNIST-CNN."""
    from conftest import tiny_config
    from flatlens.engine.loop import train

    gn = tmp_path / "gn"
    train(tiny_config("model.arch=mnist_cnn", "train.steps=2"), gn, verbose=False)
    for run, text in ((tiny_run, "; BatchNorm in eval mode (running statistics)"), (gn, "; no BatchNorm layers")):
        rc = main(["sharpness", str(run / "model.pt"), "--measures", "hessian", "--samples", "16", "--kernel",
                   "graph_reuse", "--eig-max-iter", "3", "--out", str(tmp_path / f"{run.name}.h5")])
        header = capsys.readouterr().out.splitlines()[2]
        assert rc == 0 and header.startswith("differentiated: float model") and header.endswith(text), header


def test_a_rerun_with_the_same_settings_skips_what_the_file_holds(analysis, tiny_run, tmp_path, capsys):
    """A rerun of the same command (e.g. after a kill during a later measure) used to measure everything again.
    What the file holds with the same settings on the same data is skipped now, and its stored summary shown."""
    out, first = analysis
    p = tmp_path / "again.h5"
    p.write_bytes(out.read_bytes())
    ckpt = str(tiny_run / "model.pt")
    joint = "hessian+trace+density"

    def rerun(*extra: str) -> str:
        capsys.readouterr()
        assert main(["sharpness", ckpt, *ANALYSIS, *extra, "--out", str(p)]) == 0
        return capsys.readouterr().out

    said = rerun()
    assert f"[{joint}] already in {p} with these settings and data; skipped (--recompute" in said
    assert "predicted cost" not in said and p.read_bytes() == out.read_bytes()  # nothing measured, nothing written
    assert said.split("\nsummary", 1)[1] == first.stdout.split("\nsummary", 1)[1]  # the stored rows, as printed
    a = fl.hessian.read(p)["attrs"]
    stored = json.loads(a["trace_options"])
    assert stored["options"]["max_hvp"] == 30 and stored["step"] == "density+hessian+trace"
    # the same measures named in another order share the same run: skipped too
    capsys.readouterr()
    assert main(["sharpness", ckpt, *ANALYSIS, "--measures", "density,trace,hessian", "--out", str(p)]) == 0
    said = capsys.readouterr().out
    assert "[density+trace+hessian] already in" in said
    assert said.split("\nsummary", 1)[1] == first.stdout.split("\nsummary", 1)[1]  # rows in the order a run prints
    # --recompute measures again: the same numbers (seeded; bitwise only at the fixture process' thread count)
    said = rerun("--recompute")
    assert f"[{joint}] predicted cost" in said and "skipped" not in said
    again = fl.hessian.read(p)
    assert np.allclose(again["eigenvalues"], fl.hessian.read(out)["eigenvalues"], rtol=1e-5, atol=0)
    assert again["attrs"]["trace_written"] >= a["trace_written"]
    # another option of a member, another seed, another sample subset: measured
    for extra in (["--max-hvp", "31"], ["--seed", "1"], ["--samples", "48"]):
        assert f"[{joint}] predicted cost" in rerun(*extra), extra
    # a member missing its settings (killed between the shared run's writes): the step runs whole
    rerun()
    with h5py.File(p, "a") as f:
        del f["hessian"].attrs["trace_options"]
    assert f"[{joint}] predicted cost" in rerun()
    # a measure run alone is another step than the shared run: the stored shared result does not stand in for it
    capsys.readouterr()
    assert main(["sharpness", ckpt, "--measures", "hessian", *FAST, "--k", "2", "--k-bottom", "1", "--tol", "1e-4",
                 "--out", str(p)]) == 0
    assert "[hessian] predicted cost" in capsys.readouterr().out
    assert main(["sharpness", ckpt, "--measures", "hessian", *FAST, "--k", "2", "--k-bottom", "1", "--tol", "1e-4",
                 "--out", str(p)]) == 0
    assert "[hessian] already in" in capsys.readouterr().out


def test_a_kill_during_the_shared_runs_trace_probes_keeps_eigenvalues_and_density(tiny_run, tmp_path):
    """hessian,trace,density share one Lanczos run and used to be written together at the very end: a kill
    during the trace's residual probes lost the finished eigenvalues and density (README promises each
    measure is kept as soon as it finishes). They are written before the probes now."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path / "k.h5"
    # a budget just below the dimension: the shared basis, then n - 1 residual probes (a budget of n or more
    # gets the exact basis of every dimension instead, which needs no probe)
    n = fl.Objective(fl.load_checkpoint(tiny_run / "model.pt"), samples=64).space.numel
    cmd = [sys.executable, "-m", "flatlens", "sharpness", str(tiny_run / "model.pt"), "--measures",
           "hessian,trace,density", *FAST, "--max-hvp", str(n - 1), "--trace-rtol", "0", "--density-probes", "1",
           "--density-steps", "8", "--progress-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        held: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                with h5py.File(out, "r") as f:
                    held = sorted(f["hessian"].keys()) if "hessian" in f else []
                if "eigenvalues" in held:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()  # n - 1 probes: still at them
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    r = fl.hessian.read(out)
    assert "eigenvalues" in r and "density" in r and "trace" not in r
    assert r["attrs"]["measures"] == ["hessian", "density"]
    # the rerun of the missing measure completes the group (merge)
    rest = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), "--measures", "trace", *FAST, "--max-hvp", "10",
                        "--trace-rtol", "0", "--out", str(out))
    assert rest.returncode == 0, rest.stderr
    assert {"eigenvalues", "density", "trace"} <= set(fl.hessian.read(out))


def test_data_moved_since_training_is_found_with_data_root(tmp_path):
    """A folder dataset read on another machine, or moved: the checkpoint's stored data.root no longer
    holds it, and nothing but --set at training time could point there. --data-root (data_root=) does;
    the stored fingerprints still prove the files are the ones the run trained on."""
    import shutil

    from conftest import tiny_config
    from test_data import _make_tree

    from flatlens.engine.loop import train
    from flatlens.errors import DataError

    old = tmp_path / "old"
    _make_tree(old, "PACS", ["sketch", "photo", "cartoon", "art_painting"], ["dog", "horse"], n=4)
    train(tiny_config("data.dataset=PACS", f"data.root={old}", "data.image_size=16", "train.steps=2",
                      "train.eval_every=2"), tmp_path / "run", verbose=False)
    new = tmp_path / "new"
    new.mkdir()
    shutil.move(str(old / "PACS"), str(new / "PACS"))
    ckpt = tmp_path / "run" / "model.pt"
    with pytest.raises(DataError, match=r"PACS not found at .*old/PACS.*if the data moved since training, pass "
                                         r"--data-root DIR"):
        fl.load_checkpoint(ckpt)
    run = fl.load_checkpoint(ckpt, data_root=new)
    assert run.config.data.root == str(new) and run.dataset is not None
    res = flatlens_cmd("sharpness", str(ckpt), "--measures", "hessian", "--k", "1", "--data-root", str(new),
                       "--out", str(tmp_path / "a.h5"))
    assert res.returncode == 0, res.stderr
    assert json.loads(fl.store.read(tmp_path / "a.h5")["attrs"]["config"])["data"]["root"] == str(new)
    other = tmp_path / "other"  # the same layout with other images: refused by the fingerprint
    _make_tree(other, "PACS", ["sketch", "photo", "cartoon", "art_painting"], ["dog", "horse"], n=5)
    with pytest.raises(DataError, match="differ from the data it was trained on"):
        fl.load_checkpoint(ckpt, data_root=other)


def test_each_checkpoint_of_a_run_gets_its_own_default_file(tiny_run, tmp_path):
    """Without --out every checkpoint wrote analysis.h5 beside it, and a file belongs to one checkpoint:
    measuring last.pt (or a trajectory's step_*.pt) after model.pt of the same run directory failed
    with "holds results of another checkpoint". model.pt keeps analysis.h5; others get <stem>_analysis.h5."""
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "model.pt", run / "model.pt")
    shutil.copy(tiny_run / "init.pt", run / "init.pt")
    shutil.copy(tiny_run / "init.pt", run / "checkpoints" / "step_000010.pt")
    for ckpt in (run / "model.pt", run / "init.pt", run / "checkpoints" / "step_000010.pt"):
        assert main(["sharpness", str(ckpt), "--measures", "hessian", "--k", "1", "--samples", "16"]) == 0
    assert store.default_path(run / "init.pt") == (run / "init_analysis.h5").resolve()
    sha = {name: store.read(run / name)["attrs"]["checkpoint_sha256"] for name in ("analysis.h5", "init_analysis.h5")}
    assert sha["analysis.h5"] == fl.load_checkpoint(run / "model.pt", data=False).sha256 != sha["init_analysis.h5"]
    assert (run / "checkpoints" / "step_000010_analysis.h5").exists()


def test_info_describes_an_analysis_file(analysis, tmp_path):
    """`flatlens info` read checkpoints only ("not a torch checkpoint" for analysis.h5); it now gives an
    analysis file's provenance, each group's headline numbers and the stored summary rows (and JSON)."""
    out, first = analysis
    res = flatlens_cmd("info", str(out))
    assert res.returncode == 0, res.stderr
    r = fl.hessian.read(out)
    text = res.stdout
    assert "flatlens-analysis schema 1" in text and "/hessian" in text
    assert "measure         hessian, trace, density" in text
    assert f"eigenvalues     [{r['eigenvalues'][0]:.6g}, {r['eigenvalues'][1]:.6g}]" in text
    assert f"trace           {float(r['trace']):.6g} (95% CI" in text
    js = json.loads(flatlens_cmd("info", str(out), "--json").stdout)
    assert js["attrs"]["checkpoint_sha256"] == r["attrs"]["checkpoint_sha256"] and "hessian" in js["groups"]
    # the summary table the sharpness run printed, read back from the file, in the order it was printed
    printed = [" ".join(line.split()) for line in first.stdout.split("\nsummary\n", 1)[1].strip().splitlines()]
    shown = text.split("  summary ", 1)[1].split("\n  cost ", 1)[0].strip().splitlines()
    assert [" ".join(line.split()) for line in shown] == printed
    assert js["groups"]["hessian"]["summary"].count("\n") == len(printed) - 1
    assert f"checkpoint        {r['attrs']['checkpoint']} (step " in text
    # a file measured from Python on a model of your own says so (it said "(none) (step ?, sha256 ...)")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    own = tmp_path / "own.h5"
    fl.hessian.eigenvalues(fl.Objective(net, batches=[(torch.randn(8, 4), torch.arange(8) % 3)])).write(own)
    assert "checkpoint        none: measured from Python on a model of your own" in flatlens_cmd("info", str(own)).stdout
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    bad = flatlens_cmd("info", str(foreign))
    assert bad.returncode == 2 and "not a flatlens analysis file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("kernel, start, extra", [("double_backward", "auto", ", 1 gradient ≈"),
                                                   ("graph_reuse", "auto", " ≈"),
                                                   ("double_backward", "random", " ≈"),
                                                   ("forward_over_reverse", "gradient", ", 1 gradient ≈")])
def test_the_predicted_cost_counts_the_gradient_a_start_spends(tiny_run, tmp_path, capsys, kernel, start, extra):
    """The gradient start spends one forward+backward under every kernel but graph_reuse (whose retained graphs
    hold the gradient): the predicted cost says so, as the stored ``eigenvalue_n_grad`` does."""
    out = tmp_path / "a.h5"
    assert main(["sharpness", str(tiny_run / "model.pt"), "--measures", "hessian", "--samples", "64", "--batch-size",
                 "32", "--kernel", kernel, "--eig-start", start, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    line = next(x for x in said.splitlines() if x.startswith("[hessian] predicted cost:"))
    assert "0 forward passes" + extra in line, line
    assert store.read(out)["hessian"]["attrs"]["eigenvalue_n_grad"] == int("gradient" in extra)
