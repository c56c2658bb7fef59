"""Model zoo: shapes, featurizer/classifier split, freeze_bn, local-only pretrained ResNet weights."""

from __future__ import annotations

import pytest
import torch

from flatlens.config import load_config
from flatlens.errors import CheckpointError, ConfigError
from flatlens.models import build_model


@pytest.mark.parametrize("arch, shape", [("bn_cnn", (1, 16, 16)), ("mnist_cnn", (2, 28, 28)), ("mlp", (1, 16, 16)),
                                         ("resnet18", (2, 32, 32))])
def test_forward_shapes_and_split(arch, shape):
    cfg = load_config(None, [f"model.arch={arch}"]).model
    m = build_model(cfg, shape, 7)
    x = torch.randn(3, *shape)
    assert m(x).shape == (3, 7)
    assert m.featurizer(x).shape == (3, m.n_features)
    assert [n for n, _ in m.named_children()][-1] == "classifier"


def test_freeze_bn_keeps_running_statistics():
    cfg = load_config(None, ["model.freeze_bn=true"]).model
    m = build_model(cfg, (1, 16, 16), 10).train()
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    m(torch.randn(8, 1, 16, 16))
    after = {k: v for k, v in m.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.training  # the model itself is in training mode (dropout etc. active)
    free = build_model(load_config(None, []).model, (1, 16, 16), 10).train()
    free(torch.randn(8, 1, 16, 16))
    assert not torch.equal(free.featurizer[1].running_mean, torch.zeros(32))


def test_resnet_pretrained_from_local_file_only(tmp_path):
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    path = tmp_path / "resnet18-local.pth"
    torch.save(ref.state_dict(), path)
    m = build_model(load_config(None, ["model.arch=resnet18", f"model.pretrained={path}"]).model, (3, 32, 32), 5)
    assert torch.equal(m.featurizer.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    # two input channels: first conv rebuilt from the RGB filters (DomainBed's rule)
    m2 = build_model(load_config(None, ["model.arch=resnet18", f"model.pretrained={path}"]).model, (2, 32, 32), 5)
    assert torch.equal(m2.featurizer.conv1.weight[:, 1], ref.conv1.weight[:, 1])
    with pytest.raises(ConfigError, match="file not found.*never downloads"):
        build_model(load_config(None, ["model.arch=resnet18", f"model.pretrained={tmp_path / 'x.pth'}"]).model,
                    (3, 32, 32), 5)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="does not fit torchvision resnet18"):
        build_model(load_config(None, ["model.arch=resnet18", f"model.pretrained={bad}"]).model, (3, 32, 32), 5)
