"""The validation campaign's four targets, checked on planted sensitivity records."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from closedloop.core.files import write_json
from closedloop.data.layout import day_folder
from closedloop.demos.loop import compute_demo_summary
from closedloop.demos.validate import compute_fig1a_position, compute_validation_targets, format_validation


def _record(site, eps, kind, estimate, sem, truth=None, expected=None):
    return {"site": site, "eps": eps, "eps_paper": eps / 2, "kind": kind, "n_images": 42, "estimate": estimate, "sem": sem, "sigma": 2.0,
            "normalized": estimate / 2.0, "truth": truth, "expected": expected, "direction_right": 0.9}


def _write_days(tmp_path, attack_by_day, *, baseline=0.1, truth=9.0, expected_offset=0.0):
    """Two sites, ε = 1 and 10; ``attack_by_day``: each day's attack estimate at ε = 1 (ε = 10: 4 ×)."""
    records_by_day = {}
    for day, value in enumerate(attack_by_day):
        records = []
        for site in (0, 1):
            for eps, scale in ((1.0, 1.0), (10.0, 4.0)):
                records.append(_record(site, eps, "attack", scale * value, 0.1, truth=scale * truth,
                                       expected=scale * value + expected_offset))
                records += [_record(site, eps, kind, baseline, 0.1) for kind in ("gaussian", "interpolation")]
        folder = day_folder(tmp_path, day)
        folder.mkdir(parents=True)
        write_json(folder / "sensitivity.json", records)
        records_by_day[day] = records
    return compute_demo_summary(tmp_path, len(attack_by_day)), records_by_day


def _categories(super_flags):
    crossing = [{"site": s, "crossing_eps": 4.0 if flag else None, "max_eps": 10.0, "rate_at_max_eps_hz": 300.0,
                 "preferred_rate_hz": 200.0, "preferred_sd_hz": 50.0, "super_stimulus": flag}
                for s, flag in enumerate(super_flags)]
    return {"crossing": crossing, "summary": [{"n_sites": len(crossing), "n_crossing": sum(super_flags)}]}


def test_every_target_met_on_a_run_that_meets_them(tmp_path):
    summary, records = _write_days(tmp_path, [0.0, 0.5, 0.8, 1.2])
    targets = compute_validation_targets(summary, _categories([True, True, False]), records)
    assert targets["lower_bound"]["met"] and targets["lower_bound"]["n_records"] == 16
    growth = targets["growth"]
    assert (growth["eps"], growth["first_day"], growth["last_day"]) == (1.0, 1, 3)
    assert growth["fold_change"] == pytest.approx(2.4)
    # s.e. of each day's mean over 2 sites = sqrt(2 × 0.1²) / 2; difference 0.7 over sqrt(2) × that
    assert growth["difference_in_se"] == pytest.approx(0.7 / (0.1 / 2**0.5 * 2**0.5)) and growth["met"]
    assert targets["attacks_beat_baselines"]["met"] and targets["attacks_beat_baselines"]["by_eps"]["1.0"]["ratios"] == {
        "gaussian": pytest.approx(12.0), "interpolation": pytest.approx(12.0)}
    assert targets["super_stimuli"]["n_super_stimulus"] == 2 and targets["super_stimuli"]["met"]
    assert targets["super_stimuli"]["eps"] == 10.0  # the largest budget
    targets["fig1a"] = compute_fig1a_position([{"eps": 1.0, "mean": 0.2}], [
        {"network": "robust", "eps": 1.0, "mean": 0.1}, {"network": "vanilla", "eps": 1.0, "mean": 1.0}], "robust", "vanilla")
    result = {"targets": targets, "figures": {"fig1a": "f.png"}, "report": "r.html", "eps_paper": summary["eps_paper"],
              "seconds": {"total": 10.0, "days": [4.0, 6.0]}}
    text = format_validation(result)
    assert "growth at eps=1 (paper 0.5): day 1 0.50 ± 0.07 -> day 3 1.20 ± 0.07" in text and "NOT met" not in text
    assert "super-stimuli at eps=10 (paper 5) on the last day: 2 of 3 sites -> met" in text
    assert "Fig. 1A: the last day's bound between the robust (0) and vanilla (1) units: position 0.30" in text


def test_each_target_fails_when_its_condition_fails(tmp_path):
    summary, records = _write_days(tmp_path, [0.0, 0.5, 0.6, 0.7], baseline=0.3, truth=0.55, expected_offset=0.01)
    targets = compute_validation_targets(summary, _categories([True, False, False]), records)
    bound = targets["lower_bound"]
    assert not bound["met"] and bound["n_noise_free_above_truth"] > 0 and bound["fraction_above"] > 0.05
    assert not targets["growth"]["met"] and targets["growth"]["fold_change"] == pytest.approx(1.4)
    assert not targets["attacks_beat_baselines"]["by_eps"]["1.0"]["met"]  # 0.7 < 3 × 0.3
    assert targets["attacks_beat_baselines"]["by_eps"]["10.0"]["met"]  # 2.8 ≥ 0.9
    assert not targets["attacks_beat_baselines"]["met"] and not targets["super_stimuli"]["met"]
    targets["fig1a"] = compute_fig1a_position([{"eps": 1.0, "mean": 0.9}], [
        {"network": "robust", "eps": 1.0, "mean": 0.1}, {"network": "vanilla", "eps": 1.0, "mean": 1.0}], "robust", "vanilla")
    text = format_validation({"targets": targets, "figures": {}, "report": "r.html", "seconds": {"total": 1.0, "days": [1.0]}})
    assert text.count("NOT met") == 5


