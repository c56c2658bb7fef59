"""flatlens.hessian against dense Hessians: eigenvalues, traces, per-layer and QGen terms, density,
quantized models (dequant exact, latent vs finite differences), seeds, no side effects."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatlens as fl
from conftest import flat_loss
from flatlens.errors import FlatlensError
from flatlens.measure.hvp import HessianVectorProduct, make_loss_fn
from flatlens.measure.objective import Objective
from flatlens.measure.params import model_state_hash

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=50, shape=(1, 6, 6), classes=5, seed=0, bs=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]  # ragged last batch


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 6), nn.Tanh(), nn.Linear(6, 5)).double().eval()


def _bn_cnn():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5)).double()
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.05]))
        net[1].running_var.copy_(torch.tensor([0.8, 1.3, 0.6]))
    return net.eval()


def _quant_cnn():
    from flatlens.quant import attach_quantizers

    net = _bn_cnn()
    attach_quantizers(net, enabled=True, bits=4, per_channel=True)
    return net.eval()


def dense_hessian(obj: Objective) -> torch.Tensor:
    """torch.autograd.functional.hessian of the Objective's mean loss w.r.t. its parameter space."""
    return torch.autograd.functional.hessian(flat_loss(obj), obj.space.origin_vector().clone())


CASES = {
    "mlp": lambda: Objective(_mlp(), batches=_data(), include=("all",), kernel="graph_reuse"),
    "bn_cnn": lambda: Objective(_bn_cnn(), batches=_data(), kernel="double_backward"),
    "quant_dequant": lambda: Objective(_quant_cnn(), batches=_data(), space="dequant", kernel="graph_reuse"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_eigenvalues_and_trace_match_dense_hessian(case):
    obj = CASES[case]()
    H = dense_hessian(obj)
    ev = torch.linalg.eigvalsh(H)
    eig = fl.hessian.eigenvalues(obj, k=3, k_bottom=1, tol=1e-7, max_iter=obj.space.numel)
    assert eig.all_converged and eig.n_hvp <= obj.space.numel
    top3 = ev.flip(0)[:3]
    assert torch.allclose(eig.values, top3, rtol=1e-4, atol=0), (eig.values, top3)
    assert abs(float(eig.bottom[0] - ev[0])) <= 1e-4 * float(ev.abs().max())
    assert torch.all(eig.residuals <= 1e-7 * eig.values.abs() + 1e-12)
    # trace: within 3 standard errors of the dense answer (fixed budget), layer traces too
    tr = fl.hessian.trace(obj, rtol=None, max_hvp=60, seed=3)
    truth = float(torch.trace(H))
    assert tr.n_hvp == 60 and tr.stderr > 0
    assert abs(tr.estimate - truth) <= 3 * tr.stderr, (tr.estimate, truth, tr.stderr)
    lt = tr.layers
    assert lt is not None and lt.estimates.sum().item() == pytest.approx(tr.estimate, rel=1e-10, abs=1e-10)
    assert_layer_traces_near_dense(lt, H)
    assert obj.space.numel == sum(lt.numel)


def test_gap_stop_reports_the_estimate_it_stopped_on():
    """stop="gap" stops on the r^2/gap estimate; the result carries that estimate (and still the certificate),
    the summary shows both, and the values are within tol of the dense eigenvalues."""
    obj = CASES["bn_cnn"]()
    ev = torch.linalg.eigvalsh(dense_hessian(obj))
    res = fl.hessian.eigenvalues(obj, k=3, k_bottom=1, tol=1e-3, seed=4)
    gap = fl.hessian.eigenvalues(obj, k=3, k_bottom=1, tol=1e-3, seed=4, stop="gap")
    assert gap.all_converged and gap.stop == "gap" and gap.n_hvp <= res.n_hvp
    assert gap.gap_rel_error_estimate.shape == (3,) and gap.bottom_gap_error_estimate.shape == (1,)
    assert torch.all(gap.gap_rel_error_estimate <= 1e-3 * (1 + 1e-12))
    assert torch.all(gap.gap_rel_error_estimate <= gap.rel_error_bound)  # never looser than the certificate
    assert torch.all(gap.bottom_gap_error_estimate <= gap.bottom_residuals)
    assert torch.all((gap.values - ev.flip(0)[:3]).abs() / ev.flip(0)[:3] <= 1e-3)
    rows = dict(gap.summary())
    assert "estimated (r^2/gap)" in rows["lambda_1"] and "certified" in rows["lambda_1"]
    assert "estimated" in rows["lambda_min"]
    assert "estimated" not in dict(res.summary())["lambda_1"]  # the residual rule prints its certificate only
    assert torch.all(res.gap_rel_error_estimate <= res.rel_error_bound)


def assert_layer_traces_near_dense(lt, H: torch.Tensor) -> None:
    """Every block's trace estimate within 3.5 of its standard errors of the dense block trace."""
    diag = torch.diagonal(H)
    i = 0
    for name, n, est, se in zip(lt.names, lt.numel, lt.estimates.tolist(), lt.stderr.tolist()):
        block = float(diag[i:i + n].sum())
        i += n
        assert abs(est - block) <= 3.5 * se + 1e-9, (name, est, block, se)


def test_trace_estimators_and_stopping_rule():
    obj = CASES["mlp"]()
    truth = float(torch.trace(dense_hessian(obj)))
    for method in ("krylov", "hutchpp", "xtrace", "hutchinson"):
        rtol = 0.1 if method == "hutchinson" else 0.05  # no variance reduction: needs far more probes
        # krylov's basis would span this 257-dimensional space (exact trace, below): keep it to max_hvp // 3
        tr = fl.hessian.trace(obj, method, rtol=rtol, max_hvp=400, seed=1,
                              sketch_size=133 if method == "krylov" else None)
        assert tr.converged and tr.rel_half_width <= rtol and abs(tr.estimate - truth) <= 3.5 * tr.stderr, method
        assert tr.n_hvp <= 400 and tr.method == method
    # Hutch++ total equals trace_estimators.hutchpp with the same seeded generator (same probes, same CI)
    from flatlens.measure import trace_estimators
    from flatlens.seeding import generator

    a = fl.hessian.trace(obj, "hutchpp", rtol=0.02, max_hvp=99, seed=5, layers="none")
    b = trace_estimators.hutchpp(obj.operator(), rtol=0.02, max_matvec=99, generator=generator(5, "trace", 0))
    assert a.n_hvp == b.n_matvec and a.estimate == pytest.approx(b.estimate, rel=1e-12)
    assert a.stderr == pytest.approx(b.stderr, rel=1e-8)
    # a sketch or Krylov basis spanning the whole space makes the trace exact (stderr 0)
    ex = fl.hessian.trace(obj, "hutchpp", max_hvp=3 * obj.space.numel, sketch_size=obj.space.numel)
    assert ex.stderr == 0 and ex.estimate == pytest.approx(truth, rel=1e-10)
    # krylov: a single start vector spans one direction per distinct eigenvalue, so the run reaches an
    # invariant subspace short of n where eigenvalues repeat (the null space here); it restarts from a
    # Gaussian vector orthogonal to the basis and goes on, so the basis spans the space: exact, no probe
    ex = fl.hessian.trace(obj, max_hvp=obj.space.numel + 20, sketch_size=obj.space.numel)
    assert ex.stderr == 0 and ex.estimate == pytest.approx(truth, rel=1e-10)
    assert ex.sketch_size == obj.space.numel and ex.n_hvp == obj.space.numel
    # ... and it does so by default when the budget covers the space (a step-size space, a small net):
    # the basis gets every dimension instead of max_hvp // 3 (which left a +-7 % interval at max_hvp = n)
    for case in ("mlp", "bn_cnn"):
        o = CASES[case]()
        n, t = o.space.numel, float(torch.trace(dense_hessian(o)))
        ex = fl.hessian.trace(o, max_hvp=n)
        assert ex.n_hvp <= n and ex.sketch_size > n // 3, (case, ex.n_hvp, ex.sketch_size)
        assert ex.estimate == pytest.approx(t, rel=1e-10) and ex.ci_high - ex.ci_low <= 1e-10 * t, case
        # the run meets an invariant subspace (after 251 of 257 steps on the MLP, 221 of 267 on the CNN) and
        # restarts: the basis spans the space, so the trace is exact and converged in n HVPs. (It used to
        # stop there and probe the rest; the MLP's budget then left 6 of the 10 probes the rule wants.)
        assert ex.converged and ex.stderr == 0 and ex.sketch_size == n and ex.n_hvp == n, case


def test_least_squares_hessian_is_xtx_over_n():
    g = torch.Generator().manual_seed(2)
    N, d = 40, 8
    X = torch.randn(N, d, generator=g, dtype=F64)
    y = torch.randn(N, generator=g, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double().eval()
    loss_fn = make_loss_fn(model, lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2, reduction="none")
    eng = HessianVectorProduct(loss_fn, dict(model.named_parameters()), [(X[:25], y[:25]), (X[25:], y[25:])],
                               kernel="graph_reuse")
    truth = X.T @ X / N
    ev = torch.linalg.eigvalsh(truth)
    eig = fl.hessian.eigenvalues(eng, k=3, k_bottom=2, tol=1e-12, max_iter=d)
    assert torch.allclose(eig.values, ev.flip(0)[:3], rtol=1e-10) and torch.allclose(eig.bottom, ev[:2], rtol=1e-10)
    tr = fl.hessian.trace(eng, max_hvp=3 * d, sketch_size=d)  # sketch = whole space: exact
    assert tr.estimate == pytest.approx(float(torch.trace(truth)), rel=1e-12) and tr.stderr == 0
    dens = fl.hessian.density(eng, n_probes=2, n_steps=d)  # d steps span the space: the nodes ARE the spectrum
    for nodes in dens.nodes:
        assert torch.allclose(nodes.sort().values, ev, rtol=1e-8)
    blocks = [("first", 3), ("rest", 5)]
    bt = fl.hessian.trace(eng, max_hvp=3 * d, sketch_size=d, blocks=blocks)
    assert bt.layers.names == ["first", "rest"]
    assert torch.allclose(bt.layers.estimates, torch.stack([truth.diagonal()[:3].sum(), truth.diagonal()[3:].sum()]),
                          rtol=1e-10)


def dens_moment(d, p):
    nodes = torch.nan_to_num(d.nodes, nan=0.0)
    return float((d.weights * nodes**p).sum(dim=1).mean())


def test_density_against_dense_spectrum():
    obj = CASES["bn_cnn"]()
    ev = torch.linalg.eigvalsh(dense_hessian(obj))
    d = fl.hessian.density(obj, n_probes=4, n_steps=40, seed=2)
    assert d.n_hvp == 160 and d.values.shape == d.grid.shape
    step = float(d.grid[1] - d.grid[0])
    assert float(d.values.sum()) * step == pytest.approx(1.0, abs=1e-3)
    lo, hi = d.spectrum_bounds
    assert lo <= float(ev[0]) + 1e-6 and hi >= float(ev[-1]) - 1e-6
    assert lo >= float(ev[0]) - 0.05 * float(ev.abs().max()) and hi <= float(ev[-1]) * 1.05
    # first moment = trace / n, unbiased over probes; the quadrature is exact for it
    assert dens_moment(d, 1) == pytest.approx(float(ev.mean()), abs=3 * float(ev.std()) / math.sqrt(4))
    assert d.grid_mass == pytest.approx(1.0, abs=1e-3) and "density curve" not in dict(d.summary())
    # a grid coarser than the kernel: the curve is not a density, and the summary says so (it said nothing)
    coarse = fl.hessian.density(obj, n_probes=4, n_steps=40, seed=2, grid=11)
    assert torch.equal(coarse.nodes, d.nodes) and abs(coarse.grid_mass - 1.0) > 0.01
    assert "refine --density-grid" in dict(coarse.summary())["density curve"]
    assert "(4 probes x 40 steps," in dict(d.summary())["spectrum"]
    one = fl.hessian.density(obj, n_probes=1, n_steps=5, seed=2)  # PyHessian's split, one probe: said so
    assert "(1 probe x 5 steps," in dict(one.summary())["spectrum"]


def test_quantized_dequant_space_and_qgen_noise_terms():
    obj = CASES["quant_dequant"]()
    assert "float copy" in obj.describe()["differentiated"]
    H = dense_hessian(obj)
    n = obj.space.numel
    tr = fl.hessian.trace(obj, max_hvp=3 * n, sketch_size=n)  # exact: every block and term is exact
    q = tr.layers.quant
    assert q is not None and q.names == ["0", "4"] and q.weights == ["0.weight", "4.weight"]
    assert q.bits == [4, 4] and all(q.per_channel) and not any(q.enabled)  # dequant copy: quantizers off
    from flatlens.quant import iter_quantizers

    steps = {name.rpartition(".")[0]: qq.step_size.detach().double() for name, qq in iter_quantizers(obj.model)}
    i = 0
    for layer, p in zip(q.names, (obj.space.params[0], obj.space.params[1])):
        C = p.shape[0]
        diag = H.diagonal()[i:i + p.numel()].reshape(C, -1).sum(dim=1)
        expected = float((steps[layer] ** 2 / 24 * diag).sum())
        k = q.names.index(layer)
        assert float(q.noise_terms[k]) == pytest.approx(expected, rel=1e-9)
        assert float(q.weight_traces[k]) == pytest.approx(float(diag.sum()), rel=1e-9)
        i += p.numel()
    # Monte-Carlo check of the meaning: E[d^T H d]/2 for uniform rounding noise of the layer's steps
    g = torch.Generator().manual_seed(0)
    w = torch.cat([(steps[layer].reshape(-1, *[1] * (p.dim() - 1)) * torch.ones_like(p)).reshape(-1)
                   for layer, p in zip(q.names, obj.space.params)])
    D = (torch.rand(20000, n, generator=g, dtype=F64) - 0.5) * w
    mc = float(0.5 * ((D @ H) * D).sum(1).mean())
    assert q.total == pytest.approx(mc, rel=0.05)


def test_quantized_latent_space_hvp_matches_finite_differences_of_gradients():
    """Latent space differentiates the straight-through surrogate: w_q(w) = q(w0) + m * (w - w0) with
    m the unclipped mask. Its gradient's finite differences equal the autograd HVP."""
    net = _quant_cnn()
    batches = _data()
    obj = Objective(net, batches=batches, space="latent", kernel="double_backward")
    assert "straight-through" in obj.differentiated
    deq = Objective(net, batches=batches, space="dequant", kernel="double_backward")
    from flatlens.quant import iter_quantizers

    masks = []
    for (name, q), p in zip(iter_quantizers(net, "weight"), obj.space.params):
        s = q.step_size.detach().reshape(-1, *[1] * (p.dim() - 1))
        r = p.detach() / s
        masks.append(((r >= -q.q_n) & (r <= q.q_p)).to(F64).reshape(-1))
    m = torch.cat(masks)
    v = torch.randn(obj.space.numel, generator=torch.Generator().manual_seed(4), dtype=F64)
    hv = obj.hvp(v)
    eps = 1e-5
    wq = deq.space.origin_vector()
    with torch.no_grad():
        deq.space.set_offset([deq.space.unflatten(m * v)], [eps])
        gp = deq.grad()
        deq.space.set_offset([deq.space.unflatten(m * v)], [-eps])
        gm = deq.grad()
        deq.space.restore()
    fd = m * (gp - gm) / (2 * eps)
    assert torch.equal(deq.space.origin_vector(), wq)
    assert (hv - fd).abs().max() <= 1e-7 * fd.abs().max(), float((hv - fd).abs().max())
    # and so the latent eigenvalues are those of the masked dequant-space Hessian
    Hd = dense_hessian(deq)
    ev = torch.linalg.eigvalsh(m[:, None] * Hd * m[None, :])
    eig = fl.hessian.eigenvalues(obj, k=2, tol=1e-8, max_iter=obj.space.numel)
    assert torch.allclose(eig.values, ev.flip(0)[:2], rtol=1e-6)
    assert "straight-through" in eig.provenance["differentiated"] and eig.provenance["space"] == "latent"


@pytest.mark.parametrize("kernel", ["double_backward", "graph_reuse", "forward_over_reverse"])
def test_scales_space_hessian_is_the_surrogate_hessian_in_the_step_sizes(kernel):
    """Scales space differentiates the straight-through surrogate in the step sizes: each quantized weight
    moves as ``w_q + r * ds`` (``r = round(w/s) - w/s`` inside the range, ``-Q_N``/``Q_P`` outside), so the
    Hessian is ``J^T H_dq J`` with ``H_dq`` the dequant-space Hessian. Without LSQ's gradient scale ``g``:
    with it (as before) every block came out multiplied by ``g_l g_m`` (~1e-3 here) and the eigenvalues too."""
    from flatlens.quant import iter_quantizers

    net = _quant_cnn()
    batches = _data()
    obj = Objective(net, batches=batches, space="scales", kernel=kernel)
    deq = Objective(net, batches=batches, space="dequant", kernel="double_backward")
    assert obj.space.names == ["0.weight_quantizer.step_size", "4.weight_quantizer.step_size"]
    Hd = dense_hessian(deq)
    cols = []
    offset = 0
    for (name, q), p in zip(iter_quantizers(net, "weight"), deq.space.params):
        s = q.step_size.detach().reshape(-1, *[1] * (p.dim() - 1))
        w = dict(net.named_parameters())[name.rsplit(".", 1)[0] + ".weight"].detach()
        y = w / s
        inside = (y >= -q.q_n) & (y <= q.q_p)
        r = torch.where(inside, torch.round(y) - y, torch.clamp(torch.round(y), -q.q_n, q.q_p)).to(F64)
        for c in range(s.numel()):
            col = torch.zeros(deq.space.numel, dtype=F64)
            col[offset:offset + p.numel()] = (r * (torch.arange(p.shape[0]) == c).reshape(-1, *[1] * (p.dim() - 1))).reshape(-1)
            cols.append(col)
        offset += p.numel()
    J = torch.stack(cols, 1)
    H_true = J.T @ Hd @ J
    n = obj.space.numel
    H = torch.stack([obj.hvp(e) for e in torch.eye(n, dtype=F64)], 1)
    assert torch.allclose(H, H_true, rtol=1e-8, atol=1e-10 * float(H_true.abs().max())), float((H - H_true).abs().max())
    eig = fl.hessian.eigenvalues(obj, k=2, tol=1e-8, max_iter=n)
    assert torch.allclose(eig.values, torch.linalg.eigvalsh(H_true).flip(0)[:2], rtol=1e-7)
    assert float(H_true.abs().max()) > 1e-2  # the loss's own curvature, not LSQ's preconditioned g^2-scaled one
    assert all(q.gradient_scale_on for _, q in iter_quantizers(net, "weight"))  # training's setting is back
    # the low-level engine on the same model and step sizes gives the same Hessian (make_forward_fn)
    steps = {n: p for n, p in net.named_parameters() if n in obj.space.names}
    eng = HessianVectorProduct(make_loss_fn(net), steps, batches, kernel=kernel)
    assert torch.allclose(torch.stack([eng.hvp(e) for e in torch.eye(n, dtype=F64)], 1), H_true, rtol=1e-8,
                          atol=1e-10 * float(H_true.abs().max()))


def test_a_tol_below_float32_rounding_says_so_instead_of_plain_converged():
    """tol=1e-9 on a float32 model stops at the noise floor 100 eps max|theta| (~1e-5 relative): the summary
    said just 'converged' next to a certified bound 10^4 x tol."""
    net = _mlp().float()
    obj = Objective(net, batches=[(x.float(), y) for x, y in _data()], include=("all",), kernel="double_backward")
    eig = fl.hessian.eigenvalues(obj, k=1, tol=1e-9, max_iter=obj.space.numel)
    assert eig.all_converged and eig.at_rounding_floor and float(eig.rel_error_bound[0]) > 1e-9
    assert "converged to the rounding floor" in eig.summary()[-1][1]
    ok = fl.hessian.eigenvalues(obj, k=1, tol=1e-3)
    assert ok.all_converged and not ok.at_rounding_floor and ok.summary()[-1][1].endswith("converged")


def test_a_float32_certificate_never_claims_less_than_the_rounding_floor():
    """The Ritz estimate |beta_m s_mi| decays far below what float32 HVPs support: on this float32 BN-CNN it
    "certified" lambda_1 to 2e-11 .. 5e-8 while the value was 4e-9 .. 2e-7 from the exact (float64) one, in
    all 5 seeds (and a 20-step digits run printed "rel. error <= 3.6e-29 certified"). Reported residuals are
    raised to the floor 100 eps max|theta| the stopping rule accepts, and then hold."""
    o64 = Objective(_bn_cnn(), batches=_data(), include=("all",))
    truth = torch.linalg.eigvalsh(dense_hessian(o64)).flip(0)[:3]
    o32 = Objective(_bn_cnn().float(), batches=[(x.float(), y) for x, y in _data()], include=("all",),
                    kernel="graph_reuse")
    for seed in range(5):
        e = fl.hessian.eigenvalues(o32, k=3, seed=seed)
        floor = 100 * torch.finfo(torch.float32).eps * float(e.values.abs().max())
        assert e.all_converged and torch.all(e.residuals >= floor * (1 - 1e-12)), seed
        assert torch.all((e.values - truth).abs() <= e.residuals), seed
        assert torch.all(e.gap_rel_error_estimate >= floor / e.values.abs() * (1 - 1e-9)), seed  # no finer either
    # float64 keeps its own (much lower) floor: the dense truth is met to ~1e-12
    e = fl.hessian.eigenvalues(o64, k=1, tol=1e-8)
    assert float(e.rel_error_bound[0]) < 1e-8 and abs(float(e.values[0]) - float(truth[0])) <= float(e.residuals[0])


def test_forward_over_reverse_equals_double_backward_fp32():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).eval()
    batches = [(x.float(), y) for x, y in _data()]
    v = torch.randn(sum(p.numel() for p in net.parameters() if p.dim() > 1), generator=torch.Generator().manual_seed(0))
    a = Objective(net, batches=batches, kernel="forward_over_reverse").hvp(v)
    b = Objective(net, batches=batches, kernel="double_backward").hvp(v)
    assert float((a - b).norm() / b.norm()) <= 1e-5


def _snapshot(net):
    return model_state_hash(net), torch.get_rng_state(), [m.training for m in net.modules()]


def test_every_measure_is_side_effect_free_and_seeded_bitwise():
    net = _bn_cnn()
    net.train()  # the caller's mode must come back
    net[4].weight.grad = torch.ones_like(net[4].weight)  # a stale .grad must stay as it is
    obj = Objective(net, batches=_data(), kernel="graph_reuse")
    before = _snapshot(net)
    runs = []
    for _ in range(2):
        runs.append((fl.hessian.eigenvalues(obj, k=2, k_bottom=1, seed=7), fl.hessian.trace(obj, rtol=0.05, seed=7),
                     fl.hessian.layer_traces(obj, by="tensor", max_hvp=40, seed=7),
                     fl.hessian.density(obj, n_probes=2, n_steps=6, seed=7),
                     fl.hessian.power_iteration(obj, k=1, seed=7), fl.hessian.eigenvalues(obj, k=1, seed=7)))
        after = _snapshot(net)
        assert after[0] == before[0] and torch.equal(after[1], before[1]) and after[2] == before[2]
    assert net.training and torch.equal(net[4].weight.grad, torch.ones_like(net[4].weight))
    (e1, t1, l1, d1, p1, g1), (e2, t2, l2, d2, p2, g2) = runs
    assert g1.start == "gradient" and torch.equal(g1.values, g2.values) and g1.n_hvp == g2.n_hvp
    assert torch.equal(e1.values, e2.values) and torch.equal(e1.bottom, e2.bottom) and e1.n_hvp == e2.n_hvp
    assert t1.estimate == t2.estimate and torch.equal(t1.samples, t2.samples) and t1.stderr == t2.stderr
    assert torch.equal(l1.layers.estimates, l2.layers.estimates)
    assert torch.equal(d1.values, d2.values) and torch.equal(d1.nodes, d2.nodes)
    assert torch.equal(p1.values, p2.values)
    e3 = fl.hessian.eigenvalues(obj, k=2, k_bottom=1, seed=8)
    t3 = fl.hessian.trace(obj, rtol=0.05, seed=8)
    assert not torch.equal(t3.samples, t1.samples) and e3.values[0] == pytest.approx(float(e1.values[0]), rel=1e-3)
    assert e1.seed == 7 and t1.provenance["bn_mode"] == "eval" and e1.provenance["hvp_kernel"] == "graph_reuse"


def test_power_iteration_reproduces_pyhessian_semantics():
    obj = CASES["mlp"]()
    ev = torch.linalg.eigvalsh(dense_hessian(obj))
    p = fl.hessian.power_iteration(obj, k=2, tol=1e-6, max_iter=500)
    largest = ev[ev.abs().argmax()]
    assert float(p.values[0]) == pytest.approx(float(largest), rel=1e-3)  # largest |lambda|
    assert p.n_hvp == sum(p.iterations) and p.method == "power_iteration"


def test_bad_arguments_are_one_line_flatlens_errors():
    obj = CASES["mlp"]()
    with pytest.raises(FlatlensError, match="k_top=0 and k_bottom=0"):
        fl.hessian.eigenvalues(obj, k=0)
    with pytest.raises(FlatlensError, match="trace method 'exact' unknown"):
        fl.hessian.trace(obj, "exact")
    with pytest.raises(FlatlensError, match="seed"):
        fl.hessian.density(obj, seed="a")
    with pytest.raises(FlatlensError, match="n_probes"):
        fl.hessian.density(obj, n_probes=0)
    with pytest.raises(FlatlensError, match="rtol"):
        fl.hessian.trace(obj, rtol=-1)
    with pytest.raises(FlatlensError, match="per-layer traces need"):
        fl.hessian.layer_traces(obj, method="xtrace")
    with pytest.raises(FlatlensError, match="cannot measure a str"):
        fl.hessian.trace("model")
    with pytest.raises(FlatlensError, match="layers='channel'"):
        fl.hessian.trace(obj, layers="channel")
    with pytest.raises(FlatlensError, match="layer_floor=-1 must be >= 0"):
        fl.hessian.trace(obj, layer_rtol=0.1, layer_floor=-1)
    with pytest.raises(FlatlensError, match="layer_floor='a' is not a number"):
        fl.hessian.spectrum(obj, 2, 4, layer_floor="a")
    with pytest.raises(FlatlensError, match="layer_rtol=-0.5 must be > 0"):  # named as itself, not as 'rtol'
        fl.hessian.trace(obj, layer_rtol=-0.5)
    n_hvp = obj.n_hvp
    for call in (lambda: fl.hessian.density(obj, 2, 5, grid=1), lambda: fl.hessian.spectrum(obj, 2, 5, grid=1)):
        with pytest.raises(FlatlensError, match="grid=1 is not an int >= 2"):
            call()
    assert obj.n_hvp == n_hvp  # a bad grid fails before the Lanczos runs (it used to fail after all their HVPs)
    with pytest.raises(FlatlensError, match="grid=100,000,000 points; a density curve needs far fewer"):
        fl.hessian.density(obj, 2, 5, grid=10**8)  # the smoothing ran the machine out of memory (killed)
    assert obj.n_hvp == n_hvp
    # dense matrices: each mistake named (a nan matrix gave numpy's "Eigenvalues did not converge")
    for A, msg in ((torch.randn(5, 4), r"got \(5, 4\), need a square 2-D tensor"),
                   (torch.eye(3, dtype=torch.int64), "got a torch.int64 matrix; pass a real floating-point one"),
                   (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), r"matrix is not symmetric \(max \|A - A\^T\| = 2\)"),
                   (torch.diag(torch.tensor([1.0, float("nan"), float("inf")])), "holds 2 nan/inf entries; pass a finite")):
        with pytest.raises(FlatlensError, match=msg):
            fl.hessian.eigenvalues(A)
    for bad in (0, -3, 2.5, "10"):  # not a basis size: named, not "pick a smaller sketch_size" or a TypeError
        with pytest.raises(FlatlensError, match="sketch_size=.* is not an int >= 1"):
            fl.hessian.trace(obj, sketch_size=bad)
        with pytest.raises(FlatlensError, match="sketch_size=.* is not an int >= 1"):
            fl.hessian.trace(obj, "hutchpp", sketch_size=bad)


def test_results_and_objectives_show_their_summary_in_a_notebook():
    """A notebook shows repr(): the dataclass repr of a TraceEstimate ran to 3,600 characters of tensors,
    and an Objective showed '<flatlens.measure.objective.Objective object at 0x...>'."""
    obj = CASES["mlp"]()
    assert repr(obj).startswith(f"Objective({obj.space.numel:,} parameters in space 'latent' (")
    eig, tr = fl.hessian.eigenvalues(obj, k=2), fl.hessian.trace(obj, max_hvp=20, rtol=None)
    for r in (eig, tr, fl.hessian.spectrum(obj, 2, 5, k=1, max_hvp=20)):
        lines = repr(r).splitlines()
        assert lines[0] == type(r).__name__ and len(lines) == 1 + len(r.summary())
        assert all(line.startswith("  ") and label in line for line, (label, _) in zip(lines[1:], r.summary()))
    assert f"{float(eig.values[0]):.6g}" in repr(eig) and "trace cost" in repr(tr) and len(repr(tr)) < 400
    assert repr(obj).endswith(f"kernel {obj.hvp_engine.kernel})")


def test_lazy_api_exports():
    import flatlens.measure.hessian as H
    import flatlens.store as S

    assert fl.hessian is H and fl.store is S and fl.Objective is Objective
    assert callable(fl.store.merge_group) and callable(fl.hessian.write) and callable(fl.hessian.read)


def test_the_linalg_and_trace_estimator_functions_take_an_objective():
    """The README names ``flatlens.measure.linalg`` and ``trace_estimators`` for direct use; they refused an
    Objective ('pass ... an object with as_operator()'), which has that method now, with the same numbers as
    its ``operator()``."""
    from flatlens.measure import linalg as L
    from flatlens.measure import trace_estimators as T

    obj = CASES["mlp"]()
    a = L.slq_density(obj, 1, 6, generator=3)
    b = L.slq_density(obj.operator(), 1, 6, generator=3)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    kw = dict(rtol=None, max_matvec=4, generator=1)
    assert T.hutchinson(obj, **kw).estimate == T.hutchinson(obj.operator(), **kw).estimate
