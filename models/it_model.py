"""The IT model: backbone + factorized readout → predicted spike counts; saving and reading it.

``ITModel(images)`` = ``softplus(readout(backbone(images)))``: images in [0, 1], (N, 3, H, W),
to predicted spike counts per response window, (N, n_sites). The softplus keeps counts >= 0
while its gradient never vanishes completely (attacks can still push a silent site up).

A saved model is two files written atomically: ``NAME.safetensors`` (every weight, backbone
included, so the model rebuilds without its original checkpoint) and ``NAME.json`` (the
architecture, layer, sites, training history and a sha256 of the weights file). No pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from closedloop.core.validation import check_file, check_integer
from models.backbones import load_backbone
from models.checkpoints import SIDECAR_KEYS, read_sidecar_metadata, write_checkpoint
from models.devices import resolve_device
from models.networks import Backbone, make_backbone, make_network
from models.readout import FactorizedReadout

__all__ = ["ITModel", "make_it_model", "write_it_model", "read_it_model"]

FORMAT = "closedloop.it_model"
FORMAT_VERSION = 1


class ITModel(nn.Module):
    """Images in [0, 1], (N, 3, H, W) → predicted spike counts per response window, (N, n_sites).

    ``metadata``: JSON-able dict saved with the model; always holds ``backbone`` (source,
    architecture, layer, normalisation), ``readout`` (n_sites, in_shape, positive), ``n_sites``
    and ``history`` (one entry per fit, appended by :func:`models.fit_it_model`).
    """

    def __init__(self, backbone: Backbone, readout: FactorizedReadout, *, metadata: dict | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(f"'backbone' must be a models.Backbone (from load_backbone), but got {type(backbone).__name__}.")
        if not isinstance(readout, FactorizedReadout):
            raise TypeError(f"'readout' must be a models.FactorizedReadout, but got {type(readout).__name__}.")
        if readout.in_shape[0] != backbone.out_channels:
            raise ValueError(
                f"'readout' expects {readout.in_shape[0]} channels but the backbone gives {backbone.out_channels} "
                f"at layer {backbone.layer!r}; build the readout with in_shape=backbone.out_shape()."
            )
        self.backbone, self.readout = backbone, readout
        self.metadata = {key: value for key, value in (metadata or {}).items() if key not in SIDECAR_KEYS}
        self.metadata.update(backbone=backbone.describe(), readout=readout.describe(), n_sites=readout.n_sites)
        self.metadata.setdefault("history", [])

    @property
    def n_sites(self) -> int:
        return self.readout.n_sites

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.counts_from_features(self.backbone(images))

    def counts_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, *backbone.out_shape) → predicted counts (N, n_sites)."""
        return F.softplus(self.readout(features))


def make_it_model(
    source: str | Path,
    layer: str,
    n_sites: int,
    *,
    trust: bool = False,
    positive: bool = False,
    seed: int = 0,
    image_size: int = 224,
) -> ITModel:
    """The day-0 model: the base backbone (see :func:`models.load_backbone`) and a random readout.

    The readout covers the backbone's feature map at ``image_size`` px (224 by the pixel
    contract) and draws its N(0, 1) weights from ``seed``.
    """
    check_integer("n_sites", n_sites, minimum=1)
    check_integer("image_size", image_size, minimum=32)
    backbone = load_backbone(source, layer, trust=trust, seed=seed)
    readout = FactorizedReadout(n_sites, backbone.out_shape(image_size), positive=positive, seed=seed)
    return ITModel(backbone, readout).eval()


OWN_KEYS = ("backbone", "readout", "n_sites", "history")
"""The entries of :attr:`ITModel.metadata` that describe the model itself; no caller replaces them."""


def write_it_model(model: ITModel, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``model`` to ``path`` (.safetensors) and its metadata to ``path.with_suffix(".json")``.

    ``metadata``: extra JSON-able entries stored next to ``model.metadata`` (e.g. the day, the
    config); they replace the same entries carried over from an earlier write (a refitted model
    read from day N−1 is written with day N's), but not the model's own ones (:data:`OWN_KEYS`).
    Both files are written under temporary names and renamed into place, the weights
    last; the JSON records the weights' sha256 so a mismatched pair is detected on reading
    (:func:`models.checkpoints.write_checkpoint`). Returns ``path``.
    """
    if not isinstance(model, ITModel):
        raise TypeError(f"'model' must be a models.ITModel, but got {type(model).__name__}.")
    return write_checkpoint(
        model.state_dict(), path, model.metadata | dict(metadata or {}) | {key: model.metadata[key] for key in OWN_KEYS},
        format_name=FORMAT, format_version=FORMAT_VERSION,
    )


def read_it_model(path: str | Path, *, device: str | torch.device = "cpu") -> ITModel:
    """An :class:`ITModel` written by :func:`write_it_model`, in eval mode on ``device``."""
    path = check_file("path", path)
    document = _read_metadata(path)
    described, readout_facts = document["backbone"], document["readout"]
    network = make_network(described["architecture"], num_classes=described["num_classes"], seed=None)
    backbone = make_backbone(
        network,
        source=described["source"],
        architecture=described["architecture"],
        layer=described["layer"],
        mean=tuple(described["mean"]),
        std=tuple(described["std"]),
        input_size=int(described.get("input_size", 0)),
    )
    readout = FactorizedReadout(
        readout_facts["n_sites"], tuple(readout_facts["in_shape"]), positive=readout_facts["positive"]
    )
    model = ITModel(backbone, readout, metadata=document)
    try:
        model.load_state_dict(load_file(path), strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{str(path)!r}: the weights do not match the architecture in its metadata: {error}") from None
    return model.to(resolve_device(device)).eval()


def _read_metadata(path: Path) -> dict:
    return read_sidecar_metadata(path, format_name=FORMAT, format_version=FORMAT_VERSION, what="IT-model",
                                 noun="model", fix="write models with write_it_model")
