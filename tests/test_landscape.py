"""Loss landscapes through the Python API: grids, directions (filter normalization, seeds, ignore
policies, checkpoint and PCA directions), exactness, invariances (Dinh et al.), resume, quantized models."""

from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import flatlens as fl
from flatlens.errors import FlatlensError, StoreError
from flatlens.measure.directions import (
    gaussian, landscape_parameters, normalize, random_directions,
)
from flatlens.measure.grid import parse_range, schedule, stride_chain
from flatlens.measure.landscape import surface
from flatlens.measure.objective import Objective
from flatlens.measure.params import model_state_hash

from conftest import tiny_config


# -- small models ---------------------------------------------------------------------------------

def _batches(n=48, bs=16, shape=(1, 6, 6), classes=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _bn_net(dtype=torch.float32, eps=1e-5):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4, eps=eps), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 4))
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    return net.to(dtype).eval()


def _relu_mlp(dtype=torch.float64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16, bias=False), nn.ReLU(), nn.Linear(16, 12, bias=False),
                         nn.ReLU(), nn.Linear(12, 4, bias=False)).to(dtype).eval()


# -- grids ----------------------------------------------------------------------------------------

def test_ranges_and_coarse_to_fine_schedule():
    ax = parse_range("-1:1:51")
    assert ax.num == 51 and ax.values[25] == 0.0 and ax.values[0] == -1.0 and ax.values[-1] == 1.0
    assert parse_range("0:1:11").values[0] == 0.0  # an end at 0 is fine (the reference tool rejects it)
    assert parse_range("-0.5:1.5:41").values[30] == 1.0  # 1 hit exactly
    for bad in ("1:0:5", "-1:1", "a:b:c", "-1:1:0", "0:1:1"):
        with pytest.raises(FlatlensError):
            parse_range(bad)
    with pytest.raises(FlatlensError, match=r"keep MIN and MAX within ±1e\+06"):  # was a float32 overflow traceback
        parse_range("-1e308:1e308:3")
    assert parse_range("-1e6:1e6:3").values[0] == -1e6
    assert stride_chain(51) == [50, 25, 5, 1] and stride_chain(21) == [20, 10, 5, 1] and stride_chain(2) == [1]
    s = schedule(11, 7)
    assert s.shape == (7, 11) and sorted(s.order.tolist()) == list(range(77))
    for k, (sx, sy) in enumerate(s.strides):  # level k = exactly the strided sub-grid, nested
        jj, ii = np.nonzero(s.level <= k)
        assert set(zip(jj.tolist(), ii.tolist())) == {(j, i) for j in range(0, 7, sy) for i in range(0, 11, sx)}
    assert s.level[3, 5] <= 1  # the centre comes early
    done = np.zeros((7, 11), bool)
    blocks = s.blocks(done, 4)
    assert sum(len(b) for b in blocks) == 77 and all(len(set(s.level.reshape(-1)[b])) == 1 for b in blocks)
    levels = [int(s.level.reshape(-1)[b[0]]) for b in blocks]
    assert levels == sorted(levels)  # coarse to fine
    for b in blocks[:3]:
        done.reshape(-1)[b] = True
    assert s.complete_level(done) >= 0
    assert sum(len(b) for b in s.blocks(done, 4)) == 77 - int(done.sum())


# -- directions -----------------------------------------------------------------------------------

def test_filter_normalization_gives_each_filter_the_weight_filter_norm():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0.0  # a dead filter
    d = torch.randn(6, 3, 3, 3)
    nd, zeros = normalize(d, w, "filter")
    assert zeros == 1 and torch.isfinite(nd).all() and float(nd[2].abs().max()) == 0.0
    dn, wn = nd.reshape(6, -1).norm(dim=1), w.double().reshape(6, -1).norm(dim=1)
    assert torch.allclose(dn, wn, rtol=1e-12, atol=0)
    lin = torch.randn(5, 7)
    nl, _ = normalize(torch.randn(5, 7), lin, "filter")  # Linear: a filter is a row
    assert torch.allclose(nl.norm(dim=1), lin.double().norm(dim=1), rtol=1e-12)
    nlay, _ = normalize(d, w, "layer")
    assert float(nlay.norm()) == pytest.approx(float(w.double().norm()), rel=1e-12)
    assert torch.equal(normalize(d, w, "none")[0], d.double())
    b = torch.randn(6)
    assert float(normalize(torch.randn(6), b, "filter")[0].norm()) == pytest.approx(float(b.double().norm()), rel=1e-12)
    assert float(normalize(torch.randn(6), torch.zeros(6), "filter")[0].abs().sum()) == 0.0  # zero-init BN beta
    with pytest.raises(FlatlensError, match="unknown normalization"):
        normalize(d, w, "dfilter")
    # through a model: every direction filter has the norm of its weight filter
    net = _bn_net()
    names = landscape_parameters(net)
    origin = [dict(net.named_parameters())[n].detach() for n in names]
    dirs = random_directions(names, origin, dims=2, norm="filter", seed=3)
    for axis in dirs.axes:
        for t, w_ in zip(axis, origin):
            assert torch.allclose(t.reshape(t.shape[0], -1).norm(dim=1), w_.reshape(w_.shape[0], -1).norm(dim=1),
                                  rtol=1e-6)


