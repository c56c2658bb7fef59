"""Model zoo: every model is a Classifier (featurizer + linear classifier)."""

from __future__ import annotations

from flatlens.models.networks import Classifier, MNISTCNN, bn_cnn, mlp

__all__ = ["Classifier", "build_model"]


def build_model(cfg, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    """The network named by a :class:`flatlens.config.ModelConfig` for this input shape and label count."""
    in_channels = input_shape[0]
    if cfg.arch == "bn_cnn":
        featurizer, n = bn_cnn(in_channels, cfg.width)
    elif cfg.arch == "mnist_cnn":
        featurizer, n = MNISTCNN(in_channels), MNISTCNN.n_outputs
    elif cfg.arch == "mlp":
        featurizer, n = mlp(input_shape, cfg.hidden)
    elif cfg.arch in ("resnet18", "resnet50"):
        from flatlens.models.resnet import resnet

        featurizer, n = resnet(cfg.arch, in_channels, cfg.pretrained)
    else:  # pragma: no cover - validated in config
        raise ValueError(cfg.arch)
    return Classifier(featurizer, n, num_classes, dropout=cfg.dropout, freeze_bn=cfg.freeze_bn)
