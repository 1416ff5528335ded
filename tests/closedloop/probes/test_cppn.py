"""CPPN genomes: valid after any mutations, and rendered deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from closedloop.probes.cppn import ACTIVATIONS, CPPNGenome, make_cppn_child, make_cppn_genome, make_cppn_images


def _lineage(n_generations: int, seed: int) -> list[CPPNGenome]:
    rng = np.random.default_rng(seed)
    genomes = [make_cppn_genome(rng)]
    for _ in range(n_generations):
        genomes.append(make_cppn_child(genomes[-1], rng, add_node_rate=0.5, add_connection_rate=0.5))
    return genomes


def test_mutated_genomes_stay_valid_and_grow():
    genomes = _lineage(40, seed=1)
    for genome in genomes:
        genome.check()
        assert set(genome.activations[7:]) <= set(ACTIVATIONS)
    assert genomes[-1].n_nodes > genomes[0].n_nodes and genomes[-1].n_connections > genomes[0].n_connections


def test_rendering_is_deterministic_and_in_range():
    genome = _lineage(15, seed=2)[-1]
    first, again = genome.render(32), CPPNGenome.from_json(genome.to_json()).render(32)
    assert first.shape == (32, 32, 3) and first.dtype == np.float32
    assert np.array_equal(first, again)
    assert 0.0 <= first.min() and first.max() <= 1.0 and first.std() > 0
    assert np.array_equal(_lineage(15, seed=2)[-1].render(32), first), "same seed, different genome"
    images = make_cppn_images(_lineage(3, seed=5), 16)
    assert images.shape == (4, 16, 16, 3)
    assert not np.array_equal(images[0], images[-1])


def test_invalid_genomes_are_refused():
    genome = make_cppn_genome(np.random.default_rng(0))
    document = genome.to_json()
    cyclic = dict(document, sources=[document["targets"][0]] + document["sources"][1:],
                  targets=[document["sources"][0]] + document["targets"][1:])
    with pytest.raises(ValueError, match="lower to a higher depth"):
        CPPNGenome.from_json(cyclic)
    with pytest.raises(ValueError, match="join nodes 0"):
        CPPNGenome.from_json(dict(document, targets=[99] + document["targets"][1:]))
    with pytest.raises(ValueError, match="hidden activations must be among"):
        CPPNGenome.from_json(dict(document, activations=document["activations"][:-1] + ["relu"]))
    with pytest.raises(ValueError, match="needs the key 'weights'"):
        CPPNGenome.from_json({k: v for k, v in document.items() if k != "weights"})
    with pytest.raises(ValueError, match="'add_node_rate' must lie in"):
        make_cppn_child(genome, np.random.default_rng(0), add_node_rate=1.5)
