"""The rig link end to end over real ZeroMQ sockets on loopback, with a small counting presenter."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from closedloop.data.bundle import read_bundle
from closedloop.link.client import RigClient, RigLinkError, RigRefusedError
from closedloop.link.keys import make_key_pair, make_keys
from closedloop.link.presentations import run_presentations
from closedloop.link.protocol import decode_message, encode_message
from rigs.agent import Outcome, RigAgent, StreamFaults
from tests.rigs.agent_peer import write_test_bundle

pytestmark = pytest.mark.timeout(60)
FAST = {"heartbeat_s": 0.05, "timeout_s": 0.5}


class CountingPresenter:
    """Shows nothing; 'counts' are a known function of the ids; every ``break_every``-th is a fixation break."""

    sites = ("a", "b", "c")

    def __init__(self, *, break_every: int = 0, period_s: float = 0.002) -> None:
        self.break_every, self.period_s, self.clock_s, self.n_finished = break_every, period_s, 0.0, 0

    def load_bundle(self, path: Path, outcomes: list[dict]) -> list[int]:
        self.clock_s = max([o["onset_s"] for o in outcomes], default=-0.2) + 0.2
        return read_bundle(path).stimulus_ids.tolist()

    def present(self, presentation_id: int, stimulus_id: int, window_s) -> Outcome:
        time.sleep(self.period_s)
        onset, self.clock_s = self.clock_s, self.clock_s + 0.2
        valid = not (self.break_every and presentation_id % self.break_every == self.break_every - 1)
        return Outcome(valid, onset, np.array([stimulus_id % 7, presentation_id % 5, 3]))

    def finish(self, outcomes: list[dict]) -> str:
        self.n_finished += 1
        return ""


def _bundle(folder: Path, ids) -> Path:
    return write_test_bundle(folder / "bundle.h5", ids)


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


def _raw_request(address: str, frames: list[bytes], timeout_s: float = 2.0) -> dict:
    """Send frames from a bare DEALER (a home-made control side) and return the reply's fields."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(address)
    try:
        socket.send_multipart(frames)
        assert socket.poll(int(timeout_s * 1000)), "the rig did not answer"
        message = decode_message(socket.recv_multipart())
        while message.type != "reply":
            assert socket.poll(int(timeout_s * 1000)), "the rig did not answer"
            message = decode_message(socket.recv_multipart())
        return message.fields
    finally:
        socket.close()
        context.term()


def test_rig_refuses_wrong_version_and_malformed_messages(tmp_path):
    agent = _agent(tmp_path, CountingPresenter())
    try:
        wrong_version = json.dumps({"v": 99, "type": "status", "id": "x1"}).encode()
        reply = _raw_request(agent.address, [wrong_version])
        assert reply["ok"] is False and "unsupported protocol version 99" in reply["error"]
        malformed = json.dumps({"v": 1, "type": "queue", "id": "x2", "presentations": "all"}).encode()
        reply = _raw_request(agent.address, [malformed])
        assert reply["ok"] is False and "'presentations' must be a list" in reply["error"]
        reply = _raw_request(agent.address, encode_message("status", id="x3"))
        assert reply["ok"] is False and "send hello first" in reply["error"]
        with _client(agent) as client:
            assert client.status()["n_sent"] == 0, "the rig stopped serving after bad messages"
    finally:
        agent.close()


def test_unknown_stimulus_ids_are_refused_and_nothing_is_queued(tmp_path):
    agent = _agent(tmp_path, CountingPresenter())
    try:
        with _client(agent) as client:
            with pytest.raises(RigRefusedError, match="refused .queue.: no session: load a stimulus bundle"):
                client.queue([(0, 1)])
            client.load_bundle(_bundle(tmp_path, [1, 2, 3]))
            with pytest.raises(RigRefusedError, match=r"unknown stimulus ids \[7, 9\]"):
                client.queue([(0, 1), (1, 7), (2, 9)])
            assert client.status()["pending"] == [] and client.outstanding == {}
    finally:
        agent.close()


