import numpy as np
import pytest

from closedloop.core.files import write_json
from closedloop.data.layout import day_folder
from closedloop.demos.loop import _render, compute_demo_summary


def _record(site, eps, kind, estimate, sem, truth=None, expected=None, right=None):
    return {"site": site, "eps": eps, "eps_paper": eps / 4, "kind": kind, "n_images": 4, "estimate": estimate, "sem": sem, "sigma": 3.0,
            "normalized": estimate / 3.0, "truth": truth, "expected": expected, "direction_right": right}


def _write_days(tmp_path, attack_by_day):
    for day, (site0, site1) in enumerate(attack_by_day):
        records = [
            _record(0, 1.0, "attack", site0, 0.3, truth=2.0, expected=site0, right=0.75),
            _record(1, 1.0, "attack", site1, 0.4, truth=2.5, expected=site1 - 0.1, right=0.5),
            _record(0, 1.0, "gaussian", 0.1, 0.2), _record(1, 1.0, "gaussian", -0.1, 0.2),
            _record(0, 1.0, "interpolation", 0.0, 0.2), _record(1, 1.0, "interpolation", 3.0, 0.2),
        ]
        folder = day_folder(tmp_path, day)
        folder.mkdir(parents=True)
        write_json(folder / "sensitivity.json", records)


def test_demo_summary_averages_over_sites_with_their_standard_errors(tmp_path):
    _write_days(tmp_path, [(0.2, 0.0), (0.5, 1.0), (1.0, 3.5)])
    summary = compute_demo_summary(tmp_path, 3)
    day2 = summary["by_day"][2]["attack"]["1.0"]
    assert day2["estimate"] == pytest.approx(2.25) and day2["sem"] == pytest.approx(np.sqrt(0.3**2 + 0.4**2) / 2)
    assert day2["expected"] == pytest.approx(2.2) and day2["direction_right"] == pytest.approx(0.625)
    assert day2["truth"] == pytest.approx(2.25)
    growth = summary["growth"]["1.0"]
    assert (growth["first_day"], growth["last_day"]) == (1, 2)
    assert (growth["first"]["estimate"], growth["last"]["estimate"]) == pytest.approx((0.75, 2.25))
    # pooled over days 1..2: attack 1.5 beats gaussian 0 but not interpolation 1.5
    beats = summary["attack_beats_baselines"]["1.0"]
    assert beats["attack_beats_all"] is False and beats["significant"] is False
    # s.e. of a mean over 4 site × day records: sqrt(Σ sem²) / 4
    assert beats["sems"]["attack"] == pytest.approx(np.sqrt(2 * (0.3**2 + 0.4**2)) / 4)
    assert beats["sems"]["gaussian"] == pytest.approx(0.1)
    assert beats["difference_in_se"]["gaussian"] == pytest.approx(1.5 / np.hypot(beats["sems"]["attack"], 0.1))
    assert beats["difference_in_se"]["interpolation"] == pytest.approx(0.0)
    assert summary["smallest_last_day"] == {"eps": 1.0, "day": 2, "estimate": pytest.approx(2.25),
                                            "sem": pytest.approx(0.25), "above_zero_in_se": pytest.approx(9.0),
                                            "significant": True}
    # site 1 on day 2: 3.5 > 2.5 + 2 × 0.4 → the one estimate above its truth beyond 2 s.e.
    assert summary["lower_bound"] == {"n_records": 6, "n_at_or_below_truth": 5, "n_above_truth_beyond_2_se": 1}
    # the claims: the interpolation ties the attack; noise-free 0.7 -> 2.2 grows; 1 of 6 records is 17% > 5%
    assert summary["claims"] == {"attacks_beat_baselines": False, "smallest_budget_above_zero": True,
                                 "noise_free_bound_grows": True, "valid_bound": False}
    assert summary["eps_paper"] == {"1.0": 0.25}
    text = _render(summary | {"report": "r.html", "threads": 2, "probe_seconds": {"evolve": 3.0}}, 12.0, tmp_path)
    assert "eps=1" in text and "eps_paper=0.25" in text
    assert "  the noise-free bound growing from the first refitted day to the last at every budget: met" in text
    assert "  no more than 5% of the estimates above truth + 2 s.e.: NOT MET" in text
    assert "right direction" in text and "62%" in text and "torch threads: 2" in text
    assert "attack 1.50 ± 0.18, gaussian 0.00 ± 0.10, interpolation 1.50 ± 0.10 -> attack above gaussian by 7.4 s.e., " \
           "interpolation by 0.0 s.e.; beyond 2 s.e.: NO" in text
    assert "bound at the smallest budget on the last day: eps=1 day 2 2.25 ± 0.25, 9.0 s.e. above zero: yes" in text
    assert "probes for the report: evolve 3 s" in text
    assert "day 1 0.75 ± 0.25 -> day 2 2.25 ± 0.25" in text


def test_ceiling_summary_is_json_even_when_no_site_has_a_response_sd(tmp_path):
    """A site whose clean responses give no σ (fewer than 2 valid) has no normalised ceiling; the
    summary must stay writable JSON (validation.json refuses NaN at the end of a campaign)."""
    from closedloop.demos.loop import _summarise_ceiling, format_ceiling

    rows = [{**_record(s, 1.0, "attack", 0.2, 0.1, truth=2.0, expected=0.1), "sigma": None} for s in (0, 1)]
    rows.append({**_record(0, 4.0, "attack", 0.6, 0.1, truth=6.0, expected=0.5), "sigma": 2.0})
    summary = _summarise_ceiling(rows, {(0, 1.0): 0.3, (1, 1.0): 0.5, (0, 4.0): 1.0})
    assert summary["1.0"] == {"noise_free": 0.1, "ceiling": 0.4, "truth": 2.0, "ceiling_normalized": None}
    assert summary["4.0"]["ceiling_normalized"] == 0.5
    write_json(tmp_path / "summary.json", summary)
    assert "eps=1.0: 0.10 / 0.40 / 2.00" in format_ceiling(summary, 3)
