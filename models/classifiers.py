"""Classifiers for the behavioural pipeline: 9-way "Restricted ImageNet" on top of 1000-way networks.

Gaziv, Lee & DiCarlo: each of the nine coarse categories scores the maximum of the 1000-way
ImageNet logits over an inclusive range of class indices.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RESTRICTED_IMAGENET_RANGES", "RestrictedImageNet"]

# (category, first ImageNet index, last ImageNet index), both inclusive.
RESTRICTED_IMAGENET_RANGES: tuple[tuple[str, int, int], ...] = (
    ("dog", 151, 268),
    ("cat", 281, 285),
    ("frog", 30, 32),
    ("turtle", 33, 37),
    ("bird", 80, 100),
    ("primate", 365, 382),
    ("fish", 389, 397),
    ("crab", 118, 121),
    ("insect", 300, 319),
)


class RestrictedImageNet(nn.Module):
    """Wrap a 1000-way ImageNet network; forward returns the 9 category logits (N, 9).

    ``network``: images (N, 3, H, W) in [0, 1] → logits (N, 1000) (normalisation inside it).
    Category k's logit is the max of the network's logits over ``RESTRICTED_IMAGENET_RANGES[k]``;
    ``category_names`` gives the names in that order.
    """

    category_names: tuple[str, ...] = tuple(name for name, _, _ in RESTRICTED_IMAGENET_RANGES)

    def __init__(self, network: nn.Module):
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"'network' must be a torch.nn.Module returning (N, 1000) logits, but got {type(network).__name__}.")
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.network(images)
        if logits.dim() != 2 or logits.shape[1] != 1000:
            raise ValueError(f"RestrictedImageNet needs (N, 1000) ImageNet logits from 'network', but got {tuple(logits.shape)}.")
        return torch.stack([logits[:, first : last + 1].amax(dim=1) for _, first, last in RESTRICTED_IMAGENET_RANGES], dim=1)