def test_bundle_hash_mismatch_is_refused(tmp_path):
    agent = _agent(tmp_path, CountingPresenter())
    try:
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        socket.connect(agent.address)
        socket.send_multipart(encode_message("hello", id="h", client="raw", window_s=[0.07, 0.17], stream_from=0))
        data = json.dumps({"ids": [1, 2]}).encode()
        socket.send_multipart(encode_message("bundle_chunk", (data,), id="c", sha256="0" * 64, n_bytes=len(data),
                                             chunk_size=len(data), index=0))
        replies = {}
        deadline = time.monotonic() + 5
        while len(replies) < 2 and time.monotonic() < deadline:
            if socket.poll(100):
                message = decode_message(socket.recv_multipart())
                if message.type == "reply":
                    replies[message["id"]] = message.fields
        socket.close()
        context.term()
        assert replies["h"]["ok"] and replies["h"]["data"]["bundle_sha256"] == ""
        assert not replies["c"]["ok"] and "bundle sha256 mismatch" in replies["c"]["error"]
        assert not list((tmp_path / "rig").glob("stimuli-*")), "a bundle with a bad hash was kept"
    finally:
        agent.close()


def test_bundle_in_many_chunks_and_resumed_session_skips_the_transfer(tmp_path):
    agent = _agent(tmp_path, CountingPresenter())
    try:
        bundle = _bundle(tmp_path, range(50))
        assert bundle.stat().st_size > 50 * 100
        with _client(agent) as client:
            assert client.load_bundle(bundle, chunk_bytes=100)["n_stimuli"] == 50
        with _client(agent) as client:
            client.connect()
            assert client.rig["bundle_sha256"] and client.load_bundle(bundle)["n_stimuli"] == 50
    finally:
        agent.close()


def test_curve_session_and_unknown_control_key_refused(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys)
    assert (keys / "control.key_secret").stat().st_mode & 0o777 == 0o600
    agent = _agent(tmp_path, CountingPresenter(), security="curve", keys_dir=keys)
    try:
        with _client(agent, security="curve", keys_dir=keys) as client:
            assert client.connect()["rig_id"] == "rig"
        intruder = tmp_path / "intruder"
        intruder.mkdir()
        make_key_pair(intruder, "control")
        (intruder / "rig.key").write_bytes((keys / "rig.key").read_bytes())
        with _client(agent, security="curve", keys_dir=intruder) as client:
            with pytest.raises(RigLinkError, match="refused the CURVE handshake"):
                client.connect()
    finally:
        agent.close()


def test_rig_that_vanishes_and_comes_back_loses_nothing(tmp_path):
    stimuli = list(range(8))
    first = _agent(tmp_path, CountingPresenter(break_every=5, period_s=0.004))
    address = first.address
    agents = [first]
    results: list[dict] = []

    def crash_and_restart() -> None:
        while first.n_sent < 5:
            time.sleep(0.005)
        first.close()
        time.sleep(0.8)
        agents.append(_agent(tmp_path, CountingPresenter(break_every=5, period_s=0.004), address=address))

    with _client(first) as client:
        client.load_bundle(_bundle(tmp_path, stimuli))
        crasher = threading.Thread(target=crash_and_restart)
        crasher.start()
        run_presentations(client, stimuli, repetitions=3, seed=2, on_result=results.append, n_ahead=6)
        crasher.join()
    agents[-1].close()
    _check_session(results, agents[-1].outcomes, stimuli, 3)
    onsets = [o["onset_s"] for o in agents[-1].outcomes]
    assert onsets == sorted(onsets), "the recording clock went back after the restart"


