"""Backbones: a registered architecture or a checkpoint file, cut at a layer.

:func:`load_backbone` is the one way in. Importing this module is cheap (torch is imported inside
the functions) because the experiment config calls :func:`registered_backbones` to validate
names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from closedloop.core.validation import check_integer, check_option

if TYPE_CHECKING:
    from torch import nn

    from models.networks import Backbone

__all__ = ["registered_backbones", "load_backbone"]

_REGISTERED = ("resnet50", "wide_resnet50_2", "wide_resnet50_4", "resnet_tiny")


def registered_backbones() -> tuple[str, ...]:
    """Names :func:`load_backbone` builds with random weights (no download)."""
    return _REGISTERED


def load_backbone(source: str | Path, layer: str = "layer4.0", *, trust: bool = False, seed: int = 0) -> Backbone:
    """The backbone named by ``source``, cut at ``layer``, on the CPU in eval mode.

    ``source``: a name from :func:`registered_backbones` (random torchvision initialisation drawn
    from ``seed``, deterministic) or a checkpoint path: a robustness-library ``.pt``, a
    torchvision state dict (``.pt``/``.pth``), or a closedloop ``.safetensors`` (see
    docs/models.md). ``layer``: a module or graph-node name, e.g. ``"layer4.0"`` (ResNet-50 at
    224 px → (N, 2048, 7, 7)) or ``"avgpool"`` (penultimate layer, flattened to (N, C)).
    ``trust``: allow full unpickling of a ``.pt`` that needs it (runs code from the file).

    The returned :class:`models.Backbone` maps images in [0, 1], (N, 3, H, W), to features,
    normalising with ImageNet mean/std (or the checkpoint's own normaliser) inside, after area
    downsampling to the checkpoint's ``input_size`` when its metadata gives one (our classifiers
    trained on small images, docs/behavior.md).
    """
    # torch-importing modules stay inside: the experiment config imports this module to check
    # backbone names, and `import torch` costs seconds of CLI start-up (docs/architecture.md).
    from models.checkpoints import load_network_weights, read_checkpoint_weights
    from models.networks import make_backbone, make_network

    if not isinstance(source, (str, Path)):
        raise TypeError(f"'source' must be a backbone name or a checkpoint path, but got {type(source).__name__}.")
    if not isinstance(layer, str):
        raise TypeError(f"'layer' must be a layer name such as 'layer4.0', but got {type(layer).__name__}.")
    check_integer("seed", seed, minimum=0)
    check_option("trust", trust, [False, True])
    if isinstance(source, str) and source in _REGISTERED:
        network = make_network(source, seed=seed)
        _check_layer(network, source, layer)
        return make_backbone(network, source=source, architecture=source, layer=layer).eval()
    if not Path(source).expanduser().is_file():
        raise FileNotFoundError(
            f"'source' = {str(source)!r} is neither a registered backbone ({', '.join(_REGISTERED)}) nor an "
            "existing checkpoint file; give one of those names or the path of a checkpoint."
        )
    weights = read_checkpoint_weights(source, trust=trust)
    network = make_network(weights.architecture, num_classes=weights.num_classes, seed=None)
    _check_layer(network, weights.architecture, layer)
    backbone = make_backbone(
        network,
        source=str(weights.path),
        architecture=weights.architecture,
        layer=layer,
        mean=weights.mean,
        std=weights.std,
        input_size=weights.input_size,
    )
    load_network_weights(backbone.network, weights, needed_for=f"up to layer {layer!r}")
    return backbone.eval()


def _check_layer(network: nn.Module, architecture: str, layer: str) -> None:
    from models.networks import layer_names  # inside, as in load_backbone

    names = layer_names(network)
    if layer not in names:
        suggested = ", ".join(repr(name) for name in names if name.count(".") <= 1 and name != "x")
        raise ValueError(
            f"Invalid value for 'layer': {layer!r} is not a layer of {architecture}; allowed values are module or "
            f"graph-node names ({len(names)} in all), e.g. {suggested}."
        )
