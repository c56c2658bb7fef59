"""figures/hessian_spectrum.py draws the SLQ density of several analysis files and fails cleanly without one."""

from __future__ import annotations

import importlib.util

import pytest

import flatlens as fl
from conftest import REPO
from flatlens import plot
from test_hessian import CASES


def _script():
    spec = importlib.util.spec_from_file_location("hessian_spectrum", REPO / "figures" / "hessian_spectrum.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    out = []
    for i, case in enumerate(("mlp", "bn_cnn")):
        obj = CASES[case]()
        eig = fl.hessian.eigenvalues(obj, k=2, seed=i)
        tr = fl.hessian.trace(obj, rtol=0.1, seed=i)
        dens = fl.hessian.density(obj, n_probes=2, n_steps=8, seed=i)
        out.append(fl.hessian.write(d / f"{case}.h5", eig, tr, dens))
    only_eig = fl.hessian.write(d / "eig_only.h5", fl.hessian.eigenvalues(CASES["mlp"](), k=1, seed=0))
    return out, only_eig


def test_spectrum_figure_is_written_and_reads_the_stored_numbers(files, tmp_path, capsys):
    paths, _ = files
    mod = _script()
    s = plot.load_spectrum(paths[0])
    stored = fl.hessian.read(paths[0])
    assert (s["values"] == stored["density"]["values"]).all() and s["trace"] == stored["trace"]
    assert mod.main([str(p) for p in paths] + ["--labels", "mlp", "cnn", "--out", str(tmp_path)]) == 0
    for fmt in ("png", "pdf"):
        f = tmp_path / f"hessian_spectrum.{fmt}"
        assert f.stat().st_size > 5000
    assert (tmp_path / "hessian_spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_file_without_density_is_a_one_line_error(files, tmp_path, capsys):
    _, only_eig = files
    assert _script().main([str(only_eig), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no density" in err and "--measures density" in err


def test_a_grid_too_coarse_for_its_kernel_is_drawn_from_the_nodes(tmp_path):
    """`--density-grid 11` stored 11 samples of a curve whose peaks are narrower than the spacing; the
    figure drew a polyline through them (it integrated to 0.003-1.8). The figure re-evaluates the curve
    from the stored nodes and weights on a fine grid over the same range; a fine stored grid is drawn as is."""
    import numpy as np

    from flatlens.density_curve import gaussian_mixture

    obj = CASES["bn_cnn"]()
    coarse = fl.hessian.density(obj, n_probes=2, n_steps=8, seed=0, grid=11)
    path = fl.hessian.write(tmp_path / "coarse.h5", coarse)
    s = plot.load_spectrum(path)
    stored = fl.hessian.read(path)["density"]
    assert len(stored["grid"]) == 11 and abs(float(np.trapezoid(stored["values"], stored["grid"])) - 1) > 0.01
    assert len(s["grid"]) > 11 and (s["grid"][0], s["grid"][-1]) == (stored["grid"][0], stored["grid"][-1])
    assert float(np.trapezoid(s["values"], s["grid"])) == pytest.approx(1.0, abs=1e-3)
    # the mixture is the one the measure stores: on the stored grid it gives the stored values
    again = gaussian_mixture(stored["nodes"], stored["weights"], stored["grid"], stored["attrs"]["sigma"])
    assert np.array_equal(again, stored["values"])
