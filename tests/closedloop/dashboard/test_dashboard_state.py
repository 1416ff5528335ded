"""What the dashboard reads from an experiment folder: missing, half-written, running and finished
days give states, never errors."""

import json
import os
import socket
import time
from pathlib import Path

import pytest

from closedloop.config import DashboardSection
from closedloop.core.files import write_json
from closedloop.dashboard.state import ExperimentView
from closedloop.data import layout
from closedloop.day.runner import run_day
from rigs.launch import RigLauncher
from tests.tiny_experiment import TINY

THRESHOLDS = DashboardSection(silent_presentations=10)


def _stages(snapshot) -> dict:
    return {entry["name"]: entry["state"] for entry in snapshot["current"]["stages"]}


def _event(stage=None, **event) -> str:
    return json.dumps({"time_utc": "2026-12-05T10:00:00Z", "day": 0, **({"stage": stage} if stage else {}), **event}) + "\n"


def _hold(experiment: Path, pid: int) -> None:
    """A day lock naming ``pid`` on this host, as a running fit-day leaves it."""
    layout.day_lock_path(experiment, 0).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


@pytest.fixture
def begun_day(tmp_path) -> Path:
    """An experiment whose day 0 has done plan and begun synthesize; its log's last line cut short."""
    experiment = tmp_path / "exp"
    folder = layout.day_folder(experiment, 0)
    folder.mkdir(parents=True)
    write_json(layout.marker_path(folder, "plan"), {"stage": "plan", "seconds": 1.5, "summary": {}})
    (folder / layout.LOG).write_text(_event("plan", event="start") + _event("plan", event="done", seconds=1.5)
                                     + _event("synthesize", event="start") + '{"time_utc": "2026-12-05T10:00:01Z", "da')
    return experiment


def test_an_experiment_folder_that_does_not_exist_yet_is_a_state(tmp_path):
    snapshot = ExperimentView(tmp_path / "not yet", THRESHOLDS).snapshot()
    assert snapshot["current"] is None and snapshot["days"] == []
    assert "does not exist" in snapshot["problems"][0]
    json.dumps(snapshot, allow_nan=False)


def test_a_day_whose_process_is_gone_shows_its_stage_interrupted(begun_day):
    _hold(begun_day, 2**22 + 12345)  # a pid no process has: the holder died without releasing
    snapshot = ExperimentView(begun_day, THRESHOLDS).snapshot()
    assert snapshot["current"]["state"] == "stopped"
    assert _stages(snapshot) == {"plan": "done", "synthesize": "interrupted", **dict.fromkeys(layout.STAGES[2:], "pending")}
    assert snapshot["current"]["stages"][0]["seconds"] == 1.5
    assert snapshot["problems"] == []


def test_a_running_day_is_followed_as_its_log_grows_and_a_half_written_live_file_is_a_problem_not_an_error(begun_day):
    _hold(begun_day, os.getpid())
    view = ExperimentView(begun_day, THRESHOLDS)
    snapshot = view.snapshot()
    assert snapshot["current"]["state"] == "running" and snapshot["current"]["stage"] == "synthesize"
    assert _stages(snapshot)["synthesize"] == "running" and snapshot["current"]["eta_s"] is None  # no earlier day to go by
    folder = layout.day_folder(begun_day, 0)
    with (folder / layout.LOG).open("a") as log:  # the cut line is finished, a warning follows
        log.write('y": 0, "event": "note"}\n' + _event(event="warning", message="the rig is slow"))
    (folder / layout.LIVE).write_text('{"format": "closedloop.pres')
    snapshot = view.snapshot()
    assert [w["message"] for w in snapshot["warnings"]] == ["the rig is slow"]
    assert snapshot["present"] is None
    assert any("live.json" in problem for problem in snapshot["problems"])


