"""The rig side of the link: a reusable agent that speaks the protocol around a pluggable presenter.

The agent binds a ZeroMQ ROUTER socket, answers commands from one control process at a time
(see docs/protocol.md), keeps a FIFO queue of presentations that a worker thread hands to the
presenter one by one, numbers every outcome, writes it to a journal in ``state_dir`` before
streaming it, and can resend any part of the stream. Everything it must not lose lives in
``state_dir`` (the verified bundle, ``session.json``, ``stream.jsonl``), so an agent restarted
after a crash continues the same session: the stream and the set of shown presentations are
read back; only the queue of not-yet-shown presentations is lost, and the control side
re-queues it.

Faults (docs/reliability.md): every request is checked before it changes anything (the protocol's
size limits, then each command's own checks; a bundle is checked in full with
:func:`closedloop.data.bundle.check_bundle` before it replaces the session) and a bad one is
answered ``ok: false``; an unexpected error in a command is logged with its traceback and refused
the same way, and the agent serves on. A new bundle drops the queue and waits for the image on
screen to finish, so that outcome is journaled in its own session. A thread that dies anyway
(the presenter raised, the socket failed) stops the agent: it logs the traceback, stops serving
and :meth:`RigAgent.check` raises :class:`RigAgentError`, which ends ``closedloop rig-sim``.

A presenter is any object with:

- ``sites``: sequence of site labels (its length is the number of counts per outcome, when the
  presenter counts spikes);
- ``load_bundle(path, outcomes) -> stimulus ids``: read a verified bundle file; ``outcomes`` is
  the journal of the session so far (a list of dicts, see :class:`Outcome`), so a restarted
  presenter can continue its recording clock. It either succeeds or raises and leaves the
  presenter as it was (the agent then refuses the bundle and the old session goes on);
- ``present(presentation_id, stimulus_id, window_s) -> Outcome``: show one stimulus (blocking
  for its on + off time) and return what happened;
- ``finish(outcomes) -> str``: the recording has ended (``stop``); returns the path of what it
  wrote, or "";
- optionally ``set_rsvp(rsvp)``: called at every hello with its ``rsvp`` field (the experiment's
  ``on_s``, ``off_s``, ``image_size_deg``, or None when the control side sent none); raising
  ``ValueError`` refuses the hello with its message (e.g. times that are not whole frames).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from closedloop.core.files import write_json
from closedloop.core.logs import logger
from closedloop.core.validation import check_number, check_option
from closedloop.data.bundle import BundleError, check_bundle
from closedloop.link.keys import load_curve_keys, make_authenticator
from closedloop.link.protocol import (
    COMMANDS,
    MAX_BUNDLE_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_FRAME_BYTES,
    MAX_QUEUED,
    NOT_IN_SESSION,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_message,
    encode_message,
)

__all__ = ["Outcome", "StreamFaults", "RigAgent", "RigAgentError"]

_SESSION = "session.json"
_STREAM = "stream.jsonl"
_MAX_CACHED_REPLIES = 4096
_POLL_MS = 10
_ON_SCREEN_WAIT_S = 30.0  # how long stop and a new bundle wait for the image on screen to finish


class RigAgentError(RuntimeError):
    """A thread of the rig agent died; the agent has stopped serving (the cause is chained)."""


@dataclass(frozen=True)
class Outcome:
    """What a presenter reports for one presentation.

    ``valid``: shown with fixation held; ``onset_s``: image onset on the recording clock, s;
    ``counts``: spikes per site in the response window, shape (n_sites,), or None when the
    presenter does not count spikes (a real display computer: the NSP records them); ``record``:
    presenter-private JSON data kept in the journal (e.g. the simulated spike trains).
    """

    valid: bool
    onset_s: float
    counts: np.ndarray | None
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StreamFaults:
    """Fault injection on the outcome stream (first sends only), for tests and the simulator.

    ``drop``, ``duplicate``, ``reorder``: probability per outcome message of being dropped,
    sent twice, or held back and sent after the next one. ``seed`` seeds the draws.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            check_number(name, getattr(self, name), minimum=0.0, maximum=1.0)
        if self.drop + self.duplicate + self.reorder > 1.0:
            raise ValueError(
                f"'drop' + 'duplicate' + 'reorder' must be <= 1, but got {self.drop + self.duplicate + self.reorder:g}."
            )


