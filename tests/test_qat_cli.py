"""QAT next to ERM on RotatedDigits, `flatlens collect` side by side, `flatlens export` and
`flatlens ensemble` (EoQ)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from flatlens.checkpoint import load_checkpoint, read_checkpoint
from flatlens.cli import main
from flatlens.engine.ensemble import evaluate_ensemble, load_members, model_size
from flatlens.engine.loop import train
from flatlens.errors import DataError

SEEDS = ["train.seed=3", "train.trial_seed=0"]
RUN = ["train.steps=60", "train.eval_every=20", "quant.q_step=20"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """ERM and 7-bit weight-only QAT with the same seeds, a second QAT seed, and two misfits."""
    root = tmp_path_factory.mktemp("qat_cli")
    specs = {
        "erm": [*RUN, *SEEDS],
        "qat": [*RUN, *SEEDS, "quant.enabled=true", "quant.bits=7", "quant.activations=false"],
        "qat_s1": [*RUN, "train.seed=1", "train.trial_seed=0", "quant.enabled=true", "quant.bits=7"],
        "noise": [*RUN, *SEEDS, "quant.enabled=true", "quant.mode=uniform_noise", "quant.noise_a=0.001"],
        "other_trial": ["train.steps=10", "train.eval_every=10", "train.trial_seed=5"],
        "other_data": ["train.steps=10", "train.eval_every=10", "data.data_seed=7"],
    }
    out = {}
    for name, ov in specs.items():
        out[name] = root / ("pair" if name in ("erm", "qat") else "others") / name
        train(tiny_config(*ov), out[name], verbose=False)
    return out


def recs(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "results.jsonl").read_text().splitlines()]


def test_qat_and_erm_both_train_and_collect_shows_them_side_by_side(runs, capsys):
    for name in ("erm", "qat"):
        r = recs(runs[name])
        src = [sum(x[f"env{i}_out_acc"] for i in range(1, 6)) / 5 for x in r]
        assert r[-1]["loss"] < r[0]["loss"] and src[-1] > 0.2, (name, src)  # chance is 0.1
    assert [x["quantized"] for x in recs(runs["qat"])] == [False, True, True]
    assert [x["step"] for x in recs(runs["qat"])] == [x["step"] for x in recs(runs["erm"])]

    assert main(["collect", str(runs["erm"].parent), "--selection", "training_domain_val"]) == 0
    text = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()[3:] if line.strip()}
    assert set(rows) == {"erm", "erm+qat7", "erm+qat7 (any checkpoint)"}, text

    def cell(label: str) -> float:
        return float(rows[label].split()[1 if label == "erm" else len(label.split())])

    # the selected checkpoint's target accuracy, restricted to quantized checkpoints vs unrestricted
    qrecs = recs(runs["qat"])
    best_q = max((r for r in qrecs if r["quantized"]), key=lambda r: sum(r[f"env{i}_out_acc"] for i in range(1, 6)))
    best_any = max(qrecs, key=lambda r: sum(r[f"env{i}_out_acc"] for i in range(1, 6)))
    assert cell("erm+qat7") == pytest.approx(round(100 * best_q["env0_in_acc"], 1))
    assert cell("erm+qat7 (any checkpoint)") == pytest.approx(round(100 * best_any["env0_in_acc"], 1))
    assert read_checkpoint(runs["qat"] / "model.pt")["quantized"] is True


def test_noise_mode_selects_after_q_step_and_labels_its_rows(runs, capsys):
    sel = read_checkpoint(runs["noise"] / "model.pt")
    assert sel["quantized"] is False and sel["step"] > 20 and sel["metrics"]["phase"] == "after_q"
    assert main(["collect", str(runs["noise"] / "results.jsonl"), "--selection", "last"]) == 0
    text = capsys.readouterr().out
    assert "erm+uniform_noise (any checkpoint)" in text


def test_export_writes_integer_codes_and_reproduces_the_forward_exactly(runs, capsys, tmp_path):
    out = tmp_path / "qat.npz"
    assert main(["export", str(runs["qat"] / "model.pt"), str(out)]) == 0
    text = capsys.readouterr().out
    assert "= 0 (bitwise equal)" in text and "3 quantized layer(s)" in text
    with np.load(out, allow_pickle=False) as data:
        codes = {k: data[k] for k in data.files if k.endswith("/codes")}
        assert len(codes) == 3 and all(v.dtype == np.int8 for v in codes.values())
        assert all(v.min() >= -64 and v.max() <= 63 for v in codes.values())
        assert "float/classifier.weight" in data.files and int(data["meta/step"]) == read_checkpoint(
            runs["qat"] / "model.pt")["step"]
    # the dequantized export reproduces the checkpoint's forward on the target data
    from flatlens.quant import dequantized_state_dict, load_integer_export

    run = load_checkpoint(runs["qat"] / "model.pt", data=False)
    sd = dequantized_state_dict(load_integer_export(out))
    with torch.no_grad():
        for i in (0, 4, 8):
            assert torch.equal(sd[f"featurizer.{i}.weight"], run.model.featurizer[i].quantized_weight())


def test_export_refuses_a_model_without_quantizers(runs, capsys, tmp_path):
    assert main(["export", str(runs["erm"] / "model.pt"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "has no quantized layers" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()


def test_ensemble_combines_logits_and_reports_sizes(runs, capsys, tmp_path):
    members = load_members([runs["qat"], runs["qat_s1"] / "model.pt"])
    res = evaluate_ensemble(members, combine="logits")
    # by hand on one split
    run0 = members[0]
    env, idx = run0.splits.indices("env0_in")
    x, y = run0.dataset.domains[env].load(idx)
    with torch.no_grad():
        logits = torch.stack([m.model(x) for m in members])
    by_hand = float((logits.mean(0).argmax(1) == y).double().mean())
    assert res.ensemble_acc["env0_in"] == pytest.approx(by_hand)
    assert res.member_acc["env0_in"][1] == pytest.approx(float((logits[1].argmax(1) == y).double().mean()))
    probs = evaluate_ensemble(members, combine="probs")
    p_hand = float((F.softmax(logits, -1).mean(0).argmax(1) == y).double().mean())
    assert probs.ensemble_acc["env0_in"] == pytest.approx(p_hand)
    # size: quantized conv weights at 7 bits, classifier / BN / step sizes at 32, vs one float model
    size = model_size(run0.model)
    n_conv = sum(p.numel() for n, p in run0.model.named_parameters() if n.endswith(".weight") and "featurizer" in n
                 and p.dim() == 4)
    assert size.n_quantized == n_conv and size.bits == [7]
    assert size.size_bits == 7 * n_conv + 32 * (size.n_params - n_conv)
    assert res.relative_size == pytest.approx(2 * size.size_bits / size.float_bits)
    assert 2 * 7 / 32 < res.relative_size < 2 * 0.5

    out = tmp_path / "ens.json"
    assert main(["ensemble", str(runs["qat"]), str(runs["qat_s1"]), str(runs["erm"]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "combine = logits" in text and "-> ensemble" in text and "x one float model" in text
    data = json.loads(out.read_text())
    assert data["combine"] == "logits" and len(data["members"]) == 3
    assert set(data["ensemble_acc"]) == {f"env{i}_{p}" for i in range(6) for p in ("in", "out")}
    assert data["target_acc"]["ensemble"] == pytest.approx(data["ensemble_acc"]["env0_in"])
    assert data["relative_size"] == pytest.approx(2 * size.size_bits / size.float_bits + 1.0)


@pytest.mark.parametrize("misfit, match", [("other_trial", "other in/out splits"), ("other_data", "other data")])
def test_ensemble_refuses_members_with_other_data_or_splits(runs, capsys, misfit, match):
    with pytest.raises(DataError, match=match):
        load_members([runs["erm"], runs[misfit]])
    assert main(["ensemble", str(runs["erm"]), str(runs[misfit])]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
