"""Answers other peers: snapshot pulls, nudges, gossip, status and goodbyes.

Every request is decoded and validated (swarmnet.wire) before a handler sees it; a malformed
one is counted under its reason code in the peer's status, logged, answered with REJECT when it
carries enough to answer, and the server goes on. Handlers run as tasks, at most
``max_concurrent_requests`` at a time, so one slow request never holds up the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from swarmnet.buffers import Buffer
from swarmnet.codecs.hostbuf import host_bytes
from swarmnet.codecs.published import copies_done, until_copied
from swarmnet.errors import CodecError, ProtocolError, TransportError
from swarmnet.log import Throttle
from swarmnet.peer.screening import Poisoned
from swarmnet.transport import Listener
from swarmnet.transport.base import Route
from swarmnet.wire import (
    FULL,
    Limits,
    Message,
    MsgType,
    RejectCode,
    decode,
    encode,
    next_mid,
    reject,
    reply,
)

if TYPE_CHECKING:
    from swarmnet.peer.node import Peer

REJECT_LOG_EVERY_S = 10.0


def _more(held: int) -> str:
    return f"; {held} more refused for this reason since the last such line" if held else ""


class PeerServer:
    def __init__(self, peer: Peer, listener: Listener, limits: Limits, max_concurrent: int,
                 log: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        self.peer = peer
        self.listener = listener
        self.limits = limits
        self.log = log
        self._slots = asyncio.Semaphore(max_concurrent)
        self._reject_log = Throttle(REJECT_LOG_EVERY_S)
        """Refusals are logged per reason: a stranger sending garbage must not flood the log."""
        self._donation: Message | None = None
        """The lossless full snapshot on its way to a newcomer, if any: one at a time, so that
        newcomers arriving together spread over donors (newcomer.py) instead of queueing here."""
        self._oversize_told = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.handlers: dict[MsgType, Callable[[Message], Awaitable[Message]]] = {
            MsgType.HELLO: self.handle_hello,
            MsgType.PULL: self.handle_pull,
            MsgType.NUDGE: self.handle_nudge,
            MsgType.STATUS: self.handle_status,
            MsgType.BYE: self.handle_bye,
        }

    async def run(self) -> None:
        try:
            while True:
                route, frames = await self.listener.recv()
                self.peer.stats.bytes_in += sum(f.nbytes for f in frames)
                await self._slots.acquire()
                task = asyncio.create_task(self._serve(route, frames))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()

    async def _serve(self, route: Route, frames: list[memoryview]) -> None:
        answer: Message | None = None
        try:
            try:
                answer = await self._answer(frames)
            except Exception as exc:  # a bug of ours in reading the request (a handler's: _answer)
                answer = self._internal_error(exc, None)
            if answer is not None:
                out = encode(answer)
                # A donation holds its slot until it has left (bounded like any request).
                until_sent = self.peer.client.transfer_timeout if answer is self._donation else 0.0
                await self.listener.send(route, out, until_sent=until_sent)
                self.peer.stats.bytes_out += sum(memoryview(f).nbytes for f in out)
        except TransportError as exc:
            self.log.debug("reply failed: %s", exc)
        finally:
            if answer is not None and answer is self._donation:
                self._donation = None
            self._slots.release()

    async def _answer(self, frames: list[memoryview]) -> Message | None:
        me = self.peer.id
        try:
            msg = decode(frames, self.limits)
        except ProtocolError as exc:
            self._count_reject(exc.code, exc.reason, exc.sender)
            code = RejectCode.VERSION if exc.code == RejectCode.VERSION else RejectCode.MALFORMED
            # Answers the request's mid when its header could be read, else 0.
            return Message(MsgType.REJECT, me, {"code": str(code), "reason": exc.reason[:500]}, mid=next_mid(), re=exc.mid)
        handler = self.handlers.get(msg.type)
        if handler is None:
            self._count_reject("unexpected_type", f"{msg.type} is not a request", msg.sender)
            return reject(msg, me, RejectCode.MALFORMED, f"{msg.type} is not a request")
        try:
            return await handler(msg)
        except (ProtocolError, CodecError) as exc:
            if isinstance(exc, Poisoned):  # the screen counted it under its own code
                held = self._reject_log.due(exc.code)
                if held is not None:
                    self.log.warning("refused a nudge claiming to come from %r: %s%s", msg.sender, exc, _more(held))
            else:
                code = exc.code if isinstance(exc, ProtocolError) else "bad_payload"
                self._count_reject(code, str(exc), msg.sender)
            # No back-off for msg.sender: a request's sender id is a claim (even with a shared
            # swarm key), so charging it would let anyone sideline an honest peer. A peer that
            # serves bad models is caught by our own pulls from its address.
            return reject(msg, me, RejectCode.MALFORMED, str(exc))
        except Exception as exc:  # a bug of ours
            return self._internal_error(exc, msg)

    def _internal_error(self, exc: Exception, request: Message | None) -> Message:
        """A bug of ours: count it, log it loudly, still answer (the request's mid when read)."""
        self.peer.stats.rejected["internal_error"] += 1
        self.log.exception("error answering a request")
        reason = f"internal error: {exc.__class__.__name__}"
        if request is None:
            return Message(MsgType.REJECT, self.peer.id, {"code": str(RejectCode.MALFORMED), "reason": reason},
                           mid=next_mid())
        return reject(request, self.peer.id, RejectCode.MALFORMED, reason)

    def _count_reject(self, code: str, reason: str, sender: str | None) -> None:
        self.peer.stats.rejected[code] += 1
        held = self._reject_log.due(code)
        if held is not None:
            # repr: the id is whatever the sender wrote, line breaks included (a forged log line)
            self.log.warning("rejected a message %s: %s (%s)%s",
                             f"claiming to come from {sender!r}" if sender else "from an unknown sender", reason, code,
                             _more(held))

    # -- handlers ------------------------------------------------------------------------------

    async def handle_hello(self, msg: Message) -> Message:
        body = self.peer.membership.handle_hello(msg)
        return reply(msg, MsgType.PEERS, self.peer.id, **body)

    async def handle_pull(self, msg: Message) -> Message:
        peer = self.peer
        version = msg.body["version"]
        if msg.body["want"] == FULL and version is not None:  # malformed, whatever versions we hold
            return reject(msg, peer.id, RejectCode.MALFORMED, "a full pull takes the latest snapshot (version nil)")
        snap = peer.store.latest() if version is None else peer.store.get(version)
        if snap is None:
            code = RejectCode.NOT_READY if version is None else RejectCode.GONE
            return reject(msg, peer.id, code, "no snapshot" if version is None else f"version {version} is gone")
        age = time.monotonic() - snap.created
        if msg.body["want"] == FULL:  # a newcomer adopting our model: lossless, no interaction
            busy = "sending our model to another newcomer; ask another peer"
            if self._donation is not None:
                return reject(msg, peer.id, RejectCode.BUSY, busy)
            frame = host_bytes(snap.values_N)
            await until_copied(copies_done(snap.values_N.device))  # at once on a CPU
            if self._donation is not None:  # another newcomer's came first while ours was copied
                return reject(msg, peer.id, RejectCode.BUSY, busy)
            self._donation = reply(msg, MsgType.SNAPSHOT, peer.id, [frame], version=snap.version, codec="fp32",
                                   meta={"n": snap.values_N.numel()}, clock=peer.clock.value, age=age,
                                   layout=peer.compute.flat.layout)
            peer.stats.donations += 1
            return self._donation
        await until_copied(snap.encoded.ready)  # select may read the frames' bytes
        meta, frames = peer.codec.select(snap.encoded, msg.body["want"])  # raises on a request it cannot serve
        # Only the first pull of an interaction moves the phase clocks (SPEC 1.2 step 1), and
        # only once a reply is built: a refused pull is no interaction.
        clock = peer.clock.serve(msg.body["clock"]) if version is None else peer.clock.value
        self._tell_if_oversized(frames)
        return reply(msg, MsgType.SNAPSHOT, peer.id, frames, version=snap.version,
                     codec=peer.codec.name, meta=meta, clock=clock, age=age, layout=peer.compute.flat.layout)

    def _tell_if_oversized(self, frames: tuple[Buffer, ...]) -> None:
        """A frame over the frame limit (every peer's, when their configs agree) is dropped by
        the reader's libzmq, which tells neither side why. A hand-set limit passed the start
        check, but a lattice snapshot grows as its step size shrinks: say so, once."""
        if self._oversize_told:
            return
        largest = max((memoryview(f).nbytes for f in frames), default=0)
        if largest > self.limits.max_frame_bytes:
            self._oversize_told = True
            self.log.warning("serving a %d-byte snapshot frame, over network.max_message_bytes = %d: readers "
                             "drop it; set network.max_message_bytes = 0 (auto) on every peer",
                             largest, self.limits.max_frame_bytes)

    async def handle_nudge(self, msg: Message) -> Message:
        peer = self.peer
        if peer.inbox.closed:
            return reject(msg, peer.id, RejectCode.DRAINING, "peer is stopping")
        if not peer.cfg.algorithm.symmetric:  # no peer of its swarm sends one: only a stranger or a misconfiguration
            peer.stats.nudges_refused += 1
            return reject(msg, peer.id, RejectCode.MISMATCH, "this peer merges pull-only (algorithm.symmetric = "
                          "false) and takes no nudges: give every peer of the swarm the same [algorithm] section")
        if msg.body["codec"] != peer.codec.name:
            return reject(msg, peer.id, RejectCode.MISMATCH, f"codec {msg.body['codec']}, ours is {peer.codec.name}")
        latest = peer.store.latest()  # the only version a nudge may be keyed on (MergeGate)
        if latest is None:
            return reject(msg, peer.id, RejectCode.GONE, f"version {msg.body['used']} is gone")
        refusal = peer.gate.admit_nudge(msg.body["used"], latest.version, published_nudges=latest.nudges)
        if refusal is not None:
            peer.stats.nudges_refused += 1
            return reject(msg, peer.id, RejectCode.BUSY, refusal)
        try:
            accepted = await peer.exchange.accept_nudge(msg, latest)
        except BaseException:
            peer.gate.cancel_nudge(latest.version)
            raise
        if not accepted:
            peer.gate.cancel_nudge(latest.version)
            if peer.inbox.closed:
                return reject(msg, peer.id, RejectCode.DRAINING, "peer is stopping")
            return reject(msg, peer.id, RejectCode.GONE, f"version {latest.version} was replaced by weights loaded since")
        return reply(msg, MsgType.ACK, peer.id)

    async def handle_status(self, msg: Message) -> Message:
        return reply(msg, MsgType.STATUS_REPLY, self.peer.id, status=self.peer.status(msg.sender))

    async def handle_bye(self, msg: Message) -> Message:
        self.peer.table.mark_left(msg.sender)
        return reply(msg, MsgType.ACK, self.peer.id)

