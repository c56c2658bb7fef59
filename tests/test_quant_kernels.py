"""The fused numba CPU kernels of the LSQ quantizer (``flatlens.quant.kernels``) against the eager torch
ops they replace: bitwise-equal forward outputs, equal gradients, and the fallbacks (double backward,
vmap, other channel dims, non-contiguous input, concurrent threads, the off switch)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.func import vmap

from flatlens.quant import LSQQuantizer, kernels
from flatlens.quant import lsq as lsq_mod

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba not importable")

BIG = (64, 32, 3, 3)  # 18432 elements >= kernels.MIN_NUMEL, 2 blocks per tensor when per-tensor


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eager(monkeypatch_ctx, fn):
    """Run ``fn`` with the fused kernels switched off."""
    monkeypatch_ctx.setattr(kernels, "_enabled", False)
    try:
        return fn()
    finally:
        monkeypatch_ctx.setattr(kernels, "_enabled", True)


def quantizer(bits, signed, per_channel, dtype, x):
    q = LSQQuantizer(bits, signed=signed, per_channel=per_channel,
                     num_channels=x.shape[0] if per_channel else None).to(dtype)
    q.init_from(x)
    return q


def data(dtype, shape=BIG):
    x = torch.randn(shape, generator=gen(0), dtype=dtype) * 0.1
    with torch.no_grad():  # values beyond both range ends, exact zeros, and exact grid points
        x[0, :4] *= 50
        x[1, :4] *= -50
        x[2, 0] = 0.0
    return x


@pytest.mark.parametrize("bits, signed, per_channel, dtype", [
    (8, True, True, torch.float32), (4, True, False, torch.float32), (2, True, True, torch.float64),
    (8, False, False, torch.float64), (3, False, True, torch.float32),
])
def test_fused_forward_bitwise_and_gradients_equal_eager(monkeypatch, bits, signed, per_channel, dtype):
    x = data(dtype)
    q = quantizer(bits, signed, per_channel, dtype, x)
    s = q.effective_step(x)
    assert kernels.applicable(x, s)
    fused = kernels.forward(x, s.detach(), q.q_n, q.q_p)
    ref = lsq_mod._LSQFakeQuant.forward(x, s.detach(), q.q_n, q.q_p)[0]
    assert torch.equal(fused, ref)
    # the backward kernel alone: dx bitwise, ds to rounding, against the eager formulas
    g = torch.randn(x.shape, generator=gen(7), dtype=dtype)
    _, r, inside = lsq_mod._LSQFakeQuant.forward(x, s.detach(), q.q_n, q.q_p)
    gx, gs = kernels.backward(g, x, s.detach(), q.q_n, q.q_p, True, True)
    assert torch.equal(gx, g * inside)
    ref_gs = (g.double() * r.double()).sum_to_size(s.shape)  # float64 reference
    torch.testing.assert_close(gs.double(), ref_gs, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    gx_only, none = kernels.backward(g, x, s.detach(), q.q_n, q.q_p, True, False)
    assert torch.equal(gx_only, gx) and none is None

    up = torch.randn(x.shape, generator=gen(1), dtype=dtype)

    def grads():
        xx = x.clone().requires_grad_(True)
        out = q(xx)
        gx, gs = torch.autograd.grad((out * up).sum(), [xx, q.step_size])
        return out.detach(), gx, gs

    o1, gx1, gs1 = grads()
    o2, gx2, gs2 = eager(monkeypatch, grads)
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    # ds: the kernel sums in float64, torch in the tensor's dtype (float32 cancellation in small channels)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=(1e-6 if dtype == torch.float32 else 1e-14) * float(gs2.abs().max()))
    with torch.no_grad():  # the integer export path uses the eager ops: same values
        assert torch.equal(q.dequantize(q.quantize_int(x)), o1)


def test_fused_backward_is_used_and_double_backward_falls_back(monkeypatch):
    x = data(torch.float64)
    q = quantizer(4, True, True, torch.float64, x)
    calls = {"fwd": 0, "bwd": 0}
    f0, b0 = kernels.forward, kernels.backward

    def fwd(*a):
        calls["fwd"] += 1
        return f0(*a)

    def bwd(*a):
        calls["bwd"] += 1
        return b0(*a)

    monkeypatch.setattr(kernels, "forward", fwd)
    monkeypatch.setattr(kernels, "backward", bwd)
    xx = x.clone().requires_grad_(True)
    loss = (q(xx) ** 2).sum()
    g, = torch.autograd.grad(loss, xx, create_graph=True)  # differentiable backward: eager ops
    assert calls == {"fwd": 1, "bwd": 0}
    v = torch.randn(x.shape, generator=gen(2), dtype=torch.float64)
    hv, = torch.autograd.grad((g * v).sum(), xx)
    # the straight-through Hessian of sum(q(x)^2) w.r.t. x is 2 * inside (diagonal)
    y = x / q.effective_step(x, scaled=False)
    inside = ((y >= -q.q_n) & (y <= q.q_p)).double()
    assert 0 < int(inside.sum()) < inside.numel()
    torch.testing.assert_close(hv, 2 * inside * v)
    before = calls["bwd"]  # (the second-order pass reached q's backward again, first order: fused)
    (q(xx) ** 2).sum().backward()  # plain backward: fused
    assert calls["bwd"] == before + 1


def test_a_quantized_layer_weight_parameter_takes_the_fused_path(monkeypatch):
    from torch import nn

    from flatlens.quant import attach_quantizers, iter_quantizers

    net = nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4, 10))
    attach_quantizers(net, bits=8, quantize=["*"], enabled=True)
    calls = []
    f0 = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *a: calls.append(1) or f0(*a))
    net(torch.randn(2, 32, 4, 4, generator=gen(4))).sum().backward()
    assert len(calls) == 1  # the conv weight (18432 elements); the small linear weight stays eager
    assert all(q.step_size.grad is not None for _, q in iter_quantizers(net))


def test_fallbacks_other_channel_dim_noncontiguous_small_vmap_and_switch(monkeypatch):
    x = data(torch.float32)
    q1 = LSQQuantizer(8, per_channel=True, num_channels=BIG[1], channel_dim=1)
    q1.init_from(x)
    assert not kernels.applicable(x, q1.effective_step(x))
    xt = x.transpose(0, 1)
    q = quantizer(8, True, False, torch.float32, x)
    assert not kernels.applicable(xt, q.effective_step(xt))
    small = torch.randn(4, 4)
    assert not kernels.applicable(small, q.effective_step(small))
    assert not kernels.applicable(x.double(), q.effective_step(x))  # dtype mismatch
    # vmap over a batch of weights: the batched tensor is not plain, eager ops run, values agree
    xs = torch.stack([x, 2 * x])
    out = vmap(q.fake_quantize)(xs)
    with torch.no_grad():
        assert torch.equal(out[1], q.fake_quantize(2 * x))
    monkeypatch.setattr(kernels, "_enabled", False)
    assert not kernels.applicable(x, q.effective_step(x))


def test_contended_lock_falls_back_to_eager_with_the_same_values():
    x = data(torch.float32)
    q = quantizer(5, True, True, torch.float32, x)
    with torch.no_grad():
        expected = q.fake_quantize(x)
    assert kernels._lock.acquire()
    try:  # another thread "holds" the kernels: this call must not wait or crash
        with torch.no_grad():
            got = q.fake_quantize(x)
        assert kernels.forward(x, q.effective_step(x).detach(), q.q_n, q.q_p) is None
        g = torch.ones_like(x)
        assert kernels.backward(g, x, q.effective_step(x).detach(), q.q_n, q.q_p, True, True) is None
    finally:
        kernels._lock.release()
    assert torch.equal(got, expected)

    results = []

    def work():
        with torch.no_grad():
            results.append(torch.equal(q.fake_quantize(x), expected))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def test_kernels_follow_torch_thread_count(one_thread):
    x = data(torch.float32)
    q = quantizer(8, True, True, torch.float32, x)
    with torch.no_grad():
        q.fake_quantize(x)
    assert kernels.numba.get_num_threads() == 1


def test_buffer_pool_reuses_storage_only_when_free_and_overlapping_forwards_stay_correct(monkeypatch):
    x = data(torch.float32)
    q = quantizer(6, True, True, torch.float32, x)
    up = torch.randn(x.shape, generator=gen(3), dtype=torch.float32)

    def ptr(t):
        return t.untyped_storage().data_ptr()

    w = x.clone().requires_grad_(True)
    out1 = q(w)
    p1 = ptr(out1)
    out2 = q(2 * w)  # the first graph is alive: fresh buffers, not the pooled ones
    assert ptr(out2) != p1
    loss = (out1 * up).sum() + (out2 * up).sum()
    gw, gs = torch.autograd.grad(loss, [w, q.step_size])
    del out1, out2, loss
    out3 = q(w)  # everything released: the pooled storage comes back
    assert ptr(out3) == p1
    del out3

    def reference():
        ww = x.clone().requires_grad_(True)
        ll = (q(ww) * up).sum() + (q(2 * ww) * up).sum()
        return torch.autograd.grad(ll, [ww, q.step_size])

    rw, rs = eager(monkeypatch, reference)
    assert torch.equal(gw, rw)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-6 * float(rs.abs().max()))

    kept = q(w).detach()  # a caller keeps an output: the next forward must not overwrite it
    snapshot = kept.clone()
    with torch.no_grad():
        q(3 * x)
    assert torch.equal(kept, snapshot)
    import copy
    assert copy.deepcopy(q)._pool.sets == {}


@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_steps_with_pooled_gradients_match_eager(monkeypatch, set_to_none):
    """Adam steps with gradient accumulation over two micro-batches: the pooled dx (taken by .grad, or
    added into it) gives the same trajectory as the eager ops."""
    from torch import nn

    from flatlens.quant import attach_quantizers

    def run():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4, 10))
        attach_quantizers(net, bits=4, quantize=["*"], enabled=True)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        xs = torch.randn(6, 4, 32, 4, 4, generator=gen(5))
        ys = torch.randint(0, 10, (6, 4), generator=gen(6))
        for step in range(3):
            opt.zero_grad(set_to_none=set_to_none)
            for micro in range(2):
                i = 2 * step + micro
                nn.functional.cross_entropy(net(xs[i]), ys[i]).backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    fused = run()
    ref = eager(monkeypatch, run)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_forward_mode_ad_through_the_fused_function_matches_eager(monkeypatch):
    import torch.autograd.forward_ad as fwAD

    x = data(torch.float64)
    q = quantizer(5, True, True, torch.float64, x)
    tx = torch.randn(x.shape, generator=gen(8), dtype=torch.float64)
    ts = torch.randn(q.step_size.shape, generator=gen(9), dtype=torch.float64)

    def tangent():
        with torch.no_grad(), fwAD.dual_level():
            s0 = q.step_size.detach().clone()
            dual_x = fwAD.make_dual(x, tx)
            q.step_size.data = fwAD.make_dual(s0, ts)  # the step size carries a tangent too
            try:
                out = q.fake_quantize(dual_x)
                return fwAD.unpack_dual(out).tangent.clone()
            finally:
                q.step_size.data = s0

    assert kernels.applicable(x, q.effective_step(x))
    fused = tangent()
    ref = eager(monkeypatch, tangent)
    torch.testing.assert_close(fused, ref, rtol=0, atol=0)
    assert float(fused.abs().sum()) > 0
