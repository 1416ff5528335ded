"""Protocol fuzzing: a peer that completed the handshake sends 10,000 random and mutated messages
(random frames; every message type with fields dropped, added, retyped or oversized; damaged
JSON; wrong frame counts; hostile but well-formed commands; damaged bundles; frames over the
socket limit; garbage chunks announcing the bundle that a new peer uploads next, with the request
ids it will use). Afterwards the agent still answers ``status``, a new peer's valid upload is
loaded, and the agent presents a queued presentation with the right frame. Seeded numpy
generator: a failure replays exactly."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time

import numpy as np
import pytest

from closedloop.link.client import RigClient
from closedloop.link.protocol import MAX_BUNDLE_BYTES, MAX_FRAME_BYTES, MAX_HEADER_BYTES, encode_message
from tests.rigs.agent_peer import Peer, expected_counts, frames, start_agent, write_raw_bundle, write_test_bundle

pytestmark = pytest.mark.timeout(300)

N_MESSAGES = 10_000
SEED = 2024
IDS = [10, 11, 12]
NEXT_IDS = [20, 21, 22]  # the bundle a new peer uploads after the fuzz
NEXT_CHUNK_BYTES = 4096
TYPES = ("hello", "bundle_chunk", "queue", "status", "resend", "stop", "heartbeat", "reply", "outcome")
WEIRD = [None, True, False, -1, 0, 2**63, 2**64, -(2**70), 1.5, -0.0, 1e308, "", "x" * 300, "é\u0000", [], {}, [[1, 2, 3]],
         [[-1, 5]], [[0, 2**80]], [1e9] * 3, {"a": [1]}, [[True, 1]], [0.07], [0.5, 0.1], "ab" * 32]


def _template(rng: np.random.Generator, kind: str) -> tuple[dict, tuple[bytes, ...]]:
    """A well-formed header (without v/type) and payload of ``kind``, with plausible random values."""
    request = f"f-{rng.integers(1 << 40)}"
    if kind == "hello":
        return {"id": request, "client": "fuzz", "window_s": [0.05, 0.15], "stream_from": int(rng.integers(100))}, ()
    if kind == "bundle_chunk":
        n_bytes = int(rng.choice([0, 1, 10, 1000, 1 << 20, MAX_BUNDLE_BYTES, MAX_BUNDLE_BYTES + 1]))
        chunk_size = int(rng.choice([1, 7, 1000, 1 << 20, 1 << 30]))
        index = int(rng.integers(0, 4))
        length = max(0, min(chunk_size, n_bytes - index * chunk_size, 1 << 16))
        sha256 = rng.choice(["ab" * 32, hashlib.sha256(bytes(rng.integers(0, 9, 3))).hexdigest()])
        return ({"id": request, "sha256": str(sha256), "n_bytes": n_bytes, "chunk_size": chunk_size, "index": index},
                (rng.bytes(length),))
    if kind == "queue":
        pairs = [[int(rng.integers(0, 10**6)), int(rng.choice(IDS + [99, -5]))] for _ in range(rng.integers(0, 6))]
        return {"id": request, "presentations": pairs}, ()
    if kind == "resend":
        start = int(rng.integers(0, 50))
        return {"id": request, "start": start, "stop": int(start + rng.choice([0, 3, 10**12]))}, ()
    if kind == "heartbeat":
        return {"time_s": time.time()}, ()
    if kind == "reply":
        return {"id": request, "ok": True, "data": {}}, ()
    if kind == "outcome":
        return {"seq": 0, "presentation_id": 1, "stimulus_id": 10, "valid": True, "onset_s": 0.0, "counts": [1, 2]}, ()
    return {"id": request}, ()  # status, stop


def _encode(kind, fields: dict, payload=()) -> list[bytes]:
    """Frames of a header that may break the protocol (encode_message would refuse it)."""
    return [json.dumps({"v": 1, "type": kind, **fields}).encode(), *payload]


def _mutate(rng: np.random.Generator, fields: dict, kind: str, payload: tuple) -> list[bytes]:
    """One damaged message built from a well-formed one."""
    fields = dict(fields)
    how = int(rng.integers(9))
    if how == 0 and fields:  # a field missing
        fields.pop(str(rng.choice(list(fields))))
    elif how == 1:  # an unknown field
        fields[str(rng.choice(["extra", "v2", "ID", ""]))] = WEIRD[rng.integers(len(WEIRD))]
    elif how in (2, 3) and fields:  # a field of the wrong type or out of range
        fields[str(rng.choice(list(fields)))] = WEIRD[rng.integers(len(WEIRD))]
    elif how == 4:  # another version or type
        header = {"v": WEIRD[rng.integers(len(WEIRD))], "type": kind, **fields}
        if rng.random() < 0.5:
            header = {"v": 1, "type": WEIRD[rng.integers(len(WEIRD))], **fields}
        return [json.dumps(header).encode(), *payload]
    elif how == 5:  # damaged JSON bytes
        raw = bytearray(_encode(kind, fields)[0])
        for _ in range(rng.integers(1, 4)):
            position = int(rng.integers(len(raw)))
            raw[position] = int(rng.integers(256))
        return [bytes(raw[: rng.integers(1, len(raw) + 1)]), *payload]
    elif how == 6:  # a wrong number of frames
        extra = [rng.bytes(int(rng.integers(0, 50))) for _ in range(rng.integers(1, 3))]
        return [_encode(kind, fields)[0], *(extra if not payload else extra[:0])]
    elif how == 7:  # an oversized field
        fields[str(rng.choice(list(fields) or ["id"]))] = "x" * int(rng.choice([257, 10**5]))
    else:  # NaN and Infinity, which JSON allows in Python but the protocol does not
        return [json.dumps({"v": 1, "type": kind, **fields, "time_s": float("nan")}).encode(), *payload]
    return [_encode(kind, fields)[0], *payload]


def _damaged_bundles(folder) -> list[bytes]:
    """Files that hash right but are no bundle, or a bundle with inconsistent contents."""
    paths = [
        write_raw_bundle(folder / "group.h5", pixels_group=True, stimulus_ids=[1], codes=[1]),
        write_raw_bundle(folder / "ids.h5", pixels=frames(2), stimulus_ids=[1, 2, 3], codes=[1, 2, 3]),
        write_raw_bundle(folder / "codes.h5", pixels=frames(3), stimulus_ids=[1, 2, 3], codes=[1, 2]),
    ]
    return [path.read_bytes() for path in paths] + [b"", b"not hdf5 at all", b"\x89HDF\r\n\x1a\n" + bytes(600)]


def _message(rng: np.random.Generator, damaged: list[bytes], good: bytes, upcoming: bytes) -> tuple[str, list[bytes]]:
    """One fuzz message and a label for it (``upcoming``: the bundle a new peer uploads after the fuzz)."""
    draw = rng.random()
    if draw < 0.15:
        return "random frames", [rng.bytes(int(rng.integers(0, 300))) for _ in range(rng.integers(1, 4))]
    kind = str(rng.choice(TYPES))
    fields, payload = _template(rng, kind)
    if draw < 0.70:
        return f"mutated {kind}", _mutate(rng, fields, kind, payload)
    if draw < 0.99:
        return f"well-formed {kind}", _encode(kind, fields, payload)
    if draw < 0.9965:  # a chunk of the upcoming upload, with its request id, but the wrong bytes
        sha256, n_chunks = hashlib.sha256(upcoming).hexdigest(), -(-len(upcoming) // NEXT_CHUNK_BYTES)
        index = int(rng.integers(n_chunks))
        size = min(NEXT_CHUNK_BYTES, len(upcoming) - index * NEXT_CHUNK_BYTES)
        return "hijacking chunk", encode_message("bundle_chunk", (rng.bytes(size),), id=f"u-{sha256[:8]}-{index}",
                                                 sha256=sha256, n_bytes=len(upcoming), chunk_size=NEXT_CHUNK_BYTES,
                                                 index=index)
    if draw < 0.9985:
        data = good if rng.random() < 0.3 else damaged[rng.integers(len(damaged))]
        sha256 = hashlib.sha256(data).hexdigest()
        return "whole bundle", encode_message("bundle_chunk", (data,), id=f"f-b{rng.integers(1 << 40)}", sha256=sha256,
                                              n_bytes=len(data), chunk_size=max(1, len(data)), index=0)
    if draw < 0.9993:
        return "header over 1 MiB", [b'{"v": 1, "type": "status", "id": "' + b"x" * MAX_HEADER_BYTES + b'"}']
    if draw < 0.9996:
        return "deep JSON", [b"[" * 100_000 + b"]" * 100_000]
    return "frame over MAX_FRAME_BYTES", [_encode("status", {"id": "big"})[0], bytes(MAX_FRAME_BYTES + 1)]


def test_the_agent_survives_10000_fuzzed_messages_and_presents_correctly(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="closedloop")
    agent = start_agent(tmp_path)
    good_path = write_test_bundle(tmp_path / "good.h5", IDS)
    good, damaged = good_path.read_bytes(), _damaged_bundles(tmp_path)
    upcoming = write_test_bundle(tmp_path / "upcoming.h5", NEXT_IDS, seed=1)
    rng = np.random.default_rng(SEED)
    peer = Peer(agent.address, name=b"fuzzer")
    recent: collections.deque[str] = collections.deque(maxlen=20)
    kinds: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    try:
        assert peer.hello()["ok"] and peer.send_bundle(good_path)["data"]["complete"]
        for number in range(N_MESSAGES):
            label, message = _message(rng, damaged, good, upcoming.read_bytes())
            recent.append(label)
            kinds[label.split()[0]] += 1
            peer.send(message)
            if number % 50 == 0:
                peer.drain()
                agent.check()
        reply = peer.call("status", id="after-fuzz", timeout_s=30)
        assert reply is not None and reply["ok"], f"the agent stopped answering; last messages: {list(recent)}"
        agent.check()
        assert not [p for p in (tmp_path / "rig").iterdir() if p.stat().st_size > MAX_BUNDLE_BYTES]
        assert set(kinds) >= {"random", "mutated", "well-formed", "whole", "hijacking"}, kinds
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        assert not errors, f"requests refused by no deliberate check (internal errors): {errors[:5]}"
    finally:
        peer.close()
    newcomer = Peer(agent.address, name=b"newcomer")
    try:  # the fuzzer's uploads, errors and replies are its own: a new peer's valid upload is loaded
        assert newcomer.hello()["ok"]
        reply = newcomer.send_bundle(upcoming, chunk_bytes=NEXT_CHUNK_BYTES, prefix="u")
        assert reply["ok"] and reply["data"] == {"complete": True, "n_stimuli": len(NEXT_IDS)}, reply
        assert not list((tmp_path / "rig").glob("incoming-*")), "an upload left its chunks behind"
    finally:
        newcomer.close()
    try:
        with RigClient(agent.address, security="plain", heartbeat_s=0.05, timeout_s=2.0, reconnect_s=10.0) as client:
            assert client.status()["n_sent"] >= 0
            client.load_bundle(good_path)
            pid = 10**12
            client.queue([(pid, 11)])
            deadline, outcome = time.monotonic() + 30, None
            while outcome is None and time.monotonic() < deadline:
                outcome = next((o for o in client.read_outcomes(0.2) if o["presentation_id"] == pid), None)
        assert outcome is not None, "the queued presentation was never presented"
        assert outcome["stimulus_id"] == 11 and outcome["counts"] == expected_counts(frames(3)[1]).tolist()
        agent.check()
    finally:
        agent.close()
    print(f"fuzzed {N_MESSAGES} messages in {time.monotonic() - start:.1f} s: {dict(kinds)}")
