"""medaug: medical image augmentation with GANs and a quality gate."""

__version__ = "0.1.0"