def test_seeded_directions_are_reproducible_and_repeats_use_base_plus_k():
    net = _bn_net()
    names = landscape_parameters(net, "none")
    origin = [dict(net.named_parameters())[n].detach() for n in names]
    a = random_directions(names, origin, 2, "filter", seed=5)
    b = random_directions(names, origin, 2, "filter", seed=5)
    assert a.sha256() == b.sha256()
    r1 = random_directions(names, origin, 2, "filter", seed=5, repeat=1)
    assert r1.sha256() != a.sha256() and r1.info["direction_seed"] == 6
    assert random_directions(names, origin, 2, "filter", seed=6, repeat=0).sha256() == r1.sha256()
    # x and y differ; a parameter's draw does not depend on which others are selected
    assert not torch.equal(a.axes[0][0], a.axes[1][0])
    only = gaussian(names[1:], [o.shape for o in origin[1:]], 5, "x")
    assert all(torch.equal(u, v) for u, v in zip(only, gaussian(names, [o.shape for o in origin], 5, "x")[1:]))


def test_ignore_policies_by_name():
    net = _bn_net()
    assert landscape_parameters(net) == ["0.weight", "4.weight"]  # biasbn: biases and norm ignored
    assert landscape_parameters(net, "none") == ["0.weight", "1.weight", "1.bias", "4.weight", "4.bias"]
    assert landscape_parameters(net, "bias") == ["0.weight", "1.weight", "1.bias", "4.weight"]
    assert landscape_parameters(net, "biasbn,^4\\.") == ["0.weight"]
    with pytest.raises(FlatlensError, match="neither a policy"):
        landscape_parameters(net, "biasnb")
    with pytest.raises(FlatlensError, match="leaves no parameter"):
        landscape_parameters(net, "biasbn,weight")
    from flatlens.quant import attach_quantizers

    q = _bn_net()
    attach_quantizers(q, keep_float=["4"], enabled=True)
    names = landscape_parameters(q, "none")
    assert not any("step_size" in n for n in names)  # step sizes never in random directions
    assert any("step_size" in n for n in landscape_parameters(q, "none", kind="interpolation"))
    assert not any("step_size" in n for n in landscape_parameters(q, "none,scales", kind="interpolation"))


def test_orthogonalization_stores_the_achieved_cosine():
    net = _bn_net()
    obj = Objective(net, batches=_batches())
    s = surface(obj, 2, "-1:1:3", orthogonalize=True, seed=2)
    assert abs(s.attrs["cosine"]) < 1e-6 and "cosine_raw" in s.attrs and s.attrs["orthogonalized"]


# -- exactness and invariance ---------------------------------------------------------------------

def test_origin_equals_unperturbed_loss_and_model_is_bit_identical(tiny_run):
    run = fl.load_checkpoint(tiny_run / "model.pt")
    obj = Objective(run, split="target", samples=96)
    before = model_state_hash(run.model)
    loss0 = obj.loss()
    s = surface(obj, 2, "-1:1:5", "-0.5:0.5:3", seed=1)
    assert s.loss.shape == (3, 5) and s.done.all()
    assert abs(s.loss[1, 2] - loss0) <= 1e-6 * loss0 and s.attrs["origin_loss"] == loss0
    assert model_state_hash(run.model) == before
    assert np.isfinite(s.loss_stderr).all() and (s.loss_stderr > 0).all()


