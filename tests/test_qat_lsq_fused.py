"""The fused LSQ autograd.Function (``flatlens.quant.lsq._LSQFakeQuant``, the QAT speed-up) against
the plain-op form it replaced: same values bitwise, same gradients, same HVPs (double backward and
forward-over-reverse), and it composes with torch.func (vmap) and forward-mode AD under no_grad."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from flatlens.quant import LSQQuantizer, attach_quantizers, iter_quantizers
from flatlens.quant.lsq import round_pass


def plain(q: LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The pre-fusion implementation: plain autograd ops only."""
    s = q.effective_step(x)
    return round_pass(torch.clamp(x / s, -q.q_n, q.q_p)) * s


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits, signed, per_channel, dtype", [
    (7, True, True, torch.float32), (4, True, False, torch.float32), (2, True, True, torch.float64),
    (8, False, False, torch.float32), (3, False, True, torch.float64),
])
def test_fused_matches_plain_ops_values_and_gradients(bits, signed, per_channel, dtype):
    x = (torch.randn(6, 4, 3, 3, generator=gen(0), dtype=dtype) * 0.1)
    q = LSQQuantizer(bits, signed=signed, per_channel=per_channel, num_channels=6 if per_channel else None).to(dtype)
    q.init_from(x)
    with torch.no_grad():  # push some values out of range on both sides
        x[0, 0] *= 40
        x[1, 1] *= -40
    up = torch.randn(x.shape, generator=gen(1), dtype=dtype)
    grads = []
    for f in (q.fake_quantize, lambda t: plain(q, t)):
        xx = x.clone().requires_grad_(True)
        out = f(xx)
        gx, gs = torch.autograd.grad((out * up).sum(), [xx, q.step_size])
        grads.append((out.detach(), gx, gs))
    (o1, gx1, gs1), (o2, gx2, gs2) = grads
    assert torch.equal(o1, o2)
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # the plain form sums g*q and -g*x/s separately (cancels)
    torch.testing.assert_close(gx1, gx2, rtol=0, atol=tol)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5, atol=tol * float(gs2.abs().max()))
    with torch.no_grad():
        assert torch.equal(q.fake_quantize(x), o2)
        assert torch.equal(q.dequantize(q.quantize_int(x)), o2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_hvps_equal_the_plain_op_form():
    torch.manual_seed(0)
    net = Net().double()
    attach_quantizers(net, bits=4, enabled=True, activations=True, act_signed=True)
    x = torch.randn(5, 2, 6, 6, generator=gen(2), dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=gen(3))
    net.train()
    net(x)
    net.eval()
    params = {n: p.detach() for n, p in net.named_parameters()}
    v = {n: torch.randn(p.shape, generator=gen(4), dtype=p.dtype) for n, p in params.items()}

    def hvp_double_backward() -> dict[str, torch.Tensor]:
        ps = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        loss = F.cross_entropy(functional_call(net, ps, (x,)), y)
        g = torch.autograd.grad(loss, list(ps.values()), create_graph=True)
        dot = sum((gi * v[n]).sum() for gi, n in zip(g, ps))
        return dict(zip(ps, torch.autograd.grad(dot, list(ps.values()))))

    def loss_fn(ps):
        return F.cross_entropy(functional_call(net, ps, (x,)), y)

    fused_db = hvp_double_backward()
    fused_fw = jvp(grad(loss_fn), (params,), (v,))[1]
    originals = {}
    for _, q in iter_quantizers(net):
        originals[q] = q.fake_quantize
        q.fake_quantize = (lambda qq: (lambda t: plain(qq, t)))(q)
    try:
        plain_db = hvp_double_backward()
    finally:
        for q, f in originals.items():
            q.fake_quantize = f
    for n in params:
        torch.testing.assert_close(fused_db[n], plain_db[n], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fused_fw[n], plain_db[n], rtol=1e-9, atol=1e-12)
    assert max(float(h.abs().max()) for h in fused_db.values()) > 1e-3


def test_vmap_of_forward_over_reverse_and_forward_ad_under_no_grad():
    q = LSQQuantizer(4, per_channel=True, num_channels=3)
    x = torch.randn(3, 7, generator=gen(5))
    q.init_from(x)
    xs = torch.randn(4, 3, 7, generator=gen(6))
    assert torch.equal(vmap(q.fake_quantize)(xs), torch.stack([q.fake_quantize(t) for t in xs]))

    def f(t):
        return q.fake_quantize(t).pow(2).sum()

    vs = torch.randn(4, 3, 7, generator=gen(7))
    batched = vmap(lambda t: jvp(grad(f), (x,), (t,))[1])(vs)
    looped = torch.stack([jvp(grad(f), (x,), (t,))[1] for t in vs])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-7)

    tangent = torch.ones_like(x)
    with torch.no_grad(), fwAD.dual_level():  # forward-mode AD is not switched off by no_grad
        out = q.fake_quantize(fwAD.make_dual(x, tangent))
        t = fwAD.unpack_dual(out).tangent
    inside = ((x / q.effective_step(x, scaled=False)).abs() <= q.q_n).to(x.dtype)
    assert torch.equal(t, inside)
