"""The rig-link wire protocol: versioned messages as ZeroMQ multipart frames.

A message is a list of frames: frame 0 is a UTF-8 JSON object (the header) with at least
``"v"`` (the protocol version, :data:`PROTOCOL_VERSION`) and ``"type"``; a ``bundle_chunk``
carries one more frame with raw bytes, every other type none. Each type has a fixed set of
fields (:data:`MESSAGE_FIELDS`); a missing, unknown or mistyped field, another version, an
unknown type, a wrong number of frames, invalid JSON or a header over :data:`MAX_HEADER_BYTES`
is refused with :class:`ProtocolError`. The page docs/protocol.md documents every message for
labs that write their own rig agent, and the size limits below (``MAX_*``) that bound what one
peer can make the other hold.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_BUNDLE_BYTES",
    "MAX_CHUNKS",
    "MAX_QUEUED",
    "NOT_IN_SESSION",
    "MESSAGE_FIELDS",
    "COMMANDS",
    "Message",
    "ProtocolError",
    "encode_message",
    "decode_message",
]

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
#: Largest ``bundle_chunk`` payload (its ``chunk_size``), bytes.
MAX_CHUNK_BYTES = 1 << 24
#: ZMQ_MAXMSGSIZE of both sockets: a frame larger than this (the largest chunk plus room for
#: CURVE's framing) makes the receiving socket cut the sender off before anything reads it.
MAX_FRAME_BYTES = MAX_CHUNK_BYTES + 4096
#: Largest bundle file a rig accepts (``n_bytes`` of ``bundle_chunk``), bytes.
MAX_BUNDLE_BYTES = 1 << 32
#: Most chunks one bundle may be sent in (so ``chunk_size`` >= ``n_bytes`` / 65536).
MAX_CHUNKS = 1 << 16
#: Most presentations waiting in a rig's queue; a ``queue`` command that would pass it is refused.
MAX_QUEUED = 1 << 16
#: The error of a command from a peer that is not the rig's session peer (it has not said hello,
#: or the rig restarted and lost it); the control side says hello again and repeats the command.
NOT_IN_SESSION = "not in session: send hello first"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_INT = 2**63 - 1


class ProtocolError(ValueError):
    """A message that does not follow the protocol (wrong version, malformed, unknown type)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT <= value <= _MAX_INT


def _natural(value) -> bool:
    return _is_int(value) and value >= 0


