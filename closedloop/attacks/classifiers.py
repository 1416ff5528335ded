"""Attacks on image classifiers (the behavioural pipeline): disrupt, target, composite, centroid.

Gaziv et al.: no random start, each image's best iterate kept, step and iterations by budget
(:func:`closedloop.attacks.engine.compute_step_schedule`); ε in [0, 1] pixel units. Images with
the same schedule share the engine's batches (:func:`closedloop.attacks.engine.compute_pgd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from closedloop.attacks.engine import (
    compute_batch_size,
    compute_predictions,
    compute_realised_eps,
    compute_step_schedule,
    make_attack_pixels,
    make_attack_runner,
    make_run_settings,
)
from closedloop.core.logs import progress
from closedloop.core.validation import (
    check_budgets,
    check_device,
    check_indices,
    check_integer,
    check_number,
    check_option,
    check_uint8_images,
)
from closedloop.images import to_tensor

__all__ = ["CLASSIFIER_MODES", "ClassifierAttacks", "make_classifier_attacks"]

CLASSIFIER_MODES = ("disrupt", "target", "composite", "centroid")


@dataclass(frozen=True)
class ClassifierAttacks:
    """Classifier attacks, one row per clean image.

    ``pixels``: uint8 (n_images, H, W, 3); ``logits`` / ``logits_clean``: float32
    (n_images, n_classes) of the classifier on the 8-bit attack / clean image; ``realised_eps``:
    float64 (n_images,) ≤ eps.
    """

    pixels: np.ndarray
    logits: np.ndarray
    logits_clean: np.ndarray
    realised_eps: np.ndarray


def _classifier_objective(mode: str, wanted: torch.Tensor, logit_push: float):
    """The per-image loss to minimise for one batch (model output → (N,)).

    ``wanted``: true labels (disrupt), targets (target: (N,), composite: (N, 2|3)) or centroids
    (N, n_features).
    """
    if mode == "disrupt":
        return lambda logits: -F.cross_entropy(logits, wanted, reduction="none")
    if mode == "target":
        return lambda logits: F.cross_entropy(logits, wanted, reduction="none")
    if mode == "composite":

        def composite(logits: torch.Tensor) -> torch.Tensor:
            soft = torch.zeros_like(logits).scatter_(1, wanted, 1.0 / wanted.shape[1])
            soft_cross_entropy = -(soft * F.log_softmax(logits, dim=1)).sum(1)
            return soft_cross_entropy - logit_push * logits.gather(1, wanted).mean(1)

        return composite
    return lambda features: ((features.flatten(1) - wanted) ** 2).mean(1)


def _check_class_indices(name: str, values, n_images: int, n_classes: int, *, composite: bool) -> np.ndarray:
    """Check class indices in [0, n_classes − 1]: (n_images,), or (n_images, 2|3) if ``composite``."""
    if values is None:
        raise ValueError(f"'{name}' is required for this mode: give one class index per image (n_images,).")
    values = np.asarray(values)
    if composite:
        if values.ndim != 2 or values.shape[0] != n_images or values.shape[1] not in (2, 3):
            raise ValueError(
                f"'{name}' must have shape ({n_images}, 2) or ({n_images}, 3) for composite targets, but got {values.shape}."
            )
    elif values.shape != (n_images,):
        raise ValueError(f"'{name}' must have shape ({n_images},), one class per image, but got {values.shape}.")
    return check_indices(name, values, n_classes)


def make_classifier_attacks(
    classifier: torch.nn.Module,
    clean_uint8: np.ndarray,
    *,
    mode: str,
    eps,
    labels=None,
    targets=None,
    features: torch.nn.Module | None = None,
    centroid=None,
    step_size=None,
    n_steps: int | None = None,
    logit_push: float = 0.1,
    batch_size: int = 0,
    device="cpu",
    precision: str = "auto",
    channels_last: bool = True,
) -> ClassifierAttacks:
    """Attacks on a classifier (behavioural pipeline): no random start, best iterate kept.

    ``classifier``: nn.Module, float images (N, 3, H, W) in [0, 1] → logits (N, n_classes).
    ``clean_uint8``: uint8 (n_images, H, W, 3). ``mode``:
    - "disrupt": maximise the cross-entropy of the true class ``labels`` (n_images,);
    - "target": minimise the cross-entropy of ``targets`` (n_images,);
    - "composite": ``targets`` (n_images, 2 or 3); minimise the cross-entropy to the uniform soft
      target over them minus ``logit_push`` × their mean logit;
    - "centroid": minimise the mean squared error between ``features(x)`` (nn.Module →
      (N, n_features) or any shape that flattens to it) and ``centroid`` ((n_features,) or
      (n_images, n_features)), e.g. the mean penultimate feature of a new class.
    ``eps``: budget per image ([0, 1] pixel units). ``step_size`` / ``n_steps``: default to
    :func:`~closedloop.attacks.engine.compute_step_schedule` (eps). ``precision`` (``"auto"``,
    ``"fp32"``, ``"bf16"``) and ``channels_last`` set how the attack steps run, as
    in :func:`~closedloop.attacks.sites.make_site_attacks`; logits are float32 on ``classifier``.
    Returns :class:`ClassifierAttacks` with logits on the 8-bit images.
    """
    check_option("mode", mode, CLASSIFIER_MODES)
    check_uint8_images("clean_uint8", clean_uint8)
    n_images = len(clean_uint8)
    if n_images == 0:
        raise ValueError("'clean_uint8' holds no images; give at least one (n_images >= 1).")
    eps = check_budgets("eps", eps, n_images)
    batch_size = check_integer("batch_size", batch_size, minimum=0)
    logit_push = check_number("logit_push", logit_push, minimum=0.0)
    schedule_step, schedule_steps = compute_step_schedule(eps)
    step = schedule_step if step_size is None else check_budgets("step_size", step_size, n_images)
    iterations = schedule_steps if n_steps is None else np.full(n_images, check_integer("n_steps", n_steps, minimum=1))
    device = check_device("device", device)
    settings = make_run_settings(precision, device, channels_last=channels_last)
    example = to_tensor(clean_uint8[:2], device)
    if mode == "centroid":
        wanted = _check_centroid(features, centroid, clean_uint8, device)
        attacked_model = make_attack_runner(features, device, settings, example=example)
    else:
        attacked_model = make_attack_runner(classifier, device, settings, example=example)
    classifier.to(device)
    if batch_size == 0:
        batch_size = compute_batch_size(attacked_model, (3, *clean_uint8.shape[1:3]), device, settings)
    logits_clean = compute_predictions(classifier, clean_uint8, batch_size=batch_size, device=device)
    if mode != "centroid":
        name, values = ("labels", labels) if mode == "disrupt" else ("targets", targets)
        wanted = _check_class_indices(name, values, n_images, logits_clean.shape[1], composite=mode == "composite")
    pixels = np.empty_like(clean_uint8)
    groups = [np.flatnonzero((step == s) & (iterations == k)) for s, k in sorted(set(zip(step, iterations)))]
    batches = [group[b : b + batch_size] for group in groups for b in range(0, len(group), batch_size)]
    for rows in progress(batches, description=f"{mode} attacks"):
        objective = _classifier_objective(mode, torch.as_tensor(wanted[rows], device=device), logit_push)
        pixels[rows] = make_attack_pixels(
            attacked_model, clean_uint8[rows], eps=eps[rows], step_size=step[rows], n_steps=int(iterations[rows[0]]),
            objective=objective, device=device, settings=settings,
        )
    return ClassifierAttacks(
        pixels=pixels,
        logits=compute_predictions(classifier, pixels, batch_size=batch_size, device=device),
        logits_clean=logits_clean,
        realised_eps=compute_realised_eps(pixels, clean_uint8),
    )


def _check_centroid(features, centroid, clean_uint8, device) -> np.ndarray:
    """Check the feature function and centroid; return the centroid per image (n_images, n_features)."""
    if not isinstance(features, torch.nn.Module):
        raise TypeError(
            f"mode 'centroid' needs 'features', an nn.Module mapping images to feature vectors, but got {type(features).__name__}."
        )
    if centroid is None:
        raise ValueError("mode 'centroid' needs 'centroid', the target mean feature vector (n_features,).")
    features.to(device)
    sample = compute_predictions(features, clean_uint8[:1], batch_size=1, device=device)
    n_features = int(np.prod(sample.shape[1:]))
    centroid = np.asarray(centroid, dtype=np.float32)
    if centroid.ndim == 1:
        centroid = np.broadcast_to(centroid, (len(clean_uint8), len(centroid)))
    if centroid.shape != (len(clean_uint8), n_features) or not np.isfinite(centroid).all():
        raise ValueError(
            f"'centroid' must be finite with shape ({n_features},) or ({len(clean_uint8)}, {n_features}), "
            f"but got shape {centroid.shape}."
        )
    return centroid
