"""PyHessian 0.1 as an oracle on the same model and batch: top eigenvalue and trace agree within their
tolerances; its quirks (eval mode forced, .grad polluted, global RNG drawn, density() broken on torch 2.x)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import flatlens as fl
from flatlens.measure.objective import Objective
from flatlens.measure.params import model_state_hash
from test_hessian import _data, dense_hessian

pyhessian = pytest.importorskip("pyhessian")
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")

F64 = torch.float64


def _trained_bn_cnn():
    """A BN CNN trained a little (so its top eigenvalue is well separated, as on real nets)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).double()
    (x, y), = _data(n=96, bs=96)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad(set_to_none=True)
    return net.eval(), (x, y)


def _pyhessian(net, batch, seed):
    """PyHessian on a copy (it calls model.eval() and leaves graph-carrying tensors in .grad), with the
    global RNG forked (it draws probes from torch's global generator)."""
    from pyhessian import hessian

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        H = hessian(copy.deepcopy(net), nn.CrossEntropyLoss(), data=batch, cuda=False)
        top, _ = H.eigenvalues()  # defaults: maxIter=100, tol=1e-3, top_n=1
        samples = H.trace(maxIter=300, tol=1e-9)  # a tight tol: it runs all 300 probes (its default stops at noise)
    return top[0], np.asarray(samples), H


@pytest.fixture(scope="module")
def setup(one_thread):
    net, batch = _trained_bn_cnn()
    obj = Objective(net, batches=[batch], include=("all",), kernel="graph_reuse")  # PyHessian takes every parameter
    return net, batch, obj


def test_top_eigenvalue_and_trace_agree_with_pyhessian(setup):
    net, batch, obj = setup
    state = model_state_hash(net)
    top, samples, _ = _pyhessian(net, batch, seed=0)
    eig = fl.hessian.eigenvalues(obj, k=1, tol=1e-3)
    truth = torch.linalg.eigvalsh(dense_hessian(obj))
    # both within their tolerances of the truth; ours certified, PyHessian's by its (uncertified) rule
    assert abs(eig.values[0] - truth[-1]) <= float(eig.residuals[0]) and eig.rel_error_bound[0] <= 1e-3 * (1 + 1e-12)
    assert top == pytest.approx(float(truth[-1]), rel=3e-3)
    assert top == pytest.approx(float(eig.values[0]), rel=3e-3)
    # traces: agree within 3 combined standard errors (PyHessian's from its 300 Hutchinson samples)
    tr = fl.hessian.trace(obj, rtol=0.01, max_hvp=150)
    se_py = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(tr.estimate - samples.mean()) <= 3 * np.hypot(tr.stderr, se_py)
    assert tr.ci_low <= float(truth.sum()) <= tr.ci_high
    assert tr.n_hvp < len(samples) and tr.stderr < se_py  # Hutch++: a tighter CI from fewer HVPs
    assert model_state_hash(net) == state


def test_pyhessian_quirks_and_our_density(setup):
    net, batch, obj = setup
    net.train()
    net[4].weight.grad = None
    rng = torch.get_rng_state()
    from pyhessian import hessian

    H = hessian(net, nn.CrossEntropyLoss(), data=batch, cuda=False)
    assert not net.training  # it forces eval mode on the caller's model
    assert net[4].weight.grad is not None and net[4].weight.grad.requires_grad  # .grad holds a graph
    H.trace(maxIter=3)
    assert not torch.equal(torch.get_rng_state(), rng)  # it draws from the global RNG
    with pytest.raises((AttributeError, RuntimeError)):
        H.density(iter=5, n_v=1)  # torch.eig was removed in torch 2
    net.eval()
    net.zero_grad(set_to_none=True)
    # ours: works on torch 2.x, the density integrates to 1 and its support covers the exact spectrum
    ev = torch.linalg.eigvalsh(dense_hessian(obj))
    d = fl.hessian.density(obj, n_probes=3, n_steps=30)
    assert float(d.values.sum() * (d.grid[1] - d.grid[0])) == pytest.approx(1.0, abs=1e-3)
    assert d.spectrum_bounds[1] == pytest.approx(float(ev[-1]), rel=1e-3)
