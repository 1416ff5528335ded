"""Adversarial perturbations: one L2 PGD engine, its budget-safe 8-bit output, and the attacks built on it.

Units. ``eps`` is the L2 norm of δ = x_adv − x over all 3 × H × W values, in [0, 1] pixel units
(one pixel going black to white is √3 ≈ 1.73; two ImageNet images are ≈ 130 apart). Step sizes
are in the same units.

The engine (:func:`compute_pgd`) works on torch float images (N, 3, H, W) in [0, 1]: per image,
x ← x − α g/‖g‖₂ (descent of a per-image objective; ascent is a sign in the objective), then δ is
projected onto ‖δ‖₂ ≤ ε and x clamped to [0, 1]; each image keeps its best iterate. The model runs
in eval mode with frozen parameters, so images in a batch are independent and every image may
have its own ε, step size and target. The step loop has no host-device synchronisation.

Stimuli are shown as 8-bit images, so every public ``make_*`` function returns uint8 images made by
:func:`quantize_within_budget`, whose own perturbation never exceeds ε, and reports model outputs
computed on those 8-bit images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from closedloop.core.logs import logger, progress
from closedloop.core.validation import (
    check_budgets,
    check_device,
    check_image_batch,
    check_indices,
    check_integer,
    check_number,
    check_option,
    check_uint8_images,
)
from closedloop.images import to_tensor

__all__ = [
    "CLASSIFIER_MODES",
    "SITE_TARGET",
    "PGDResult",
    "SiteAttacks",
    "ClassifierAttacks",
    "compute_pgd",
    "compute_step_schedule",
    "compute_realised_eps",
    "compute_predictions",
    "quantize_within_budget",
    "make_site_attacks",
    "make_classifier_attacks",
]

CLASSIFIER_MODES = ("disrupt", "target", "composite", "centroid")
SITE_TARGET = 1000.0  # Guo et al.: minimise MSE(f_i(x + δ), ±1000)

# Budget → (step α, iterations) of Gaziv et al.; a budget up to the first column uses that row.
_SCHEDULE = (
    (0.1, 0.02, 200),
    (0.5, 0.1, 200),
    (3.0, 0.3, 200),
    (15.0, 0.5, 500),
    (25.0, 0.5, 1000),
    (50.0, 2.0, 2000),
    (100.0, 2.0, 5000),
    (math.inf, 2.0, 10000),
)
_CPU_BATCH = 32  # images per batch on CPU when batch_size=0 (fastest of 16, 32, 64 on 2 cores)
_MAX_GPU_BATCH = 1024
_TINY = 1e-12
_MARGIN = 1e-9  # relative safety margin of the 8-bit budget against float rounding


@dataclass(frozen=True)
class PGDResult:
    """Output of :func:`compute_pgd`.

    ``images``: best iterate per image, float32 (N, 3, H, W) in [0, 1] with ‖images − clean‖₂ ≤ ε;
    ``loss``: objective at ``images``, (N,); ``start_loss``: objective at the first start point, (N,).
    """

    images: torch.Tensor
    loss: torch.Tensor
    start_loss: torch.Tensor


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


# ---------------------------------------------------------------------------------------------
# The engine


@contextmanager
def _frozen(model: torch.nn.Module):
    """Eval mode and parameters without grad for the duration; the previous state is restored."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _per_image(name: str, value, n: int, device) -> torch.Tensor:
    """A scalar or (n,) array/tensor → float32 tensor (n,) on ``device``; finite and > 0."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return torch.as_tensor(check_budgets(name, value, n), dtype=torch.float32, device=device)


def _norm(images: torch.Tensor) -> torch.Tensor:
    """L2 norm of each image, (N,); works for any memory format without a copy."""
    return torch.linalg.vector_norm(images, dim=tuple(range(1, images.dim())))


def _project(x: torch.Tensor, clean: torch.Tensor, eps: torch.Tensor, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Project x − clean onto the ε-ball and clamp to [0, 1], in place in ``x``; returns ``x``.

    Clamping never lengthens δ because ``clean`` lies in [0, 1]. ``scratch``: a buffer shaped like
    ``x`` for δ (the step loop passes one so that it allocates no image-sized memory).
    """
    delta = torch.sub(x, clean, out=scratch if scratch is not None else torch.empty_like(x))
    factor = (eps / _norm(delta).clamp_min(_TINY)).clamp_(max=1.0)
    return torch.addcmul(clean, delta, factor.view(-1, *[1] * (x.dim() - 1)), out=x).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class _Settings:
    """How the model is run: bf16 autocast and channels-last memory format (both off by default)."""

    autocast: bool = False
    channels_last: bool = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images.contiguous()

    def forward(self, model, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(images).float()


def _random_start(clean: torch.Tensor, eps: torch.Tensor, generator: torch.Generator, settings: _Settings) -> torch.Tensor:
    """A random point on each image's ε-sphere, clamped to [0, 1] (drawn on the CPU, then moved)."""
    noise = settings.prepare(torch.randn(clean.shape, generator=generator, dtype=torch.float32).to(clean.device))
    noise.mul_((eps / _norm(noise)).view(-1, 1, 1, 1)).add_(clean)
    return _project(noise, clean, eps)


def _loss(model, objective, x: torch.Tensor, settings: _Settings, *, grad: bool):
    """Per-image objective (N,) at x, and its gradient with respect to x when ``grad``."""
    with torch.enable_grad() if grad else torch.no_grad():
        x = x.detach().requires_grad_(grad)
        loss = objective(settings.forward(model, x))
        if loss.shape != x.shape[:1]:
            raise ValueError(
                f"'objective' must return one loss per image, shape ({x.shape[0]},), but returned shape {tuple(loss.shape)}."
            )
        if not grad:
            return loss.detach(), None
        (gradient,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), gradient


def _descend(model, objective, clean, start, eps, step, n_steps, settings, *, step_shrink, n_step_resets):
    """One PGD run from ``start`` (which it overwrites); returns (best images, best loss, start loss).

    Plain mode (``step_shrink == 1``): step from the current iterate. Adaptive mode: always step from
    the best iterate along its gradient; a step that brings no progress shrinks the step by
    ``step_shrink``; when the step falls below 1% of its initial value it is reset (at most
    ``n_step_resets`` times). Image-sized state lives in buffers updated in place, so the loop
    allocates nothing but the model's own activations and gradient.
    """
    view = (-1,) + (1,) * (clean.dim() - 1)
    adaptive = step_shrink != 1.0
    x, best_x, scratch = start, start.clone(), torch.empty_like(start)
    best_gradient = torch.zeros_like(start) if adaptive else None
    best_loss = torch.full(clean.shape[:1], math.inf, device=clean.device)
    initial_step, resets_left = step, torch.full_like(step, float(n_step_resets))
    start_loss = None
    for _ in range(n_steps):
        loss, gradient = _loss(model, objective, x, settings, grad=True)
        start_loss = loss if start_loss is None else start_loss
        improved = loss < best_loss
        best_loss = torch.where(improved, loss, best_loss)
        torch.where(improved.view(view), x, best_x, out=best_x)
        base = x
        if adaptive:
            gradient = torch.where(improved.view(view), gradient, best_gradient, out=best_gradient)
            step = torch.where(improved, step, step * step_shrink)
            reset = (step < 0.01 * initial_step) & (resets_left > 0)
            step = torch.where(reset, initial_step, step)
            resets_left = resets_left - reset.float()
            base = best_x
        scale = -(step / _norm(gradient).clamp_min(_TINY)).view(view)
        _project(torch.addcmul(base, gradient, scale, out=x), clean, eps, scratch=scratch)
    loss, _ = _loss(model, objective, x, settings, grad=False)
    improved = loss < best_loss
    torch.where(improved.view(view), x, best_x, out=best_x)
    return best_x, torch.where(improved, loss, best_loss), start_loss


def compute_pgd(
    model: Callable[[torch.Tensor], torch.Tensor],
    clean: torch.Tensor,
    *,
    eps,
    step_size,
    n_steps: int,
    objective: Callable[[torch.Tensor], torch.Tensor],
    random_start: bool = False,
    n_restarts: int = 1,
    generator: torch.Generator | int = 0,
    start: torch.Tensor | None = None,
    step_shrink: float = 1.0,
    n_step_resets: int = 0,
    autocast: bool = False,
    channels_last: bool = False,
) -> PGDResult:
    """L2 projected gradient descent of a per-image objective, each image in its own ε-ball.

    ``model``: maps float images (N, 3, H, W) in [0, 1] to any output; if it is an ``nn.Module`` it
    runs in eval mode with parameters frozen (restored afterwards). It must already sit on
    ``clean.device``. ``clean``: float (N, 3, H, W) in [0, 1]. ``eps``, ``step_size``: L2 budget and
    step in [0, 1] pixel units, a number or one per image (N,). ``objective``: model output →
    per-image loss (N,) to minimise (ascent: return the negative); per-image targets are captured
    by the callable. ``random_start``: start on a random point of the ε-sphere (else at ``clean``
    or at ``start``, projected into the ball). ``n_restarts``: independent random starts, the best
    kept per image. ``generator``: torch CPU generator or seed for the random starts.
    ``step_shrink`` / ``n_step_resets``: adaptive step (see the white-box solver); 1.0 / 0 is plain
    PGD. ``autocast``: bf16 autocast of the model (CUDA); ``channels_last``: channels-last images.

    Returns a :class:`PGDResult`; the loss at the result is never worse than at the start.
    """
    check_image_batch("clean", clean)
    n_steps = check_integer("n_steps", n_steps, minimum=1)
    n_restarts = check_integer("n_restarts", n_restarts, minimum=1)
    n_step_resets = check_integer("n_step_resets", n_step_resets, minimum=0)
    step_shrink = check_number("step_shrink", step_shrink, minimum=0.0, maximum=1.0, inclusive=True)
    if n_restarts > 1 and not random_start:
        raise ValueError(f"'n_restarts' = {n_restarts} needs random_start=True: restarts from the same point are identical.")
    if start is not None and tuple(start.shape) != tuple(clean.shape):
        raise ValueError(f"'start' must have the shape of 'clean' {tuple(clean.shape)}, but got {tuple(start.shape)}.")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    settings = _Settings(autocast=autocast, channels_last=channels_last)
    clean = settings.prepare(clean.detach())
    n = clean.shape[0]
    eps = _per_image("eps", eps, n, clean.device)
    step = _per_image("step_size", step_size, n, clean.device)
    best = None
    with _frozen(model) if isinstance(model, torch.nn.Module) else nullcontext():
        for _ in range(n_restarts):
            if random_start:
                first = _random_start(clean, eps, generator, settings)
            else:
                first = _project((clean if start is None else settings.prepare(start.detach())).clone(), clean, eps)
            images, loss, start_loss = _descend(
                model, objective, clean, first, eps, step, n_steps, settings,
                step_shrink=step_shrink, n_step_resets=n_step_resets,
            )
            if best is None:
                best = PGDResult(images=images, loss=loss, start_loss=start_loss)
                continue
            better = loss < best.loss
            best = PGDResult(
                images=torch.where(better.view(-1, 1, 1, 1), images, best.images),
                loss=torch.where(better, loss, best.loss),
                start_loss=best.start_loss,
            )
    return PGDResult(images=best.images.contiguous(), loss=best.loss, start_loss=best.start_loss)


# ---------------------------------------------------------------------------------------------
# 8-bit output within the budget


def _quantize_one(adversarial: np.ndarray, clean: np.ndarray, eps: float) -> np.ndarray:
    """One image: round to nearest, then round back toward clean where needed to stay within ε."""
    clean_values = clean.astype(np.float64).ravel()
    delta = adversarial.astype(np.float64).ravel() * 255.0 - clean_values
    radius = eps * 255.0 * (1.0 - _MARGIN)
    length = math.sqrt(float(delta @ delta))
    if length > radius:
        delta *= radius / length
    delta = np.clip(clean_values + delta, 0.0, 255.0) - clean_values
    rounded, truncated = np.rint(delta), np.trunc(delta)
    limit = (eps * 255.0) ** 2 * (1.0 - _MARGIN)
    excess = float(rounded @ rounded) - limit
    if excess > 0:
        candidates = np.flatnonzero(rounded != truncated)
        gain = rounded[candidates] ** 2 - truncated[candidates] ** 2
        # values that were closest to a tie move first: the smallest change to the image
        order = np.argsort(np.abs(delta[candidates] - truncated[candidates]) - 0.5, kind="stable")
        n_switch = int(np.searchsorted(np.cumsum(gain[order]), excess, side="left")) + 1
        switch = candidates[order[:n_switch]]
        rounded[switch] = truncated[switch]
    assert float(rounded @ rounded) <= limit, "8-bit budget invariant violated"
    return (clean_values + rounded).astype(np.uint8).reshape(clean.shape)


def quantize_within_budget(adversarial: np.ndarray, clean_uint8: np.ndarray, eps) -> np.ndarray:
    """8-bit images whose own perturbation respects the budget: ‖q/255 − clean/255‖₂ ≤ ε.

    ``adversarial``: float (n_images, ...) in [0, 1] (values outside are clipped); ``clean_uint8``:
    uint8 of the same shape; ``eps``: L2 budget in [0, 1] pixel units, a number or (n_images,).
    Each image is first brought into its ε-ball (if it is outside) and rounded to the nearest grey
    level; where that lengthens δ beyond ε, the values closest to a rounding tie are rounded toward
    the clean value instead, until the budget holds. A budget below one grey level returns the
    clean image. Returns uint8 with the shape of ``clean_uint8``.
    """
    adversarial = np.asarray(adversarial)
    if not isinstance(clean_uint8, np.ndarray) or clean_uint8.dtype != np.uint8:
        raise TypeError(f"'clean_uint8' must be a uint8 numpy array, but got {getattr(clean_uint8, 'dtype', type(clean_uint8))}.")
    if adversarial.shape != clean_uint8.shape or adversarial.ndim < 2:
        raise ValueError(
            f"'adversarial' must have the shape of 'clean_uint8' {clean_uint8.shape} (n_images, ...), "
            f"but got {adversarial.shape}."
        )
    if not np.issubdtype(adversarial.dtype, np.floating) or not np.isfinite(adversarial).all():
        raise ValueError("'adversarial' must hold finite float values in [0, 1]; it has NaN/inf or is not float.")
    budgets = check_budgets("eps", eps, len(clean_uint8))
    out = np.empty_like(clean_uint8)
    for row, (adversarial_image, clean_image, budget) in enumerate(zip(adversarial, clean_uint8, budgets)):
        out[row] = _quantize_one(adversarial_image, clean_image, budget)
    return out


def compute_realised_eps(pixels: np.ndarray, clean_uint8: np.ndarray) -> np.ndarray:
    """L2 norm of each 8-bit perturbation in [0, 1] pixel units: ‖pixels/255 − clean/255‖₂, (n_images,)."""
    if pixels.shape != clean_uint8.shape:
        raise ValueError(f"'pixels' must have the shape of 'clean_uint8' {clean_uint8.shape}, but got {pixels.shape}.")
    delta = pixels.reshape(len(pixels), -1).astype(np.float64) - clean_uint8.reshape(len(clean_uint8), -1)
    return np.sqrt(np.einsum("ij,ij->i", delta, delta)) / 255.0


# ---------------------------------------------------------------------------------------------
# Batches on a device


def _auto_batch_size(model, image_shape: tuple, device: torch.device, settings: _Settings) -> int:
    """Images per batch: a CPU default, or on CUDA what ~60% of the free memory holds."""
    if device.type != "cuda":
        return _CPU_BATCH
    probe = 4
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = torch.rand((probe, *image_shape), device=device)
    with _frozen(model):
        _loss(model, lambda out: out.flatten(1).sum(1), settings.prepare(x), settings, grad=True)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - before) // probe)
    free, _ = torch.cuda.mem_get_info(device)
    size = int(min(_MAX_GPU_BATCH, max(1, 0.6 * free // (per_image * 2))))  # ×2: engine state and headroom
    logger.info("attack batch size %d (%.0f MiB per image, %.0f MiB free)", size, per_image / 2**20, free / 2**20)
    return size


def compute_predictions(model: torch.nn.Module, pixels: np.ndarray, *, batch_size: int = 64, device="cpu") -> np.ndarray:
    """Model outputs on 8-bit images, as reported for stimuli: float32 numpy (n_images, ...).

    ``model``: nn.Module, float images (N, 3, H, W) in [0, 1] → outputs; it must sit on ``device``.
    ``pixels``: uint8 (n_images, H, W, 3). Runs in eval mode, float32, without gradients.
    """
    check_uint8_images("pixels", pixels)
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    return _predict(model, pixels, batch_size, check_device("device", device), _Settings())


def _predict(model, pixels: np.ndarray, batch_size: int, device, settings: _Settings) -> np.ndarray:
    """Model outputs on 8-bit images (n, H, W, 3) in float32 (no autocast), (n, ...) numpy."""
    exact = _Settings(autocast=False, channels_last=settings.channels_last)
    outputs = []
    with _frozen(model), torch.no_grad():
        for begin in range(0, len(pixels), batch_size):
            images = exact.prepare(to_tensor(pixels[begin : begin + batch_size], device))
            outputs.append(exact.forward(model, images).cpu().numpy())
    return np.concatenate(outputs).astype(np.float32)


def _attack_batch(model, clean_uint8, eps, step, n_steps, objective, device, settings, **options) -> np.ndarray:
    """PGD on one batch of 8-bit clean images; returns the budget-safe uint8 attack images."""
    result = compute_pgd(
        model, to_tensor(clean_uint8, device), eps=eps, step_size=step, n_steps=n_steps, objective=objective,
        autocast=settings.autocast, channels_last=settings.channels_last, **options,
    )
    adversarial = result.images.float().cpu().numpy().transpose(0, 2, 3, 1)
    return quantize_within_budget(adversarial, clean_uint8, eps)


def _prepare_model(model: torch.nn.Module, device: torch.device, settings: _Settings, compile_model: bool):
    """Move to ``device`` (in place), optionally channels-last; return the callable used for attack steps."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}.")
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


# ---------------------------------------------------------------------------------------------
# Per-site neural attacks


def _site_objective(site: torch.Tensor, target: torch.Tensor):
    rows = torch.arange(len(site), device=site.device)

    def objective(predicted: torch.Tensor) -> torch.Tensor:
        return (predicted[rows, site] - target) ** 2

    return objective


def make_site_attacks(
    model: torch.nn.Module,
    clean_uint8: np.ndarray,
    image_index,
    site,
    eps,
    *,
    n_steps: int = 100,
    step_ratio: float = 1 / 3,
    random_start: bool = True,
    n_restarts: int = 1,
    batch_size: int = 0,
    seed: int = 0,
    device="cpu",
    autocast: bool = False,
    channels_last: bool = False,
    compile_model: bool = False,
) -> SiteAttacks:
    """Increase/decrease attacks on single sites of an IT model, all jobs packed into large batches.

    ``model``: nn.Module, float images (N, 3, H, W) in [0, 1] → predicted counts (N, n_sites);
    moved to ``device``. ``clean_uint8``: uint8 (n_images, H, W, 3). Job j attacks site
    ``site[j]`` of image ``image_index[j]`` within L2 budget ``eps[j]`` ([0, 1] pixel units); the
    three broadcast to (n_jobs,). For each job both directions are solved — minimise
    MSE(f_site(x + δ), +1000) and MSE(f_site(x + δ), −1000) — with step ``step_ratio`` × ε,
    ``n_steps`` steps and random starts; the direction with the larger predicted
    |f_site(x + δ) − f_site(x)| on the final 8-bit image is kept. ``batch_size``: images (job ×
    direction pairs) per batch; 0 sizes it to the device memory (CUDA) or uses 32 (CPU).
    ``autocast`` (bf16), ``channels_last``, ``compile_model`` (torch.compile): GPU switches, off by
    default. Random starts come from ``seed`` (results also depend on ``batch_size``).
    """
    check_uint8_images("clean_uint8", clean_uint8)
    n_steps = check_integer("n_steps", n_steps, minimum=1)
    step_ratio = check_number("step_ratio", step_ratio, minimum=0.0, inclusive=False)
    batch_size = check_integer("batch_size", batch_size, minimum=0)
    seed = check_integer("seed", seed, minimum=0)
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
    settings = _Settings(autocast=autocast, channels_last=channels_last)
    runner = _prepare_model(model, device, settings, compile_model)
    if batch_size == 0:
        batch_size = _auto_batch_size(model, (3, *clean_uint8.shape[1:3]), device, settings)
    used = np.unique(image_index)
    predicted_used = _predict(model, clean_uint8[used], batch_size, device, settings)
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
    jobs_per_batch = max(1, batch_size // 2)
    batches = [np.arange(b, min(b + jobs_per_batch, n_jobs)) for b in range(0, n_jobs, jobs_per_batch)]
    for jobs in progress(batches, description="site attacks"):
        pairs = np.repeat(jobs, 2)  # (job, +1), (job, −1), ...
        signs = np.tile(np.array([1, -1], np.int8), len(jobs))
        site_tensor = torch.as_tensor(site[pairs], device=device)
        target = torch.as_tensor(signs * SITE_TARGET, dtype=torch.float32, device=device)
        attacked = _attack_batch(
            runner, clean_uint8[image_index[pairs]], eps[pairs], eps[pairs] * step_ratio, n_steps,
            _site_objective(site_tensor, target), device, settings,
            random_start=random_start, n_restarts=n_restarts, generator=generator,
        )
        outputs = _predict(model, attacked, len(attacked), device, settings)
        change = np.abs(outputs[np.arange(len(pairs)), site[pairs]] - clean_predicted[image_index[pairs], site[pairs]])
        keep = 2 * np.arange(len(jobs)) + (change[1::2] > change[0::2])
        pixels[jobs], direction[jobs], predicted[jobs] = attacked[keep], signs[keep], outputs[keep]
    return SiteAttacks(
        pixels=pixels,
        direction=direction,
        predicted=predicted,
        predicted_clean=clean_predicted[image_index],
        realised_eps=compute_realised_eps(pixels, clean_uint8[image_index]),
    )


# ---------------------------------------------------------------------------------------------
# Classifier attacks


def compute_step_schedule(eps) -> tuple[np.ndarray, np.ndarray]:
    """The budget → (step α, iterations) schedule of Gaziv et al. for L2 classifier attacks.

    ``eps``: a number or array of budgets in [0, 1] pixel units. Budgets up to 0.1 → (0.02, 200),
    0.5 → (0.1, 200), 3 → (0.3, 200), 15 → (0.5, 500), 25 → (0.5, 1000), 50 → (2, 2000),
    100 → (2, 5000), above → (2, 10000). Returns (step float64, n_steps int64), each of eps's shape.
    """
    eps = np.asarray(eps, dtype=np.float64)
    budgets = check_budgets("eps", eps.ravel(), eps.size).reshape(eps.shape)
    upper = np.array([row[0] for row in _SCHEDULE])
    row = np.searchsorted(upper, budgets, side="left")
    steps = np.array([r[1] for r in _SCHEDULE])[row]
    iterations = np.array([r[2] for r in _SCHEDULE], dtype=np.int64)[row]
    return steps, iterations


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
    autocast: bool = False,
    channels_last: bool = False,
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
    :func:`compute_step_schedule` (eps). Returns :class:`ClassifierAttacks` with logits on the 8-bit
    images.
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
    settings = _Settings(autocast=autocast, channels_last=channels_last)
    _prepare_model(classifier, device, settings, False)
    if batch_size == 0:
        batch_size = _auto_batch_size(classifier, (3, *clean_uint8.shape[1:3]), device, settings)
    logits_clean = _predict(classifier, clean_uint8, batch_size, device, settings)
    if mode == "centroid":
        wanted = _check_centroid(features, centroid, clean_uint8, device, settings)
        attacked_model = features
    else:
        name, values = ("labels", labels) if mode == "disrupt" else ("targets", targets)
        wanted = _check_class_indices(name, values, n_images, logits_clean.shape[1], composite=mode == "composite")
        attacked_model = classifier
    pixels = np.empty_like(clean_uint8)
    groups = [np.flatnonzero((step == s) & (iterations == k)) for s, k in sorted(set(zip(step, iterations)))]
    batches = [group[b : b + batch_size] for group in groups for b in range(0, len(group), batch_size)]
    for rows in progress(batches, description=f"{mode} attacks"):
        objective = _classifier_objective(mode, torch.as_tensor(wanted[rows], device=device), logit_push)
        pixels[rows] = _attack_batch(
            attacked_model, clean_uint8[rows], eps[rows], step[rows], int(iterations[rows[0]]), objective, device, settings,
        )
    return ClassifierAttacks(
        pixels=pixels,
        logits=_predict(classifier, pixels, batch_size, device, settings),
        logits_clean=logits_clean,
        realised_eps=compute_realised_eps(pixels, clean_uint8),
    )


def _check_centroid(features, centroid, clean_uint8, device, settings) -> np.ndarray:
    """Check the feature function and centroid; return the centroid per image (n_images, n_features)."""
    if not isinstance(features, torch.nn.Module):
        raise TypeError(
            f"mode 'centroid' needs 'features', an nn.Module mapping images to feature vectors, but got {type(features).__name__}."
        )
    if centroid is None:
        raise ValueError("mode 'centroid' needs 'centroid', the target mean feature vector (n_features,).")
    features.to(device)
    n_features = int(np.prod(_predict(features, clean_uint8[:1], 1, device, settings).shape[1:]))
    centroid = np.asarray(centroid, dtype=np.float32)
    if centroid.ndim == 1:
        centroid = np.broadcast_to(centroid, (len(clean_uint8), len(centroid)))
    if centroid.shape != (len(clean_uint8), n_features) or not np.isfinite(centroid).all():
        raise ValueError(
            f"'centroid' must be finite with shape ({n_features},) or ({len(clean_uint8)}, {n_features}), "
            f"but got shape {centroid.shape}."
        )
    return centroid
