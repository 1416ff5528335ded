"""Base-model selection: score candidate backbones × layers against recorded responses (Guo et al. appendix Fig. 6).

Three criteria, each computed from the layer's features of recorded stimuli:

- **CKA**: linear centred kernel alignment between the layer's features of the clean images
  and the sites' mean responses to them (0 … 1; 1 = same representational geometry up to a
  rotation and scale).
- **Predictivity**: median over sites of the Pearson r between the recorded mean responses
  and the predictions of a ridge regression from the features, each image predicted by a model
  fitted without it (``n_folds``-fold cross-validation; the ridge penalty chosen inside each
  training fold by exact leave-one-out).
- **Perturbation transfer**: how well the layer accounts for what the recorded perturbations
  did. A ridge readout fitted on all clean images predicts the change r_i(x+δ) − r_i(x) of
  every recorded attack pair (x, x+δ, site i); the score is the lower bound that readout's signs
  would have realised, mean over pairs of sign(Δ̂) · Δr / σ_i (units of the site's clean-response
  s.d.). It uses the perturbations the experiment recorded (made by the experiment's own
  models), because new perturbations made on each candidate would need new recordings.

Ridge regressions run in the dual (kernel) form with the linear kernel, so the cost grows with
the number of images, not with the feature size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from closedloop.attacks.engine import compute_predictions
from closedloop.core.logs import progress
from closedloop.core.validation import check_array, check_device, check_indices, check_integer
from closedloop.data.store import open_store
from models import load_backbone
from models.predictivity import compute_pearson

__all__ = ["compute_layer_scores", "compute_base_selection", "CRITERIA"]

CRITERIA = ("cka", "predictivity", "transfer")
_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _cka(gram: np.ndarray, responses: np.ndarray) -> float:
    """Linear CKA from the centred feature Gram matrix and the centred responses."""
    other = responses @ responses.T
    denominator = np.linalg.norm(gram) * np.linalg.norm(other)
    return float((gram * other).sum() / denominator) if denominator > 0 else float("nan")


def _fit_ridge(gram: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dual ridge coefficients (n, n_sites) and the target means, penalty chosen by exact leave-one-out."""
    mean = targets.mean(axis=0)
    centred = targets - mean
    values, vectors = np.linalg.eigh(gram)
    values = np.clip(values, 0, None)
    projected = vectors.T @ centred
    scale = max(float(values.mean()), 1e-12)
    best = None
    for alpha in _ALPHAS:
        shrink = values / (values + alpha * scale)
        fitted = vectors @ (shrink[:, None] * projected)
        leverage = (vectors**2) @ shrink
        residual = (centred - fitted) / np.clip(1 - leverage, 1e-9, None)[:, None]
        error = float((residual**2).sum())
        if best is None or error < best[0]:
            best = (error, alpha * scale)
    coefficients = vectors @ (projected / (values + best[1])[:, None])
    return coefficients, mean


