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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ribs.archives import GridArchive

from closedloop.attacks.engine import compute_predictions, quantize_within_budget
from closedloop.core.files import read_json, write_json, write_npz
from closedloop.core.logs import logger, progress
from closedloop.core.provenance import derive_seed
from closedloop.core.validation import (
    check_array,
    check_file,
    check_integer,
    check_number,
    check_option,
    check_uint8_images,
)
from closedloop.data.bundle import make_event_codes, write_bundle
from closedloop.images import quantize
from closedloop.link.presentations import run_presentations
from closedloop.probes.cppn import make_cppn_child, make_cppn_genome

__all__ = [
    "ENCODINGS",
    "OPTIMIZERS",
    "EvolutionSettings",
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


@dataclass(frozen=True)
class EvolutionSettings:
    """How :func:`run_evolution` searches; checked on construction and recorded in ``settings.json``.

    ``encoding``: "direct" or "cppn". ``optimizer``: "map-elites" (every generation mutates
    ``n_children`` elites drawn uniformly) or "cma" (after the random generation 0, one CMA-ES per
    objective, ``cma`` package, starts from that objective's elite and proposes ``max(4,
    n_children // n_objectives)`` genomes per generation; direct encoding, ``genome_size`` ≤ 64;
    separable above 1000 genome values). ``n_generations``; ``n_children``: genomes of generation 0
    and children per MAP-Elites generation. ``image_size``: side of the scored images, px.
    ``genome_size``: side of a direct genome, px (None: ``image_size``; see :attr:`genome_side`).
    ``eps``: L2 radius, [0, 1] pixel units, of the ball around :func:`run_evolution`'s ``clean``
    image that every image is brought into (None: no constraint). ``rate_start``, ``halve_every``,
    ``eta``: direct mutation (:func:`compute_mutation_rate`, :func:`make_direct_child`).
    ``sigma``: initial CMA-ES step, [0, 1] pixel units. ``rescore_elites``: score the current
    elites again with every generation and rank every candidate by the mean of all its scores (for
    noisy scores such as spike counts, where an elite kept on one lucky measurement would
    overestimate its response: the winner's curse). ``seed``: child k of generation g draws from
    ``numpy.random.default_rng([seed, g, k])``; parents from the archive's generator (``seed``);
    CMA-ES k from ``seed + 1 + k``.
    """

    encoding: str = "cppn"
    optimizer: str = "map-elites"
    n_generations: int = 20
    n_children: int = 16
    image_size: int = 224
    genome_size: int | None = None
    eps: float | None = None
    rate_start: float = 0.1
    halve_every: int = 1000
    eta: float = 15.0
    sigma: float = 0.2
    rescore_elites: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._set("encoding", check_option("encoding", self.encoding, ENCODINGS))
        self._set("n_generations", check_integer("n_generations", self.n_generations, minimum=1))
        self._set("n_children", check_integer("n_children", self.n_children, minimum=1))
        self._set("image_size", check_integer("image_size", self.image_size, minimum=8))
        if self.genome_size is not None:
            self._set("genome_size", check_integer("genome_size", self.genome_size, minimum=1, maximum=self.image_size))
        self._set("seed", check_integer("seed", self.seed, minimum=0))
        if self.eps is not None:
            self._set("eps", check_number("eps", self.eps, minimum=0.0, inclusive=False))
        self._set("rate_start", check_number("rate_start", self.rate_start, minimum=0.0, maximum=1.0))
        self._set("optimizer", check_option("optimizer", self.optimizer, OPTIMIZERS))
        self._set("sigma", check_number("sigma", self.sigma, minimum=0.0, inclusive=False))
        if self.optimizer == "cma" and (self.encoding != "direct" or self.genome_side > _MAX_CMA_GENOME):
            raise ValueError(f"optimizer 'cma' searches direct genomes of at most {_MAX_CMA_GENOME} px, but got encoding "
                             f"{self.encoding!r}, genome_size {self.genome_side}; use encoding='direct' with a smaller "
                             "genome_size.")
        self._set("halve_every", check_integer("halve_every", self.halve_every, minimum=1))
        self._set("eta", check_number("eta", self.eta, minimum=0.0))

    def _set(self, name: str, value) -> None:
        """Store a checked (converted) value in this frozen instance."""
        object.__setattr__(self, name, value)

    @property
    def genome_side(self) -> int:
        """Side of a direct genome, px: ``genome_size``, or ``image_size`` when that is None."""
        return self.image_size if self.genome_size is None else self.genome_size

    def to_json(self) -> dict:
        """The settings as ``settings.json`` records them (``sigma`` only with optimizer "cma")."""
        return {"encoding": self.encoding, "n_generations": self.n_generations, "n_children": self.n_children,
                "image_size": self.image_size, "genome_size": self.genome_side, "eps": self.eps,
                "rate_start": self.rate_start, "halve_every": self.halve_every, "eta": self.eta, "seed": self.seed,
                "rescore_elites": self.rescore_elites, "optimizer": self.optimizer,
                "sigma": self.sigma if self.optimizer == "cma" else None}


class _Encoding:
    """Make, mutate, render and record genomes of one encoding; images inside the ε-ball around ``clean``."""

    def __init__(self, settings: EvolutionSettings, clean: np.ndarray | None) -> None:
        self.settings, self.clean = settings, clean

    def first(self, rng: np.random.Generator):
        s = self.settings
        if s.encoding == "cppn":
            return make_cppn_genome(rng)
        if self.clean is not None:
            start = torch.from_numpy(self.clean[None]).permute(0, 3, 1, 2).float()
            start = torch.nn.functional.interpolate(start, size=(s.genome_side,) * 2, mode="area")
            return make_direct_child(start.permute(0, 2, 3, 1)[0].round().byte().numpy(), rng, rate=s.rate_start, eta=s.eta)
        return rng.integers(0, 256, (s.genome_side, s.genome_side, 3), dtype=np.uint8)

    def child(self, parent, rng: np.random.Generator, generation: int):
        s = self.settings
        if s.encoding == "cppn":
            return make_cppn_child(parent, rng)
        rate = compute_mutation_rate(generation, rate_start=s.rate_start, halve_every=s.halve_every)
        return make_direct_child(parent, rng, rate=rate, eta=s.eta)

    def render(self, genomes: list) -> np.ndarray:
        """uint8 (n, image_size, image_size, 3): the genomes' images, inside the ε-ball if there is one."""
        if self.settings.encoding == "cppn":
            rendered = np.stack([genome.render(self.settings.image_size) for genome in genomes])
        else:
            rendered = _resize(np.stack(genomes), self.settings.image_size)
        if self.clean is None:
            return quantize(rendered)
        return quantize_within_budget(rendered.astype(np.float64), np.broadcast_to(self.clean, rendered.shape).copy(),
                                      self.settings.eps)

    def record(self, genomes: list) -> dict:
        if self.settings.encoding == "cppn":
            return {"genomes_json": np.array([json.dumps(g.to_json()) for g in genomes])}
        return {"genomes": np.stack(genomes)}


@dataclass(frozen=True)
class _Children:
    """One generation's candidates: ``genomes`` (n of them), ``parent`` ids int64 (n,) (−1: none) and
    ``parent_objective`` int64 (n,): the objective whose elite or CMA-ES gave each (−1: none)."""

    genomes: list
    parent: np.ndarray
    parent_objective: np.ndarray


def _first_children(coder: _Encoding, rngs: list[np.random.Generator]) -> _Children:
    """Generation 0: one random genome per generator."""
    none = np.full(len(rngs), -1)
    return _Children([coder.first(rng) for rng in rngs], none, none.copy())


def _map_elites_children(coder: _Encoding, elites: _Elites, rngs: list[np.random.Generator], generation: int) -> _Children:
    """A MAP-Elites generation: one mutated copy of an elite drawn uniformly per generator."""
    parent, parent_objective = elites.sample(len(rngs))
    genomes = [coder.child(elites.candidates[int(p)].genome, rng, generation) for p, rng in zip(parent, rngs)]
    return _Children(genomes, parent, parent_objective)


def _cma_children(strategies: _CMAStrategies) -> _Children:
    """A CMA-ES generation: every objective's strategy proposes its genomes."""
    genomes, parent_objective = strategies.ask()
    return _Children(genomes, np.full(len(genomes), -1), parent_objective)


class _CMAStrategies:
    """One CMA-ES (the ``cma`` package) per objective over the values of a direct genome in [0, 1],
    each started from that objective's elite (``genomes``, uint8, one per objective) with step
    ``settings.sigma`` and ``max(4, n_children // n_objectives)`` candidates per generation."""

    def __init__(self, genomes: list[np.ndarray], settings: EvolutionSettings) -> None:
        # cma stays lazy: only the optional CMA-ES optimiser needs it, and importing it loads
        # matplotlib.pyplot (about 2 s).
        import cma

        self.shape = genomes[0].shape
        popsize = max(_MIN_CMA_POPSIZE, settings.n_children // len(genomes))
        diagonal = genomes[0].size > _FULL_COVARIANCE
        self.strategies = [cma.CMAEvolutionStrategy(
            genome.ravel() / 255.0, settings.sigma,
            {"bounds": [0.0, 1.0], "popsize": popsize, "seed": settings.seed + 1 + k, "verbose": -9, "CMA_diagonal": diagonal},
        ) for k, genome in enumerate(genomes)]
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


@dataclass(frozen=True)
class _Candidate:
    """A scored candidate kept while it is an elite: its genome, its pixels uint8 (H, W, 3) and the
    generation that made it."""

    genome: object
    pixels: np.ndarray
    generation: int


class _Elites:
    """The elite of every objective: a ribs GridArchive with one cell per objective (a cell's solution
    is the candidate's id), the elites' candidates, and per elite the sum and number of its score
    vectors (its mean ranks it after :meth:`rescore`). ``ids`` int64 and ``scores`` float64
    (n_objectives,): the elite of each objective after the last :meth:`add`."""

    def __init__(self, labels: list[str], seed: int) -> None:
        self.labels = labels
        n_objectives = len(labels)
        self.archive = GridArchive(solution_dim=1, dims=[n_objectives], ranges=[(0, n_objectives)], solution_dtype=np.int64,
                                   seed=seed)
        self.candidates: dict[int, _Candidate] = {}
        self.measured: dict[int, tuple[np.ndarray, int]] = {}
        self.next_id = 0
        self.ids, self.scores = np.zeros(0, np.int64), np.zeros(0)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` elites drawn uniformly: their ids and objectives, int64 (n,)."""
        drawn = self.archive.sample_elites(n)
        return drawn["solution"][:, 0].astype(np.int64), drawn["index"].astype(np.int64)

    def rescore(self, ids: list[int], scores: np.ndarray) -> None:
        """Add new ``scores`` float64 (len(ids), n_objectives) of the elites ``ids`` and rank every elite
        again by the mean of all its scores."""
        self.archive.clear()
        for i, row in zip(ids, scores):
            total, count = self.measured[i]
            self.measured[i] = (total + row, count + 1)
        self._enter(np.asarray(ids, dtype=np.int64), np.stack([self.measured[i][0] / self.measured[i][1] for i in ids]))

    def add(self, children: _Children, pixels: np.ndarray, scores: np.ndarray, generation: int) -> np.ndarray:
        """Let new candidates (their ``pixels`` uint8 (n, H, W, 3) and ``scores`` float64 (n,
        n_objectives)) compete for every elite; return their ids, int64 (n,)."""
        ids = np.arange(self.next_id, self.next_id + len(children.genomes))
        self.next_id += len(ids)
        self.measured.update({int(i): (row, 1) for i, row in zip(ids, scores)})
        self._enter(ids, scores)
        elites = self.archive.data()
        order = np.argsort(elites["index"])
        self.ids, self.scores = elites["solution"][order, 0].astype(np.int64), elites["objective"][order]
        new = {int(i): _Candidate(genome, image, generation) for i, genome, image in zip(ids, children.genomes, pixels)}
        pool = {**self.candidates, **new}
        self.candidates = {int(i): pool[int(i)] for i in self.ids}
        self.measured = {i: self.measured[i] for i in self.candidates}
        return ids

    def _enter(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Offer each candidate ``ids`` (n,) to every objective's cell with its ``scores`` (n, n_objectives)."""
        objectives = np.arange(len(self.labels))
        self.archive.add(np.repeat(ids, len(objectives))[:, None], scores.ravel(),
                         np.tile(objectives + 0.5, len(ids))[:, None])


@dataclass(frozen=True)
class _Generation:
    """What one generation made and measured (its ``gen_NNNN.npz``, see :func:`run_evolution`): the
    ``children``, their ``pixels`` uint8 (n, H, W, 3), ``scores`` float64 (n, n_objectives) and
    ``ids`` int64 (n,); the elites scored again, ``rescored_ids`` int64 (m,) and ``rescored_scores``
    float64 (m, n_objectives); and the elite of each objective after the generation, ``elite_ids``
    int64 and ``elite_scores`` float64 (n_objectives,)."""

    index: int
    children: _Children
    pixels: np.ndarray
    scores: np.ndarray
    ids: np.ndarray
    rescored_ids: np.ndarray
    rescored_scores: np.ndarray
    elite_ids: np.ndarray
    elite_scores: np.ndarray


class _Search:
    """One evolution's state between generations: the elites (from generation 0 on) and, with
    optimizer "cma", the strategies (from generation 1 on)."""

    def __init__(self, score: Callable[[np.ndarray], np.ndarray], coder: _Encoding, objective_labels) -> None:
        self.score, self.coder, self.settings = score, coder, coder.settings
        self.objective_labels = objective_labels
        self.elites: _Elites | None = None
        self.strategies: _CMAStrategies | None = None

    def run_generation(self, generation: int) -> _Generation:
        """Propose, render and score one generation (with the elites to rescore), then update the elites."""
        children = self._propose(generation)
        pixels = self.coder.render(children.genomes)
        again = sorted(self.elites.candidates) if self.elites is not None and self.settings.rescore_elites else []
        scores, rescored = _score_candidates(self.score, pixels, [self.elites.candidates[i].pixels for i in again])
        if self.elites is None:
            self.elites = _Elites(_check_labels(self.objective_labels, scores.shape[1]), self.settings.seed)
        if self.strategies is not None:
            self.strategies.tell(scores)
        if again:
            self.elites.rescore(again, rescored)
        ids = self.elites.add(children, pixels, scores, generation)
        return _Generation(generation, children, pixels, scores, ids, np.array(again, dtype=np.int64), rescored,
                           self.elites.ids, self.elites.scores)

    def start_strategies(self) -> None:
        """With optimizer "cma", start one CMA-ES per objective from its elite (once, after generation 0)."""
        if self.settings.optimizer == "cma" and self.strategies is None:
            self.strategies = _CMAStrategies([self.elites.candidates[int(i)].genome for i in self.elites.ids], self.settings)

    def _propose(self, generation: int) -> _Children:
        rngs = [np.random.default_rng([self.settings.seed, generation, k]) for k in range(self.settings.n_children)]
        if self.elites is None:
            return _first_children(self.coder, rngs)
        if self.strategies is not None:
            return _cma_children(self.strategies)
        return _map_elites_children(self.coder, self.elites, rngs, generation)


def _score_candidates(score: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray,
                      elite_pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Score new ``pixels`` (n, H, W, 3) and the elites' ``elite_pixels`` (each (H, W, 3)) in one call:
    float64 (n, n_objectives) and (len(elite_pixels), n_objectives)."""
    n_new, n_total = len(pixels), len(pixels) + len(elite_pixels)
    scored = np.asarray(score(np.concatenate([pixels] + [p[None] for p in elite_pixels])), dtype=np.float64)
    if scored.ndim != 2 or scored.shape[0] != n_total or not np.isfinite(scored).all():
        raise ValueError(f"'score' must return finite values of shape ({n_total}, n_objectives), "
                         f"but returned shape {scored.shape}.")
    return scored[:n_new], scored[n_new:]


def _check_labels(objective_labels, n_objectives: int) -> list[str]:
    labels = [str(k) for k in range(n_objectives)] if objective_labels is None else [str(v) for v in objective_labels]
    if len(labels) != n_objectives:
        raise ValueError(f"'objective_labels' must name the {n_objectives} objectives of 'score', but has {len(labels)}.")
    return labels


def _check_clean(clean, settings: EvolutionSettings) -> np.ndarray | None:
    if (clean is None) != (settings.eps is None):
        raise ValueError("'clean' and 'eps' go together: give both to search inside the ε-ball around a clean image, "
                         f"or neither (got clean={'an image' if clean is not None else None}, eps={settings.eps}).")
    if clean is None:
        return None
    return check_array("clean", clean, shape=(settings.image_size, settings.image_size, 3), dtype=np.uint8)


def _start_folder(out: Path, overwrite: bool) -> Path:
    """Make ``out`` ready for a new run: refuse (or, with ``overwrite``, remove) an earlier one."""
    earlier = sorted((out / _GENERATIONS).glob("gen_*.npz"))
    if earlier and not overwrite:
        raise FileExistsError(f"'out' {str(out)!r} already holds an evolution ({len(earlier)} generations); choose another "
                              "folder (--name) or replace it (overwrite=True, --overwrite).")
    for path in earlier + [out / "summary.json", out / "elites.npz"]:
        path.unlink(missing_ok=True)
    (out / _GENERATIONS).mkdir(parents=True, exist_ok=True)
    return out


def _write_generation(out: Path, record: _Generation, coder: _Encoding, score) -> None:
    """``generations/gen_NNNN.npz`` of one generation (see :func:`run_evolution`)."""
    g, n_new = record.index, len(record.children.genomes)
    extra = {} if not isinstance(score, RigScorer) else {"reference_counts": score.reference_counts[-1]}
    if coder.settings.rescore_elites:
        extra.update(rescored_ids=record.rescored_ids, rescored_scores=record.rescored_scores)
    write_npz(out / _GENERATIONS / f"gen_{g:04d}.npz", pixels=record.pixels, scores=record.scores, ids=record.ids,
              parent=record.children.parent, parent_objective=record.children.parent_objective,
              child_seed=np.array([[coder.settings.seed, g, k] for k in range(n_new)]), elite_ids=record.elite_ids,
              elite_scores=record.elite_scores, **coder.record(record.children.genomes), **extra)


def _write_results(out: Path, elites: _Elites, settings: EvolutionSettings, history: list[dict]) -> dict:
    """``elites.npz`` and, last, ``summary.json``; return the summary."""
    kept = [elites.candidates[int(i)] for i in elites.ids]
    write_npz(out / "elites.npz", pixels=np.stack([c.pixels for c in kept]), scores=elites.scores, ids=elites.ids,
              generation=np.array([c.generation for c in kept]), objectives=np.array(elites.labels))
    first, last = history[0]["elite"], history[-1]["elite"]
    summary = {"out": str(out), "encoding": settings.encoding, "n_generations": settings.n_generations,
               "objectives": elites.labels, "first_elite": first, "last_elite": last,
               "n_improved": int(np.sum(np.array(last) > np.array(first)))}
    write_json(out / "summary.json", summary)
    return summary


def run_evolution(
    score: Callable[[np.ndarray], np.ndarray],
    out: str | Path,
    settings: EvolutionSettings,
    *,
    clean: np.ndarray | None = None,
    objective_labels=None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Evolve images that drive every objective of ``score``; record every generation in ``out``.

    ``score``: 8-bit images uint8 (n, image_size, image_size, 3) → float (n, n_objectives), larger
    is better (:func:`make_model_scorer`, :class:`RigScorer`). ``settings``: how to search
    (:class:`EvolutionSettings`). ``clean``: uint8 (image_size, image_size, 3), the centre of the
    ε-ball (with ``settings.eps``; direct genomes start from it). ``objective_labels``: a name per
    objective (default "0", "1", ...). ``metadata``: extra JSON-able entries for ``settings.json``.
    ``overwrite``: replace an earlier run in ``out`` (else its presence is an error).

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
    if not isinstance(settings, EvolutionSettings):
        raise TypeError(f"'settings' must be an EvolutionSettings, but got {type(settings).__name__}; "
                        "e.g. EvolutionSettings(encoding='direct', n_generations=20).")
    search = _Search(score, _Encoding(settings, _check_clean(clean, settings)), objective_labels)
    out = _start_folder(Path(out), overwrite)
    write_json(out / "settings.json", {**settings.to_json(), **(metadata or {})})
    history = []
    for generation in progress(range(settings.n_generations), description=f"evolve ({settings.encoding})"):
        record = search.run_generation(generation)
        _write_generation(out, record, search.coder, score)
        history.append({"generation": generation, "best_child": record.scores.max(axis=0).tolist(),
                        "elite": record.elite_scores.tolist()})
        write_json(out / "history.json", {"objectives": search.elites.labels, "generations": history})
        logger.info("evolve generation %d: mean elite score %.4g", generation, float(record.elite_scores.mean()))
        search.start_strategies()
    return _write_results(out, search.elites, settings, history)


def read_evolution(folder: str | Path) -> dict:
    """What :func:`run_evolution` recorded in ``folder``: ``settings``, ``history``, ``summary`` (dicts),
    ``elites`` (dict of arrays) and ``generations`` (sorted paths of the per-generation files)."""
    folder = Path(folder)
    check_file("folder", folder / "summary.json")
    with np.load(folder / "elites.npz") as elites:
        arrays = {key: elites[key] for key in elites.files}
    return {"settings": read_json(folder / "settings.json"), "history": read_json(folder / "history.json"),
            "summary": read_json(folder / "summary.json"), "elites": arrays,
            "generations": sorted((folder / _GENERATIONS).glob("gen_*.npz"))}
