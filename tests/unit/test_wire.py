import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet import PROTOCOL_VERSION
from swarmnet.errors import ProtocolError
from swarmnet.wire import Limits, MsgType, RejectCode, decode, encode, reject, reply, request


def header(**fields):
    base = {"v": PROTOCOL_VERSION, "t": "pull", "id": "a", "mid": 1, "sizes": [],
            "clock": 0, "want": None, "version": None}
    base.update(fields)
    return msgpack.packb(base)


def test_round_trip_with_payload_frames():
    payload = bytearray(b"\x01" * 1000)
    msg = request(MsgType.SNAPSHOT, "peer-a", [payload, b"xy"], version=3, codec="fp32",
                  meta={"n": 250}, clock=7, age=0.5)
    out = decode(encode(msg))
    assert out.type is MsgType.SNAPSHOT and out.sender == "peer-a" and out.mid == msg.mid
    assert out.body == {"version": 3, "codec": "fp32", "meta": {"n": 250}, "clock": 7, "age": 0.5}
    assert [bytes(f) for f in out.frames] == [bytes(payload), b"xy"]
    answer = decode(encode(reply(out, MsgType.ACK, "peer-b")))
    assert answer.re == msg.mid
    refusal = decode(encode(reject(out, "peer-b", RejectCode.GONE, "old")))
    assert refusal.body == {"code": "gone", "reason": "old"}


@pytest.mark.parametrize(
    "frames,code",
    [
        ([], "malformed"),
        ([b"\xc1garbage"], "malformed"),
        ([msgpack.packb([1, 2])], "malformed"),
        ([header(v=PROTOCOL_VERSION + 1)], "version"),
        ([header(t="launch_missiles")], "unknown_type"),
        ([header(clock="soon")], "malformed"),
        ([header(clock=True)], "malformed"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": "pull", "id": "a", "mid": 1, "sizes": []})], "malformed"),
        ([header(sizes=[4]), b"abc"], "size_mismatch"),
        ([header(sizes=[]), b"abc"], "size_mismatch"),
        ([header(sizes=[-1]), b""], "oversized"),
        ([header(id=5)], "malformed"),
        ([header(re=float("inf"))], "malformed"),
        ([header(re="7")], "malformed"),
        ([b"x" * 70000], "oversized"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": "hello", "id": "a", "mid": 1, "sizes": [],
                         "card": {"id": "a"}, "peers": []})], "malformed"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": "hello", "id": "a", "mid": 1, "sizes": [],
                         "card": {"id": "a", "addr": "x" * 600, "hb": 1}, "peers": []})], "malformed"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason_code(frames, code):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == code


def test_frame_limits():
    limits = Limits(max_frame_bytes=10, max_frames=2)
    with pytest.raises(ProtocolError, match="oversized"):
        decode([header(sizes=[11]), b"x" * 11], limits)
    with pytest.raises(ProtocolError, match="payload frames"):
        decode([header(sizes=[1, 1, 1]), b"a", b"b", b"c"], limits)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_random_bytes_never_escape_as_anything_but_protocol_errors(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass
