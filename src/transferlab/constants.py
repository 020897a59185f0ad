"""Normalisation constants, in one place. Never copy these numbers into other modules.

Usage:
    from transferlab.constants import CIFAR100_MEAN, CIFAR100_STD
"""

# Per-channel statistics of the CIFAR-100 training set, as used by the seed study for its CNN
# (../shared/seed: "For Normal CNN Network").
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

# ImageNet statistics (torchvision IMAGENET1K_V1 transforms; the seed's "Transfer Learning
# Network").
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-Lite (TF reference port) expects inputs in [-1, 1]: mean = std = 0.5.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

CIFAR_IMAGE_SIZE = 32
PRETRAINED_IMAGE_SIZE = 224
