"""The theory-check scripts in experiments/ say what they claim, on a smooth model with a known answer
and on a real (tiny) QAT checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import flatlens as fl
from flatlens.measure.params import model_state_hash

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smooth_quantized_objective() -> fl.Objective:
    """A 4-bit, per-channel quantized tanh MLP in float64: smooth, so the quadratic model is exact to O(s^4)."""
    from flatlens.quant import attach_quantizers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    attach_quantizers(net, enabled=True, bits=4, keep_float=[])
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 6, generator=gen, dtype=torch.float64), torch.arange(48) % 4
    with torch.no_grad():
        net(x)  # initialises the step sizes from the weights
    return fl.Objective(net.eval(), batches=[(x, y)], space="dequant", kernel="double_backward")


def test_quant_noise_check_on_a_smooth_model_finds_the_qgen_term():
    """E[q] is what the noise term estimates (an s^2/12 or a per-tensor step slip would be off by 2x or
    more), the loss increase matches it within the intervals, and the part the quadratic model misses
    falls off as scale^4."""
    qnc = _script("quant_noise_check")
    obj = _smooth_quantized_objective()
    before = model_state_hash(obj.model)
    res = qnc.check(obj, [0.5, 0.1], draws=200, seed=3, max_hvp=200)
    assert model_state_hash(obj.model) == before
    assert len(res["layers"]) == 2 and min(res["noise_terms"]) > 0
    for row in res["rows"]:
        lo, hi = row["predicted_ci"]
        assert lo <= row["predicted"] <= hi
        for key in ("quadratic", "measured"):
            assert abs(row[key] - row["predicted"]) <= row[f"{key}_ci"] + (hi - lo) / 2, (key, row)
        assert abs(row["missed"]) <= abs(row["missed_ci"]) + 0.02 * row["predicted"], row
    big, small = res["rows"]
    assert big["predicted"] == pytest.approx(25 * small["predicted"])  # the term scales as the step squared
    assert abs(small["missed"]) / small["predicted"] < 0.2 * abs(big["missed"]) / big["predicted"] + 1e-3


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> Path:
    from flatlens.engine.loop import train

    out = tmp_path_factory.mktemp("runs") / "qat"
    train(tiny_config("quant.enabled=true", "quant.bits=4", "quant.activations=false", "quant.q_step=10"), out,
          verbose=False)
    return out


def test_quant_noise_check_runs_on_a_qat_checkpoint(qat_run, capsys):
    qnc = _script("quant_noise_check")
    assert qnc.main([str(qat_run / "model.pt"), "--samples", "32", "--scales", "1,0.1", "--draws", "4",
                     "--max-hvp", "40"]) == 0
    out = capsys.readouterr().out
    assert "32 samples of source-val, dequant space" in out and "sum_c s_c^2/24 tr(H_cc) =" in out
    assert out.count("\n     1 ") == 1 and out.count("\n   0.1 ") == 1  # one row per scale
    assert qnc.main([str(REPO / "nowhere.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