def test_the_alarms_raised_and_not_cleared_show_while_the_present_stage_runs(begun_day):
    _hold(begun_day, os.getpid())
    folder = layout.day_folder(begun_day, 0)
    for stage in ("synthesize", "bundle"):
        write_json(layout.marker_path(folder, stage), {"stage": stage, "seconds": 2.0, "summary": {}})
    silent = {"event": "alarm", "kind": "silent_site", "site": 1, "message": "site 1 (e2) silent"}
    with (folder / layout.LOG).open("a") as log:
        log.write("\n" + _event("present", event="start") + _event(state="raised", **silent)
                  + _event(state="raised", **{**silent, "kind": "disk_low", "site": None, "message": "disk"}))
    view = ExperimentView(begun_day, THRESHOLDS)
    assert [(a["kind"], a["site"]) for a in view.snapshot()["alarms"]] == [("silent_site", 1), ("disk_low", None)]
    with (folder / layout.LOG).open("a") as log:
        log.write(_event(state="cleared", **silent))
    snapshot = view.snapshot()
    assert [a["kind"] for a in snapshot["alarms"]] == ["disk_low"]
    assert "ALARM site 1 (e2) silent" in [w["message"] for w in snapshot["warnings"]]


@pytest.mark.slow
def test_a_finished_day_shows_every_stage_done_its_sites_and_its_sensitivity_curve(tmp_path):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "experiment.toml").write_text(TINY.format(time_scale=0.0).replace(
        "fixation_break_rate = 0.2", "fixation_break_rate = 0.2\nsilent_sites = [1]\nsilent_after = 0"))
    view = ExperimentView(experiment, THRESHOLDS)
    assert view.snapshot()["current"] is None
    run_day(experiment, 0, rig=RigLauncher())
    snapshot = view.snapshot()
    assert snapshot["current"]["state"] == "finished" and snapshot["days"] == [{"day": 0, "state": "finished"}]
    assert set(_stages(snapshot).values()) == {"done"} and snapshot["current"]["eta_s"] == 0
    assert snapshot["present"]["live"] is False and snapshot["present"]["presentations"] > snapshot["present"]["valid"] > 0
    sites = snapshot["sites"]
    assert sites["labels"] == ["e1", "e2"] and sites["recent_rate_hz"][1] == 0.0 < sites["recent_rate_hz"][0]
    assert len(sites["strip"]["rates_hz"]) == 2 and sites["day0_reliability"] is not None
    assert snapshot["lacking"] == {"n": 0, "repetitions": 2, "stimuli": []}
    [curve] = snapshot["history"]
    assert curve["day"] == 0 and curve["eps_paper"] == [2.0, 6.0] and all(v is not None for v in curve["attack"])
    assert snapshot["problems"] == []
    json.dumps(snapshot, allow_nan=False)


def test_a_day_started_over_under_the_same_name_is_read_afresh(begun_day):
    """`fit-day --force` sets the old folder aside and begins a new one: nothing of the old one shows."""
    view = ExperimentView(begun_day, THRESHOLDS)
    assert _stages(view.snapshot())["plan"] == "done"
    folder = layout.day_folder(begun_day, 0)
    folder.rename(folder.with_name("day_000.replaced-20261205T100000"))
    folder.mkdir()
    (folder / layout.LOG).write_text(_event("plan", event="start"))
    snapshot = view.snapshot()
    assert _stages(snapshot) == {"plan": "interrupted", **dict.fromkeys(layout.STAGES[1:], "pending")}
    assert snapshot["days"] == [{"day": 0, "state": "stopped"}]


def test_a_fit_day_killed_in_present_and_run_again_is_stopped_then_running_with_a_fresh_session(begun_day):
    folder = layout.day_folder(begun_day, 0)
    for stage in ("synthesize", "bundle"):
        write_json(layout.marker_path(folder, stage), {"stage": stage, "seconds": 2.0, "summary": {}})
    with (folder / layout.LOG).open("a") as log:
        log.write("\n" + _event("present", event="start")
                  + _event(event="alarm", state="raised", kind="rig_silent", site=None, message="rig silent"))
    write_json(folder / layout.LIVE, {"format": "closedloop.present_live", "live": True, "updated_unix": 1.0,
                                      "presentations": 40, "valid": 30, "target_valid": 60})
    _hold(begun_day, 2**22 + 12345)  # killed: its lock names a process that is gone
    view = ExperimentView(begun_day, THRESHOLDS)
    snapshot = view.snapshot()
    assert snapshot["current"]["state"] == "stopped" and _stages(snapshot)["present"] == "interrupted"
    assert snapshot["present"]["stale"] is True and snapshot["present"]["live"] is False
    assert snapshot["alarms"] == [], "the alarms of a session that is gone are not shown"
    _hold(begun_day, os.getpid())  # run again: a new process holds the day and begins present anew
    with (folder / layout.LOG).open("a") as log:
        log.write(_event("present", event="start"))
    write_json(folder / layout.LIVE, {"format": "closedloop.present_live", "live": True, "updated_unix": time.time(),
                                      "presentations": 41, "valid": 31, "target_valid": 60})
    snapshot = view.snapshot()
    assert snapshot["current"]["state"] == "running" and _stages(snapshot)["present"] == "running"
    assert snapshot["present"]["live"] is True and snapshot["present"]["presentations"] == 41
    assert snapshot["alarms"] == []