def test_non_square_grid_is_stored_rows_y_columns_x(tmp_path):
    net = _bn_net()
    obj = Objective(net, batches=_batches())
    s = surface(obj, 2, "-1:1:5", "0:0.5:3", seed=4, out=tmp_path / "a.h5")
    assert s.loss.shape == (3, 5)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        g = f["landscape/random_2d"]
        assert g["loss"].shape == (3, 5) and g["xcoordinates"].shape == (5,) and g["ycoordinates"].shape == (3,)
        dx = [torch.from_numpy(g["directions/x"][n][()]) for n in obj.space.names]
        dy = [torch.from_numpy(g["directions/y"][n][()]) for n in obj.space.names]
    # an independent evaluation of f(x_4, y_1) on a copy of the model
    ref = copy.deepcopy(net)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, a, b in zip(obj.space.names, dx, dy):
            params[n].add_(a, alpha=1.0).add_(b, alpha=0.25)
    x = torch.cat([b[0] for b in _batches()])
    y = torch.cat([b[1] for b in _batches()])
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(ref(x).double(), y))
    assert s.loss[1, 4] == pytest.approx(expected, rel=1e-6)


def _slice(net, batches, norm, ts="-1:1:5"):
    return surface(Objective(net, batches=batches), 1, ts, norm=norm, seed=7).loss


def test_filter_normalized_slices_are_scale_invariant_and_unnormalized_ones_are_not():
    """Dinh et al. 2017: the reparametrizations leave the function unchanged; only normalized
    directions follow them (checks of landscape-anchors §13)."""
    batches = _batches(dtype=torch.float64)
    # (a) rescale conv filters that feed BatchNorm (running statistics follow)
    net = _bn_net(torch.float64, eps=1e-30)
    scaled = copy.deepcopy(net)
    c = torch.tensor([3.0, 0.2, 7.0, 1.5], dtype=torch.float64)
    with torch.no_grad():
        scaled[0].weight.mul_(c.view(-1, 1, 1, 1))
        scaled[1].running_mean.mul_(c)
        scaled[1].running_var.mul_(c * c)
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(net(x), scaled(x), atol=1e-10)  # the same function
    a, b = _slice(net, batches, "filter"), _slice(scaled, batches, "filter")
    assert np.abs(a - b).max() <= 1e-5
    a, b = _slice(net, batches, "none"), _slice(scaled, batches, "none")
    assert np.abs(a - b).max() > 1e-2
    # (b) layer-wise rescaling of a bias-free ReLU net: W1 * 4, W2 / 4
    mlp = _relu_mlp()
    resc = copy.deepcopy(mlp)
    with torch.no_grad():
        resc[1].weight.mul_(4.0)
        resc[3].weight.div_(4.0)
    mb = _batches(shape=(36,), dtype=torch.float64)
    assert torch.allclose(mlp(mb[0][0]), resc(mb[0][0]), atol=1e-10)
    a, b = _slice(mlp, mb, "filter"), _slice(resc, mb, "filter")
    assert np.abs(a - b).max() <= 1e-5
    a, b = _slice(mlp, mb, "layer"), _slice(resc, mb, "layer")
    assert np.abs(a - b).max() <= 1e-5
    a, b = _slice(mlp, mb, "none"), _slice(resc, mb, "none")
    assert np.abs(a - b).max() > 1e-2


def test_same_seed_gives_bitwise_identical_directions_and_surface(tmp_path):
    net = _bn_net()
    outs = []
    for k in range(2):
        surface(Objective(net, batches=_batches()), 2, "-1:1:5", "-1:1:3", seed=11, out=tmp_path / f"{k}.h5")
        with h5py.File(tmp_path / f"{k}.h5", "r") as f:
            g = f["landscape/random_2d"]
            outs.append({k2: g[k2][()] for k2 in ("loss", "accuracy", "loss_stderr", "done")}
                        | {f"d/{a}/{n}": g[f"directions/{a}/{n}"][()] for a in "xy" for n in g["directions/x"]}
                        | {"sha": g.attrs["directions_sha256"]})
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert np.array_equal(outs[0][key], outs[1][key]), key


# -- checkpoint directions ------------------------------------------------------------------------