def _real(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _text(value) -> bool:
    return isinstance(value, str) and len(value) <= 256


def _window(value) -> bool:
    return (
        isinstance(value, list) and len(value) == 2 and all(_real(v) for v in value)
        and 0 <= value[0] < value[1] <= 5
    )


def _rsvp(value) -> bool:
    return (
        isinstance(value, dict) and set(value) == {"on_s", "off_s", "image_size_deg"}
        and all(_real(v) for v in value.values()) and 0 < value["on_s"] <= 5 and 0 <= value["off_s"] <= 5
        and 0 < value["image_size_deg"] <= 60
    )


def _pairs(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and _natural(pair[0]) and _is_int(pair[1]) for pair in value
    )


def _counts(value) -> bool:
    return isinstance(value, list) and all(_natural(v) and v <= 65535 for v in value)


def _sha256(value) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


# (check, description) per kind of field; the description goes into error messages.
_KINDS = {
    "text": (_text, "a string of at most 256 characters"),
    "int": (_is_int, "an integer"),
    "natural": (_natural, "an integer >= 0"),
    "real": (_real, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "window": (_window, "[start, stop] in seconds with 0 <= start < stop <= 5"),
    "rsvp": (_rsvp, "{on_s, off_s, image_size_deg} with 0 < on_s <= 5, 0 <= off_s <= 5 (s), "
                    "0 < image_size_deg <= 60"),
    "pairs": (_pairs, "a list of [presentation_id >= 0, stimulus_id] integer pairs"),
    "counts": (_counts, "a list of integers in [0, 65535]"),
    "sha256": (_sha256, "64 lower-case hexadecimal characters"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
}

# type -> {field: (kind, required)}; "v" and "type" are in every header.
MESSAGE_FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {"id": ("text", True), "client": ("text", True), "window_s": ("window", True),
              "stream_from": ("natural", True), "rsvp": ("rsvp", False)},
    "bundle_chunk": {"id": ("text", True), "sha256": ("sha256", True), "n_bytes": ("natural", True),
                     "chunk_size": ("natural", True), "index": ("natural", True)},
    "queue": {"id": ("text", True), "presentations": ("pairs", True)},
    "status": {"id": ("text", True)},
    "resend": {"id": ("text", True), "start": ("natural", True), "stop": ("natural", True)},
    "stop": {"id": ("text", True)},
    "heartbeat": {"time_s": ("real", True), "n_sent": ("natural", False), "in_session": ("bool", False)},
    "reply": {"id": ("text", True), "ok": ("bool", True), "error": ("text", False), "data": ("object", False)},
    "outcome": {"seq": ("natural", True), "presentation_id": ("natural", True), "stimulus_id": ("int", True),
                "valid": ("bool", True), "onset_s": ("real", True), "counts": ("counts", False)},
}
COMMANDS = ("hello", "bundle_chunk", "queue", "status", "resend", "stop")
_N_PAYLOAD = {"bundle_chunk": 1}


@dataclass(frozen=True)
class Message:
    """One protocol message: its ``type``, its header ``fields`` (without v/type), raw ``payload`` frames."""

    type: str
    fields: dict
    payload: tuple[bytes, ...] = field(default=())

    def __getitem__(self, name: str):
        return self.fields[name]

    def get(self, name: str, default=None):
        return self.fields.get(name, default)


def _check(message_type: str, fields: dict, n_payload: int) -> None:
    if message_type not in MESSAGE_FIELDS:
        raise ProtocolError(
            f"unknown message type {message_type!r}; allowed types are {', '.join(MESSAGE_FIELDS)}."
        )
    spec = MESSAGE_FIELDS[message_type]
    unknown = sorted(set(fields) - set(spec))
    if unknown:
        raise ProtocolError(
            f"{message_type!r} message has unknown fields {unknown}; allowed fields are {', '.join(spec)}."
        )
    for name, (kind, required) in spec.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{message_type!r} message lacks the required field {name!r}.")
            continue
        check, description = _KINDS[kind]
        if not check(fields[name]):
            shown = repr(fields[name])[:80]
            raise ProtocolError(f"{message_type!r} field {name!r} must be {description}, but got {shown}.")
    expected = _N_PAYLOAD.get(message_type, 0)
    if n_payload != expected:
        raise ProtocolError(
            f"{message_type!r} message must carry {expected} payload frame(s) after the header, "
            f"but got {n_payload}."
        )


def encode_message(message_type: str, payload: tuple[bytes, ...] = (), **fields) -> list[bytes]:
    """Frames for a message of ``message_type`` with header ``fields`` and raw ``payload`` frames.

    Raises :class:`ProtocolError` when the message would not pass :func:`decode_message`.
    """
    _check(message_type, fields, len(payload))
    header = {"v": PROTOCOL_VERSION, "type": message_type, **fields}
    return [json.dumps(header, separators=(",", ":"), allow_nan=False).encode(), *payload]


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def decode_message(frames) -> Message:
    """Parse and check a list of frames (bytes) into a :class:`Message`.

    Raises :class:`ProtocolError` (a ``ValueError``) naming what is wrong for any input that
    is not a valid message of this protocol version.
    """
    frames = list(frames)
    if not frames:
        raise ProtocolError("empty message: expected a JSON header frame.")
    raw = bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes is over the limit of {MAX_HEADER_BYTES} bytes.")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(f"header is not valid UTF-8 JSON: {str(error)[:120]}.") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, but got {type(header).__name__}.")
    version = header.pop("v", None)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(
            f"unsupported protocol version {version!r}: this side speaks version {PROTOCOL_VERSION}; "
            "update the older side so both speak the same version."
        )
    message_type = header.pop("type", None)
    if not isinstance(message_type, str):
        raise ProtocolError(f"header field 'type' must be a string, but got {message_type!r}.")
    _check(message_type, header, len(frames) - 1)
    return Message(message_type, header, tuple(bytes(f) for f in frames[1:]))
