"""The exact Gauss-Newton trace (``trace(method="gauss-newton")``): equal to the dense Hessian's diagonal on
piecewise-linear nets (BN in eval mode, residual + pooling, quantized weights in dequant and latent space,
4-bit activation quantizers), refused
with a one-line error where the identity fails (tanh, GroupNorm), equal to diag(GGN) when the check is
skipped, side-effect free, seeded, stored, and on the CLI."""

from __future__ import annotations

import h5py
import pytest
import torch
from torch import nn

import flatlens as fl
from conftest import flatlens_cmd
from flatlens.errors import FlatlensError
from flatlens.measure import gauss_newton as GN
from flatlens.measure.objective import Objective
from flatlens.measure.params import model_state_hash
from test_hessian import F64, _bn_cnn, _data, _mlp, _quant_cnn, dense_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


class _ResBlockNet(nn.Module):
    """Conv -> eval BN -> leaky ReLU, a residual block, max- and average pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 1 * 1 + 4 * 9, 5)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.bn(self.stem(x)), 0.1)
        h = torch.relu(h + self.c2(torch.relu(self.bn1(self.c1(h)))))
        a = nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
        m = nn.functional.max_pool2d(h, 2).flatten(1)
        return self.head(torch.cat([a, m], dim=1))


def _resnet_like():
    net = _ResBlockNet().double()
    with torch.no_grad():
        for bn in (net.bn, net.bn1):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
    return net.eval()


def _gn_cnn():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).double().eval()


def _act_quant_cnn():
    """Weights and activations quantized to 4 bits (LSQ, straight-through): still piecewise linear."""
    from flatlens.quant import attach_quantizers

    net = _bn_cnn()
    attach_quantizers(net, enabled=True, bits=4, per_channel=True, activations=True, act_bits=4, act_signed=True)
    net.train()
    with torch.no_grad():
        net(_data()[0][0])  # initialise the activation step sizes (and BN stats) from a batch
    return net.eval()


PL_CASES = {
    "bn_cnn_all": lambda: Objective(_bn_cnn(), batches=_data(), include=("all",)),
    "resnet_like": lambda: Objective(_resnet_like(), batches=_data(), include=("all",)),
    "quant_dequant": lambda: Objective(_quant_cnn(), batches=_data(), space="dequant"),
    "act_quant_dequant": lambda: Objective(_act_quant_cnn(), batches=_data(), space="dequant"),
}


@pytest.mark.parametrize("case", sorted(PL_CASES))
def test_exact_diagonal_trace_and_layer_traces_equal_the_dense_hessian(case):
    obj = PL_CASES[case]()
    H = dense_hessian(obj)
    gn = GN.hessian_diagonal(obj)
    assert gn.check is not None and gn.check.passed and gn.check.max_ratio <= 1e-10
    assert torch.allclose(gn.diagonal, H.diagonal(), rtol=1e-9, atol=1e-12 * float(H.diagonal().abs().max()))
    tr = fl.hessian.trace(obj, "gauss-newton")
    assert tr.estimate == pytest.approx(float(torch.trace(H)), rel=1e-10)
    assert tr.converged and tr.stderr == 0 and tr.ci_low == tr.ci_high == tr.estimate and tr.n_hvp == 0
    n_classes = 5
    assert tr.details["n_backward"] == obj.n_samples * (n_classes - 1)  # the softmax Hessian has rank C - 1
    lt = tr.layers
    i = 0
    for name, n, est in zip(lt.names, lt.numel, lt.estimates.tolist()):
        assert est == pytest.approx(float(H.diagonal()[i:i + n].sum()), rel=1e-9, abs=1e-13), name
        i += n
    assert i == obj.space.numel and torch.all(lt.stderr == 0)


class _ItemNet(nn.Module):
    """Piecewise linear, but its forward reads a value out of a tensor (``.item()``), which ``vmap`` cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _bn_cnn()

    def forward(self, x):
        if float(x.abs().amax().item()) > 1e6:  # data-dependent Python control flow
            x = x / 1e6
        return self.body(x)


