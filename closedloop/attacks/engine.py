"""The L2 PGD engine, its budget-safe 8-bit output, and batched inference on 8-bit images.

Units. ``eps`` is the L2 norm of δ = x_adv − x over all 3 × H × W values, in [0, 1] pixel units
(one pixel going black to white is √3 ≈ 1.73; two ImageNet images are ≈ 130 apart). Step sizes
are in the same units.

The engine (:func:`compute_pgd`) works on torch float images (N, 3, H, W) in [0, 1]: per image,
x ← x − α g/‖g‖₂ (descent of a per-image objective; ascent is a sign in the objective), then δ is
projected onto ‖δ‖₂ ≤ ε and x clamped to [0, 1]; each image keeps its best iterate. The model runs
in eval mode with frozen parameters, so images in a batch are independent and every image may
have its own ε, step size and target. The step loop has no host-device synchronisation.

Fast numerics (:func:`make_run_settings`): the attack steps run on a copy of the model with its
BatchNorm layers folded into the convolutions before them (exact to ~1e-6 in float32), in the
memory format that is faster on the device, and under bf16 autocast where the hardware runs bf16
natively (``precision="auto"``, :func:`resolve_precision`). Everything that decides what is shown
or reported stays float32 on the model as given: the projection, the 8-bit rounding, the budget
check and every reported prediction.

Stimuli are shown as 8-bit images, so every attack (:mod:`closedloop.attacks.sites`,
:mod:`closedloop.attacks.classifiers`) returns uint8 images made by :func:`quantize_within_budget`
(through :func:`make_attack_pixels`), whose own perturbation never exceeds ε, and reports model
outputs computed on those 8-bit images (:func:`compute_predictions`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse

from closedloop.core.logs import logger
from closedloop.core.validation import (
    check_budgets,
    check_device,
    check_image_batch,
    check_integer,
    check_number,
    check_option,
    check_uint8_images,
)
from closedloop.images import to_tensor

__all__ = [
    "PRECISIONS",
    "PGDResult",
    "RowSelection",
    "RunSettings",
    "has_native_bf16",
    "resolve_precision",
    "make_run_settings",
    "fold_batch_norm",
    "STEP_RULES",
    "compute_pgd",
    "compute_apgd_checkpoints",
    "compute_step_schedule",
    "compute_realised_eps",
    "compute_predictions",
    "compute_batch_size",
    "quantize_within_budget",
    "make_attack_pixels",
    "make_attack_runner",
]

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
_APGD_MOMENTUM = 0.75  # APGD's weight of the new point against the previous iterate (Croce & Hein 2020)
_APGD_RHO = 0.75  # APGD halves the step when fewer than this share of the steps since a checkpoint lowered the loss
STEP_RULES = ("pgd", "apgd")
_MARGIN = 1e-9  # relative safety margin of the 8-bit budget against float rounding
PRECISIONS = ("auto", "fp32", "bf16")
_FOLD_TOLERANCE = 1e-4  # largest relative output change a BatchNorm fold may make (float32 gives ~1e-6)


@dataclass(frozen=True)
class PGDResult:
    """Output of :func:`compute_pgd`.

    ``images``: best iterate per image, float32 (N, 3, H, W) in [0, 1] with ‖images − clean‖₂ ≤ ε;
    ``loss``: objective at ``images``, (N,); ``start_loss``: objective at the first start point, (N,);
    ``steps``: int64 (N,), forward/backward passes each image took in its last restart (``n_steps``
    unless a :class:`RowSelection` stopped it earlier).
    """

    images: torch.Tensor
    loss: torch.Tensor
    start_loss: torch.Tensor
    steps: torch.Tensor


@dataclass(frozen=True)
class RowSelection:
    """Rows of a batch that stop part-way: after ``at`` steps (2 ≤ ``at`` < ``n_steps``) the engine
    asks ``keep(best_loss, rows)`` (best loss so far, (M,); the rows' indices in the batch as given,
    int64 (M,)) → bool (M,), and only the rows it keeps take the remaining steps, in a compacted
    batch; a row that stops keeps its best iterate so far. The objective must then offer
    ``take(index)``: the same objective for the rows at ``index`` (int64 (K,)) of its batch.
    E.g. the site attacks drop the weaker direction of each job early (:mod:`closedloop.attacks.sites`).
    """

    at: int
    keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Rows:
    """Which rows of a batch are still stepping, and the best images, losses and step counts of those
    that stopped, by their index in the batch as given."""

    def __init__(self, clean: torch.Tensor) -> None:
        n = clean.shape[0]
        self.clean, self.active, self.images = clean, torch.arange(n, device=clean.device), None
        self.loss, self.steps = torch.empty(n, device=clean.device), torch.empty(n, dtype=torch.int64, device=clean.device)

    def select(self, selection: RowSelection | None, done: int, best_x: torch.Tensor, best_loss: torch.Tensor):
        """None when every row goes on after ``done`` steps, else the kept positions (K,) in the
        current batch; the stopped rows' results are stored."""
        if selection is None or done != selection.at:
            return None
        keep = selection.keep(best_loss, self.active)
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"RowSelection.keep must return a torch tensor of flags, but returned {type(keep).__name__}.")
        keep = keep.to(torch.bool)
        if keep.shape != best_loss.shape:
            raise ValueError(f"RowSelection.keep must return one flag per row, shape {tuple(best_loss.shape)}, "
                             f"but returned shape {tuple(keep.shape)}.")
        if bool(keep.all()):
            return None
        if self.images is None:
            self.images = torch.empty_like(self.clean)
        stopped = self.active[~keep]
        self.images[stopped], self.loss[stopped], self.steps[stopped] = best_x[~keep], best_loss[~keep], done
        self.active = self.active[keep]
        return keep.nonzero().squeeze(1)

    def finish(self, best_x: torch.Tensor, best_loss: torch.Tensor, start_loss: torch.Tensor, n_steps: int):
        """(images (N, ...), loss (N,), start loss (N,), steps (N,)) of the whole batch, the active
        rows after ``n_steps``."""
        if self.images is None:
            return best_x, best_loss, start_loss, torch.full_like(self.steps, n_steps)
        self.images[self.active], self.loss[self.active], self.steps[self.active] = best_x, best_loss, n_steps
        return self.images, self.loss, start_loss, self.steps


