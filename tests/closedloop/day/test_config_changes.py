"""A day's frozen config: changes that cannot touch finished work are accepted and recorded; a moved
experiment folder resumes."""

import json
from pathlib import Path

import pytest
import zarr

from closedloop.core.files import read_json
from closedloop.day.runner import run_day
from rigs.launch import RigLauncher
from tests.tiny_experiment import TINY


def _experiment(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiment.toml").write_text(TINY.format(time_scale=0.0) + extra)
    return folder


def _edit(experiment: Path, old: str, new: str) -> None:
    path = experiment / "experiment.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_change_read_only_by_stages_not_yet_run_is_accepted_and_recorded(tmp_path):
    experiment = _experiment(tmp_path / "exp")
    run_day(experiment, 0, until="plan", rig=RigLauncher())
    _edit(experiment, "epochs = 2", "epochs = 3")  # [fit]: read only by refit
    _edit(experiment, "fixation_break_rate = 0.2", "fixation_break_rate = 0.1")  # [sim]: present, estimate
    results = run_day(experiment, 0, until="plan", rig=RigLauncher())
    assert results["plan"]["skipped"]
    assert "epochs = 3" in (experiment / "day_000" / "config.toml").read_text()
    changes = read_json(experiment / "day_000" / "provenance.json")["config_changes"]
    assert len(changes) == 1 and changes[0]["time_utc"]
    assert changes[0]["changes"] == {
        "sim.fixation_break_rate": {"before": 0.2, "after": 0.1},
        "fit.epochs": {"before": 2, "after": 3},
    }
    assert not list(experiment.glob("day_000.replaced-*"))
    # the same config again: nothing more to record
    run_day(experiment, 0, until="plan", rig=RigLauncher())
    assert len(read_json(experiment / "day_000" / "provenance.json")["config_changes"]) == 1


def test_a_change_read_by_a_finished_or_begun_stage_is_refused(tmp_path):
    experiment = _experiment(tmp_path / "exp")
    run_day(experiment, 0, until="plan", rig=RigLauncher())
    _edit(experiment, "n_sites = 2", "n_sites = 3")  # [sites]: plan has used it
    with pytest.raises(ValueError, match=r"changed: sites.n_sites 2 -> 3\); plan already used these settings"):
        run_day(experiment, 0, until="plan", rig=RigLauncher())
    _edit(experiment, "n_sites = 3", "n_sites = 2")
    # a synthesize that began (and keeps its attacks made so far) fixes [model] too
    with (experiment / "day_000" / "log.jsonl").open("a") as log:
        log.write(json.dumps({"day": 0, "stage": "synthesize", "event": "start"}) + "\n")
    _edit(experiment, 'backbone = "resnet_tiny"', 'backbone = "resnet_tiny"\nreadout_positive = true')
    with pytest.raises(ValueError, match=r"model.readout_positive False -> True\); synthesize already used"):
        run_day(experiment, 0, until="plan", rig=RigLauncher())
    # rig link settings never change what a stage made
    _edit(experiment, "readout_positive = true", "")
    _edit(experiment, 'kind = "sim"', 'kind = "sim"\ntimeout_s = 9.0')
    run_day(experiment, 0, until="plan", rig=RigLauncher())
    assert "timeout_s = 9.0" in (experiment / "day_000" / "config.toml").read_text()


def test_a_moved_experiment_folder_resumes(tmp_path):
    sites = "site,array,electrode,unit,label\n0,0,1,-1,a\n1,0,2,-1,b\n"
    experiment = _experiment(tmp_path / "exp", "")
    (experiment / "sites.csv").write_text(sites)
    _edit(experiment, "n_sites = 2", 'n_sites = 2\nsite_map = "sites.csv"')
    run_day(experiment, 0, until="plan", rig=RigLauncher())
    frozen = (experiment / "day_000" / "config.toml").read_text()
    assert str(experiment) not in frozen and 'site_map = "../sites.csv"' in frozen
    moved = experiment.rename(tmp_path / "moved")
    results = run_day(moved, 0, until="plan", rig=RigLauncher())
    assert results["plan"]["skipped"]
    assert (moved / "day_000" / "config.toml").read_text() == frozen


def test_a_day_frozen_before_the_step_rules_existed_resumes_and_a_new_rule_is_refused(tmp_path):
    """An operator upgrading mid-day: a frozen config.toml without [attack] step_rule and [sim]
    truth_step_rule reads as the paper's rules (what made the day), so the day resumes; switching
    the attacks to APGD after they were made is refused like any other change to finished work."""
    experiment = _experiment(tmp_path / "exp")
    run_day(experiment, 0, until="plan", rig=RigLauncher())
    frozen = experiment / "day_000" / "config.toml"
    lines = frozen.read_text().splitlines()
    assert any(line.startswith("step_rule") for line in lines) and any(line.startswith("truth_step_rule") for line in lines)
    frozen.write_text("\n".join(line for line in lines if not line.startswith(("step_rule", "truth_step_rule"))) + "\n")
    results = run_day(experiment, 0, until="plan", rig=RigLauncher())
    assert results["plan"]["skipped"]
    assert "config_changes" not in read_json(experiment / "day_000" / "provenance.json")
    _edit(experiment, "steps = 3", 'steps = 3\nstep_rule = "apgd"')
    with pytest.raises(ValueError, match=r"attack.step_rule 'pgd' -> 'apgd'\); plan already used these settings"):
        run_day(experiment, 0, until="plan", rig=RigLauncher())


def test_the_attack_settings_reach_the_days_site_attacks(tmp_path, tiny_sim_experiment, monkeypatch):
    """``[attack] step_rule`` and ``choose_direction_at`` go to every part's make_site_attacks, and the
    stored attacks are still one per job with a direction each (the call is recorded, then made)."""
    import closedloop.day.synthesize as synthesize

    experiment = tiny_sim_experiment(tmp_path / "experiment")
    _edit(experiment, "steps = 3", 'steps = 6\nstep_rule = "apgd"\nchoose_direction_at = 2')
    calls = []

    def recorded(*arguments, **options):
        calls.append(options)
        return make_site_attacks(*arguments, **options)

    make_site_attacks = synthesize.make_site_attacks
    monkeypatch.setattr(synthesize, "make_site_attacks", recorded)
    run_day(experiment, 0, until="synthesize")
    assert calls and all(c["step_rule"] == "apgd" and c["choose_direction_at"] == 2 and c["n_steps"] == 6 for c in calls)
    stimuli = zarr.open_group(str(experiment / "day_000" / "store.zarr"), mode="r")["stimuli"]
    attack = stimuli["kind"][:] == "attack"
    assert attack.sum() == 2 * 2 * 2 and set(stimuli["direction"][:][attack].tolist()) <= {1, -1}
