"""Neural-network models: backbones and checkpoints, the factorized readout, the IT model, classifiers.

The public names below are imported on first use (PEP 562), so ``import models`` and
``from models.backbones import registered_backbones`` stay cheap (no torch import) for the
experiment config, which only validates backbone names.
"""

from __future__ import annotations

from closedloop.core.exports import make_lazy_exports

_EXPORTS = {
    "registered_backbones": "models.backbones",
    "load_backbone": "models.backbones",
    "Backbone": "models.networks",
    "FactorizedReadout": "models.readout",
    "ITModel": "models.it_model",
    "make_it_model": "models.it_model",
    "write_it_model": "models.it_model",
    "read_it_model": "models.it_model",
    "FitResult": "models.fitting",
    "fit_it_model": "models.fitting",
    "compute_pearson": "models.predictivity",
    "compute_split_half_reliability": "models.predictivity",
    "resolve_device": "models.devices",
    "Classifier": "models.classifiers",
    "make_classifier": "models.classifiers",
    "load_classifier": "models.classifiers",
    "write_classifier": "models.classifiers",
    "fit_classifier": "models.training",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = make_lazy_exports(__name__, _EXPORTS, globals())