def test_a_rig_restarted_between_hello_and_queue_is_greeted_again(tmp_path):
    """The restarted rig answers the queue "not in session" before any heartbeat tells the client: the
    client says hello again, reconciles and repeats the command (it used to raise RigRefusedError)."""
    quiet = {"heartbeat_s": 30.0, "timeout_s": 10.0}  # no heartbeat may reveal the restart first
    agent = _agent(tmp_path, CountingPresenter(), **quiet)
    address = agent.address
    try:
        with _client(agent, **quiet) as client:
            client.load_bundle(_bundle(tmp_path, [10, 11, 12]))
            agent.close()
            agent = _agent(tmp_path, CountingPresenter(), address=address, **quiet)
            client.queue([(0, 10), (1, 12)])  # re-queued at the new hello, then this repeat finds them queued
            shown: list[dict] = []
            deadline = time.monotonic() + 10
            while len(shown) < 2 and time.monotonic() < deadline:
                shown += client.read_outcomes(0.2)
        assert [(o["presentation_id"], o["stimulus_id"]) for o in shown] == [(0, 10), (1, 12)]
    finally:
        agent.close()


def test_control_process_restarted_mid_session(tmp_path):
    stimuli = list(range(10))
    agent = _agent(tmp_path, CountingPresenter(break_every=6))
    store: list[dict] = []

    class Crash(Exception):
        pass

    def store_then_crash(outcome: dict) -> None:
        if len(store) == 7:
            raise Crash
        store.append(outcome)

    try:
        client = _client(agent, name="first")
        client.load_bundle(_bundle(tmp_path, stimuli))
        with pytest.raises(Crash):
            run_presentations(client, stimuli, repetitions=2, seed=4, on_result=store_then_crash)
        client.close()
        recorded = tuple(np.array([o[key] for o in store]) for key in ("presentation_id", "stimulus_id", "valid"))
        with _client(agent, name="second") as client:
            client.load_bundle(_bundle(tmp_path, stimuli))
            with pytest.raises(ValueError, match=r"stored presentation 0 showed stimulus \d+, but this schedule \(seed 5"):
                run_presentations(client, stimuli, repetitions=2, seed=5, on_result=store.append, already_recorded=recorded)
            summary = run_presentations(client, stimuli, repetitions=2, seed=4, on_result=store.append,
                                        already_recorded=recorded)
        assert summary["n_skipped"] == 7
    finally:
        agent.close()
    _check_session(store, agent.outcomes, stimuli, 2)
    # the same seed and the same fixation breaks give the same order as an uninterrupted session
    order = [(o["presentation_id"], o["stimulus_id"]) for o in sorted(store, key=lambda o: o["presentation_id"])]
    agent = _agent(tmp_path / "again", CountingPresenter(break_every=6))
    try:
        with _client(agent, name="uninterrupted") as client:
            client.load_bundle(_bundle(tmp_path, stimuli))
            again: list[dict] = []
            run_presentations(client, stimuli, repetitions=2, seed=4, on_result=again.append)
    finally:
        agent.close()
    assert [(o["presentation_id"], o["stimulus_id"]) for o in sorted(again, key=lambda o: o["presentation_id"])] == order


def test_dead_rig_noticed_and_the_client_gives_up_in_bounded_time(tmp_path):
    agent = _agent(tmp_path, CountingPresenter())
    client = _client(agent, reconnect_s=1.0)
    client.connect()
    agent.close()
    start = time.monotonic()
    with pytest.raises(RigLinkError, match="no answer from the rig"):
        client.read_outcomes(30.0)
    assert time.monotonic() - start < 3.0
    client.close()


def test_the_silence_of_a_dead_rig_grows_while_the_client_tries_to_reconnect(tmp_path):
    """The operator's "last heard" (and the rig-silent alarm) counts from the rig's last message, not
    from the client's last attempt to reach it."""
    agent = _agent(tmp_path, CountingPresenter())
    client = _client(agent, reconnect_s=3.0)
    client.connect()
    assert client.seconds_since_heard < 0.5
    agent.close()
    silences = []

    def watch() -> None:
        while len(silences) < 25:
            silences.append(client.seconds_since_heard)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(RigLinkError, match="no answer from the rig"):
        client.read_outcomes(30.0)
    watcher.join()
    client.close()
    assert silences == sorted(silences) and silences[-1] > 2.0, silences


