"""LSQ quantizer: forward / gradients against the closed form and PyTorch's learnable fake-quant op,
init, gradient scale, lazy init, validation, and HVPs (double backward vs torch.func) through a
quantized net.

Rounding: torch.round, np.round and PyTorch's fake-quant kernels all round half to even; the test
data are kept at least 0.01 step away from half-integers and from the range ends, so no test depends
on tie-breaking or on the clamp's (inclusive) gradient at the boundary.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from flatlens.quant import (
    LSQQuantizer,
    attach_quantizers,
    dequantized_copy,
    iter_quantizers,
    quant_range,
    quantizer_parameter_names,
)

F64 = torch.float64
KINDS = {"signed": (True, False), "narrow": (True, True), "unsigned": (False, False)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def away_from_ties(t: torch.Tensor, q_n: int, q_p: int, margin: float = 0.01) -> torch.Tensor:
    """Move code-space values away from half-integers and from the range ends."""
    frac = t - torch.floor(t)
    t = torch.where((frac - 0.5).abs() < margin, t + 5 * margin, t)
    for b in (-q_n, q_p):
        t = torch.where((t - b).abs() < margin, t + 5 * margin, t)
    return t


def make_case(bits, kind, per_channel, dtype=F64, seed=0, shape=(4, 5, 3), avoid_bands=False):
    """Quantizer with known step sizes and inputs spread over (and beyond) its range.

    ``avoid_bands`` keeps inputs out of the half-step bands just beyond the range ends, where PyTorch's
    kernels (mask on round(x/s)) and LSQ (mask on x/s) differ, see test_torch_op_differs_in_half_step_band.
    """
    signed, narrow = KINDS[kind]
    q_n, q_p = quant_range(bits, signed, narrow)
    C = shape[0]
    q = LSQQuantizer(bits, signed=signed, narrow=narrow, per_channel=per_channel,
                     num_channels=C if per_channel else None, dtype=dtype)
    g = gen(seed)
    steps = (0.05 + torch.rand(C if per_channel else 1, generator=g, dtype=F64)).to(dtype)
    with torch.no_grad():
        q.step_size.copy_(steps)
    q.initialized.fill_(True)
    q._initialized = True
    t = torch.rand(shape, generator=g, dtype=F64) * (q_n + q_p + 6) - q_n - 3
    t = away_from_ties(t, q_n, q_p)
    t[:, 0, 0], t[:, 0, 1] = -q_n - 2.3, q_p + 2.3  # every channel clips on both sides
    if avoid_bands:
        t = torch.where((t > q_p) & (t < q_p + 0.6), t + 1.0, t)
        t = torch.where((t < -q_n) & (t > -q_n - 0.6), t - 1.0, t)
    s_b = steps.to(F64).reshape([-1] + [1] * (len(shape) - 1)) if per_channel else steps.to(F64)
    x = (t * s_b).to(dtype)
    return q, x, q_n, q_p


def np_lsq(x, s_b, q_n, q_p, r, g, axes):
    """Closed-form LSQ forward and gradients (numpy re-statement of Esser et al.)."""
    v = x / s_b
    y = np.round(np.clip(v, -q_n, q_p)) * s_b
    inside = (v >= -q_n) & (v <= q_p)
    dx = r * inside
    dyds = np.where(v <= -q_n, -q_n, np.where(v >= q_p, q_p, np.round(v) - v))
    ds = g * (r * dyds).sum(axis=axes)
    return y, dx, np.atleast_1d(ds)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", range(2, 9))
def test_forward_and_grads_match_closed_form(bits, kind, per_channel):
    q, x, q_n, q_p = make_case(bits, kind, per_channel, seed=bits)
    x = x.clone().requires_grad_(True)
    y = q(x)
    r = torch.randn(x.shape, generator=gen(100 + bits), dtype=F64)
    (y * r).sum().backward()
    s_np = q.step_size.detach().numpy()
    s_b = s_np.reshape(-1, 1, 1) if per_channel else s_np
    g = 1.0 / math.sqrt(x.numel() * q_p)
    y_ref, dx_ref, ds_ref = np_lsq(x.detach().numpy(), s_b, q_n, q_p, r.numpy(), g,
                                   axes=(1, 2) if per_channel else None)
    assert np.array_equal(y.detach().numpy(), y_ref)  # bitwise in float64
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(q.step_size.grad.numpy(), ds_ref, rtol=1e-12, atol=1e-14)
    codes = q.quantize_int(x)
    assert codes.dtype == torch.int32 and int(codes.min()) >= -q_n and int(codes.max()) <= q_p
    assert torch.equal(q.dequantize(codes), y.detach())
    # both ends of the range are exercised by the data
    assert int(codes.min()) == -q_n and int(codes.max()) == q_p


def test_per_channel_on_dim1_like_activations():
    q = LSQQuantizer(4, signed=False, per_channel=True, num_channels=3, channel_dim=1, dtype=F64)
    with torch.no_grad():
        q.step_size.copy_(torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    q.initialized.fill_(True)
    q._initialized = True
    x = torch.rand(2, 3, 4, 4, generator=gen(1), dtype=F64) * 4
    s = torch.tensor([0.1, 0.2, 0.3], dtype=F64).reshape(1, 3, 1, 1)
    assert torch.equal(q(x), torch.round(torch.clamp(x / s, 0, 15)) * s)


HAS_TENSOR_OP = hasattr(torch, "_fake_quantize_learnable_per_tensor_affine")
HAS_CHANNEL_OP = hasattr(torch, "_fake_quantize_learnable_per_channel_affine")


@pytest.mark.parametrize("per_channel, grad_scale_n", [(False, "tensor"), (True, "tensor"), (True, "channel")])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [2, 4, 7, 8])
def test_matches_torch_learnable_fake_quant(bits, kind, per_channel, grad_scale_n):
    op_present = HAS_CHANNEL_OP if per_channel else HAS_TENSOR_OP
    if not op_present:
        pytest.skip("torch._fake_quantize_learnable_per_*_affine is absent in this torch build")
    # the native ops are float32-only on CPU
    q, x, q_n, q_p = make_case(bits, kind, per_channel, dtype=torch.float32, seed=7 * bits, shape=(6, 8, 5),
                             avoid_bands=True)
    q.grad_scale_n = grad_scale_n
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    s2 = q.step_size.detach().clone().requires_grad_(True)
    r = torch.randn(x.shape, generator=gen(3), dtype=torch.float32)
    g = q.grad_factor(x)
    y1 = q(x1)
    if per_channel:
        y2 = torch._fake_quantize_learnable_per_channel_affine(
            x2, s2, torch.zeros_like(s2), 0, -q_n, q_p, g)
    else:
        y2 = torch._fake_quantize_learnable_per_tensor_affine(
            x2, s2, torch.zeros_like(s2), -q_n, q_p, g)
    (y1 * r).sum().backward()
    (y2 * r).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.step_size.grad, s2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_TENSOR_OP, reason="torch._fake_quantize_learnable_per_tensor_affine absent")
def test_torch_op_differs_in_half_step_band():
    """Documented difference: for Q_P < x/s < Q_P + 1/2 LSQ (Esser et al.) treats x as clipped (dx = 0,
    ds = Q_P), PyTorch's kernel masks on round(x/s) and treats it as inside (dx = dy, ds = round - x/s)."""
    q = LSQQuantizer(4, dtype=torch.float32)
    q.init_from(torch.ones(1))
    s = float(q.step_size.detach())
    x1 = torch.tensor([7.2 * s], requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    s2 = q.step_size.detach().clone().requires_grad_(True)
    q(x1).sum().backward()
    torch._fake_quantize_learnable_per_tensor_affine(x2, s2, torch.zeros(1), -8, 7, q.grad_factor(x1)).sum().backward()
    g = q.grad_factor(x1)
    assert float(x1.grad) == 0.0 and float(x2.grad) == 1.0
    assert float(q.step_size.grad) == pytest.approx(7 * g) and float(s2.grad) == pytest.approx(-0.2 * g, rel=1e-4)


def test_init_formula_per_tensor_and_per_channel():
    w = torch.randn(5, 4, 3, 3, generator=gen(2), dtype=F64)
    with torch.no_grad():
        w[3].zero_()  # an all-zero channel falls back to the tensor-wide s0
    for bits in (2, 7):
        q_p = 2 ** (bits - 1) - 1
        qt = LSQQuantizer(bits, dtype=F64)
        qt.init_from(w)
        assert qt.is_initialized() and bool(qt.initialized)
        torch.testing.assert_close(qt.step_size, (2 * w.abs().mean() / math.sqrt(q_p)).reshape(1))
        qc = LSQQuantizer(bits, per_channel=True, num_channels=5, dtype=F64)
        qc.init_from(w)
        expect = 2 * w.abs().reshape(5, -1).mean(1) / math.sqrt(q_p)
        expect[3] = 2 * w.abs().mean() / math.sqrt(q_p)
        torch.testing.assert_close(qc.step_size.detach(), expect)
    qu = LSQQuantizer(8, signed=False, dtype=F64)
    qu.init_from(torch.zeros(3, dtype=F64))
    assert float(qu.step_size.detach()) == qu.eps  # never <= 0


def test_grad_scale_n_channel_is_sqrt_c_larger():
    C = 6
    w = torch.randn(C, 10, generator=gen(4), dtype=F64)
    grads = {}
    for mode in ("tensor", "channel"):
        q = LSQQuantizer(5, per_channel=True, num_channels=C, grad_scale_n=mode, dtype=F64)
        q.init_from(w)
        (q(w) * torch.arange(w.numel(), dtype=F64).reshape(w.shape).sin()).sum().backward()
        grads[mode] = q.step_size.grad.clone()
        assert q.grad_factor(w) == pytest.approx(1 / math.sqrt((w.numel() if mode == "tensor" else 10) * 15))
    torch.testing.assert_close(grads["channel"], grads["tensor"] * math.sqrt(C), rtol=1e-12, atol=0)


def test_disabled_is_identity_and_lazy_init():
    q = LSQQuantizer(8, signed=False, enabled=False)
    x = torch.rand(4, 3, generator=gen(5))
    assert q(x) is x and not q.is_initialized()
    q.set_enabled(True)
    q.eval()
    with pytest.raises(RuntimeError, match="uninitialized in eval mode"):
        q(x)
    q.train()
    y = q(x)
    assert q.is_initialized() and bool(q.initialized)
    torch.testing.assert_close(q.step_size.detach(), (2 * x.mean() / math.sqrt(255)).reshape(1))
    s_before = q.step_size.detach().clone()
    q(2 * x)  # no re-init on later batches
    assert torch.equal(q.step_size.detach(), s_before)
    assert not torch.equal(y, x)
    # unsigned quantizer initialized from negative data warns
    q2 = LSQQuantizer(8, signed=False)
    with pytest.warns(UserWarning, match="negative values"):
        q2(torch.randn(10, generator=gen(6)))
    # state round trip restores the python mirrors
    q3 = LSQQuantizer(8, signed=False, enabled=False)
    q3.load_state_dict(q.state_dict())
    assert q3.is_enabled() and q3.is_initialized()


def test_eps_guard_keeps_forward_finite():
    q = LSQQuantizer(4, dtype=F64)
    q.init_from(torch.ones(3, dtype=F64))
    with torch.no_grad():
        q.step_size.fill_(-1.0)
    x = torch.linspace(-1, 1, 7, dtype=F64, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(q.step_size.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 1}, "bits must be an integer in \\[2, 8\\]"),
    ({"bits": 9}, "bits must be"),
    ({"bits": 7.0}, "bits must be"),
    ({"bits": True}, "bits must be"),
    ({"signed": False, "narrow": True}, "narrow=True applies only to signed"),
    ({"grad_scale_n": "layer"}, "grad_scale_n must be"),
    ({"per_channel": True}, "needs num_channels"),
    ({"eps": 0.0}, "eps must be"),
])
def test_bad_arguments_raise_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LSQQuantizer(**kwargs)
    assert "\n" not in str(info.value)