@pytest.mark.parametrize("case", ["bn_cnn_all", "act_quant_dequant"])
def test_vmap_and_loop_give_the_same_diagonal_at_every_chunk_size(case):
    obj = PL_CASES[case]()
    loop = GN.hessian_diagonal(obj, per_sample="loop")
    assert loop.per_sample == "loop"
    for chunk in (None, 1, 3, 64):  # 3 does not divide the 16-sample batches; 64 is larger than them
        vm = GN.hessian_diagonal(obj, per_sample="vmap", chunk=chunk)
        assert vm.per_sample == "vmap" and vm.n_backward == loop.n_backward
        assert torch.allclose(vm.diagonal, loop.diagonal, rtol=1e-12, atol=1e-15 * float(loop.diagonal.abs().max()))
    assert GN.predicted_seconds(obj) > 0 and GN.predicted_seconds(obj, per_sample="loop") > 0
    auto = GN.hessian_diagonal(obj)  # times both forms on the first samples, then keeps the faster
    assert auto.per_sample in ("vmap", "loop") and auto.selection.startswith("timed: loop ") and "vmap" in auto.selection
    assert torch.allclose(auto.diagonal, loop.diagonal, rtol=1e-12, atol=1e-15 * float(loop.diagonal.abs().max()))
    assert auto.n_backward == loop.n_backward


def test_the_timed_per_sample_steps_wait_for_the_device(monkeypatch):
    """``auto`` keeps the faster of vmap and loop by timing them, and ``predicted_seconds`` scales that time;
    on a GPU the timer read right after the call measured the kernel launches (the work is queued). Each
    timed step is now bracketed by a device synchronisation (recorded here on CPU, where it is a no-op)."""
    obj = PL_CASES["bn_cnn_all"]()
    synced: list[str] = []
    monkeypatch.setattr(GN, "sync_device", lambda device: synced.append(torch.device(device).type))
    GN.predicted_seconds(obj)
    assert synced == ["cpu"] * 8  # 2 timed runs of each of the 2 forms, a wait before and after each
    synced.clear()
    GN.hessian_diagonal(obj, per_sample="loop")  # loop asked: timed twice (its ETA), then untimed
    assert synced == ["cpu"] * 4


def test_auto_falls_back_to_the_loop_where_vmap_cannot_batch_the_model():
    obj = Objective(_ItemNet().double().eval(), batches=_data(), include=("all",))
    H = dense_hessian(obj)
    gn = GN.hessian_diagonal(obj)
    assert gn.per_sample.startswith("loop (vmap failed: ") and "\n" not in gn.per_sample
    assert torch.allclose(gn.diagonal, H.diagonal(), rtol=1e-9, atol=1e-12 * float(H.diagonal().abs().max()))
    tr = fl.hessian.trace(obj, "gauss-newton")
    assert tr.details["per_sample"] == gn.per_sample
    with pytest.raises(FlatlensError, match="per_sample='vmap' failed on this model .*pass per_sample='loop'"):
        GN.hessian_diagonal(obj, per_sample="vmap")
    assert GN.predicted_seconds(obj) > 0  # times the loop instead
    with pytest.raises(FlatlensError, match="per_sample='batched'; pass one of auto, vmap, loop"):
        GN.hessian_diagonal(obj, per_sample="batched")
    with pytest.raises(FlatlensError, match="chunk=0; pass a positive number"):
        GN.hessian_diagonal(obj, chunk=0)


def test_qgen_noise_terms_are_exact_in_dequant_space():
    obj = PL_CASES["quant_dequant"]()
    H = dense_hessian(obj)
    q = fl.hessian.trace(obj, "gauss-newton").layers.quant
    from flatlens.quant import iter_quantizers

    steps = {name.rpartition(".")[0]: qq.step_size.detach().double() for name, qq in iter_quantizers(obj.model)}
    i = 0
    for k, (layer, p) in enumerate(zip(q.names, obj.space.params)):
        diag = H.diagonal()[i:i + p.numel()].reshape(p.shape[0], -1).sum(dim=1)
        assert float(q.noise_terms[k]) == pytest.approx(float((steps[layer] ** 2 / 24 * diag).sum()), rel=1e-9)
        assert float(q.stderr[k]) == 0.0
        i += p.numel()


