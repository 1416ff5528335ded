"""The present stage against a rig whose site count is not the experiment's: refused at hello."""

from __future__ import annotations

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
