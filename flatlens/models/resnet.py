"""torchvision ResNet-18/50 featurizers with local-only ImageNet weights.

Weights are never downloaded: ``model.pretrained`` names a local torchvision ``state_dict`` file
(e.g. ``resnet50-0676ba61.pth``), loaded with ``weights_only=True``. As in DomainBed the ``fc`` layer
becomes an Identity (the flatlens classifier replaces it) and a first convolution for inputs with
other than 3 channels is rebuilt, its weights copied cyclically from the RGB filters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flatlens.errors import CheckpointError, ConfigError


def resnet(arch: str, in_channels: int, pretrained: str = "") -> tuple[nn.Module, int]:
    """A ResNet featurizer and its feature width (512 for resnet18, 2048 for resnet50)."""
    from torchvision import models

    net = {"resnet18": models.resnet18, "resnet50": models.resnet50}[arch](weights=None)
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained = {pretrained!r}: file not found; give a local torchvision "
                              f"{arch} state_dict (flatlens never downloads weights)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
            raise CheckpointError(f"cannot read pretrained weights {path}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} is not a state_dict of tensors")
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even when strict=False
            raise CheckpointError(f"{path} does not fit torchvision {arch}: {str(exc).splitlines()[-1].strip()}") from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit torchvision {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    n_features = net.fc.in_features
    net.fc = nn.Identity()
    if in_channels != 3:
        old = net.conv1
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        with torch.no_grad():
            for i in range(in_channels):
                new.weight[:, i] = old.weight[:, i % 3]
        net.conv1 = new
    return net, n_features