def _take(objective, index: torch.Tensor):
    """``objective`` for the rows at ``index`` of its batch (see :class:`RowSelection`)."""
    take = getattr(objective, "take", None)
    if take is None:
        raise TypeError(f"a RowSelection needs an objective with take(index) for the rows it keeps; "
                        f"{type(objective).__name__} has none.")
    return take(index)


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
class RunSettings:
    """How the attack steps run the model (all off by default; :func:`make_run_settings` chooses).

    ``autocast``: bf16 autocast of the model's forward pass in the attack steps (reported outputs
    are float32); ``channels_last``: images and model in channels-last memory format;
    ``fold_batch_norm``: the steps run a copy of the model with BatchNorm folded into the
    convolutions (:func:`fold_batch_norm`).
    """

    autocast: bool = False
    channels_last: bool = False
    fold_batch_norm: bool = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 images (N, 3, H, W), contiguous in this memory format."""
        images = images.float()
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images.contiguous()

    def forward(self, model, images: torch.Tensor) -> torch.Tensor:
        """The model's output on prepared images, under autocast if set, as float32."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(images).float()


def has_native_bf16(device) -> bool:
    """Whether ``device`` runs bf16 convolutions natively (so bf16 autocast makes attacks faster).

    CUDA: a GPU with bf16 arithmetic (compute capability ≥ 8.0; emulation does not count). CPU:
    oneDNN's own check for bf16 instructions (AVX-512 BF16 or AMX); on other CPUs bf16 convolutions
    are emulated and several times slower than float32 (docs/attacks.md gives the measurement).
    """
    device = check_device("device", device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and supported is not None and supported())


