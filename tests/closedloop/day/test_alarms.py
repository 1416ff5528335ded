"""The present stage's alarms: which hold for which outcomes, and the events they leave in the log."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from closedloop.config import DashboardSection
from closedloop.day.alarms import Alarm, AlarmLog, SessionWatch
from tests.tiny_experiment import TINY

ROOT = Path(__file__).resolve().parents[3]

WINDOW_S = 0.1  # response window, s: 1 spike = 10 Hz
PLENTY = 100 * 10**9  # free bytes


def _watch(**thresholds) -> SessionWatch:
    return SessionWatch(DashboardSection(**{"silent_presentations": 10, **thresholds}), ["e1", "e2", "e3"], WINDOW_S)


def _kinds(alarms) -> set:
    return {(alarm.kind, alarm.site) for alarm in alarms}


def _check(watch, **facts):
    return watch.check(**{"break_rate": 0.0, "n_in_window": 100, "link_silent_s": 0.1, "free_bytes": PLENTY, **facts})


def test_a_site_that_stops_firing_raises_silent_and_one_that_falls_to_baseline_raises_at_baseline():
    watch = _watch()
    for _ in range(10):
        watch.add({"valid": True, "counts": [8, 8, 8]})  # 80 Hz each at the start of the day
    assert _check(watch) == []
    for _ in range(9):
        watch.add({"valid": True, "counts": [8, 0, 1]})
    assert _kinds(_check(watch)) == {("site_at_baseline", 1), ("site_at_baseline", 2)}, "one spiking presentation left"
    watch.add({"valid": True, "counts": [8, 0, 1]})
    alarms = _check(watch)
    assert _kinds(alarms) == {("silent_site", 1), ("site_at_baseline", 2)}
    assert "site 1 (e2)" in next(a.message for a in alarms if a.kind == "silent_site")
    assert "10.0 Hz" in next(a.message for a in alarms if a.kind == "site_at_baseline")
    for _ in range(10):  # the unit comes back
        watch.add({"valid": True, "counts": [8, 8, 8]})
    assert _check(watch) == []


def test_fixation_breaks_and_presentations_without_counts_do_not_count_towards_the_site_alarms():
    watch = _watch()
    for _ in range(10):
        watch.add({"valid": True, "counts": [8, 8, 8]})
    for _ in range(30):
        watch.add({"valid": False, "counts": [0, 0, 0]})
        watch.add({"valid": True, "counts": None})
    assert _check(watch) == []


def test_a_site_weak_from_the_start_raises_no_baseline_alarm():
    watch = _watch(min_reference_rate_hz=20.0)
    for _ in range(10):
        watch.add({"valid": True, "counts": [8, 1, 8]})  # site 1 at 10 Hz from the start
    for k in range(10):
        watch.add({"valid": True, "counts": [8, int(k == 0), 1]})  # site 1 at 1 Hz, site 2 from 80 to 10 Hz
    assert _kinds(_check(watch)) == {("site_at_baseline", 2)}


@pytest.mark.parametrize(("facts", "kind"), [
    ({"break_rate": 0.5, "n_in_window": 40}, "fixation_breaks"),
    ({"link_silent_s": 11.0}, "rig_silent"),
    ({"free_bytes": 4 * 10**9}, "disk_low"),
])
def test_the_session_alarms_hold_beyond_their_thresholds(facts, kind):
    watch = _watch(max_fixation_break_rate=0.3, rig_silent_s=10.0, min_free_gb=5.0)
    assert _kinds(_check(watch, **facts)) == {(kind, None)}


def test_a_break_rate_over_too_few_presentations_raises_nothing():
    assert _check(_watch(), break_rate=0.9, n_in_window=19) == []


def test_a_site_that_never_fired_raises_no_alarm():
    watch = _watch()
    for _ in range(30):
        watch.add({"valid": True, "counts": [8, 0, 8]})  # site 1: a dead channel from the start
    assert _check(watch) == []


def test_an_alarm_that_flickers_at_its_threshold_is_raised_once_and_cleared_after_the_hold():
    events, clock = [], [0.0]
    log = AlarmLog(lambda **event: events.append(event), hold_s=10.0, clock=lambda: clock[0])
    watch = _watch()
    for second in range(30):  # the break rate crosses its threshold every other second
        clock[0] = float(second)
        log.update(_check(watch, break_rate=0.35 if second % 2 else 0.25))
    assert [e["state"] for e in events] == ["raised"]
    clock[0] = 38.0  # last held at 29 s
    log.update([])
    assert [e["state"] for e in events] == ["raised"], "9 s without it: held"
    clock[0] = 39.0
    log.update([])
    assert [e["state"] for e in events] == ["raised", "cleared"]
    log.update([Alarm("site_at_baseline", "e2 low", 1)])
    log.update([Alarm("silent_site", "e2 silent", 1)])  # worse: the baseline alarm gives way at once
    assert [(e["state"], e["kind"]) for e in events[-2:]] == [("cleared", "site_at_baseline"), ("raised", "silent_site")]
    log.clear_all()
    assert [e["state"] for e in events] == ["raised", "cleared", "raised", "cleared", "raised", "cleared"]
    assert not log.active


def test_the_log_gets_one_raised_and_one_cleared_event_per_alarm():
    events = []
    log = AlarmLog(lambda **event: events.append(event))
    watch = _watch()
    log.update(_check(watch, link_silent_s=30.0))
    log.update(_check(watch, link_silent_s=40.0))  # still silent: nothing new
    assert [(e["state"], e["kind"]) for e in events] == [("raised", "rig_silent")]
    assert "40 s" in log.active[("rig_silent", None)].message
    log.update(_check(watch, free_bytes=1))
    assert [(e["state"], e["kind"]) for e in events] == [("raised", "rig_silent"), ("cleared", "rig_silent"),
                                                         ("raised", "disk_low")]
    log.update([])
    assert events[-1]["state"] == "cleared" and not log.active
    assert all(e["event"] == "alarm" for e in events)


@pytest.mark.parametrize(("key", "value"), [("silent_presentations", 2), ("baseline_fraction", 1.0),
                                            ("max_fixation_break_rate", 0.0), ("port", 70000)])
def test_bad_thresholds_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        DashboardSection(**{key: value})


@pytest.mark.slow
def test_a_session_killed_and_resumed_compares_its_sites_with_the_days_first_presentations(tmp_path):
    """The resumed session's reference is what the store holds first, not its own first presentations:
    a site that died before the kill is still reported against the rate it had at the start."""
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "experiment.toml").write_text(TINY.format(time_scale=0.5).replace(
        "fixation_break_rate = 0.2", "fixation_break_rate = 0.2\nsilent_sites = [1]\nsilent_after = 15")
        + "[dashboard]\nsilent_presentations = 10\n")
    command = [sys.executable, "-m", "closedloop", "-q", "fit-day", "0", "--experiment", str(experiment)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = experiment / "day_000" / "log.jsonl"
    first = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (log.exists() and '"silent_site"' in log.read_text()):  # site 1 died and was reported
        assert first.poll() is None and time.monotonic() < deadline, "no silent-site alarm before the kill"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = log.read_text().count('"raised"')
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    raised = [e for e in events if e.get("state") == "raised"][before:]
    assert [(e["kind"], e["site"]) for e in raised] == [("silent_site", 1)], "raised again, from the stored presentations"
    fired = float(re.search(r"it fired (\d+) Hz", raised[0]["message"])[1])
    assert fired > 50, raised[0]["message"]
