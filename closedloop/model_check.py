"""The model smoke check: build the configured IT model and push a few clean images through it."""

from __future__ import annotations

import time

import torch

from closedloop.config import ExperimentConfig
from closedloop.core.validation import check_integer
from closedloop.images import read_image_source, to_tensor
from models import make_it_model, resolve_device

__all__ = ["compute_model_check"]


def compute_model_check(config: ExperimentConfig, n_images: int = 4) -> dict:
    """Build the model of ``config`` (day 0: base backbone + random readout) and run clean images.

    Uses the first ``n_images`` images of the configured image source. Returns JSON-able facts:
    backbone source, layer, device, ``feature_shape`` (C, H, W) at 224 px, ``n_sites``,
    ``n_images``, the mean and standard deviation of the predicted counts (spikes per window) and
    the forward ``seconds_per_image`` (after one warm-up image).
    """


    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"'config' must be an ExperimentConfig (from read_config), but got {type(config).__name__}.")
    check_integer("n_images", n_images, minimum=1)
    image_set = read_image_source(
        config.images.source, per_photo=config.images.embedded_per_photo, seed=config.experiment.seed
    )
    pixels = image_set.read(range(min(n_images, len(image_set))))
    device = resolve_device(config.model.device)
    model = make_it_model(
        config.model.backbone,
        config.model.layer,
        config.sites.n_sites,
        trust=config.model.trust_checkpoint,
        positive=config.model.readout_positive,
        seed=config.experiment.seed,
    ).to(device)
    images = to_tensor(pixels, device)
    with torch.no_grad():
        model(images[:1])  # warm-up: first calls allocate and pick kernels
        start = time.perf_counter()
        predicted = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return {
        "backbone": config.model.backbone,
        "layer": config.model.layer,
        "device": str(device),
        "feature_shape": list(model.backbone.out_shape()),
        "n_sites": model.n_sites,
        "n_images": len(pixels),
        "prediction_mean": float(predicted.mean()),
        "prediction_std": float(predicted.std()) if predicted.numel() > 1 else 0.0,
        "seconds_per_image": elapsed / len(pixels),
    }