def resolve_precision(precision: str, device) -> str:
    """``"fp32"`` or ``"bf16"``: ``precision`` as given, or for ``"auto"`` bf16 where
    :func:`has_native_bf16` (``device``), else fp32. Raises ``ValueError`` for another value."""
    check_option("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    return "bf16" if has_native_bf16(device) else "fp32"


def make_run_settings(precision: str = "auto", device="cpu", *, channels_last: bool = True) -> RunSettings:
    """The attack steps' settings for ``precision`` (``"auto"``, ``"fp32"``, ``"bf16"``) on ``device``.

    BatchNorm folding (exact to float rounding) always; bf16 autocast for bf16
    (:func:`resolve_precision`); channels-last memory format unless ``channels_last`` is False
    (faster in float32 on the 2-core development CPU too: docs/attacks.md has the measurements).
    """
    device = check_device("device", device)
    bf16 = resolve_precision(precision, device) == "bf16"
    check_option("channels_last", channels_last, [False, True])
    return RunSettings(autocast=bf16, channels_last=channels_last, fold_batch_norm=True)


def _random_start(clean: torch.Tensor, eps: torch.Tensor, generator: torch.Generator, settings: RunSettings) -> torch.Tensor:
    """A random point on each image's ε-sphere, clamped to [0, 1] (drawn on the CPU, then moved)."""
    noise = settings.prepare(torch.randn(clean.shape, generator=generator, dtype=torch.float32).to(clean.device))
    noise.mul_((eps / _norm(noise)).view(-1, 1, 1, 1)).add_(clean)
    return _project(noise, clean, eps)


def _loss(model, objective, x: torch.Tensor, settings: RunSettings, *, grad: bool):
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


def _step_along(base: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor, *, out: torch.Tensor | None = None):
    """base − step · gradient / ‖gradient‖ per image (step: (N,)), written into ``out`` when given."""
    scale = -(step / _norm(gradient).clamp_min(_TINY)).view((-1,) + (1,) * (base.dim() - 1))
    return torch.addcmul(base, gradient, scale, out=out)


def _descend(model, objective, clean, start, eps, step, n_steps, settings, *, step_shrink, n_step_resets, selection=None):
    """One PGD run from ``start`` (which it overwrites); returns (best images, best loss, start loss,
    steps per image).

    Plain mode (``step_shrink == 1``): step from the current iterate. Adaptive mode: always step from
    the best iterate along its gradient; a step that brings no progress shrinks the step by
    ``step_shrink``; when the step falls below 1% of its initial value it is reset (at most
    ``n_step_resets`` times). ``selection``: a :class:`RowSelection`, whose stopped rows leave the
    batch. Image-sized state lives in buffers updated in place, so the loop allocates nothing but
    the model's own activations and gradient (and one compacted copy at a selection).
    """
    view = (-1,) + (1,) * (clean.dim() - 1)
    adaptive = step_shrink != 1.0
    x, best_x, scratch = start, start.clone(), torch.empty_like(start)
    best_gradient = torch.zeros_like(start) if adaptive else None
    best_loss = torch.full(clean.shape[:1], math.inf, device=clean.device)
    initial_step, resets_left = step, torch.full_like(step, float(n_step_resets))
    start_loss, rows = None, _Rows(clean)
    for done in range(1, n_steps + 1):
        loss, gradient = _loss(model, objective, x, settings, grad=True)
        start_loss = loss if start_loss is None else start_loss
        improved = loss < best_loss
        best_loss = torch.where(improved, loss, best_loss)
        all_improved = bool(improved.all())
        if all_improved:  # x is the new best of every image: swap the buffers instead of copying x
            best_x, x = x, best_x
        else:
            torch.where(improved.view(view), x, best_x, out=best_x)
        if adaptive:
            gradient = torch.where(improved.view(view), gradient, best_gradient, out=best_gradient)
            step = torch.where(improved, step, step * step_shrink)
            reset = (step < 0.01 * initial_step) & (resets_left > 0)
            step = torch.where(reset, initial_step, step)
            resets_left = resets_left - reset.float()
        if (kept := rows.select(selection, done, best_x, best_loss)) is not None:
            if len(kept) == 0:
                return rows.finish(best_x[kept], best_loss[kept], start_loss, done)
            x, best_x, gradient, best_loss, step, initial_step, resets_left, clean, eps = (
                t[kept] for t in (x, best_x, gradient, best_loss, step, initial_step, resets_left, clean, eps))
            best_gradient, scratch, objective = gradient if adaptive else None, torch.empty_like(x), _take(objective, kept)
        base = best_x if all_improved or adaptive else x  # the step overwrites x, never its base
        _project(_step_along(base, gradient, step, out=x), clean, eps, scratch=scratch)
    loss, _ = _loss(model, objective, x, settings, grad=False)
    improved = loss < best_loss
    torch.where(improved.view(view), x, best_x, out=best_x)
    return rows.finish(best_x, torch.where(improved, loss, best_loss), start_loss, n_steps)


def compute_apgd_checkpoints(n_steps: int) -> list[int]:
    """The iterations at which APGD checks its progress (Croce & Hein 2020): ⌈p_j · n_steps⌉ for
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), p_j ≤ 1; the first
    (0) dropped. E.g. 20 steps → [5, 9, 12, 14, 16, 18, 19, 20]."""
    fractions = [0.0, 0.22]
    while (following := fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06)) <= 1.0:
        fractions.append(following)
    return sorted({math.ceil(round(p * n_steps, 9)) for p in fractions[1:]} - {0})


