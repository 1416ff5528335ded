"""Response geometry: iso-response contours of a unit around an image, and their curvature.

For an image x and a unit f (an IT-model site, any network unit), take the plane through x spanned
by u, the unit-length attack direction (the δ of the project's increase attack at budget ε,
:func:`closedloop.attacks.engine.compute_pgd`), and v, a second unit direction orthogonal to u: the
direction toward the unit's maximally exciting image (MEI, found by the same engine with a 4ε
budget) or a random one. In plane coordinates (a, b) — L2 distances in [0, 1] pixel units —
g(a, b) = f(x + a u + b v).

The curvature of the iso-response curve g = const through a point is
κ = (g_bb g_a² − 2 g_ab g_a g_b + g_aa g_b²) / (g_a² + g_b²)^{3/2}, in 1 / (pixel-unit distance),
with derivatives by central differences of step ``h`` (exact for quadratic units). κ = 0: a straight
contour (a linear unit); |κ| large: the contour bends within the budget, so moving along the
attack direction stops paying off (Guo et al.'s "bent contours mean more robust units").
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from closedloop.attacks.engine import compute_pgd, compute_predictions
from closedloop.core.logs import progress
from closedloop.core.validation import check_integer, check_number, check_option, check_uint8_images
from closedloop.images import to_tensor

__all__ = ["SECOND_DIRECTIONS", "compute_plane_directions", "compute_plane_responses", "compute_contour_curvature",
           "compute_response_geometry"]

SECOND_DIRECTIONS = ("mei", "random")


def _unit_output(model, unit: int):
    def evaluate(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images).flatten(1)[:, unit].double()

    return evaluate


def compute_plane_directions(model: torch.nn.Module, image: torch.Tensor, unit: int, *, eps: float, second: str = "mei",
                             n_steps: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(u, v, ‖δ‖): the attack direction u and second direction v, unit-length (3, H, W), v ⊥ u.

    ``image``: float (3, H, W) in [0, 1]; ``eps``: budget of the increase attack, [0, 1] pixel
    units; ``second``: "mei" (toward the 4ε increase attack's end point, made orthogonal to u) or
    "random" (Gaussian, orthogonal to u; from ``seed``). ‖δ‖: length of the attack's δ.
    """
    check_option("second", second, SECOND_DIRECTIONS)
    start = image[None]
    objective = lambda output: -output.flatten(1)[:, unit]  # noqa: E731 (ascent of the unit)
    delta = compute_pgd(model, start, eps=eps, step_size=eps / 3, n_steps=n_steps, objective=objective).images[0] - image
    length = float(delta.norm())
    if length == 0:
        raise ValueError(f"the attack on unit {unit} found no direction (zero gradient at the image); "
                         "choose another unit or image.")
    u = delta / length
    if second == "mei":
        mei = compute_pgd(model, start, eps=4 * eps, step_size=4 * eps / 3, n_steps=n_steps, objective=objective).images[0]
        other = mei - image
    else:
        other = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    other = other - (other * u).sum() * u
    if float(other.norm()) < 1e-6 * max(float(u.norm()), 1.0):
        other = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
        other = other - (other * u).sum() * u
    return u, other / other.norm(), length


