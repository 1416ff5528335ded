"""White-box sensitivity of network units, normalised like the recorded sites (Guo et al. Fig. 1A).

For each network the user names (a registered backbone name, a checkpoint path, or an
``nn.Module``), units of its penultimate layer (``avgpool``, flattened) are chosen at random
among those that vary over the clean images; each unit's sensitivity
s_u(ε) = E_x max_{‖δ‖≤ε} |h_u(x) − h_u(x+δ)| is solved with the paper's white-box solver
(:func:`closedloop.attacks.whitebox.compute_unit_sensitivity`) on ``n_images`` clean images, and
divided by σ_u, the standard deviation of h_u over all the clean images given, so the values
share the recorded sites' axis. Size (units, images, starts, steps) is the caller's choice:
small on a CPU, the paper's (100 starts × 250 steps) on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from closedloop.attacks.engine import compute_predictions
from closedloop.attacks.whitebox import compute_unit_sensitivity
from closedloop.core.logs import progress
from closedloop.core.validation import check_device, check_integer, check_number, check_uint8_images
from models import load_backbone

__all__ = ["compute_network_sensitivity"]


def _unit_network(source, layer: str, trust: bool) -> torch.nn.Module:
    if isinstance(source, torch.nn.Module):
        return source.eval()
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"each network must be a backbone name, a checkpoint path or a torch.nn.Module, but got {type(source).__name__}."
        )

    return load_backbone(source, layer, trust=trust)


def compute_network_sensitivity(
    networks: dict,
    clean_uint8: np.ndarray,
    budgets,
    *,
    layer: str = "avgpool",
    n_units: int = 8,
    n_images: int = 4,
    n_starts: int = 2,
    n_steps: int = 20,
    trust: bool = False,
    seed: int = 0,
    device="cpu",
) -> dict[str, list[dict]]:
    """Normalised white-box sensitivity of random units of each network, per ε.

    ``networks``: ``{label: source}``, source a registered backbone name (random weights), a
    checkpoint path (e.g. a robustness-library AT-ResNet-50) or an ``nn.Module`` mapping images
    in [0, 1] to unit activations. ``clean_uint8``: uint8 (n_clean, H, W, 3) clean images (σ_u
    over all of them). ``budgets``: ε values, L2 in [0, 1] pixel units. ``layer``: where units
    are read for names and paths (``"avgpool"``: the penultimate layer). ``n_units`` units
    (fewer if fewer vary) and ``n_images`` images are drawn with ``seed``; ``n_starts`` /
    ``n_steps``: solver effort per (image, unit, direction). Returns tables:

    - ``"units"``: ``network``, ``unit``, ``eps``, ``n_images``, ``sensitivity`` (mean over
      images, activation units), ``sigma``, ``normalized`` (units of σ_u);
    - ``"mean"``: ``network``, ``eps``, ``n_units``, ``mean`` and ``sd`` of ``normalized``.
    """
    if not isinstance(networks, dict) or not networks:
        raise ValueError("'networks' must be a non-empty dict {label: backbone name, checkpoint path or nn.Module}.")
    check_uint8_images("clean_uint8", clean_uint8)
    if len(clean_uint8) < 2:
        raise ValueError(f"'clean_uint8' must hold at least 2 clean images (σ needs 2), but got {len(clean_uint8)}.")
    budgets = [check_number("budgets", e, minimum=0.0, inclusive=False) for e in np.atleast_1d(budgets).tolist()]
    n_units = check_integer("n_units", n_units, minimum=1)
    n_images = min(check_integer("n_images", n_images, minimum=1), len(clean_uint8))
    device = check_device("device", device)
    rng = np.random.default_rng(check_integer("seed", seed, minimum=0))
    solved_on = clean_uint8[np.sort(rng.choice(len(clean_uint8), n_images, replace=False))]
    units_rows, mean_rows = [], []
    for label, source in networks.items():
        network = _unit_network(source, layer, trust).to(device)
        activations = compute_predictions(network, clean_uint8, batch_size=16, device=device).reshape(len(clean_uint8), -1)
        sigma = activations.astype(np.float64).std(axis=0, ddof=1)
        varying = np.flatnonzero(sigma > 1e-6 * max(float(sigma.max()), 1e-12))
        units = np.sort(rng.choice(varying, min(n_units, varying.size), replace=False))
        for eps in progress(budgets, description=f"network units {label}"):
            solved = compute_unit_sensitivity(network, solved_on, eps, units=units, n_starts=n_starts, n_steps=n_steps,
                                              seed=seed, device=device)
            per_unit = solved.sensitivity.mean(axis=0)
            normalized = per_unit / sigma[units]
            units_rows += [{"network": label, "unit": int(u), "eps": eps, "n_images": n_images, "sensitivity": float(s),
                            "sigma": float(sigma[u]), "normalized": float(v)} for u, s, v in zip(units, per_unit, normalized)]
            mean_rows.append({"network": label, "eps": eps, "n_units": int(units.size), "mean": float(normalized.mean()),
                              "sd": float(normalized.std())})
    return {"units": units_rows, "mean": mean_rows}
