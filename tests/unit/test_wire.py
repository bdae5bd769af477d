import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet import PROTOCOL_VERSION
from swarmnet.errors import ProtocolError
from swarmnet.wire import (
    CARD_BYTES,
    MAX_CARDS,
    Limits,
    MsgType,
    RejectCode,
    decode,
    encode,
    fit_cards,
    reject,
    reply,
    request,
)


def header(**fields):
    base = {"v": PROTOCOL_VERSION, "t": "pull", "id": "a", "mid": 1, "sizes": [],
            "clock": 0, "want": None, "version": None}
    base.update(fields)
    return msgpack.packb(base)


def hello(card=None, peers=(), sender="a"):
    card = card or {"id": sender, "addr": "tcp://h:1", "hb": 1}
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": "hello", "id": sender, "mid": 1, "sizes": [],
                          "card": card, "peers": list(peers)})


def test_round_trip_with_payload_frames():
    payload = bytearray(b"\x01" * 1000)
    msg = request(MsgType.SNAPSHOT, "peer-a", [payload, b"xy"], version=3, codec="fp32",
                  meta={"n": 250}, clock=7, age=0.5)
    out = decode(encode(msg))
    assert out.type is MsgType.SNAPSHOT and out.sender == "peer-a" and out.mid == msg.mid
    assert out.body == {"version": 3, "codec": "fp32", "meta": {"n": 250}, "clock": 7, "age": 0.5}
    fingerprinted = decode(encode(request(MsgType.SNAPSHOT, "peer-a", [], version=3, codec="fp32", meta={"n": 0},
                                          clock=7, age=0.5, layout="0123456789abcdef")))
    assert fingerprinted.body["layout"] == "0123456789abcdef"  # optional: kept when sent
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
        ([header(v=True)], "version"),  # a boolean is not the integer 1
        ([header(mid=-1)], "malformed"),
        ([header(re=-1)], "malformed"),
        ([header(t="launch_missiles")], "unknown_type"),
        ([header(clock="soon")], "malformed"),
        ([header(clock=True)], "malformed"),
        ([msgpack.packb({"v": PROTOCOL_VERSION, "t": "pull", "id": "a", "mid": 1, "sizes": []})], "malformed"),
        ([header(sizes=[4]), b"abc"], "size_mismatch"),
        ([header(sizes=[]), b"abc"], "size_mismatch"),
        ([header(sizes=[-1]), b""], "malformed"),
        ([header(sizes=["a"]), b""], "malformed"),
        ([header(id=5)], "malformed"),
        ([header(id="i" * 193)], "malformed"),  # logged: a sender id is at most a name and 7 more
        ([header(id="a\n12:00:01 ERROR [peer0] forged")], "malformed"),  # a forged log line
        ([hello({"id": "a", "addr": "tcp://h:1", "hb": 1, "name": "n\rm"})], "malformed"),
        ([msgpack.packb({1: 1, 2: "status"})], "malformed"),
        ([header(re=float("inf"))], "malformed"),
        ([header(re="7")], "malformed"),
        *[([header(t="snapshot", version=1, codec="fp32", meta={}, age=age)], "malformed")
          for age in (float("nan"), float("inf"), -1.0)],  # would poison the staleness average
        ([header(t="snapshot", version=1, codec="fp32", meta={}, age=0.0, layout=7)], "malformed"),
        ([b"x" * 70000], "oversized"),
        ([header(version=True)], "malformed"),
        ([header(sizes=[True]), b"x"], "malformed"),
        ([header(sizes=[1]), b"x"], "malformed"),  # a pull carries no payload frames
        ([header(t="status", sizes=[0]), b""], "malformed"),
        ([hello({"id": "a"})], "malformed"),
        ([hello({"id": "a", "addr": "x" * 600, "hb": 1})], "malformed"),
        ([hello({"id": "a", "addr": "tcp://h:1", "hb": 1, "name": "n" * 200})], "malformed"),
        ([hello({"id": "a", "addr": "tcp://h:1", "hb": 1, "name": 7})], "malformed"),
        ([hello({"id": "a", "addr": "tcp://h:1", "hb": 1, "done": "yes"})], "malformed"),
        ([hello({"id": "a", "addr": "nonsense", "hb": 1})], "malformed"),
        ([hello({"id": "a", "addr": "tcp://", "hb": 1})], "malformed"),
        ([hello({"id": "b", "addr": "tcp://h:1", "hb": 1})], "malformed"),  # not the sender's card
        ([hello(peers=[{"id": f"p{i}", "addr": "tcp://h:1", "hb": 1} for i in range(MAX_CARDS)])], "malformed"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason_code(frames, code):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == code


def test_a_bad_peer_card_is_named_as_one():
    with pytest.raises(ProtocolError, match=r"hello: peer card 1: missing field 'hb'"):
        decode([hello({"id": "a", "addr": "tcp://h:1", "hb": 1}, [{"id": "b", "addr": "tcp://h:2"}])])


def test_a_refusal_knows_the_message_id_and_sender_once_the_header_is_readable():
    with pytest.raises(ProtocolError) as info:
        decode([header(v=PROTOCOL_VERSION + 1, mid=7, id="peer3-a1b2c3")])
    assert (info.value.code, info.value.mid, info.value.sender) == ("version", 7, "peer3-a1b2c3")
    with pytest.raises(ProtocolError, match="header: its map keys must be strings"):
        decode([msgpack.packb({1: 1, 2: "status"})])
    with pytest.raises(ProtocolError) as info:
        decode([header(clock="soon", mid=True)])
    assert info.value.mid == 0
    with pytest.raises(ProtocolError) as info:
        decode([b"\xc1garbage"])
    assert info.value.mid == 0


def test_cards_fit_a_message_by_count_and_by_bytes():
    small = [{"id": f"p{i}", "addr": "tcp://h:1", "hb": 1, "name": "n", "done": False} for i in range(300)]
    assert fit_cards(small) == small[: MAX_CARDS - 1]
    # The longest cards the protocol admits still make a message every peer can read.
    long = [{"id": "i" * 128, "addr": "ipc://" + "a" * 506, "hb": 2**40, "name": "n" * 128, "done": False}] * MAX_CARDS
    fitted = fit_cards(long)
    assert 0 < len(fitted) < MAX_CARDS - 1
    assert len(msgpack.packb(fitted)) <= CARD_BYTES
    decode([hello(long[0], fitted, sender="i" * 128)])
    # A peer's id is its name (128 characters at most) and "-" and 6 hex digits.
    longest_id = "n" * 128 + "-a1b2c3"
    decode([hello({"id": longest_id, "addr": "tcp://h:1", "hb": 1, "name": "n" * 128}, sender=longest_id)])


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


def test_relayed_cards_with_unusable_addresses_are_left_out_not_the_message():
    good = {"id": "b", "addr": "ipc:///runs/my run/b/peer.sock", "hb": 1}  # a path with a space is fine
    bad = [{"id": "c", "addr": "127.0.0.1:7000", "hb": 1}, {"id": "d", "addr": "tcp://h:1\n", "hb": 1}]
    msg = decode([hello(peers=[bad[0], good, bad[1]])])
    assert msg.body["peers"] == [good]


def test_a_models_fingerprint_is_what_protocol_md_says():
    import hashlib

    from swarmnet.peer.state import layout_of

    assert layout_of([(8, 4), (8,), (2, 8), (2,)]) == hashlib.blake2b(b"[[8,4],[8],[2,8],[2]]", digest_size=8).hexdigest()
    assert layout_of([(2, 8), (2,), (8, 4), (8,)]) != layout_of([(8, 4), (8,), (2, 8), (2,)])  # as many coordinates