def test_interpolation_reaches_the_other_checkpoint_and_beyond(tiny_run, tmp_path):
    a = Objective(fl.load_checkpoint(tiny_run / "model.pt"), split="target", samples=64)
    b = Objective(fl.load_checkpoint(tiny_run / "init.pt"), split="target", samples=64)
    s = surface(a, to=tiny_run / "init.pt", grid="-0.5:1.5:9", out=tmp_path / "i.h5")
    assert s.x[2] == 0.0 and s.x[6] == 1.0 and s.attrs["bn_stats"] == "interpolate" and s.attrs["norm"] == "none"
    assert s.loss[2] == a.loss()
    assert s.loss[6] == pytest.approx(b.loss(), rel=1e-5)  # BN statistics move along: the far end is B
    assert np.isfinite(s.loss).all()  # extrapolated variances stay positive
    with h5py.File(tmp_path / "i.h5", "r") as f:
        g = f["landscape/interpolation"]
        assert "buffer_directions" in g and list(g["point_labels"].asstr()[()]) == ["origin", "B"]
    with pytest.raises(FlatlensError, match="--norm"):
        surface(a, to=tiny_run / "init.pt", norm="filter")


@pytest.fixture(scope="module")
def traj_run(tmp_path_factory):
    from flatlens.engine.loop import train

    out = tmp_path_factory.mktemp("runs") / "traj"
    train(tiny_config("train.keep_checkpoints=true", "train.eval_every=10", "train.steps=30"), out, verbose=False)
    return out


def test_plane_through_three_checkpoints(traj_run):
    ck = traj_run / "checkpoints"
    obj = Objective(fl.load_checkpoint(ck / "step_000030.pt"), split="target", samples=64)
    b_loss = Objective(fl.load_checkpoint(ck / "step_000010.pt"), split="target", samples=64).loss()
    c_loss = Objective(fl.load_checkpoint(ck / "step_000020.pt"), split="target", samples=64).loss()
    s = surface(obj, plane=[ck / "step_000010.pt", ck / "step_000020.pt"], grid="0:1:3")
    assert s.loss.shape == (3, 3) and s.dims == 2 and s.attrs["kind"] == "plane"
    assert s.loss[0, 0] == obj.loss()
    assert s.loss[0, 2] == pytest.approx(b_loss, rel=1e-5)  # (x=1, y=0) = B
    assert s.loss[2, 0] == pytest.approx(c_loss, rel=1e-5)  # (x=0, y=1) = C
    o = surface(obj, plane=[ck / "step_000010.pt", ck / "step_000020.pt"], grid="0:1:3", orthogonalize=True)
    assert abs(o.attrs["cosine"]) < 1e-6 and abs(o.attrs["cosine_raw"]) > 0.01


def test_pca_directions_from_a_training_trajectory(traj_run, tmp_path):
    obj = Objective(fl.load_checkpoint(traj_run / "model.pt"), split="target", samples=64)
    s = surface(obj, pca=traj_run, out=tmp_path / "p.h5", grid="auto:7", block_size=50)
    assert s.dims == 2 and s.loss.shape == (7, 7) and s.done.all()
    with h5py.File(tmp_path / "p.h5", "r") as f:
        g = f["landscape/pca_2d"]
        ratio = g["explained_variance_ratio"][()]
        traj = g["trajectory"][()]
        dx = np.concatenate([g["directions/x"][n][()].ravel() for n in obj.space.names])
        dy = np.concatenate([g["directions/y"][n][()].ravel() for n in obj.space.names])
        assert len(g["trajectory_steps"][()]) == 3 and (g["trajectory_off_plane"][()] >= 0).all()
    assert ratio[0] >= ratio[1] > 0 and ratio.sum() <= 1 + 1e-9
    assert abs(np.linalg.norm(dx) - 1) < 1e-5 and abs(np.linalg.norm(dy) - 1) < 1e-5 and abs(dx @ dy) < 1e-5
    # the default range covers the projected trajectory
    assert s.x[0] <= traj[:, 0].min() and s.x[-1] >= traj[:, 0].max()
    assert s.y[0] <= traj[:, 1].min() and s.y[-1] >= traj[:, 1].max()


# -- quantized models -----------------------------------------------------------------------------

