"""The biased-down estimate of each site's adversarial sensitivity (Guo et al.).

For site i and budget ε, over the M perturbed images made for it,

    ŝ_i(ε) = (1/M) Σ_j sign(f_i(x_j) − f_i(x_j + δ_ij)) · (r_i(x_j) − r_i(x_j + δ_ij)),

with f the model that made the attacks (its predictions on the 8-bit images) and r the mean
recorded count over valid presentations. The sign comes from the model, not from the noisy
data, so noise averages out instead of inflating the estimate (as mean |Δr| would); the result
is unbiased only if f predicted every direction right, so in expectation it is a lower bound
on s_i(ε) = E_x max_{‖δ‖<ε} |r_i(x) − r_i(x + δ)|. It is normalised by σ_i, the standard
deviation of the site's mean response over the day's clean images. Model-free baselines
(Gaussian noise, interpolation) get the same estimator, with the same model's predicted sign,
over every clean image they were made from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from closedloop.core.validation import check_indices

__all__ = ["SignedChanges", "compute_mean_responses", "compute_signed_changes", "compute_sensitivity"]

ATTACK = "attack"
BASELINES = ("gaussian", "interpolation")


def compute_mean_responses(stimulus, valid, counts, n_stimuli: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean count per stimulus over its valid presentations.

    ``stimulus`` (n_presentations,) stimulus index; ``valid`` (n_presentations,) bool;
    ``counts`` (n_presentations, n_sites) spikes per response window.
    Returns ``means`` (n_stimuli, n_sites) in spikes per window (NaN where a stimulus has no
    valid presentation) and ``n_valid`` (n_stimuli,).
    """
    stimulus = check_indices("stimulus", stimulus, n_stimuli)
    valid = np.asarray(valid, dtype=bool)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != stimulus.shape[0] or valid.shape != stimulus.shape:
        raise ValueError(
            f"'counts' must have shape (n_presentations, n_sites) and 'valid' (n_presentations,) with "
            f"n_presentations = {stimulus.shape[0]}, but got {counts.shape} and {valid.shape}."
        )
    n_valid = np.bincount(stimulus[valid], minlength=n_stimuli)
    sums = np.zeros((n_stimuli, counts.shape[1]))
    np.add.at(sums, stimulus[valid], counts[valid])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / n_valid[:, None]
    means[n_valid == 0] = np.nan
    return means, n_valid


@dataclass(frozen=True)
class SignedChanges:
    """One row per (site, perturbed stimulus) pair with both responses recorded.

    All arrays have shape (n_pairs,): ``site``, ``eps`` (L2, [0,1] pixel units), ``kind``,
    ``parent`` and ``stimulus`` (indices into the day's stimuli), ``sign`` (the model's
    predicted direction of r(x) − r(x+δ): +1, −1 or 0) and ``change`` (sign · (r(x) − r(x+δ)),
    spikes per window).
    """

    site: np.ndarray
    eps: np.ndarray
    kind: np.ndarray
    parent: np.ndarray
    stimulus: np.ndarray
    sign: np.ndarray
    change: np.ndarray


