"""Shared pieces of the attack tests: a tiny CPU network, seeded 8-bit images and the budget check."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from closedloop.attacks.engine import compute_realised_eps

SIZE = 32


class TinyNet(nn.Module):
    """(N, 3, 32, 32) in [0, 1] → (N, n_outputs); BatchNorm so train mode would couple images."""

    def __init__(self, n_outputs: int, seed: int = 0, scale: float = 10.0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Linear(256, n_outputs)
        self.scale = scale
        with torch.no_grad():
            self.body[1].running_mean.uniform_(-0.1, 0.1)
            self.body[1].running_var.uniform_(0.5, 1.5)

    def forward(self, images):
        return self.scale * self.head(self.body(images - 0.5))


def make_images(n: int, seed: int = 0) -> np.ndarray:
    """Uniform random 8-bit images, uint8 (n, 32, 32, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def check_budget(pixels: np.ndarray, clean: np.ndarray, eps) -> np.ndarray:
    """Assert uint8 images of the clean shape within their budgets; return the realised norms (n_images,)."""
    realised = compute_realised_eps(pixels, clean)
    assert pixels.dtype == np.uint8 and pixels.shape == clean.shape
    assert (realised <= np.broadcast_to(eps, realised.shape)).all(), (realised, eps)
    return realised
