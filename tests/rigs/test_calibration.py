"""The calibrated twin: every number of the paper-vs-twin table stays in the paper's range, checked
on what the paper measured: attacks made by a model of the loop's class (the "class" block); the
white-box truth ("twin") is at least as sensitive (docs/riglink.md, "Calibration")."""

from __future__ import annotations

import json

import pytest

from closedloop.behavior.models import make_embedded_classifier
from closedloop.cli import main
from closedloop.config import DEMO_PAPER_SCALE, build_config, write_default_config
from rigs.calibration import PAPER_TARGETS, compute_twin_calibration, format_calibration
from rigs.sim import make_hidden_sites

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# The one calibrated number the embedded network family cannot give (docs/riglink.md): its
# standard network sees 56 px like the robust one and is no more sensitive.
_NOT_REACHABLE = {"sensitivity_position"}
# The quantities the twin is calibrated to: they must lie in the middle half of the paper's range,
# so that the test checks the calibration, not a number at the edge that a thread count can move.
_CALIBRATED = ("preferred_hz", "crossing_eps", "rate_eps10_hz")


@pytest.fixture(scope="module")
def networks(request) -> dict:
    """The demo's base model (the embedded robust resnet_tiny), trained once per machine into
    pytest's cache (1–4 min on one core the first time)."""
    cache = request.config.cache.mkdir("closedloop-embedded")
    return {"robust": str(make_embedded_classifier("robust", cache, device="cpu"))}


def _config(networks: dict, n_sites: int, paper_scale: float = DEMO_PAPER_SCALE, **sim):
    """The demo's sites and attacks (20 PGD steps, its k) on ``n_sites`` sites."""
    return build_config({"model": {"backbone": networks["robust"]}, "sites": {"n_sites": n_sites}, "rig": {"kind": "sim"},
                         "attack": {"steps": 20, "paper_scale": paper_scale}, "sim": sim})


def test_calibrated_twin_matches_the_paper(networks):
    """The README's table: 21 sites, 20 solver steps (the sites' sensitivities spread widely, so a
    handful of sites cannot check the mean: 6 sites at 10 steps crossed none)."""
    result = compute_twin_calibration(_config(networks, 21), n_steps=20, curves=False)  # the increase attacks suffice
    table = format_calibration(result)
    made, twin = result["class"], result["twin"]
    for block in (made, twin):
        assert set(PAPER_TARGETS) <= set(block) and {"crossing_eps", "rate_eps10_hz", "preferred_hz"} <= set(block)
    out_of_range = {name: made[name] for name, ok in result["in_range"].items() if not ok and name not in _NOT_REACHABLE}
    assert not out_of_range, f"outside the paper's range: {out_of_range}\n{table}"
    for name in _CALIBRATED:
        low, high = PAPER_TARGETS[name]["low"], PAPER_TARGETS[name]["high"]
        quarter = (high - low) / 4
        assert low + quarter <= made[name] <= high - quarter, f"{name} not in the middle half of [{low}, {high}]\n{table}"
    assert made["n_crossing"] > made["n_sites"] / 2, "most sites must reach their preferred-category mean by eps = 10"
    assert result["twin_at_least_class"], f"the white-box truth must be at least as sensitive as the class\n{table}"


def test_at_the_pixel_scale_the_embedded_class_does_not_cross_at_the_papers_eps(networks):
    """Why the demo needs k: at paper_scale 1 (pixel ε = the paper's ε) attacks made by the class
    reference do not bring the embedded family's sites to their preferred mean within the paper's
    range, while at the demo's k the same sites do (the test above)."""
    result = compute_twin_calibration(_config(networks, 4, paper_scale=1.0), n_steps=10, curves=False)
    made = result["class"]
    assert not result["in_range"]["crossing_eps"] and not result["in_range"]["rate_eps10_hz"], format_calibration(result)
    assert made["crossing_eps"] is None or made["crossing_eps"] > PAPER_TARGETS["crossing_eps"]["high"]


def test_nonrobust_share_is_checked(networks):
    with pytest.raises(ValueError, match="'sim.nonrobust_fraction' = 0.3: needs nonrobust_backbone"):
        build_config({"sim": {"nonrobust_fraction": 0.3, "nonrobust_backbone": ""}})
    with pytest.raises(ValueError, match=r"'nonrobust_fraction' must lie in \[0, 1\)"):
        make_hidden_sites(2, 0, backbone=networks["robust"], nonrobust_fraction=1.0)


def test_rig_sim_calibration_prints_the_table(networks, tmp_path, capsys):
    write_default_config(tmp_path, preset="demo", changes={"model": {"backbone": networks["robust"]}})
    main(["rig-sim", "--experiment", str(tmp_path), "--calibration", "--n-sites", "2", "--steps", "4", "--json"])
    result = json.loads(capsys.readouterr().out)
    for block in ("twin", "class"):
        assert {"crossing_eps", "crossing_eps_sd", "n_crossing", "rate_eps10_hz", "preferred_hz", "split_half_r"} <= set(
            result[block])
        assert result[block]["sensitivity_position"] is None  # no --standard
    assert result["settings"]["paper_scale"] == DEMO_PAPER_SCALE
    assert result["settings"]["pixel_budgets"] == pytest.approx([DEMO_PAPER_SCALE * eps for eps in (1, 2, 4, 6, 10)])
    main(["rig-sim", "--experiment", str(tmp_path), "--calibration", "--n-sites", "2", "--steps", "4"])
    text = capsys.readouterr().out
    assert "216 ± 60" in text and "crossing_eps" in text and "4.0 ± 1.6" in text
    assert "class" in text.splitlines()[0] and "twin" in text.splitlines()[0]
    assert f"pixel eps = {DEMO_PAPER_SCALE:g} x eps" in text
