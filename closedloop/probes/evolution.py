"""Evolved images: MAP-Elites with one elite per objective (site, unit or class), after Nguyen,
Yosinski & Clune's fooling images.

Every generation, ``n_children`` parents are drawn uniformly from the elites found so far, each is
mutated once, and every child is scored on every objective; a child replaces the elite of each
objective it beats. The archive is a ``ribs`` :class:`~ribs.archives.GridArchive` with one cell
per objective (the cell's "solution" is the candidate's id; images and genomes are kept here).
As an alternative optimiser (``optimizer="cma"``), one CMA-ES per objective (the ``cma`` package)
proposes the children of direct genomes; they still compete for every objective's elite.

Encodings:

- ``"direct"``: the genome is an 8-bit image of ``genome_size`` px (resized bilinearly to the
  image size); each value is mutated with probability ``rate`` by polynomial mutation
  (distribution index ``eta``), and ``rate`` halves every ``halve_every`` generations.
- ``"cppn"``: the genome is a :class:`closedloop.probes.cppn.CPPNGenome`, rendered at the image size.

Scoring is a callable ``uint8 (n, H, W, 3) → float (n, n_objectives)``, larger is better:
:func:`make_model_scorer` (in silico: IT-model sites, network units, classifier classes as
softmax probabilities) or :class:`RigScorer` (in the loop: mean spike counts per response window
from the rig, through the daily loop's bundle + presentation protocol, with natural reference
images interleaved every generation as drift controls).

With ``clean`` and ``eps`` every rendered image is brought into the L2 ε-ball around the clean
image (ε in [0, 1] pixel units, on the 8-bit image shown, by
:func:`closedloop.attacks.engine.quantize_within_budget`), for a like-for-like comparison with attacks.

Everything is recorded in ``out`` (see :func:`run_evolution`), each file written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from closedloop.attacks.engine import compute_predictions, quantize_within_budget
from closedloop.core.files import write_json, write_npz
from closedloop.core.logs import logger, progress
from closedloop.core.validation import check_array, check_integer, check_number, check_option, check_uint8_images
from closedloop.images import quantize
from closedloop.probes.cppn import make_cppn_child, make_cppn_genome

__all__ = [
    "ENCODINGS",
    "OPTIMIZERS",
    "RigScorer",
    "make_model_scorer",
    "compute_mutation_rate",
    "make_direct_child",
    "run_evolution",
    "read_evolution",
]

ENCODINGS = ("direct", "cppn")
OPTIMIZERS = ("map-elites", "cma")
_MAX_CMA_GENOME = 64  # px: a larger direct genome has too many values for CMA-ES
_FULL_COVARIANCE = 1000  # values: above, separable (diagonal) CMA-ES
_MIN_CMA_POPSIZE = 4  # cma refuses fewer (its step-size adaptation injects a direction)
_GENERATIONS = "generations"


# ---------------------------------------------------------------------------------------------
# Scorers


def make_model_scorer(model: torch.nn.Module, *, units=None, softmax: bool = False, batch_size: int = 32,
                      device="cpu") -> Callable[[np.ndarray], np.ndarray]:
    """In-silico objectives: ``model`` outputs on 8-bit images, (n_images, n_objectives) float64.

    ``model``: nn.Module, float images (N, 3, H, W) in [0, 1] → outputs of any shape that flattens
    to (N, n_outputs) (IT model: predicted counts per site; a backbone layer: unit activations; a
    classifier: logits). ``units``: indices into the flattened outputs (default all).
    ``softmax``: score softmax probabilities of the outputs (classifier confidence in [0, 1]).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}.")
    model.to(device)
    chosen = None if units is None else np.asarray(units, dtype=np.int64).reshape(-1)

    def score(pixels: np.ndarray) -> np.ndarray:
        outputs = compute_predictions(model, pixels, batch_size=batch_size, device=device).reshape(len(pixels), -1)
        outputs = outputs.astype(np.float64)
        if softmax:
            shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
            outputs = shifted / shifted.sum(axis=1, keepdims=True)
        if chosen is not None and chosen.size and (chosen.min() < 0 or chosen.max() >= outputs.shape[1]):
            raise ValueError(f"'units' must lie in [0, {outputs.shape[1] - 1}], but got {chosen.tolist()[:8]}.")
        return outputs if chosen is None else outputs[:, chosen]

    return score


