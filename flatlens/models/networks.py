"""Small networks: the default BN-CNN, DomainBed's MNIST-CNN, and an MLP for tests.

Every model is a :class:`Classifier` = ``featurizer`` (inputs -> feature vector) + ``classifier``
(one Linear layer), DomainBed's split, so that algorithms and measures can address either part by
module name (``featurizer.*``, ``classifier``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Classifier(nn.Module):
    """featurizer -> (dropout) -> linear classifier; ``freeze_bn`` keeps BatchNorm in eval mode."""

    def __init__(self, featurizer: nn.Module, n_features: int, num_classes: int, dropout: float = 0.0,
                 freeze_bn: bool = False) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(n_features, num_classes)
        self.n_features = n_features
        self.freeze_bn = freeze_bn

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.featurizer(x)))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def bn_cnn(in_channels: int, width: int = 32) -> tuple[nn.Module, int]:
    """Three conv-BN-ReLU blocks (width, 2w, 4w channels), max-pooling between, global average pool."""
    w1, w2, w3 = width, 2 * width, 4 * width
    net = nn.Sequential(
        nn.Conv2d(in_channels, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(w2, w3, 3, padding=1, bias=False), nn.BatchNorm2d(w3), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return net, w3


class MNISTCNN(nn.Module):
    """DomainBed's ``MNIST_CNN`` (``domainbed/networks.py``): 4 convs with GroupNorm(8), 128 features."""

    n_outputs = 128

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.bn0 = nn.GroupNorm(8, 64)
        self.bn1 = nn.GroupNorm(8, 128)
        self.bn2 = nn.GroupNorm(8, 128)
        self.bn3 = nn.GroupNorm(8, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn0(torch.relu(self.conv1(x)))
        x = self.bn1(torch.relu(self.conv2(x)))
        x = self.bn2(torch.relu(self.conv3(x)))
        x = self.bn3(torch.relu(self.conv4(x)))
        return self.avgpool(x).flatten(1)


def mlp(input_shape: tuple[int, ...], hidden: list[int]) -> tuple[nn.Module, int]:
    """Flatten -> [Linear -> ReLU] per hidden width."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(math.prod(input_shape))
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    return nn.Sequential(*layers), width