def test_channel_mismatch_raises():
    q = LSQQuantizer(4, per_channel=True, num_channels=3)
    with pytest.raises(ValueError, match="3 channels but the tensor has 4"):
        q.init_from(torch.ones(4, 2))


# ---------------------------------------------------------------------------------------- HVPs
def tiny_net(activations: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)  # module init only; data and directions use explicit generators
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    attach_quantizers(net, bits=8, enabled=True, activations=activations, act_signed=True)
    x = torch.randn(5, 2, 6, 6, generator=gen(10), dtype=F64)
    y = torch.randint(0, 4, (5,), generator=gen(11))
    net.train()
    net(x)  # lazy init of activation quantizers, if any
    net.eval()
    return net, x, y


def hvps(net, x, y, v):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}

    def loss_fn(p):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    loss = loss_fn(params)
    g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    dot = sum((gi * v[n]).sum() for gi, n in zip(g, params))
    hv_db = dict(zip(params, torch.autograd.grad(dot, list(params.values()))))
    _, hv_fw = jvp(grad(loss_fn), ({n: p.detach() for n, p in params.items()},), (v,))
    return hv_db, hv_fw


def random_dir(net, seed, only=None):
    g = gen(seed)
    return {n: (torch.randn(p.shape, generator=g, dtype=p.dtype) if only is None or only(n) else torch.zeros_like(p))
            for n, p in net.named_parameters()}


