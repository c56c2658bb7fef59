"""Figures and exports from landscape HDF5 files: every plot renders (files written, not blank), partial
surfaces draw their complete coarse level, loss-landscape and VTK exports are well-formed."""

from __future__ import annotations

import base64
import importlib.util
import struct
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from flatlens import plot, store
from flatlens.measure.landscape import surface
from flatlens.measure.objective import Objective

from conftest import REPO, flatlens_cmd


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)).eval()


def _obj(seed: int) -> Objective:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    return Objective(_net(seed), batches=[(x[:16], y[:16]), (x[16:], y[16:])])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    out = {}
    for label, seed in (("float", 0), ("qat", 1)):
        path = d / f"{label}.h5"
        obj = _obj(seed)
        surface(obj, 1, "-1:1:9", out=path, seed=0)
        surface(obj, 2, "-1:1:7", "-0.5:0.5:5", out=path, seed=0)  # non-square
        out[label] = path
    # a partial surface: interrupted after the first blocks
    obj = _obj(0)
    real, calls = obj.loss_and_accuracy, {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 4 + 10:
            raise KeyboardInterrupt
        return real()

    obj.loss_and_accuracy = flaky
    with pytest.raises(KeyboardInterrupt):
        surface(obj, 2, "-1:1:9", "-1:1:9", out=d / "partial.h5", seed=0, block_size=5, name="partial")
    out["partial"] = d / "partial.h5"
    return out


def _not_blank(path, min_fraction=0.02):
    import matplotlib.image as mpimg

    assert path.exists() and path.stat().st_size > 2000, path
    if path.suffix == ".png":
        img = mpimg.imread(path)[..., :3]
        assert (np.abs(img - 1.0).sum(-1) > 0.05).mean() > min_fraction, f"{path} is (nearly) blank"
    else:
        assert path.read_bytes()[:5] == b"%PDF-"


def test_every_plot_renders(files, tmp_path):
    written = plot.plot_file(files["float"], tmp_path, ["png", "pdf"])
    names = sorted(p.name for p in written)
    assert names == sorted(f"float_{n}.{e}" for n in ("random_1d", "random_1d_log", "random_2d_contour",
                                                      "random_2d_contourf", "random_2d_surface") for e in ("png", "pdf"))
    for p in written:
        _not_blank(p, 0.10 if "surface" in p.name else 0.02)  # the 3-D surface is really drawn


def test_comparison_on_shared_axes_and_colour_scale(files, tmp_path):
    written = plot.plot_file(files["float"], tmp_path, ["png"], compare=[files["qat"]], labels=["float", "QAT"])
    comp = [p for p in written if p.name.startswith("compare_")]
    assert sorted(p.name for p in comp) == ["compare_random_1d.png", "compare_random_2d.png"]
    for p in comp:
        _not_blank(p)
    a, b = plot.load_surface(files["float"], "random_2d"), plot.load_surface(files["qat"], "random_2d")
    levels, _ = plot.color_levels([a.loss, b.loss])
    assert levels[0] == pytest.approx(min(a.loss.min(), b.loss.min())) and levels[-1] == pytest.approx(
        max(a.loss.max(), b.loss.max()))
    with pytest.raises(Exception, match="same dimension"):
        plot.plot_compare([a, plot.load_surface(files["qat"], "random_1d")], tmp_path / "x", ["png"])


def test_partial_surface_draws_its_finest_complete_level(files, tmp_path):
    s = plot.load_surface(files["partial"])
    assert not s.complete and s.loss.shape == (9, 9)
    v = s.finest_complete()
    assert v.done.all() and np.isfinite(v.loss).all() and v.loss.shape[0] < 9 and "_partial" in v.attrs
    written = plot.plot_2d(s, tmp_path / "partial", ["png"])
    assert len(written) == 3 and all(p.stat().st_size > 2000 for p in written)


def test_export_to_the_loss_landscape_layout(files, tmp_path):
    surf, dirs = plot.export_loss_landscape(files["float"], "random_2d", tmp_path)
    s = plot.load_surface(files["float"], "random_2d")
    with h5py.File(surf, "r") as f:
        assert f["train_loss"].shape == (5, 7) and f["xcoordinates"].shape == (7,) and f["ycoordinates"].shape == (5,)
        assert np.allclose(f["train_acc"][()], 100 * s.accuracy) and np.array_equal(f["train_loss"][()], s.loss)
        assert f["dir_file"][()].decode() == str(dirs)
        # their plot_2D.py: X, Y = meshgrid(x, y); contour(X, Y, Z) needs Z.shape == X.shape
        X, _ = np.meshgrid(f["xcoordinates"][()], f["ycoordinates"][()])
        assert X.shape == f["train_loss"].shape
    params = list(_net(0).named_parameters())
    with h5py.File(dirs, "r") as f:
        assert sorted(f.keys()) == ["xdirection", "ydirection"]
        assert sorted(f["xdirection"].keys(), key=int) == [str(k) for k in range(len(params))]
        for k, (name, p) in enumerate(params):
            d = f["xdirection"][str(k)][()]
            assert d.shape == tuple(p.shape)
            if name.endswith("bias") or name.startswith("1."):  # ignored: biases and BN (biasbn)
                assert not d.any()
            else:
                assert d.any()
    s1, _ = plot.export_loss_landscape(files["float"], "random_1d", tmp_path)
    with h5py.File(s1, "r") as f:
        assert f["train_loss"].shape == (9,) and "ycoordinates" not in f


@pytest.mark.parametrize("binary", [True, False])
def test_vtp_export(files, tmp_path, binary):
    path = plot.export_vtp(files["float"], "random_2d", tmp_path / "s.vtp", binary=binary, log=binary)
    root = ET.parse(path).getroot()
    piece = root.find("PolyData/Piece")
    assert root.get("type") == "PolyData" and piece.get("NumberOfPoints") == "35" and piece.get("NumberOfPolys") == "24"
    pts = piece.find("Points/DataArray")
    if binary:
        raw = base64.b64decode(pts.text)
        n = struct.unpack("<I", raw[:4])[0]
        xyz = np.frombuffer(raw[4:4 + n], dtype="<f4").reshape(-1, 3)
    else:
        xyz = np.array(pts.text.split(), dtype=np.float64).reshape(-1, 3)
    s = plot.load_surface(files["float"], "random_2d")
    assert xyz.shape == (35, 3) and np.allclose(xyz[:7, 0], s.x) and np.allclose(xyz[::7, 1], s.y)
    z = np.log(s.loss + 0.1) if binary else s.loss
    assert np.allclose(xyz[:, 2], z.ravel(), rtol=1e-6)
    with pytest.raises(Exception, match="1-D"):
        plot.export_vtp(files["float"], "random_1d", tmp_path / "x.vtp")


def test_plot_cli_and_figure_scripts(files, tmp_path):
    out = tmp_path / "figs"
    r = flatlens_cmd("plot", str(files["float"]), "--out", str(out), "--format", "png", "--compare", str(files["qat"]),
                     "--export-loss-landscape", str(tmp_path / "li"), "--export-vtp", str(tmp_path / "vtk"))
    assert r.returncode == 0, r.stderr
    assert (out / "compare_random_2d.png").exists() and (out / "float_random_2d_surface.png").exists()
    assert (tmp_path / "vtk" / "float_random_2d.vtp").exists() and len(list((tmp_path / "li").glob("*.h5"))) == 4
    bad = flatlens_cmd("plot", str(tmp_path / "missing.h5"))
    assert bad.returncode == 2 and "not found" in bad.stderr
    for script, extra in (("landscape_1d.py", []), ("landscape_2d.py", []),
                          ("compare.py", [str(files["qat"]), "--labels", "float", "QAT"])):
        spec = importlib.util.spec_from_file_location(f"fig_{script[:-3]}", REPO / "figures" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main([str(files["float"]), *extra, "--out", str(tmp_path / "scripts"), "--format", "png"]) == 0
    made = sorted(p.name for p in (tmp_path / "scripts").iterdir())
    assert "float_random_1d.png" in made and "float_random_2d_contourf.png" in made and "compare_random_2d.png" in made


def test_figure_scripts_never_succeed_drawing_nothing(files, tmp_path, capsys):
    """On a file without (such) landscapes the landscape scripts printed nothing and returned 0; a missing
    file or --group was a StoreError traceback. Each is now one line 'error: ...' and status 2."""
    bare = tmp_path / "bare.h5"
    store.ensure_file(bare, {"checkpoint_sha256": "a" * 64, "config": {}})
    named = tmp_path / "named.h5"
    store.ensure_file(named, {"checkpoint_sha256": "a" * 64, "checkpoint": "/runs/my run/model.pt", "config": {}})
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    cases = (("landscape_1d.py", [str(bare)], "holds no 1-D landscape (landscapes: none); add one with: flatlens "
                                              "landscape CKPT --dim 1"),
             ("landscape_2d.py", [str(bare)], "holds no 2-D landscape"),
             ("landscape_2d.py", [str(files["float"]), "--group", "random_1d"], "holds no 2-D landscape named "
                                                                                "'random_1d' (landscapes: random_1d (1-D))"),
             ("landscape_1d.py", [str(tmp_path / "missing.h5")], "analysis file not found"),
             # the command to run names the file's own checkpoint (it said CKPT), quoted for a shell
             ("landscape_2d.py", [str(named)], "add one with: flatlens landscape '/runs/my run/model.pt' --dim 2 --out"),
             ("landscape_1d.py", [str(text)], "is not a readable HDF5 file (Unable to synchronously open file "
                                              "(file signature not found)); give an analysis .h5 file written by"),
             ("compare.py", [str(files["float"]), str(bare)], "the files share no landscape name"),
             ("compare.py", [str(files["float"]), str(files["qat"]), "--group", "nope"], "has no landscape 'nope'"))
    for script, args, message in cases:
        spec = importlib.util.spec_from_file_location(f"fig_{script[:-3]}", REPO / "figures" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main([*args, "--out", str(tmp_path / "none"), "--format", "png"]) == 2, script
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "none").exists()
