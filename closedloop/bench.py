"""How fast this machine makes attacks: ``closedloop bench``.

Measured on one IT model (backbone cut at its layer + readout) with the same batch throughout,
after a warm-up, with the thread count left as it is, as medians over repeats:

- bare forward + backward: the model's forward and the gradient of the site objective with
  respect to the input images (parameters frozen, exactly the work one attack step needs);
- the attack engine (:func:`closedloop.attacks.engine.compute_pgd`) on the same batch and objective;
- ``attack_over_fwd_bwd``: attack time per image-step ÷ bare forward+backward time per image;
- the batched per-site attacks (:func:`closedloop.attacks.sites.make_site_attacks`, all jobs packed)
  against a naive loop over sites, images and directions that makes one attack at a time with the
  same engine, end to end (clean predictions, 8-bit output, final predictions);
- the estimated attack time of a paper-size day: 21 sites × 42 images × 5 budgets × 2 directions
  × 100 steps image-steps at the measured engine speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from closedloop.attacks.engine import compute_pgd, compute_predictions, quantize_within_budget
from closedloop.attacks.sites import SITE_TARGET, make_site_attacks
from closedloop.core.logs import logger
from closedloop.core.validation import check_device, check_integer
from closedloop.images import from_tensor, to_tensor

__all__ = ["PAPER_DAY", "compute_bench"]

PAPER_DAY = {"n_sites": 21, "n_images": 42, "n_budgets": 5, "n_directions": 2, "n_steps": 100}
_EPS = 1.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(work: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    work()
    _synchronize(device)
    return time.perf_counter() - start


def _paired_seconds(first: Callable[[], object], second: Callable[[], object], n_repeats: int, device) -> dict:
    """Wall times of two pieces of work, s: one warm-up run each, then timed runs alternating.

    Alternating exposes both to the same load on a shared machine. Returns the medians and the
    minima (the least disturbed runs) of each.
    """
    first(), second()
    _synchronize(device)
    times = np.array([(_seconds(first, device), _seconds(second, device)) for _ in range(n_repeats)])
    return {"median": np.median(times, axis=0).tolist(), "min": times.min(axis=0).tolist()}


def _site_objective(n_images: int, n_sites: int, device: torch.device):
    site = torch.arange(n_images, device=device) % n_sites
    rows = torch.arange(n_images, device=device)
    return lambda predicted: (predicted[rows, site] - SITE_TARGET) ** 2


def _fwd_bwd(model, images: torch.Tensor, objective, n_steps: int, autocast: bool) -> None:
    """``n_steps`` bare forward + input-gradient passes on the same batch."""
    for _ in range(n_steps):
        x = images.detach().requires_grad_(True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            predicted = model(x).float()
        torch.autograd.grad(objective(predicted).sum(), x)


def _per_site_loop(model, pixels, image_index, site, n_steps: int, seed: int, device, autocast: bool, channels_last: bool) -> None:
    """The naive reference: site by site, image by image, direction by direction, one attack at a time.

    Same engine and same end-to-end work as :func:`make_site_attacks` (clean prediction, PGD with a
    random start, budget-safe 8-bit output, prediction on it), each attack a batch of one image.
    """
    generator = torch.Generator().manual_seed(seed)
    for target_site in np.unique(site):
        for image in image_index[site == target_site]:
            clean = pixels[image : image + 1]
            compute_predictions(model, clean, device=device)
            for sign in (1.0, -1.0):
                result = compute_pgd(
                    model, to_tensor(clean, device), eps=_EPS, step_size=_EPS / 3, n_steps=n_steps,
                    objective=lambda predicted, s=target_site, t=sign * SITE_TARGET: (predicted[:, s] - t) ** 2,
                    random_start=True, generator=generator, autocast=autocast, channels_last=channels_last,
                )
                compute_predictions(model, quantize_within_budget(from_tensor(result.images), clean, _EPS), device=device)


def compute_bench(
    model: torch.nn.Module,
    *,
    batch_size: int = 32,
    n_steps: int = 20,
    n_repeats: int = 5,
    n_loop_repeats: int = 3,
    n_loop_sites: int = 3,
    n_loop_images: int = 2,
    image_size: int = 224,
    device="cpu",
    autocast: bool = False,
    channels_last: bool = False,
    compile_model: bool = False,
    seed: int = 0,
) -> dict:
    """Benchmark the attack engine on ``model`` (float images (N, 3, H, W) in [0, 1] → (N, n_sites)).

    ``batch_size``: images per batch for every measurement; ``n_steps``: steps per timed run;
    ``n_repeats`` / ``n_loop_repeats``: timed runs of the engine / of the batched-vs-loop comparison
    (medians reported, runs alternating); ``n_loop_sites`` ×
    ``n_loop_images``: jobs of the batched-vs-loop comparison; ``image_size``: px. GPU switches
    (``autocast`` bf16, ``channels_last``, ``compile_model``) apply to every measurement alike.
    Returns a JSON-ready dict of seconds and ratios (keys documented in docs/attacks.md).
    """
    for name, value, low in (("batch_size", batch_size, 1), ("n_steps", n_steps, 1), ("n_repeats", n_repeats, 1),
                             ("n_loop_repeats", n_loop_repeats, 1),
                             ("n_loop_sites", n_loop_sites, 1), ("n_loop_images", n_loop_images, 1),
                             ("image_size", image_size, 16), ("seed", seed, 0)):
        check_integer(name, value, minimum=low)
    device = check_device("device", device)
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if compile_model else model
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    images = to_tensor(pixels, device)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    with torch.no_grad():
        n_sites = model(images[:1]).shape[1]
    objective = _site_objective(batch_size, n_sites, device)
    engine = dict(eps=_EPS, step_size=_EPS / 3, n_steps=n_steps, objective=objective, random_start=True,
                  autocast=autocast, channels_last=channels_last)

    logger.info("bench: bare forward+backward and attack engine, batch %d, %d steps, %d repeats", batch_size, n_steps, n_repeats)
    engine_times = _paired_seconds(
        lambda: _fwd_bwd(runner, images, objective, n_steps, autocast),
        lambda: compute_pgd(runner, images, generator=seed, **engine),
        n_repeats, device,
    )
    fwd_bwd_per_image, attack_per_image_step = np.array(engine_times["median"]) / (batch_size * n_steps)
    fwd_bwd_min, attack_min = engine_times["min"]

    logger.info("bench: batched site attacks vs a per-site loop, %d jobs", n_loop_sites * n_loop_images)
    site = np.repeat(np.arange(n_loop_sites) % n_sites, n_loop_images)
    image_index = np.tile(np.arange(n_loop_images) % batch_size, n_loop_sites)
    attacks = dict(n_steps=n_steps, seed=seed, device=device, autocast=autocast, channels_last=channels_last)
    loop_times = _paired_seconds(
        lambda: make_site_attacks(model, pixels, image_index, site, _EPS, batch_size=batch_size, **attacks),
        lambda: _per_site_loop(model, pixels, image_index, site, n_steps, seed, device, autocast, channels_last),
        n_loop_repeats, device,
    )
    (batched_s, loop_s), (batched_min, loop_min) = loop_times["median"], loop_times["min"]
    day_image_steps = int(np.prod(list(PAPER_DAY.values())))
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "image_size": image_size,
        "n_sites": int(n_sites),
        "n_steps": n_steps,
        "n_repeats": n_repeats,
        "n_loop_repeats": n_loop_repeats,
        "autocast_bf16": autocast,
        "channels_last": channels_last,
        "compile": compile_model,
        "fwd_bwd_s_per_image": float(fwd_bwd_per_image),
        "fwd_bwd_images_per_s": float(1.0 / fwd_bwd_per_image),
        "attack_s_per_image_step": float(attack_per_image_step),
        "attack_image_steps_per_s": float(1.0 / attack_per_image_step),
        "attack_over_fwd_bwd": float(attack_per_image_step / fwd_bwd_per_image),
        "attack_over_fwd_bwd_of_minima": attack_min / fwd_bwd_min,
        "loop_jobs": int(len(site)),
        "batched_s": batched_s,
        "per_site_loop_s": loop_s,
        "batched_speedup_vs_per_site_loop": loop_s / batched_s,
        "batched_speedup_of_minima": loop_min / batched_min,
        "paper_day": dict(PAPER_DAY),
        "paper_day_image_steps": day_image_steps,
        "paper_day_estimated_s": float(day_image_steps * attack_per_image_step),
        "paper_day_estimated_h": float(day_image_steps * attack_per_image_step / 3600.0),
    }
