"""The rig link end to end over real ZeroMQ sockets on loopback, with a small counting presenter."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from closedloop.keys import make_key_pair, make_keys
from closedloop.link import RigClient, RigLinkError, RigRefusedError
from closedloop.present import run_presentations
from closedloop.protocol import decode_message, encode_message
from rigs.agent import Outcome, RigAgent, StreamFaults

pytestmark = pytest.mark.timeout(60)
FAST = {"heartbeat_s": 0.05, "timeout_s": 0.5}


class CountingPresenter:
    """Shows nothing; 'counts' are a known function of the ids; every ``break_every``-th is a fixation break."""

    sites = ("a", "b", "c")

    def __init__(self, *, break_every: int = 0, period_s: float = 0.002) -> None:
        self.break_every, self.period_s, self.clock_s, self.n_finished = break_every, period_s, 0.0, 0

    def load_bundle(self, path: Path, outcomes: list[dict]) -> list[int]:
        self.clock_s = max([o["onset_s"] for o in outcomes], default=-0.2) + 0.2
        return json.loads(Path(path).read_text())["ids"]

    def present(self, presentation_id: int, stimulus_id: int, window_s) -> Outcome:
        time.sleep(self.period_s)
        onset, self.clock_s = self.clock_s, self.clock_s + 0.2
        valid = not (self.break_every and presentation_id % self.break_every == self.break_every - 1)
        return Outcome(valid, onset, np.array([stimulus_id % 7, presentation_id % 5, 3]))

    def finish(self, outcomes: list[dict]) -> str:
        self.n_finished += 1
        return ""


def _bundle(folder: Path, ids) -> Path:
    path = folder / "bundle.json"
    path.write_text(json.dumps({"ids": [int(i) for i in ids]}))
    return path


def _agent(tmp_path, presenter, *, address="tcp://127.0.0.1:*", **kwargs) -> RigAgent:
    kwargs = {"security": "plain", **FAST, **kwargs}
    return RigAgent(presenter, address=address, state_dir=tmp_path / "rig", **kwargs).start()


def _client(agent, **kwargs) -> RigClient:
    kwargs = {"security": "plain", "reconnect_s": 5.0, **FAST, **kwargs}
    return RigClient(agent.address, **kwargs)


def _check_session(results: list[dict], agent_outcomes: list[dict], stimuli, repetitions: int) -> None:
    ids = [r["presentation_id"] for r in results]
    assert len(ids) == len(set(ids)), "a presentation was handed over twice"
    assert sorted(ids) == sorted(o["presentation_id"] for o in agent_outcomes), "a presentation was lost"
    shown = {o["presentation_id"]: o for o in agent_outcomes}
    for result in results:
        assert result["counts"] == shown[result["presentation_id"]]["counts"]
    valid = [r["stimulus_id"] for r in results if r["valid"]]
    for stimulus in stimuli:
        assert valid.count(stimulus) >= repetitions


@pytest.mark.parametrize("faults", [None, StreamFaults(drop=0.15, duplicate=0.15, reorder=0.15, seed=3)])
def test_session_every_stimulus_gets_its_valid_repetitions(tmp_path, faults):
    stimuli = list(range(10, 22))
    agent = _agent(tmp_path, CountingPresenter(break_every=4), faults=faults)
    results: list[dict] = []
    with _client(agent) as client:
        assert client.connect()["sites"] == ["a", "b", "c"]
        assert client.load_bundle(_bundle(tmp_path, stimuli))["n_stimuli"] == len(stimuli)
        summary = run_presentations(client, stimuli, repetitions=2, seed=1, on_result=results.append)
        assert client.status()["pending"] == []
    agent.close()
    _check_session(results, agent.outcomes, stimuli, 2)
    assert summary["n_fixation_breaks"] > 0
    assert summary["n_handed"] == len(results)
    order = [r["stimulus_id"] for r in results]
    assert order != sorted(order), "the RSVP order is not shuffled"