def compute_signed_changes(parent, site, eps, kind, predicted, means) -> SignedChanges:
    """Every (site, perturbation) pair's model-signed response change.

    ``parent``, ``site``, ``eps``, ``kind``: per stimulus (n_stimuli,) as in the day store
    (parent −1 and site −1 where not applicable); ``predicted`` (n_stimuli, n_sites): the
    generating model's prediction on each 8-bit stimulus; ``means`` (n_stimuli, n_sites) from
    :func:`compute_mean_responses`. Attack stimuli pair with their own target site only;
    baseline stimuli pair with every site.
    """
    parent, site = np.asarray(parent, np.int64), np.asarray(site, np.int64)
    eps, kind = np.asarray(eps, np.float64), np.array(np.asarray(kind).tolist(), dtype=str)
    predicted, means = np.asarray(predicted, np.float64), np.asarray(means, np.float64)
    n_sites = means.shape[1]
    perturbed = np.flatnonzero(parent >= 0)
    rows_stim, rows_site = [], []
    attacks = perturbed[kind[perturbed] == ATTACK]
    rows_stim.append(attacks)
    rows_site.append(site[attacks])
    baselines = perturbed[np.isin(kind[perturbed], BASELINES)]
    rows_stim.append(np.repeat(baselines, n_sites))
    rows_site.append(np.tile(np.arange(n_sites), baselines.size))
    stim, which = np.concatenate(rows_stim), np.concatenate(rows_site)
    check_indices("site", which, n_sites)
    par = parent[stim]
    clean, shown = means[par, which], means[stim, which]
    keep = np.isfinite(clean) & np.isfinite(shown)
    stim, which, par = stim[keep], which[keep], par[keep]
    sign = np.sign(predicted[par, which] - predicted[stim, which])
    change = sign * (means[par, which] - means[stim, which])
    return SignedChanges(which, eps[stim], kind[stim], par, stim, sign.astype(np.int8), change)


def compute_sensitivity(parent, site, eps, kind, predicted, means, *, truth=None, expected=None) -> list[dict]:
    """The per-site, per-budget lower bounds, as the records of ``sensitivity.json``.

    Inputs as in :func:`compute_signed_changes`. ``truth``: optional callable
    ``truth(site, eps) -> float | None`` giving the true mean white-box sensitivity (simulated
    rigs only; None for a site it has none for, e.g. one not attacked), else ``null``. Returns
    records ``{"site", "eps", "kind", "n_images", "estimate", "sigma", "normalized", "truth"}`` with
    estimate and sigma in spikes per window; sigma is the standard deviation (ddof=1) of the site's
    mean responses over the clean stimuli.
    Each record also carries ``sem``, the standard error of the estimate (s.d. of the per-image
    signed changes / √n_images; None below 2 images).

    ``expected``: optional (n_stimuli, n_sites) noise-free expected counts per window (simulated
    rigs only). Each record then also carries ``expected``, the value the estimator takes on them
    over the same pairs (what the estimate measures, without response noise), and
    ``direction_right``, the fraction of those pairs whose predicted direction was the true one
    (else both are ``null``).
    """
    changes = compute_signed_changes(parent, site, eps, kind, predicted, means)
    n_sites = np.shape(means)[1]
    noise_free = None
    if expected is not None:
        truly = compute_signed_changes(parent, site, eps, kind, predicted, expected)
        noise_free = dict(zip((truly.stimulus * n_sites + truly.site).tolist(), truly.change.tolist()))
    means = np.asarray(means, np.float64)
    clean = means[np.asarray(parent) < 0]
    records = []
    for (s, e, k) in sorted({(int(a), float(b), str(c)) for a, b, c in zip(changes.site, changes.eps, changes.kind)}):
        selected = (changes.site == s) & (changes.eps == e) & (changes.kind == k)
        values = clean[:, s][np.isfinite(clean[:, s])]
        sigma = float(np.std(values, ddof=1)) if values.size >= 2 else float("nan")
        values_selected = changes.change[selected]
        estimate = float(values_selected.mean())
        sem = float(values_selected.std(ddof=1) / np.sqrt(values_selected.size)) if values_selected.size >= 2 else None
        normalized = estimate / sigma if sigma > 0 else float("nan")
        true_changes = None
        if noise_free is not None:
            keys = changes.stimulus[selected] * n_sites + changes.site[selected]
            true_changes = np.array([noise_free[key] for key in keys.tolist()])
        records.append({
            "site": s,
            "eps": e,
            "kind": k,
            "n_images": int(selected.sum()),
            "estimate": estimate,
            "sem": sem,
            "sigma": None if np.isnan(sigma) else sigma,
            "normalized": None if np.isnan(normalized) else normalized,
            "truth": None if truth is None or (true := truth(s, e)) is None else float(true),
            "expected": None if true_changes is None else float(true_changes.mean()),
            "direction_right": None if true_changes is None else float(np.mean(true_changes > 0)),
        })
    return records
