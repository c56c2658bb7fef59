"""Config: TOML files, typed --set overrides, one-line errors, resolved-config round trip."""

from __future__ import annotations

import pytest

from flatlens.config import (Config, apply_overrides, config_to_toml, describe_options, diff_configs, load_config)
from flatlens.errors import ConfigError


def test_defaults_validate_and_roundtrip_through_toml(tmp_path):
    cfg = load_config(None, ["train.steps=7", "data.test_envs=[1, 2]", "quant.keep_float=['classifier', 'a.b']",
                             "optim.lr=3e-4", "train.name=2024"])
    assert cfg.train.steps == 7 and cfg.data.test_envs == [1, 2] and cfg.optim.lr == 3e-4
    assert cfg.train.name == "2024"  # a string option keeps digits as text
    p = tmp_path / "c.toml"
    p.write_text(config_to_toml(cfg))
    again = load_config(p)
    assert again == cfg and not diff_configs(again.to_dict(), cfg.to_dict())


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nsteps = 11\nseed = 3\n[optim]\nlr = 1\n")
    cfg = load_config(p, ["train.seed=5"])
    assert (cfg.train.steps, cfg.train.seed, cfg.optim.lr) == (11, 5, 1.0)
    assert isinstance(cfg.optim.lr, float)  # int accepted for float and converted


@pytest.mark.parametrize("override, fragment", [
    ("train.stepz=3", "unknown config key 'train.stepz'; valid keys in [train]: algorithm, steps"),
    ("trian.steps=3", "unknown config section 'trian'; valid sections: data, model, optim, train, quant"),
    ("train.steps=abc", "train.steps expects int, got 'abc'"),
    ("train.steps=1.5", "train.steps expects int, got 1.5"),
    ("train.deterministic=1", "train.deterministic expects bool"),
    ("model.arch=vgg", "model.arch = 'vgg' is not one of: bn_cnn"),
    ("data.holdout_fraction=1.5", "data.holdout_fraction = 1.5 must be in (0, 1)"),
    ("train.steps", "--set 'train.steps' must look like section.key=value"),
    ("quant.bits=9", "quant.bits = 9 must be in 2..8"),
    ("train.device=tpu", "train.device = 'tpu' is not one of"),
])
def test_bad_overrides_give_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[training]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[training\]"):
        load_config(unknown)


def test_list_override_forms():
    assert apply_overrides(Config(), ["data.test_envs=0,3"]).data.test_envs == [0, 3]
    assert apply_overrides(Config(), ["data.test_envs=4"]).data.test_envs == [4]


def test_every_option_is_documented():
    rows = describe_options()
    keys = {r[0] for r in rows}
    assert {"train.steps", "quant.q_step", "data.test_envs", "model.freeze_bn"} <= keys
    undocumented = [r[0] for r in rows if not r[3]]
    assert not undocumented, f"options without a docstring: {undocumented}"