@pytest.mark.parametrize("activations", [False, True])
def test_double_backward_and_forward_over_reverse_agree(activations):
    net, x, y = tiny_net(activations)
    v = random_dir(net, 20)  # all parameters, step sizes included
    hv_db, hv_fw = hvps(net, x, y, v)
    for n in hv_db:
        torch.testing.assert_close(hv_db[n], hv_fw[n], rtol=1e-6, atol=1e-6)
    assert any(float(h.abs().max()) > 1e-3 for h in hv_db.values())


def test_weight_block_hvp_is_the_surrogate_hessian():
    """The HVP through the quantizer (latent space, weights/biases) equals the float Hessian at the
    fake-quantized weights, i.e. a finite difference of the dequantized copy's gradients; the true
    latent gradient is piecewise constant (FD without crossing the grid is exactly 0)."""
    net, x, y = tiny_net()
    qnames = set(quantizer_parameter_names(net))
    v = random_dir(net, 21, only=lambda n: n not in qnames)
    hv_db, hv_fw = hvps(net, x, y, v)

    deq = dequantized_copy(net)
    pd = {n: p.detach() for n, p in deq.named_parameters()}

    def grad_at(model, params):
        def loss_fn(p):
            return F.cross_entropy(functional_call(model, p, (x,)), y)
        return grad(loss_fn)(params)

    h = 1e-5
    gp = grad_at(deq, {n: pd[n] + h * v[n] for n in pd})
    gm = grad_at(deq, {n: pd[n] - h * v[n] for n in pd})
    for n in pd:
        if n in qnames:
            continue
        fd = (gp[n] - gm[n]) / (2 * h)
        torch.testing.assert_close(hv_db[n], fd, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hv_fw[n], fd, rtol=1e-6, atol=1e-6)

    # weight block symmetric: u.Hv == v.Hu
    u = random_dir(net, 22, only=lambda n: n not in qnames)
    hu, _ = hvps(net, x, y, u)
    uhv = sum((u[n] * hv_db[n]).sum() for n in u)
    vhu = sum((v[n] * hu[n]).sum() for n in v)
    assert float(uhv) == pytest.approx(float(vhu), rel=1e-10)

    # latent space: a tiny weight move that crosses no rounding boundary leaves the gradient unchanged
    lat = {n: p.detach() for n, p in net.named_parameters()}
    vw = {n: (v[n] if n.endswith("weight") else torch.zeros_like(v[n])) for n in v}
    eps = 1e-9
    moved = {n: lat[n] + eps * vw[n] for n in lat}
    for name, q in iter_quantizers(net, "weight"):
        wname = name.replace("weight_quantizer", "weight")
        assert torch.equal(q.quantize_int(lat[wname]), q.quantize_int(moved[wname]))
    g0, g1 = grad_at(net, lat), grad_at(net, moved)
    for n in lat:
        if n not in qnames:  # (step-size gradients do move: they depend on w/s continuously)
            assert torch.equal(g0[n], g1[n])
