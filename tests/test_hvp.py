"""Tests of flatlens.measure.hvp: three HVP kernels against dense Hessians, weighting, side effects."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatlens.measure.hvp import (
    KERNELS,
    HessianVectorProduct,
    flatten,
    make_loss_fn,
    select_kernel,
    unflatten,
)
from flatlens.measure.linalg import lanczos_eigenvalues

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.l2 = nn.Linear(7, 3)
        self.unused = nn.Linear(2, 2)  # in the differentiated set, never used: zero rows

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn(self.c1(x))), 2)
        x = torch.max_pool2d(torch.nn.functional.softplus(self.c2(x)), 2)
        return self.fc(self.drop(x.flatten(1)))


def _cnn(dtype=F64) -> CNN:
    torch.manual_seed(0)
    m = CNN().to(dtype)
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            m(torch.randn(8, 2, 8, 8, dtype=dtype))
    m.eval()
    m.c2.bias.requires_grad_(False)  # a frozen parameter
    return m


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _dense_hessian(loss_fn, params, batches):
    """Dense Hessian of sum_b S_b / N from torch.autograd.functional.hessian on the flat vector."""
    like = {k: v.detach() for k, v in params.items()}
    total = sum(len(b[1]) for b in batches)

    def f(flat):
        d = unflatten(flat, like)
        return sum(loss_fn(d, b)[0] for b in batches) / total

    return torch.autograd.functional.hessian(f, flatten(like).clone())


def _cases():
    g = torch.Generator().manual_seed(1)
    # MLP, cross-entropy, ragged batches 16 + 16 + 5
    mlp = MLP().double().eval()
    xm = torch.randn(37, 5, generator=g, dtype=F64)
    ym = torch.randint(0, 3, (37,), generator=g)
    # CNN with BN (eval) and dropout (eval), frozen c2.bias
    cnn = _cnn()
    xc = torch.randn(21, 2, 8, 8, generator=g, dtype=F64)
    yc = torch.randint(0, 3, (21,), generator=g)
    return [
        ("mlp", mlp, make_loss_fn(mlp), _batches(xm, ym, 16)),
        ("cnn", cnn, make_loss_fn(cnn), _batches(xc, yc, 8)),
    ]


@pytest.mark.parametrize("case", [0, 1], ids=["mlp", "cnn"])
def test_kernels_equal_dense_hessian(case):
    name, model, loss_fn, batches = _cases()[case]
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    H = _dense_hessian(loss_fn, params, batches)
    assert torch.allclose(H, H.T, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    V = torch.randn(H.shape[0], 3, generator=g, dtype=F64)
    ref, refV = H @ v, H @ V
    for kernel in KERNELS:
        for batched in (False, True):
            eng = HessianVectorProduct(loss_fn, params, batches, kernel=kernel, batched=batched)
            hv = eng.hvp(v)
            assert (hv - ref).abs().max() <= 1e-6 * ref.abs().max(), (kernel, batched)
            HV = eng.hvp_batched(V)
            assert HV.shape == V.shape
            assert (HV - refV).abs().max() <= 1e-6 * refV.abs().max(), (kernel, batched)
            # dict in -> dict out
            hd = eng.hvp(eng.unflatten(v))
            assert list(hd) == eng.names and torch.allclose(eng.flatten(hd), hv, rtol=0, atol=1e-12)
            assert eng.n_samples == sum(len(b[1]) for b in batches)
            assert eng.n_hvp == 1 + 3 + 1 and eng.n_passes == 3
    if name == "mlp":  # the unused layer's rows/columns are exactly zero
        eng = HessianVectorProduct(loss_fn, params, batches, kernel="double_backward")
        sl = eng.unflatten(torch.arange(eng.n, dtype=F64))
        idx = torch.cat([sl["unused.weight"].reshape(-1), sl["unused.bias"]]).long()
        assert torch.all(H[idx] == 0)
        for kernel in KERNELS:
            out = HessianVectorProduct(loss_fn, params, batches, kernel=kernel).hvp(v)
            assert torch.all(out[idx] == 0)
    else:  # the frozen bias is not differentiated
        assert "c2.bias" not in HessianVectorProduct(loss_fn, params, batches, kernel="graph_reuse").names


def test_least_squares_hessian_is_xtx_over_n():
    """MSE convention: L(w) = 0.5 ||X w - y||^2 / N  =>  H = X^T X / N (no bias)."""
    g = torch.Generator().manual_seed(2)
    N, d = 23, 6
    X = torch.randn(N, d, generator=g, dtype=F64)
    y = torch.randn(N, generator=g, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double().eval()
    loss_fn = make_loss_fn(model, lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2, reduction="none")
    batches = _batches(X, y, 10)  # 10 + 10 + 3
    params = dict(model.named_parameters())
    truth = X.T @ X / N
    for kernel in KERNELS:
        eng = HessianVectorProduct(loss_fn, params, batches, kernel=kernel)
        H = eng.hvp_batched(torch.eye(d, dtype=F64))
        assert (H - truth).abs().max() <= 1e-12 * truth.abs().max(), kernel
    # and Lanczos on the operator recovers its spectrum
    eng = HessianVectorProduct(loss_fn, params, batches, kernel="graph_reuse")
    r = lanczos_eigenvalues(eng.as_operator(), k_top=2, k_bottom=1, tol=1e-10, generator=0)
    ev = torch.linalg.eigvalsh(truth)
    assert torch.allclose(r.values, torch.stack([ev[-1], ev[-2], ev[0]]), rtol=1e-8)
    assert eng.n_hvp == r.n_matvec


def test_ragged_batches_weighted_by_samples():
    g = torch.Generator().manual_seed(3)
    model = MLP().double().eval()
    loss_fn = make_loss_fn(model)
    x = torch.randn(37, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (37,), generator=g)
    params = {k: p for k, p in model.named_parameters() if not k.startswith("unused")}
    v = torch.randn(sum(p.numel() for p in params.values()), generator=g, dtype=F64)
    whole = HessianVectorProduct(loss_fn, params, [(x, y)], kernel="double_backward").hvp(v)
    for kernel in KERNELS:
        ragged = HessianVectorProduct(loss_fn, params, _batches(x, y, 16), kernel=kernel)
        out = ragged.hvp(v)
        assert torch.allclose(out, whole, rtol=0, atol=1e-12 * whole.abs().max()), kernel
        assert ragged.n_samples == 37
    # the unweighted mean of batch HVPs (hessian-eigenthings' rule) would be different
    per = [HessianVectorProduct(loss_fn, params, [b], kernel="double_backward").hvp(v) for b in _batches(x, y, 16)]
    assert not torch.allclose(sum(per) / 3, whole, atol=1e-6)
    # loss_and_grad uses the same weighting
    loss, grad = HessianVectorProduct(loss_fn, params, _batches(x, y, 16), kernel="double_backward").loss_and_grad()
    with torch.no_grad():
        assert math.isclose(loss, float(torch.nn.functional.cross_entropy(model(x), y)), rel_tol=1e-12)


def test_float32_forward_over_reverse_matches_double_backward():
    model = _cnn(torch.float32)
    loss_fn = make_loss_fn(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 2, 8, 8, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    batches = _batches(x, y, 8)
    n = sum(p.numel() for p in params.values())
    v = torch.randn(n, generator=g)
    db = HessianVectorProduct(loss_fn, params, batches, kernel="double_backward").hvp(v)
    for kernel in ("forward_over_reverse", "graph_reuse"):
        out = HessianVectorProduct(loss_fn, params, batches, kernel=kernel).hvp(v)
        assert out.dtype == torch.float32
        assert (out - db).abs().max() <= 1e-5 * db.abs().max(), kernel


def _snapshot(model):
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "rng": torch.get_rng_state(),
    }


def _assert_same(a, b):
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert torch.equal(a["rng"], b["rng"])
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
        assert (a["grads"][k] is None) == (b["grads"][k] is None), k
        if a["grads"][k] is not None:
            assert torch.equal(a["grads"][k], b["grads"][k]), k
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k


def test_no_side_effects():
    model = _cnn()
    model.c1.weight.grad = torch.full_like(model.c1.weight, 0.5)  # a stale .grad must survive untouched
    loss_fn = make_loss_fn(model)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 2, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (12,), generator=g)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    before = _snapshot(model)
    n = sum(p.numel() for p in params.values())
    v = torch.randn(n, generator=g, dtype=F64)
    for kernel in KERNELS:
        for batched in (False, True):
            eng = HessianVectorProduct(loss_fn, params, _batches(x, y, 5), kernel=kernel, batched=batched)
            eng.hvp(v)
            eng.hvp_batched(torch.stack([v, -v], 1))
            eng.loss_and_grad()
            eng.release()
    sel = select_kernel(loss_fn, params, (x, y), repeats=1)
    HessianVectorProduct(loss_fn, params, _batches(x, y, 5)).hvp(v)  # kernel="auto"
    assert sel.kernel in KERNELS
    _assert_same(before, _snapshot(model))
    assert all(p.grad is None for k, p in model.named_parameters() if k != "c1.weight")


def test_training_mode_refused_or_isolated():
    model = _cnn()
    model.train()
    x = torch.randn(6, 2, 8, 8, dtype=F64)
    y = torch.randint(0, 3, (6,))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    eng = HessianVectorProduct(make_loss_fn(model), params, [(x, y)], kernel="double_backward")
    with pytest.raises(ValueError, match="training mode"):
        eng.hvp(torch.ones(eng.n, dtype=F64))
    model.drop.p = 0.0  # deterministic train mode: BN with batch statistics
    before = _snapshot(model)
    outs = []
    for kernel in KERNELS:
        eng = HessianVectorProduct(make_loss_fn(model, allow_training=True), params, [(x, y)], kernel=kernel)
        outs.append(eng.hvp(torch.ones(eng.n, dtype=F64)))
    assert all(torch.allclose(o, outs[0], atol=1e-12) for o in outs)
    _assert_same(before, _snapshot(model))
    model.eval()  # the train-mode (batch statistics) Hessian differs from the eval-mode one
    eng = HessianVectorProduct(make_loss_fn(model), params, [(x, y)], kernel="double_backward")
    assert not torch.allclose(eng.hvp(torch.ones(eng.n, dtype=F64)), outs[0], atol=1e-6)


def test_select_kernel_and_override():
    model = _cnn(torch.float32)
    loss_fn = make_loss_fn(model)
    x = torch.randn(8, 2, 8, 8)
    y = torch.randint(0, 3, (8,))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sel = select_kernel(loss_fn, params, (x, y), repeats=2)
    assert set(sel.seconds) == set(KERNELS) and sel.kernel == min(sel.seconds, key=sel.seconds.get)
    assert sel.gradient_seconds > 0 and all(r > 0 for r in sel.ratio.values())
    assert max(sel.max_rel_diff.values()) < 1e-4
    # pruning: a kernel whose first-round time is prune x the fastest first-round time is not timed again
    assert select_kernel(loss_fn, params, (x, y), prune=math.inf).pruned == []
    every = select_kernel(loss_fn, params, (x, y), prune=0.0)
    assert len(every.pruned) == len(KERNELS) - 1 and every.kernel not in every.pruned
    assert set(every.seconds) == set(KERNELS)
    eng = HessianVectorProduct(loss_fn, params, [(x, y)], kernel="double_backward")
    assert eng.kernel == "double_backward" and eng.selection is None
    eng = HessianVectorProduct(loss_fn, params, [(x, y)], kernel="auto", candidates=("double_backward",))
    assert eng.kernel == "double_backward" and eng.selection is not None


def test_select_kernel_times_the_kernels_in_interleaved_rounds(monkeypatch):
    """A change of machine load must weigh on every kernel alike: after one warm-up call each, the timed
    calls go round-robin (one per kernel per round), not all of one kernel's calls in a row."""
    model = _cnn(torch.float32)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    calls = []
    orig = HessianVectorProduct.hvp

    def logged(self, v):
        calls.append(self.kernel)
        return orig(self, v)

    monkeypatch.setattr(HessianVectorProduct, "hvp", logged)
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))
    sel = select_kernel(make_loss_fn(model), params, (x, y), repeats=3, prune=math.inf)
    assert calls == list(KERNELS) * 4 and set(sel.seconds) == set(KERNELS)


