"""White-box sensitivity of network units: the network side of the neural-vs-network comparison.

s_i(x, ε) = max over ‖δ‖₂ ≤ ε of |h_i(x) − h_i(x + δ)|, solved as in Guo et al.: increase and
decrease separately, best over many random starts; a first phase in the 2ε ball, then the ε
ball from where the first ended; the step starts at ε and shrinks 10% whenever a step brings no
progress (each new step taken from the best point so far), and is reset to ε when it has shrunk
below 1% of ε, at most 4 times per phase. ε in [0, 1] pixel units; values are computed on float
images (the network is not shown 8-bit stimuli).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from closedloop.attacks.engine import STEP_RULES, RowSelection, compute_pgd, compute_predictions
from closedloop.core.logs import progress
from closedloop.core.validation import (
    check_device,
    check_indices,
    check_integer,
    check_number,
    check_option,
    check_uint8_images,
)
from closedloop.images import to_tensor

__all__ = ["UnitSensitivity", "compute_unit_sensitivity"]

_CPU_BATCH = 16


@dataclass(frozen=True)
class UnitSensitivity:
    """White-box sensitivities, all float64 (n_images, n_units), in the units' activation units.

    ``increase``: best h_i(x + δ) − h_i(x) found (≥ 0); ``decrease``: best h_i(x) − h_i(x + δ)
    (≥ 0); ``sensitivity``: their maximum, s_i(x, ε); ``clean``: h_i(x); ``units``: (n_units,)
    indices of the units in the flattened output of ``unit_fn``. A direction that was not solved
    (``directions``) is NaN, and so is ``sensitivity``; a direction stopped early
    (``choose_direction_at``) is NaN, and ``sensitivity`` is the other.
    """

    sensitivity: np.ndarray
    increase: np.ndarray
    decrease: np.ndarray
    clean: np.ndarray
    units: np.ndarray


class _UnitObjective:
    """sign · h_unit per image (output → (N,)); ``unit``, ``sign``: (N,). ``take`` follows a compacted batch."""

    def __init__(self, unit: torch.Tensor, sign: torch.Tensor) -> None:
        self.unit, self.sign, self.rows = unit, sign, torch.arange(len(unit), device=unit.device)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return self.sign * output.flatten(1)[self.rows, self.unit]

    def take(self, index: torch.Tensor) -> _UnitObjective:
        return _UnitObjective(self.unit[index], self.sign[index])


def _direction_choice(at: int, problem: np.ndarray, direction: np.ndarray, clean: np.ndarray) -> RowSelection:
    """After ``at`` steps, each problem (image, unit) keeps only its direction with the larger change
    so far (the best over that direction's starts); the other direction's rows stop.

    Per row of the batch: ``problem`` (its (image, unit) number), ``direction`` (0 increase, 1
    decrease), ``clean`` (h at the clean image). A row's best loss L = sign · h gives h = −L
    (increase) or h = L (decrease).
    """

    def keep(best_loss: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        at_rows = rows.cpu().numpy()
        loss = best_loss.detach().cpu().numpy().astype(np.float64)
        change = np.where(direction[at_rows] == 0, -loss - clean[at_rows], clean[at_rows] - loss)
        group, slot = np.unique(problem[at_rows], return_inverse=True)
        best = np.full((len(group), 2), -np.inf)
        np.maximum.at(best, (slot, direction[at_rows]), change)
        return torch.as_tensor(direction[at_rows] == best.argmax(axis=1)[slot], device=rows.device)

    return RowSelection(at=at, keep=keep)


def compute_unit_sensitivity(
    unit_fn: torch.nn.Module,
    clean_uint8: np.ndarray,
    eps: float,
    *,
    units=None,
    n_starts: int = 100,
    n_steps: int = 250,
    step_shrink: float = 0.9,
    n_step_resets: int = 4,
    step_rule: str = "pgd",
    batch_size: int = 0,
    directions: str = "both",
    choose_direction_at: int = 0,
    seed: int = 0,
    device="cpu",
) -> UnitSensitivity:
    """s_i(x, ε) for units of a network on clean images.

    ``unit_fn``: nn.Module, float images (N, 3, H, W) in [0, 1] → unit activations, any shape that
    flattens to (N, n_all_units) (e.g. a penultimate layer); moved to ``device``. ``clean_uint8``:
    uint8 (n_images, H, W, 3). ``eps``: budget in [0, 1] pixel units. ``units``: indices into the
    flattened output (default all). Each (image, unit, direction) is solved from ``n_starts``
    random starts (on the 2ε sphere) for ``n_steps`` steps in total, half in the 2ε ball and half
    in the ε ball. ``step_shrink`` / ``n_step_resets``: the adaptive step (paper: 0.9 / 4).
    ``step_rule``: ``"pgd"`` (that adaptive step, the paper's) or ``"apgd"`` (APGD's step schedule
    with momentum in both phases, which ignores the two; :func:`closedloop.attacks.engine.compute_pgd`).
    ``batch_size``: problems per batch (0: 16). ``directions``: "both" (s_i), or only
    "increase" or "decrease" (half the work; the other direction and s_i are NaN).
    ``choose_direction_at``: with both directions, after this many steps of the first phase
    (2 ≤ it < ``n_steps`` // 2) each (image, unit) keeps only the direction that has changed it more
    in the 2ε ball and the other stops (it is then NaN in ``increase`` or ``decrease``; s_i is the
    kept one); 0: both are solved to the end. Batches are then whole (image, unit) problems.
    Returns :class:`UnitSensitivity`.
    """
    if not isinstance(unit_fn, torch.nn.Module):
        raise TypeError(f"'unit_fn' must be a torch.nn.Module returning unit activations, but got {type(unit_fn).__name__}.")
    check_uint8_images("clean_uint8", clean_uint8)
    if len(clean_uint8) == 0:
        raise ValueError("'clean_uint8' holds no images; give at least one (n_images >= 1).")
    eps = check_number("eps", eps, minimum=0.0, inclusive=False)
    n_starts = check_integer("n_starts", n_starts, minimum=1)
    n_steps = check_integer("n_steps", n_steps, minimum=2)
    check_option("directions", directions, ["both", "increase", "decrease"])
    step_rule = check_option("step_rule", step_rule, STEP_RULES)
    solved = {"both": (0, 1), "increase": (0,), "decrease": (1,)}[directions]
    batch_size = check_integer("batch_size", batch_size, minimum=0) or _CPU_BATCH
    choose_direction_at = check_integer("choose_direction_at", choose_direction_at, minimum=0)
    if choose_direction_at:
        if not (directions == "both" and 2 <= choose_direction_at < n_steps // 2):
            raise ValueError(f"'choose_direction_at' = {choose_direction_at} needs directions='both' and 2 <= it < "
                             f"n_steps // 2 (= {n_steps // 2}); 0 solves both directions to the end.")
        batch_size = max(2 * n_starts, batch_size - batch_size % (2 * n_starts))  # whole problems per batch
    device = check_device("device", device)
    unit_fn.to(device)
    clean = compute_predictions(unit_fn, clean_uint8, batch_size=batch_size, device=device)
    clean = clean.reshape(len(clean_uint8), -1).astype(np.float64)
    units = np.arange(clean.shape[1]) if units is None else check_indices("units", np.atleast_1d(units), clean.shape[1])
    n_images, n_units = len(clean_uint8), len(units)
    # one row per (image, unit, direction, start); direction 0 = increase (minimise −h), 1 = decrease
    image_of, unit_of, direction_of, _ = (a.ravel() for a in np.indices((n_images, n_units, 2, n_starts)))
    problem_of = image_of * n_units + unit_of
    sign_of = np.where(direction_of == 0, -1.0, 1.0)
    reached = np.full(len(image_of), np.nan)
    wanted = np.flatnonzero(np.isin(direction_of, solved))
    generator = torch.Generator().manual_seed(check_integer("seed", seed, minimum=0))
    first_steps = n_steps // 2
    batches = [wanted[b:b + batch_size] for b in range(0, len(wanted), batch_size)]
    for rows in progress(batches, description="white-box sensitivity"):
        images = to_tensor(clean_uint8[image_of[rows]], device)
        sign = torch.as_tensor(sign_of[rows], dtype=torch.float32, device=device)
        objective = _UnitObjective(torch.as_tensor(units[unit_of[rows]], device=device), sign)
        adaptive = dict(step_size=eps, step_shrink=step_shrink, n_step_resets=n_step_resets, step_rule=step_rule)
        selection = None
        if choose_direction_at:
            selection = _direction_choice(choose_direction_at, problem_of[rows], direction_of[rows],
                                          clean[image_of[rows], units[unit_of[rows]]])
        wide = compute_pgd(unit_fn, images, eps=2 * eps, n_steps=first_steps, random_start=True, generator=generator,
                           objective=objective, selection=selection, **adaptive)
        going = torch.nonzero(wide.steps == first_steps).squeeze(1)  # rows that no selection stopped
        final = compute_pgd(unit_fn, images[going], eps=eps, n_steps=n_steps - first_steps, start=wide.images[going],
                            objective=objective.take(going), **adaptive)
        reached[rows[going.cpu().numpy()]] = (final.loss * sign[going]).cpu().numpy()  # h_i(x + δ)
    reached = reached.reshape(n_images, n_units, 2, n_starts)
    at_clean = clean[:, units]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():  # a direction stopped early is all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        highest, lowest = np.nanmax(reached[:, :, 0], axis=2), np.nanmin(reached[:, :, 1], axis=2)
    increase = np.fmax(highest - at_clean, 0.0) if 0 in solved else np.full_like(at_clean, np.nan)
    decrease = np.fmax(at_clean - lowest, 0.0) if 1 in solved else np.full_like(at_clean, np.nan)
    increase[np.isnan(highest)], decrease[np.isnan(lowest)] = np.nan, np.nan
    sensitivity = np.fmax(increase, decrease) if choose_direction_at else np.maximum(increase, decrease)
    return UnitSensitivity(sensitivity=sensitivity, increase=increase, decrease=decrease, clean=at_clean, units=units)