class RigScorer:
    """In-the-loop objectives: each call presents the images on the rig and returns their mean
    spike counts per response window, float64 (n_images, n_sites) (or the chosen ``sites``).

    ``client``: a :class:`closedloop.link.client.RigClient` (connected or not). ``reference_pixels``:
    uint8 (n_references, 224, 224, 3) natural images shown with every generation, interleaved at
    random with the candidates, as drift controls. ``folder``: where the bundle of the current
    call is written (``bundle.h5``, replaced each call). ``repetitions``: valid presentations per
    image. ``seed``: the shuffles (one stream per call). Images must be 224 × 224 (the bundle
    contract). ``reference_counts``: after each call, (n_references, n_sites) mean counts.
    """

    def __init__(self, client, reference_pixels: np.ndarray, folder: str | Path, *, sites=None,
                 repetitions: int = 2, seed: int = 0) -> None:
        self.client = client
        self.references = check_uint8_images("reference_pixels", reference_pixels, size=224)
        self.folder = Path(folder)
        self.sites = None if sites is None else np.asarray(sites, dtype=np.int64).reshape(-1)
        self.repetitions = check_integer("repetitions", repetitions, minimum=1)
        self.seed = check_integer("seed", seed, minimum=0)
        self.reference_counts: list[np.ndarray] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        from closedloop.core.provenance import derive_seed
        from closedloop.data.bundle import make_event_codes, write_bundle
        from closedloop.link.presentations import run_presentations

        check_uint8_images("pixels", pixels, size=224)
        frames = np.concatenate([pixels, self.references])
        ids = np.arange(len(frames))
        call = len(self.reference_counts)
        path = self.folder / "bundle.h5"
        write_bundle(path, frames, ids, make_event_codes(len(frames)), attrs={"evolution_generation": call})
        self.client.load_bundle(path)
        totals, n_valid = None, np.zeros(len(frames))

        def on_result(outcome: dict) -> None:
            nonlocal totals
            if outcome["valid"]:
                counts = np.asarray(outcome["counts"], dtype=np.float64)
                totals = np.zeros((len(frames), len(counts))) if totals is None else totals
                totals[outcome["stimulus_id"]] += counts
                n_valid[outcome["stimulus_id"]] += 1

        run_presentations(self.client, ids, repetitions=self.repetitions, seed=derive_seed(self.seed, call),
                          on_result=on_result)
        means = totals / n_valid[:, None]
        if self.sites is not None:
            means = means[:, self.sites]
        self.reference_counts.append(means[len(pixels):])
        return means[: len(pixels)]


# ---------------------------------------------------------------------------------------------
# Direct encoding


