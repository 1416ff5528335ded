"""The wire protocol: round trips, every refusal, and a fuzz test of the decoder."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.link.protocol import (
    MAX_HEADER_BYTES,
    MESSAGE_FIELDS,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_message,
    encode_message,
)

SHA = "ab" * 32
pytestmark = pytest.mark.timeout(60)

EXAMPLES = {
    "hello": {"id": "c-0", "client": "control", "window_s": [0.07, 0.17], "stream_from": 0},
    "bundle_chunk": {"id": "c-1", "sha256": SHA, "n_bytes": 3, "chunk_size": 3, "index": 0},
    "queue": {"id": "c-2", "presentations": [[0, 5], [1, -1]]},
    "status": {"id": "c-3"},
    "resend": {"id": "c-4", "start": 2, "stop": 9},
    "stop": {"id": "c-5"},
    "heartbeat": {"time_s": 1.5, "n_sent": 3, "in_session": True},
    "reply": {"id": "c-0", "ok": True, "data": {"sites": ["a"]}},
    "outcome": {"seq": 4, "presentation_id": 7, "stimulus_id": 2, "valid": False, "onset_s": 12.25,
                "counts": [0, 3, 65535]},
}


def _header(**fields) -> list[bytes]:
    return [json.dumps(fields).encode()]


def test_every_message_type_round_trips():
    assert set(EXAMPLES) == set(MESSAGE_FIELDS)
    for message_type, fields in EXAMPLES.items():
        payload = (b"\x00\x01\xff",) if message_type == "bundle_chunk" else ()
        message = decode_message(encode_message(message_type, payload, **fields))
        assert (message.type, message.fields, message.payload) == (message_type, fields, payload)


def test_an_outcome_may_come_without_counts():
    """A real presenter knows validity, not spike counts: it leaves 'counts' out."""
    fields = {key: value for key, value in EXAMPLES["outcome"].items() if key != "counts"}
    assert decode_message(encode_message("outcome", **fields)).fields == fields
    with pytest.raises(ProtocolError, match="lacks the required field 'valid'"):
        encode_message("outcome", **{key: value for key, value in fields.items() if key != "valid"})


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "empty message"),
        ([b"\xff\xfe"], "not valid UTF-8 JSON"),
        ([b"{"], "not valid UTF-8 JSON"),
        ([b"[1, 2]"], "header must be a JSON object, but got list"),
        (_header(type="status", id="x"), "unsupported protocol version None"),
        (_header(v=2, type="status", id="x"), "unsupported protocol version 2: this side speaks version 1"),
        (_header(v=True, type="status", id="x"), "unsupported protocol version True"),
        (_header(v=1, type=3), "'type' must be a string, but got 3"),
        (_header(v=1, type="launch", id="x"), "unknown message type 'launch'; allowed types are hello"),
        (_header(v=1, type="status"), "'status' message lacks the required field 'id'"),
        (_header(v=1, type="status", id="x", color="red"), r"unknown fields \['color'\]"),
        (_header(v=1, type="queue", id="x", presentations=[[1]]), "'presentations' must be a list of"),
        (_header(v=1, type="queue", id="x", presentations=[[-1, 2]]), "presentation_id >= 0"),
        (_header(v=1, type="outcome", seq=0, presentation_id=0, stimulus_id=0, valid=1, onset_s=0.0, counts=[]),
         "'valid' must be true or false, but got 1"),
        (_header(v=1, type="outcome", seq=0, presentation_id=0, stimulus_id=0, valid=True, onset_s=0.0,
                 counts=[70000]), r"'counts' must be a list of integers in \[0, 65535\]"),
        (_header(v=1, type="hello", id="x", client="c", window_s=[0.2, 0.1], stream_from=0),
         "'window_s' must be"),
        (_header(v=1, type="hello", id="x", client="c", window_s=[0.07, 0.17], stream_from=0,
                 rsvp={"on_s": 0.0, "off_s": 0.1, "image_size_deg": 8.0}), r"'rsvp' must be \{on_s, off_s, image_size_deg\}"),
        (_header(v=1, type="hello", id="x", client="c", window_s=[0.07, 0.17], stream_from=0,
                 rsvp={"on_s": 0.1, "off_s": 0.1}), r"'rsvp' must be \{on_s, off_s, image_size_deg\} with 0 < on_s"),
        (_header(v=1, type="bundle_chunk", id="x", sha256="abc", n_bytes=1, chunk_size=1, index=0),
         "'sha256' must be 64 lower-case hexadecimal characters"),
        (_header(v=1, type="bundle_chunk", id="x", sha256=SHA, n_bytes=1, chunk_size=1, index=0),
         "must carry 1 payload frame"),
        ([json.dumps({"v": 1, "type": "stop", "id": "x"}).encode(), b"extra"], "must carry 0 payload frame"),
        ([b'{"v": 1, "type": "heartbeat", "time_s": NaN}'], "not valid UTF-8 JSON: NaN is not allowed"),
        ([b"[" * 100_000], "not valid UTF-8 JSON"),
        ([b" " * (MAX_HEADER_BYTES + 1)], "over the limit"),
    ],
)
def test_malformed_messages_are_refused_with_a_clear_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode_message(frames)


def test_hello_carries_the_experiments_rsvp_timing_or_none():
    rsvp = {"on_s": 0.1, "off_s": 0.1, "image_size_deg": 8.0}
    message = decode_message(encode_message("hello", id="c-0", client="control", window_s=[0.07, 0.17], stream_from=0,
                                            rsvp=rsvp))
    assert message["rsvp"] == rsvp
    older = decode_message(encode_message("hello", id="c-0", client="control", window_s=[0.07, 0.17], stream_from=0))
    assert older.get("rsvp") is None  # optional: a hello without it is still version 1


def test_encoder_refuses_what_the_decoder_would():
    with pytest.raises(ProtocolError, match="'counts' must be a list of integers"):
        encode_message("outcome", seq=0, presentation_id=0, stimulus_id=0, valid=True, onset_s=0.0, counts=[-1])
    with pytest.raises(ValueError, match="lacks the required field 'id'"):
        encode_message("stop")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


def _near_valid():
    """Headers close to valid ones: a real type and version with some fields replaced or dropped."""

    def mutate(message_type, replacements, drop):
        fields = {**EXAMPLES[message_type], **replacements}
        for name in drop:
            fields.pop(name, None)
        return [json.dumps({"v": PROTOCOL_VERSION, "type": message_type, **fields}).encode()]

    names = st.sampled_from(sorted({name for spec in MESSAGE_FIELDS.values() for name in spec}))
    return st.builds(mutate, st.sampled_from(sorted(EXAMPLES)), st.dictionaries(names, _json, max_size=3),
                     st.lists(names, max_size=2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.lists(st.binary(max_size=200), max_size=4),
    st.lists(_json.map(lambda v: json.dumps(v).encode()), min_size=1, max_size=3),
    _near_valid(),
))
def test_decoder_survives_fuzzing(frames):
    try:
        message = decode_message(frames)
    except ProtocolError:
        return
    assert decode_message(encode_message(message.type, message.payload, **message.fields)) == message