class FakeQuantNet(nn.Module):
    """An op without a forward-mode AD formula (torch.ao FakeQuantize's kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.fake_quantize_per_tensor_affine(h, 0.05, 0, -128, 127)
        return self.l2(h)


def test_select_kernel_excludes_failing_kernel():
    torch.manual_seed(0)
    model = FakeQuantNet().eval()
    loss_fn = make_loss_fn(model)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    sel = select_kernel(loss_fn, dict(model.named_parameters()), (x, y), repeats=1)
    assert "forward_over_reverse" in sel.errors and sel.kernel in ("graph_reuse", "double_backward")
    assert "\n" not in sel.errors["forward_over_reverse"]


def test_graph_reuse_rebuilds_after_in_place_parameter_change():
    model = MLP().double().eval()
    x = torch.randn(9, 5, dtype=F64)
    y = torch.randint(0, 3, (9,))
    params = {k: p for k, p in model.named_parameters() if not k.startswith("unused")}
    eng = HessianVectorProduct(make_loss_fn(model), params, [(x, y)], kernel="graph_reuse")
    v = torch.ones(eng.n, dtype=F64)
    eng.hvp(v)
    old = eng.hvp(v)
    with torch.no_grad():
        model.l1.weight.mul_(1.5)  # in place: the retained graphs are stale and must be rebuilt
    fresh = HessianVectorProduct(make_loss_fn(model), params, [(x, y)], kernel="double_backward").hvp(v)
    assert not torch.allclose(old, fresh, atol=1e-6)
    assert torch.allclose(eng.hvp(v), fresh, atol=1e-12)
    for kernel in ("double_backward", "forward_over_reverse"):
        assert torch.allclose(HessianVectorProduct(make_loss_fn(model), params, [(x, y)], kernel=kernel).hvp(v), fresh)


def test_bad_arguments():
    model = MLP().double().eval()
    lf = make_loss_fn(model)
    batch = (torch.randn(3, 5, dtype=F64), torch.tensor([0, 1, 2]))
    params = dict(model.named_parameters())
    for call in (
        lambda: HessianVectorProduct(lf, {}, [batch]),
        lambda: HessianVectorProduct(lf, params, []),
        lambda: HessianVectorProduct(lf, params, [batch], kernel="magic"),
        lambda: HessianVectorProduct(lf, params, [batch], kernel="double_backward").hvp(torch.ones(3)),
        lambda: HessianVectorProduct(lf, {"nope": torch.ones(2, dtype=F64)}, [batch], kernel="double_backward").hvp(
            torch.ones(2, dtype=F64)
        ),
        lambda: make_loss_fn(model, reduction="avg"),
        lambda: select_kernel(lf, params, batch, candidates=("magic",)),
    ):
        with pytest.raises(ValueError) as ei:
            call()
        assert "\n" not in str(ei.value)


def test_auto_leaves_out_graph_reuse_when_its_retained_graphs_would_not_fit(monkeypatch):
    """graph_reuse keeps one retained graph per batch for the whole measurement; timed on one batch it
    won even where the graphs of all batches (ResNet-50 at 224x224: tens of MB per image) could never
    fit, and the run was OOM-killed. Its saved tensors are counted on the timing batch; when
    n_batches times that exceeds the memory available, auto picks the next kernel and says why."""
    import flatlens.measure.hvp as H

    model = _cnn(torch.float32)
    loss_fn = make_loss_fn(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 2, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sel = select_kernel(loss_fn, params, batches[0], candidates=("graph_reuse", "double_backward"), n_batches=4)
    per_batch = sel.graph_bytes
    assert per_batch > 8 * 2 * 8 * 8 * 4  # at least the input batch's activations
    monkeypatch.setattr(H, "available_bytes", lambda device: int(per_batch * 2))  # room for 2 of the 4 graphs
    sel = select_kernel(loss_fn, params, batches[0], candidates=("graph_reuse", "double_backward"), n_batches=4)
    assert sel.kernel == "double_backward" and "graph_reuse" not in sel.seconds
    assert sel.errors["graph_reuse"].startswith("its retained graphs of 4 batches would hold ~")
    eng = HessianVectorProduct(loss_fn, params, batches, kernel="auto", candidates=("graph_reuse", "double_backward"))
    assert eng.kernel == "double_backward"
    assert select_kernel(loss_fn, params, batches[0], candidates=("graph_reuse",), n_batches=1).kernel == "graph_reuse"
