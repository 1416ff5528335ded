"""Classifiers for the behavioural pipeline: guides and surrogates, and the files they live in.

Gaziv, Lee & DiCarlo: each of the nine coarse "Restricted ImageNet" categories scores the maximum
of the 1000-way ImageNet logits over an inclusive range of class indices. A :class:`Classifier`
wraps a torchvision ResNet (robustness-library checkpoint, torchvision state dict, or one we
trained) and returns one logit per category: the 9 Restricted-ImageNet logits for a 1000-way
ImageNet network, or the network's own logits for one trained on its own categories (the
embedded default's nine photographs).

A classifier we write is two files, written atomically: ``NAME.safetensors`` (the ResNet's
torchvision state dict, so :func:`models.load_backbone` reads it too) and ``NAME.json`` (format,
architecture, categories, input handling, how it was trained, sha256 of the weights). No pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from closedloop.core.validation import check_file, check_integer, check_option
from models.checkpoints import load_network_weights, read_checkpoint_weights, read_sidecar_metadata, write_checkpoint
from models.networks import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, make_network, prepare_images

__all__ = [
    "RESTRICTED_IMAGENET_RANGES",
    "RESTRICTED_IMAGENET_NAMES",
    "RestrictedImageNet",
    "Classifier",
    "compute_restricted_logits",
    "make_classifier",
    "load_classifier",
    "write_classifier",
]

FORMAT = "closedloop.classifier"
FORMAT_VERSION = 1
_IMAGENET_CLASSES = 1000

# (category, first ImageNet index, last ImageNet index), both inclusive.
RESTRICTED_IMAGENET_RANGES: tuple[tuple[str, int, int], ...] = (
    ("dog", 151, 268),
    ("cat", 281, 285),
    ("frog", 30, 32),
    ("turtle", 33, 37),
    ("bird", 80, 100),
    ("primate", 365, 382),
    ("fish", 389, 397),
    ("crab", 118, 121),
    ("insect", 300, 319),
)
RESTRICTED_IMAGENET_NAMES: tuple[str, ...] = tuple(name for name, _, _ in RESTRICTED_IMAGENET_RANGES)


def compute_restricted_logits(logits: torch.Tensor) -> torch.Tensor:
    """ImageNet logits (N, 1000) → the 9 Restricted-ImageNet category logits (N, 9).

    Category k's logit is the max over ``RESTRICTED_IMAGENET_RANGES[k]`` (inclusive), in the
    order of ``RESTRICTED_IMAGENET_NAMES``.
    """
    if logits.dim() != 2 or logits.shape[1] != _IMAGENET_CLASSES:
        raise ValueError(f"RestrictedImageNet needs (N, 1000) ImageNet logits from 'network', but got {tuple(logits.shape)}.")
    return torch.stack([logits[:, first : last + 1].amax(dim=1) for _, first, last in RESTRICTED_IMAGENET_RANGES], dim=1)


class RestrictedImageNet(nn.Module):
    """Wrap a 1000-way ImageNet network; forward returns the 9 category logits (N, 9).

    ``network``: images (N, 3, H, W) in [0, 1] → logits (N, 1000) (normalisation inside it).
    See :func:`compute_restricted_logits`; ``category_names`` gives the names in order.
    """

    category_names: tuple[str, ...] = RESTRICTED_IMAGENET_NAMES

    def __init__(self, network: nn.Module):
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"'network' must be a torch.nn.Module returning (N, 1000) logits, but got {type(network).__name__}.")
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return compute_restricted_logits(self.network(images))


class _Penultimate(nn.Module):
    """Images → the classifier's penultimate features (N, C); shares the classifier's weights."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.compute_features(images)