def test_quantized_model_latent_and_dequant_spaces():
    from flatlens.quant import attach_quantizers, iter_quantizers

    net = _bn_net()
    attach_quantizers(net, keep_float=["4"], bits=4, enabled=True)
    for _, q in iter_quantizers(net):
        q.init_from(dict(net.named_parameters())["0.weight"]) if not q.is_initialized() else None
    steps = {n: p.detach().clone() for n, p in net.named_parameters() if "step_size" in n}
    before = model_state_hash(net)
    lat = surface(Objective(net, batches=_batches(), space="latent"), 1, "-1:1:5", seed=0)
    deq = surface(Objective(net, batches=_batches(), space="dequant"), 1, "-1:1:5", seed=0)
    assert lat.attrs["space"] == "latent" and deq.attrs["space"] == "dequant"
    assert "step_size" not in json.dumps(lat.attrs.get("param_names", ""))
    assert np.isfinite(lat.loss).all() and np.isfinite(deq.loss).all()
    assert lat.loss[2] == pytest.approx(deq.loss[2], rel=1e-5)  # same function at the centre
    assert model_state_hash(net) == before
    assert all(torch.equal(p, steps[n]) for n, p in net.named_parameters() if "step_size" in n)


def test_interpolation_across_the_quantization_start_ends_at_b_or_is_refused(tiny_run, tmp_path):
    """A QAT run's init.pt has its quantizers off, its model.pt on. Interpolating in latent space moved the
    weights only, so the line ended at model.pt's latent weights without quantization, a loss model.pt
    never has (2.23196 instead of 2.230373 on the digits run). Latent space refuses it and names the fix;
    in dequant space both ends hold their own quantized weights and the line ends exactly at B."""
    from flatlens.engine.loop import train

    out = tmp_path / "qat"
    train(tiny_config("quant.enabled=true", "quant.bits=4", "quant.activations=false", "quant.q_step=10",
                      "train.steps=20"), out, verbose=False)
    init, final = fl.load_checkpoint(out / "init.pt"), fl.load_checkpoint(out / "model.pt")
    assert not fl.quant.is_quantization_enabled(init.model) and fl.quant.is_quantization_enabled(final.model)
    lat = Objective(init, split="target", samples=32)
    with pytest.raises(FlatlensError, match="computes with 3 quantizers, all on, the analysed model with 3 quantizers, "
                                            "all off: the line would not end at B's function; use --space dequant"):
        surface(lat, to=out / "model.pt", grid="0:1:2")
    s = surface(Objective(init, split="target", samples=32, space="dequant"), to=out / "model.pt", grid="0:1:2")
    assert s.loss[0] == pytest.approx(lat.loss(), rel=1e-6)  # the dequant copy of init.pt is init.pt
    assert s.loss[1] == pytest.approx(Objective(final, split="target", samples=32).loss(), rel=1e-5)  # ... and B is B
    with pytest.raises(FlatlensError, match="a float and a quantized model cannot share one line"):
        surface(Objective(fl.load_checkpoint(tiny_run / "model.pt"), split="target", samples=32), to=out / "model.pt")


def test_bad_names_settings_and_grid_sizes_are_refused_before_any_work(tmp_path):
    """--name a/b made a nested group no reader listed, --name '' pointed at /landscape itself,
    bn_stats='train' was ignored silently, and a 100000 x 100000 grid was a numpy MemoryError."""
    obj = Objective(_bn_net(), batches=_batches())
    for kwargs, message in (({"name": "a/b"}, "--name 'a/b' is not a landscape name"),
                            ({"name": ""}, "--name '' is not a landscape name"),
                            ({"bn_stats": "train"}, "--bn-stats must be interpolate or origin, got 'train'")):
        with pytest.raises(FlatlensError, match=message):
            surface(obj, 1, "-1:1:3", out=tmp_path / "a.h5", **kwargs)
    with pytest.raises(FlatlensError, match="the grid has 100,000 x 100,000 = 10,000,000,000 points, more than the "
                                            "1,000,000"):
        surface(obj, 2, "-1:1:100000", out=tmp_path / "a.h5")
    assert not (tmp_path / "a.h5").exists()
    assert surface(obj, 1, "-1:1:3", name="fine-1.5x_v2").name == "fine-1.5x_v2"


# -- resume ---------------------------------------------------------------------------------------

