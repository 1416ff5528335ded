"""The control side of the rig link: a client for one rig agent (see docs/protocol.md).

:class:`RigClient` owns one ZeroMQ DEALER socket and is used from one thread. Every command is
a request with an id, waited for at most ``timeout_s`` per try and retried with the same id
(the rig deduplicates), after reconnecting when the rig has gone silent. Outcomes come back as
a numbered stream: :meth:`RigClient.read_outcomes` hands each one over exactly once and in
order, buffering early ones, dropping duplicates and asking the rig to resend any gap.
Heartbeats go both ways; a rig silent for ``timeout_s`` is treated as gone and the client
reconnects with exponential back-off for up to ``reconnect_s`` before raising
:class:`RigLinkError`. After every (re)connection the client reconciles with the rig: it
catches up on the stream and re-queues any presentation the rig no longer holds (e.g. after a
rig crash), and adopts presentations queued by an earlier control process. Nothing blocks forever.
Given the experiment's number of sites, it refuses a rig that records another number at hello,
before any bundle is sent.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections import deque
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from closedloop.core.logs import logger
from closedloop.core.validation import check_file, check_integer, check_number, check_option
from closedloop.link.keys import load_curve_keys
from closedloop.link.protocol import (
    MAX_BUNDLE_BYTES,
    MAX_CHUNK_BYTES,
    MAX_FRAME_BYTES,
    NOT_IN_SESSION,
    ProtocolError,
    decode_message,
    encode_message,
)

__all__ = ["RigLinkError", "RigRefusedError", "RigClient", "make_rig_client", "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 20
_AUTH_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class RigLinkError(RuntimeError):
    """The rig could not be reached, refused the connection, or stayed silent past every retry."""


class RigRefusedError(ValueError):
    """The rig answered a command with an error (e.g. unknown stimulus ids, bundle hash mismatch)."""


class _LinkDown(Exception):
    """Internal: no answer in time or the rig says we are not in its session; reconnect."""


class RigClient:
    """A client for the rig agent at ``address``.

    ``security``: "curve" (keys from ``keys_dir``: ``control.key_secret`` and ``rig.key``) or
    "plain". ``heartbeat_s``: heartbeat interval, s; ``timeout_s``: wait per try and silence that
    marks the rig as gone, s; ``retries``: tries per command; ``reconnect_s``: how long to keep
    reconnecting before giving up, s; ``window_s``: response window [start, stop) after onset, s,
    sent to the rig in hello. ``name`` prefixes request ids (use one name per control process).
    ``n_sites``: the number of sites the experiment expects (``[sites] n_sites``); when given, a rig
    whose hello lists another number of sites is refused with a ``ValueError`` (None: any); a rig
    that lists none sends no counts (a real presenter) and fits any. ``rsvp``: the experiment's RSVP
    timing and size, ``{"on_s", "off_s", "image_size_deg"}`` (s, s, degrees), sent in hello so that a
    display rig shows the experiment's values (None: not sent; a display rig then refuses the hello).
    """

    def __init__(
        self,
        address: str,
        *,
        security: str = "curve",
        keys_dir: str | Path | None = None,
        heartbeat_s: float = 1.0,
        timeout_s: float = 5.0,
        retries: int = 3,
        reconnect_s: float = 30.0,
        window_s: tuple[float, float] = (0.07, 0.17),
        name: str | None = None,
        n_sites: int | None = None,
        rsvp: dict | None = None,
    ) -> None:
        check_option("security", security, ("curve", "plain"))
        if security == "curve" and keys_dir is None:
            raise ValueError("'keys_dir' is required when security is 'curve'; make keys with `closedloop keys DIR`.")
        self.address, self.security, self.keys_dir = address, security, keys_dir
        self.heartbeat_s = check_number("heartbeat_s", heartbeat_s, minimum=0.001)
        self.timeout_s = check_number("timeout_s", timeout_s, minimum=0.001)
        self.retries = check_integer("retries", retries, minimum=1)
        self.reconnect_s = check_number("reconnect_s", reconnect_s, minimum=0.0)
        self.window_s = (check_number("window_s[0]", window_s[0], minimum=0.0), check_number("window_s[1]", window_s[1]))
        self.name = name or f"control-{os.getpid()}-{time.time_ns() % 10**9}"
        self.n_sites = None if n_sites is None else check_integer("n_sites", n_sites, minimum=1)
        self.rsvp = None if rsvp is None else {key: float(rsvp[key]) for key in ("on_s", "off_s", "image_size_deg")}
        self.rig: dict = {}
        self.outstanding: dict[int, int] = {}
        self._ids = itertools.count()
        self._context = zmq.Context()
        self._socket = self._monitor = None
        self._in_session = False
        self._bundle_sha256 = ""
        self._next_seq = 0
        self._early: dict[int, dict] = {}
        self._ready: deque[dict] = deque()
        self._rig_n_sent = 0
        self._gap_since: float | None = None
        self._awaiting: dict[str, dict | None] = {}
        self._last_heard = self._last_beat = 0.0  # _last_heard: the timeout's clock, restarted by each new connection
        self._last_message = 0.0  # when the rig last sent anything (the operator's clock)
        self._n_sessions = 0
        self.n_requeued = 0  # presentations queued again because the rig no longer held them (link health)

    # ----- public commands ---------------------------------------------------------------------

    @property
    def seconds_since_heard(self) -> float:
        """Seconds since the last message from the rig (link health for the operator display)."""
        return time.monotonic() - self._last_message if self._last_message else float("inf")

    @property
    def n_reconnects(self) -> int:
        """Sessions begun again with the rig after the first (link health for the operator display)."""
        return max(self._n_sessions - 1, 0)

    def connect(self) -> dict:
        """Say hello and reconcile with the rig; returns the rig's hello data (rig_id, sites, ...).

        Raises ``ValueError`` when ``n_sites`` was given and the rig records another number of sites.
        """
        self._ensure_session()
        return self.rig

    def load_bundle(self, path: str | Path, *, chunk_bytes: int = CHUNK_BYTES) -> dict:
        """Send the bundle file at ``path`` in chunks; the rig verifies its sha256 before loading it.

        Skips the transfer when the rig already holds this bundle (a resumed session). Returns
        the rig's answer (``n_stimuli``). Raises :class:`RigRefusedError` on a hash mismatch.
        """
        data = check_file("path", path).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        check_integer("chunk_bytes", chunk_bytes, minimum=1, maximum=MAX_CHUNK_BYTES)
        if len(data) > MAX_BUNDLE_BYTES:
            raise ValueError(f"bundle {str(path)!r} has {len(data)} bytes, over the rig's limit of {MAX_BUNDLE_BYTES} "
                             "(MAX_BUNDLE_BYTES); split the day's stimuli into smaller bundles.")
        self._ensure_session()
        if self.rig.get("bundle_sha256") == sha256 and not self.rig.get("stopped"):
            self._bundle_sha256 = sha256
            return {"complete": True, "n_stimuli": self.rig["n_stimuli"]}
        n_chunks = max(1, -(-len(data) // chunk_bytes))
        answer: dict = {}
        for index in range(n_chunks):
            chunk = data[index * chunk_bytes:(index + 1) * chunk_bytes]
            answer = self._call("bundle_chunk", (chunk,), sha256=sha256, n_bytes=len(data),
                                chunk_size=chunk_bytes, index=index)
            if answer["complete"]:
                break
        if not answer.get("complete"):
            raise RigLinkError(f"the rig did not complete the bundle transfer (last answer {answer}).")
        self._bundle_sha256 = sha256
        self._next_seq, self._early, self._ready = 0, {}, deque()
        self.outstanding.clear()
        self.rig.update(bundle_sha256=sha256, n_stimuli=answer["n_stimuli"], n_sent=0, stopped=False)
        return answer

    def queue(self, presentations) -> dict:
        """Queue ``presentations``: (presentation_id, stimulus_id) pairs, ids unique in the session.

        Returns the rig's answer (``n_queued``, ``n_duplicate``). Raises :class:`RigRefusedError`
        naming unknown stimulus ids (nothing is queued then).
        """
        pairs = [[check_integer("presentation_id", int(p), minimum=0), int(s)] for p, s in presentations]
        if not pairs:
            return {"n_queued": 0, "n_duplicate": 0}
        self._ensure_session()
        fresh = [(p, s) for p, s in pairs if p not in self.outstanding]
        self.outstanding.update(fresh)
        try:
            return self._call("queue", presentations=pairs)
        except RigRefusedError:
            for presentation_id, _ in fresh:
                self.outstanding.pop(presentation_id, None)
            raise

    def status(self) -> dict:
        """The rig's status: ``pending`` [[presentation_id, stimulus_id], ...], ``n_sent``, ..."""
        return self._call("status")

    def stop(self) -> dict:
        """End the session on the rig: the queue is dropped, the recording closed (the sim writes
        its .nev). Returns ``n_cancelled``, ``cancelled`` (presentation ids), ``recording`` (path)."""
        answer = self._call("stop", timeout_s=max(self.timeout_s, 60.0))
        for presentation_id in answer["cancelled"]:
            self.outstanding.pop(presentation_id, None)
        return answer

    def read_outcomes(self, timeout_s: float = 0.1) -> list[dict]:
        """Outcomes that arrived, in stream order, each exactly once; waits up to ``timeout_s`` s.

        Each is a dict: seq, presentation_id, stimulus_id, valid (bool), onset_s (recording
        clock, s), counts (list, spikes per site in the response window).
        """
        deadline = time.monotonic() + check_number("timeout_s", timeout_s, minimum=0.0)
        while not self._ready:
            self._ensure_session()
            try:
                self._pump(max(0.0, min(deadline - time.monotonic(), self.heartbeat_s)))
            except _LinkDown:
                self._drop_session()
            if time.monotonic() >= deadline:
                break
        out = list(self._ready)
        self._ready.clear()
        return out

    def close(self) -> None:
        """Close the socket (the rig keeps presenting what it has queued)."""
        self._drop_session()
        self._context.term()

    def __enter__(self) -> RigClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- connection ---------------------------------------------------------------------------

    def _open_socket(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.linger = 0
        socket.maxmsgsize = MAX_FRAME_BYTES
        try:
            if self.security == "curve":
                load_curve_keys(socket, self.keys_dir, "control")
            monitor = socket.get_monitor_socket(_AUTH_EVENTS)
        except BaseException:
            socket.close(linger=0)  # an open socket would block close() (the context waits for it)
            raise
        try:
            socket.connect(self.address)
        except zmq.ZMQError as error:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)
            raise RigLinkError(
                f"cannot connect to the rig at {self.address!r}: {error}; give [rig] address as tcp://HOST:PORT."
            ) from None
        self._socket, self._monitor = socket, monitor
        self._last_heard = time.monotonic()

    def _drop_session(self) -> None:
        self._in_session = False
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = self._monitor = None

    def _ensure_session(self) -> None:
        """Unless in session: connect, say hello and reconcile, retrying with back-off up to ``reconnect_s``."""
        if self._in_session:
            return
        deadline, delay = time.monotonic() + self.reconnect_s, 0.05
        while True:
            self._drop_session()
            self._open_socket()
            try:
                timing = {} if self.rsvp is None else {"rsvp": self.rsvp}
                self.rig = self._request("hello", client=self.name, window_s=list(self.window_s),
                                         stream_from=self._next_seq, **timing)
                self._in_session = True
                self._n_sessions += 1
                self._reconcile()
                return
            except _LinkDown:
                self._drop_session()
                if time.monotonic() + delay > deadline:
                    raise RigLinkError(
                        f"no answer from the rig at {self.address} for {self.reconnect_s:g} s: check that the rig "
                        "agent runs and listens there, and (CURVE) that keys_dir/rig.key is that rig's public key."
                    ) from None
                logger.warning("rig at %s not answering; retrying in %.2f s", self.address, delay)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _reconcile(self) -> None:
        """Check the rig's sites, catch up on the stream, adopt the rig's pending presentations, re-queue lost ones."""
        logger.info("in session with rig %r (%d sites)", self.rig["rig_id"], len(self.rig["sites"]))
        # a rig with no sites counts no spikes (a real presenter: the NSP's .nev has them), so any n_sites fits it
        if self.n_sites is not None and self.rig["sites"] and len(self.rig["sites"]) != self.n_sites:
            self._drop_session()
            raise ValueError(
                f"the rig {self.rig['rig_id']!r} at {self.address} records {len(self.rig['sites'])} sites, but the "
                f"experiment expects {self.n_sites} ([sites] n_sites); set [sites] n_sites = {len(self.rig['sites'])} "
                "in experiment.toml if this is the right rig, or point [rig] address at the rig that records "
                f"{self.n_sites} sites."
            )
        if self._bundle_sha256 and self.rig["bundle_sha256"] != self._bundle_sha256:
            self._drop_session()
            raise RigLinkError(
                f"the rig now holds bundle {self.rig['bundle_sha256'][:12] or 'none'} instead of "
                f"{self._bundle_sha256[:12]}: its session was lost; load the bundle again to start a new one."
            )
        status = self._request("status")
        self._rig_n_sent = status["n_sent"]
        while self._next_seq < status["n_sent"]:
            self._send("resend", id=self._new_id(), start=self._next_seq, stop=status["n_sent"])
            before = self._next_seq
            self._pump(self.timeout_s, until=lambda: self._next_seq >= status["n_sent"])
            if self._next_seq == before:
                raise _LinkDown
        pending = {pid: sid for pid, sid in status["pending"]}
        lost = [[pid, sid] for pid, sid in self.outstanding.items() if pid not in pending]
        self.outstanding.update(pending)
        if lost and not status["stopped"]:
            logger.warning("re-queueing %d presentations the rig no longer holds", len(lost))
            self.n_requeued += len(lost)
            self._request("queue", presentations=lost)

    # ----- messages -----------------------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self.name}-{next(self._ids)}"

    def _send(self, message_type: str, payload=(), **fields) -> None:
        self._socket.send_multipart(encode_message(message_type, payload, **fields))

    def _call(self, message_type: str, payload=(), *, timeout_s: float | None = None, **fields) -> dict:
        """Send a command and return its reply data; retry with the same id, reconnecting as needed."""
        request_id = self._new_id()
        for attempt in range(self.retries):
            try:
                self._ensure_session()
                return self._request(message_type, payload, request_id=request_id, timeout_s=timeout_s, **fields)
            except _LinkDown:
                logger.warning("no answer to %s (try %d of %d)", message_type, attempt + 1, self.retries)
                self._drop_session()
        raise RigLinkError(
            f"the rig at {self.address} did not answer {message_type!r} after {self.retries} tries of "
            f"{timeout_s or self.timeout_s:g} s."
        )

    def _request(self, message_type: str, payload=(), *, request_id: str | None = None,
                 timeout_s: float | None = None, **fields) -> dict:
        """Send one command and wait for its reply once; raises _LinkDown when none comes in time."""
        request_id = request_id or self._new_id()
        self._send(message_type, payload, id=request_id, **fields)
        return self._await(request_id, timeout_s or self.timeout_s, message_type)

    def _await(self, request_id: str, timeout_s: float, message_type: str) -> dict:
        self._awaiting[request_id] = None
        try:
            self._pump(timeout_s, until=lambda: self._awaiting[request_id] is not None)
            reply = self._awaiting[request_id]
        finally:
            self._awaiting.pop(request_id, None)
        if reply is None or (not reply["ok"] and reply.get("error") == NOT_IN_SESSION):  # the rig restarted
            raise _LinkDown
        if not reply["ok"]:
            raise RigRefusedError(f"the rig refused {message_type!r}: {reply.get('error', 'no reason given')}")
        return reply.get("data", {})

    def _pump(self, timeout_s: float, until=lambda: False) -> None:
        """Receive and handle messages for up to ``timeout_s`` s or until ``until()``; keep heartbeats going."""
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not until():
            now = time.monotonic()
            if now - self._last_heard > self.timeout_s:
                raise _LinkDown
            if self._in_session and now - self._last_beat >= self.heartbeat_s:
                self._last_beat = now
                self._send("heartbeat", time_s=time.time())
            self._request_gaps(now)
            next_beat = self._last_beat + self.heartbeat_s if self._in_session else deadline
            wait = min(deadline, next_beat) - now
            events = dict(poller.poll(max(0, int(wait * 1000))))
            if self._monitor in events:
                self._check_handshake()
            if self._socket in events:
                while self._socket.poll(0):
                    self._receive(self._socket.recv_multipart())
            if time.monotonic() >= deadline:
                return

    def _check_handshake(self) -> None:
        event = recv_monitor_message(self._monitor)
        if event["event"] & _AUTH_EVENTS:
            self._drop_session()
            raise RigLinkError(
                f"the rig at {self.address} refused the CURVE handshake (event {event['event']}): add this "
                "control process's public key (keys_dir/control.key) to the rig's allowed/ folder, and check "
                "that keys_dir/rig.key is the rig's public key."
            )

    def _receive(self, frames: list[bytes]) -> None:
        try:
            message = decode_message(frames)
        except ProtocolError as error:
            logger.warning("ignoring a malformed message from the rig: %s", error)
            return
        self._last_heard = self._last_message = time.monotonic()
        if message.type == "reply":
            if message["id"] in self._awaiting:
                self._awaiting[message["id"]] = message.fields
        elif message.type == "outcome":
            self._accept(message.fields)
        elif message.type == "heartbeat":
            if message.get("in_session") is False and self._in_session:
                raise _LinkDown
            self._rig_n_sent = max(self._rig_n_sent, message.get("n_sent", 0))
        else:
            logger.warning("ignoring a %r message from the rig (control to rig only)", message.type)

    def _accept(self, outcome: dict) -> None:
        seq = outcome["seq"]
        if seq < self._next_seq or seq in self._early:
            return
        self._early[seq] = outcome
        while self._next_seq in self._early:
            ready = self._early.pop(self._next_seq)
            self.outstanding.pop(ready["presentation_id"], None)
            self._ready.append(ready)
            self._next_seq += 1
        self._rig_n_sent = max(self._rig_n_sent, self._next_seq)
        self._gap_since = None if not self._early else self._gap_since

    def _request_gaps(self, now: float) -> None:
        """Ask for a resend when stream messages are missing for longer than a heartbeat."""
        end = max([*self._early, self._rig_n_sent - 1], default=-1) + 1
        if end <= self._next_seq:
            self._gap_since = None
            return
        if self._gap_since is None:
            self._gap_since = now
        elif now - self._gap_since >= self.heartbeat_s:
            logger.info("stream gap: asking the rig to resend %d..%d", self._next_seq, end - 1)
            self._send("resend", id=self._new_id(), start=self._next_seq, stop=end)
            self._gap_since = now


def make_rig_client(rig, *, window_s: tuple[float, float] = (0.07, 0.17), name: str | None = None,
                    n_sites: int | None = None, rsvp: dict | None = None) -> RigClient:
    """A :class:`RigClient` configured from a :class:`closedloop.config.RigSection` (``n_sites``, ``rsvp``: see
    RigClient)."""
    return RigClient(
        rig.address, security=rig.security, keys_dir=rig.keys_dir, heartbeat_s=rig.heartbeat_s,
        timeout_s=rig.timeout_s, retries=rig.retries, reconnect_s=rig.reconnect_s, window_s=window_s, name=name,
        n_sites=n_sites, rsvp=rsvp,
    )
