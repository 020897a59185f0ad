"""Multi-layer features (``--feature-layers N``): the final features of a frozen backbone with
the pooled outputs of its last N stages beside them, under one head.

Head2Toe's idea (Evci et al., ICML 2022): earlier stages carry information the last one has
partly discarded, and a head that sees them can use it, at the cost of a wider feature vector
and none of another forward pass. Measured on real CIFAR-100 at 64 per class (lite0, one seed,
RESULTS.md): with the pooled outputs of ``blocks[4..6]`` added (1,904 features), the tool's runs
gained 0.23 points (linear head, 64.56 -> 64.79%) and 0.66 (the default MLP, 63.46 -> 64.12%);
benchmarks/head2toe.py, which standardises every feature on the training rows first, gained
1.0 and 1.5. The features are not standardised here.

A timm EfficientNet-style backbone (the stage structure ``models.partial`` knows) is wrapped;
its weights are the same tensors, so the frozen backbone, the feature cache and export work as
for any backbone. The cache key and the engine's memo name the layers.

Usage:
    check_stages(backbone, "timm:tf_efficientnet_lite0", 3)
    taps = LayerTaps(backbone, 3)       # images -> (N, 1280 + 112 + 192 + 320)
    dim = taps.feature_dim
"""

from __future__ import annotations

import torch
from torch import nn


class LayerTaps(nn.Module):
    """``backbone``'s final features, then the average-pooled outputs of its last ``n`` stages
    (the last stage first): one forward pass, shape (N, num_features + their channels)."""

    def __init__(self, backbone: nn.Module, n: int):
        super().__init__()
        self.net = backbone
        self.n = n
        was = backbone.training
        with torch.no_grad():  # the width: one tiny pass in eval mode (BatchNorm stats untouched)
            self.feature_dim = int(self.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
        self.train(was)  # the wrapper and the backbone back in the mode the backbone came in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.net
        x = b.bn1(b.conv_stem(x))
        first = len(b.blocks) - self.n
        pooled = []
        for i, stage in enumerate(b.blocks):
            x = stage(x)
            if i >= first:
                pooled.append(x.mean((2, 3)))
        final = b.forward_head(b.bn2(b.conv_head(x)))
        return torch.cat([final, *reversed(pooled)], 1)
