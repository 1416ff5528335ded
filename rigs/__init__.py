"""Rig-side programs: the rig agent, the simulated IT rig (the digital twin), its truth and its
calibration against the paper, the Blackrock ``.nev`` writer, and the launcher that starts the
simulated rig for a day.

Used by entry points and validation only (docs/architecture.md). Public names are imported on
first use (PEP 562).
"""

from __future__ import annotations

from closedloop.core.exports import make_lazy_exports

_EXPORTS = {
    "RigAgent": "rigs.agent",
    "Outcome": "rigs.agent",
    "StreamFaults": "rigs.agent",
    "HiddenSites": "rigs.sim",
    "make_hidden_sites": "rigs.sim",
    "make_sim_agent": "rigs.sim",
    "run_sim_rig": "rigs.sim",
    "compute_sim_rig_options": "rigs.sim",
    "compute_site_gains": "rigs.sim",
    "compute_sim_truth": "rigs.truth",
    "compute_driven_sites": "rigs.truth",
    "compute_twin_calibration": "rigs.calibration",
    "RigLauncher": "rigs.launch",
    "open_sim_rig": "rigs.launch",
    "write_nev": "rigs.nev",
    "write_nsx": "rigs.nev",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = make_lazy_exports(__name__, _EXPORTS, globals())
