"""The embedded default data: scikit-learn's bundled 8x8 handwritten digits as DG benchmarks.

No download: ``sklearn.datasets.load_digits`` ships its 1,797 images inside the package. Two
benchmarks follow DomainBed's synthetic MNIST ones (``domainbed/datasets.py``):

* :func:`rotated_digits` — 6 domains rotated by 0, 15, 30, 45, 60, 75 degrees, 10 classes. The
  images are shuffled once and dealt round-robin, so every domain is a disjoint part of the images.
* :func:`colored_digits` — 3 environments (+90%, +80%, -90%), binary label ``digit < 5`` flipped with
  probability 0.25, colour = label XOR Bernoulli(e) with e = 0.1, 0.2, 0.9, two colour channels.

Unlike DomainBed, which draws the shuffle and the noise from the global RNG after seeding it with the
run seed (so every run of a sweep sees different domains), the domains here depend on ``data_seed``
alone: every algorithm and every trial sees identical domains.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flatlens.data.base import MultiDomainDataset, TensorDomain
from flatlens.errors import DataError
from flatlens.seeding import generator

ROTATIONS = (0, 15, 30, 45, 60, 75)
COLOR_ENVIRONMENTS = (("+90%", 0.1), ("+80%", 0.2), ("-90%", 0.9))
LABEL_NOISE = 0.25


def _digits_csv() -> Path | None:
    """The data file bundled in scikit-learn (found without importing sklearn, which takes ~1 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _load_sklearn_digits() -> tuple[Tensor, Tensor]:
    """(1797, 1, 8, 8) float images in [0, 1] and int64 labels, from scikit-learn's bundled file.

    Reads the same ``digits.csv.gz`` that ``sklearn.datasets.load_digits`` reads (64 pixel columns
    0..16, then the label); falls back to ``load_digits`` if the file moved in a future release.
    """
    path = _digits_csv()
    if path is not None:
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, target = data[:, :-1], data[:, -1]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
            raise DataError("the digits datasets need scikit-learn: pip install scikit-learn") from exc
        digits = load_digits()
        pixels, target = digits.data.astype(np.float32), digits.target
    images = torch.from_numpy(pixels.reshape(-1, 1, 8, 8).copy()) / 16.0
    labels = torch.as_tensor(target, dtype=torch.int64)
    return images, labels


def _resize(images: Tensor, size: int) -> Tensor:
    if size == images.shape[-1]:
        return images.clone()
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate (N, C, H, W) images counter-clockwise about their centre, bilinear, zero fill."""
    if degrees == 0:
        return images.clone()
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps output coords to input coords (y pointing down); this matrix gives the same
    # counter-clockwise rotation as torchvision's rotate, which DomainBed's RotatedMNIST uses.
    mat = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(mat.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)


def _deal(n: int, n_envs: int, data_seed: int, name: str) -> list[Tensor]:
    perm = torch.randperm(n, generator=generator(data_seed, name, "shuffle"))
    return [perm[i::n_envs] for i in range(n_envs)]


def rotated_digits(data_seed: int = 0, image_size: int = 16) -> MultiDomainDataset:
    """RotatedDigits: 6 rotation domains, 10 classes, 1 channel, ``image_size`` x ``image_size``."""
    images, labels = _load_sklearn_digits()
    images = _resize(images, image_size)
    domains = []
    for angle, idx in zip(ROTATIONS, _deal(len(labels), len(ROTATIONS), data_seed, "rotated_digits")):
        domains.append(TensorDomain(str(angle), rotate(images[idx], angle), labels[idx]))
    return MultiDomainDataset(
        name="rotated_digits", domains=domains, num_classes=10, input_shape=(1, image_size, image_size),
        class_names=[str(c) for c in range(10)],
        info={"data_seed": data_seed, "source": "sklearn.datasets.load_digits", "rotations": list(ROTATIONS)},
    )


def colored_digits(data_seed: int = 0, image_size: int = 16) -> MultiDomainDataset:
    """ColoredDigits: 3 environments, binary label with 25% noise, colour-label correlation per env."""
    images, digits = _load_sklearn_digits()
    images = _resize(images, image_size)
    domains = []
    parts = _deal(len(digits), len(COLOR_ENVIRONMENTS), data_seed, "colored_digits")
    for (env_name, e), idx in zip(COLOR_ENVIRONMENTS, parts):
        g = generator(data_seed, "colored_digits", env_name)
        label = (digits[idx] < 5).long()
        label ^= (torch.rand(len(idx), generator=g) < LABEL_NOISE).long()
        color = label ^ (torch.rand(len(idx), generator=g) < e).long()
        x = images[idx].repeat(1, 2, 1, 1)
        x[torch.arange(len(idx)), 1 - color] = 0.0  # keep only the channel of this sample's colour
        domains.append(TensorDomain(env_name, x, label))
    return MultiDomainDataset(
        name="colored_digits", domains=domains, num_classes=2, input_shape=(2, image_size, image_size),
        class_names=["digit>=5", "digit<5"],
        info={"data_seed": data_seed, "source": "sklearn.datasets.load_digits", "label_noise": LABEL_NOISE,
              "color_flip": [e for _, e in COLOR_ENVIRONMENTS]},
    )
