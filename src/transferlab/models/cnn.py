"""The seed study's CNN, trained from scratch on 32x32 inputs (846,308 parameters).

Five blocks of Conv3x3(pad 1)-ReLU-BatchNorm-MaxPool2 with 16/32/64/128/512 channels take a
32x32 image to a 512-vector; the head is Linear(512, 256)-ReLU-Linear(256, 100), as in the seed.

Usage:
    backbone, dim = cnn_backbone()   # dim == 512
"""

from __future__ import annotations

from torch import nn

CHANNELS = (16, 32, 64, 128, 512)  # per the seed's model summary


def cnn_backbone(in_channels: int = 3) -> tuple[nn.Sequential, int]:
    """The seed CNN's convolutional part; returns (module, feature_dim)."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in CHANNELS:
        # Order ReLU before BatchNorm exactly as the seed's summary lists it.
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(c_out),
            nn.MaxPool2d(2),
        ]
        c_in = c_out
    layers.append(nn.Flatten())  # 32 px halved five times -> 1x1, so (N, 512)
    return nn.Sequential(*layers), CHANNELS[-1]
