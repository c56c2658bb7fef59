"""Quantization-noise statistics, matched / uniform noise samplers, integer export and the dequant copy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatlens.quant import (
    LSQQuantizer,
    QuantLinear,
    attach_quantizers,
    dequantized_copy,
    dequantized_state_dict,
    export_integer,
    iter_quantizers,
    kl_to_uniform,
    layer_noise_stats,
    load_integer_export,
    quant_noise_stats,
    sample_matched_noise,
    sample_uniform_noise,
    save_integer_export,
    set_quantization_enabled,
    verify_export,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fixed_quantizer(steps, bits=7, **kw) -> LSQQuantizer:
    steps = torch.as_tensor(steps, dtype=F64)
    q = LSQQuantizer(bits, per_channel=steps.numel() > 1, num_channels=steps.numel() if steps.numel() > 1 else None,
                     dtype=F64, **kw)
    q.init_from(torch.ones(steps.numel(), 2, dtype=F64))
    with torch.no_grad():
        q.step_size.copy_(steps)
    return q


def test_kl_estimator_known_values():
    assert kl_to_uniform(np.array([5, 5, 5, 5])) == 0.0
    assert kl_to_uniform(np.array([1, 0, 0, 1])) == pytest.approx(math.log(2))  # empty bins contribute 0
    assert kl_to_uniform(np.array([0, 7, 0, 0])) == pytest.approx(math.log(4))
    assert math.isnan(kl_to_uniform(np.zeros(4)))


def test_uniform_spread_weights_small_kl_and_clipping_counted():
    steps = [0.01, 0.02, 0.05]
    q = fixed_quantizer(steps)
    n = 20000
    s = torch.tensor(steps, dtype=F64).reshape(3, 1)
    w = (torch.rand(3, n, generator=gen(0), dtype=F64) * 100 - 50) * s  # spread over 100 steps
    clipped = torch.zeros(3, n, dtype=torch.bool)
    clipped[1, :200] = True  # 1% of channel 1 far outside the range
    w = torch.where(clipped, 200 * s, w)
    st = layer_noise_stats(w, q, bins=50, name="layer")
    assert st.clip_fraction == pytest.approx(200 / (3 * n))
    np.testing.assert_allclose(st.clip_fraction_per_channel, [0.0, 0.01, 0.0])
    assert st.n_in_range == 3 * n - 200 and st.hist_counts.sum() == st.n_in_range
    assert st.hist_edges[0] == -0.5 and st.hist_edges[-1] == 0.5 and st.hist_counts.shape == (50,)
    assert st.kl_to_uniform < 3 * st.kl_baseline and st.kl_to_uniform < 0.01
    assert st.kl_baseline == pytest.approx(49 / (2 * st.n_in_range))
    assert st.normalized_noise_std == pytest.approx(1 / math.sqrt(12), rel=0.02)
    np.testing.assert_allclose(st.step_size, steps)
    np.testing.assert_allclose(st.sigma_q, np.array(steps) / math.sqrt(12))
    assert st.sigma_q_mean == pytest.approx(np.mean(steps) / math.sqrt(12))
    assert abs(st.noise_mean_per_channel[0]) < 0.01 * steps[0]
    assert st.noise_std_per_channel[0] == pytest.approx(steps[0] / math.sqrt(12), rel=0.02)
    assert st.numel == 3 * n and st.bits == 7 and (st.q_n, st.q_p) == (64, 63)
    d = st.as_dict()
    assert "name" not in d and d["hist_counts"].dtype == np.int64 and d["kl_to_uniform"].shape == ()


def test_concentrated_noise_large_kl():
    q = fixed_quantizer([0.1])
    k = torch.randint(-20, 20, (5000,), generator=gen(3)).to(F64)
    w = (k + 0.27) * 0.1  # every weight 0.27 step above a grid point (away from bin edges)
    st = layer_noise_stats(w, q, bins=20)
    assert st.kl_to_uniform == pytest.approx(math.log(20), rel=1e-6)
    assert st.noise_mean == pytest.approx(-0.027)
    assert st.clip_fraction == 0.0


def test_quant_noise_stats_over_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    attach_quantizers(net, bits=4)
    stats = quant_noise_stats(net, bins=16)
    assert list(stats) == ["0", "3"]
    assert stats["0"].step_size.shape == (8,) and stats["3"].step_size.shape == (3,)
    assert not stats["0"].enabled
    with pytest.raises(ValueError, match="bins"):
        quant_noise_stats(net, bins=0)


def test_matched_noise_range_widths_and_reproducibility():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4))
    attach_quantizers(net, bits=5, keep_float=["3"])
    s = net[0].weight_quantizer.step_size.detach()
    a = sample_matched_noise(net, gen(7))
    b = sample_matched_noise(net, gen(7))
    c = sample_matched_noise(net, gen(8))
    assert list(a) == ["0.weight"]
    assert torch.equal(a["0.weight"], b["0.weight"]) and not torch.equal(a["0.weight"], c["0.weight"])
    n = a["0.weight"]
    assert n.shape == net[0].weight.shape and n.dtype == net[0].weight.dtype
    half = (s / 2).reshape(-1, 1, 1, 1)
    assert bool((n >= -half).all() and (n < half).all())
    width = n.reshape(16, -1).abs().amax(1)
    assert bool((width > 0.8 * s / 2).all())  # each channel uses its own width (27 draws each)
    assert float(s.max() / s.min()) > 1.05  # widths do differ between channels
    # mapping input: (weight, step) with per-output-channel steps
    w = torch.zeros(4, 6, dtype=F64)
    steps = torch.tensor([0.1, 0.2, 0.4, 0.8], dtype=F64)
    m = sample_matched_noise({"w": (w, steps)}, gen(1))["w"]
    assert m.dtype == F64 and bool((m.abs() <= steps.reshape(4, 1) / 2).all())
    with pytest.raises(ValueError, match="does not fit"):
        sample_matched_noise({"w": (w, torch.ones(3))}, gen(1))
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        sample_matched_noise(net, None)


def test_uniform_noise():
    u = sample_uniform_noise((1000,), 5e-5, gen(2))
    assert torch.equal(u, sample_uniform_noise((1000,), 5e-5, gen(2)))
    assert float(u.abs().max()) <= 5e-5 and float(u.abs().max()) > 4.5e-5
    assert sample_uniform_noise([2, 3], 1.0, gen(2), dtype=F64).dtype == F64
    with pytest.raises(ValueError, match="half-width"):
        sample_uniform_noise((3,), -1.0, gen(2))


def model_for_export(activations: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    attach_quantizers(net, bits=7, activations=activations, keep_float=["6"] if not activations else [],
                      quantize=["*"] if not activations else ["4", "6"])
    set_quantization_enabled(net, True)
    x = torch.randn(5, 3, 6, 6, generator=gen(4))
    net.train()
    net(x)  # BN statistics and lazy activation init
    return net.eval(), x


@pytest.mark.parametrize("activations", [False, True])
def test_export_round_trip_exact(tmp_path, activations):
    net, x = model_for_export(activations)
    out_before = net(x)
    state_before = {k: v.clone() for k, v in net.state_dict().items()}
    ex = export_integer(net)
    key = "quant/4.weight"
    assert ex[f"{key}/codes"].dtype == np.int8 and int(ex[f"{key}/bits"]) == 7 and bool(ex[f"{key}/signed"])
    assert ex[f"{key}/step_size"].shape == (8,)
    if not activations:
        assert "float/6.weight" in ex and "float/1.running_mean" in ex and "float/1.num_batches_tracked" in ex
    else:
        assert ex["act/4/step_size"].shape == (1,) and not bool(ex["act/4/signed"])
    assert not any("step_size" in k for k in ex if k.startswith("float/"))
    path = tmp_path / "export.npz"
    save_integer_export(ex, path)
    back = load_integer_export(path)
    assert set(back) == set(ex) and all(np.array_equal(back[k], ex[k]) for k in ex)
    sd = dequantized_state_dict(back)
    for name, m in net.named_modules():
        if hasattr(m, "weight_quantizer"):
            assert torch.equal(sd[f"{name}.weight"], m.weight_quantizer(m.weight).detach())  # bitwise
    assert verify_export(net, back, x) == 0.0
    # the model is untouched
    assert all(torch.equal(v, state_before[k]) for k, v in net.state_dict().items())
    assert torch.equal(net(x), out_before)
    if not activations:
        # the dequantized state dict loads strictly into the plain float architecture
        torch.manual_seed(1)
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
        plain.load_state_dict(sd, strict=True)
        assert torch.equal(plain.eval()(x), out_before)


def test_unsigned_codes_dtype():
    m = QuantLinear.from_float(nn.Linear(2, 2), {"signed": False, "bits": 8, "per_channel": False})
    ex = export_integer(nn.Sequential(m))
    assert ex["quant/0.weight/codes"].dtype == np.uint8


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(2))
    with pytest.raises(ValueError, match="not a flatlens integer export"):
        load_integer_export(path)


def test_dequantized_copy_is_the_dequant_space():
    net, x = model_for_export(activations=False)
    out = net(x)
    deq = dequantized_copy(net)
    assert [n for n, _ in deq.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert all(not q.is_enabled() for _, q in iter_quantizers(deq, "weight"))
    assert all(q.is_enabled() for _, q in iter_quantizers(net, "weight"))  # source untouched
    for (name, m), (_, md) in zip(net.named_modules(), deq.named_modules()):
        if hasattr(m, "weight_quantizer"):
            assert torch.equal(md.weight, m.weight_quantizer(m.weight).detach())
            assert not torch.equal(md.weight, m.weight)
    assert torch.equal(deq(x), out)
    # with activation quantizers kept, the copy still computes the model's function
    net_a, xa = model_for_export(activations=True)
    assert torch.equal(dequantized_copy(net_a)(xa), net_a(xa))
    deq_off = dequantized_copy(net_a, keep_activation_quantizers=False)
    assert all(not q.is_enabled() for _, q in iter_quantizers(deq_off))


def test_dequant_space_says_when_activation_quantizers_stay_on():
    """The dequant copy keeps activation quantizers on (so it computes the model's function); the
    recorded string said "(quantizers off)" for such a model too."""
    from flatlens.measure.objective import Objective

    net, x = model_for_export(activations=True)
    batches = [(x, torch.arange(5) % 3)]
    obj = Objective(net, batches=batches, space="dequant")
    assert obj.differentiated == ("float copy holding the quantized weights w_q (weight quantizers off; activation "
                                  "quantizers on, straight-through)")
    assert obj.loss() == pytest.approx(Objective(net, batches=batches).loss(), rel=1e-6)
    plain, xp = model_for_export(activations=False)
    assert Objective(plain, batches=[(xp, torch.arange(5) % 3)], space="dequant").differentiated == (
        "float copy holding the quantized weights w_q (quantizers off)")


def test_dequantized_copy_leaves_weights_of_disabled_quantizers_float():
    """A disabled weight quantizer does not round its weight in the model's forward (a checkpoint from
    before quantization started, a layer kept in float); the dequant copy used to round it anyway and
    so measured a model that was never evaluated."""
    net, x = model_for_export(activations=False)
    named = list(iter_quantizers(net, "weight"))
    named[0][1].set_enabled(False)
    out = net(x)
    deq = dequantized_copy(net)
    assert torch.equal(deq(x), out)
    off = named[0][0].rsplit(".", 1)[0]
    for name, m in net.named_modules():
        if hasattr(m, "weight_quantizer"):
            md = deq.get_submodule(name)
            expected = m.weight if name == off else m.weight_quantizer(m.weight).detach()
            assert torch.equal(md.weight, expected), name
    for _, q in named:
        q.set_enabled(False)
    deq = dequantized_copy(net)
    assert all(torch.equal(a, b) for a, b in zip(deq.parameters(), net.parameters()))
