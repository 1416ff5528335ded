"""MAP-Elites evolution: in silico on small models, and in the loop against the simulated rig."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from closedloop.images import to_tensor
from closedloop.probes.evolution import (
    EvolutionSettings,
    RigScorer,
    compute_mutation_rate,
    make_direct_child,
    make_model_scorer,
    read_evolution,
    run_evolution,
)
from models import make_it_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return make_it_model("resnet_tiny", "layer4.0", 3, seed=0, image_size=32)


@pytest.mark.parametrize("encoding", ["direct", "cppn"])
def test_map_elites_improves_every_objective(tmp_path, small_model, encoding):
    score = make_model_scorer(small_model)
    settings = EvolutionSettings(encoding=encoding, n_generations=12, n_children=8, image_size=32,
                                 genome_size=8 if encoding == "direct" else None, seed=3, halve_every=6)
    summary = run_evolution(score, tmp_path / encoding, settings)
    first, last = np.array(summary["first_elite"]), np.array(summary["last_elite"])
    assert np.all(last > first), f"elites did not improve: {first} -> {last}"
    record = read_evolution(tmp_path / encoding)
    assert len(record["generations"]) == 12
    elites = record["elites"]
    assert elites["pixels"].shape == (3, 32, 32, 3) and elites["pixels"].dtype == np.uint8
    assert np.allclose(score(elites["pixels"])[np.arange(3), np.arange(3)], elites["scores"], rtol=1e-5)
    with np.load(record["generations"][5]) as generation:
        assert set(generation["parent"]) <= set(range(5 * 8)), "parents must come from earlier generations"
        assert generation["scores"].shape == (8, 3)
        assert (generation["genomes"].shape == (8, 8, 8, 3)) if encoding == "direct" else len(generation["genomes_json"]) == 8
    rescored = run_evolution(score, tmp_path / "rescored", replace(settings, rescore_elites=True))
    assert np.allclose(rescored["last_elite"], summary["last_elite"]), "a noise-free score's mean is the score itself"
    with np.load(read_evolution(tmp_path / "rescored")["generations"][4]) as generation:
        assert len(generation["rescored_ids"]) >= 1 and generation["rescored_scores"].shape[1] == 3
    again = run_evolution(score, tmp_path / "again", settings)
    assert again["last_elite"] == summary["last_elite"], "the same seed must give the same run"


def test_cma_es_improves_every_objective(tmp_path, small_model):
    score = make_model_scorer(small_model)
    summary = run_evolution(score, tmp_path, EvolutionSettings(encoding="direct", optimizer="cma", n_generations=8,
                                                               n_children=12, image_size=32, genome_size=4, seed=1))
    assert np.all(np.array(summary["last_elite"]) > np.array(summary["first_elite"]))
    with np.load(read_evolution(tmp_path)["generations"][3]) as generation:
        assert generation["scores"].shape == (12, 3), "4 candidates from each of the 3 objectives' strategies"
        assert generation["parent_objective"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    few = run_evolution(score, tmp_path / "few", EvolutionSettings(encoding="direct", optimizer="cma", n_generations=5,
                                                                   n_children=3, image_size=32, genome_size=16, seed=1))
    assert len(few["last_elite"]) == 3, "cma needs at least 4 candidates per strategy, whatever n_children"


def test_fooling_a_classifier_with_confident_unrecognisable_images(tmp_path):
    """A linear 3-class 'classifier' on 16 px images: evolved images reach >= 99.99% confidence for every class."""
    generator = torch.Generator().manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    with torch.no_grad():
        classifier[1].weight.copy_(torch.randn(3, 3 * 16 * 16, generator=generator) * 0.2)
        classifier[1].bias.zero_()
    settings = EvolutionSettings(encoding="direct", n_generations=200, n_children=12, image_size=16, seed=0, rate_start=0.3,
                                 halve_every=1000, eta=2.0)
    summary = run_evolution(make_model_scorer(classifier, softmax=True), tmp_path, settings)
    assert min(summary["last_elite"]) >= 0.9999, summary["last_elite"]


def test_epsilon_ball_constraint(tmp_path, small_model):
    clean = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    settings = EvolutionSettings(encoding="direct", n_generations=3, n_children=4, image_size=32, eps=0.5, seed=0)
    run_evolution(make_model_scorer(small_model), tmp_path, settings, clean=clean, metadata={"clean_index": 7})
    recorded = read_evolution(tmp_path)["settings"]
    assert recorded == {**settings.to_json(), "clean_index": 7} and recorded["genome_size"] == 32 and recorded["sigma"] is None
    for path in read_evolution(tmp_path)["generations"]:
        with np.load(path) as generation:
            delta = generation["pixels"].reshape(4, -1).astype(float) - clean.reshape(1, -1)
            assert np.all(np.sqrt((delta**2).sum(axis=1)) / 255 <= 0.5)


def test_direct_mutation_and_rate_schedule():
    assert compute_mutation_rate(0) == 0.1 and compute_mutation_rate(999) == 0.1 and compute_mutation_rate(1000) == 0.05
    assert compute_mutation_rate(25, rate_start=0.4, halve_every=10) == pytest.approx(0.1)
    parent = np.full((64, 64, 3), 128, np.uint8)
    child = make_direct_child(parent, np.random.default_rng(0), rate=0.1)
    changed = child != parent
    assert child.dtype == np.uint8 and 0.05 < changed.mean() < 0.15
    assert np.array_equal(make_direct_child(parent, np.random.default_rng(0), rate=0.1), child)
    assert np.array_equal(make_direct_child(parent, np.random.default_rng(0), rate=0.0), parent)


def test_bad_inputs(tmp_path, small_model):
    score = make_model_scorer(small_model)
    with pytest.raises(ValueError, match="Invalid value for 'encoding'"):
        EvolutionSettings(encoding="pixels")
    with pytest.raises(ValueError, match="optimizer 'cma' searches direct genomes of at most 64 px"):
        EvolutionSettings(encoding="cppn", optimizer="cma")
    with pytest.raises(ValueError, match="Invalid value for 'optimizer'"):
        EvolutionSettings(optimizer="nsga")
    with pytest.raises(ValueError, match="'genome_size' must lie in \\[1, 32\\], but got 64"):
        EvolutionSettings(image_size=32, genome_size=64)
    with pytest.raises(TypeError, match="'settings' must be an EvolutionSettings, but got dict"):
        run_evolution(score, tmp_path, {"encoding": "direct"})
    with pytest.raises(ValueError, match="'clean' and 'eps' go together"):
        run_evolution(score, tmp_path, EvolutionSettings(image_size=32, eps=1.0))
    with pytest.raises(ValueError, match="'clean' must have shape"):
        run_evolution(score, tmp_path, EvolutionSettings(image_size=32, eps=1.0), clean=np.zeros((8, 8, 3), np.uint8))
    tiny = EvolutionSettings(image_size=32, n_generations=1, n_children=2)
    with pytest.raises(ValueError, match="'score' must return finite values of shape"):
        run_evolution(lambda pixels: np.zeros(len(pixels)), tmp_path, tiny)
    with pytest.raises(ValueError, match="'objective_labels' must name the 3 objectives"):
        run_evolution(score, tmp_path, tiny, objective_labels=["a"])
    with pytest.raises(TypeError, match="'parent' must be a uint8 direct genome"):
        make_direct_child(np.zeros((4, 4, 3)), np.random.default_rng(0), rate=0.1)
    with pytest.raises(ValueError, match="'units' must lie in"):
        make_model_scorer(small_model, units=[7])(np.zeros((1, 32, 32, 3), np.uint8))
    run_evolution(score, tmp_path / "done", replace(tiny, n_generations=2))
    with pytest.raises(FileExistsError, match="already holds an evolution \\(2 generations\\)"):
        run_evolution(score, tmp_path / "done", tiny)
    run_evolution(score, tmp_path / "done", tiny, overwrite=True)
    assert len(read_evolution(tmp_path / "done")["generations"]) == 1
    with pytest.raises(FileNotFoundError, match="'folder'"):
        read_evolution(tmp_path / "missing")


def test_in_the_loop_evolution_raises_the_simulated_sites_true_rates(tmp_path):
    """Evolution scored by spike counts from the simulated rig over loopback: the elites' TRUE rates
    (the rig's hidden site function, which the loop never reads) rise from generation 0 to the end."""
    from closedloop.link.client import RigClient
    from rigs.sim import make_hidden_sites, run_sim_rig

    n_sites, seed = 3, 4
    started, stop, agents = threading.Event(), threading.Event(), []

    def remember(agent) -> None:
        agents.append(agent)
        started.set()

    rig = threading.Thread(target=run_sim_rig, args=(stop,), kwargs=dict(
        on_start=remember, address="tcp://127.0.0.1:*", state_dir=tmp_path / "rig", n_sites=n_sites, seed=seed,
        time_scale=0.0, fixation_break_rate=0.05, security="plain", heartbeat_s=0.1, timeout_s=2.0))
    rig.start()
    references = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    try:
        assert started.wait(60)
        with RigClient(agents[0].address, security="plain", heartbeat_s=0.1, timeout_s=2.0) as client:
            scorer = RigScorer(client, references, tmp_path / "run", repetitions=3, seed=1)
            settings = EvolutionSettings(encoding="direct", n_generations=10, n_children=10, image_size=224, genome_size=4,
                                         seed=2, rate_start=0.5, rescore_elites=True)
            run_evolution(scorer, tmp_path / "run", settings)
            client.stop()
    finally:
        stop.set()
        rig.join(30)
    record = read_evolution(tmp_path / "run")
    truth = make_hidden_sites(n_sites, seed)
    with np.load(record["generations"][0]) as first:
        first_elites = first["pixels"][first["elite_ids"] - first["ids"][0]]
        assert first["reference_counts"].shape == (2, n_sites)
    with torch.no_grad():
        before = truth(to_tensor(first_elites)).numpy()[np.arange(n_sites), np.arange(n_sites)]
        after = truth(to_tensor(record["elites"]["pixels"])).numpy()[np.arange(n_sites), np.arange(n_sites)]
    assert np.all(after > before), f"true rates (Hz) did not rise: {before} -> {after}"
    assert len(scorer.reference_counts) == 10