class Classifier(nn.Module):
    """Images in [0, 1], (N, 3, H, W) → category logits (N, n_categories).

    Inside: area downsampling to ``input_size`` × ``input_size`` px when ``input_size`` > 0 (the
    CPU-friendly embedded classifiers see 56 px; attacks still act on the full image), input
    normalisation by ``mean``/``std`` (per RGB channel), the torchvision ResNet ``network``, and,
    when ``restricted``, the 9 Restricted-ImageNet logits of its 1000 ImageNet logits.

    Attributes: ``category_names`` (one per output logit), ``architecture``, ``source`` (where it
    came from), ``metadata`` (JSON-able; ``training`` holds the recipe it was trained with).
    :meth:`features` gives a module mapping images to penultimate features (N, C), for
    feature-centroid targets.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        architecture: str,
        category_names: tuple[str, ...],
        restricted: bool = False,
        input_size: int = 0,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        source: str = "",
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        check_option("architecture", architecture, ARCHITECTURES)
        num_classes = network.fc.out_features
        n_outputs = len(RESTRICTED_IMAGENET_NAMES) if restricted else num_classes
        if restricted and num_classes != _IMAGENET_CLASSES:
            raise ValueError(
                f"'restricted' needs a 1000-way ImageNet network, but this {architecture} has {num_classes} outputs; "
                "use restricted=False with one category name per output."
            )
        if len(category_names) != n_outputs:
            raise ValueError(
                f"'category_names' must name each of the {n_outputs} outputs, but got {len(category_names)} names."
            )
        self.network = network
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1).clone())
        self.architecture, self.restricted, self.source = architecture, bool(restricted), source
        self.input_size = check_integer("input_size", input_size, minimum=0)
        self.category_names = tuple(category_names)
        self.metadata = dict(metadata or {})

    @property
    def n_categories(self) -> int:
        return len(self.category_names)

    def compute_features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, C): the ResNet up to its global average pool, flattened."""
        net = self.network
        x = net.maxpool(net.relu(net.bn1(net.conv1(prepare_images(images, self.mean, self.std, self.input_size)))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.network.fc(self.compute_features(images))
        return compute_restricted_logits(logits) if self.restricted else logits

    def features(self) -> nn.Module:
        """A module images (N, 3, H, W) → penultimate features (N, C) that shares these weights."""
        return _Penultimate(self)

    def describe(self) -> dict:
        """JSON-able facts that, with the network's weights, rebuild this classifier."""
        return {
            "architecture": self.architecture,
            "num_classes": int(self.network.fc.out_features),
            "category_names": list(self.category_names),
            "restricted": self.restricted,
            "input_size": self.input_size,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }


def make_classifier(
    architecture: str, category_names, *, input_size: int = 0, seed: int = 0, source: str = ""
) -> Classifier:
    """A classifier with random weights (torchvision initialisation from ``seed``): one logit per category.

    ``category_names``: names of the categories, in output order. ``input_size``: area-downsample
    inputs to this many px first (0: none).
    """
    check_option("architecture", architecture, ARCHITECTURES)
    names = tuple(str(name) for name in category_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"'category_names' must hold at least 2 distinct names, but got {list(names)}.")
    network = make_network(architecture, num_classes=len(names), seed=check_integer("seed", seed, minimum=0))
    return Classifier(
        network, architecture=architecture, category_names=names, input_size=input_size,
        source=source or f"{architecture} (random, seed {seed})",
    ).eval()


def load_classifier(source: str | Path, *, trust: bool = False, seed: int = 0, restricted: bool | None = None) -> Classifier:
    """The classifier in ``source``, on the CPU in eval mode.

    ``source``: a closedloop classifier ``.safetensors`` (written by :func:`write_classifier`,
    e.g. by ``closedloop train-robust``), a 1000-way ImageNet checkpoint (robustness-library
    ``.pt``, torchvision state dict ``.pt``/``.pth``), or a registered architecture name (a random
    1000-way network from ``seed``; for tests). ``restricted``: give the 9 Restricted-ImageNet
    logits; ``None`` means yes for a 1000-way network. ``trust``: allow full unpickling of a
    ``.pt`` that needs it (runs code from the file).
    """
    if not isinstance(source, (str, Path)):
        raise TypeError(f"'source' must be a checkpoint path or an architecture name, but got {type(source).__name__}.")
    check_option("restricted", restricted, [None, False, True])
    if isinstance(source, str) and source in ARCHITECTURES:
        network = make_network(source, seed=check_integer("seed", seed, minimum=0))
        return _wrap(network, source, {}, f"{source} (random, seed {seed})", restricted)
    path = check_file("source", source)
    document = _read_metadata(path) if path.suffix == ".safetensors" else {}
    weights = read_checkpoint_weights(path, trust=trust)
    network = make_network(weights.architecture, num_classes=weights.num_classes, seed=None)
    load_network_weights(network, weights, needed_for="for a whole classifier (every layer and fc)")
    document.setdefault("mean", list(weights.mean))
    document.setdefault("std", list(weights.std))
    return _wrap(network, weights.architecture, document, str(path), restricted)


def _wrap(network: nn.Module, architecture: str, document: dict, source: str, restricted: bool | None) -> Classifier:
    num_classes = network.fc.out_features
    if restricted is None:
        restricted = num_classes == _IMAGENET_CLASSES
    if restricted:
        names = RESTRICTED_IMAGENET_NAMES
    elif "category_names" in document:
        names = tuple(document["category_names"])
    else:
        raise ValueError(
            f"'source' {source!r} is a {num_classes}-way network without category names; give a 1000-way ImageNet "
            "checkpoint (read as the 9 Restricted-ImageNet categories) or a classifier written by write_classifier."
        )
    return Classifier(
        network.eval(),
        architecture=architecture,
        category_names=names,
        restricted=restricted,
        input_size=int(document.get("input_size", 0)),
        mean=tuple(document.get("mean", IMAGENET_MEAN)),
        std=tuple(document.get("std", IMAGENET_STD)),
        source=source,
        metadata={key: document[key] for key in ("training",) if key in document},
    ).eval()


def write_classifier(classifier: Classifier, path: str | Path) -> Path:
    """Write ``classifier`` to ``path`` (.safetensors: the ResNet's state dict) and ``path.with_suffix(".json")``.

    The JSON holds :meth:`Classifier.describe`, ``classifier.metadata`` (e.g. ``training``) and the
    sha256 of the weights; both files are written under temporary names and renamed into place
    (:func:`models.checkpoints.write_checkpoint`). Returns ``path``.
    """
    if not isinstance(classifier, Classifier):
        raise TypeError(f"'classifier' must be a models.Classifier, but got {type(classifier).__name__}.")
    return write_checkpoint(
        classifier.network.state_dict(), path, classifier.metadata | classifier.describe(),
        format_name=FORMAT, format_version=FORMAT_VERSION, document_name="classifier.metadata",
    )


def _read_metadata(path: Path) -> dict:
    return read_sidecar_metadata(path, format_name=FORMAT, format_version=FORMAT_VERSION, what="classifier",
                                 noun="classifier", fix="write classifiers with write_classifier (closedloop train-robust)")