def compute_layer_scores(
    clean_features,
    clean_responses,
    perturbed_features,
    pair_parent,
    pair_site,
    pair_change,
    *,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """The three criteria for one layer.

    ``clean_features``: (n_clean, n_features) the layer's features of the clean images;
    ``clean_responses``: (n_clean, n_sites) their mean recorded responses, spikes per window.
    ``perturbed_features``: (n_pairs, n_features) features of the perturbed stimuli;
    ``pair_parent``: (n_pairs,) row of the pair's clean image in ``clean_features``;
    ``pair_site``: (n_pairs,) the site; ``pair_change``: (n_pairs,) recorded r(x+δ) − r(x),
    spikes per window. ``n_folds``: cross-validation folds (images assigned with ``seed``).
    Returns ``{"cka", "predictivity", "transfer"}`` (``transfer`` NaN without pairs).
    """
    features = check_array("clean_features", clean_features, shape=(None, None)).astype(np.float64)
    responses = check_array("clean_responses", clean_responses, shape=(features.shape[0], None)).astype(np.float64)
    perturbed = check_array("perturbed_features", perturbed_features, shape=(None, features.shape[1])).astype(np.float64)
    n_pairs = perturbed.shape[0]
    parent = check_indices("pair_parent", check_array("pair_parent", pair_parent, shape=(n_pairs,)), features.shape[0])
    site = check_indices("pair_site", check_array("pair_site", pair_site, shape=(n_pairs,)), responses.shape[1])
    change = check_array("pair_change", pair_change, shape=(n_pairs,)).astype(np.float64)
    n_folds = check_integer("n_folds", n_folds, minimum=2, maximum=features.shape[0])
    centre = features.mean(axis=0)
    features, perturbed = features - centre, perturbed - centre
    gram = features @ features.T
    scores = {"cka": _cka(gram, responses - responses.mean(axis=0))}
    fold = np.random.default_rng(check_integer("seed", seed, minimum=0)).permutation(features.shape[0]) % n_folds
    predicted = np.empty_like(responses)
    for k in range(n_folds):
        train, test = fold != k, fold == k
        coefficients, mean = _fit_ridge(gram[np.ix_(train, train)], responses[train])
        predicted[test] = gram[np.ix_(test, train)] @ coefficients + mean

    scores["predictivity"] = float(np.nanmedian(compute_pearson(predicted, responses)))
    if n_pairs == 0:
        scores["transfer"] = float("nan")
        return scores
    coefficients, mean = _fit_ridge(gram, responses)
    predicted_change = np.einsum("ij,ji->i", (perturbed - features[parent]) @ features.T, coefficients[:, site])
    sigma = responses.std(axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores["transfer"] = float(np.nanmean(np.sign(predicted_change) * change / sigma[site]))
    return scores


def _read_selection_data(days: list, n_images: int, n_pairs: int, rng: np.random.Generator) -> dict:
    """Clean pixels and means (attacked images first) and attack pairs, pooled over ``days``."""
    clean_pixels, clean_means, pert_pixels, parents, sites, changes = [], [], [], [], [], []
    offset = 0
    for day in days:
        store = open_store(Path(day.folder) / "store.zarr")
        means = day.responses.means
        clean = day.shown_clean()
        pairs = day.signed_changes()
        attack = (np.asarray(pairs.kind) == "attack") & np.isin(pairs.parent, clean)
        attacked = np.unique(pairs.parent[attack])
        others = rng.permutation(np.setdiff1d(clean, attacked))
        budget = max(n_images // len(days), attacked.size)
        chosen = np.concatenate([attacked, others])[:budget]
        row = {int(c): offset + i for i, c in enumerate(chosen)}
        clean_pixels.append(store.read_pixels(chosen))
        clean_means.append(means[chosen])
        stimulus = pairs.stimulus[attack]
        pert_pixels.append(store.read_pixels(stimulus) if stimulus.size else np.zeros((0, 224, 224, 3), np.uint8))
        parents.append(np.array([row[int(p)] for p in pairs.parent[attack]], dtype=np.int64))
        sites.append(pairs.site[attack])
        changes.append(means[stimulus, pairs.site[attack]] - means[pairs.parent[attack], pairs.site[attack]])
        offset += len(chosen)
    data = {"clean_pixels": np.concatenate(clean_pixels), "clean_means": np.concatenate(clean_means),
            "perturbed_pixels": np.concatenate(pert_pixels), "pair_parent": np.concatenate(parents),
            "pair_site": np.concatenate(sites), "pair_change": np.concatenate(changes)}
    if data["pair_parent"].size > n_pairs:
        keep = np.sort(rng.choice(data["pair_parent"].size, n_pairs, replace=False))
        for key in ("perturbed_pixels", "pair_parent", "pair_site", "pair_change"):
            data[key] = data[key][keep]
    return data


def compute_base_selection(
    candidates: dict,
    layers: list[str],
    days: list,
    *,
    n_images: int = 200,
    n_pairs: int = 200,
    n_folds: int = 5,
    trust: bool = False,
    seed: int = 0,
    device="cpu",
) -> dict[str, list[dict]]:
    """Score every candidate × layer on an experiment's recorded days.

    ``candidates``: ``{label: source}``, source a registered backbone name or a checkpoint path
    (``trust`` as in :func:`models.load_backbone`); ``layers``: layer names (e.g.
    ``["layer3.0", "layer4.0", "avgpool"]``); ``days``: :class:`analysis.experiment.ExperimentDay`
    objects to pool. Up to ``n_images`` clean images (the attacked ones first, then a random
    choice with ``seed``) and ``n_pairs`` attack pairs are used. Returns tables:

    - ``"scores"``: ``candidate``, ``layer``, ``cka``, ``predictivity``, ``transfer``,
      ``n_images``, ``n_pairs``;
    - ``"best"``: per criterion the best ``candidate`` and ``layer`` and its ``score``.
    """

    if not isinstance(candidates, dict) or not candidates:
        raise ValueError("'candidates' must be a non-empty dict {label: backbone name or checkpoint path}.")
    if not layers or not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"'layers' must be a non-empty list of layer names such as 'layer4.0', but got {layers!r}.")
    if not days:
        raise ValueError("'days' must hold at least one finished day; read them with analysis.read_experiment.")
    n_images = check_integer("n_images", n_images, minimum=4)
    n_pairs = check_integer("n_pairs", n_pairs, minimum=0)
    device = check_device("device", device)
    rng = np.random.default_rng(check_integer("seed", seed, minimum=0))
    data = _read_selection_data(days, n_images, n_pairs, rng)
    scores = []
    jobs = [(label, source, layer) for label, source in candidates.items() for layer in layers]
    for label, source, layer in progress(jobs, description="base selection"):
        backbone = load_backbone(source, layer, trust=trust).to(device)
        features = [compute_predictions(backbone, data[key], batch_size=16, device=device).reshape(len(data[key]), -1)
                    if len(data[key]) else np.zeros((0, 1), np.float32) for key in ("clean_pixels", "perturbed_pixels")]
        if not len(data["perturbed_pixels"]):
            features[1] = np.zeros((0, features[0].shape[1]), np.float32)
        result = compute_layer_scores(features[0], data["clean_means"], features[1], data["pair_parent"], data["pair_site"],
                                      data["pair_change"], n_folds=min(n_folds, len(features[0])), seed=seed)
        scores.append({"candidate": label, "layer": layer, **result, "n_images": int(len(features[0])),
                       "n_pairs": int(data["pair_parent"].size)})
    best = []
    for criterion in CRITERIA:
        finite = [row for row in scores if np.isfinite(row[criterion])]
        if finite:
            top = max(finite, key=lambda row: row[criterion])
            best.append({"criterion": criterion, "candidate": top["candidate"], "layer": top["layer"], "score": top[criterion]})
    return {"scores": scores, "best": best}