def test_rig_stop_cancels_the_queue_and_refuses_more(tmp_path):
    presenter = CountingPresenter(period_s=0.05)
    agent = _agent(tmp_path, presenter)
    try:
        with _client(agent) as client:
            client.load_bundle(_bundle(tmp_path, [1, 2]))
            client.queue([(k, 1 + k % 2) for k in range(20)])
            answer = client.stop()
            assert answer["n_cancelled"] >= 15 and presenter.n_finished == 1
            shown = client.read_outcomes(0.5)
            assert len(shown) == 20 - answer["n_cancelled"] and client.outstanding == {}
            with pytest.raises(RigRefusedError, match="no session"):
                client.queue([(100, 1)])
    finally:
        agent.close()


def test_client_refuses_a_rig_with_another_number_of_sites(tmp_path):
    agent = _agent(tmp_path, CountingPresenter())
    try:
        with _client(agent, n_sites=5) as client:
            with pytest.raises(ValueError, match=r"the rig 'rig' at .* records 3 sites, but the experiment expects 5 "
                                                 r"\(\[sites\] n_sites\); set \[sites\] n_sites = 3 in experiment.toml"):
                client.connect()
        with _client(agent, n_sites=3) as client:
            assert client.connect()["sites"] == ["a", "b", "c"]
    finally:
        agent.close()


def test_client_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="'keys_dir' is required when security is 'curve'"):
        RigClient("tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="Invalid value for 'security'"):
        RigClient("tcp://127.0.0.1:1", security="tls")
    with pytest.raises(ValueError, match="'timeout_s' must lie in"):
        RigClient("tcp://127.0.0.1:1", security="plain", timeout_s=0)
    with pytest.raises(ValueError, match="'n_sites' must lie in"):
        RigClient("tcp://127.0.0.1:1", security="plain", n_sites=0)
    with pytest.raises(ValueError, match="'repetitions' must lie in"):
        run_presentations(None, [1], repetitions=0, seed=0, on_result=print)
    with pytest.raises(ValueError, match="'stimulus_ids' must be unique"):
        run_presentations(None, [1, 1], repetitions=1, seed=0, on_result=print)
    with pytest.raises(ValueError, match="'already_recorded' arrays must have equal lengths"):
        run_presentations(None, [1], repetitions=1, seed=0, on_result=print, already_recorded=([1], [1, 2], [True]))


def test_client_from_config_runs_a_session(tmp_path):
    from closedloop.config import build_config
    from closedloop.link.client import make_rig_client

    agent = _agent(tmp_path, CountingPresenter())
    config = build_config({"rig": {"address": agent.address, "security": "plain", "heartbeat_s": 0.05,
                                   "timeout_s": 0.5, "retries": 2, "reconnect_s": 2.0}})
    try:
        with make_rig_client(config.rig, window_s=(0.05, 0.15)) as client:
            assert (client.retries, client.reconnect_s, client.window_s) == (2, 2.0, (0.05, 0.15))
            client.load_bundle(_bundle(tmp_path, [4]))
            client.queue([(0, 4)])
            assert [o["presentation_id"] for o in client.read_outcomes(2.0)] == [0]
    finally:
        agent.close()


class PresenterWithoutCounts(CountingPresenter):
    """A real presenter's view: validity, no sites and no spike counts."""

    sites = ()

    def present(self, presentation_id: int, stimulus_id: int, window_s) -> Outcome:
        outcome = super().present(presentation_id, stimulus_id, window_s)
        return Outcome(outcome.valid, outcome.onset_s, None)


def test_a_rig_without_counts_streams_outcomes_only(tmp_path):
    agent = _agent(tmp_path, PresenterWithoutCounts(break_every=4))
    results = []
    try:
        with _client(agent, n_sites=21) as client:  # no sites: any number of sites in the experiment fits
            assert client.connect()["sites"] == []
            client.load_bundle(_bundle(tmp_path, [3, 4, 5]))
            summary = run_presentations(client, [3, 4, 5], repetitions=2, seed=1, on_result=results.append)
    finally:
        agent.close()
    assert summary["n_fixation_breaks"] > 0 and all("counts" not in result for result in results)
    assert sum(result["valid"] for result in results) == 6
