"""The calibrated twin: every number of the paper-vs-twin table, measured by white-box attacks on
the twin, stays in the paper's range (docs/riglink.md, "Calibration")."""

from __future__ import annotations

import json

import pytest

from closedloop.behavior.models import make_embedded_classifier
from closedloop.cli import main
from closedloop.config import build_config, write_default_config
from rigs.calibration import PAPER_TARGETS, compute_twin_calibration, format_calibration
from rigs.sim import make_hidden_sites

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# The one calibrated number the embedded network family cannot give (docs/riglink.md): its
# standard network sees 56 px like the robust one and is no more sensitive.
_NOT_REACHABLE = {"sensitivity_position"}


@pytest.fixture(scope="module")
def networks(request) -> dict:
    """The demo's base model (the embedded robust resnet_tiny), trained once per machine into
    pytest's cache (2–4 min on one core the first time)."""
    cache = request.config.cache.mkdir("closedloop-embedded")
    return {"robust": str(make_embedded_classifier("robust", cache, device="cpu"))}


def _config(networks: dict, n_sites: int, **sim):
    return build_config({"model": {"backbone": networks["robust"]}, "sites": {"n_sites": n_sites}, "rig": {"kind": "sim"},
                         "sim": sim})


def test_calibrated_twin_matches_the_paper(networks):
    """The README's table: 21 sites, 20 solver steps (the sites' sensitivities spread widely, so a
    handful of sites cannot check the mean: 6 sites at 10 steps crossed none)."""
    result = compute_twin_calibration(_config(networks, 21), n_steps=20, curves=False)  # the increase attacks suffice
    twin = result["twin"]
    assert set(PAPER_TARGETS) <= set(twin) and {"crossing_eps", "rate_eps10_hz", "preferred_hz"} <= set(twin)
    out_of_range = {name: twin[name] for name, ok in result["in_range"].items() if not ok and name not in _NOT_REACHABLE}
    assert not out_of_range, f"outside the paper's range: {out_of_range}\n{format_calibration(result)}"
    assert twin["n_crossing"] > twin["n_sites"] / 2, "most sites must reach their preferred-category mean by eps = 10"


def test_without_the_nonrobust_share_the_sites_are_as_robust_as_the_base(networks):
    """The knob matters: with nonrobust_fraction = 0 no site reaches its preferred mean near ε = 4."""
    robust = compute_twin_calibration(_config(networks, 4, nonrobust_fraction=0.0), n_steps=10)
    assert not robust["in_range"]["crossing_eps"] and not robust["in_range"]["rate_eps10_hz"]


def test_nonrobust_share_is_checked(networks):
    with pytest.raises(ValueError, match="'sim.nonrobust_fraction' = 0.3: needs nonrobust_backbone"):
        build_config({"sim": {"nonrobust_fraction": 0.3, "nonrobust_backbone": ""}})
    with pytest.raises(ValueError, match=r"'nonrobust_fraction' must lie in \[0, 1\)"):
        make_hidden_sites(2, 0, backbone=networks["robust"], nonrobust_fraction=1.0)


def test_rig_sim_calibration_prints_the_table(networks, tmp_path, capsys):
    write_default_config(tmp_path, preset="demo", changes={"model": {"backbone": networks["robust"]}})
    main(["rig-sim", "--experiment", str(tmp_path), "--calibration", "--n-sites", "2", "--steps", "4", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert {"crossing_eps", "rate_eps10_hz", "preferred_hz", "split_half_r"} <= set(result["twin"])
    assert result["twin"]["sensitivity_position"] is None  # no --standard
    main(["rig-sim", "--experiment", str(tmp_path), "--calibration", "--n-sites", "2", "--steps", "4"])
    text = capsys.readouterr().out
    assert "216 ± 60" in text and "crossing_eps" in text and "4.0 ± 1.6" in text
