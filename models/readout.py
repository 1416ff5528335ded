"""The factorized readout (Klindt et al. 2017): per site, a spatial mask times channel weights.

For site ``s`` and a feature map ``x`` of shape (C, H, W)::

    z_s = (1 / sqrt(C·H·W)) · Σ_c Σ_hw  w_c[s, c] · w_s[s, h, w] · x[c, h, w]  +  b_s

Day-0 initialisation follows Guo et al.: ``w_c ~ N(0, 1)``, ``w_s ~ N(0, 1)``, ``b = 0``. The fixed
factor ``1/sqrt(C·H·W)`` keeps the output of a random readout on the scale of the features
(unit-variance features give unit-variance outputs) without changing those weight statistics.
With ``positive=True`` the effective weights are ``|w_c|`` and ``|w_s|``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from closedloop.core.validation import check_integer

__all__ = ["FactorizedReadout"]


class FactorizedReadout(nn.Module):
    """Feature maps (N, C, H, W) → (N, n_sites) readout values (before the output nonlinearity).

    ``in_shape``: (C, H, W) of one image's features, or (C,) for flattened features (then the
    spatial mask is a single weight). Parameters: ``spatial`` (n_sites, H, W), ``channel``
    (n_sites, C), ``bias`` (n_sites,). ``seed`` draws the N(0, 1) initial weights from a private
    generator.
    """

    def __init__(self, n_sites: int, in_shape: tuple[int, ...], *, positive: bool = False, seed: int = 0) -> None:
        super().__init__()
        check_integer("n_sites", n_sites, minimum=1)
        check_integer("seed", seed, minimum=0)
        in_shape = tuple(in_shape)
        if len(in_shape) not in (1, 3) or not all(isinstance(n, int) and n >= 1 for n in in_shape):
            raise ValueError(f"'in_shape' must be (C, H, W) or (C,) with positive integers, but got {in_shape}.")
        self.in_shape = in_shape
        self.positive = bool(positive)
        channels, height, width = in_shape if len(in_shape) == 3 else (in_shape[0], 1, 1)
        generator = torch.Generator().manual_seed(seed)
        self.spatial = nn.Parameter(torch.randn(n_sites, height, width, generator=generator))
        self.channel = nn.Parameter(torch.randn(n_sites, channels, generator=generator))
        self.bias = nn.Parameter(torch.zeros(n_sites))
        self.scale = 1.0 / math.sqrt(channels * height * width)

    @property
    def n_sites(self) -> int:
        return self.bias.shape[0]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (spatial (n_sites, H, W), channel (n_sites, C)) weights."""
        if self.positive:
            return self.spatial.abs(), self.channel.abs()
        return self.spatial, self.channel

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[1:]) != self.in_shape:
            raise ValueError(
                f"'features' must have shape (n_images, {', '.join(map(str, self.in_shape))}) to match the readout, "
                f"but got {tuple(features.shape)}; build the readout with the backbone's out_shape at this image size."
            )
        if features.dim() == 2:
            features = features[:, :, None, None]
        spatial, channel = self.weights()
        pooled = torch.einsum("nchw,shw->nsc", features, spatial)
        return (pooled * channel).sum(-1) * self.scale + self.bias

    def l1_penalty(self) -> torch.Tensor:
        """Mean over sites of the L1 norm of the effective weight tensor ``scale · w_s ⊗ w_c``.

        Equals ``scale · Σ|w_s| · Σ|w_c|`` per site (the product penalty); a scalar tensor.
        """
        spatial, channel = self.weights()
        per_site = spatial.abs().flatten(1).sum(1) * channel.abs().sum(1) * self.scale
        return per_site.mean()

    def describe(self) -> dict:
        """JSON-able facts that rebuild this readout (with its weights)."""
        return {"n_sites": self.n_sites, "in_shape": list(self.in_shape), "positive": self.positive}