@dataclass
class _Transfer:
    """A bundle upload in progress from the session's peer: its announcement (sha256 and layout), its own
    chunk file, and the chunks received so far. Another announcement, a failure, or another peer's hello
    discards it with its file."""

    sha256: str
    n_bytes: int
    chunk_size: int
    path: Path
    received: set[int] = field(default_factory=set)

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.n_bytes // self.chunk_size))


def _check_chunk(n_bytes: int, chunk_size: int, index: int, payload: bytes) -> None:
    """Refuse a ``bundle_chunk`` whose sizes break the protocol's limits or do not fit together."""
    if n_bytes > MAX_BUNDLE_BYTES:
        raise ValueError(f"bundle of {n_bytes} bytes is over the maximum bundle size of {MAX_BUNDLE_BYTES} bytes; "
                         "split the day's stimuli into smaller bundles")
    if not 1 <= chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"'chunk_size' must lie in [1, {MAX_CHUNK_BYTES}], but got {chunk_size}")
    n_chunks = max(1, -(-n_bytes // chunk_size))
    if n_chunks > MAX_CHUNKS:
        raise ValueError(f"{n_bytes} bytes in chunks of {chunk_size} make {n_chunks} chunks, more than {MAX_CHUNKS}; "
                         "send larger chunks")
    if index >= n_chunks:
        raise ValueError(f"chunk index {index} out of range for {n_bytes} bytes in chunks of {chunk_size}")
    expected = min(chunk_size, n_bytes - index * chunk_size)
    if len(payload) != expected:
        raise ValueError(f"chunk {index} has {len(payload)} bytes, expected {expected}")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_journal(path: Path) -> list[dict]:
    """Outcomes journaled so far; a torn last line (crash while writing) is ignored."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            logger.warning("rig journal %s: ignoring a torn line", path)
    return entries


class RigAgent:
    """A rig agent serving ``presenter`` on ``address`` (e.g. ``tcp://127.0.0.1:5555``, or port ``*``).

    ``security``: "curve" (keys from ``keys_dir``: ``rig.key_secret`` and ``allowed/``) or "plain".
    ``heartbeat_s``: interval of the agent's heartbeats, s; ``timeout_s``: a control peer silent
    this long is dropped (presentations go on and are journaled), s. ``faults`` perturbs the live
    stream. Call :meth:`start` to serve in a background thread, :meth:`close` to end.
    """

    def __init__(
        self,
        presenter,
        *,
        address: str,
        state_dir: str | Path,
        rig_id: str = "rig",
        security: str = "curve",
        keys_dir: str | Path | None = None,
        heartbeat_s: float = 1.0,
        timeout_s: float = 5.0,
        faults: StreamFaults | None = None,
    ) -> None:
        check_option("security", security, ("curve", "plain"))
        if security == "curve" and keys_dir is None:
            raise ValueError("'keys_dir' is required when security is 'curve'; make keys with `closedloop keys DIR`.")
        self.presenter = presenter
        self.rig_id = rig_id
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s = check_number("heartbeat_s", heartbeat_s, minimum=0.001)
        self.timeout_s = check_number("timeout_s", timeout_s, minimum=0.001)
        self.faults = faults or StreamFaults()
        self._rng = np.random.default_rng(self.faults.seed)
        self._context = zmq.Context()
        self._authenticator = self._socket = None
        try:
            self._open_socket(address, security, keys_dir)
        except BaseException:
            self._release_sockets()
            raise
        self._lock = threading.Condition()
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._current: tuple[int, int] | None = None
        self._to_send: queue.Queue[int] = queue.Queue()
        self._halt = threading.Event()
        self._replies: collections.OrderedDict[tuple[bytes, str], list[bytes]] = collections.OrderedDict()  # (peer, id)
        self._transfer: _Transfer | None = None
        self._upload_numbers = itertools.count()
        self._failure: BaseException | None = None
        self._failed_thread = ""
        self._held: list[int] = []
        self._peer: bytes | None = None
        self._peer_seen = 0.0
        self._last_beat = 0.0
        self._window_s = (0.07, 0.17)
        self._threads: list[threading.Thread] = []
        try:
            self._restore()
        except BaseException:  # e.g. a presenter that cannot read the session's bundle: free the address
            self._release_sockets()
            raise

    def _open_socket(self, address: str, security: str, keys_dir) -> None:
        """Make the ROUTER socket (CURVE: with its ZAP authenticator, started first) and bind it to ``address``."""
        if security == "curve":
            self._authenticator = make_authenticator(self._context, keys_dir)
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.linger = 0
        self._socket.router_handover = 1
        self._socket.maxmsgsize = MAX_FRAME_BYTES
        if security == "curve":
            load_curve_keys(self._socket, keys_dir, "rig")
        try:
            self._socket.bind(address)
        except zmq.ZMQError as error:
            raise ValueError(
                f"cannot serve on {address!r}: {os.strerror(error.errno)}; another rig agent (closedloop rig serve or rig-sim) "
                "is serving there, or the address is not this computer's: choose another address"
            ) from None
        self.address = self._socket.last_endpoint.decode()

    def _release_sockets(self) -> None:
        """Close the socket, stop the ZAP authenticator (its thread holds sockets too), then end the context.

        ``zmq.Context.term`` waits for every socket of the context to close, so it comes last.
        """
        if self._socket is not None:
            self._socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    # ----- session state on disk -------------------------------------------------------------

    def _restore(self) -> None:
        """Read the session (bundle, journal) left in ``state_dir`` by an earlier run, if any."""
        self._session = {"sha256": "", "bundle": "", "stopped": False}
        self._outcomes: list[dict] = []
        self._stimuli: set[int] = set()
        path = self.state_dir / _SESSION
        if path.is_file():
            self._session = json.loads(path.read_text(encoding="utf-8"))
            self._outcomes = _read_journal(self.state_dir / _STREAM)
            self._stimuli = set(self.presenter.load_bundle(self.state_dir / self._session["bundle"], self._outcomes))
            logger.info("rig %s: resumed session %s with %d outcomes", self.rig_id, self._session["sha256"][:12],
                        len(self._outcomes))
        self._shown = {entry["presentation_id"] for entry in self._outcomes}
        for partial in self.state_dir.glob("incoming-*.part"):  # uploads cut off by a crash; never resumed
            partial.unlink()
        self._journal = open(self.state_dir / _STREAM, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _start_session(self, sha256: str, bundle: Path) -> None:
        """Drop the queue, let the image on screen finish (journaled in the old session), then load ``bundle``."""
        with self._lock:
            self._queue.clear()
            deadline = time.monotonic() + _ON_SCREEN_WAIT_S
            while self._current is not None and time.monotonic() < deadline and not self._halt.is_set():
                self._lock.wait(0.05)
            if self._current is not None:
                raise ValueError(f"an image is still on screen after {_ON_SCREEN_WAIT_S:g} s; send the bundle again")
        self._flush_stream()  # the old session's last outcomes go out under its numbering
        self._release_held()
        stimuli = set(self.presenter.load_bundle(bundle, []))
        with self._lock:
            self._journal.close()
            old, stamp = self.state_dir / _STREAM, f"{self._session['sha256'][:12]}-{time.time_ns()}"
            if old.is_file() and self._session["sha256"]:
                old.replace(self.state_dir / f"stream-{stamp}.jsonl")
            recording = Path(self._session.get("recording") or self.state_dir / "-")
            if recording.is_file():  # a finished session's recording is kept, never written over by the next
                recording.replace(recording.with_name(f"{recording.stem}-{stamp}{recording.suffix}"))
            self._journal = open(old, "w", encoding="utf-8")  # noqa: SIM115
            self._session = {"sha256": sha256, "bundle": bundle.name, "stopped": False}
            write_json(self.state_dir / _SESSION, self._session)
            self._stimuli, self._outcomes, self._shown = stimuli, [], set()
            self._queue.clear()

    # ----- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RigAgent:
        """Serve in background threads (one for the socket, one for the presenter); returns self.

        A thread that dies stops the agent; call :meth:`check` to learn it.
        """
        self._threads = [
            threading.Thread(target=self._guard, args=(self._serve,), name=f"{self.rig_id}-io", daemon=True),
            threading.Thread(target=self._guard, args=(self._present_loop,), name=f"{self.rig_id}-present",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info("rig %s serving on %s", self.rig_id, self.address)
        return self

    def check(self) -> None:
        """Raise :class:`RigAgentError` (chained to the cause) when a thread of the agent died."""
        if self._failure is not None:
            raise RigAgentError(
                f"rig {self.rig_id}: the {self._failed_thread} thread died: {type(self._failure).__name__}: {self._failure}; "
                "the agent stopped serving (traceback in the log): fix the cause and restart the rig"
            ) from self._failure

    def _guard(self, loop) -> None:
        """Run a thread's loop; if it raises, record the failure, log it loudly and stop the agent."""
        try:
            loop()
        except BaseException as error:  # noqa: B036 (any death must stop the agent, never leave a zombie)
            self._failure, self._failed_thread = error, threading.current_thread().name
            logger.critical("rig %s: the %s thread died; the agent stops serving", self.rig_id,
                            self._failed_thread, exc_info=error)
            self._halt.set()
            with self._lock:
                self._lock.notify_all()

    def close(self) -> None:
        """Stop serving: the presentation in progress finishes and is journaled, the queue is dropped.

        Nothing is said to the control side, exactly as if the process died between two images.
        Closing twice does nothing.
        """
        if self._journal.closed:
            return
        self._halt.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        self._release_sockets()
        self._journal.close()

    @property
    def n_sent(self) -> int:
        """Outcomes journaled (and streamed) in this session."""
        with self._lock:
            return len(self._outcomes)

    @property
    def outcomes(self) -> list[dict]:
        """A copy of the session's journal: one dict per outcome, in stream order."""
        with self._lock:
            return list(self._outcomes)

    # ----- presenter thread --------------------------------------------------------------------

    def _present_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._halt.is_set():
                    self._lock.wait(0.1)
                if self._halt.is_set():
                    return
                self._current = presentation_id, stimulus_id = self._queue.popleft()
                window = self._window_s
            outcome = self.presenter.present(presentation_id, stimulus_id, window)
            with self._lock:
                entry = {
                    "seq": len(self._outcomes), "presentation_id": presentation_id, "stimulus_id": stimulus_id,
                    "valid": bool(outcome.valid), "onset_s": float(outcome.onset_s),
                    "counts": None if outcome.counts is None else [int(c) for c in outcome.counts],
                    "record": outcome.record,
                }
                self._journal.write(json.dumps(entry) + "\n")
                self._journal.flush()
                self._outcomes.append(entry)
                self._shown.add(presentation_id)
                self._to_send.put(entry["seq"])  # before the lock goes: a new session flushes it first
                self._current = None
                self._lock.notify_all()

    # ----- socket thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._halt.is_set():
            if poller.poll(_POLL_MS):
                frames = self._socket.recv_multipart()
                self._handle(frames[0], frames[1:])
            self._flush_stream()
            self._beat()

    def _send(self, peer: bytes, message_type: str, payload=(), **fields) -> None:
        self._socket.send_multipart([peer, *encode_message(message_type, payload, **fields)])

    def _stream_message(self, seq: int) -> list[bytes]:
        entry = self._outcomes[seq]
        fields = {key: entry[key] for key in ("seq", "presentation_id", "stimulus_id", "valid", "onset_s", "counts")
                  if entry.get(key) is not None}
        return encode_message("outcome", **fields)

    def _flush_stream(self) -> None:
        while True:
            try:
                seq = self._to_send.get_nowait()
            except queue.Empty:
                return
            if self._peer is None:
                continue
            draw = self._rng.random()
            copies = 0 if draw < self.faults.drop else 2 if draw < self.faults.drop + self.faults.duplicate else 1
            if copies and draw >= 1.0 - self.faults.reorder:
                self._held.append(seq)
                continue
            with self._lock:
                frames = self._stream_message(seq)
            for _ in range(copies):
                self._socket.send_multipart([self._peer, *frames])
            self._release_held()

    def _release_held(self) -> None:
        with self._lock:
            held = [self._stream_message(seq) for seq in self._held]
        self._held.clear()
        for frames in held:
            if self._peer is not None:
                self._socket.send_multipart([self._peer, *frames])

    def _beat(self) -> None:
        now = time.monotonic()
        if self._peer is not None and now - self._peer_seen > self.timeout_s:
            logger.warning("rig %s: control side silent for %.1f s; presenting on, streaming paused",
                           self.rig_id, now - self._peer_seen)
            self._peer = None
        if self._peer is not None and now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            self._release_held()
            self._send(self._peer, "heartbeat", time_s=time.time(), n_sent=self.n_sent, in_session=True)

    def _handle(self, peer: bytes, frames: list[bytes]) -> None:
        try:
            message = decode_message(frames)
        except ProtocolError as error:
            logger.warning("rig %s: refused a malformed message: %s", self.rig_id, error)
            request_id = _request_id(frames)
            if request_id is not None:
                self._send(peer, "reply", id=request_id, ok=False, error=f"refused: {error}"[:256])
            return
        if message.type == "heartbeat":
            if peer == self._peer:
                self._peer_seen = time.monotonic()
            else:
                self._send(peer, "heartbeat", time_s=time.time(), in_session=False)
            return
        if message.type not in COMMANDS:
            logger.warning("rig %s: ignoring a %r message (rig to control only)", self.rig_id, message.type)
            return
        request_id = message["id"]
        if (peer, request_id) in self._replies:  # a retry: the same peer's request again
            self._socket.send_multipart([peer, *self._replies[peer, request_id]])
            return
        if message.type != "hello" and peer != self._peer:
            self._send(peer, "reply", id=request_id, ok=False, error=NOT_IN_SESSION)
            return
        self._peer_seen = time.monotonic()
        try:
            data = getattr(self, f"_on_{message.type}")(peer, message)
            frames = encode_message("reply", id=request_id, ok=True, data=data)
        except (ValueError, OSError) as error:
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                error = f"no space left on the rig's disk holding {self.state_dir}: free some space there"
            frames = encode_message("reply", id=request_id, ok=False, error=str(error)[:256])
        except Exception as error:  # a bug or a presenter fault: refuse, log, serve on
            logger.error("rig %s: %r failed", self.rig_id, message.type, exc_info=error)
            frames = encode_message("reply", id=request_id, ok=False,
                                    error=f"refused: internal error {type(error).__name__}: {error}"[:256])
        if message.type not in ("hello", "status", "resend"):
            self._replies[peer, request_id] = frames
            while len(self._replies) > _MAX_CACHED_REPLIES:
                self._replies.popitem(last=False)
        self._socket.send_multipart([peer, *frames])

    # ----- commands ----------------------------------------------------------------------------

    def _on_hello(self, peer: bytes, message) -> dict:
        set_rsvp = getattr(self.presenter, "set_rsvp", None)
        if set_rsvp is not None:  # a presenter that shows the experiment's timing: it may refuse it
            set_rsvp(message.get("rsvp"))
        if self._peer not in (None, peer):
            logger.info("rig %s: a new control process took over the session", self.rig_id)
            self._drop_transfer()  # the old peer's upload is not the new one's to finish
        self._peer, self._window_s = peer, tuple(message["window_s"])
        with self._lock:
            return {
                "rig_id": self.rig_id, "version": PROTOCOL_VERSION, "sites": list(self.presenter.sites),
                "bundle_sha256": self._session["sha256"], "n_stimuli": len(self._stimuli),
                "n_sent": len(self._outcomes), "stopped": self._session["stopped"],
            }

    def _on_bundle_chunk(self, peer: bytes, message) -> dict:
        sha256, n_bytes, chunk_size, index = message["sha256"], message["n_bytes"], message["chunk_size"], message["index"]
        if sha256 == self._session["sha256"] and not self._session["stopped"]:
            return {"complete": True, "n_stimuli": len(self._stimuli)}
        chunk = message.payload[0]
        _check_chunk(n_bytes, chunk_size, index, chunk)
        transfer = self._transfer
        if transfer is None or (transfer.sha256, transfer.n_bytes, transfer.chunk_size) != (sha256, n_bytes, chunk_size):
            self._drop_transfer()  # one upload at a time: another bundle or another layout starts over
            path = self.state_dir / f"incoming-{sha256[:16]}-{next(self._upload_numbers)}.part"
            transfer = self._transfer = _Transfer(sha256, n_bytes, chunk_size, path)
        try:
            with open(transfer.path, "r+b" if transfer.received else "wb") as file:
                file.seek(index * chunk_size)
                file.write(chunk)
        except BaseException:  # e.g. the disk is full: the upload failed, nothing of it is kept
            self._drop_transfer()
            raise
        transfer.received.add(index)
        if len(transfer.received) < transfer.n_chunks:
            return {"complete": False, "n_received": len(transfer.received)}
        self._transfer = None
        try:
            bundle = self._accept_bundle(transfer)
        finally:
            transfer.path.unlink(missing_ok=True)
        try:
            self._start_session(sha256, bundle)
        except BaseException:
            if bundle.name != self._session["bundle"]:  # keep the file of the session that goes on
                bundle.unlink(missing_ok=True)
            raise
        logger.info("rig %s: loaded bundle %s (%d stimuli)", self.rig_id, sha256[:12], len(self._stimuli))
        return {"complete": True, "n_stimuli": len(self._stimuli)}

    def _drop_transfer(self) -> None:
        if self._transfer is not None:
            self._transfer.path.unlink(missing_ok=True)
            self._transfer = None

    def _accept_bundle(self, transfer: _Transfer) -> Path:
        """Check a complete upload (file sha256, then the bundle in full) and move it into place."""
        actual = _hash_file(transfer.path)
        if actual != transfer.sha256:
            raise ValueError(
                f"bundle sha256 mismatch: announced {transfer.sha256}, received bytes hash to {actual}; "
                "the file changed or was corrupted in transfer: send it again"
            )
        try:
            check_bundle(transfer.path)
        except BundleError as error:
            logger.warning("rig %s: refused bundle %s: %s", self.rig_id, transfer.sha256[:12], error)
            raise ValueError(f"refused the bundle {transfer.sha256[:12]}: {error.problem}") from None
        bundle = self.state_dir / f"stimuli-{transfer.sha256[:16]}.h5"
        os.replace(transfer.path, bundle)
        return bundle

    def _on_queue(self, peer: bytes, message) -> dict:
        if not self._session["sha256"] or self._session["stopped"]:
            raise ValueError("no session: load a stimulus bundle before queueing presentations")
        pairs = [tuple(pair) for pair in message["presentations"]]
        with self._lock:
            n_waiting = len(self._queue)
        if n_waiting + len(pairs) > MAX_QUEUED:
            raise ValueError(f"queue full: at most {MAX_QUEUED} presentations wait on the rig, {n_waiting} do; "
                             f"queue fewer than {len(pairs)} at a time")
        unknown = sorted({sid for _, sid in pairs} - self._stimuli)
        if unknown:
            raise ValueError(f"unknown stimulus ids {unknown[:10]}: not in the loaded bundle; nothing was queued")
        with self._lock:
            known = self._shown | {pid for pid, _ in self._queue} | ({self._current[0]} if self._current else set())
            fresh = [pair for pair in pairs if pair[0] not in known]
            unique = list(dict(fresh).items())
            self._queue.extend(unique)
            self._lock.notify_all()
        return {"n_queued": len(unique), "n_duplicate": len(pairs) - len(unique)}

    def _on_status(self, peer: bytes, message) -> dict:
        with self._lock:
            pending = ([list(self._current)] if self._current else []) + [list(pair) for pair in self._queue]
            return {
                "pending": pending, "n_sent": len(self._outcomes), "bundle_sha256": self._session["sha256"],
                "n_stimuli": len(self._stimuli), "stopped": self._session["stopped"],
            }

    def _on_resend(self, peer: bytes, message) -> dict:
        with self._lock:
            stop = min(message["stop"], len(self._outcomes))
            frames = [self._stream_message(seq) for seq in range(message["start"], stop)]
        for message_frames in frames:
            self._socket.send_multipart([peer, *message_frames])
        return {"n_resent": len(frames)}

    def _on_stop(self, peer: bytes, message) -> dict:
        with self._lock:
            cancelled = [pid for pid, _ in self._queue]
            self._queue.clear()
            deadline = time.monotonic() + _ON_SCREEN_WAIT_S
            while self._current is not None and time.monotonic() < deadline and not self._halt.is_set():
                self._lock.wait(0.05)
            outcomes = list(self._outcomes)
        self._flush_stream()
        if self._session["stopped"]:  # stopped before: its recording is final, never written again
            return {"n_cancelled": len(cancelled), "cancelled": cancelled, "recording": self._session.get("recording", "")}
        recording = str(self.presenter.finish(outcomes)) if self._session["sha256"] else ""
        self._session = {**self._session, "stopped": True, "recording": recording}
        write_json(self.state_dir / _SESSION, self._session)
        return {"n_cancelled": len(cancelled), "cancelled": cancelled, "recording": recording}


def _request_id(frames: list[bytes]) -> str | None:
    """The request id of an undecodable message, when one can still be read (to answer it)."""
    try:
        header = json.loads(bytes(frames[0]))
        request_id = header.get("id")
    except (ValueError, AttributeError, IndexError, RecursionError, TypeError):
        return None
    return request_id if isinstance(request_id, str) and len(request_id) <= 256 else None
