"""CPPN genomes: compositional pattern-producing networks that paint an image from pixel coordinates.

A genome is a small feed-forward network (Stanley 2007; the indirect encoding of Nguyen, Yosinski &
Clune's fooling images). Its inputs are, for every pixel, x and y in [−1, 1], the distance
d = √(x² + y²) from the centre and a bias of 1; its three outputs, squashed by a sigmoid, are the
pixel's red, green and blue values in [0, 1]. Hidden nodes apply one of :data:`ACTIVATIONS`
(sine, sigmoid, Gaussian, linear). Evolution changes weights, activations, and grows the network
by adding a node (splitting a connection) or a connection.

Nodes are ordered by a ``depth`` in [0, 1] (inputs 0, outputs 1, a split node halfway between its
ends); a connection always goes from lower to higher depth, so the network stays acyclic and
renders in depth order. Rendering is a pure function of the genome: the same genome gives the same
image, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from closedloop.core.validation import check_integer, check_number

__all__ = ["ACTIVATIONS", "N_INPUTS", "N_OUTPUTS", "CPPNGenome", "make_cppn_genome", "make_cppn_child", "make_cppn_images"]

ACTIVATIONS = ("sine", "sigmoid", "gaussian", "linear")
N_INPUTS = 4  # x, y, distance, bias
N_OUTPUTS = 3  # red, green, blue
_OUTPUT = "output"
_INPUT = "input"
_FIELDS = ("activations", "depths", "sources", "targets", "weights", "enabled")


def _apply(activation: str, values: np.ndarray) -> np.ndarray:
    if activation == "sine":
        return np.sin(values)
    if activation in ("sigmoid", _OUTPUT):
        return 1.0 / (1.0 + np.exp(-values))
    if activation == "gaussian":
        return np.exp(-(values**2) * 2.0)
    return values


@dataclass(frozen=True)
class CPPNGenome:
    """One CPPN. Nodes 0..3 are the inputs (x, y, d, bias), 4..6 the outputs (R, G, B), 7.. hidden.

    ``activations``: tuple of str per node ("input", "output" or one of :data:`ACTIVATIONS`);
    ``depths``: float per node in [0, 1]; ``sources`` / ``targets``: int node index per connection;
    ``weights``: float per connection; ``enabled``: bool per connection (a split connection is
    disabled, not removed, so the genealogy stays readable).
    """

    activations: tuple
    depths: tuple
    sources: tuple
    targets: tuple
    weights: tuple
    enabled: tuple

    @property
    def n_nodes(self) -> int:
        return len(self.activations)

    @property
    def n_connections(self) -> int:
        return len(self.sources)

    def check(self) -> CPPNGenome:
        """Raise ``ValueError`` naming the problem unless the genome is a valid acyclic CPPN; return it."""
        n, problems = self.n_nodes, []
        if len(self.depths) != n or not all(len(v) == self.n_connections for v in (self.targets, self.weights, self.enabled)):
            problems.append("node or connection fields have different lengths")
        ends = self.activations[:N_INPUTS + N_OUTPUTS]
        if ends != (_INPUT,) * N_INPUTS + (_OUTPUT,) * N_OUTPUTS:
            problems.append(f"nodes 0..{N_INPUTS - 1} must be inputs and the next {N_OUTPUTS} outputs")
        if any(a not in ACTIVATIONS for a in self.activations[N_INPUTS + N_OUTPUTS:]):
            problems.append(f"hidden activations must be among {ACTIVATIONS}")
        if not all(0 <= s < n and 0 <= t < n for s, t in zip(self.sources, self.targets)):
            problems.append(f"connections must join nodes 0..{n - 1}")
        elif any(self.depths[s] >= self.depths[t] for s, t in zip(self.sources, self.targets)):
            problems.append("every connection must go from a lower to a higher depth (feed-forward)")
        if len(set(zip(self.sources, self.targets))) != self.n_connections:
            problems.append("two connections join the same pair of nodes")
        if not np.isfinite(np.asarray(self.weights, dtype=float)).all():
            problems.append("weights must be finite")
        if problems:
            raise ValueError("invalid CPPN genome: " + "; ".join(problems) + ".")
        return self

    def to_json(self) -> dict:
        return {"activations": list(self.activations), "depths": list(self.depths), "sources": list(self.sources),
                "targets": list(self.targets), "weights": list(self.weights), "enabled": list(self.enabled)}

    @classmethod
    def from_json(cls, document: dict) -> CPPNGenome:
        """The genome written by :meth:`to_json`; checked."""
        try:
            genome = cls(**{key: tuple(document[key]) for key in _FIELDS})
        except KeyError as missing:
            raise ValueError(f"a CPPN genome document needs the key {missing}; it has {sorted(document)}.") from None
        return genome.check()

    def render(self, size: int) -> np.ndarray:
        """The image the genome paints at ``size`` × ``size`` px: float32 (size, size, 3) in [0, 1]."""
        size = check_integer("size", size, minimum=1)
        axis = np.linspace(-1.0, 1.0, size)
        y, x = np.meshgrid(axis, axis, indexing="ij")
        values = [x, y, np.sqrt(x**2 + y**2), np.ones_like(x)] + [np.zeros_like(x)] * (self.n_nodes - N_INPUTS)
        incoming = [[] for _ in range(self.n_nodes)]
        for source, target, weight, on in zip(self.sources, self.targets, self.weights, self.enabled):
            if on:
                incoming[target].append((source, weight))
        for node in sorted(range(N_INPUTS, self.n_nodes), key=lambda k: (self.depths[k], k)):
            total = np.zeros_like(x)
            for source, weight in incoming[node]:
                total = total + weight * values[source]
            values[node] = _apply(self.activations[node], total)
        image = np.stack(values[N_INPUTS:N_INPUTS + N_OUTPUTS], axis=-1)
        return np.clip(image, 0.0, 1.0).astype(np.float32)


def make_cppn_genome(rng: np.random.Generator, *, n_hidden: int = 2, weight_sd: float = 1.5) -> CPPNGenome:
    """A random starting CPPN: every input joined to ``n_hidden`` hidden nodes (random activations),
    each hidden node joined to every output, weights N(0, ``weight_sd``²)."""
    n_hidden = check_integer("n_hidden", n_hidden, minimum=0)
    weight_sd = check_number("weight_sd", weight_sd, minimum=0.0, inclusive=False)
    hidden = [str(a) for a in rng.choice(ACTIVATIONS, n_hidden)]
    activations = (_INPUT,) * N_INPUTS + (_OUTPUT,) * N_OUTPUTS + tuple(hidden)
    depths = (0.0,) * N_INPUTS + (1.0,) * N_OUTPUTS + (0.5,) * n_hidden
    hidden_ids = range(N_INPUTS + N_OUTPUTS, N_INPUTS + N_OUTPUTS + n_hidden)
    outputs = range(N_INPUTS, N_INPUTS + N_OUTPUTS)
    pairs = [(i, h) for i in range(N_INPUTS) for h in hidden_ids] + [(h, o) for h in hidden_ids for o in outputs]
    if not n_hidden:
        pairs = [(i, o) for i in range(N_INPUTS) for o in outputs]
    weights = rng.normal(0.0, weight_sd, len(pairs))
    return CPPNGenome(activations, depths, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs),
                      tuple(float(w) for w in weights), (True,) * len(pairs))


def make_cppn_child(
    parent: CPPNGenome,
    rng: np.random.Generator,
    *,
    weight_rate: float = 0.3,
    weight_sd: float = 0.5,
    activation_rate: float = 0.1,
    add_node_rate: float = 0.2,
    add_connection_rate: float = 0.3,
) -> CPPNGenome:
    """A mutated copy of ``parent``: each weight perturbed with probability ``weight_rate`` by
    N(0, ``weight_sd``²); each hidden activation redrawn with probability ``activation_rate``; with
    probability ``add_node_rate`` an enabled connection is split by a new node (in-weight 1,
    out-weight the old weight, the old connection disabled); with probability
    ``add_connection_rate`` a new feed-forward connection joins two unconnected nodes."""
    for name, value in (("weight_rate", weight_rate), ("activation_rate", activation_rate),
                        ("add_node_rate", add_node_rate), ("add_connection_rate", add_connection_rate)):
        check_number(name, value, minimum=0.0, maximum=1.0)
    weight_sd = check_number("weight_sd", weight_sd, minimum=0.0)
    activations, depths = list(parent.activations), list(parent.depths)
    sources, targets, enabled = list(parent.sources), list(parent.targets), list(parent.enabled)
    weights = np.asarray(parent.weights, dtype=float)
    weights = weights + (rng.random(len(weights)) < weight_rate) * rng.normal(0.0, weight_sd, len(weights))
    weights = weights.tolist()
    for node in range(N_INPUTS + N_OUTPUTS, len(activations)):
        if rng.random() < activation_rate:
            activations[node] = str(rng.choice(ACTIVATIONS))
    live = [k for k, on in enumerate(enabled) if on]
    if live and rng.random() < add_node_rate:
        split = live[int(rng.integers(len(live)))]
        source, target = sources[split], targets[split]
        new = len(activations)
        activations.append(str(rng.choice(ACTIVATIONS)))
        depths.append((depths[source] + depths[target]) / 2.0)
        enabled[split] = False
        sources += [source, new]
        targets += [new, target]
        weights += [1.0, weights[split]]
        enabled += [True, True]
    if rng.random() < add_connection_rate:
        existing = set(zip(sources, targets))
        free = [(s, t) for s in range(len(depths)) for t in range(len(depths))
                if depths[s] < depths[t] and (s, t) not in existing]
        if free:
            source, target = free[int(rng.integers(len(free)))]
            sources.append(source)
            targets.append(target)
            weights.append(float(rng.normal(0.0, 1.0)))
            enabled.append(True)
    return CPPNGenome(tuple(activations), tuple(depths), tuple(sources), tuple(targets), tuple(weights), tuple(enabled))


def make_cppn_images(genomes, size: int) -> np.ndarray:
    """Render ``genomes`` (a sequence of :class:`CPPNGenome`) as float32 (n, size, size, 3) in [0, 1]."""
    return np.stack([genome.render(size) for genome in genomes]) if len(genomes) else np.zeros((0, size, size, 3), np.float32)