def test_fig1a_position_is_log_scale_between_the_networks_and_undefined_where_they_agree():
    units = [{"network": "at", "eps": 1.0, "mean": 0.1}, {"network": "std", "eps": 1.0, "mean": 1.0},
             {"network": "at", "eps": 4.0, "mean": 0.4}, {"network": "std", "eps": 4.0, "mean": 0.4}]
    result = compute_fig1a_position([{"eps": 1.0, "mean": 10 ** -0.5}, {"eps": 4.0, "mean": 0.5}], units, "at", "std")
    assert result["by_eps"]["1"]["position"] == pytest.approx(0.5) and result["by_eps"]["4"]["position"] is None
    assert result["position"] == pytest.approx(0.5) and result["met"]
    below = compute_fig1a_position([{"eps": 1.0, "mean": 0.05}], units, "at", "std")  # less sensitive than the AT units
    assert below["position"] == pytest.approx(-np.log10(2)) and not below["met"]
    assert compute_fig1a_position([{"eps": 4.0, "mean": 0.5}], units, "at", "std") == {
        "by_eps": {"4": {"bound": 0.5, "robust": 0.4, "standard": 0.4, "position": None}}, "position": None, "met": False}


def test_resume_refuses_another_campaign_naming_each_key(tmp_path):
    """--resume continues only the campaign it would start: a different site count or step count is refused."""
    from closedloop.config import write_default_config
    from closedloop.demos.validate import VALIDATE_SETTINGS, _check_resumable

    settings = {section: dict(values) for section, values in VALIDATE_SETTINGS.items()}
    write_default_config(tmp_path, preset="demo", changes=settings)
    _check_resumable(tmp_path, settings)  # the same campaign: resumable
    other = {**settings, "sites": {"n_sites": 4}, "attack": {**settings["attack"], "steps": 5}}
    with pytest.raises(ValueError, match=r"sites.n_sites = 21 \(this campaign: 4\); attack.steps = 20 \(this campaign: 5\)"):
        _check_resumable(tmp_path, other)


@pytest.mark.timeout(60)
def test_resume_of_a_malformed_experiment_fails_before_any_training(tmp_path):
    """A broken experiment.toml is an error in seconds, not after minutes of training the networks."""
    from closedloop.demos.validate import run_validation

    out = tmp_path / "validate"
    out.mkdir()
    (out / "experiment.toml").write_text("not = [toml")
    with pytest.raises(ValueError, match="experiment.toml"):
        run_validation(out, resume=True, cache=tmp_path / "empty-cache")
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.slow
def test_the_analysis_runs_on_a_campaign_whose_last_day_stopped_after_its_estimate(tmp_path, tiny_sim_experiment):
    """What run_validation does after its days, on a tiny two-day campaign run the same way (the
    last day without its refit and day report): targets, class ceiling, figures, report."""
    from closedloop.day.runner import run_day
    from closedloop.demos.validate import analyse_validation
    from rigs.launch import RigLauncher

    tiny_sim_experiment(tmp_path)
    run_day(tmp_path, 0, rig=RigLauncher())
    run_day(tmp_path, 1, rig=RigLauncher(), until="estimate")
    assert not (day_folder(tmp_path, 1) / "model.safetensors").exists()
    result = analyse_validation(tmp_path, 2, "resnet_tiny")
    assert set(result["targets"]) == {"lower_bound", "growth", "attacks_beat_baselines", "super_stimuli", "fig1a"}
    # the tiny experiment's base is a random resnet_tiny, the standard network too: no interval to place the bound in
    assert result["targets"]["fig1a"]["position"] is None and not result["targets"]["fig1a"]["met"]
    assert result["targets"]["lower_bound"]["n_records"] == 2 * 2 * 2  # sites × budgets × days
    assert list(result["class_ceiling"]) == ["2.0", "6.0"]
    assert all((tmp_path / "validation_figures" / f"{name}.png").stat().st_size > 0 for name in ("fig1a", "fig5", "fig2c"))
    assert result["report"].endswith("report.html") and len(result["seconds"]["days"]) == 2
    assert "model class on day 1" in format_validation({**result, "seconds": {**result["seconds"], "wall": 0.0}})


def test_a_second_campaign_on_the_same_folder_is_refused_and_deletes_nothing(tmp_path):
    """Two `closedloop validate --out X` at once: without --resume the second would start afresh,
    deleting the running campaign's days. It is refused at once, naming the holder, before any
    training, and the folder is left as it was."""
    from closedloop.core.lock import LockedError
    from closedloop.demos.validate import run_validation

    out = tmp_path / "validate"
    (out / "day_000").mkdir(parents=True)
    (out / "experiment.toml").write_text("")
    (out / "day_000" / "sensitivity.json").write_text("[]")
    # the running campaign: another process holding the folder's lock (this process's own holds nest)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from closedloop.core.lock import hold_lock\n"
                               "with hold_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
                               str(tmp_path / "validate.lock")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in (False, True):
            with pytest.raises(LockedError, match=f"is being run by another process \\(pid {holder.pid} "):
                run_validation(out, resume=resume, cache=tmp_path / "empty-cache")
    finally:
        holder.kill()
        holder.wait()
    assert (out / "day_000" / "sensitivity.json").read_text() == "[]"
    assert not (tmp_path / "empty-cache").exists()
