"""Lanczos started from the gradient (``eigenvalues(start=...)``): same certified answers as the dense
Hessian, free under graph_reuse, one gradient otherwise, the auto rule, fallbacks and errors."""

from __future__ import annotations

import pytest
import torch

import flatlens as fl
from flatlens.errors import FlatlensError
from flatlens.measure.objective import Objective
from test_hessian import CASES, _bn_cnn, _data, dense_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", ["mlp", "bn_cnn", "quant_dequant"])
def test_gradient_start_gives_the_dense_top_eigenvalues(case, k):
    obj = CASES[case]()
    top = torch.linalg.eigvalsh(dense_hessian(obj)).flip(0)[:k]
    grads_before = obj.n_grad
    eig = fl.hessian.eigenvalues(obj, k=k, tol=1e-7, max_iter=obj.space.numel)  # auto: gradient for the top
    assert eig.start == "gradient" and eig.all_converged
    assert torch.allclose(eig.values.to(top.dtype), top, rtol=1e-4, atol=0)
    free = obj.hvp_engine.kernel == "graph_reuse"
    assert eig.n_grad == (0 if free else 1) and obj.n_grad - grads_before == eig.n_grad
    rnd = fl.hessian.eigenvalues(obj, k=k, tol=1e-7, max_iter=obj.space.numel, start="random")
    assert rnd.start == "random" and rnd.n_grad == 0
    assert torch.allclose(rnd.values.to(top.dtype), top, rtol=1e-4, atol=0)


def test_graph_reuse_gradient_comes_with_the_graphs_and_equals_grad():
    obj = Objective(_bn_cnn(), batches=_data(), kernel="graph_reuse")
    eng = obj.hvp_engine
    calls = []
    inner = eng.loss_fn
    eng.loss_fn = lambda params, batch: (calls.append(1), inner(params, batch))[1]
    g, spent = obj.hvp_gradient()
    assert not spent and len(calls) == len(obj.batches)  # the retained graphs were built: one forward per batch
    g2, _ = obj.hvp_gradient()
    assert len(calls) == len(obj.batches) and torch.equal(g, g2)  # no second pass
    obj.hvp(torch.ones(obj.space.numel, dtype=g.dtype))  # the HVP reuses those graphs
    assert len(calls) == len(obj.batches)
    eng.loss_fn = inner
    assert torch.allclose(g, obj.grad(), rtol=1e-10, atol=1e-13)
    with torch.no_grad():  # an in-place change of a parameter rebuilds the graphs and the gradient
        obj.space.params[0].add_(0.01)
    try:
        g3, _ = obj.hvp_gradient()
        assert not torch.equal(g3, g) and torch.allclose(g3, obj.grad(), rtol=1e-10, atol=1e-13)
    finally:
        with torch.no_grad():
            obj.space.params[0].sub_(0.01)


def test_auto_rule_and_bad_starts():
    obj = CASES["mlp"]()
    assert fl.hessian.eigenvalues(obj, k=2).start == "gradient"  # top eigenvalues alone: gradient start
    assert fl.hessian.eigenvalues(obj, k=1, k_bottom=1).start == "random"  # the bottom too: random start
    assert fl.hessian.eigenvalues(obj, k=0, k_bottom=2).start == "random"
    assert fl.hessian.eigenvalues(obj, k=2, start="random").start == "random"
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    bare = fl.hessian.eigenvalues(A, k=1, tol=1e-8)  # an operator has no gradient: auto is random
    assert bare.start == "random" and float(bare.values[0]) == pytest.approx(20.0, rel=1e-8)
    with pytest.raises(FlatlensError, match="start='gradient' needs an Objective"):
        fl.hessian.eigenvalues(A, k=1, start="gradient")
    with pytest.raises(FlatlensError, match="start='power' is not a start vector; pass one of auto, random, gradient"):
        fl.hessian.eigenvalues(obj, start="power")


def test_zero_gradient_falls_back_to_the_random_start(monkeypatch):
    obj = CASES["mlp"]()
    monkeypatch.setattr(obj, "hvp_gradient", lambda: (torch.zeros(obj.space.numel, dtype=torch.float64), False))
    eig = fl.hessian.eigenvalues(obj, k=1, tol=1e-8, seed=4)
    rnd = fl.hessian.eigenvalues(obj, k=1, tol=1e-8, seed=4, start="random")
    assert eig.start.startswith("random (zero") and eig.n_hvp == rnd.n_hvp
    assert float(eig.values[0]) == pytest.approx(float(rnd.values[0]), rel=1e-12)


def test_start_is_stored_and_seeded(tmp_path):
    obj = CASES["mlp"]()
    a = fl.hessian.eigenvalues(obj, k=1, seed=3)
    b = fl.hessian.eigenvalues(obj, k=1, seed=3)
    assert torch.equal(a.values, b.values) and a.n_hvp == b.n_hvp
    a.write(tmp_path / "a.h5")
    attrs = fl.hessian.read(tmp_path / "a.h5")["attrs"]
    assert attrs["eigenvalue_start"] == "gradient" and attrs["eigenvalue_n_grad"] == 0
    assert "gradient start" in dict(a.summary())["eigenvalue cost"]
