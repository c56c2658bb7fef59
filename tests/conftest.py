"""Shared fixtures: tiny configs and trained runs reused across test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (faster, immune to a busy machine); restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def flatlens_cmd(*args: str, env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m flatlens ARGS`` in a subprocess (as a user would) and capture its output."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flatlens", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


def flat_loss(obj):
    """Ground truth for the measurement tests: the mean cross-entropy of ``obj``'s model on all its batches
    as a function of a flat vector of its parameter space, built with ``torch.func.functional_call``
    (the parameters outside the space held at their values), independently of the HVP kernels."""
    names = obj.space.names
    base = {n: p.detach().clone() for n, p in obj.model.named_parameters()}
    x = torch.cat([b[0] for b in obj.batches])
    y = torch.cat([b[1] for b in obj.batches])

    def f(flat):
        params = dict(base, **dict(zip(names, obj.space.unflatten(flat))))
        return torch.nn.functional.cross_entropy(torch.func.functional_call(obj.model, params, (x,)), y)

    return f


TINY = ["model.width=8", "train.batch_size=16", "train.eval_every=20", "train.steps=40"]


def tiny_config(*overrides: str):
    from flatlens.config import load_config

    return load_config(None, [*TINY, *overrides])


@pytest.fixture(scope="session")
def erm_run(tmp_path_factory) -> Path:
    """A real 150-step ERM run on RotatedDigits (0 degrees held out), trained once per session."""
    from flatlens.config import load_config
    from flatlens.engine.loop import train

    out = tmp_path_factory.mktemp("runs") / "erm"
    cfg = load_config(REPO / "experiments" / "erm_rotated_digits.toml",
                      ["train.steps=150", "train.eval_every=50", "train.keep_checkpoints=true"])
    train(cfg, out, verbose=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny 40-step ERM run (width-8 BN-CNN) for measurement tests."""
    from flatlens.engine.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(), out, verbose=False)
    return out