def test_rerun_resumes_and_changed_settings_are_refused(tmp_path):
    out = tmp_path / "r.h5"
    net = _bn_net()
    obj = Objective(net, batches=_batches())
    full = surface(obj, 2, "-1:1:9", "-1:1:5", seed=0, out=out, block_size=4)
    again = surface(obj, 2, "-1:1:9", "-1:1:5", seed=0, out=out)
    assert again.attrs["last_session_points"] == 0 and again.attrs["sessions"] == 2
    assert np.array_equal(again.loss, full.loss)
    with pytest.raises(StoreError, match="norm=.*'layer'.*--overwrite"):
        surface(obj, 2, "-1:1:9", "-1:1:5", seed=0, norm="layer", out=out)
    with pytest.raises(StoreError, match="seed"):
        surface(obj, 2, "-1:1:9", "-1:1:5", seed=1, out=out)
    with pytest.raises(StoreError, match="x="):
        surface(obj, 2, "-1:1:11", "-1:1:5", seed=0, out=out)
    s = surface(obj, 2, "-1:1:9", "-1:1:5", seed=0, norm="layer", out=out, overwrite=True)
    assert s.attrs["norm"] == "layer" and s.attrs["sessions"] == 1

    # an interrupted run (killed after a few blocks) keeps whole blocks and a complete coarse level
    part = tmp_path / "p.h5"
    obj2 = Objective(net, batches=_batches())
    calls = {"n": 0}
    real = obj2.loss_and_accuracy

    def flaky():
        calls["n"] += 1
        if calls["n"] > 4 + 12:  # 4 warm-up passes, then 12 points = 3 blocks of 4
            raise KeyboardInterrupt
        return real()

    obj2.loss_and_accuracy = flaky
    with pytest.raises(KeyboardInterrupt):
        surface(obj2, 2, "-1:1:9", "-1:1:5", seed=0, out=part, block_size=4)
    assert model_state_hash(net) == model_state_hash(_bn_net())  # restored even when interrupted
    sizes = np.cumsum([len(b) for b in schedule(9, 5).blocks(np.zeros((5, 9), bool), 4)])
    expect = int(sizes[sizes <= 12].max())  # the blocks finished before the 13th point
    with h5py.File(part, "r") as f:
        g = f["landscape/random_2d"]
        n_done = int(g["done"][()].sum())
        assert n_done == expect and int(g.attrs["complete_level"]) >= 1
        assert np.isnan(g["loss"][()][~g["done"][()]]).all()
    obj2.loss_and_accuracy = real
    resumed = surface(obj2, 2, "-1:1:9", "-1:1:5", seed=0, out=part, block_size=4)
    assert resumed.attrs["last_session_points"] == 45 - expect
    assert np.array_equal(resumed.loss, full.loss) and np.array_equal(resumed.loss_stderr, full.loss_stderr)


def test_costs_and_prediction_are_logged_and_stored(tmp_path):
    lines: list[str] = []
    s = surface(Objective(_bn_net(), batches=_batches()), 1, "-1:1:7", out=tmp_path / "c.h5", log=lines.append)
    assert "predicted 7 forward passes" in lines[0] and "ETA" not in lines[0] and "≈" in lines[0]
    assert s.attrs["cost_n_forward"] == 7 and s.attrs["cost_n_warmup"] == 4 and s.attrs["cost_seconds"] > 0
    assert s.attrs["seconds_per_point"] > 0 and s.attrs["last_session_predicted_seconds"] >= 0


def test_registered_as_a_sharpness_measure(tiny_run, tmp_path):
    import argparse

    from flatlens import store
    from flatlens.measure.landscape import add_measure_arguments
    from flatlens.measure.registry import REGISTRY, RunContext

    m = REGISTRY["landscape"]
    p = argparse.ArgumentParser()
    add_measure_arguments(p.add_argument_group("landscape"))
    args = p.parse_args(["--landscape-range=-1:1:5", "--landscape-dim", "2"])
    args.seed, args.include, args.params, args.exclude = 0, "weights", None, None
    obj = Objective(fl.load_checkpoint(tiny_run / "model.pt"), split="target", samples=32)
    assert m.estimate(obj, args).n_forward == 25 + 4
    out = tmp_path / "s.h5"
    store.ensure_file(out, {"checkpoint_sha256": obj.run.sha256})
    res = m.run(obj, args, RunContext(out=out, is_main=True, progress=lambda *a, **k: None, log=lambda _m: None))
    assert res.written and res.group == "landscape/random_2d" and res.summary
    assert store.read(out, "landscape/random_2d")["loss"].shape == (5, 5)
