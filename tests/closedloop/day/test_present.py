"""The present stage against a rig whose site count is not the experiment's: refused at hello."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from closedloop.config import build_config
from closedloop.core.files import write_json
from closedloop.data import layout
from closedloop.data.bundle import make_event_codes, write_bundle
from closedloop.data.store import create_store
from closedloop.day import present
from closedloop.link.access import RigAccess
from tests.rigs.agent_peer import Peer, start_agent

pytestmark = pytest.mark.timeout(60)


def _day_until_bundle(folder, n_sites: int) -> None:
    """A real day store with two clean stimuli, its bundle and the bundle stage's marker."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    codes = make_event_codes(2)
    store = create_store(folder / layout.STORE, sites=n_sites)
    store.append_stimuli(pixels, parent=[-1, -1], site=[-1, -1], eps=[0.0, 0.0], direction=[0, 0], kind=["clean", "clean"],
                         predicted=np.zeros((2, n_sites)), code=codes)
    digest = write_bundle(folder / layout.BUNDLE, pixels, np.arange(2), codes)
    write_json(layout.marker_path(folder, "bundle"), {"stage": "bundle", "seconds": 0.0, "summary": {"sha256": digest}})


def test_a_rig_with_other_sites_is_refused_before_any_bundle_is_sent(tmp_path):
    agent = start_agent(tmp_path / "rig")  # its presenter records 2 sites
    config = build_config({"rig": {"kind": "zmq", "address": agent.address, "security": "plain", "heartbeat_s": 0.05,
                                   "timeout_s": 0.5, "reconnect_s": 2.0}, "sites": {"n_sites": 3}})
    folder = tmp_path / "day_000"
    _day_until_bundle(folder, n_sites=3)
    day = SimpleNamespace(config=config, folder=folder, rig=RigAccess(), path=lambda name: folder / name,
                          seed=lambda stage: 0)
    try:
        with pytest.raises(ValueError, match=r"the rig 'rig' at tcp://127\.0\.0\.1:\d+ records 2 sites, but the experiment "
                                             r"expects 3 \(\[sites\] n_sites\); set \[sites\] n_sites = 2 in experiment\.toml"):
            present.run_stage(day)
        peer = Peer(agent.address)
        assert peer.hello()["data"]["bundle_sha256"] == "", "a bundle was sent to the wrong rig"
        peer.close()
    finally:
        agent.close()


def test_a_live_view_that_cannot_be_written_is_said_once_and_the_alarms_are_retried(tmp_path, caplog):
    """A full disk: the live view's failure is one warning per spell, not one a second; an alarm whose
    log line could not be written is raised again at the next check."""
    events, failures = [], [2]

    def log_event(**event) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError(28, "No space left on device")
        events.append(event)

    config = build_config({"dashboard": {"min_free_gb": 1e9}})  # the disk is always "low"
    day = SimpleNamespace(folder=tmp_path, path=lambda name: tmp_path / "gone" / name, log_event=log_event, config=config)
    monitor = present.SessionMonitor(4, 2, 0.1)
    watch = present.SessionWatch(config.dashboard, ["e1", "e2"], 0.1)
    with caplog.at_level("WARNING", logger="closedloop"), present._display(day, monitor, watch, every_s=0.05):
        time.sleep(4.5)
    assert sum("cannot write the live view" in r.getMessage() for r in caplog.records) == 1
    assert [(e["state"], e["kind"]) for e in events] == [("raised", "disk_low"), ("cleared", "disk_low")]
