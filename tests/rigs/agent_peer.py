"""Shared pieces of the rig-agent tests: a presenter that keys everything by stimulus id like a
real one, small bundles (valid and damaged), and a bare control peer that speaks raw frames."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import h5py
import numpy as np
import zmq

from closedloop.data.bundle import make_event_codes, read_bundle, write_bundle
from closedloop.link.protocol import decode_message, encode_message
from rigs.agent import Outcome, RigAgent

FAST = {"heartbeat_s": 0.05, "timeout_s": 2.0}


class FramePresenter:
    """Holds frames and event codes per stimulus id, as a display presenter does; ``counts`` are a
    known function of the frame shown, so a test can check that the right image was presented."""

    sites = ("a", "b")

    def __init__(self, *, period_s: float = 0.0) -> None:
        self.period_s, self.clock_s = period_s, 0.0
        self._frames: dict[int, np.ndarray] = {}
        self._codes: dict[int, int] = {}

    def load_bundle(self, path: Path, outcomes: list[dict]) -> list[int]:
        bundle = read_bundle(path)
        ids = bundle.stimulus_ids.tolist()
        self._frames = dict(zip(ids, bundle.pixels))
        self._codes = dict(zip(ids, bundle.codes.tolist()))
        self.clock_s = max([o["onset_s"] for o in outcomes], default=-0.2) + 0.2
        return ids

    def present(self, presentation_id: int, stimulus_id: int, window_s) -> Outcome:
        time.sleep(self.period_s)
        frame, code = self._frames[stimulus_id], self._codes[stimulus_id]
        onset, self.clock_s = self.clock_s, self.clock_s + 0.2
        return Outcome(True, onset, expected_counts(frame), {"code": code})

    def finish(self, outcomes: list[dict]) -> str:
        return ""


def expected_counts(frame: np.ndarray) -> np.ndarray:
    """What :class:`FramePresenter` reports for ``frame``: its first pixel's red and green values."""
    return np.array([int(frame[0, 0, 0]), int(frame[0, 0, 1])])


def frames(n: int, seed: int = 0) -> np.ndarray:
    """Flat random-colour frames, uint8 (n, 224, 224, 3) (they compress to almost nothing)."""
    colours = np.random.default_rng(seed).integers(0, 256, size=(n, 1, 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours, (n, 224, 224, 3)))


def write_test_bundle(path: Path, ids, seed: int = 0) -> Path:
    """A valid bundle of ``len(ids)`` flat frames with stimulus ids ``ids`` and codes 1..n."""
    ids = [int(i) for i in ids]
    write_bundle(path, frames(len(ids), seed), ids, make_event_codes(len(ids)))
    return path


def write_raw_bundle(path: Path, *, pixels=None, stimulus_ids=None, codes=None, pixels_group: bool = False) -> Path:
    """An HDF5 file laid out like a bundle but with whatever contents it is given (for damaged bundles)."""
    with h5py.File(path, "w") as handle:
        if pixels_group:
            handle.create_group("pixels").create_dataset("frame", data=frames(1))
            pixels = frames(1)
        else:
            handle.create_dataset("pixels", data=pixels)
        handle.attrs["sha256"] = np.bytes_(hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest())
        handle.create_dataset("stimulus_ids", data=np.asarray(stimulus_ids if stimulus_ids is not None else [10], np.int64))
        handle.create_dataset("codes", data=np.asarray(codes if codes is not None else [1], np.uint16))
    return path


def start_agent(folder: Path, presenter=None, *, address: str = "tcp://127.0.0.1:*", **kwargs) -> RigAgent:
    kwargs = {"security": "plain", **FAST, **kwargs}
    return RigAgent(presenter or FramePresenter(), address=address, state_dir=folder / "rig", **kwargs).start()


class Peer:
    """A bare control side (a DEALER) that sends raw frames; ``call`` waits for the reply to one id."""

    def __init__(self, address: str, name: bytes = b"peer") -> None:
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.sndtimeo = 10_000  # a send into a dead agent fails (zmq.Again) instead of hanging
        self.socket.routing_id = name  # a reconnection (e.g. after being cut off) keeps the session
        self.socket.connect(address)
        self.replies: dict[str, dict] = {}
        self.outcomes: list[dict] = []

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames, copy=False)

    def drain(self, wait_s: float = 0.0) -> None:
        """Take in what arrived (replies by id, outcomes), waiting up to ``wait_s`` s for the first."""
        while self.socket.poll(int(wait_s * 1000)):
            wait_s = 0.0
            message = decode_message(self.socket.recv_multipart())
            if message.type == "reply":
                self.replies[message["id"]] = message.fields
            elif message.type == "outcome":
                self.outcomes.append(message.fields)

    def call(self, message_type: str, payload=(), *, timeout_s: float = 5.0, **fields) -> dict | None:
        """Send one command and return its reply's fields, or None when none came in ``timeout_s`` s."""
        self.send(encode_message(message_type, payload, **fields))
        deadline = time.monotonic() + timeout_s
        while fields["id"] not in self.replies and time.monotonic() < deadline:
            self.drain(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.replies.pop(fields["id"], None)

    def hello(self) -> dict:
        return self.call("hello", id=f"hello-{time.monotonic_ns()}", client="peer", window_s=[0.07, 0.17],
                         stream_from=0)

    def send_bundle(self, path: Path, *, chunk_bytes: int = 1 << 20, prefix: str = "b") -> dict | None:
        """Send a file as bundle chunks (its real sha256); return the last reply."""
        data = Path(path).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        reply = None
        for index in range(max(1, -(-len(data) // chunk_bytes))):
            chunk = data[index * chunk_bytes:(index + 1) * chunk_bytes]
            reply = self.call("bundle_chunk", (chunk,), id=f"{prefix}-{sha256[:8]}-{index}", sha256=sha256,
                              n_bytes=len(data), chunk_size=chunk_bytes, index=index)
            if reply is None or not reply["ok"] or reply["data"]["complete"]:
                break
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)
        self._context.term()
