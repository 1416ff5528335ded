"""The present stage against a rig whose site count is not the experiment's: refused at hello."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from closedloop.config import build_config
from closedloop.day import present
from closedloop.link.access import RigAccess
from tests.rigs.agent_peer import Peer, start_agent

pytestmark = pytest.mark.timeout(60)


class _Store:
    """What the present stage reads from the day store before it talks to the rig."""

    n_stimuli, n_sites = 2, 3

    def read_presentations(self) -> dict:
        return {"id": np.zeros(0, np.int64), "stimulus": np.zeros(0, np.int64), "valid": np.zeros(0, bool)}


def test_a_rig_with_other_sites_is_refused_before_any_bundle_is_sent(tmp_path, monkeypatch):
    agent = start_agent(tmp_path)  # its presenter records 2 sites
    config = build_config({"rig": {"kind": "zmq", "address": agent.address, "security": "plain", "heartbeat_s": 0.05,
                                   "timeout_s": 0.5, "reconnect_s": 2.0}, "sites": {"n_sites": 3}})
    monkeypatch.setattr(present, "open_store", lambda *args, **kwargs: _Store())
    day = SimpleNamespace(config=config, folder=tmp_path, rig=RigAccess(), path=lambda name: tmp_path / name,
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
