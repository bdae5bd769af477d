"""The wire protocol, sans-IO: message types, header encoding and validation (docs/protocol.md).

A message is a multipart: frame 0 is a msgpack map (the header), frames 1..k are raw payload
buffers whose byte sizes the header lists under ``sizes``. Tensors never pass through msgpack.
Frames come from the network, so :func:`decode` checks the header's size before unpacking it,
then the protocol version, the type, every field the type needs and the payload sizes, before
anything else looks at the message.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from swarmnet import PROTOCOL_VERSION
from swarmnet.buffers import Buffer
from swarmnet.errors import ProtocolError


class MsgType(enum.StrEnum):
    HELLO = "hello"  # membership gossip: my card and the peers I know; answered by PEERS
    PEERS = "peers"  # reply to HELLO: the server's card and the peers it knows
    PULL = "pull"  # ask for the latest snapshot (or a part of a given version); answered by SNAPSHOT
    SNAPSHOT = "snapshot"  # an encoded snapshot: codec meta in the header, payload frames after it
    NUDGE = "nudge"  # symmetric mode: the initiator's encoded snapshot for the neighbour to merge
    STATUS = "status"  # ask for a peer's status; answered by STATUS_REPLY
    STATUS_REPLY = "status_reply"
    BYE = "bye"  # the sender is leaving the swarm; answered by ACK
    ACK = "ack"  # request done
    REJECT = "reject"  # request refused: ``code`` and ``reason`` say why


class RejectCode(enum.StrEnum):
    VERSION = "version"  # protocol version mismatch
    MALFORMED = "malformed"  # the request broke the protocol
    NOT_READY = "not_ready"  # no snapshot published yet
    GONE = "gone"  # the snapshot version asked for is no longer held
    DRAINING = "draining"  # the peer is stopping and accepts no more updates
    MISMATCH = "mismatch"  # model shape or codec differ from ours
    BUSY = "busy"  # too many requests in progress


FULL = "full"
"""``want`` of a pull asking for the snapshot losslessly, as fp32 whatever the swarm's codec
(a newcomer adopting a neighbour's model); such a pull moves no clock."""

_CARD = {"id": str, "addr": str, "hb": int}

# Required header fields per message type (beyond v, t, id, mid, sizes) and their types.
SCHEMA: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {"card": dict, "peers": list},
    MsgType.PEERS: {"card": dict, "peers": list},
    MsgType.PULL: {"clock": int, "want": object, "version": (int, type(None))},
    MsgType.SNAPSHOT: {"version": int, "codec": str, "meta": dict, "clock": int, "age": float},
    MsgType.NUDGE: {"used": int, "codec": str, "meta": dict},
    MsgType.STATUS: {},
    MsgType.STATUS_REPLY: {"status": dict},
    MsgType.BYE: {},
    MsgType.ACK: {},
    MsgType.REJECT: {"code": str, "reason": str},
}
REPLIES = {MsgType.PEERS, MsgType.SNAPSHOT, MsgType.STATUS_REPLY, MsgType.ACK, MsgType.REJECT}

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Message:
    type: MsgType
    sender: str
    body: dict[str, Any] = field(default_factory=dict)
    frames: tuple[Buffer, ...] = ()
    mid: int = 0
    """Message id; a reply carries the id of its request in ``re``."""
    re: int = 0


def request(type: MsgType, sender: str, frames: Sequence[Buffer] = (), **body: Any) -> Message:
    return Message(type, sender, body, tuple(frames), mid=next(_ids))


def reply(to: Message, type: MsgType, sender: str, frames: Sequence[Buffer] = (), **body: Any) -> Message:
    return Message(type, sender, body, tuple(frames), mid=next(_ids), re=to.mid)


def reject(to: Message, sender: str, code: RejectCode, reason: str) -> Message:
    return reply(to, MsgType.REJECT, sender, code=str(code), reason=reason[:500])


def encode(msg: Message) -> list[Buffer]:
    header = dict(msg.body)
    header.update(
        v=PROTOCOL_VERSION,
        t=str(msg.type),
        id=msg.sender,
        mid=msg.mid,
        sizes=[memoryview(f).nbytes for f in msg.frames],
    )
    if msg.re:
        header["re"] = msg.re
    return [msgpack.packb(header, use_bin_type=True), *msg.frames]


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 65536
    max_frame_bytes: int = 2**31 - 1
    max_frames: int = 64


def decode(frames: Sequence[Buffer], limits: Limits = Limits()) -> Message:
    """Validate and decode a received multipart; raises ProtocolError with a stable code."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError("malformed", f"{len(frames) - 1} payload frames (limit {limits.max_frames})")
    raw = memoryview(frames[0])
    if raw.nbytes > limits.max_header_bytes:
        raise ProtocolError("oversized", f"header of {raw.nbytes} bytes (limit {limits.max_header_bytes})")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed", f"header is not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not a map")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version!r}, this peer speaks {PROTOCOL_VERSION}")
    try:
        mtype = MsgType(header.get("t"))
    except ValueError:
        raise ProtocolError("unknown_type", f"unknown message type {header.get('t')!r}") from None
    _check(header, {"id": str, "mid": int, "sizes": list}, mtype)
    _check(header, SCHEMA[mtype], mtype)
    sizes = header["sizes"]
    payload = [memoryview(f).nbytes for f in frames[1:]]
    if not all(isinstance(s, int) and 0 <= s <= limits.max_frame_bytes for s in sizes):
        raise ProtocolError("oversized", f"{mtype}: declared frame sizes out of range")
    if sizes != payload:
        raise ProtocolError("size_mismatch", f"{mtype}: header declares frame sizes {sizes[:8]}, got {payload[:8]}")
    if mtype in (MsgType.HELLO, MsgType.PEERS):
        _check_cards(header, mtype)
    re = header.get("re", 0)
    if not isinstance(re, int) or isinstance(re, bool):
        raise ProtocolError("malformed", f"{mtype}: field 're' has type {type(re).__name__}")
    body = {k: header[k] for k in SCHEMA[mtype]}
    return Message(mtype, header["id"], body, tuple(frames[1:]), header["mid"], re)


def _check(header: Mapping[str, Any], schema: Mapping[str, Any], mtype: MsgType) -> None:
    for key, kind in schema.items():
        if key not in header:
            raise ProtocolError("malformed", f"{mtype}: missing field {key!r}")
        value = header[key]
        if kind is object:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise ProtocolError("malformed", f"{mtype}: field {key!r} has type {type(value).__name__}")


def _check_cards(header: Mapping[str, Any], mtype: MsgType) -> None:
    for card in [header["card"], *header["peers"]]:
        if not isinstance(card, dict):
            raise ProtocolError("malformed", f"{mtype}: peer card is not a map")
        _check(card, _CARD, mtype)
        if len(card["addr"]) > 512 or len(card["id"]) > 128:
            raise ProtocolError("malformed", f"{mtype}: peer card field too long")
