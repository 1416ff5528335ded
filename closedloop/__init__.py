"""closedloop: closed-loop adversarial control of macaque IT sites (docs/architecture.md).

The public names below are imported on first use (PEP 562), as in :mod:`models`, so that
``import closedloop`` and the CLI start without torch. Subpackages: ``closedloop.day`` (the day
loop and its stages), ``closedloop.data`` (day folder, store, bundle, recordings),
``closedloop.attacks``, ``closedloop.link`` (the rig link), ``closedloop.sensitivity``,
``closedloop.behavior``, ``closedloop.probes``, ``closedloop.demos``, ``closedloop.core`` (helpers).
"""

from __future__ import annotations

from closedloop.core.exports import make_lazy_exports

_EXPORTS = {
    "ExperimentConfig": "closedloop.config",
    "read_config": "closedloop.config",
    "write_default_config": "closedloop.config",
    "run_day": "closedloop.day.runner",
    "read_status": "closedloop.day.status",
    "day_folder": "closedloop.data.layout",
    "DayStore": "closedloop.data.store",
    "create_store": "closedloop.data.store",
    "open_store": "closedloop.data.store",
    "read_bundle": "closedloop.data.bundle",
    "write_bundle": "closedloop.data.bundle",
    "read_nev": "closedloop.data.nev",
    "read_photodiode": "closedloop.data.photodiode",
    "write_day_counts": "closedloop.data.reconcile",
    "compute_sensitivity": "closedloop.sensitivity.estimator",
    "read_day_responses": "closedloop.sensitivity.responses",
    "compute_pgd": "closedloop.attacks.engine",
    "compute_predictions": "closedloop.attacks.engine",
    "make_site_attacks": "closedloop.attacks.sites",
    "make_classifier_attacks": "closedloop.attacks.classifiers",
    "RigAccess": "closedloop.link.access",
    "RigClient": "closedloop.link.client",
    "make_rig_client": "closedloop.link.client",
    "make_keys": "closedloop.link.keys",
    "read_image_source": "closedloop.images",
    "run_demo": "closedloop.demos.loop",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = make_lazy_exports(__name__, _EXPORTS, globals())