def test_latent_space_is_the_masked_dequant_diagonal():
    """Latent space (straight-through surrogate): H_latent = M H_dequant M with M the unclipped mask."""
    net = _quant_cnn()
    from flatlens.quant import iter_quantizers

    with torch.no_grad():  # smaller steps clip the largest weights, so the mask is not all ones
        for _, q in iter_quantizers(net, "weight"):
            q.step_size.mul_(0.4)
    lat = Objective(net, batches=_data(), space="latent")
    deq = Objective(net, batches=_data(), space="dequant")
    masks = []
    for (_, q), p in zip(iter_quantizers(net, "weight"), lat.space.params):
        r = p.detach() / q.step_size.detach().reshape(-1, *[1] * (p.dim() - 1))
        masks.append(((r >= -q.q_n) & (r <= q.q_p)).to(F64).reshape(-1))
    m = torch.cat(masks)
    assert 0 < m.sum() < m.numel()  # some weights are clipped: the mask matters
    expected = m * dense_hessian(deq).diagonal()
    got = GN.hessian_diagonal(lat).diagonal
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def _dense_ggn_diagonal(obj: Objective) -> torch.Tensor:
    names = obj.space.names
    base = {n: p.detach().clone() for n, p in obj.model.named_parameters()}
    x = torch.cat([b[0] for b in obj.batches])

    def logits(flat):
        params = dict(base)
        params.update(dict(zip(names, obj.space.unflatten(flat))))
        return torch.func.functional_call(obj.model, params, (x,))

    theta = obj.space.origin_vector().clone()
    J = torch.autograd.functional.jacobian(logits, theta)  # n x C x P
    p = torch.softmax(logits(theta).detach(), dim=1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("icp,icd,idp->p", J, A, J) / x.shape[0]


@pytest.mark.parametrize("make", [_mlp, _gn_cnn], ids=["tanh_mlp", "groupnorm_cnn"])
def test_non_piecewise_linear_nets_are_refused_and_unchecked_gives_the_ggn(make):
    obj = Objective(make(), batches=_data(), include=("all",))
    with pytest.raises(FlatlensError) as e:
        fl.hessian.trace(obj, "gauss-newton")
    msg = str(e.value)
    assert "\n" not in msg and "piecewise-linear" in msg and "'krylov'" in msg and "tensor '" in msg
    chk = GN.check_piecewise_linear(obj)
    assert not chk.passed and chk.max_ratio > 1e-2
    # without the check the result is diag(GGN), which here differs from diag(H)
    gn = GN.hessian_diagonal(obj, check=False)
    ggn = _dense_ggn_diagonal(obj)
    assert torch.allclose(gn.diagonal, ggn, rtol=1e-9, atol=1e-13)
    H = dense_hessian(obj)
    assert (gn.diagonal - H.diagonal()).abs().max() > 1e-3 * H.diagonal().abs().max()


def test_side_effect_free_seeded_stored_and_operator_refused(tmp_path):
    obj = PL_CASES["bn_cnn_all"]()
    net = obj.model
    net.train()  # the caller's flags come back
    before = model_state_hash(net)
    rng = torch.get_rng_state()
    a = fl.hessian.trace(obj, "gauss-newton", seed=5, per_sample="vmap")  # pinned: auto chooses by timing
    b = fl.hessian.trace(obj, "gauss-newton", seed=5, per_sample="vmap")
    assert model_state_hash(net) == before and torch.equal(torch.get_rng_state(), rng)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert a.estimate == b.estimate and torch.equal(a.layers.estimates, b.layers.estimates)
    assert a.details == b.details
    assert obj._hvp is None  # no HVP is spent, so no HVP engine (kernel selection) is built
    path = fl.hessian.write(tmp_path / "a.h5", a)
    r = fl.hessian.read(path)
    at = r["attrs"]
    assert at["trace_method"] == "gauss-newton" and at["trace_check"] and at["trace_check_samples"] == 2
    assert at["trace_n_backward"] == a.details["n_backward"] and at["trace_check_max_ratio"] <= 1e-10
    assert at["trace_hvp_kernel"] == "" and at["trace_n_hvp"] == 0
    assert r["trace"] == a.estimate and r["trace_samples"].shape == (0,)
    assert list(r["layer_traces"]) == a.layers.estimates.tolist()
    with pytest.raises(FlatlensError, match="needs an Objective"):
        fl.hessian.trace(torch.eye(3, dtype=F64), "gauss-newton")


def test_sharpness_cli_gauss_newton_trace(tiny_run, tmp_path):
    out = tmp_path / "gn.h5"
    res = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), "--measures", "trace", "--trace-method", "gauss-newton",
                       "--samples", "48", "--batch-size", "16", "--progress-every", "0", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "[trace] predicted cost: 0 HVPs" in res.stdout and "for each of 48 samples" in res.stdout
    summary = res.stdout[res.stdout.index("\nsummary"):]
    assert "exact: Gauss-Newton identity" in summary and "per-sample vector-Jacobian products (" in summary
    with h5py.File(out, "r") as f:
        g = f["hessian"]
        assert g.attrs["trace_method"] == "gauss-newton" and g.attrs["trace_n_hvp"] == 0
        assert g.attrs["trace_n_backward"] == 48 * 9  # 10 digit classes: C - 1 = 9 per sample
        assert g.attrs["trace_per_sample"] in ("vmap", "loop")  # auto: whichever timed faster
        assert g.attrs["trace_per_sample_selection"].startswith("timed: loop ")
        gn_trace = float(g["trace"][()])
    pinned = flatlens_cmd("sharpness", str(tiny_run / "model.pt"), "--measures", "trace", "--trace-method", "gauss-newton",
                          "--gauss-newton-per-sample", "loop", "--samples", "48", "--batch-size", "16", "--progress-every", "0",
                          "--out", str(tmp_path / "loop.h5"))
    assert pinned.returncode == 0, pinned.stderr
    with h5py.File(tmp_path / "loop.h5", "r") as f:
        assert f["hessian"].attrs["trace_per_sample"] == "loop" and f["hessian"].attrs["trace_per_sample_selection"] == ""
        assert float(f["hessian/trace"][()]) == pytest.approx(gn_trace, rel=1e-5)  # float32 model: rounding only
    # the same checkpoint and samples by the default estimator: the exact value lies inside its interval (3.5 stderr)
    run = fl.load_checkpoint(tiny_run / "model.pt")
    obj = Objective(run, samples=48, batch_size=16)
    hp = fl.hessian.trace(obj, rtol=None, max_hvp=90, seed=2, layers="none")
    assert abs(hp.estimate - gn_trace) <= 3.5 * hp.stderr, (hp.estimate, gn_trace, hp.stderr)


def test_softmax_hessian_factor_reconstructs_the_softmax_hessian():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g, dtype=F64) * torch.tensor([0.1, 1, 3, 10, 40, 800], dtype=F64)[:, None]
    B, keep = GN.softmax_hessian_factor(logits)
    p = torch.softmax(logits, dim=1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    rebuilt = torch.einsum("icj,idj->icd", B * keep[:, None, :], B * keep[:, None, :])
    assert torch.allclose(rebuilt, A, rtol=0, atol=1e-15)
    assert (keep.sum(1) <= 6).all() and keep[0].sum() == 6  # at most C - 1; all C - 1 when no class underflows
    assert keep[5].sum() < 6  # logits x 800: most probabilities underflow, their directions are dropped