DAMAGE = {
    "config.toml": ("config.toml", 'n_sites = "two"\n'),
    "live.json as a list": ("live.json", "[1, 2]"),
    "live.json with wrong types": ("live.json", '{"format": "closedloop.present_live", "updated_unix": "abc", "live": true, '
                                                '"presentations": NaN, "history": [[1, 2], "x", [1, 2, "3", null]]}'),
    "a marker that is a list": ("stages/bundle.json", "[1]"),
    "a marker with text for seconds": ("stages/bundle.json", '{"stage": "bundle", "seconds": "abc"}'),
    "sensitivity.json with NaN": ("sensitivity.json", '[{"site": 0, "eps": 2.0, "eps_paper": NaN, "kind": "attack", '
                                                      '"n_images": 1, "estimate": 1.0, "sem": 0.1, "sigma": 1.0, "normalized": NaN}]'),
    "sensitivity.json not a list": ("sensitivity.json", '{"a": 1}'),
    "a log line with NaN, NUL bytes, bad UTF-8 and deep nesting": (
        "log.jsonl", '{"event": "warning", "message": NaN, "day": 0}\n' + "\0" * 50 + "\n\xff\xfe\n" + "[" * 100_000 + "\n"
        + '{"event": "warning", "message": "after the damage", "day": 0}\n'),
    "store.zarr that is not a store": ("store.zarr/zarr.json", "{}"),
    "a day whose stages folder is a file": (None, None),
}


@pytest.mark.parametrize("what", DAMAGE)
def test_a_damaged_file_is_a_problem_on_the_page_and_the_rest_is_shown(begun_day, what):
    folder = layout.day_folder(begun_day, 0)
    _hold(begun_day, os.getpid())
    write_json(layout.marker_path(folder, "synthesize"), {"stage": "synthesize", "seconds": 2.0, "summary": {}})
    write_json(layout.marker_path(folder, "estimate"), {"stage": "estimate", "seconds": 2.0, "summary": {}})
    write_json(folder / layout.SENSITIVITY, [])
    (folder / layout.CONFIG).write_text(TINY.format(time_scale=0.0))
    name, text = DAMAGE[what]
    if name is None:
        (begun_day / "day_001").mkdir()
        (begun_day / "day_001" / "stages").write_text("not a folder")
    else:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "log.jsonl":
            with path.open("ab") as log:
                log.write(b"\n" + text.encode("latin-1"))
        else:
            path.write_text(text, encoding="latin-1")
    view = ExperimentView(begun_day, THRESHOLDS)
    for snapshot in (view.snapshot(), view.snapshot()):  # each snapshot reports it again; none fails
        json.dumps(snapshot, allow_nan=False)
        assert snapshot["days"][0]["day"] == 0 and snapshot["current"] is not None
        if name is None:
            assert snapshot["days"][1] == {"day": 1, "state": "not started"} and snapshot["problems"] == []
        elif name == "log.jsonl":
            assert [w["message"] for w in snapshot["warnings"]] == ["after the damage", "nan"]
        elif "with wrong types" in what:
            assert snapshot["present"]["presentations"] is None and snapshot["present"]["history"] == []
        elif "with NaN" in what or "text for seconds" in what:
            assert snapshot["problems"] == []  # read: the bad numbers shown as unknown
        else:
            assert snapshot["problems"], what