def compute_plane_responses(model, image: torch.Tensor, unit: int, u: torch.Tensor, v: torch.Tensor, a, b) -> np.ndarray:
    """g(a, b) = f_unit(image + a u + b v) on the grid ``a`` × ``b`` (1-D arrays, pixel-unit distances):
    float64 (len(b), len(a)), rows b, columns a. Points are not clamped to [0, 1]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    evaluate = _unit_output(model, unit)
    rows = []
    for b_value in b:
        points = image[None] + torch.as_tensor(a, dtype=image.dtype).view(-1, 1, 1, 1) * u + float(b_value) * v
        rows.append(evaluate(points).cpu().numpy())
    return np.stack(rows)


def compute_contour_curvature(model, image: torch.Tensor, unit: int, u: torch.Tensor, v: torch.Tensor, a, *,
                              h: float) -> np.ndarray:
    """Signed curvature κ (1 / pixel-unit distance) of the iso-response curve through each point
    (a_k, 0) of the attack path, by central differences of step ``h``; float64 (len(a),)."""
    h = check_number("h", h, minimum=0.0, inclusive=False)
    a = np.atleast_1d(np.asarray(a, dtype=np.float64))
    offsets = [(-h, -h), (0, -h), (h, -h), (-h, 0), (0, 0), (h, 0), (-h, h), (0, h), (h, h)]
    evaluate = _unit_output(model, unit)
    points = torch.stack([image + float(p + da) * u + float(db) * v for p in a for da, db in offsets])
    g = evaluate(points).cpu().numpy().reshape(len(a), 3, 3)  # [point, b index, a index]
    g_a = (g[:, 1, 2] - g[:, 1, 0]) / (2 * h)
    g_b = (g[:, 2, 1] - g[:, 0, 1]) / (2 * h)
    g_aa = (g[:, 1, 2] - 2 * g[:, 1, 1] + g[:, 1, 0]) / h**2
    g_bb = (g[:, 2, 1] - 2 * g[:, 1, 1] + g[:, 0, 1]) / h**2
    g_ab = (g[:, 2, 2] - g[:, 2, 0] - g[:, 0, 2] + g[:, 0, 0]) / (4 * h**2)
    gradient = np.sqrt(g_a**2 + g_b**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        curvature = (g_bb * g_a**2 - 2 * g_ab * g_a * g_b + g_aa * g_b**2) / gradient**3
    return np.where(gradient > 0, curvature, np.nan)


def compute_response_geometry(
    model: torch.nn.Module,
    images_uint8: np.ndarray,
    units,
    *,
    eps: float,
    second: str = "mei",
    extent: float | None = None,
    n_grid: int = 21,
    n_path: int = 5,
    n_steps: int = 20,
    seed: int = 0,
) -> dict:
    """Contour maps and curvature for every (unit, image), and whether curvature predicts sensitivity.

    ``model``: nn.Module, float images (N, 3, H, W) in [0, 1] → outputs flattening to (N, n_units);
    ``images_uint8``: uint8 (n_images, H, W, 3); ``units``: output indices; ``eps``: attack budget,
    [0, 1] pixel units; ``extent``: half-width of the contour map (default 2ε); ``n_grid``: grid
    points per side; ``n_path``: points on the attack path (a from 0 to ‖δ‖) where κ is taken,
    with difference step h = ε/4.

    Returns ``{"maps": [...], "rows": [...], "correlation": {...}}``: a map per (unit, image) with
    ``unit``, ``image``, ``a``, ``b`` (grid, pixel units), ``responses`` (n_grid, n_grid),
    ``clean`` (response at x), ``path_length`` (‖δ‖); a row per (unit, image) with
    ``curvature`` (mean |κ| along the path), ``sensitivity`` (f(x + δ) − f(x), the increase found
    at ε), ``normalized_sensitivity`` (÷ the unit's s.d. over the images); ``correlation``:
    Pearson and Spearman r between |κ| and the normalised sensitivity over all rows, and n.
    """

    check_uint8_images("images_uint8", images_uint8)
    eps = check_number("eps", eps, minimum=0.0, inclusive=False)
    extent = 2 * eps if extent is None else check_number("extent", extent, minimum=0.0, inclusive=False)
    n_grid = check_integer("n_grid", n_grid, minimum=3)
    n_path = check_integer("n_path", n_path, minimum=1)
    check_option("second", second, SECOND_DIRECTIONS)
    units = [check_integer("units", int(unit), minimum=0) for unit in np.atleast_1d(units)]
    images = to_tensor(images_uint8)
    outputs = compute_predictions(model, images_uint8).reshape(len(images_uint8), -1).astype(np.float64)
    bad = [unit for unit in units if unit >= outputs.shape[1]]
    if bad:
        raise ValueError(f"'units' must lie in [0, {outputs.shape[1] - 1}], but got {bad}.")
    spread = outputs.std(axis=0, ddof=1) if len(images) > 1 else np.ones(outputs.shape[1])
    grid = np.linspace(-extent, extent, n_grid)
    maps, rows = [], []
    jobs = [(unit, index) for unit in units for index in range(len(images))]
    for unit, index in progress(jobs, description="response geometry"):
        image = images[index]
        u, v, length = compute_plane_directions(model, image, unit, eps=eps, second=second, n_steps=n_steps, seed=seed)
        curvature = compute_contour_curvature(model, image, unit, u, v, np.linspace(0.0, length, n_path), h=eps / 4)
        responses = compute_plane_responses(model, image, unit, u, v, grid, grid)
        attacked = compute_plane_responses(model, image, unit, u, v, [length], [0.0])[0, 0]
        clean = float(outputs[index, unit])
        maps.append({"unit": unit, "image": index, "a": grid, "b": grid, "responses": responses, "clean": clean,
                     "path_length": length})
        rows.append({"unit": unit, "image": index, "curvature": float(np.nanmean(np.abs(curvature))),
                     "signed_curvature": float(np.nanmean(curvature)), "sensitivity": float(attacked - clean),
                     "normalized_sensitivity": float((attacked - clean) / spread[unit]) if spread[unit] > 0 else None,
                     "path_length": length})
    usable = [r for r in rows if r["normalized_sensitivity"] is not None and np.isfinite(r["curvature"])]
    correlation = {"n": len(usable), "pearson_r": None, "spearman_r": None}
    if len(usable) >= 3:
        x = [r["curvature"] for r in usable]
        y = [r["normalized_sensitivity"] for r in usable]
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            correlation.update(pearson_r=float(stats.pearsonr(x, y)[0]), spearman_r=float(stats.spearmanr(x, y)[0]))
    return {"maps": maps, "rows": rows, "correlation": correlation}
