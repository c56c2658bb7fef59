"""QAT through the real training engine: optimizer coverage (the QT-DoG guard), every quant.mode,
selection restricted to after-q_step checkpoints, checkpoint round trip, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, flatlens_cmd, tiny_config
from flatlens.checkpoint import load_checkpoint, read_checkpoint
from flatlens.engine.loop import Trainer, train
from flatlens import distributed as D
from flatlens.errors import ConfigError
from flatlens.quant import (LSQQuantizer, assert_all_trainable_in_optimizer, iter_quantizers,
                            quantizer_parameter_names)

CONVS = ("featurizer.0", "featurizer.4", "featurizer.8")  # bn_cnn's three convolutions
BNS = ("featurizer.1", "featurizer.5", "featurizer.9")


def run_trainer(out: Path, *overrides: str) -> Trainer:
    cfg = tiny_config("quant.enabled=true", *overrides)
    trainer = Trainer(cfg, out, D.DistContext(), verbose=False)
    trainer.run()
    return trainer


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def model_sd(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


# ------------------------------------------------------------------ the QT-DoG guard, end to end
@pytest.mark.parametrize("activations", [False, True])
def test_every_trainable_parameter_in_one_group_and_moves_after_one_quantized_step(tmp_path, activations):
    out = tmp_path / "run"
    trainer = run_trainer(out, "train.steps=1", "train.eval_every=1", "quant.q_step=0", "quant.scale_lr=0.01",
                          "optim.weight_decay=0.001", f"quant.activations={str(activations).lower()}")
    model, opt = trainer.model, trainer.algorithm.optimizer
    assert_all_trainable_in_optimizer(model, opt)  # every requires_grad parameter exactly once, nothing stale
    groups = {g["name"]: g for g in opt.param_groups}
    scales = set(quantizer_parameter_names(model))
    named = dict(model.named_parameters())
    assert {id(named[n]) for n in scales} == {id(p) for p in groups["quant_scales"]["params"]}
    assert groups["quant_scales"]["weight_decay"] == 0.0 and groups["quant_scales"]["lr"] == pytest.approx(0.01)
    assert groups["weights"]["weight_decay"] == 0.001
    assert len(scales) == (6 if activations else 3)  # classifier kept float by default

    init, last = model_sd(out / "init.pt"), model_sd(out / "last.pt")
    assert read_checkpoint(out / "last.pt")["quantized"] is True
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert set(scales) <= set(trainable)
    unchanged = [n for n in trainable if torch.equal(init[n], last[n])]
    assert not unchanged, f"parameters not updated by the first quantized step: {unchanged}"
    for name, q in iter_quantizers(model):
        assert q.is_enabled() and q.is_initialized(), name


def test_quantizers_switch_on_at_q_step_with_lsq_init_from_current_weights(tmp_path):
    out = tmp_path / "run"
    run_trainer(out, "train.steps=30", "train.eval_every=10", "quant.q_step=10", "train.keep_checkpoints=true")
    recs = records(out)
    assert [(r["step"], r["quantized"], r["phase"]) for r in recs] == [
        (10, False, "before_q"), (20, True, "after_q"), (30, True, "after_q")]
    assert all(r["q_step"] == 10 and r["quant_mode"] == "qat" for r in recs)
    # model.pt is a quantized checkpoint (selection restricted to after-q_step records)
    sel = read_checkpoint(out / "model.pt")
    assert sel["quantized"] is True and sel["step"] >= 20
    # step sizes before q_step are untouched (no gradient while disabled) ...
    init, s10 = model_sd(out / "init.pt"), model_sd(out / "checkpoints" / "step_000010.pt")
    for c in CONVS:
        assert torch.equal(init[f"{c}.weight_quantizer.step_size"], s10[f"{c}.weight_quantizer.step_size"])
        assert not torch.equal(init[f"{c}.weight"], s10[f"{c}.weight"])
        assert not bool(s10[f"{c}.weight_quantizer.enabled"])


def test_default_q_step_is_40_percent_of_the_run(tmp_path):
    out = tmp_path / "run"
    run_trainer(out, "train.steps=20", "train.eval_every=5")
    assert {r["q_step"] for r in records(out)} == {8}
    assert [r["phase"] for r in records(out)] == ["before_q", "after_q", "after_q", "after_q"]


# ------------------------------------------------------------------ ablation modes
@pytest.mark.parametrize("activations", [False, True])
def test_quantize_and_freeze_holds_conv_weights_and_step_sizes_bit_identical(tmp_path, activations):
    out = tmp_path / "run"
    run_trainer(out, "quant.mode=quantize_and_freeze", "train.steps=30", "train.eval_every=10", "quant.q_step=10",
                "train.keep_checkpoints=true", f"quant.activations={str(activations).lower()}")
    ck = {s: model_sd(out / "checkpoints" / f"step_{s:06d}.pt") for s in (10, 20, 30)}
    assert [r["quantized"] for r in records(out)] == [False, True, True]
    for c in CONVS:
        w = f"{c}.weight"
        # frozen at the value the switch saw (= the weights after step 10) ...
        assert torch.equal(ck[10][w], ck[20][w]) and torch.equal(ck[20][w], ck[30][w])
        s = f"{c}.weight_quantizer.step_size"
        assert torch.equal(ck[20][s], ck[30][s])
        # ... with the LSQ step size initialised from those weights
        q = LSQQuantizer(7, per_channel=True, num_channels=ck[10][w].shape[0])
        assert torch.equal(ck[20][s], q.compute_init(ck[10][w]))
        if activations:
            a = f"{c}.act_quantizer.step_size"
            assert torch.equal(ck[20][a], ck[30][a])
            assert not torch.equal(ck[20][a], torch.ones_like(ck[20][a]))  # captured after its first-batch init
            assert bool(ck[30][f"{c}.act_quantizer.initialized"])
    # the float classifier and BN affine parameters keep training
    for name in ["classifier.weight", "classifier.bias"] + [f"{b}.weight" for b in BNS] + [f"{b}.bias" for b in BNS]:
        assert not torch.equal(ck[20][name], ck[30][name]), name


def test_freeze_without_quant_freezes_the_selected_convs_in_float(tmp_path):
    out = tmp_path / "run"
    run_trainer(out, "quant.mode=freeze_without_quant", "train.steps=30", "train.eval_every=10", "quant.q_step=10",
                "train.keep_checkpoints=true", "quant.keep_float=[\"classifier\", \"featurizer.8\"]")
    ck = {s: model_sd(out / "checkpoints" / f"step_{s:06d}.pt") for s in (10, 20, 30)}
    assert not any("step_size" in k for k in ck[10])  # no quantizers in this mode
    for c in CONVS[:2]:
        assert torch.equal(ck[10][f"{c}.weight"], ck[30][f"{c}.weight"])
    for name in ("featurizer.8.weight", "classifier.weight", "featurizer.1.weight"):
        assert not torch.equal(ck[20][name], ck[30][name]), name
    recs = records(out)
    assert [(r["quantized"], r["phase"]) for r in recs] == [(False, "before_q"), (False, "after_q"), (False, "after_q")]
    assert read_checkpoint(out / "model.pt")["step"] >= 20  # selection among after-q_step checkpoints


def test_noise_hook_semantics_fresh_draw_not_accumulated():
    """uniform_noise: the update runs at w + n with n ~ U(-a, a) drawn from (seed, "quant-noise", step);
    afterwards the weights are the clean ones plus the optimizer's step (exactly the clean ones when
    the optimizer did nothing)."""
    from flatlens.engine.quant_hook import QuantHook
    from flatlens.network import build_network
    from flatlens.quant import sample_uniform_noise
    from flatlens.seeding import generator

    cfg = tiny_config("quant.enabled=true", "quant.mode=uniform_noise", "quant.q_step=3", "quant.noise_a=0.01")
    torch.manual_seed(0)
    model = build_network(cfg, (1, 16, 16), 10)
    hook = QuantHook(cfg, model)
    conv = model.featurizer[0].weight
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook.before_step(2)  # before q_step: nothing
    assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters())
    hook.after_step(2)
    for step in (3, 4):
        hook.before_step(step)
        g = generator(cfg.train.seed, "quant-noise", step)
        expected = sample_uniform_noise(conv.shape, 0.01, g)  # the first selected weight draws first
        assert torch.equal(conv.detach(), clean["featurizer.0.weight"] + expected)
        assert float(expected.abs().max()) <= 0.01 and float(expected.abs().max()) > 0.005
        assert torch.equal(model.classifier.weight, clean["classifier.weight"])  # kept float: no noise
        with torch.no_grad():  # an "optimizer step" taken at the noisy point
            conv.add_(0.5)
        hook.after_step(step)
        torch.testing.assert_close(conv.detach(), clean["featurizer.0.weight"] + 0.5, rtol=0, atol=1e-6)
        with torch.no_grad():
            conv.sub_(0.5)
        clean["featurizer.0.weight"] = conv.detach().clone()
    assert hook.record_fields()["phase"] == "after_q" and not hook.quantized()


def test_matched_noise_uses_the_models_own_step_sizes(tmp_path):
    from flatlens.engine.quant_hook import QuantHook
    from flatlens.network import build_network
    from flatlens.quant import is_quantization_enabled

    cfg = tiny_config("quant.enabled=true", "quant.mode=matched_noise", "quant.q_step=0", "quant.bits=4")
    torch.manual_seed(0)
    model = build_network(cfg, (1, 16, 16), 10)
    hook = QuantHook(cfg, model)
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook.before_step(0)
    assert not is_quantization_enabled(model)
    for name, q in iter_quantizers(model, "weight"):
        w = name.replace("weight_quantizer", "weight")
        s = q.step_size.detach()
        assert torch.equal(s, q.compute_init(clean[w]))  # LSQ init from the weights at q_step
        noise = dict(model.named_parameters())[w].detach() - clean[w]
        bound = (s / 2).reshape(-1, *[1] * (noise.dim() - 1))
        assert bool((noise.abs() <= bound * (1 + 1e-6)).all()) and float(noise.abs().max()) > 0
    hook.after_step(0)
    assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters())

    out = tmp_path / "run"
    run_trainer(out, "quant.mode=matched_noise", "train.steps=20", "train.eval_every=10", "quant.q_step=5")
    recs = records(out)
    assert [(r["quantized"], r["phase"]) for r in recs] == [(False, "after_q"), (False, "after_q")]
    sd5 = model_sd(out / "last.pt")
    assert not bool(sd5["featurizer.0.weight_quantizer.enabled"])


# ------------------------------------------------------------------ checkpoints
def test_quantized_checkpoint_round_trips_through_load_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = run_trainer(out, "train.steps=20", "train.eval_every=10", "quant.q_step=5", "quant.bits=4")
    run = load_checkpoint(out / "last.pt")
    assert run.quantized and run.config.quant.bits == 4
    assert all(q.is_enabled() for _, q in iter_quantizers(run.model))
    x, _ = run.dataset.domains[0].load(run.splits.domains[0].out_idx[:64])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(run.model(x), trainer.model(x))
        # and the fake-quantized weights really are on the 4-bit grid
        for name, q in iter_quantizers(run.model, "weight"):
            w = dict(run.model.named_parameters())[name.replace("weight_quantizer", "weight")]
            codes = q.quantize_int(w)
            assert int(codes.min()) >= -8 and int(codes.max()) <= 7


# ------------------------------------------------------------------ errors
def test_unmatched_pattern_is_a_one_line_config_error_through_the_cli(tmp_path):
    res = flatlens_cmd("train", "--set", "quant.enabled=true", "quant.keep_float=[\"classifer\"]", "train.steps=4",
                       "--out", str(tmp_path / "bad"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "keep_float pattern 'classifer' matches no eligible module" in lines[0]
    assert "classifier" in lines[0]  # lists the eligible names
    assert not (tmp_path / "bad" / "config.toml").exists()


@pytest.mark.parametrize("overrides, match", [
    (["quant.mode=freeze_without_quant", "quant.quantize=[\"featurizer.99\"]"], "quantize pattern 'featurizer.99'"),
    (["quant.mode=uniform_noise", "quant.keep_float=[\"nope\"]"], "keep_float pattern 'nope'"),
    (["quant.q_step=40"], "quant.q_step = 40 is not below train.steps = 40"),
    (["quant.mode=matched_noise", "quant.activations=true"], "quant.activations = true needs"),
])
def test_mode_config_errors_are_one_line(tmp_path, capsys, overrides, match):
    from flatlens.cli import main

    rc = main(["train", "--set", *TINY, "quant.enabled=true", *overrides, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConfigError):
        train(tiny_config("quant.enabled=true", *overrides), tmp_path / "r2", verbose=False)
