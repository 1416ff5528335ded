"""Per-site attacks on an IT model (the daily loop): push one site's predicted count up or down.

Guo et al.: for job j, minimise (f_site(x + δ) − t)² with t = +1000 (increase) and t = −1000
(decrease), ‖δ‖₂ ≤ ε ([0, 1] pixel units), and keep the direction with the larger predicted change
|f_site(x + δ) − f_site(x)| on the final 8-bit image. Every job and direction is one image of a
batch of the engine (:func:`closedloop.attacks.engine.compute_pgd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from closedloop.attacks.engine import (
    STEP_RULES,
    RowSelection,
    compute_batch_size,
    compute_predictions,
    compute_realised_eps,
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

__all__ = ["SITE_TARGET", "SiteAttacks", "make_site_attacks"]

SITE_TARGET = 1000.0  # Guo et al.: minimise MSE(f_i(x + δ), ±1000)
_DIRECTIONS = ["both", "increase", "decrease"]


@dataclass(frozen=True)
class SiteAttacks:
    """Per-site attacks, one row per job (image_index[j], site[j], eps[j]).

    ``pixels``: uint8 (n_jobs, H, W, 3), the 8-bit attack image; ``direction``: int8 (n_jobs,),
    +1 increase, −1 decrease; ``predicted``: float32 (n_jobs, n_sites), model prediction on the
    8-bit attack image; ``predicted_clean``: float32 (n_jobs, n_sites) on the 8-bit clean image;
    ``realised_eps``: float64 (n_jobs,), ‖pixels/255 − clean/255‖₂ ≤ eps.
    """

    pixels: np.ndarray
    direction: np.ndarray
    predicted: np.ndarray
    predicted_clean: np.ndarray
    realised_eps: np.ndarray


class _SiteObjective:
    """The per-image loss to minimise (model output (N, n_sites) → (N,)): (f_site[n] − target[n])²;
    ``site``, ``target``: (N,). ``take`` follows a compacted batch (engine's RowSelection)."""

    def __init__(self, site: torch.Tensor, target: torch.Tensor) -> None:
        self.site, self.target, self.rows = site, target, torch.arange(len(site), device=site.device)

    def __call__(self, predicted: torch.Tensor) -> torch.Tensor:
        return (predicted[self.rows, self.site] - self.target) ** 2

    def take(self, index: torch.Tensor) -> _SiteObjective:
        return _SiteObjective(self.site[index], self.target[index])


def _direction_choice(at: int, clean: torch.Tensor, target: torch.Tensor) -> RowSelection:
    """After ``at`` steps, each job's direction with the smaller predicted change so far stops.

    Rows come in pairs (increase, decrease) of one job; ``clean``: (N,) the site's clean prediction,
    ``target``: (N,) ±SITE_TARGET. A row's best loss L = (f − t)² gives its best f = t ∓ √L (f has
    not passed ±1000), so its change so far is |f − clean| in its own direction.
    """

    def keep(best_loss: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        sign = torch.sign(target[rows])
        change = sign * (target[rows] - sign * best_loss.sqrt() - clean[rows])
        larger = change.view(-1, 2).argmax(dim=1)
        kept = torch.zeros(len(rows) // 2, 2, dtype=torch.bool, device=rows.device)
        kept[torch.arange(len(kept), device=rows.device), larger] = True
        return kept.view(-1)

    return RowSelection(at=at, keep=keep)


def make_site_attacks(
    model: torch.nn.Module,
    clean_uint8: np.ndarray,
    image_index,
    site,
    eps,
    *,
    n_steps: int = 100,
    step_ratio: float = 1 / 3,
    step_rule: str = "pgd",
    random_start: bool = True,
    n_restarts: int = 1,
    batch_size: int = 0,
    seed: int = 0,
    device="cpu",
    precision: str = "auto",
    channels_last: bool = True,
    compile_model: bool = False,
    directions: str = "both",
    choose_direction_at: int = 0,
) -> SiteAttacks:
    """Increase/decrease attacks on single sites of an IT model, all jobs packed into large batches.

    ``model``: nn.Module, float images (N, 3, H, W) in [0, 1] → predicted counts (N, n_sites);
    moved to ``device``. ``clean_uint8``: uint8 (n_images, H, W, 3). Job j attacks site
    ``site[j]`` of image ``image_index[j]`` within L2 budget ``eps[j]`` ([0, 1] pixel units); the
    three broadcast to (n_jobs,). For each job both directions are solved — minimise
    MSE(f_site(x + δ), +1000) and MSE(f_site(x + δ), −1000) — with step ``step_ratio`` × ε,
    ``n_steps`` steps and random starts; the direction with the larger predicted
    |f_site(x + δ) − f_site(x)| on the final 8-bit image is kept. ``step_rule``: ``"pgd"`` (the
    paper's fixed step) or ``"apgd"`` (APGD's step schedule with momentum, which ignores
    ``step_ratio``; :func:`~closedloop.attacks.engine.compute_pgd`). ``batch_size``: images (job ×
    direction pairs) per batch; 0 sizes it to the device memory (CUDA) or uses 32 (CPU).
    ``precision``: ``"auto"`` (bf16 autocast in the attack steps where the device runs bf16
    natively, else float32), ``"fp32"`` or ``"bf16"``; the steps run a BatchNorm-folded copy of
    ``model``, in channels-last memory format unless ``channels_last`` is False
    (:func:`~closedloop.attacks.engine.make_run_settings`); ``compile_model``: torch.compile it.
    ``directions``: ``"both"`` (the loop's attacks, as above), or only ``"increase"`` or
    ``"decrease"`` (half the work; e.g. the calibration's class reference pushes sites up).
    ``choose_direction_at``: with both directions, after this many steps (2 ≤ it < ``n_steps``) each
    job keeps only the direction with the larger predicted change so far and the other stops (its
    best image so far still competes at the end); 0: both go to the end, as the paper.
    Rounding, budgets and every reported prediction are float32 on ``model`` itself.
    Random starts come from ``seed`` (results also depend on ``batch_size`` and the precision).
    """
    check_uint8_images("clean_uint8", clean_uint8)
    n_steps = check_integer("n_steps", n_steps, minimum=1)
    step_ratio = check_number("step_ratio", step_ratio, minimum=0.0, inclusive=False)
    step_rule = check_option("step_rule", step_rule, STEP_RULES)
    batch_size = check_integer("batch_size", batch_size, minimum=0)
    seed = check_integer("seed", seed, minimum=0)
    signs = {"both": [1, -1], "increase": [1], "decrease": [-1]}[check_option("directions", directions, _DIRECTIONS)]
    choose_direction_at = check_integer("choose_direction_at", choose_direction_at, minimum=0)
    if choose_direction_at and not (len(signs) == 2 and 2 <= choose_direction_at < n_steps):
        raise ValueError(f"'choose_direction_at' = {choose_direction_at} needs directions='both' and 2 <= it < n_steps "
                         f"(= {n_steps}); 0 runs both directions to the end.")
    image_index, site, eps = np.broadcast_arrays(np.asarray(image_index), np.asarray(site), np.asarray(eps))
    if image_index.ndim != 1:
        raise ValueError(
            f"'image_index', 'site' and 'eps' must broadcast to one dimension (n_jobs,), but got shape {image_index.shape}."
        )
    if image_index.size == 0:
        raise ValueError("'image_index', 'site' and 'eps' describe no jobs; give at least one (image, site, eps).")
    image_index = check_indices("image_index", image_index, len(clean_uint8))
    eps = check_budgets("eps", eps, len(image_index))
    device = check_device("device", device)
    settings = make_run_settings(precision, device, channels_last=channels_last)
    used = np.unique(image_index)
    example = to_tensor(clean_uint8[used[:2]], device)
    runner = make_attack_runner(model, device, settings, example=example, compile_model=compile_model)
    if batch_size == 0:
        batch_size = compute_batch_size(runner, (3, *clean_uint8.shape[1:3]), device, settings)
    predicted_used = compute_predictions(model, clean_uint8[used], batch_size=batch_size, device=device)
    if predicted_used.ndim != 2:
        raise ValueError(f"'model' must return (n_images, n_sites), but returned shape {predicted_used.shape}.")
    clean_predicted = np.zeros((len(clean_uint8), predicted_used.shape[1]), np.float32)
    clean_predicted[used] = predicted_used
    site = check_indices("site", site, clean_predicted.shape[1])
    n_jobs = len(image_index)
    pixels = np.empty((n_jobs, *clean_uint8.shape[1:]), np.uint8)
    direction = np.empty(n_jobs, np.int8)
    predicted = np.empty((n_jobs, clean_predicted.shape[1]), np.float32)
    generator = torch.Generator().manual_seed(seed)
    jobs_per_batch = max(1, batch_size // len(signs))
    batches = [np.arange(b, min(b + jobs_per_batch, n_jobs)) for b in range(0, n_jobs, jobs_per_batch)]
    for jobs in progress(batches, description="site attacks"):
        pairs = np.repeat(jobs, len(signs))  # (job, +1), (job, −1), ... or one row per job
        sign = np.tile(np.array(signs, np.int8), len(jobs))
        site_tensor = torch.as_tensor(site[pairs], device=device)
        target = torch.as_tensor(sign * SITE_TARGET, dtype=torch.float32, device=device)
        selection = None
        if choose_direction_at:
            clean_site = torch.as_tensor(clean_predicted[image_index[pairs], site[pairs]], device=device)
            selection = _direction_choice(choose_direction_at, clean_site, target)
        attacked = make_attack_pixels(
            runner, clean_uint8[image_index[pairs]], eps=eps[pairs], step_size=eps[pairs] * step_ratio, n_steps=n_steps,
            objective=_SiteObjective(site_tensor, target), device=device, settings=settings,
            random_start=random_start, n_restarts=n_restarts, generator=generator, step_rule=step_rule,
            selection=selection,
        )
        outputs = compute_predictions(model, attacked, batch_size=len(attacked), device=device)
        if len(signs) == 2:
            change = np.abs(outputs[np.arange(len(pairs)), site[pairs]] - clean_predicted[image_index[pairs], site[pairs]])
            keep = 2 * np.arange(len(jobs)) + (change[1::2] > change[0::2])
        else:
            keep = np.arange(len(jobs))
        pixels[jobs], direction[jobs], predicted[jobs] = attacked[keep], sign[keep], outputs[keep]
    return SiteAttacks(
        pixels=pixels,
        direction=direction,
        predicted=predicted,
        predicted_clean=clean_predicted[image_index],
        realised_eps=compute_realised_eps(pixels, clean_uint8[image_index]),
    )