def _descend_apgd(model, objective, clean, start, eps, n_steps, settings, *, selection=None,
                  momentum=_APGD_MOMENTUM, rho=_APGD_RHO):
    """One APGD-L2 run from ``start`` (Croce & Hein 2020; overwrites it); returns (best images, best
    loss, start loss, steps per image).

    The step starts at 2ε and is halved at a checkpoint (:func:`compute_apgd_checkpoints`) when fewer
    than ``rho`` of the steps since the last checkpoint lowered the loss, or when neither the step
    nor the best loss changed since it; a halving restarts that image from its best iterate. Each
    step is a normalised-gradient step z = P(x − η g/‖g‖) followed by the heavy-ball mix
    x' = P(x + m(z − x) + (1 − m)(x − x_previous)), m = ``momentum``; P projects onto the ε-ball and
    [0, 1]. ``selection``: a :class:`RowSelection`, whose stopped rows leave the batch. Image-sized
    state lives in buffers that are rotated and updated in place.
    """
    view = (-1,) + (1,) * (clean.dim() - 1)
    checkpoints = set(compute_apgd_checkpoints(n_steps))
    x, scratch, rows = start, torch.empty_like(start), _Rows(clean)
    loss, gradient = _loss(model, objective, x, settings, grad=True)
    start_loss, previous_loss = loss, loss
    best_loss, best_x, best_gradient = loss.clone(), x.clone(), gradient.clone()
    step = 2.0 * eps
    step_at_check, best_at_check = step.clone(), best_loss.clone()
    lowered, since_check = torch.zeros_like(loss), 0
    x_next = _project(_step_along(x, gradient, step), clean, eps, scratch=scratch)
    x_previous = torch.empty_like(x)
    for iteration in range(1, n_steps):
        x_previous, x, x_next = x, x_next, x_previous  # x_next's buffer is free: the old previous iterate
        loss, gradient = _loss(model, objective, x, settings, grad=True)
        lowered += (loss < previous_loss).float()
        previous_loss = loss
        improved = loss < best_loss
        best_loss = torch.where(improved, loss, best_loss)
        torch.where(improved.view(view), x, best_x, out=best_x)
        torch.where(improved.view(view), gradient, best_gradient, out=best_gradient)
        if (kept := rows.select(selection, iteration + 1, best_x, best_loss)) is not None:
            if len(kept) == 0:
                return rows.finish(best_x[kept], best_loss[kept], start_loss, iteration + 1)
            (x, x_previous, loss, gradient, previous_loss, best_loss, best_x, best_gradient, step, step_at_check,
             best_at_check, lowered, clean, eps) = (t[kept] for t in (
                x, x_previous, loss, gradient, previous_loss, best_loss, best_x, best_gradient, step, step_at_check,
                best_at_check, lowered, clean, eps))
            x_next, scratch, objective = torch.empty_like(x), torch.empty_like(x), _take(objective, kept)
        since_check += 1
        if iteration in checkpoints:
            stalled = (lowered < rho * since_check) | ((step == step_at_check) & (best_loss == best_at_check))
            step = torch.where(stalled, step / 2, step)
            torch.where(stalled.view(view), best_x, x, out=x)
            gradient = torch.where(stalled.view(view), best_gradient, gradient)
            lowered.zero_()
            since_check = 0
            step_at_check, best_at_check = step.clone(), best_loss.clone()
        z = _project(_step_along(x, gradient, step, out=x_next), clean, eps, scratch=scratch)
        # x + m(z − x) + (1 − m)(x − x_previous) = m z + 2(1 − m) x − (1 − m) x_previous, built in z's buffer
        z.mul_(momentum).add_(x, alpha=2 * (1 - momentum)).sub_(x_previous, alpha=1 - momentum)
        x_next = _project(z, clean, eps, scratch=scratch)
    loss, _ = _loss(model, objective, x_next, settings, grad=False)
    improved = loss < best_loss
    torch.where(improved.view(view), x_next, best_x, out=best_x)
    return rows.finish(best_x, torch.where(improved, loss, best_loss), start_loss, n_steps)


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
    step_rule: str = "pgd",
    selection: RowSelection | None = None,
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
    PGD. ``step_rule``: ``"pgd"`` (the above) or ``"apgd"`` (APGD's step schedule with momentum,
    Croce & Hein 2020: starts at a 2ε step and ignores ``step_size``, ``step_shrink`` and
    ``n_step_resets``; :func:`_descend_apgd`). ``selection``: a :class:`RowSelection` that stops
    rows part-way (in every restart; ``steps`` of the result says how far each went; the objective
    must then have ``take``). ``autocast``: bf16 autocast of the model;
    ``channels_last``: channels-last images (the attacks choose both with :func:`make_run_settings`).

    Returns a :class:`PGDResult`; the loss at the result is never worse than at the start.
    """
    check_image_batch("clean", clean)
    n_steps = check_integer("n_steps", n_steps, minimum=1)
    n_restarts = check_integer("n_restarts", n_restarts, minimum=1)
    n_step_resets = check_integer("n_step_resets", n_step_resets, minimum=0)
    step_shrink = check_number("step_shrink", step_shrink, minimum=0.0, maximum=1.0, inclusive=True)
    step_rule = check_option("step_rule", step_rule, STEP_RULES)
    if selection is not None:
        if not isinstance(selection, RowSelection):
            raise TypeError(f"'selection' must be a RowSelection or None, but got {type(selection).__name__}.")
        check_integer("selection.at", selection.at, minimum=2, maximum=n_steps - 1)
    if n_restarts > 1 and not random_start:
        raise ValueError(f"'n_restarts' = {n_restarts} needs random_start=True: restarts from the same point are identical.")
    if start is not None and tuple(start.shape) != tuple(clean.shape):
        raise ValueError(f"'start' must have the shape of 'clean' {tuple(clean.shape)}, but got {tuple(start.shape)}.")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    settings = RunSettings(autocast=autocast, channels_last=channels_last)
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
            if step_rule == "apgd":
                images, loss, start_loss, steps = _descend_apgd(model, objective, clean, first, eps, n_steps, settings,
                                                                selection=selection)
            else:
                images, loss, start_loss, steps = _descend(
                    model, objective, clean, first, eps, step, n_steps, settings,
                    step_shrink=step_shrink, n_step_resets=n_step_resets, selection=selection,
                )
            if best is None:
                best = PGDResult(images=images, loss=loss, start_loss=start_loss, steps=steps)
                continue
            better = loss < best.loss
            best = PGDResult(
                images=torch.where(better.view(-1, 1, 1, 1), images, best.images),
                loss=torch.where(better, loss, best.loss),
                start_loss=best.start_loss,
                steps=steps,
            )
    return PGDResult(images=best.images.contiguous(), loss=best.loss, start_loss=best.start_loss, steps=best.steps)


# ---------------------------------------------------------------------------------------------
# 8-bit output within the budget


def _round_toward_clean(rounded: np.ndarray, delta: np.ndarray, excess: float) -> None:
    """One image (flat): round the values closest to a rounding tie toward clean instead, in place in
    ``rounded``, until Σ rounded² has dropped by at least ``excess`` (> 0) grey levels².

    Each such switch lowers Σ rounded² by ≥ 1, so only the ⌈excess⌉ + 1 values nearest a tie can
    be needed: they are found by a partial selection (all values tied with the last one included)
    and sorted stably, which gives the same values as a stable sort of every candidate.
    """
    truncated = np.trunc(delta)
    candidates = np.flatnonzero(rounded != truncated)
    key = np.abs(delta[candidates] - truncated[candidates]) - 0.5
    n_needed = min(len(candidates), math.ceil(excess) + 1)
    if n_needed < len(candidates):
        threshold = np.partition(key, n_needed - 1)[n_needed - 1]
        nearest = np.flatnonzero(key <= threshold)  # index order, so the stable sort below breaks ties as before
        candidates, key = candidates[nearest], key[nearest]
    order = np.argsort(key, kind="stable")
    gain = rounded[candidates[order]] ** 2 - truncated[candidates[order]] ** 2
    n_switch = int(np.searchsorted(np.cumsum(gain), excess, side="left")) + 1
    switch = candidates[order[:n_switch]]
    rounded[switch] = truncated[switch]


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
    n = len(clean_uint8)
    clean_values = clean_uint8.reshape(n, -1).astype(np.float64)
    delta = adversarial.reshape(n, -1).astype(np.float64)
    delta *= 255.0
    delta -= clean_values
    radius = budgets * 255.0 * (1.0 - _MARGIN)
    length = np.sqrt(np.einsum("ij,ij->i", delta, delta))
    outside = length > radius
    delta[outside] *= (radius[outside] / length[outside])[:, None]
    delta += clean_values
    np.clip(delta, 0.0, 255.0, out=delta)
    delta -= clean_values
    rounded = np.rint(delta)
    limit = (budgets * 255.0) ** 2 * (1.0 - _MARGIN)
    excess = np.einsum("ij,ij->i", rounded, rounded) - limit
    for row in np.flatnonzero(excess > 0):
        _round_toward_clean(rounded[row], delta[row], float(excess[row]))
    assert (np.einsum("ij,ij->i", rounded, rounded) <= limit).all(), "8-bit budget invariant violated"
    rounded += clean_values
    return rounded.astype(np.uint8).reshape(clean_uint8.shape)


def compute_realised_eps(pixels: np.ndarray, clean_uint8: np.ndarray) -> np.ndarray:
    """L2 norm of each 8-bit perturbation in [0, 1] pixel units: ‖pixels/255 − clean/255‖₂, (n_images,)."""
    if pixels.shape != clean_uint8.shape:
        raise ValueError(f"'pixels' must have the shape of 'clean_uint8' {clean_uint8.shape}, but got {pixels.shape}.")
    delta = pixels.reshape(len(pixels), -1).astype(np.float64) - clean_uint8.reshape(len(clean_uint8), -1)
    return np.sqrt(np.einsum("ij,ij->i", delta, delta)) / 255.0


# ---------------------------------------------------------------------------------------------
# The step schedule of classifier attacks


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


# ---------------------------------------------------------------------------------------------
# Batches on a device


def compute_batch_size(model: torch.nn.Module, image_shape: tuple, device: torch.device, settings: RunSettings) -> int:
    """Images per attack batch: 32 on CPU, or on CUDA what ~60% of the free memory holds (at most 1024).

    ``image_shape``: (3, H, W) of one image. On CUDA one forward and input-gradient pass of 4
    random images under ``settings`` measures the memory per image; the batch gets half of what
    fits in 60% of the free memory (the other half: engine state and headroom).
    """
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


def compute_predictions(
    model: torch.nn.Module, pixels: np.ndarray, *, batch_size: int = 64, device="cpu", channels_last: bool = False
) -> np.ndarray:
    """Model outputs on 8-bit images, as reported for stimuli: float32 numpy (n_images, ...).

    ``model``: nn.Module, float images (N, 3, H, W) in [0, 1] → outputs; it must sit on ``device``.
    ``pixels``: uint8 (n_images, H, W, 3). Runs in eval mode, float32 (never autocast), without
    gradients; ``channels_last``: images in channels-last memory format (for a model moved to it).
    """
    check_uint8_images("pixels", pixels)
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    device = check_device("device", device)
    exact = RunSettings(autocast=False, channels_last=channels_last)
    outputs = []
    with _frozen(model), torch.no_grad():
        for begin in range(0, len(pixels), batch_size):
            images = exact.prepare(to_tensor(pixels[begin : begin + batch_size], device))
            outputs.append(exact.forward(model, images).cpu().numpy())
    return np.concatenate(outputs).astype(np.float32)


def make_attack_pixels(
    model, clean_uint8: np.ndarray, *, eps, step_size, n_steps: int, objective, device: torch.device, settings: RunSettings,
    **options,
) -> np.ndarray:
    """PGD on one batch of 8-bit clean images; returns the budget-safe uint8 attack images.

    ``model``: the callable of the attack steps (see :func:`make_attack_runner`), on ``device``.
    ``clean_uint8``: uint8 (n_images, H, W, 3). ``eps``, ``step_size``: [0, 1] pixel units, a
    number or (n_images,). ``objective`` and ``options`` (``random_start``, ``n_restarts``,
    ``generator``, ...) go to :func:`compute_pgd`. Returns uint8 (n_images, H, W, 3) from
    :func:`quantize_within_budget`, each image within its ``eps``.
    """
    result = compute_pgd(
        model, to_tensor(clean_uint8, device), eps=eps, step_size=step_size, n_steps=n_steps, objective=objective,
        autocast=settings.autocast, channels_last=settings.channels_last, **options,
    )
    adversarial = result.images.float().cpu().numpy().transpose(0, 2, 3, 1)
    return quantize_within_budget(adversarial, clean_uint8, eps)


def _fold_children(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with each convolution → BatchNorm pair folded (in place where it can; eval mode).

    A module that torch.fx can trace is folded as one graph; one it cannot (Python control flow on
    tensor values, e.g. an input shape check) is left as is and its children are tried instead.
    """
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    try:
        traced = module if isinstance(module, torch.fx.GraphModule) else torch.fx.symbolic_trace(module)
    except Exception as error:  # tracing arbitrary user code can fail in any way: fold inside instead
        logger.debug("BatchNorm folding: %s is not traceable (%s); folding its children", type(module).__name__, error)
        for name, child in module.named_children():
            setattr(module, name, _fold_children(child))
        return module
    return fuse(traced, inplace=True, no_trace=True).eval()


