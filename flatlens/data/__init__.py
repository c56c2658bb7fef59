"""DG datasets as lists of domains, their splits, and minibatch streams."""

from __future__ import annotations

from flatlens.data.base import Domain, MultiDomainDataset, TensorDomain
from flatlens.data.splits import DomainSplit, Splits, make_splits

__all__ = ["Domain", "MultiDomainDataset", "TensorDomain", "DomainSplit", "Splits", "make_splits", "build_dataset"]


def build_dataset(cfg) -> MultiDomainDataset:
    """The dataset named by a :class:`flatlens.config.DataConfig`."""
    from flatlens.data.digits import colored_digits, rotated_digits
    from flatlens.data.folders import folder_dataset

    if cfg.dataset == "rotated_digits":
        return rotated_digits(cfg.data_seed, cfg.image_size)
    if cfg.dataset == "colored_digits":
        return colored_digits(cfg.data_seed, cfg.image_size)
    return folder_dataset(cfg.dataset, cfg.root, cfg.image_size, cfg.augment)
