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
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

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


CARRIES_FRAMES = frozenset({MsgType.SNAPSHOT, MsgType.NUDGE})
"""The message types with payload frames; any other type with one is malformed."""


class RejectCode(enum.StrEnum):
    VERSION = "version"  # protocol version mismatch
    MALFORMED = "malformed"  # the request broke the protocol
    NOT_READY = "not_ready"  # no snapshot published yet
    GONE = "gone"  # the snapshot version asked for is no longer held
    DRAINING = "draining"  # the peer is stopping and accepts no more updates
    MISMATCH = "mismatch"  # the request uses another codec than ours (a wrong size is malformed)
    BUSY = "busy"  # no room for another full pull or nudge now (other requests wait their turn)


FULL = "full"
"""``want`` of a pull asking for the snapshot losslessly, as fp32 whatever the swarm's codec
(a newcomer adopting a neighbour's model); such a pull moves no clock."""

_CARD = {"id": str, "addr": str, "hb": int}
_CARD_OPTIONAL = {"name": str, "done": bool}
MAX_CARDS = 128
"""Peer cards per message: the card and the list together."""
CARD_BYTES = 32768
"""Packed bytes of the cards a peer puts in one message (half the default header limit), so
that cards with long names or addresses still leave a reply well under any peer's limit."""
MAX_ID_CHARS = 192
"""Characters of a sender id (a header's ``id``, a card's): a peer's is its name (at most 128)
and 7 more."""
_CARD_FIELD_CHARS = {"id": MAX_ID_CHARS, "addr": 512, "name": 128}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
"""Characters no id or name may hold (ids and names go into logs and file names)."""
_ADDRESS = re.compile(r"[a-z][a-z0-9+.-]*://[^\x00-\x1f\x7f]+")
"""A card's address: a transport scheme, then a location (tcp://host:port, ipc://path with
spaces, ...) without control characters."""

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
OPTIONAL: dict[MsgType, dict[str, Any]] = {MsgType.SNAPSHOT: {"layout": str}}
"""Header fields a message may carry, and their types (a peer of an earlier release sends none)."""
REPLIES = {MsgType.PEERS, MsgType.SNAPSHOT, MsgType.STATUS_REPLY, MsgType.ACK, MsgType.REJECT}

_ids = itertools.count(1)


def next_mid() -> int:
    """The next ``mid`` of this process's counter, shared by everything it sends."""
    return next(_ids)


CardT = TypeVar("CardT", bound=Mapping[str, Any])


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
    return Message(type, sender, body, tuple(frames), mid=next_mid())


def reply(to: Message, type: MsgType, sender: str, frames: Sequence[Buffer] = (), **body: Any) -> Message:
    return Message(type, sender, body, tuple(frames), mid=next_mid(), re=to.mid)


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


def snapshot_frame_limit(n: int) -> int:
    """A frame limit that every snapshot of a model of ``n`` float coordinates fits: twice its
    fp32 form (4 bytes a coordinate, what a newcomer pulls), plus 1 MiB for the smallest models.
    The largest codec frame is a lattice snapshot at its finest step, about 6 bytes a coordinate
    (48-bit planes)."""
    return 8 * n + (1 << 20)


def fit_cards(cards: Sequence[CardT], budget: int = CARD_BYTES, limit: int = MAX_CARDS - 1) -> list[CardT]:
    """The leading cards, at most ``limit`` (by default what a gossip message carries beside
    the sender's own card), whose packed size stays within ``budget`` bytes."""
    fitted: list[CardT] = []
    for card in cards[:limit]:
        budget -= len(msgpack.packb(card, use_bin_type=True))
        if budget < 0:
            break
        fitted.append(card)
    return fitted