def fold_batch_norm(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` for attack steps: eval mode, every BatchNorm right after a convolution
    folded into it (w' = w·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β), parameters without grad.

    The copy computes the same function as ``model`` in eval mode to float rounding (~1e-6
    relative in float32), with one convolution in place of two layers. ``example``: float images
    (N, 3, H, W) on the model's device; the copy's output on them is compared with the model's,
    and if the largest difference exceeds 1e-4 of the largest output (a model whose traced graph
    is not its forward), the unfolded copy is returned instead. ``model`` itself is not changed.
    """
    # .eval() after the copy: a deep-copied torch.fx GraphModule comes back in train mode
    folded = _fold_children(copy.deepcopy(model).eval().requires_grad_(False))
    with _frozen(model), torch.no_grad():
        expected, got = model(example).float(), folded(example).float()
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(_TINY))
    if not error <= _FOLD_TOLERANCE:
        logger.warning("BatchNorm folding changed %s's output by %.2g (relative); attacking the unfolded model",
                       type(model).__name__, error)
        return copy.deepcopy(model).eval().requires_grad_(False)
    return folded


def make_attack_runner(
    model: torch.nn.Module, device: torch.device, settings: RunSettings, *, example: torch.Tensor | None = None,
    compile_model: bool = False,
):
    """Move ``model`` to ``device`` (in place) and return the callable the attack steps run.

    That is ``model`` itself when ``settings`` change nothing, else a copy: BatchNorm folded
    (:func:`fold_batch_norm` with ``example``, float images (N, 3, H, W) on ``device``, required
    then) and in channels-last memory format if ``settings`` say so; ``torch.compile`` of it when
    ``compile_model``. Raises ``TypeError`` if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}.")
    model.to(device)
    runner = model
    if settings.fold_batch_norm:
        if example is None:
            raise ValueError("'example' images are required to fold BatchNorm (settings.fold_batch_norm); pass a few.")
        runner = fold_batch_norm(model, example)
    if settings.channels_last:
        runner = (runner if runner is not model else copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)
    return torch.compile(runner) if compile_model else runner