def compute_mutation_rate(generation: int, *, rate_start: float = 0.1, halve_every: int = 1000) -> float:
    """Per-value mutation probability of the direct encoding: ``rate_start`` halved every
    ``halve_every`` generations (Nguyen et al.: 0.1, halved every 1000)."""
    generation = check_integer("generation", generation, minimum=0)
    rate_start = check_number("rate_start", rate_start, minimum=0.0, maximum=1.0)
    halve_every = check_integer("halve_every", halve_every, minimum=1)
    return rate_start * 0.5 ** (generation // halve_every)


def make_direct_child(parent: np.ndarray, rng: np.random.Generator, *, rate: float, eta: float = 15.0) -> np.ndarray:
    """A mutated copy of a direct genome ``parent`` (uint8, any shape): each value, with probability
    ``rate``, moves by polynomial mutation on [0, 1] with distribution index ``eta`` (larger:
    smaller steps), δ = (2u)^(1/(η+1)) − 1 for u < ½, else 1 − (2(1 − u))^(1/(η+1)); returns uint8."""
    parent = np.asarray(parent)
    if parent.dtype != np.uint8:
        raise TypeError(f"'parent' must be a uint8 direct genome, but got dtype {parent.dtype}.")
    rate = check_number("rate", rate, minimum=0.0, maximum=1.0)
    eta = check_number("eta", eta, minimum=0.0)
    values = parent.astype(np.float64) / 255.0
    chosen = rng.random(values.shape) < rate
    u = rng.random(values.shape)
    power = 1.0 / (eta + 1.0)
    step = np.where(u < 0.5, (2.0 * u) ** power - 1.0, 1.0 - (2.0 * (1.0 - u)) ** power)
    return quantize(np.clip(values + chosen * step, 0.0, 1.0))


def _resize(genomes: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, g, g, 3) → float32 (n, size, size, 3) in [0, 1], bilinear."""
    images = torch.from_numpy(genomes).permute(0, 3, 1, 2).float() / 255.0
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# The search


class _Encoding:
    """Make, mutate, render and record genomes of one encoding."""

    def __init__(self, encoding: str, image_size: int, genome_size: int, rate_start: float, halve_every: int,
                 eta: float, clean: np.ndarray | None) -> None:
        self.name, self.image_size, self.genome_size = encoding, image_size, genome_size
        self.rate_start, self.halve_every, self.eta = rate_start, halve_every, eta
        self.clean = clean

    def first(self, rng: np.random.Generator):
        if self.name == "cppn":
            return make_cppn_genome(rng)
        if self.clean is not None:
            start = torch.from_numpy(self.clean[None]).permute(0, 3, 1, 2).float()
            start = torch.nn.functional.interpolate(start, size=(self.genome_size,) * 2, mode="area")
            return make_direct_child(start.permute(0, 2, 3, 1)[0].round().byte().numpy(), rng, rate=self.rate_start, eta=self.eta)
        return rng.integers(0, 256, (self.genome_size, self.genome_size, 3), dtype=np.uint8)

    def child(self, parent, rng: np.random.Generator, generation: int):
        if self.name == "cppn":
            return make_cppn_child(parent, rng)
        rate = compute_mutation_rate(generation, rate_start=self.rate_start, halve_every=self.halve_every)
        return make_direct_child(parent, rng, rate=rate, eta=self.eta)

    def render(self, genomes: list) -> np.ndarray:
        if self.name == "cppn":
            return np.stack([genome.render(self.image_size) for genome in genomes])
        return _resize(np.stack(genomes), self.image_size)

    def record(self, genomes: list) -> dict:
        if self.name == "cppn":
            return {"genomes_json": np.array([json.dumps(g.to_json()) for g in genomes])}
        return {"genomes": np.stack(genomes)}


class _CMAStrategies:
    """One CMA-ES (the ``cma`` package) per objective over the values of a direct genome in [0, 1],
    each started from that objective's elite; ``popsize`` candidates each per generation."""

    def __init__(self, elites: list[np.ndarray], popsize: int, sigma: float, seed: int) -> None:
        import cma

        self.shape = elites[0].shape
        diagonal = elites[0].size > _FULL_COVARIANCE
        self.strategies = [cma.CMAEvolutionStrategy(
            elite.ravel() / 255.0, sigma,
            {"bounds": [0.0, 1.0], "popsize": popsize, "seed": seed + 1 + k, "verbose": -9, "CMA_diagonal": diagonal},
        ) for k, elite in enumerate(elites)]
        self.asked: list[list[np.ndarray]] = []

    def ask(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Genomes (uint8) of this generation and the objective whose strategy proposed each."""
        self.asked = [strategy.ask() for strategy in self.strategies]
        genomes = [quantize(np.clip(x, 0.0, 1.0)).reshape(self.shape) for xs in self.asked for x in xs]
        return genomes, np.repeat(np.arange(len(self.asked)), [len(xs) for xs in self.asked])

    def tell(self, scores: np.ndarray) -> None:
        start = 0
        for objective, (strategy, xs) in enumerate(zip(self.strategies, self.asked)):
            strategy.tell(xs, (-scores[start:start + len(xs), objective]).tolist())
            start += len(xs)


def _check_constraint(clean, eps, image_size: int):
    if (clean is None) != (eps is None):
        raise ValueError("'clean' and 'eps' go together: give both to search inside the ε-ball around a clean image, "
                         f"or neither (got clean={'an image' if clean is not None else None}, eps={eps}).")
    if clean is None:
        return None, None
    clean = check_array("clean", clean, shape=(image_size, image_size, 3), dtype=np.uint8)
    return clean, check_number("eps", eps, minimum=0.0, inclusive=False)


def run_evolution(
    score: Callable[[np.ndarray], np.ndarray],
    out: str | Path,
    *,
    encoding: str = "cppn",
    n_generations: int = 20,
    n_children: int = 16,
    image_size: int = 224,
    genome_size: int | None = None,
    objective_labels=None,
    clean: np.ndarray | None = None,
    eps: float | None = None,
    rate_start: float = 0.1,
    halve_every: int = 1000,
    eta: float = 15.0,
    seed: int = 0,
    settings: dict | None = None,
    overwrite: bool = False,
    optimizer: str = "map-elites",
    sigma: float = 0.2,
    rescore_elites: bool = False,
) -> dict:
    """Evolve images that drive every objective of ``score``; record every generation in ``out``.

    ``score``: 8-bit images uint8 (n, image_size, image_size, 3) → float (n, n_objectives), larger
    is better (:func:`make_model_scorer`, :class:`RigScorer`). ``encoding``: "direct" or "cppn".
    Generation 0 is ``n_children`` random genomes; later generations mutate ``n_children`` elites
    drawn uniformly. ``genome_size``: side of a direct genome, px (default ``image_size``).
    ``objective_labels``: a name per objective (default "0", "1", ...). ``clean`` (uint8
    (image_size, image_size, 3)) and ``eps`` (L2, [0, 1] pixel units): search inside the ε-ball
    around ``clean`` (direct genomes start from it). ``rate_start``, ``halve_every``, ``eta``:
    direct mutation (:func:`compute_mutation_rate`, :func:`make_direct_child`). ``seed``: child k of
    generation g draws from ``numpy.random.default_rng([seed, g, k])``; parents from the archive's
    generator (``seed``). ``settings``: extra JSON-able entries for ``settings.json``. ``overwrite``:
    replace an earlier run in ``out`` (else its presence is an error). ``optimizer``: "map-elites"
    (above) or "cma": after the random generation 0, one CMA-ES per objective (``cma`` package;
    direct encoding, ``genome_size`` ≤ 64; step ``sigma`` in [0, 1] pixel units; separable above
    1000 genome values) starts from that objective's elite and proposes ``max(4, n_children //
    n_objectives)`` genomes per generation; every candidate still competes for every elite.
    ``rescore_elites``: score the current elites again with every generation and rank every
    candidate by the mean of all its scores (for noisy scores such as spike counts, where an
    elite kept on one lucky measurement would overestimate its response: the winner's curse).

    Writes in ``out``: ``settings.json``; ``generations/gen_NNNN.npz`` per generation (``pixels``
    uint8 (n_children, H, W, 3), ``scores`` float64 (n_children, n_objectives), ``ids`` int64,
    ``parent`` int64 id (−1 in generation 0), ``parent_objective`` int64 (the elite's objective,
    −1), ``child_seed`` int64 (n_children, 3) = (seed, g, k), ``genomes`` uint8 or
    ``genomes_json`` str, ``elite_ids`` / ``elite_scores`` (n_objectives,) after the generation,
    with ``rescore_elites`` ``rescored_ids`` and ``rescored_scores`` (the elites' new scores), and
    with a :class:`RigScorer` ``reference_counts`` (n_references, n_sites));
    ``history.json`` (per generation: best child score and elite score per objective);
    ``elites.npz`` (``pixels`` (n_objectives, H, W, 3), ``scores``, ``ids``, ``generation``) and
    ``summary.json`` last. Returns the summary.
    """
    from ribs.archives import GridArchive

    encoding = check_option("encoding", encoding, ENCODINGS)
    n_generations = check_integer("n_generations", n_generations, minimum=1)
    n_children = check_integer("n_children", n_children, minimum=1)
    image_size = check_integer("image_size", image_size, minimum=8)
    genome_size = image_size if genome_size is None else check_integer("genome_size", genome_size, minimum=1, maximum=image_size)
    seed = check_integer("seed", seed, minimum=0)
    clean, eps = _check_constraint(clean, eps, image_size)
    rate_start = check_number("rate_start", rate_start, minimum=0.0, maximum=1.0)
    optimizer = check_option("optimizer", optimizer, OPTIMIZERS)
    sigma = check_number("sigma", sigma, minimum=0.0, inclusive=False)
    if optimizer == "cma" and (encoding != "direct" or genome_size > _MAX_CMA_GENOME):
        raise ValueError(f"optimizer 'cma' searches direct genomes of at most {_MAX_CMA_GENOME} px, but got encoding "
                         f"{encoding!r}, genome_size {genome_size}; use encoding='direct' with a smaller genome_size.")
    coder = _Encoding(encoding, image_size, genome_size, rate_start, check_integer("halve_every", halve_every, minimum=1),
                      check_number("eta", eta, minimum=0.0), clean)
    out = Path(out)
    earlier = sorted((out / _GENERATIONS).glob("gen_*.npz"))
    if earlier and not overwrite:
        raise FileExistsError(f"'out' {str(out)!r} already holds an evolution ({len(earlier)} generations); choose another "
                              "folder (--name) or replace it (overwrite=True, --overwrite).")
    for path in earlier + [out / "summary.json", out / "elites.npz"]:
        path.unlink(missing_ok=True)
    (out / _GENERATIONS).mkdir(parents=True, exist_ok=True)
    archive = labels = None
    kept: dict[int, tuple] = {}  # candidate id → (genome, pixels, generation) for the current elites
    history, next_id = [], 0
    write_json(out / "settings.json", {
        "encoding": encoding, "n_generations": n_generations, "n_children": n_children, "image_size": image_size,
        "genome_size": genome_size, "eps": eps, "rate_start": rate_start, "halve_every": halve_every, "eta": eta,
        "seed": seed, "rescore_elites": rescore_elites, "optimizer": optimizer, "sigma": sigma if optimizer == "cma" else None,
        **(settings or {}),
    })
    strategies = None
    measured: dict[int, list] = {}  # candidate id → [sum of its score vectors, number of scorings]
    for generation in progress(range(n_generations), description=f"evolve ({encoding})"):
        rngs = [np.random.default_rng([seed, generation, k]) for k in range(n_children)]
        if archive is None:
            parents, parent_objective = np.full(n_children, -1), np.full(n_children, -1)
            genomes = [coder.first(rng) for rng in rngs]
        elif strategies is not None:
            genomes, parent_objective = strategies.ask()
            parents = np.full(len(genomes), -1)
        else:
            drawn = archive.sample_elites(n_children)
            parents, parent_objective = drawn["solution"][:, 0].astype(np.int64), drawn["index"].astype(np.int64)
            genomes = [coder.child(kept[int(p)][0], rng, generation) for p, rng in zip(parents, rngs)]
        rendered = coder.render(genomes)
        pixels = quantize(rendered) if clean is None else quantize_within_budget(
            rendered.astype(np.float64), np.broadcast_to(clean, rendered.shape).copy(), eps)
        n_new = len(genomes)
        again = sorted(kept) if rescore_elites else []
        scored = np.asarray(score(np.concatenate([pixels] + [kept[i][1][None] for i in again])), dtype=np.float64)
        if scored.ndim != 2 or scored.shape[0] != n_new + len(again) or not np.isfinite(scored).all():
            raise ValueError(f"'score' must return finite values of shape ({n_new + len(again)}, n_objectives), "
                             f"but returned shape {scored.shape}.")
        scores, rescored = scored[:n_new], scored[n_new:]
        if archive is None:
            n_objectives = scores.shape[1]
            labels = [str(k) for k in range(n_objectives)] if objective_labels is None else [str(v) for v in objective_labels]
            if len(labels) != n_objectives:
                raise ValueError(f"'objective_labels' must name the {n_objectives} objectives of 'score', but has {len(labels)}.")
            archive = GridArchive(solution_dim=1, dims=[n_objectives], ranges=[(0, n_objectives)], solution_dtype=np.int64,
                                  seed=seed)
        if strategies is not None:
            strategies.tell(scores)
        ids = np.arange(next_id, next_id + n_new)
        next_id += n_new
        objectives = np.arange(scores.shape[1])
        measured.update({int(i): [row, 1] for i, row in zip(ids, scores)})
        if again:
            archive.clear()
            for i, row in zip(again, rescored):
                measured[i] = [measured[i][0] + row, measured[i][1] + 1]
            means = np.stack([measured[i][0] / measured[i][1] for i in again])
            archive.add(np.repeat(again, len(objectives))[:, None], means.ravel(), np.tile(objectives + 0.5, len(again))[:, None])
        archive.add(np.repeat(ids, len(objectives))[:, None], scores.ravel(),
                    np.tile(objectives + 0.5, n_new)[:, None])
        elites = archive.data()
        order = np.argsort(elites["index"])
        elite_ids, elite_scores = elites["solution"][order, 0].astype(np.int64), elites["objective"][order]
        kept = {int(i): kept[int(i)] if int(i) in kept else (genomes[int(i) - ids[0]], pixels[int(i) - ids[0]], generation)
                for i in elite_ids}
        measured = {i: measured[i] for i in kept}
        extra = {} if not isinstance(score, RigScorer) else {"reference_counts": score.reference_counts[-1]}
        if rescore_elites:
            extra.update(rescored_ids=np.array(again, dtype=np.int64), rescored_scores=rescored)
        write_npz(out / _GENERATIONS / f"gen_{generation:04d}.npz", pixels=pixels, scores=scores, ids=ids, parent=parents,
                   parent_objective=parent_objective, child_seed=np.array([[seed, generation, k] for k in range(n_new)]),
                   elite_ids=elite_ids, elite_scores=elite_scores, **coder.record(genomes), **extra)
        history.append({"generation": generation, "best_child": scores.max(axis=0).tolist(), "elite": elite_scores.tolist()})
        write_json(out / "history.json", {"objectives": labels, "generations": history})
        logger.info("evolve generation %d: mean elite score %.4g", generation, float(elite_scores.mean()))
        if optimizer == "cma" and strategies is None:
            popsize = max(_MIN_CMA_POPSIZE, n_children // len(elite_ids))
            strategies = _CMAStrategies([kept[int(i)][0] for i in elite_ids], popsize, sigma, seed)
    write_npz(out / "elites.npz", pixels=np.stack([kept[int(i)][1] for i in elite_ids]), scores=elite_scores, ids=elite_ids,
               generation=np.array([kept[int(i)][2] for i in elite_ids]), objectives=np.array(labels))
    summary = {"out": str(out), "encoding": encoding, "n_generations": n_generations, "objectives": labels,
               "first_elite": history[0]["elite"], "last_elite": history[-1]["elite"],
               "n_improved": int(np.sum(np.array(history[-1]["elite"]) > np.array(history[0]["elite"])))}
    write_json(out / "summary.json", summary)
    return summary


def read_evolution(folder: str | Path) -> dict:
    """What :func:`run_evolution` recorded in ``folder``: ``settings``, ``history``, ``summary`` (dicts),
    ``elites`` (dict of arrays) and ``generations`` (sorted paths of the per-generation files)."""
    from closedloop.core.files import read_json
    from closedloop.core.validation import check_file

    folder = Path(folder)
    check_file("folder", folder / "summary.json")
    with np.load(folder / "elites.npz") as elites:
        arrays = {key: elites[key] for key in elites.files}
    return {"settings": read_json(folder / "settings.json"), "history": read_json(folder / "history.json"),
            "summary": read_json(folder / "summary.json"), "elites": arrays,
            "generations": sorted((folder / _GENERATIONS).glob("gen_*.npz"))}