def decode(frames: Sequence[Buffer], limits: Limits = Limits()) -> Message:
    """Validate and decode a received multipart; raises ProtocolError with a stable code, and
    with the message's ``mid`` once the header could be read (so the refusal can answer it)."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError("malformed", f"{len(frames) - 1} payload frames (limit {limits.max_frames})")
    raw = memoryview(frames[0])
    if raw.nbytes > limits.max_header_bytes:
        raise ProtocolError("oversized", f"header of {raw.nbytes} bytes (limit {limits.max_header_bytes})")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except ValueError as exc:
        why = "its map keys must be strings" if "map key" in str(exc) else f"not msgpack: {exc.__class__.__name__}"
        raise ProtocolError("malformed", f"header is {why}" if why.startswith("not") else f"header: {why}") from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed", f"header is not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not a map")
    try:
        return _validated(header, frames, limits)
    except ProtocolError as exc:
        mid, sender = header.get("mid"), header.get("id")
        exc.mid = mid if type(mid) is int and mid > 0 else 0
        exc.sender = sender[:MAX_ID_CHARS] if isinstance(sender, str) else None
        raise


def _validated(header: dict[str, Any], frames: Sequence[Buffer], limits: Limits) -> Message:
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version!r}, this peer speaks {PROTOCOL_VERSION}")
    try:
        mtype = MsgType(header.get("t"))
    except ValueError:
        raise ProtocolError("unknown_type", f"unknown message type {header.get('t')!r}") from None
    _check(header, {"id": str, "mid": int, "sizes": list}, str(mtype))
    if len(header["id"]) > MAX_ID_CHARS:
        raise ProtocolError("malformed", f"{mtype}: field 'id' has {len(header['id'])} characters, over {MAX_ID_CHARS}")
    if _CONTROL.search(header["id"]):  # it is logged: a line break would forge a log line
        raise ProtocolError("malformed", f"{mtype}: field 'id' holds control characters")
    if header["mid"] < 0:
        raise ProtocolError("malformed", f"{mtype}: field 'mid' is negative (use 1, 2, ... per request; 0: none)")
    _check(header, SCHEMA[mtype], str(mtype))
    optional = {key: kind for key, kind in OPTIONAL.get(mtype, {}).items() if key in header}
    _check(header, optional, str(mtype))
    sizes = header["sizes"]
    payload = [memoryview(f).nbytes for f in frames[1:]]
    if not all(type(s) is int and s >= 0 for s in sizes):
        raise ProtocolError("malformed", f"{mtype}: declared frame sizes must be integers >= 0")
    if any(s > limits.max_frame_bytes for s in sizes):
        raise ProtocolError("oversized", f"{mtype}: a declared frame size is over the limit of "
                            f"{limits.max_frame_bytes} bytes (network.max_message_bytes)")
    if sizes != payload:
        raise ProtocolError("size_mismatch", f"{mtype}: header declares frame sizes {sizes[:8]}, got {payload[:8]}")
    if payload and mtype not in CARRIES_FRAMES:
        raise ProtocolError("malformed", f"{mtype}: carries no payload frames, got {len(payload)}")
    if mtype in (MsgType.HELLO, MsgType.PEERS):
        _check_cards(header, mtype)
    if mtype is MsgType.SNAPSHOT and not 0 <= header["age"] < math.inf:  # NaN fails too
        raise ProtocolError("malformed", f"{mtype}: field 'age' must be seconds >= 0, got {header['age']!r:.40}")
    answers = header.get("re", 0)
    if type(answers) is not int or answers < 0:
        raise ProtocolError("malformed", f"{mtype}: field 're' must be an integer >= 0, got {answers!r:.40}")
    body = {k: header[k] for k in (*SCHEMA[mtype], *optional)}
    return Message(mtype, header["id"], body, tuple(frames[1:]), header["mid"], answers)


def _check(header: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    for key, kind in schema.items():
        if key not in header:
            raise ProtocolError("malformed", f"{where}: missing field {key!r}")
        value = header[key]
        if kind is object:
            continue
        if not _is(value, kind):
            raise ProtocolError("malformed", f"{where}: field {key!r} has type {type(value).__name__}")


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """msgpack's types: booleans are not integers, integers are floats."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _check_cards(header: Mapping[str, Any], mtype: MsgType) -> None:
    cards = [header["card"], *header["peers"]]
    if len(cards) > MAX_CARDS:
        raise ProtocolError("malformed", f"{mtype}: {len(cards)} peer cards (limit {MAX_CARDS})")
    for i, card in enumerate(cards):
        where = f"{mtype}: peer card {i}"
        if not isinstance(card, dict):
            raise ProtocolError("malformed", f"{where} is not a map")
        _check(card, _CARD, where)
        _check(card, {k: v for k, v in _CARD_OPTIONAL.items() if k in card}, where)
        if any(len(card.get(k, "")) > n for k, n in _CARD_FIELD_CHARS.items()):
            raise ProtocolError("malformed", f"{where}: a field is too long")
        if _CONTROL.search(card["id"]) or _CONTROL.search(card.get("name", "")):
            raise ProtocolError("malformed", f"{where}: its id or name holds control characters")
    if not _ADDRESS.fullmatch(header["card"]["addr"]):
        raise ProtocolError("malformed", f"{mtype}: the sender's address {header['card']['addr']!r:.80} is not "
                            "scheme://location")
    # A relayed card with an unusable address is left out, not the message: one such card, which
    # a peer of an older version may pass on, would otherwise stop the gossip of every peer.
    header["peers"] = [card for card in header["peers"] if _ADDRESS.fullmatch(card["addr"])]
    if header["card"]["id"] != header["id"]:
        raise ProtocolError("malformed", f"{mtype}: the card's id {header['card']['id']!r:.140} is not the sender's")
