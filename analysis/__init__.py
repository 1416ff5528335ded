"""Offline analyses and reports: they read an experiment's artifacts and never run a rig.

Public names are imported on first use (PEP 562); one module per analysis (docs/report.md).
"""

from __future__ import annotations

from closedloop.core.exports import make_lazy_exports

_EXPORTS = {
    "read_experiment": "analysis.experiment",
    "read_experiment_day": "analysis.experiment",
    "write_report": "analysis.report",
    "write_selection_report": "analysis.report",
    "write_day_report": "analysis.day_report",
    "compute_sensitivity_curves": "analysis.sensitivity_curves",
    "compute_image_curves": "analysis.image_curves",
    "compute_progress": "analysis.progress",
    "compute_category_preference": "analysis.categories",
    "compute_network_sensitivity": "analysis.network_units",
    "compute_model_quality": "analysis.model_quality",
    "compute_base_selection": "analysis.base_selection",
    "SiteCriteria": "analysis.site_selection",
    "compute_site_metrics": "analysis.site_selection",
    "compute_site_selection": "analysis.site_selection",
    "write_site_selection": "analysis.site_selection",
    "compute_truth_comparison": "analysis.ground_truth",
    "read_behavior_data": "analysis.behavior",
    "write_behavior_report": "analysis.behavior_report",
    "write_synthetic_day": "analysis.synthetic",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = make_lazy_exports(__name__, _EXPORTS, globals())
